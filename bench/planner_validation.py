"""The planner's simulator against the real cluster: disaggregated against colocated.

On this machine, for a prefill-heavy workload with a tight TPOT SLO:

1. ``baton profile``'s measurement of this engine (one torch thread, as each instance
   gets one CPU), fitted into the planner's latency model (or ``--profile FILE``);
2. for each deployment, 1 prefill + 1 decode instance (``disaggregated``) and 2
   ``colocated`` instances, one CPU each: ``baton serve`` is launched and the serving
   benchmark's client sends the same requests (lengths and Poisson arrivals; new token
   ids per rate, as the simulator has no prefix cache) at each rate; the planner's
   simulator runs the very same requests through the same deployment, with the KV link
   speed and the decode worker loop's time per step that the warm-up measured;
3. ``baton serve --profile`` gets the same profile, so each instance also sums the
   profile's time for every step it runs (``profiled_seconds``) beside the measured
   ``step_seconds``. Per rate and instance, their ratio over that rate's requests is how
   much slower than the profile the instance actually ran (this shared VM's speed
   drifts between minutes, a loaded decode step shares its core with KV transfers, and
   the profile's straight-line fit in batch size misses the smallest batches). The
   simulator is run twice: from the profile alone, and with each instance's profile
   scaled by its measured ratio, which checks the simulator's queueing, batching and
   transfer model apart from the profile's error;
4. per rate, measured and predicted SLO attainment (DistServe's: both TTFT and TPOT met)
   over the same window of requests (the simulator's: the first and last tenth left
   out), and per deployment the goodput at the attainment target: the highest rate
   tried that meets it, measured and predicted.

Target: predicted and measured attainment within 10 points.

Usage: ``python -m bench.planner_validation [--json-out FILE]`` (about 20 minutes).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import sys
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path

from bench import serving
from cluster.planner._validate import require
from cluster.planner.cluster_spec import SLOs
from cluster.planner.latency import LatencyProfile, ProfileSet, load_profiles, save_profiles
from cluster.planner.model_spec import PRESETS
from cluster.planner.simulator import SimConfig, SimInstance, SimResult, simulate
from cluster.profiler import ProfileGrid

TARGET_POINTS = 10.0
GRPC_PORT, HTTP_PORT = 50071, 8071  # away from a default `baton serve`
BLOCK = 16
DEFAULT_KV_GBPS = 2.0  # the simulated KV link where nothing was measured
MODES = ("disaggregated", "colocated")
GRID = ProfileGrid(  # prefill up to the instances' step budget (2048 tokens)
    prefill_lengths=(64, 128, 256, 512, 768, 1024),
    prefill_batches=(1, 2, 4),
    max_batch_tokens=2048,
    decode_batches=(1, 2, 4, 8, 16),
    decode_contexts=(128, 512, 1024),  # the deployment's contexts reach ~1100
    decode_steps=3,
    repeats=2,
)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.planner_validation", description=__doc__)
    p.add_argument("--profile", default=None, help="a profile file (default: measure one)")
    p.add_argument("--rates", default="0.3,0.6,0.9,1.2", help="req/s, comma-separated")
    p.add_argument("--num-prompts", type=int, default=60)
    p.add_argument("--input-len", type=int, default=512)
    p.add_argument("--output-len", type=int, default=24)
    p.add_argument("--length-cv", type=float, default=0.3)
    p.add_argument("--ttft-slo", type=float, default=3.0)
    p.add_argument("--tpot-slo", type=float, default=0.1)
    p.add_argument("--attainment", type=float, default=0.9)
    p.add_argument("--num-kv-blocks", type=int, default=1024)
    p.add_argument(
        "--kv-gbps", type=float, default=None,
        help="the KV link (GB/s) in the simulator (default: measured in the warm-up)",
    )  # fmt: skip
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json-out", default=None)
    return p


def measure_profile() -> LatencyProfile:
    import torch

    from cluster.profiler import build_engine, profile_engine

    torch.set_num_threads(1)  # as each instance has one CPU
    engine = build_engine(None, GRID)
    return profile_engine(engine, GRID, progress=lambda s: print(f"profile: {s}", file=sys.stderr))


def kv_bytes_per_token() -> int:
    """The default model's KV per token as the instances hold it here: fp32 on CPU."""
    return replace(PRESETS["smollm2-135m"], bytes_per_param=4).kv_bytes_per_token


