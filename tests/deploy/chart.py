"""Render Baton's Helm chart offline and validate what it emits (no cluster needed).

Helm v4 runs in-process through ``helm_python`` (its Go SDK behind a C ABI: no helm
binary). Core kinds are checked with ``kubernetes_validate`` (strict: unknown fields are
errors) against a recent Kubernetes; the custom resources against the upstream CRDs'
``openAPIV3Schema`` vendored in ``crds/`` (see its README), closed the same way.

Golden renders live in ``golden/``; after a deliberate chart change, regenerate them with

    PYTHONPATH=$PWD python -m tests.deploy.chart --update-golden

and review the diff.
"""

from __future__ import annotations

import copy
import json
import sys
from functools import cache
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "deploy" / "helm" / "baton"
CI_VALUES = sorted((CHART / "ci").glob("*-values.yaml"))
GOLDEN = Path(__file__).resolve().parent / "golden"
CRDS = Path(__file__).resolve().parent / "crds"
KUBE_VERSION = "1.34.0"  # a recent Kubernetes (kubernetes-validate ships up to 1.37)
RELEASE, NAMESPACE = "baton", "serving"

CRD_SCHEMAS = {
    ("ray.io/v1", "RayCluster"): "ray.io_v1_raycluster.json",
    ("monitoring.coreos.com/v1", "ServiceMonitor"): "monitoring.coreos.com_v1_servicemonitor.json",
    ("monitoring.coreos.com/v1", "PodMonitor"): "monitoring.coreos.com_v1_podmonitor.json",
    ("monitoring.coreos.com/v1", "PrometheusRule"): "monitoring.coreos.com_v1_prometheusrule.json",
}
RAY_PORTS = {6379, 8265, 10001, 52365, 8080}  # GCS, dashboard, client, agent, metrics


def load_values(path: Path) -> dict[str, Any]:
    return yaml.safe_load(path.read_text()) or {}


def render(values: dict[str, Any] | None = None, chart: Path = CHART) -> dict[str, str]:
    """Template path -> rendered text, as `helm template` would produce (schema checked)."""
    import helm_python as helm

    loaded = helm.Chart.load(str(chart))
    out = loaded.render(values or {}, name=RELEASE, namespace=NAMESPACE, is_install=True)
    return {path: text for path, text in sorted(out.items()) if text.strip()}


def manifests(rendered: dict[str, str]) -> list[dict[str, Any]]:
    """Every Kubernetes object of a render (NOTES.txt is not one)."""
    docs = []
    for path, text in rendered.items():
        if path.endswith("NOTES.txt"):
            continue
        docs.extend(d for d in yaml.safe_load_all(text) if d)
    return docs


def golden_text(rendered: dict[str, str]) -> str:
    """A render as one stable document stream, each object under its template's name."""
    parts = [f"# Source: {path}\n{text.strip()}\n" for path, text in rendered.items()]
    return "---\n".join(parts)


def golden_path(values_file: Path) -> Path:
    return GOLDEN / values_file.name.replace("-values.yaml", ".yaml")


# -- validation ------------------------------------------------------------------------


