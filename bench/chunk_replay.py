"""One colocated engine fed Poisson arrivals offline, once per step token budget (the
chunk): the share of requests within the SLOs, TTFT and TPOT, and the engine's busy time
against what a ``baton profile`` predicts for the very steps it ran.

No server, no router: the engine runs in this process with ``--threads`` torch threads,
its steps driven from the arrival clock (a request joins at the first step after its
arrival time). Every budget replays the same arrivals and the same prompts, so the rows
differ only in the chunk. With ``--profile``, each step's shape (its prefill tokens and
their squares, its decode batch and context) is priced by that profile at ``--threads``,
and the CPU planner's simulation of one such instance at ``--rate`` is printed beside the
measurement (``cluster.planner.cpu_search``, with ``--host-load 0``: nothing else runs).

It answers the question the planner's chunk choice depends on: does a chunk shorter
than the prompt pay for its extra steps? The README's table (2026-12-07: 23% of requests
within the SLOs at chunk 128, 98% at 512) came from this replay.

Usage: ``python -m bench.chunk_replay --budgets 128,256,512,2048 --rate 3 --seconds 60
--profile cpu.json`` or ``baton bench chunk-replay ...``.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import random
import statistics
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch


@dataclass(frozen=True)
class Step:
    prefill_tokens: int
    prefill_sq: int  # sum of each prefill chunk's tokens squared
    decodes: int
    context: int  # sum of the decodes' context lengths
    ms: float


@dataclass
class Replay:
    budget: int
    requests: int
    met: float  # share within both SLOs
    ttft_mean_s: float
    ttft_p90_s: float
    tpot_mean_s: float
    busy_s: float  # the engine's steps, summed
    predicted_busy_s: float | None = None  # the same steps priced by the profile
    simulated_met: float | None = None  # the planner's simulation at this rate


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="baton bench chunk-replay",
                                description=__doc__.split("\n\n")[0].replace("\n", " "))
    p.add_argument("--budgets", default="128,256,512,2048",
                   help="comma-separated step token budgets (max_num_batched_tokens)")
    p.add_argument("--rate", type=float, default=3.0, help="Poisson arrivals, req/s")
    p.add_argument("--seconds", type=float, default=60.0, help="arrivals over this long")
    p.add_argument("--input-len", type=int, default=256)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--threads", type=int, default=2, help="the engine's torch threads")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="bfloat16")
    p.add_argument("--model", default=None, help="GGUF file or HF directory (default: SmolLM2)")
    p.add_argument("--slo-ttft-ms", type=float, default=1500.0)
    p.add_argument("--slo-tpot-ms", type=float, default=150.0)
    p.add_argument("--seed", type=int, default=11)
    p.add_argument("--profile", type=Path, default=None,
                   help="a `baton profile` file: price the steps and simulate the instance")
    p.add_argument("--planner-model", default="smollm2-135m",
                   help="the planner's model preset or HF config.json, with --profile")
    p.add_argument("--json-out", type=Path, default=None)
    return p


def _budgets(text: str) -> list[int]:
    values = [int(v) for v in text.split(",") if v.strip()]
    if not values or any(v < 1 for v in values):
        raise ValueError(f"budgets: expected positive integers, got {text!r}")
    return values


def arrivals(rate: float, seconds: float, seed: int) -> list[float]:
    """Poisson arrival times in [0, seconds), at least one."""
    rng = random.Random(seed)
    out: list[float] = []
    t = rng.expovariate(rate)
    while t < seconds or not out:
        out.append(t)
        t += rng.expovariate(rate)
    return out


@contextlib.contextmanager
def recording(runner: Any) -> Iterator[list[Step]]:
    """Within the block, each step ``runner`` executes is appended to the yielded list: its
    shape and its milliseconds."""
    steps: list[Step] = []
    execute = runner.execute

    def timed(plan: Any, sampling: Any) -> Any:
        decode: list[Any] = []
        prefill: list[Any] = []
        for c in plan.chunks:
            (decode if c.is_decode else prefill).append(c)
        start = time.perf_counter()
        out = execute(plan, sampling)
        steps.append(Step(sum(c.num_tokens for c in prefill),
                          sum(c.num_tokens ** 2 for c in prefill), len(decode),
                          sum(c.start_pos + 1 for c in decode),
                          (time.perf_counter() - start) * 1e3))  # fmt: skip
        return out

    runner.execute = timed
    try:
        yield steps
    finally:
        del runner.execute


def replay(llm: Any, prompts: list[list[int]], times: list[float], output_len: int,
           ttft_slo_s: float, tpot_slo_s: float) -> tuple[Replay, list[Step]]:
    """Feed ``prompts`` to ``llm``'s engine at ``times`` (seconds from now) and step it
    until all finish; the budget is the engine's own."""
    from engine import SamplingParams

    engine = llm.engine
    params = SamplingParams(max_tokens=output_len, temperature=0.0, ignore_eos=True)
    arrived: dict[str, float] = {}
    first: dict[str, float] = {}
    done: dict[str, float] = {}
    with recording(engine.runner) as steps:
        start, nxt = time.perf_counter(), 0
        while len(done) < len(times):
            now = time.perf_counter() - start
            while nxt < len(times) and times[nxt] <= now:
                rid = f"replay-{nxt}"
                engine.add_request(rid, params=params, prompt_token_ids=prompts[nxt])
                arrived[rid] = times[nxt]
                nxt += 1
            if not engine.has_unfinished():
                time.sleep(max(0.0, min(0.01, times[nxt] - now)))
                continue
            outputs = engine.step()
            now = time.perf_counter() - start
            for o in outputs:
                if o.request_id not in first and o.token_ids:
                    first[o.request_id] = now
                if o.finished:
                    done[o.request_id] = now
    ttft = sorted(first[r] - arrived[r] for r in arrived)
    tpot = [(done[r] - first[r]) / max(1, output_len - 1) for r in arrived]
    met = sum(1 for r, p in zip(arrived, tpot, strict=True)
              if first[r] - arrived[r] <= ttft_slo_s and p <= tpot_slo_s) / len(arrived)
    budget = engine.scheduler.config.max_num_batched_tokens
    result = Replay(budget, len(arrived), met, statistics.mean(ttft),
                    ttft[min(len(ttft) - 1, int(0.9 * len(ttft)))], statistics.mean(tpot),
                    sum(s.ms for s in steps) / 1e3)
    return result, steps


