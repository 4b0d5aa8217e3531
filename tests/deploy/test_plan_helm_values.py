"""`baton plan --helm-values` writes chart values that render, validate, and deploy the
plan's instances: replicas and TP x PP per role, GPUs per pod = TP x PP."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from cluster.cli import main
from cluster.planner.helm_values import helm_values, to_yaml
from cluster.planner.model_spec import PRESETS
from cluster.planner.plan import Plan
from tests.deploy import chart

PLAN_ARGS = [
    "plan", "--model", "llama-13b", "--nodes", "1", "--gpus-per-node", "4",
    "--gpu", "A100-80G", "--max-pp", "1", "--workload", "synthetic:in=256,out=64",
    "--ttft-slo", "0.5", "--tpot-slo", "0.1", "--rate", "2",
]  # fmt: skip


@pytest.fixture(scope="module")
def planned(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], Path]:
    out = tmp_path_factory.mktemp("plan")
    plan_file, values_file = out / "plan.json", out / "values.yaml"
    assert main([*PLAN_ARGS, "--out", str(plan_file), "--helm-values", str(values_file)]) == 0
    return json.loads(plan_file.read_text()), values_file


def test_plan_values_render_and_validate(planned: tuple[dict[str, Any], Path]) -> None:
    plan, values_file = planned
    values = yaml.safe_load(values_file.read_text())
    objects = chart.manifests(chart.render(values))
    for obj in objects:
        chart.validate(obj)
    (rc,) = [o for o in objects if o["kind"] == "RayCluster"]
    groups = {g["groupName"]: g for g in rc["spec"]["workerGroupSpecs"]}
    for role in ("prefill", "decode"):
        insts = [i for i in plan["instances"] if i["role"] == role]
        assert insts, role
        assert groups[role]["replicas"] == len(insts)
        tp, pp = insts[0]["tp"], insts[0]["pp"]
        assert values[role]["parallelism"] == {"tensor": tp, "pipeline": pp}
        limits = groups[role]["template"]["spec"]["containers"][0]["resources"]["limits"]
        assert limits["nvidia.com/gpu"] == tp * pp
        assert limits["cpu"] == str(2 * tp * pp)
    arch = values["model"]["architecture"]
    assert arch["numHeads"] == PRESETS["llama-13b"].num_heads
    assert values["accelerator"] == {"type": "nvidia", "gpusPerNode": 4}


def _edited(plan: dict[str, Any], role_of: list[tuple[str, int]]) -> Plan:
    data = json.loads(json.dumps(plan))
    base = data["instances"][0]
    data["instances"] = []
    for i, (role, tp) in enumerate(role_of):
        inst = dict(base, role=role, tp=tp, pp=1)
        inst["stages"] = [{"node": 0, "gpus": list(range(i * 2, i * 2 + tp))}]
        data["instances"].append(inst)
    data["cluster"]["gpus_per_node"] = 8
    return Plan.from_json(json.dumps(data))


def test_plans_the_chart_cannot_deploy_are_refused(planned: tuple[dict[str, Any], Path]) -> None:
    plan, _ = planned
    model = PRESETS["llama-13b"]
    with pytest.raises(
        ValueError, match="deploys prefill and decode instances; this plan has colocated"
    ):
        helm_values(_edited(plan, [("colocated", 1), ("colocated", 1)]), model)
    with pytest.raises(
        ValueError, match="prefill instances must share one layout, got tp1pp1, tp2pp1"
    ):
        helm_values(_edited(plan, [("prefill", 1), ("prefill", 2), ("decode", 1)]), model)


def test_to_yaml_round_trips() -> None:
    values = {"a": {"b": 1, "c": "x: y", "d": True, "e": {"f": 2.5}}, "g": "nvidia"}
    assert yaml.safe_load(to_yaml(values)) == values