@dataclass(frozen=True)
class Case:
    mode: str
    rate: float
    measured: float
    predicted: float
    measured_ttft_p90: float
    predicted_ttft_p90: float
    measured_tpot_p90: float
    predicted_tpot_p90: float
    kv_gbps: float = 0.0  # the simulated KV link (disaggregated)
    step_overhead_ms: float = 0.0  # the simulated worker loop's time per decode step
    # Measured over profiled step time in this rate's window: the prefill (or first
    # colocated) instance's and the decode (or second colocated) one's.
    step_scales: tuple[float, float] = (1.0, 1.0)
    predicted_unscaled: float = math.nan  # attainment from the profile alone

    @property
    def gap_points(self) -> float:
        return 100 * abs(self.measured - self.predicted)

    @property
    def unscaled_gap_points(self) -> float:
        return 100 * abs(self.measured - self.predicted_unscaled)


def _p90(values: list[float]) -> float:
    finite = sorted(v for v in values if math.isfinite(v))
    return finite[min(len(finite) - 1, math.ceil(0.9 * len(finite)) - 1)] if finite else math.inf


def predict(
    mode: str, profile: LatencyProfile, args: argparse.Namespace, lengths: list[tuple[int, int]],
    gaps: list[float], rate: float, kv_gbps: float = DEFAULT_KV_GBPS,
    step_overhead_ms: float = 0.0, step_scales: tuple[float, float] = (1.0, 1.0),
) -> SimResult:  # fmt: skip
    """The deployment's two instances in the simulator; ``step_scales`` stretch the first's
    and the second's profile (prefill then decode, or the two colocated ones)."""
    capacity = args.num_kv_blocks * BLOCK
    first, second = (profile.scaled(f, f) for f in step_scales)
    if mode == "disaggregated":
        instances = [SimInstance("prefill", first), SimInstance("decode", second, capacity)]
    else:
        instances = [SimInstance("colocated", p, capacity) for p in (first, second)]
    config = SimConfig(
        prefill_token_budget=2048,  # the engine's max_num_batched_tokens
        chunk_tokens=2048,
        kv_bytes_per_token=kv_bytes_per_token(),
        intra_node_gbps=kv_gbps,  # both instances sit on this one "node"
        decode_step_overhead_ms=step_overhead_ms,
    )
    return simulate(instances, lengths, [g * rate for g in gaps], rate, config)


def run_mode(
    mode: str, profile: LatencyProfile, args: argparse.Namespace, slos: SLOs
) -> list[Case]:
    bench_args = serving.build_parser().parse_args(
        [
            "--num-prompts", str(args.num_prompts), "--input-len", str(args.input_len),
            "--output-len", str(args.output_len), "--length-cv", str(args.length_cv),
            "--seed", str(args.seed), "--no-progress",
            "--base-url", f"http://127.0.0.1:{HTTP_PORT}", "--grpc-target",
            f"127.0.0.1:{GRPC_PORT}", "--serve-args", f"--mode {mode} --prefill 1 --decode 1 "
            f"--num-kv-blocks {args.num_kv_blocks} --grpc-port {GRPC_PORT} "
            f"--http-port {HTTP_PORT}",
        ]
    )  # fmt: skip
    requests = serving.make_requests(bench_args)
    lengths = [(len(r.prompt_ids), r.output_len) for r in requests]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp, "profile.json")
        save_profiles(ProfileSet({(1, 1): profile}), path)
        bench_args.serve_args += f" --profile {path}"
        proc = serving.launch_server(bench_args)
        try:
            return asyncio.run(_rates(mode, profile, args, slos, bench_args, requests, lengths))
        finally:
            proc.terminate()
            proc.wait(60)


