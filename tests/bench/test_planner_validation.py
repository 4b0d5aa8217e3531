"""The validation benchmark's pure parts: the simulated deployments and the scoring."""

from __future__ import annotations

import argparse
import math

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


def _case(mode: str, rate: float, measured: float, predicted: float) -> pv.Case:
    return pv.Case(mode, rate, measured, predicted, 0.5, 0.4, 0.05, 0.04)


def test_goodput_is_the_highest_rate_meeting_the_target() -> None:
    cases = [_case("d", 0.5, 1.0, 1.0), _case("d", 1.0, 0.92, 0.85), _case("d", 1.5, 0.4, 0.95)]
    assert pv.goodput(cases, 0.9, measured=True) == 1.0
    assert pv.goodput(cases, 0.9, measured=False) == 1.5
    assert pv.goodput(cases[2:], 0.99, measured=True) == 0.0


def test_the_table_reports_gaps_and_how_many_are_within_target() -> None:
    cases = [_case("disaggregated", 0.5, 0.95, 0.90), _case("colocated", 0.5, 0.50, 0.75)]
    text = pv.format_markdown(cases, 0.9)
    assert "| disaggregated | 0.5 | 95% | 90% | 5 |" in text
    assert "| colocated | 0.5 | 50% | 75% | 25 |" in text
    assert "1 of 2 cases within 10 points (largest gap 25 points)." in text


def test_p90_ignores_requests_never_served() -> None:
    assert pv._p90([1.0, 2.0, math.inf, 3.0]) == 3.0
    assert pv._p90([math.inf]) == math.inf
