"""The serving benchmark's arithmetic: arrivals, workloads, percentiles, attainment."""

from __future__ import annotations

import argparse
import json
import math
import statistics
from pathlib import Path

import pytest

from bench import serving
from bench.serving import Result


def test_poisson_gaps_have_the_rate_as_mean_and_cv_one() -> None:
    gaps = serving.arrival_gaps(20000, rate=4.0, burstiness=1.0, seed=0)
    assert statistics.fmean(gaps) == pytest.approx(0.25, rel=0.03)
    assert statistics.pstdev(gaps) / statistics.fmean(gaps) == pytest.approx(1.0, rel=0.03)


def test_gamma_gaps_are_burstier_below_one() -> None:
    # Gamma with shape k: cv = 1 / sqrt(k), mean unchanged.
    gaps = serving.arrival_gaps(20000, rate=2.0, burstiness=0.25, seed=1)
    assert statistics.fmean(gaps) == pytest.approx(0.5, rel=0.05)
    assert statistics.pstdev(gaps) / statistics.fmean(gaps) == pytest.approx(2.0, rel=0.05)


def test_infinite_rate_sends_everything_at_once() -> None:
    assert serving.arrival_gaps(3, math.inf, 1.0, 0) == [0.0, 0.0, 0.0]


def _args(**overrides: object) -> argparse.Namespace:
    args = serving.build_parser().parse_args([])
    vars(args).update(overrides)
    return args


def test_synthetic_lengths_follow_the_means_and_seed() -> None:
    args = _args(num_prompts=4000, input_len=200, output_len=50, length_cv=0.5, seed=3)
    reqs = serving.make_requests(args)
    assert statistics.fmean(len(r.prompt_ids) for r in reqs) == pytest.approx(200, rel=0.05)
    assert statistics.fmean(r.output_len for r in reqs) == pytest.approx(50, rel=0.05)
    again = serving.make_requests(args)
    assert [r.prompt_ids for r in again[:5]] == [r.prompt_ids for r in reqs[:5]]
    fixed = serving.make_requests(_args(num_prompts=3, input_len=7, output_len=5, length_cv=0))
    assert [(len(r.prompt_ids), r.output_len) for r in fixed] == [(7, 5)] * 3


def test_a_jsonl_dataset_gives_its_lengths(tmp_path: Path) -> None:
    path = tmp_path / "w.jsonl"
    rows = [{"prompt_tokens": 9, "output_tokens": 3}, {"prompt_tokens": 4, "output_tokens": 8}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    reqs = serving.make_requests(_args(dataset=str(path), num_prompts=10))
    assert [(len(r.prompt_ids), r.output_len) for r in reqs] == [(9, 3), (4, 8)]


def test_attainment_needs_both_slos_and_counts_failures_against_it() -> None:
    results = [
        Result(ok=True, prompt_len=4, output_len=11, ttft=0.5, e2e=1.5),  # tpot 0.1: meets
        Result(ok=True, prompt_len=4, output_len=11, ttft=3.0, e2e=4.0),  # ttft too slow
        Result(ok=True, prompt_len=4, output_len=11, ttft=0.5, e2e=5.5),  # tpot 0.5 too slow
        Result(ok=True, prompt_len=4, output_len=1, ttft=1.0, e2e=1.0),  # one token: ttft only
        Result(ok=False, prompt_len=4, error="HTTP 500"),
    ]
    s = serving.summarize(results, duration=10.0, ttft_slo=2.0, tpot_slo=0.2)
    assert (s["completed"], s["failed"], s["errors"]) == (4, 1, ["HTTP 500"])
    assert s["slo_attainment"] == pytest.approx(2 / 5)
    assert s["goodput"] == pytest.approx(0.2)
    assert s["output_token_throughput"] == pytest.approx(3.4)
    assert s["tpot_s"]["median"] == pytest.approx(0.1)
    assert s["ttft_s"]["p99"] == 3.0


def test_percentiles_are_nearest_rank() -> None:
    p = serving._percentiles([float(x) for x in range(1, 101)])
    assert (p["median"], p["p90"], p["p99"], p["mean"]) == (50.5, 90.0, 99.0, 50.5)
    assert all(math.isnan(v) for v in serving._percentiles([]).values())


def test_fresh_prompts_keep_the_lengths_and_share_no_prefix() -> None:
    reqs = serving.make_requests(_args(num_prompts=20, input_len=64, output_len=8, seed=1))
    again = serving.fresh_prompts(reqs, seed=2)
    assert [(len(r.prompt_ids), r.output_len) for r in again] == [
        (len(r.prompt_ids), r.output_len) for r in reqs
    ]
    first_blocks = {tuple(r.prompt_ids[:16]) for r in reqs}
    assert not first_blocks & {tuple(r.prompt_ids[:16]) for r in again}
    assert [r.prompt_ids for r in serving.fresh_prompts(reqs, seed=2)] == [
        r.prompt_ids for r in again
    ]
    assert serving.fresh_prompts(reqs, seed=3)[0].prompt_ids != again[0].prompt_ids


def test_each_rate_after_the_first_and_the_warm_up_get_their_own_token_ids() -> None:
    reqs = serving.make_requests(_args(num_prompts=6, input_len=32, output_len=4, seed=1))
    assert serving.prompts_for_rate(reqs, 0, seed=1) == reqs
    assert serving.prompts_for_rate(reqs, 2, seed=1) == serving.fresh_prompts(reqs, seed=3)
    warm = serving.warmup_prompts(reqs, seed=1)
    assert len(warm) == serving.WARMUP_REQUESTS
    assert {tuple(r.prompt_ids) for r in warm}.isdisjoint(tuple(r.prompt_ids) for r in reqs)
