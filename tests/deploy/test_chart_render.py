"""The chart lints clean (Helm v4, strict) and every CI values file renders objects that
validate: core kinds against Kubernetes' schemas, custom resources against the upstream
CRDs; and each render equals its committed golden file."""

from __future__ import annotations

import copy

import pytest

from tests.deploy import chart
from tests.deploy.conftest import CI_NAMES, Render

EXPECTED_KINDS = {
    "RayCluster", "Service", "NetworkPolicy", "PodDisruptionBudget", "ServiceAccount",
}  # fmt: skip


@pytest.mark.parametrize("name", CI_NAMES)
def test_lint_strict(name: str) -> None:
    import helm_python as helm

    values = chart.load_values(chart.CHART / "ci" / name)
    report = helm.lint(str(chart.CHART), values, strict=True, kube_version=f"v{chart.KUBE_VERSION}")
    assert report["errors"] == []
    # Severity 1 is "info" (helm suggests an icon); warnings (2) and errors (3) fail.
    assert [m for m in report["messages"] if m["severity"] >= 2] == []


@pytest.mark.parametrize("name", CI_NAMES)
def test_every_object_validates(renders: dict[str, Render], name: str) -> None:
    r = renders[name]
    assert {o["kind"] for o in r.objects} >= EXPECTED_KINDS
    for obj in r.objects:
        chart.validate(obj)  # raises naming the object and the failing path


def test_validation_catches_a_misspelt_field(renders: dict[str, Render]) -> None:
    """The validators are strict: a field the API server would reject fails here too."""
    rc = copy.deepcopy(renders["default-cpu-values.yaml"].raycluster)
    rc["spec"]["workerGroupSpecs"][0]["replica"] = 1
    with pytest.raises(AssertionError, match="'replica' was unexpected"):
        chart.validate(rc)
    rc = copy.deepcopy(renders["default-cpu-values.yaml"].raycluster)
    rc["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["ports"][0]["port"] = 1
    with pytest.raises(AssertionError, match="'port' was unexpected"):
        chart.validate(rc)
    (svc,) = renders["default-cpu-values.yaml"].of_kind("Service")
    svc = copy.deepcopy(svc)
    svc["spec"]["ports"][0]["portt"] = 1
    with pytest.raises(AssertionError, match="portt"):
        chart.validate(svc)


@pytest.mark.parametrize("name", CI_NAMES)
def test_render_matches_golden(renders: dict[str, Render], name: str) -> None:
    golden = chart.golden_path(chart.CHART / "ci" / name)
    assert golden.is_file(), (
        f"no golden render {golden}: run python -m tests.deploy.chart --update-golden"
    )
    assert chart.golden_text(renders[name].text) == golden.read_text(), (
        f"{name} renders differently from {golden.name}; if the change is meant, "
        "regenerate with: PYTHONPATH=$PWD python -m tests.deploy.chart --update-golden"
    )


def test_the_matrix_covers_the_cases() -> None:
    assert set(CI_NAMES) >= {
        "default-cpu-values.yaml", "gpu-tp-pp-values.yaml", "plan-values.yaml",
        "monitoring-values.yaml", "grpc-transport-values.yaml",
        "existing-secrets-values.yaml", "ingress-values.yaml",
    }  # fmt: skip


def test_notes_say_how_to_reach_it(renders: dict[str, Render]) -> None:
    notes = renders["default-cpu-values.yaml"].text["baton/templates/NOTES.txt"]
    assert "port-forward svc/baton-router 8000:8000 50051:50051" in notes
    assert "/dashboard" in notes
    assert "baton status --server localhost:50051" in notes
    notes = renders["monitoring-values.yaml"].text["baton/templates/NOTES.txt"]
    assert "no dashboards in files/grafana/" in notes or "dashboard ConfigMap(s)" in notes
    notes = renders["existing-secrets-values.yaml"].text["baton/templates/NOTES.txt"]
    assert "--admin-key" in notes and "Authorization: Bearer" in notes


@pytest.mark.parametrize(
    "path", ["", "Meta-Llama-3-8B", "Meta-Llama-3-8B/", "llama/Llama-3.Q4_1.gguf", "m.gguf"]
)
def test_notes_name_the_model_as_the_router_does(path: str) -> None:
    from router.service import served_model_name

    values: dict[str, object] = {}
    if path:
        values = {"model": {"source": "pvc", "path": path, "pvc": {"existingClaim": "c"}}}
    notes = chart.render(values)["baton/templates/NOTES.txt"]
    want = served_model_name(f"/models/{path}" if path else None)
    assert f'{{"model": "{want}"' in notes


@pytest.mark.parametrize("dtype", ["auto", "bfloat16"])
def test_model_dtype_reaches_baton_serve(dtype: str) -> None:
    values = {} if dtype == "auto" else {"model": {"dtype": dtype}}
    cluster = chart.render(values)["baton/templates/raycluster.yaml"]
    assert f"--dtype {dtype} " in cluster
