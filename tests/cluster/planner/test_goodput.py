from __future__ import annotations

import math

import pytest

from cluster.planner import goodput
from cluster.planner.cluster_spec import ClusterSpec, SLOs
from cluster.planner.goodput import Evaluator, SimBudget
from cluster.planner.latency import LatencyProfile, ProfileSet
from cluster.planner.model_spec import PRESETS
from cluster.planner.simulator import SimInstance, SimResult, simulate
from cluster.planner.workload import load_workload


def _evaluator(prefill_ms: float = 40.0) -> Evaluator:
    prof = LatencyProfile(1, 1, (prefill_ms, 0, 0), (10, 0, 0), (10, 0, 0), 10**6)
    return Evaluator(
        PRESETS["smollm2-135m"],
        ClusterSpec(1, 4, "A100-80G"),
        ProfileSet({(1, 1): prof}),
        load_workload("synthetic:in=100,out=10"),
        SLOs(ttft_s=0.5, tpot_s=0.05),
    )


def test_bisection_stops_within_tolerance_below_the_edge() -> None:
    ev = _evaluator()
    calls: list[float] = []

    def attains(rate: float) -> bool:
        calls.append(rate)
        return rate <= 7.3

    found = ev.max_rate(("toy",), attains, guess=100.0)
    assert 7.3 / goodput.RATE_TOLERANCE <= found <= 7.3
    assert len(calls) <= goodput.MAX_PROBES
    assert ev.max_rate(("toy",), attains, guess=100.0) == found  # cached: no new probes
    assert len(calls) <= goodput.MAX_PROBES


def test_a_guess_that_passes_is_raised() -> None:
    found = _evaluator().max_rate(("low guess",), lambda r: r <= 50.0, guess=1.0)
    assert 50.0 / goodput.RATE_TOLERANCE <= found <= 50.0


def test_never_attained_is_rate_zero() -> None:
    assert _evaluator().max_rate(("never",), lambda r: False, guess=10.0) == 0.0


def test_prefill_slower_than_the_ttft_slo_has_no_goodput() -> None:
    assert _evaluator(prefill_ms=600.0).prefill_rate((1, 1)) == 0.0
    assert _evaluator(prefill_ms=40.0).prefill_rate((1, 1)) > 0.0


def test_same_simulation_is_run_once() -> None:
    ev = _evaluator()
    ev.prefill_rate((1, 1))
    ran = ev.simulations
    ev.prefill_rate((1, 1))
    ev.decode_rate((1, 1), "inter")
    ev.decode_rate((1, 1), "inter")
    assert ev.simulations > ran
    again = ev.simulations
    ev.decode_rate((1, 1), "inter")
    assert ev.simulations == again


def test_simulations_are_sized_to_the_load() -> None:
    ev = _evaluator()
    decode = [SimInstance("decode", ev.profile((1, 1)), ev.kv_capacity((1, 1)))]
    small, truncated = ev.simulate(("d",), decode, rate=1.0)
    assert len(small.ttft_s) == ev.budget.min_requests and not truncated
    # 400 req/s x 10 tokens x 50 ms = 200 in the system: three times that
    mid, truncated = ev.simulate(("d",), decode, rate=400.0)
    assert len(mid.ttft_s) == 600 and not truncated
    assert mid.window == (180, 420)
    big, truncated = ev.simulate(("d",), decode, rate=1e5)
    assert len(big.ttft_s) == ev.budget.max_requests and truncated


def test_kv_capacity_is_the_models() -> None:
    ev = _evaluator()
    assert ev.kv_capacity((1, 1)) > 1_000_000
    assert ev.residence_s(True, True) == pytest.approx(0.5 + 10 * 0.05)


def _result(tpot: list[float], window: tuple[int, int] | None = None) -> SimResult:
    return SimResult(tuple(0.1 for _ in tpot), tuple(tpot), True, True, window or (0, len(tpot)))


def test_settled_is_the_later_half_faring_like_the_earlier() -> None:
    assert goodput.settled(_result([0.05] * 100))
    assert goodput.settled(_result([0.05] * 50 + [0.054] * 50))  # within SETTLED_GROWTH
    assert not goodput.settled(_result([0.05] * 50 + [0.06] * 50))  # still filling up
    assert not goodput.settled(_result([0.05] * 99 + [math.inf]))  # late ones never served
    # Only the counted window is judged: a slow tail outside it does not matter.
    assert goodput.settled(_result([0.05] * 100 + [0.5] * 20, window=(0, 100)))


def test_a_simulation_still_filling_up_runs_again_with_more_requests() -> None:
    # A decode instance whose step grows with its batch (10 ms + 1 ms per request), at 80%
    # of its throughput limit: its batch needs thousands of requests to settle.
    prof = LatencyProfile(1, 1, (40, 0, 0), (10, 0, 1), (10, 0, 1), 10**6)
    ev = Evaluator(
        PRESETS["smollm2-135m"],
        ClusterSpec(1, 4, "A100-80G"),
        ProfileSet({(1, 1): prof}),
        load_workload("synthetic:in=100,out=10"),
        SLOs(ttft_s=0.5, tpot_s=0.05),
        budget=SimBudget(min_requests=300, max_requests=8000),
    )
    decode = [SimInstance("decode", ev.profile((1, 1)), ev.kv_capacity((1, 1)))]
    limit = 1000.0 / 10  # 1 ms per request-step: 1000 tokens/s, 100 req/s of 10 tokens
    short = simulate(decode, ev.lengths[:300], ev.gaps, 0.8 * limit, ev.base)
    result, truncated = ev.simulate(("near",), decode, 0.8 * limit)
    assert not goodput.settled(short)  # what the planner took as steady state before
    assert len(result.ttft_s) > 300 and goodput.settled(result) and not truncated
    assert result.mean_tpot_s() > 1.1 * short.mean_tpot_s()
