"""``baton profile --threads 1,2`` on a tiny random-weight Llama writes a CPU profile (one
fitted profile per thread count, timed shape by shape at each count), and ``baton plan``
plans this host from it, writing threads and token budgets per instance."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cluster import cli
from cluster.planner.cpu_host import load_cpu_profiles
from cluster.profiler import ProfileGrid
from tests.engine.helpers import make_tiny_model_dir

GRID = ProfileGrid(
    prefill_lengths=(8, 32, 96),
    prefill_batches=(1, 2),
    decode_batches=(1, 3, 6),
    decode_contexts=(16, 80),
    decode_steps=2,
    repeats=1,
    max_batch_tokens=256,
)


def test_profile_threads_sweep_then_plan(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import cluster.profiler as profiler

    pytest.importorskip("transformers")
    monkeypatch.setattr(profiler, "QUICK_GRID", GRID)
    tiny = make_tiny_model_dir(tmp_path / "tiny", "llama")
    out = tmp_path / "cpu.json"
    argv = ["profile", "--model", str(tiny), "--quick", "--out", str(out), "--threads", "1,2"]
    assert cli.main(argv) == 0
    assert "CPU profile of" in capsys.readouterr().out
    cpu = load_cpu_profiles(out)
    assert cpu.thread_counts == [1, 2] and cpu.cores >= 1

    plan_path = tmp_path / "plan.json"
    plan = [
        "plan", "--model", "smollm2-135m", "--profile", str(out), "--cores", "2",
        "--workload", "synthetic:in=32,out=8", "--ttft-slo", "5", "--tpot-slo", "1",
        "--rate", "0.5", "--out", str(plan_path),
    ]  # fmt: skip
    assert cli.main(plan) == 0
    shown = capsys.readouterr().out
    assert "one host of 2 cores" in shown and "candidate" in shown
    written = json.loads(plan_path.read_text())
    assert written["algorithm"] == "cpu"
    assert all(i["threads"] in (1, 2) for i in written["instances"])
    assert written["candidates"][0]["name"] in shown


def test_bad_thread_counts_name_the_flag(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        cli.main(["profile", "--threads", "1,1"])
    assert "--threads" in capsys.readouterr().err