def price(steps: list[Step], profile: Any) -> float:
    """Seconds the steps take by ``profile`` (a ``LatencyProfile``)."""
    ms = 0.0
    for s in steps:
        if s.prefill_tokens and s.decodes:
            ms += profile.mixed_ms(s.prefill_tokens, s.prefill_sq, s.decodes, s.context)
        elif s.prefill_tokens:
            ms += profile.prefill_ms(s.prefill_tokens, s.prefill_sq)
        else:
            ms += profile.decode_ms(s.decodes, s.context)
    return ms / 1e3


def simulated_met(args: argparse.Namespace, budget: int) -> float:
    """The CPU planner's simulated share within the SLOs of one colocated instance of
    ``--threads`` threads and this chunk at ``--rate``, nothing else on the host."""
    from cluster.planner.cluster_spec import SLOs
    from cluster.planner.cpu_host import load_cpu_profiles
    from cluster.planner.cpu_search import CpuDeployment, CpuPlanInputs, CpuPlanner
    from cluster.planner.model_spec import load_model
    from cluster.planner.workload import load_workload

    inputs = CpuPlanInputs(
        load_model(args.planner_model), load_cpu_profiles(args.profile),
        load_workload(f"synthetic:in={args.input_len},out={args.output_len}"),
        SLOs(args.slo_ttft_ms / 1e3, args.slo_tpot_ms / 1e3, 0.9), args.rate, background=0.0,
    )  # fmt: skip
    dep = CpuDeployment("colocated", 0, 1, 0, args.threads, budget)
    return CpuPlanner(inputs).score(dep).attainment


def format_table(results: list[Replay]) -> str:
    lines = [
        "| chunk (max_num_batched_tokens) | requests | within the SLOs | TTFT mean / p90 (s) "
        "| TPOT mean (ms) | busy (s) real / profile | simulated |",
        "|---:|---:|---:|---|---:|---|---:|",
    ]
    for r in results:
        busy = f"{r.busy_s:.1f}" + ("" if r.predicted_busy_s is None
                                    else f" / {r.predicted_busy_s:.1f}")
        sim = "" if r.simulated_met is None else f"{r.simulated_met:.0%}"
        lines.append(f"| {r.budget} | {r.requests} | {r.met:.0%} | {r.ttft_mean_s:.2f} / "
                     f"{r.ttft_p90_s:.2f} | {r.tpot_mean_s * 1e3:.0f} | {busy} | {sim} |")
    return "\n".join(lines)


def _ordinary(tokenizer: Any, token: int) -> bool:
    return not tokenizer.is_special(token)


def run(args: argparse.Namespace, budgets: list[int]) -> list[Replay]:
    from bench.engine_throughput import make_prompts, resolve_model_path
    from engine import LLM, SamplingParams

    torch.set_num_threads(args.threads)
    profile = None
    if args.profile is not None:
        from cluster.planner.cpu_host import load_cpu_profiles

        by_threads = load_cpu_profiles(args.profile).by_threads
        if args.threads not in by_threads:
            raise ValueError(f"profile: no profile at {args.threads} threads in {args.profile} "
                             f"(it has {sorted(by_threads)})")
        profile = by_threads[args.threads]
    times = arrivals(args.rate, args.seconds, args.seed)
    path = resolve_model_path(args.model)
    results = []
    for budget in budgets:
        llm = LLM(model=path, dtype=args.dtype, max_num_batched_tokens=budget)
        prompts = make_prompts(len(times), args.input_len, args.input_len,
                               llm.tokenizer.vocab_size, args.seed,
                               functools.partial(_ordinary, llm.tokenizer))  # the same each time
        llm.generate(prompt_token_ids=[prompts[0][:16]],  # warm-up: kernels, packed weights
                     params=SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True))
        llm.engine.block_manager.reset_prefix_cache()  # the replay's prompt 0 prefills whole
        print(f"[replay] chunk {budget}: {len(times)} requests over {args.seconds:g} s",
              file=sys.stderr, flush=True)
        result, steps = replay(llm, prompts, times, args.output_len, args.slo_ttft_ms / 1e3,
                               args.slo_tpot_ms / 1e3)
        if profile is not None:
            result.predicted_busy_s = price(steps, profile)
            result.simulated_met = simulated_met(args, budget)
        results.append(result)
        del llm
    return results


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        budgets = _budgets(args.budgets)
    except ValueError as e:
        parser.error(str(e))
    for name in ("rate", "seconds", "slo_ttft_ms", "slo_tpot_ms"):
        if not getattr(args, name) > 0:
            parser.error(f"--{name.replace('_', '-')}: must be > 0")
    for name in ("input_len", "output_len", "threads"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')}: must be >= 1")
    if args.profile is not None and not args.profile.is_file():
        parser.error(f"--profile: no such file: {args.profile}")
    try:
        results = run(args, budgets)
    except ValueError as e:
        print(f"chunk-replay: {e}", file=sys.stderr)
        return 2
    print(format_table(results))
    if args.json_out is not None:
        args.json_out.write_text(json.dumps([asdict(r) for r in results], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