async def _rates(
    mode: str, profile: LatencyProfile, args: argparse.Namespace, slos: SLOs,
    bench_args: argparse.Namespace, requests: list[serving.Request],
    lengths: list[tuple[int, int]],
) -> list[Case]:  # fmt: skip
    model = await asyncio.to_thread(serving.server_model, bench_args.base_url)
    await serving.run_rate(bench_args, serving.warmup_prompts(requests, args.seed), math.inf, model)
    before = await asyncio.to_thread(serving.instance_counters, bench_args.grpc_target)
    warm = _warmup_figures(serving.decode_totals(before))
    kv_gbps, overhead_ms = args.kv_gbps or warm[0], warm[1]
    link = f"KV link {kv_gbps:.2f} GB/s, " if mode == "disaggregated" else ""
    print(f"{mode}: {link}decode loop {overhead_ms:.1f} ms/step", file=sys.stderr)
    cases = []
    for i, rate in enumerate(float(x) for x in args.rates.split(",")):
        gaps = serving.arrival_gaps(len(requests), rate, 1.0, args.seed)
        sent = serving.prompts_for_rate(requests, i, args.seed)  # the simulator has no cache
        results, _ = await serving.run_rate(bench_args, sent, rate, model)
        after = await asyncio.to_thread(serving.instance_counters, bench_args.grpc_target)
        scales = step_scales(before, after)
        before = after
        print(f"{mode} @ {rate:g}: steps ran x{scales[0]:.3f} / x{scales[1]:.3f} the "
              "profile's time", file=sys.stderr)  # fmt: skip
        sim = predict(mode, profile, args, lengths, gaps, rate, kv_gbps, overhead_ms, scales)
        unscaled = predict(mode, profile, args, lengths, gaps, rate, kv_gbps, overhead_ms)
        lo, hi = sim.window
        window = results[lo:hi]
        meets = [
            r for r in window
            if r.ok and r.ttft <= slos.ttft_s and (r.tpot is None or r.tpot <= slos.tpot_s)
        ]  # fmt: skip
        case = Case(
            mode, rate, len(meets) / len(window), sim.attainment(slos),
            _p90([r.ttft for r in window if r.ok]), _p90(list(sim.ttft_s[lo:hi])),
            _p90([t for r in window if r.ok and (t := r.tpot) is not None]),
            _p90([t for t in sim.tpot_s[lo:hi] if t > 0]),
            kv_gbps if mode == "disaggregated" else 0.0, overhead_ms, scales,
            unscaled.attainment(slos),
        )  # fmt: skip
        print(f"{mode} @ {rate:g}: measured {case.measured:.0%}, predicted "
              f"{case.predicted:.0%} (profile alone {case.predicted_unscaled:.0%})",
              file=sys.stderr)  # fmt: skip
        cases.append(case)
    return cases


def step_scales(
    before: serving.InstanceCounters, after: serving.InstanceCounters
) -> tuple[float, float]:
    """Per instance, in the simulator's order (prefill before decode, then by name): its
    measured step time over its profiled step time between the two readings (1 where it
    did not step)."""
    order = sorted(after, key=lambda name: (after[name][0] != "prefill", name))
    scales = []
    for name in order:
        now, then = after[name][1], before.get(name, ("", {}))[1]
        measured = now.get("step_seconds", 0.0) - then.get("step_seconds", 0.0)
        profiled = now.get("profiled_seconds", 0.0) - then.get("profiled_seconds", 0.0)
        scales.append(measured / profiled if measured > 0 and profiled > 0 else 1.0)
    require(len(scales) == 2, "instances", f"expected the deployment's 2, got {order}")
    return scales[0], scales[1]


