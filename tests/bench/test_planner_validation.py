"""The validation benchmark's pure parts: the simulated deployments and the scoring."""

from __future__ import annotations

import argparse
import math

import pytest

from bench import planner_validation as pv
from bench import serving
from cluster.planner.cluster_spec import SLOs
from cluster.planner.latency import LatencyProfile

# 100 ms per 512-token prefill, 20 ms per decode step: a 1-CPU-like engine.
PROFILE = LatencyProfile(1, 1, (5.0, 0.18, 0.0), (20.0, 0.0, 0.0), (20.0, 0.0, 0.0), 10**6)


def _args() -> argparse.Namespace:
    return pv.build_parser().parse_args([])


def test_disaggregated_keeps_tpot_where_colocated_mixes_in_prefills() -> None:
    args = _args()
    n = 200
    lengths = [(512, 24)] * n
    gaps = serving.arrival_gaps(n, 4.0, 1.0, seed=0)
    disagg = pv.predict("disaggregated", PROFILE, args, lengths, gaps, 4.0)
    coloc = pv.predict("colocated", PROFILE, args, lengths, gaps, 4.0)
    assert (disagg.scores_ttft, disagg.scores_tpot) == (True, True)
    # Decode steps alone: TPOT is the step time plus the KV pull spread over the tokens.
    assert 0.020 <= disagg.mean_tpot_s() < 0.030
    assert coloc.mean_tpot_s() > disagg.mean_tpot_s()  # prefills share colocated steps
    slos = SLOs(3.0, 0.03, 0.9)
    assert disagg.attainment(slos) > coloc.attainment(slos)


def _case(
    mode: str, rate: float, measured: float, predicted: float, unscaled: float = math.nan
) -> pv.Case:
    return pv.Case(
        mode, rate, measured, predicted, 0.5, 0.4, 0.05, 0.04, predicted_unscaled=unscaled
    )


def test_goodput_is_the_highest_rate_meeting_the_target() -> None:
    cases = [_case("d", 0.5, 1.0, 1.0), _case("d", 1.0, 0.92, 0.85), _case("d", 1.5, 0.4, 0.95)]
    assert pv.goodput(cases, 0.9, measured=True) == 1.0
    assert pv.goodput(cases, 0.9, measured=False) == 1.5
    assert pv.goodput(cases[2:], 0.99, measured=True) == 0.0


def test_the_table_reports_gaps_and_how_many_are_within_target() -> None:
    cases = [
        _case("disaggregated", 0.5, 0.95, 0.90, unscaled=0.60),
        _case("colocated", 0.5, 0.50, 0.75, unscaled=0.55),
    ]
    text = pv.format_markdown(cases, 0.9)
    assert "| disaggregated | 0.5 | 95% | 90% | 5 |" in text
    assert "| colocated | 0.5 | 50% | 75% | 25 |" in text
    assert "| 60% (35) | 1.00 / 1.00 |" in text  # beside it: the profile alone's
    assert (
        "1 of 2 cases within 10 points (largest gap 25 points); from the profile alone, "
        "1 of 2 cases within 10 points (largest gap 35 points)." in text
    )


def test_step_scales_are_each_instances_measured_over_profiled_time() -> None:
    def counters(step: float, profiled: float) -> dict[str, float]:
        return {"step_seconds": step, "profiled_seconds": profiled}

    before = {"decode-0": ("decode", counters(1.0, 1.0)), "prefill-0": ("prefill", counters(0, 0))}
    after = {"decode-0": ("decode", counters(3.0, 3.5)), "prefill-0": ("prefill", counters(6, 5))}
    assert pv.step_scales(before, after) == (pytest.approx(1.2), pytest.approx(0.8))
    idle = {"colocated-0": ("colocated", counters(2, 2)), "colocated-1": ("colocated", {})}
    assert pv.step_scales(idle, idle) == (1.0, 1.0)  # no steps between the readings
    with pytest.raises(ValueError, match="^instances: expected the deployment's 2"):
        pv.step_scales({}, {"decode-0": ("decode", {})})


def test_scaled_predictions_stretch_each_instance() -> None:
    args = _args()
    lengths, gaps = [(512, 24)] * 40, serving.arrival_gaps(40, 2.0, 1.0, seed=0)
    base = pv.predict("disaggregated", PROFILE, args, lengths, gaps, 2.0)
    slow_decode = pv.predict("disaggregated", PROFILE, args, lengths, gaps, 2.0,
                             step_scales=(1.0, 1.5))  # fmt: skip
    assert slow_decode.ttft_s == base.ttft_s  # the prefill instance ran as profiled
    assert slow_decode.mean_tpot_s() > 1.3 * base.mean_tpot_s()


def test_p90_ignores_requests_never_served() -> None:
    assert pv._p90([1.0, 2.0, math.inf, 3.0]) == 3.0
    assert pv._p90([math.inf]) == math.inf
