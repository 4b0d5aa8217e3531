from __future__ import annotations

import dataclasses
import json
import math

import pytest

from cluster.planner.cluster_spec import ClusterSpec, SLOs
from cluster.planner.plan import ColocatedBaseline, InstancePlan, LatencyPercentiles, Plan, Stage


def _plan(instances: tuple[InstancePlan, ...]) -> Plan:
    return Plan(
        algorithm="high",
        model="llama-13b",
        cluster=ClusterSpec(2, 4, "H100-80G"),
        slos=SLOs(0.25, 0.1, 0.9),
        workload="synthetic:in=512,out=128",
        rate=12.5,
        burstiness=1.0,
        seed=3,
        profile_source="analytic:H100-80G",
        instances=instances,
        per_gpu_goodput=4.25,
        attainment=0.97,
        colocated=ColocatedBaseline(tp=2, pp=1, instances=2, per_gpu_goodput=3.0, attainment=0.91),
    )


PREFILL = InstancePlan("prefill", 2, 2, (Stage(0, (0, 1)), Stage(1, (0, 1))))
DECODE = InstancePlan("decode", 1, 1, (Stage(0, (2,)),))


def test_json_round_trip() -> None:
    plan = _plan((PREFILL, DECODE))
    text = plan.to_json()
    data = json.loads(text)
    assert (data["schema"], data["version"]) == ("baton.plan", 1)
    assert data["instances"][0] == {
        "role": "prefill",
        "tp": 2,
        "pp": 2,
        "stages": [{"node": 0, "gpus": [0, 1]}, {"node": 1, "gpus": [0, 1]}],
    }
    assert data["predicted"] == {"per_gpu_goodput": 4.25, "attainment": 0.97}
    assert Plan.from_json(text) == plan
    assert (plan.num_gpus, plan.count("prefill"), plan.count("decode")) == (5, 1, 1)


def test_two_instances_on_one_gpu_are_refused() -> None:
    clash = InstancePlan("decode", 1, 1, (Stage(1, (1,)),))
    with pytest.raises(ValueError, match="^instances: two instances share a GPU"):
        _plan((PREFILL, clash))


def test_gpus_outside_the_cluster_are_refused() -> None:
    far = InstancePlan("decode", 1, 1, (Stage(2, (0,)),))
    with pytest.raises(ValueError, match="^instances: GPU 0 of node 2 is outside"):
        _plan((far,))


@pytest.mark.parametrize(
    ("build", "field"),
    [
        (lambda: InstancePlan("router", 1, 1, (Stage(0, (0,)),)), "instance.role"),
        (lambda: InstancePlan("decode", 1, 2, (Stage(0, (0,)),)), "instance.stages"),
        (lambda: InstancePlan("decode", 2, 1, (Stage(0, (0,)),)), "instance.stages"),
        (lambda: Stage(0, ()), "stage.gpus"),
    ],
)
def test_bad_instances_name_the_field(build: object, field: str) -> None:
    with pytest.raises(ValueError, match=f"^{field}: "):
        build()  # type: ignore[operator]


def test_bad_plan_files_name_the_field() -> None:
    data = json.loads(_plan((DECODE,)).to_json())
    with pytest.raises(ValueError, match="^version: must be 1, got 2"):
        Plan.from_json(json.dumps({**data, "version": 2}))
    with pytest.raises(ValueError, match="^schema: must be 'baton.plan'"):
        Plan.from_json(json.dumps({**data, "schema": "other"}))
    del data["slos"]
    with pytest.raises(ValueError, match="^slos: missing from the plan"):
        Plan.from_json(json.dumps(data))
    with pytest.raises(ValueError, match="^plan: not valid JSON"):
        Plan.from_json("{")
    with pytest.raises(ValueError, match="^algorithm: must be one of high, low"):
        Plan.from_json(json.dumps({**json.loads(_plan((DECODE,)).to_json()), "algorithm": "mid"}))


def test_unknown_or_missing_nested_fields_are_named() -> None:
    data = json.loads(_plan((DECODE,)).to_json())
    bad_cluster = {**data, "cluster": {**data["cluster"], "racks": 2}}
    with pytest.raises(ValueError, match="^cluster: unknown field 'racks'"):
        Plan.from_json(json.dumps(bad_cluster))
    colocated = dict(data["colocated"])
    del colocated["tp"]
    with pytest.raises(ValueError, match=r"^colocated\.tp: missing"):
        Plan.from_json(json.dumps({**data, "colocated": colocated}))
    with pytest.raises(ValueError, match="^slos: must be a JSON object"):
        Plan.from_json(json.dumps({**data, "slos": [0.25, 0.1]}))


def test_round_trip_with_latency_percentiles() -> None:
    plan = dataclasses.replace(
        _plan((PREFILL, DECODE)),
        ttft=LatencyPercentiles(0.05, 0.2, 0.4),
        tpot=LatencyPercentiles(0.03, 0.06, math.inf),  # a request never served
    )
    text = plan.to_json()
    predicted = json.loads(text)["predicted"]
    assert predicted["ttft_s"] == {"p50": 0.05, "p90": 0.2, "p99": 0.4}
    assert predicted["tpot_s"] == {"p50": 0.03, "p90": 0.06, "p99": None}  # JSON has no inf
    assert Plan.from_json(text) == plan


def test_a_plan_file_without_percentiles_still_loads() -> None:
    data = json.loads(_plan((PREFILL, DECODE)).to_json())
    assert set(data["predicted"]) == {"per_gpu_goodput", "attainment"}  # an older file
    loaded = Plan.from_json(json.dumps(data))
    assert (loaded.ttft, loaded.tpot, loaded.attainment) == (None, None, 0.97)


def test_bad_percentiles_name_the_field() -> None:
    data = json.loads(_plan((PREFILL, DECODE)).to_json())
    data["predicted"]["ttft_s"] = {"p50": 0.1, "p90": 0.2}
    with pytest.raises(ValueError, match="^predicted.ttft_s: must hold p50, p90 and p99"):
        Plan.from_json(json.dumps(data))
    data["predicted"]["ttft_s"] = [0.1, 0.2, 0.3]
    with pytest.raises(ValueError, match="^predicted.ttft_s: must be a JSON object"):
        Plan.from_json(json.dumps(data))
