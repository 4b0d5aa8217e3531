"""Policies every render must keep: restricted pod security, resources set, no secret
data, Ray's ports on no Service, a deny-by-default NetworkPolicy, GPUs equal to TP x PP,
and each role pinned to its worker group by a Ray node label."""

from __future__ import annotations

import re
import shlex
from typing import Any

import pytest

from tests.deploy import chart
from tests.deploy.conftest import CI_NAMES, Render

SECRET_NAME = re.compile(r"KEY|TOKEN|SECRET|PASSWORD", re.IGNORECASE)


def _pod_specs(r: Render) -> list[tuple[str, dict[str, Any]]]:
    rc = r.raycluster["spec"]
    out = [("head", rc["headGroupSpec"]["template"]["spec"])]
    out += [(g["groupName"], g["template"]["spec"]) for g in rc["workerGroupSpecs"]]
    return out


def _containers(spec: dict[str, Any]) -> list[dict[str, Any]]:
    return spec.get("initContainers", []) + spec["containers"]


@pytest.mark.parametrize("name", CI_NAMES)
def test_pods_are_restricted(renders: dict[str, Render], name: str) -> None:
    for group, spec in _pod_specs(renders[name]):
        pod = spec["securityContext"]
        assert pod["runAsNonRoot"] is True and pod["runAsUser"] > 0, group
        assert pod["seccompProfile"]["type"] == "RuntimeDefault", group
        assert spec["automountServiceAccountToken"] is False, group
        assert "hostNetwork" not in spec and "hostPID" not in spec, group
        for c in _containers(spec):
            sc = c["securityContext"]
            where = f"{group}/{c['name']}"
            assert sc["runAsNonRoot"] is True, where
            assert sc["allowPrivilegeEscalation"] is False, where
            assert sc["privileged"] is False, where
            assert sc["capabilities"] == {"drop": ["ALL"]}, where
            assert sc["readOnlyRootFilesystem"] is True, where
            assert sc["seccompProfile"]["type"] == "RuntimeDefault", where
            for kind in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(c["resources"][kind]), f"{where} {kind}"
            # The root filesystem is read-only: /tmp is an emptyDir.
            mounts = {m["mountPath"] for m in c["volumeMounts"]}
            assert "/tmp" in mounts, where


@pytest.mark.parametrize("name", CI_NAMES)
def test_no_secret_data(renders: dict[str, Render], name: str) -> None:
    r = renders[name]
    assert r.of_kind("Secret") == []
    for group, spec in _pod_specs(r):
        for c in _containers(spec):
            for env in c.get("env", []):
                if SECRET_NAME.search(env["name"]) and env["name"] != "RAY_AUTH_MODE":
                    assert "value" not in env, f"{group}/{c['name']} sets {env['name']}"
                    assert "secretKeyRef" in env["valueFrom"], env
    for path, text in r.text.items():
        assert "stringData" not in text and not re.search(
            r"^data:\s*\n\s+\S+:\s*[A-Za-z0-9+/=]{16,}$", text, re.M
        ), path


