from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest

from cluster.planner.workload import load_workload, unit_rate_gaps


def test_synthetic_constant_lengths_by_default() -> None:
    w = load_workload("synthetic:in=512,out=128")
    assert (w.mean_in, w.mean_out, w.cv) == (512.0, 128.0, 0.0)
    assert w.sample(3, seed=0) == [(512, 128)] * 3


def test_synthetic_lengths_have_the_asked_mean_and_cv() -> None:
    w = load_workload("synthetic:in=400,out=100,cv=0.5")
    lengths = w.sample(20_000, seed=1)
    prompts = [p for p, _ in lengths]
    assert statistics.fmean(prompts) == pytest.approx(400, rel=0.02)
    assert statistics.pstdev(prompts) / statistics.fmean(prompts) == pytest.approx(0.5, rel=0.05)
    assert statistics.fmean(o for _, o in lengths) == pytest.approx(100, rel=0.02)
    assert min(min(p, o) for p, o in lengths) >= 1


def test_same_seed_same_lengths() -> None:
    w = load_workload("synthetic:in=100,out=10,cv=1")
    assert w.sample(50, seed=7) == w.sample(50, seed=7)
    assert w.sample(50, seed=7) != w.sample(50, seed=8)


def test_trace_file(tmp_path: Path) -> None:
    path = tmp_path / "trace.jsonl"
    rows = [{"prompt_tokens": 10, "output_tokens": 2}, {"prompt_tokens": 30, "output_tokens": 4}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    w = load_workload(str(path))
    assert w.trace == ((10, 2), (30, 4))
    assert (w.mean_in, w.mean_out) == (20.0, 3.0)
    assert set(w.sample(100, seed=0)) == {(10, 2), (30, 4)}


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("synthetic:in=512", "^workload.out: missing"),
        ("synthetic:in=512,out=0", "^workload.out: must be > 0"),
        ("synthetic:in=abc,out=1", "^workload.in: must be a number"),
        ("synthetic:in=1,out=1,mean=3", "^workload: unknown field 'mean'"),
        ("synthetic:in=1,out=1,cv=-1", "^workload.cv: must be >= 0"),
        ("synthetic:in", "^workload: expected KEY=VALUE"),
        ("", "^workload: must not be empty"),
        ("no/such/file.jsonl", "^workload: must be a JSONL file"),
    ],
)
def test_bad_specs_name_the_field(spec: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        load_workload(spec)


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('{"prompt_tokens": 0, "output_tokens": 1}', "^workload line 2: prompt_tokens: must be"),
        ('{"prompt_tokens": 5}', "^workload line 2: output_tokens: must be an integer"),
        ('{"prompt_tokens": true, "output_tokens": 1}', "^workload line 2: prompt_tokens"),
        ("[1, 2]", "^workload line 2: must be a JSON object"),
        ("{oops", "^workload line 2: not valid JSON"),
    ],
)
def test_bad_trace_lines_name_line_and_field(tmp_path: Path, line: str, message: str) -> None:
    path = tmp_path / "trace.jsonl"
    path.write_text('{"prompt_tokens": 1, "output_tokens": 1}\n' + line + "\n")
    with pytest.raises(ValueError, match=message):
        load_workload(str(path))


def test_arrival_gaps() -> None:
    poisson = unit_rate_gaps(20_000, cv=1.0, seed=0)
    assert statistics.fmean(poisson) == pytest.approx(1.0, rel=0.03)
    assert statistics.pstdev(poisson) == pytest.approx(1.0, rel=0.03)
    bursty = unit_rate_gaps(20_000, cv=3.0, seed=0)
    assert statistics.pstdev(bursty) / statistics.fmean(bursty) == pytest.approx(3.0, rel=0.1)
    with pytest.raises(ValueError, match="^burstiness: must be > 0"):
        unit_rate_gaps(10, cv=0.0, seed=0)