def _warmup_figures(c: dict[str, float]) -> tuple[float, float]:
    """From the decode-side instances' counters so far, summed (the warm-up's): the KV
    link in GB/s (bytes over pull seconds; the default before any pull, as colocated),
    and the worker loop's time per step beside the step itself, in ms."""
    nbytes, seconds, steps = c.get("kv_bytes", 0.0), c.get("kv_seconds", 0.0), c.get("steps")
    link = nbytes / seconds / 1e9 if nbytes and seconds else DEFAULT_KV_GBPS
    overhead = (c.get("loop_seconds", 0.0) - c.get("step_seconds", 0.0)) / steps if steps else 0.0
    return link, 1e3 * max(0.0, overhead)


def goodput(cases: list[Case], target: float, measured: bool) -> float:
    """The highest rate tried whose attainment meets ``target`` (0 when none does)."""
    ok = [c.rate for c in cases if (c.measured if measured else c.predicted) >= target]
    return max(ok, default=0.0)


def goodputs(cases: list[Case], target: float) -> dict[str, dict[str, float]]:
    """Per deployment, in the order tried: measured and predicted goodput."""
    out = {}
    for mode in dict.fromkeys(c.mode for c in cases):
        mine = [c for c in cases if c.mode == mode]
        out[mode] = {
            "measured": goodput(mine, target, True),
            "predicted": goodput(mine, target, False),
        }
    return out


def format_markdown(cases: list[Case], target: float) -> str:
    lines = [
        "| deployment | rate (req/s) | attainment measured | predicted | gap (points) "
        "| TTFT p90 measured / predicted (s) | TPOT p90 measured / predicted (s) "
        "| predicted from the profile alone (gap) | steps' time / profile's |",
        "|---|---:|---:|---:|---:|---|---|---:|---|",
    ]
    for c in cases:
        lines.append(
            f"| {c.mode} | {c.rate:g} | {c.measured:.0%} | {c.predicted:.0%} | "
            f"{c.gap_points:.0f} | {c.measured_ttft_p90:.2f} / {c.predicted_ttft_p90:.2f} | "
            f"{c.measured_tpot_p90:.3f} / {c.predicted_tpot_p90:.3f} | "
            f"{c.predicted_unscaled:.0%} ({c.unscaled_gap_points:.0f}) | "
            f"{c.step_scales[0]:.2f} / {c.step_scales[1]:.2f} |"
        )
    lines += ["", f"| deployment | goodput at {target:.0%} measured (req/s) | predicted |",
              "|---|---:|---:|"]  # fmt: skip
    for mode, g in goodputs(cases, target).items():
        lines.append(f"| {mode} | {g['measured']:g} | {g['predicted']:g} |")
    lines += ["", _within([c.gap_points for c in cases]) + "; from the profile alone, "
              + _within([c.unscaled_gap_points for c in cases]) + "."]  # fmt: skip
    return "\n".join(lines)


def _within(gaps: list[float]) -> str:
    within = sum(g <= TARGET_POINTS for g in gaps)
    return (f"{within} of {len(gaps)} cases within {TARGET_POINTS:.0f} points "
            f"(largest gap {max(gaps):.0f} points)")  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    slos = SLOs(args.ttft_slo, args.tpot_slo, args.attainment)
    profile = load_profiles(args.profile).get(1, 1) if args.profile else measure_profile()
    cases: list[Case] = []
    for mode in args.modes.split(","):
        cases += run_mode(mode, profile, args, slos)
    print(format_markdown(cases, args.attainment))
    if args.json_out:
        out = {
            "config": vars(args),
            "profile": profile.to_dict(),
            "cases": [
                {**c.__dict__, "gap_points": c.gap_points,
                 "unscaled_gap_points": c.unscaled_gap_points}
                for c in cases
            ],  # fmt: skip
            "goodput": goodputs(cases, args.attainment),
        }
        with open(args.json_out, "w") as f:
            json.dump(out, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