def _closed(schema: Any) -> Any:
    """The schema with every object that lists properties closed (strict field validation)."""
    if isinstance(schema, list):
        return [_closed(v) for v in schema]
    if not isinstance(schema, dict):
        return schema
    out: dict[str, Any] = {}
    for key, value in schema.items():
        if key in ("properties", "patternProperties", "definitions"):
            out[key] = {name: _closed(sub) for name, sub in value.items()}
        elif key in ("items", "additionalProperties", "not", "anyOf", "allOf", "oneOf"):
            out[key] = _closed(value)
        else:
            out[key] = value
    if (
        "properties" in out
        and "additionalProperties" not in out
        and not out.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    return out


@cache
def crd_validator(api_version: str, kind: str) -> Any:
    import jsonschema

    schema = json.loads((CRDS / CRD_SCHEMAS[(api_version, kind)]).read_text())
    # (Not check_schema: upstream patterns use Go's RE2 syntax, e.g. "^(?i)...".)
    return jsonschema.Draft7Validator(_closed(schema))


def validate(obj: dict[str, Any]) -> None:
    """Raise (with the object's kind/name and the failing path) unless ``obj`` is valid."""
    key = (obj.get("apiVersion", ""), obj.get("kind", ""))
    where = f"{obj.get('kind')}/{obj.get('metadata', {}).get('name')}"
    if key in CRD_SCHEMAS:
        errors = sorted(crd_validator(*key).iter_errors(obj), key=lambda e: list(e.path))
        if errors:
            msgs = [f"{'/'.join(map(str, e.path))}: {e.message[:300]}" for e in errors[:5]]
            raise AssertionError(f"{where} does not match its CRD: " + "; ".join(msgs))
        for template in pod_templates(obj):
            _validate_core(
                {
                    "apiVersion": "v1",
                    "kind": "PodTemplate",
                    "metadata": {"name": "t"},
                    "template": template,
                },  # fmt: skip
                f"{where} pod template",
            )
        return
    _validate_core(obj, where)


def _validate_core(obj: dict[str, Any], where: str) -> None:
    import kubernetes_validate

    try:
        kubernetes_validate.validate(copy.deepcopy(obj), KUBE_VERSION, strict=True)
    except kubernetes_validate.ValidationError as e:
        path = "/".join(map(str, e.path))
        raise AssertionError(f"{where}: {path}: {e.message[:300]}") from None


def pod_templates(obj: dict[str, Any]) -> list[dict[str, Any]]:
    """The pod templates of a RayCluster (head first), else none."""
    if obj.get("kind") != "RayCluster":
        return []
    spec = obj["spec"]
    return [spec["headGroupSpec"]["template"]] + [g["template"] for g in spec["workerGroupSpecs"]]


# -- what KubeRay makes of a group ----------------------------------------------------


def kuberay_argv(group: dict[str, Any], head: bool, head_address: str) -> list[str]:
    """The argv KubeRay (v1.7, pod.go) gives a group's Ray container: the user's command
    and args as they are when they contain "ray start" or the overwrite annotation is
    set; else ``/bin/bash -c -- "ulimit -n ...; ray start [--head] --k=v ..."`` from
    rayStartParams, the group's labels (``--labels=k=v,...``) and the container's limits
    (num-cpus, memory, num-gpus), with ``--block`` always on (a user command would run
    before it, joined with ``&&``; the chart's workers have none)."""
    container = group["template"]["spec"]["containers"][0]
    user = container.get("command", []) + container.get("args", [])
    annotations = group["template"].get("metadata", {}).get("annotations", {})
    if "ray start" in " ".join(user) or annotations.get("ray.io/overwrite-container-cmd") == "true":
        return list(user)
    assert not user, "a user command before KubeRay's ray start: not used by this chart"
    params = dict(group.get("rayStartParams", {}))
    if not head:
        params.setdefault("address", head_address)
    params.setdefault("metrics-export-port", "8080")
    params["block"] = "true"
    params.setdefault("dashboard-agent-listen-port", "52365")
    if group.get("labels"):
        params["labels"] = ",".join(f"{k}={v}" for k, v in sorted(group["labels"].items()))
    limits = container.get("resources", {}).get("limits", {})
    if "num-cpus" not in params and "cpu" in limits:
        params["num-cpus"] = str(_cpus(limits["cpu"]))
    if "memory" not in params and "memory" in limits:
        params["memory"] = str(_bytes(limits["memory"]))
    gpu = next((v for k, v in sorted(limits.items()) if k.endswith("/gpu")), None)
    if "num-gpus" not in params and gpu:
        params["num-gpus"] = str(int(gpu))
    flags = []
    for key in sorted(params):
        value = params[key]
        if value.lower() == "true":
            flags.append(f"--{key}")
        elif value.lower() != "false":
            flags.append(f"--{key}={value}")
    start = "ray start --head" if head else "ray start"
    script = f"ulimit -n ${{RAY_START_ULIMIT_OPEN_FILES:-65536}}; {start} {' '.join(flags)}"
    return ["/bin/bash", "-c", "--", script]


def kuberay_env(
    group: dict[str, Any], head: bool, cluster: str, head_ip: str, start_cmd: str
) -> dict[str, str]:
    # (start_cmd: KubeRay's generated `ray start` line, whether or not it runs it.)
    """The variables KubeRay (v1.7, pod.go setContainerEnvVars) adds to a Ray container,
    unless the template sets them ("ip" is the head's address as the pod reaches it)."""
    port = "6379"
    if head:
        port = group.get("rayStartParams", {}).get("port", port)
    address = f"127.0.0.1:{port}" if head else f"{head_ip}:{port}"
    return {
        "RAY_CLUSTER_NAME": cluster,
        "RAY_NODE_TYPE_NAME": "headgroup" if head else group["groupName"],
        "KUBERAY_GEN_RAY_START_CMD": start_cmd,
        "RAY_PORT": port,
        "RAY_ADDRESS": address,
        "RAY_USAGE_STATS_KUBERAY_IN_USE": "1",
        "FQ_RAY_IP": head_ip,
        "RAY_IP": head_ip,
    }


def _cpus(q: Any) -> int:
    s = str(q)
    return max(1, int(s[:-1]) // 1000) if s.endswith("m") else int(float(s))


_UNITS = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 10**3, "M": 10**6, "G": 10**9}


def _bytes(q: Any) -> int:
    s = str(q)
    for unit, mult in _UNITS.items():
        if s.endswith(unit):
            return int(float(s[: -len(unit)]) * mult)
    return int(s)


def update_golden() -> None:
    GOLDEN.mkdir(exist_ok=True)
    for path in CI_VALUES:
        golden_path(path).write_text(golden_text(render(load_values(path))))
        print(f"wrote {golden_path(path).relative_to(ROOT)}")


if __name__ == "__main__":
    if sys.argv[1:] != ["--update-golden"]:
        sys.exit("usage: python -m tests.deploy.chart --update-golden")
    update_golden()
