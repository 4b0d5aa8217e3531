"""The planner on one CPU host (cluster.planner.cpu_host, cluster.planner.cpu_search).

Tiny hand-made profiles (DistServe-form coefficients near this machine's SmolLM2 figures)
keep these fast: the planner's choice must be the candidate its own simulator scores best,
and must follow the profile (threads, deployment, token budgets), not a constant.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

import pytest

from cluster.planner.cli import add_parsers, run_plan
from cluster.planner.cluster_spec import SLOs
from cluster.planner.cpu_host import (
    DEFAULT_BACKGROUND,
    TEAM_EFFICIENCY,
    CpuProfiles,
    SharedHost,
    effective_threads,
    load_cpu_profiles,
)
from cluster.planner.cpu_search import (
    BUDGETS,
    CpuDeployment,
    CpuPlanInputs,
    CpuPlanner,
    candidates,
    colocated_chunks,
    plan_cpu,
    prefill_budget,
)
from cluster.planner.goodput import SimBudget
from cluster.planner.latency import LatencyProfile
from cluster.planner.model_spec import load_model
from cluster.planner.plan import Plan
from cluster.planner.workload import load_workload


def profile(
    prefill: tuple[float, float, float], decode: tuple[float, float, float]
) -> LatencyProfile:
    return LatencyProfile(1, 1, prefill, decode, decode)


# As `baton bench peers` found this 2-core machine when quiet: a 256-token prefill about
# 0.4 s on one thread, and a one-thread decode near the 150 ms TPOT SLO at 1 req/s (1 prefill
# + 1 decode at one thread each: TPOT mean 170 ms; at two threads each 113 ms).
ONE = profile((20.0, 1.4, 0.0002), (110.0, 0.001, 6.0))  # one thread
TWO = profile((15.0, 0.8, 0.0001), (65.0, 0.0006, 3.5))  # two threads: faster
# This machine's bf16 profile (`baton profile --quick --threads 1,2 --dtype bfloat16`, fitted).
BF16_ONE = profile((24.1, 0.399, -2.06e-5), (26.0, 0.00411, 0.344))
BF16_TWO = profile((15.4, 0.287, -1.56e-4), (17.0, 0.00237, 0.302))
SMALL = SimBudget(min_requests=200, max_requests=400, plan_max_requests=400)


def inputs(profiles: CpuProfiles, rate: float = 1.0) -> CpuPlanInputs:
    return CpuPlanInputs(
        model=load_model("smollm2-135m"),
        profiles=profiles,
        workload=load_workload("synthetic:in=256,out=64"),
        slos=SLOs(1.5, 0.15, 0.9),
        rate=rate,
        budget=SMALL,
    )


def test_step_times_interpolate_measured_thread_counts() -> None:
    cpu = CpuProfiles(2, {1: ONE, 2: TWO})
    one, two = ONE.prefill_ms(256, 256 * 256), TWO.prefill_ms(256, 256 * 256)
    assert cpu.step_ms("prefill_ms", 1, 256, 256 * 256) == pytest.approx(one)
    assert cpu.step_ms("prefill_ms", 2, 256, 256 * 256) == pytest.approx(two)
    assert cpu.step_ms("prefill_ms", 0.5, 256, 256 * 256) == pytest.approx(2 * one)  # sliced
    mid = cpu.step_ms("prefill_ms", 1.5, 256, 256 * 256)
    assert 1 / mid == pytest.approx((1 / one + 1 / two) / 2)  # speeds interpolate
    assert cpu.step_ms("prefill_ms", 4, 256, 256 * 256) == pytest.approx(two)


def test_instances_share_the_cores_only_while_both_step() -> None:
    from cluster.planner.instances import EventQueue

    cpu = CpuProfiles(2, {1: ONE, 2: TWO})
    host = SharedHost(cpu)  # nothing else on the host
    prefill, decode = host.instance(2), host.instance(2)
    events = EventQueue()
    prefill.bind(events)
    alone = prefill.prefill_ms(256, 256 * 256)  # decode idle: both cores
    assert alone == pytest.approx(TWO.prefill_ms(256, 256 * 256))
    # prefill busy: two teams of two on two cores, each paced by a thread with half a core
    shared = decode.decode_ms(8, 8 * 300)
    assert shared == pytest.approx(cpu.step_ms("decode_ms", 2 * TEAM_EFFICIENCY / 2, 8, 8 * 300))
    assert shared > ONE.decode_ms(8, 8 * 300)  # worse than one thread alone
    events.now = 10.0  # both steps over
    assert decode.decode_ms(8, 8 * 300) == pytest.approx(TWO.decode_ms(8, 8 * 300))


def test_effective_threads_fair_share_for_one_thread_slowest_core_for_a_team() -> None:
    eta = TEAM_EFFICIENCY
    assert effective_threads(2, [], 2, 0.0) == 2  # fits: the profile's speed
    assert effective_threads(1, [1], 2, 0.0) == 1
    assert effective_threads(2, [1], 4, 0.25) == 2  # 3.25 cores asked of 4
    # A lone thread past the cores: its fair share of them.
    assert effective_threads(1, [1], 2, 0.25) == pytest.approx(2 / 2.25)
    assert effective_threads(1, [2], 2, 0.0) == pytest.approx(2 / 3)
    # A team whose threads fit the cores: its fair share beside the background (measured),
    # all of its threads where the background fits beside them.
    assert effective_threads(2, [], 2, 0.25) == pytest.approx(2 * 2 / 2.25)
    assert effective_threads(2, [], 4, 0.25) == 2
    # Teams past the cores: the core with the most runnable threads paces them.
    assert effective_threads(2, [2], 2, 0.0) == pytest.approx(2 * eta / 2)
    assert effective_threads(2, [2], 2, 0.25) == pytest.approx(2 * eta / 2.25)
    # 3 threads on 2 cores: one core runs two of them; the background sits on the other.
    assert effective_threads(2, [1], 2, 0.25) == pytest.approx(2 * eta / 2)
    with pytest.raises(ValueError, match="^host-load: "):
        SharedHost(CpuProfiles(2, {1: ONE}), background=-1)


def test_cpu_profile_round_trips_and_bad_files_name_the_field(tmp_path: Path) -> None:
    cpu = CpuProfiles(2, {1: ONE, 2: TWO}, "m")
    path = tmp_path / "cpu.json"
    path.write_text(cpu.to_json())
    assert load_cpu_profiles(path) == cpu
    data = json.loads(cpu.to_json())
    data["version"] = 9
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="^version:"):
        load_cpu_profiles(path)
    del data["cores"]
    data["version"] = 1
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="^cores: missing"):
        load_cpu_profiles(path)


def test_cpu_profile_records_its_dtype(tmp_path: Path) -> None:
    bf16 = CpuProfiles(2, {1: ONE, 2: TWO}, "m", "bfloat16")
    path = tmp_path / "cpu.json"
    path.write_text(bf16.to_json())
    assert load_cpu_profiles(path).dtype == "bfloat16"
    data = json.loads(bf16.to_json())
    del data["dtype"]  # a file from before the dtype was recorded
    path.write_text(json.dumps(data))
    assert load_cpu_profiles(path).dtype == ""
    data["dtype"] = "fp8"
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="^dtype: must be one of"):
        load_cpu_profiles(path)


def test_prefill_budget_follows_the_profile() -> None:
    cpu = CpuProfiles(1, {1: profile((2.0, 1.0, 0.0), ONE.decode_small)})  # flat per token
    assert prefill_budget(cpu, 1, 256) == BUDGETS[0]
    heavy = CpuProfiles(1, {1: profile((600.0, 0.2, 0.0), ONE.decode_small)})  # big fixed cost
    assert prefill_budget(heavy, 1, 256) > BUDGETS[1]


def test_plan_is_the_candidate_its_simulator_scores_best() -> None:
    cpu = CpuProfiles(2, {1: BF16_ONE, 2: BF16_TWO})
    plan, scores = plan_cpu(inputs(cpu, 4.0))
    planner = CpuPlanner(inputs(cpu, 4.0))  # scored again, from scratch
    fresh = [planner.score(s.deployment) for s in scores]
    assert fresh == scores  # the same simulations give the same scores
    best = planner.rank(fresh)[0]
    assert best.deployment == scores[0].deployment
    # what "best" means, checked on the numbers: it meets the target at the offered rate,
    # no candidate sustains more than the bisection's tolerance above it, and no tied one
    # attains more at the offered rate
    assert best.attainment >= 0.9
    meeting = [s for s in fresh if s.attainment >= 0.9]
    assert best.max_rate * 1.03 >= max(s.max_rate for s in meeting)
    tied = [s for s in meeting if s.max_rate * 1.03 >= max(x.max_rate for x in meeting)]
    assert best.attainment == max(s.attainment for s in tied)
    assert [c["name"] for c in plan.candidates] == [s.deployment.name for s in scores]
    dep = best.deployment
    roles = [i.role for i in plan.instances]
    if dep.mode == "colocated":
        assert roles == ["colocated"] * dep.decode
        assert {(i.threads, i.token_budget) for i in plan.instances} == {
            (dep.decode_threads, dep.budget)
        }
    else:
        assert roles == ["prefill"] * dep.prefill + ["decode"] * dep.decode
        assert plan.instances[0].threads == dep.prefill_threads
        assert plan.instances[0].token_budget == dep.budget
        assert plan.instances[-1].threads == dep.decode_threads
    assert plan.attainment == best.attainment
    assert Plan.from_json(plan.to_json()) == plan


def score(cpu: CpuProfiles, rate: float, background: float, name: str) -> float:
    planner = CpuPlanner(replace(inputs(cpu, rate), background=background))
    deps = candidates(cpu, 2, 256)
    return planner.score(next(d for d in deps if d.name == name)).max_rate


def test_the_host_load_slows_every_deployment_that_fills_the_cores() -> None:
    """What `baton bench peers` measured at bf16 (cluster.planner.cpu_host's text): beside
    the router, Ray and the client, two one-thread instances and a lone two-thread
    instance ran at their fair share of the cores; teams that outnumber the cores fall
    furthest."""
    cpu = CpuProfiles(2, {1: BF16_ONE, 2: BF16_TWO}, "m", "bfloat16")
    load = DEFAULT_BACKGROUND
    assert score(cpu, 6.0, load, "1p1d-t1/1-b1024") > 1.1 * score(cpu, 6.0, load, "1p1d-t2/2-b1024")
    for name in ("colocated2-t1-c2048", "colocated1-t2-c2048"):
        assert score(cpu, 6.0, 0.0, name) > 1.05 * score(cpu, 6.0, load, name)


def test_plan_follows_the_profile_not_a_constant() -> None:
    """When a second thread buys nothing, no instance gets one (fewer threads on a tie)."""
    same = CpuProfiles(2, {1: ONE, 2: ONE})
    plan, scores = plan_cpu(inputs(same))
    assert {i.threads for i in plan.instances} == {1}
    assert scores[0].deployment.threads <= min(s.deployment.threads for s in scores[1:3])


def test_baton_plan_with_a_cpu_profile_writes_a_plan_serve_applies(tmp_path: Path) -> None:
    from cluster.cli import plan_deployment

    cpu_path, plan_path = tmp_path / "cpu.json", tmp_path / "plan.json"
    cpu_path.write_text(CpuProfiles(2, {1: ONE, 2: TWO}, "m", "bfloat16").to_json())
    parser = argparse.ArgumentParser()
    add_parsers(parser.add_subparsers())
    argv = ["plan", "--model", "smollm2-135m", "--profile", str(cpu_path), "--workload",
            "synthetic:in=256,out=64", "--rate", "1", "--ttft-slo", "1.5", "--tpot-slo",
            "0.15", "--out", str(plan_path)]  # fmt: skip
    assert run_plan(parser.parse_args(argv)) == 0
    plan = Plan.from_json(plan_path.read_text())
    assert plan.algorithm == "cpu" and plan.candidates
    deployment = plan_deployment(str(plan_path))
    # Served at the dtype it was profiled at (`baton serve --plan` takes it unless --dtype).
    assert plan.dtype == "bfloat16" and deployment["dtype"] == "bfloat16"
    for inst in plan.instances:
        tuned = deployment["role_overrides"][inst.role]
        assert tuned["num_threads"] == inst.threads
        if inst.token_budget is not None:
            assert tuned["max_num_batched_tokens"] == inst.token_budget
    with pytest.raises(ValueError, match="^nodes: required"):
        run_plan(parser.parse_args([a for a in argv if a != str(cpu_path)][:3] + [
            "--gpu", "A100-80G", *argv[5:]]))  # fmt: skip
    # The host's other load: a CPU profile's knob, >= 0.
    assert run_plan(parser.parse_args([*argv, "--host-load", "0"])) == 0
    with pytest.raises(ValueError, match="^host-load: must be >= 0"):
        run_plan(parser.parse_args([*argv, "--host-load", "-0.5"]))
    with pytest.raises(ValueError, match="^host-load: only with a CPU profile"):
        run_plan(parser.parse_args([a for a in argv if a != str(cpu_path)][:3] + [
            "--gpu", "A100-80G", "--nodes", "1", *argv[5:], "--host-load", "0.5"]))  # fmt: skip


def test_serve_takes_the_plans_dtype_unless_told_otherwise(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from cluster.cli import served_dtype

    assert served_dtype("auto", "bfloat16") == "bfloat16"
    assert served_dtype("auto", None) == "auto"  # a plan without one: the serve default
    assert served_dtype("bfloat16", "bfloat16") == "bfloat16"
    assert capsys.readouterr().err == ""
    assert served_dtype("float32", "bfloat16") == "float32"  # the flag wins, with a note
    assert "--dtype float32 overrides the plan's bfloat16" in capsys.readouterr().err


def test_a_plan_whose_role_instances_disagree_is_refused(tmp_path: Path) -> None:
    from cluster.cli import plan_deployment

    plan, _ = plan_cpu(inputs(CpuProfiles(2, {1: ONE, 2: TWO})))
    data = json.loads(plan.to_json())
    data["instances"] = [dict(data["instances"][0], threads=t) for t in (1, 2)]
    data["instances"][0]["role"] = data["instances"][1]["role"] = "colocated"
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="colocated instances must share one threads"):
        plan_deployment(str(path))


def test_colocated_chunks_hold_a_mean_prompt_beside_the_decodes() -> None:
    assert colocated_chunks(256) == [512, 1024, 2048]
    assert colocated_chunks(100) == [128, 256, 512, 1024, 2048]
    assert colocated_chunks(3000) == [2048]  # a longer prompt: the longest chunk
    cpu = CpuProfiles(2, {1: ONE, 2: TWO})
    chunks = {d.budget for d in candidates(cpu, 2, 256) if d.mode == "colocated"}
    assert chunks == {512, 1024, 2048}


def test_deployment_names() -> None:
    assert CpuDeployment("disaggregated", 1, 1, 2, 2, 512).name == "1p1d-t2/2-b512"
    assert CpuDeployment("colocated", 0, 2, 0, 1, 256).name == "colocated2-t1-c256"


def test_rank_ties_within_the_bisection_tolerance_and_falls_back_to_attainment() -> None:
    from cluster.planner.cpu_search import Score

    planner = CpuPlanner(inputs(CpuProfiles(2, {1: ONE, 2: TWO})))
    a = CpuDeployment("disaggregated", 1, 1, 2, 2, 256)
    b = CpuDeployment("colocated", 0, 2, 0, 2, 512)
    c = CpuDeployment("colocated", 0, 1, 0, 1, 512)
    # b sustains 2% more than a (a tie), but a attains more at the offered rate
    scores = [Score(b, 0.95, 2.04, None, None), Score(a, 0.99, 2.0, None, None),
              Score(c, 0.5, 0.4, None, None)]  # fmt: skip
    assert [s.deployment for s in planner.rank(scores)] == [a, b, c]
    # 10% more is not a tie
    scores[0] = Score(b, 0.95, 2.2, None, None)
    assert planner.rank(scores)[0].deployment == b
    # none meets the target: the highest attainment at the offered rate
    low = [Score(a, 0.5, 0.0, None, None), Score(b, 0.7, 0.0, None, None)]
    assert planner.rank(low)[0].deployment == b
