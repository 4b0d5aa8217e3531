"""``baton bench peers-sim``: a ``bench peers`` run's Baton deployments, as the CPU planner
would call and simulate them, beside what the run measured.

Runs are hand-made (the fields ``bench peers --json-out`` writes); the profile is this
machine's bf16 one (``tests/planner_cpu``). A real run is simulated in
``tests/bench/test_peers.py``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from bench import peers_sim
from bench.peers import DEPLOYMENTS
from cluster.planner.cpu_host import CpuProfiles, save_cpu_profiles
from cluster.planner.cpu_search import CpuDeployment
from tests.planner_cpu.test_cpu_plan import BF16_ONE, BF16_TWO


def write_profile(tmp_path: Path) -> Path:
    path = tmp_path / "cpu.json"
    save_cpu_profiles(CpuProfiles(2, {1: BF16_ONE, 2: BF16_TWO}, "m", "bfloat16"), path)
    return path


def phase(rate: float, met: float, ttft_ms: float = 300.0, tpot_ms: float = 90.0) -> dict:
    n, duration = 100, 100 / rate
    return {
        "phase": f"{rate:g}/s", "rate": rate, "num_prompts": n, "input_len": 256,
        "output_len": 64, "duration": duration, "request_goodput": met * n / duration,
        "mean_ttft_ms": ttft_ms, "p90_ttft_ms": 1.5 * ttft_ms,
        "mean_tpot_ms": tpot_ms, "p90_tpot_ms": 1.2 * tpot_ms,
    }  # fmt: skip


def run(*systems: dict[str, Any]) -> dict[str, Any]:
    return {
        "config": {"attainment": 0.9},
        "slo": {"ttft_ms": 1500.0, "tpot_ms": 150.0},
        "systems": [{"system": "vllm", "phases": [phase(2.0, 1.0)]}, *systems],
    }


def main(tmp_path: Path, data: dict[str, Any], *extra: str) -> int:
    path = tmp_path / "run.json"
    path.write_text(json.dumps(data))
    return peers_sim.main([str(path), "--profile", str(write_profile(tmp_path)), *extra])


def test_each_deployment_is_simulated_at_each_measured_rate(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    plan = [{"role": "prefill", "threads": 1, "token_budget": 1024},
            {"role": "decode", "threads": 1}]  # fmt: skip
    data = run(
        {"system": "baton-colocated2-t1", "serve_args": DEPLOYMENTS["colocated2-t1"],
         "phases": [phase(1.0, 1.0), phase(30.0, 0.05, 9000.0, 400.0)]},
        {"system": "baton-plan", "serve_args": DEPLOYMENTS["plan"], "plan_instances": plan,
         "phases": [phase(1.0, 1.0)]},
    )  # fmt: skip
    assert main(tmp_path, data) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| baton-")]
    assert [r.split(" | ")[:3] for r in rows] == [
        ["| baton-colocated2-t1", "colocated2-t1-c2048", "1"],
        ["| baton-colocated2-t1", "colocated2-t1-c2048", "30"],
        ["| baton-plan", "1p1d-t1/1-b1024", "1"],
    ]
    # 1 req/s is far below what two one-thread instances hold, 30 far above: the simulator
    # says so beside the measured shares.
    assert rows[0].split(" | ")[3] == "100% / 100%"
    assert rows[1].split(" | ")[3] == "5% / 0%"
    rates = [line for line in out.splitlines() if "highest rate" in line]
    assert rates[0].startswith("baton-colocated2-t1 (colocated2-t1-c2048)")
    assert "measured 1 req/s, simulated" in rates[0]
    simulated = float(rates[0].split("simulated ")[1].split(" req/s")[0])
    assert 1.0 < simulated < 30.0


def test_the_deployment_is_what_baton_serve_runs() -> None:
    def dep(name: str, **record: Any) -> CpuDeployment:
        return peers_sim.deployment({"system": f"baton-{name}", **record}, 2, Path("-"))

    # Without --threads-per-rank, instances on one host get every core (default_threads).
    assert dep("1p1d") == CpuDeployment("disaggregated", 1, 1, 2, 2, 2048)
    assert dep("1p1d-t1") == CpuDeployment("disaggregated", 1, 1, 1, 1, 2048)
    assert dep("colocated1") == CpuDeployment("colocated", 0, 1, 0, 2, 2048)
    colocated = [{"role": "colocated", "threads": 1, "token_budget": 512}] * 3
    assert dep("plan", plan_instances=colocated) == CpuDeployment("colocated", 0, 3, 0, 1, 512)
    # Recorded arguments win over today's table (a run from before it changed).
    args = ["--mode", "colocated", "--prefill", "0", "--decode", "4", "--threads-per-rank", "1"]
    assert dep("colocated2", serve_args=args) == CpuDeployment("colocated", 0, 4, 0, 1, 2048)


def test_bad_input_names_the_field(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    unrecorded = run({"system": "baton-plan", "phases": [phase(1.0, 1.0)]})
    assert main(tmp_path, unrecorded, "--plan", str(tmp_path / "nope.json")) == 2
    assert "plan: baton-plan served a plan the run did not record" in capsys.readouterr().err
    assert main(tmp_path, run(), "--host-load", "-1") == 2
    assert "host-load: must be >= 0" in capsys.readouterr().err
    assert main(tmp_path, run()) == 2  # vLLM alone: nothing to simulate
    assert "run: no Baton system" in capsys.readouterr().err
    missing = peers_sim.main([str(tmp_path / "none.json"), "--profile", "x"])
    assert missing == 2 and "run: cannot read" in capsys.readouterr().err
    bad_plan = run({"system": "baton-plan", "plan_instances": [{"role": "router"}],
                    "phases": [phase(1.0, 1.0)]})  # fmt: skip
    assert main(tmp_path, bad_plan) == 2
    assert "plan: instances must be prefill, decode or colocated" in capsys.readouterr().err


def test_a_run_of_several_rounds_names_each_rounds_rows(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`bench peers --rounds 2` records a deployment twice: each row says its round."""
    data = run(*({"system": "baton-colocated2-t1", "round": n,
                  "serve_args": DEPLOYMENTS["colocated2-t1"], "phases": [phase(1.0, 1.0)]}
                 for n in (1, 2)))  # fmt: skip
    assert main(tmp_path, data) == 0
    out = capsys.readouterr().out
    rows = [line.split(" | ")[0] for line in out.splitlines() if line.startswith("| baton-")]
    assert rows == ["| baton-colocated2-t1 (round 1)", "| baton-colocated2-t1 (round 2)"]
    rates = [line for line in out.splitlines() if "highest rate" in line]
    assert [r.split(" (colocated")[0] for r in rates] == [
        "baton-colocated2-t1 (round 1)", "baton-colocated2-t1 (round 2)",
    ]
