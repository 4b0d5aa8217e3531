from __future__ import annotations

import pytest

from cluster.planner.analytic import analytic_profiles
from cluster.planner.cluster_spec import ClusterSpec, SLOs
from cluster.planner.latency import LatencyProfile, ProfileSet
from cluster.planner.model_spec import PRESETS
from cluster.planner.plan import Plan
from cluster.planner.search import PlanInputs, plan, tp_degrees
from cluster.planner.workload import load_workload

BIG = 10**6


def _toy(rate: float = 10.0, ttft_s: float = 0.09, nodes: int = 1) -> PlanInputs:
    """tp=1 prefill takes 100 ms (over the TTFT SLO), tp=2 takes 40 ms; both decode at the
    same speed, so a second decode GPU buys nothing."""
    profiles = ProfileSet(
        {
            (1, 1): LatencyProfile(1, 1, (100, 0, 0), (10, 0, 0), (10, 0, 0), BIG),
            (2, 1): LatencyProfile(2, 1, (40, 0, 0), (10, 0, 0), (10, 0, 0), BIG),
        }
    )
    return PlanInputs(
        model=PRESETS["llama-13b"],
        cluster=ClusterSpec(nodes, 4, "A100-80G"),
        profiles=profiles,
        workload=load_workload("synthetic:in=100,out=10"),
        slos=SLOs(ttft_s=ttft_s, tpot_s=0.05, attainment=0.9),
        rate=rate,
        max_pp=1,
    )


def _llama(nodes: int, seed: int = 0, max_pp: int = 1) -> PlanInputs:
    model = PRESETS["llama-13b"]
    cluster = ClusterSpec(nodes, 4, "A100-80G")
    layouts = [(tp, pp) for tp in (1, 2, 4) for pp in range(1, max_pp + 1)]
    return PlanInputs(
        model,
        cluster,
        analytic_profiles(model, cluster, layouts),
        load_workload("synthetic:in=512,out=128,cv=0.5"),
        SLOs(0.25, 0.1, 0.9),
        rate=10.0,
        seed=seed,
        max_pp=max_pp,
    )


def test_tp_degrees_split_heads_and_stay_in_a_node() -> None:
    cluster = ClusterSpec(1, 8, "A100-80G")
    assert tp_degrees(PRESETS["llama-13b"], cluster) == [1, 2, 4, 8]
    assert tp_degrees(PRESETS["opt-66b"], cluster) == [1, 2, 4, 8]
    assert tp_degrees(PRESETS["smollm2-135m"], cluster) == [1]
    assert tp_degrees(PRESETS["llama-13b"], ClusterSpec(1, 2, "A100-80G")) == [1, 2]


def test_tight_ttft_gets_tp2_prefill_and_tp1_decode() -> None:
    result = plan(_toy(), affinity="high")
    roles = [(i.role, i.tp, i.pp) for i in result.instances]
    assert sorted(roles) == [("decode", 1, 1), ("prefill", 2, 1)]
    assert result.attainment >= 0.9
    assert result.algorithm == "high"


def test_the_plans_percentiles_agree_with_its_attainment() -> None:
    """Nearest-rank percentiles of the simulation that scored the plan: with a TPOT SLO
    every request meets (generous), p90 TTFT is within the TTFT SLO exactly when TTFT
    attainment, and so joint attainment, reaches 90%."""
    for ttft_slo in (0.09, 0.2):
        inputs = _toy(ttft_s=ttft_slo)
        result = plan(inputs, affinity="high")
        assert result.ttft is not None and result.tpot is not None
        ttft, tpot = result.ttft, result.tpot
        assert 0 < ttft.p50 <= ttft.p90 <= ttft.p99
        assert 0 < tpot.p50 <= tpot.p90 <= tpot.p99 <= inputs.slos.tpot_s  # generous TPOT
        assert result.attainment >= 0.9
        assert ttft.p90 <= ttft_slo
        # each prefill batch takes 40 ms at tp=2 (the profile): no TTFT can be shorter
        assert ttft.p50 >= 0.04 - 1e-9


def test_the_offered_rate_sets_the_instance_counts() -> None:
    few = plan(_toy(rate=10.0), affinity="high")
    many = plan(_toy(rate=1000.0, nodes=2), affinity="high")
    assert few.count("prefill") == 1 and many.count("prefill") >= 2
    assert all(i.tp == 2 for i in many.instances if i.role == "prefill")
    assert many.attainment >= 0.9


def test_low_affinity_keeps_kv_inside_nodes() -> None:
    result = plan(_toy(rate=800.0, nodes=2), affinity="low")  # two units, one per node
    assert result.algorithm == "low"
    prefill_nodes = {i.nodes for i in result.instances if i.role == "prefill"}
    for inst in result.instances:
        if inst.role == "decode":
            assert inst.nodes in prefill_nodes
    assert all(i.tp == 2 for i in result.instances if i.role == "prefill")
    assert {i.nodes for i in result.instances} == {(0,), (1,)}


def test_an_impossible_ttft_slo_is_named() -> None:
    with pytest.raises(ValueError, match="^slos: no layout meets the ttft SLO"):
        plan(_toy(ttft_s=0.01), affinity="high")


def test_a_rate_the_cluster_cannot_serve_is_named() -> None:
    with pytest.raises(ValueError, match="^rate: .* the cluster has 4"):
        plan(_toy(rate=1e6), affinity="high")
    with pytest.raises(ValueError, match="^rate: .* the cluster holds"):
        plan(_toy(rate=1e6), affinity="low")


def test_bad_inputs_name_the_field() -> None:
    with pytest.raises(ValueError, match="^rate: must be > 0"):
        _toy(rate=0.0)
    with pytest.raises(ValueError, match="^affinity: must be one of high, low, auto"):
        plan(_toy(), affinity="medium")


def test_same_seed_same_plan_and_its_json_round_trips() -> None:
    first = plan(_llama(nodes=1, seed=5))
    second = plan(_llama(nodes=1, seed=5))
    assert first.to_json() == second.to_json()
    assert Plan.from_json(first.to_json()) == first
    assert first.colocated.per_gpu_goodput > 0
    assert first.num_gpus <= 4 and first.attainment >= 0.9