@pytest.mark.parametrize("name", CI_NAMES)
def test_no_service_exposes_ray_ports(renders: dict[str, Render], name: str) -> None:
    r = renders[name]
    head = r.raycluster["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    ray_names = {p["name"] for p in head["ports"] if p["containerPort"] in chart.RAY_PORTS}
    for svc in r.of_kind("Service"):
        for port in svc["spec"]["ports"]:
            assert port["port"] not in chart.RAY_PORTS, svc["metadata"]["name"]
            assert port["targetPort"] not in ray_names | chart.RAY_PORTS
        assert svc["spec"]["type"] == r.merged["router"]["service"]["type"]
    # The Ray dashboard listens on the head's loopback only.
    assert r.raycluster["spec"]["headGroupSpec"]["rayStartParams"]["dashboard-host"] == "127.0.0.1"


@pytest.mark.parametrize("name", CI_NAMES)
def test_network_policy_denies_by_default(renders: dict[str, Render], name: str) -> None:
    r = renders[name]
    policies = {p["metadata"]["name"]: p["spec"] for p in r.of_kind("NetworkPolicy")}
    base = policies["baton"]
    release = {"app.kubernetes.io/name": "baton", "app.kubernetes.io/instance": "baton"}
    assert base["podSelector"]["matchLabels"] == release
    assert set(base["policyTypes"]) == {"Ingress", "Egress"}
    # Ingress: only from the release's own pods (all ports).
    assert base["ingress"] == [{"from": [{"podSelector": {"matchLabels": release}}]}]
    # Egress: the release, DNS, and only the CIDRs asked for.
    dns = [e for e in base["egress"] if e.get("ports")]
    assert dns and {p["port"] for p in dns[0]["ports"]} == {53}
    cidrs = [b["ipBlock"]["cidr"] for e in base["egress"] for b in e["to"] if "ipBlock" in b]
    assert cidrs == r.merged["networkPolicy"]["extraEgressCIDRs"]
    router = policies["baton-router"]
    ports = {p["port"] for p in router["ingress"][0]["ports"]}
    assert ports == {r.merged["router"]["grpcPort"], r.merged["router"]["httpPort"]}
    allowed = r.merged["networkPolicy"]["allowedNamespaces"]
    peers = router["ingress"][0]["from"]
    assert peers[0] == {"podSelector": {}}  # the release's namespace
    if allowed:
        assert peers[1]["namespaceSelector"]["matchExpressions"][0]["values"] == allowed


@pytest.mark.parametrize("name", CI_NAMES)
def test_gpus_equal_tp_times_pp(renders: dict[str, Render], name: str) -> None:
    r = renders[name]
    gpu = r.merged["accelerator"]["resourceName"]
    on_gpu = r.merged["accelerator"]["type"] != "cpu"
    head = r.raycluster["spec"]["headGroupSpec"]
    assert gpu not in head["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert head["rayStartParams"]["num-gpus"] == "0"
    for group in r.raycluster["spec"]["workerGroupSpecs"]:
        role = r.merged[group["groupName"]]
        want = role["parallelism"]["tensor"] * role["parallelism"]["pipeline"]
        res = group["template"]["spec"]["containers"][0]["resources"]
        if on_gpu:
            assert res["limits"][gpu] == res["requests"][gpu] == want, group["groupName"]
        else:
            assert gpu not in res["limits"] and gpu not in res["requests"]
        assert group["replicas"] == group["minReplicas"] == group["maxReplicas"] == role["replicas"]


@pytest.mark.parametrize("name", CI_NAMES)
def test_roles_are_pinned_to_their_groups(renders: dict[str, Render], name: str) -> None:
    r = renders[name]
    rc = r.raycluster["spec"]
    groups = {g["groupName"]: g for g in rc["workerGroupSpecs"]}
    assert set(groups) == {"prefill", "decode"}
    head = rc["headGroupSpec"]
    serve = _serve_args(head)
    for role, group in groups.items():
        assert group["labels"] == {"baton.io/role": role}
        assert group["template"]["metadata"]["labels"]["baton.io/role"] == role
        assert serve[serve.index(f"--{role}-nodes") + 1] == f"baton.io/role={role}"
        layout = r.merged[role]["parallelism"]
        assert serve[serve.index(f"--{role}-parallel") + 1] == (
            f"{layout['tensor']}x{layout['pipeline']}"
        )
        assert serve[serve.index(f"--{role}") + 1] == str(r.merged[role]["replicas"])
        # What KubeRay will run in the worker pods.
        cmd = chart.kuberay_argv(group, head=False, head_address="H:6379")[-1]
        assert f"--labels=baton.io/role={role}" in cmd and "--block" in cmd
        assert "--address=H:6379" in cmd
        # /dev/shm is memory-backed with the role's size.
        (shm,) = [v for v in group["template"]["spec"]["volumes"] if v["name"] == "dshm"]
        assert shm["emptyDir"] == {"medium": "Memory", "sizeLimit": r.merged[role]["shmSize"]}


def _serve_args(head: dict[str, Any]) -> list[str]:
    """The `baton serve` arguments of the head's script, split as bash would."""
    script = head["template"]["spec"]["containers"][0]["args"][0]
    line = script[script.index("exec baton serve") :].replace("\\\n", " ")
    words = shlex.split(line.split(";")[0])
    return words[3:]  # after "exec baton serve"


@pytest.mark.parametrize("name", CI_NAMES)
def test_head_commands_parse_with_the_real_clis(renders: dict[str, Render], name: str) -> None:
    """The head's `baton serve` line parses with Baton's own argument parser, and its
    `ray start` line and KubeRay's worker lines parse with Ray's own CLI."""
    from cluster.cli import build_parser

    r = renders[name]
    head = r.raycluster["spec"]["headGroupSpec"]
    args = [
        a.replace('"$BATON_API_KEY"', "KEY").replace("$BATON_API_KEY", "KEY")
        for a in _serve_args(head)
    ]
    parsed = build_parser().parse_args(["serve", *args])  # SystemExit on an unknown flag
    assert parsed.prefill_nodes == "baton.io/role=prefill"
    assert parsed.decode_nodes == "baton.io/role=decode"
    assert parsed.connect_timeout > 0
    assert parsed.transport == r.merged["router"]["transport"]
    assert parsed.grpc_port == r.merged["router"]["grpcPort"]
    assert parsed.http_port == r.merged["router"]["httpPort"]
    assert parsed.cpus_per_rank == r.merged["ray"]["cpusPerRank"]
    assert (parsed.api_key is not None) == r.merged["auth"]["apiKey"]["enabled"]
    if r.merged["model"]["source"] != "image":
        assert parsed.model.startswith(r.merged["model"]["mountPath"] + "/")

    ray_lines = [chart.kuberay_argv(head, head=True, head_address="")[-1]]
    ray_lines += [
        chart.kuberay_argv(g, head=False, head_address="baton-head-svc:6379")[-1]
        for g in r.raycluster["spec"]["workerGroupSpecs"]
    ]
    for text in ray_lines:
        start = next(line for line in re.split(r"[;\n]", text) if "ray start" in line)
        _parse_ray_start(shlex.split(start.strip())[2:])


def _parse_ray_start(argv: list[str]) -> None:
    from ray.scripts.scripts import start

    start.make_context("start", list(argv))  # raises click.UsageError on a bad flag


def _selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


@pytest.mark.parametrize("name", CI_NAMES)
def test_every_selector_selects_the_pods_it_means(renders: dict[str, Render], name: str) -> None:
    """Services, budgets, policies and monitors select pods by the labels the templates
    give them (KubeRay keeps a template's labels, app.kubernetes.io/name included)."""
    r = renders[name]
    rc = r.raycluster["spec"]
    pods = {"router": rc["headGroupSpec"]["template"]["metadata"]["labels"]}
    pods.update(
        {g["groupName"]: g["template"]["metadata"]["labels"] for g in rc["workerGroupSpecs"]}
    )

    def chosen(selector: dict[str, str]) -> set[str]:
        return {role for role, labels in pods.items() if _selects(selector, labels)}

    (svc,) = r.of_kind("Service")
    assert chosen(svc["spec"]["selector"]) == {"router"}
    for pdb in r.of_kind("PodDisruptionBudget"):
        role = pdb["metadata"]["labels"]["baton.io/role"]
        assert chosen(pdb["spec"]["selector"]["matchLabels"]) == {role}
    for policy in r.of_kind("NetworkPolicy"):
        want = {"router"} if policy["metadata"]["name"] == "baton-router" else set(pods)
        assert chosen(policy["spec"]["podSelector"]["matchLabels"]) == want
    for monitor in r.of_kind("PodMonitor"):
        role = monitor["metadata"]["labels"]["baton.io/role"]
        assert chosen(monitor["spec"]["selector"]["matchLabels"]) == {role}
        ports = {p["name"] for p in _port_owner(rc, role)["ports"]}
        assert monitor["spec"]["podMetricsEndpoints"][0]["port"] in ports
    for monitor in r.of_kind("ServiceMonitor"):
        assert _selects(monitor["spec"]["selector"]["matchLabels"], svc["metadata"]["labels"])
        assert monitor["spec"]["endpoints"][0]["port"] in {p["name"] for p in svc["spec"]["ports"]}


def _port_owner(rc: dict[str, Any], role: str) -> dict[str, Any]:
    if role == "router":
        return rc["headGroupSpec"]["template"]["spec"]["containers"][0]
    (group,) = [g for g in rc["workerGroupSpecs"] if g["groupName"] == role]
    return group["template"]["spec"]["containers"][0]
