"""Chaos benchmark (`baton bench chaos`, full size, not in CI).

Per transport (``--transports torch grpc``): a 2 prefill + 2 decode cluster on a local
Ray, ``--requests`` streamed greedy requests (random lengths) arriving at a steady
``--rate``, and one fault of each kind at random moments while they stream: kill -9 of
a decode instance's process, kill -9 of a prefill instance's, SIGSTOP of a decode
instance (SIGCONT ``--stop-s`` later) and a drain of a decode instance (scaled back up
after). The outputs are compared with the offline engine's (a fault-free run).

Reported per transport: requests failed, outputs differing, streams whose tokens were
duplicated or lost (what the stream delivered is not exactly the final output), KV
blocks still held after the run, migrations by cause and by where they went (a lost
prefill instance's unstarted prompts to another prefill instance, the rest resumed on a
decode instance), the recovery time of each
migrated request (from the fault to its next token: p50 / p99), and the throughput dip
(the lowest 1-second token rate within 10 s after a fault over the run's median).
Targets: 0 failed, 0 differing, 0 duplicated or lost, 0 leaked; recovery p99 under 3 s
plus one prompt's recompute.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import statistics
import time
from dataclasses import dataclass, field
from typing import Any

FAULTS = ("kill-decode", "kill-prefill", "stop-decode", "drain-decode")
PASSAGE = (
    "Rivers carve valleys over thousands of years, carrying sand and stones to the sea. "
    "Where they slow down they drop what they carry, building deltas and wide plains. "
)


@dataclass
class Stream:
    index: int
    tokens: list[int] = field(default_factory=list)
    times: list[float] = field(default_factory=list)
    final: list[int] | None = None
    finish: str | None = None
    error: str | None = None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="baton bench chaos", description=__doc__.split("\n\n")[1])
    p.add_argument("--requests", type=int, default=200)
    p.add_argument("--rate", type=float, default=4.0, help="requests per second")
    p.add_argument("--transports", nargs="+", default=["torch", "grpc"])
    p.add_argument("--max-tokens", type=int, default=64, help="output lengths 8..N")
    p.add_argument("--stop-s", type=float, default=5.0, help="how long SIGSTOP lasts")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json-out", default=None)
    return p


def _percentile(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


async def _fault(cluster: Any, kind: str, stop_s: float) -> None:
    role = "prefill" if kind == "kill-prefill" else "decode"
    pids, states = cluster.pids(), cluster.states()
    # The busiest instance of the role that is serving: where a fault hurts most.
    ready = [
        i.name for i in cluster.instances if i.spec.role == role and states.get(i.name) == "ready"
    ]
    if not ready:
        raise RuntimeError(f"no {role} instance is ready to strike")
    busy = {r["instances"][-1] for r in cluster.requests() if r["instances"]}
    name = sorted(ready, key=lambda n: (n not in busy, n))[0]
    if pids.get(name, 0) <= 0:  # never signal pid 0 (our own process group)
        raise RuntimeError(f"{name}: process id unknown")
    if kind == "drain-decode":
        await asyncio.to_thread(cluster.drain, name, 1.0)
        cluster.scale({"decode": 2})
    elif kind == "stop-decode":
        os.kill(pids[name], signal.SIGSTOP)
        await asyncio.sleep(stop_s)
        os.kill(pids[name], signal.SIGCONT)
    else:
        os.kill(pids[name], signal.SIGKILL)


async def _run_one(args: argparse.Namespace, transport: str) -> dict[str, Any]:
    from cluster import Cluster
    from engine import LLM, SamplingParams

    rng = random.Random(args.seed)
    offline = LLM(None)
    tok = offline.engine.tokenizer
    ids = [
        tok.encode(PASSAGE * rng.choice([0, 1, 2]) + f"Write about topic number {i}.")
        for i in range(args.requests)
    ]
    params = [
        SamplingParams(max_tokens=rng.randrange(8, args.max_tokens + 1), temperature=0,
                       ignore_eos=True)
        for _ in ids
    ]  # fmt: skip
    expected = [o.token_ids for o in offline.generate(prompt_token_ids=ids, params=params)]
    del offline
    duration = args.requests / args.rate
    fault_at = sorted(rng.uniform(0.15, 0.8) * duration for _ in FAULTS)
    kinds = list(FAULTS)
    rng.shuffle(kinds)
    streams = [Stream(i) for i in range(args.requests)]
    fault_times: list[tuple[str, float]] = []
    fault_errors: list[str] = []
    with Cluster(prefill=2, decode=2, transport=transport, num_kv_blocks=1024,
                 cpus_per_instance=1, health_interval_s=0.5) as cluster:  # fmt: skip
        t0 = time.monotonic()

        async def one(s: Stream) -> None:
            await asyncio.sleep(s.index / args.rate)
            try:
                outs = cluster.stream(prompt_token_ids=ids[s.index], params=params[s.index])
                async for out in outs:
                    s.tokens.extend(out.new_token_ids)
                    s.times.extend([time.monotonic()] * len(out.new_token_ids))
                    if out.finished:
                        s.final, s.finish = list(out.token_ids), out.finish_reason
            except Exception as e:  # counted as failed
                s.error = repr(e)

        async def fault(kind: str, at: float) -> None:
            await asyncio.sleep(max(0.0, t0 + at - time.monotonic()))
            fault_times.append((kind, time.monotonic()))
            try:
                await _fault(cluster, kind, args.stop_s)
            except Exception as e:  # reported; the run goes on
                fault_errors.append(f"{kind}: {e!r}")

        async def faults() -> None:
            await asyncio.gather(*(fault(k, at) for k, at in zip(kinds, fault_at, strict=True)))

        await asyncio.gather(faults(), *(one(s) for s in streams))
        end = time.monotonic()
        counters = cluster.counters()
        leaked = -1
        for _ in range(100):  # until idle
            stats = cluster.stats()
            leaked = sum(x.total_blocks - x.free_blocks for x in stats)
            if leaked == 0:
                break
            await asyncio.sleep(0.2)
    failed = sum(s.error is not None or s.finish not in ("length", "stop") for s in streams)
    differing = sum(s.final != e for s, e in zip(streams, expected, strict=True))
    dup_or_lost = sum(s.final is not None and s.tokens != s.final for s in streams)
    recovery = []
    for _, ft in fault_times:
        for s in streams:
            before = [t for t in s.times if t <= ft]
            after = [t for t in s.times if t > ft]
            # In flight at the fault and held up by it (a gap well over its pace).
            if before and after and s.times[-1] > ft and after[0] - ft > 0.5:
                recovery.append(after[0] - ft)
    bins: dict[int, int] = {}
    for s in streams:
        for t in s.times:
            bins[int(t - t0)] = bins.get(int(t - t0), 0) + 1
    rates = [bins.get(b, 0) for b in range(int(end - t0) + 1)]
    median = statistics.median(rates) if rates else 0
    dips = [
        min(rates[int(ft - t0) : int(ft - t0) + 10] or [0]) / median if median else 0.0
        for _, ft in fault_times
    ]
    return {
        "transport": transport,
        "requests": args.requests,
        "failed": failed,
        "differing": differing,
        "duplicated_or_lost": dup_or_lost,
        "leaked_blocks": leaked,
        "migrations": counters,
        "faults": [(k, round(t - t0, 2)) for k, t in fault_times],
        "recovery_p50_s": _percentile(recovery, 0.5),
        "recovery_p99_s": _percentile(recovery, 0.99),
        "recovered_requests": len(recovery),
        "throughput_dip_min_over_median": min(dips) if dips else None,
        "errors": [s.error for s in streams if s.error][:5],
        "fault_errors": fault_errors,
    }


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    results = []
    for transport in args.transports:
        results.append(asyncio.run(_run_one(args, transport)))
    print("| transport | failed | differing | dup/lost | leaked | recovery p50 / p99 | dip "
          "| moved to prefill / decode |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        moved = r["migrations"]
        print(
            f"| {r['transport']} | {r['failed']} | {r['differing']} | {r['duplicated_or_lost']} "
            f"| {r['leaked_blocks']} | {r['recovery_p50_s']:.2f} s / {r['recovery_p99_s']:.2f} s "
            f"| {r['throughput_dip_min_over_median']} "
            f"| {moved.get('to_prefill', 0)} / {moved.get('to_decode', 0)} |"
        )
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(results, f, indent=2)
    bad = any(r["failed"] or r["differing"] or r["duplicated_or_lost"] or r["leaked_blocks"]
              for r in results)  # fmt: skip
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
