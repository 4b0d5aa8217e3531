"""Chaos benchmark (`baton bench chaos`, full size, not in CI).

Per transport (``--transports torch grpc``): a 2 prefill + 2 decode cluster on a local
Ray, ``--requests`` streamed greedy requests (random lengths) arriving at a steady
``--rate``, and one fault of each kind (``--faults``) while they stream: kill -9 of a
decode instance's process, kill -9 of a prefill instance's, SIGSTOP of a decode
instance (SIGCONT ``--stop-s`` later), a drain of a decode instance (scaled back up
after) and a decode instance's worker loop crashed inside its live process. The faults
come one at a time in random order: the first at a random point 10-25 % into the
arrivals, each next one 1-3 s (at random) after the cluster recovered from the last
(every instance ready again, a killed one a new process, nothing waiting to migrate),
so at most one is active at a time. The outputs are compared with the offline engine's
(a fault-free run).

Reported per transport: requests failed, outputs differing, streams whose tokens were
duplicated or lost (what the stream delivered is not exactly the final output), KV
blocks still held after the run, migrations by cause and by where they went (a lost
prefill instance's unstarted prompts to another prefill instance, the rest resumed on a
decode instance), the recovery time of each
migrated request (the longest wait for a token after the fault, from the fault itself
for a request streaming then: p50 / p99), and the throughput dip (the lowest 1-second
token rate within 10 s after a fault over the run's median). Per fault: the instance
struck, the migrated requests that were streaming, their recovery p50 / p99, when they
were first seen migrated (detection), and how long until every instance served again.
Targets: 0 failed, 0 differing, 0 duplicated or lost, 0 leaked; recovery p99 under 3 s
plus one prompt's recompute.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import signal
import statistics
import time
from dataclasses import dataclass, field
from typing import Any

FAULTS = ("kill-decode", "kill-prefill", "stop-decode", "drain-decode", "crash-decode-loop")
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
    sent: float = float("inf")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="baton bench chaos", description=__doc__.split("\n\n")[1])
    p.add_argument("--requests", type=int, default=200)
    p.add_argument("--rate", type=float, default=4.0, help="requests per second")
    p.add_argument("--transports", nargs="+", default=["torch", "grpc"])
    p.add_argument("--max-tokens", type=int, default=64, help="output lengths 8..N")
    p.add_argument("--stop-s", type=float, default=5.0, help="how long SIGSTOP lasts")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--faults",
        nargs="+",
        default=list(FAULTS),
        choices=FAULTS,
        help="the faults to strike, one of each, in random order (default: all)",
    )
    p.add_argument(
        "--health-interval",
        type=float,
        default=0.5,
        metavar="S",
        help="the cluster's health round (a hang is seen after two)",
    )
    p.add_argument("--admission-timeout", type=float, default=30.0, metavar="S")
    p.add_argument("--json-out", default=None)
    return p


def _percentile(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


async def _fault(cluster: Any, kind: str, stop_s: float) -> str:
    """Strike once; returns the instance struck."""
    role = "prefill" if kind == "kill-prefill" else "decode"
    pids, states = cluster.pids(), cluster.states()
    # The busiest instance of the role that is serving: where a fault hurts most.
    ready = [
        i.name for i in cluster.instances if i.spec.role == role and states.get(i.name) == "ready"
    ]
    if not ready:
        raise RuntimeError(f"no {role} instance is ready to strike")
    # A request's instances are [prefill, decode]; a prefill instance is busy with the
    # requests still in their prefill, a decode instance with the rest.
    rows = [r for r in cluster.requests() if r["instances"]]
    if role == "prefill":
        busy = {r["instances"][0] for r in rows if r["state"] == "prefill"}
    else:
        busy = {r["instances"][-1] for r in rows}
    name = sorted(ready, key=lambda n: (n not in busy, n))[0]
    if pids.get(name, 0) <= 0:  # never signal pid 0 (our own process group)
        raise RuntimeError(f"{name}: process id unknown")
    if kind == "drain-decode":
        await asyncio.to_thread(cluster.drain, name, 1.0)
        cluster.scale({"decode": 2})
    elif kind == "stop-decode":
        os.kill(pids[name], signal.SIGSTOP)
        try:
            await asyncio.sleep(stop_s)
        finally:
            os.kill(pids[name], signal.SIGCONT)
    elif kind == "crash-decode-loop":
        actor = next(i.actor for i in cluster.instances if i.name == name)
        if not await actor.crash_loop.remote():
            raise RuntimeError(f"{name}: not serving")
    else:
        os.kill(pids[name], signal.SIGKILL)
    return name


def _recovered(cluster: Any, size: int, struck: str | None, pid: int) -> bool:
    """Every instance ready again (a drained one replaced; a killed one a new process),
    nothing waiting to migrate."""
    states = cluster.states()
    migrator = cluster.migrator
    waiting = bool(migrator is not None and migrator.waiting())
    if struck in states and pid and cluster.pids().get(struck) == pid:
        return False  # a process killed (or its loop crashed) not yet noticed or replaced
    return len(states) == size and set(states.values()) == {"ready"} and not waiting


def _stall(sent: float, times: list[float], start: float, end: float) -> float | None:
    """The longest wait for a token in [start, end) of a request sent before ``start``
    and not finished by then (from ``start`` itself to its next token, or between two
    tokens): a kill's stall starts at the kill, a drain's when the drain's timeout
    migrates it; one with no token yet (a prefill re-dispatched) waits from the fault to
    its first token."""
    if sent > start or (times and times[-1] <= start):
        return None
    points = [start] + [t for t in times if start < t < end]
    if len(points) < 2:
        return None
    return max(b - a for a, b in zip(points, points[1:], strict=False))


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
    kinds = list(args.faults)
    rng.shuffle(kinds)
    streams = [Stream(i) for i in range(args.requests)]
    # Per fault: (kind, instance, start, end): end when everything serves again.
    fault_log: list[dict[str, Any]] = []
    fault_errors: list[str] = []
    migrated_at: dict[str, float] = {}  # request id -> when it was first seen migrated
    done = asyncio.Event()
    with Cluster(prefill=2, decode=2, transport=transport, num_kv_blocks=1024,
                 cpus_per_instance=1, health_interval_s=args.health_interval,
                 admission_timeout_s=args.admission_timeout) as cluster:  # fmt: skip
        size = len(cluster.instances)
        t0 = time.monotonic()

        async def one(s: Stream) -> None:
            await asyncio.sleep(s.index / args.rate)
            s.sent = time.monotonic()
            try:
                outs = cluster.stream(
                    prompt_token_ids=ids[s.index], params=params[s.index], request_id=f"r{s.index}"
                )
                async for out in outs:
                    s.tokens.extend(out.new_token_ids)
                    s.times.extend([time.monotonic()] * len(out.new_token_ids))
                    if out.finished:
                        s.final, s.finish = list(out.token_ids), out.finish_reason
            except Exception as e:  # counted as failed
                s.error = repr(e)

        async def watch() -> None:  # which requests migrated, and when first seen so
            while not done.is_set():
                now = time.monotonic()
                for r in cluster.requests():
                    if r["migrations"]:
                        migrated_at.setdefault(r["request_id"], now)
                await asyncio.sleep(0.05)

        async def faults() -> None:
            # One at a time, each at a random point after the previous one recovered,
            # within the arrivals (the first after 10-25 % of them).
            await asyncio.sleep(rng.uniform(0.1, 0.25) * duration)
            for kind in kinds:
                start = time.monotonic()
                pids = dict(cluster.pids())
                entry = {"kind": kind, "at": start}
                fault_log.append(entry)
                try:
                    entry["instance"] = await _fault(cluster, kind, args.stop_s)
                except Exception as e:  # reported; the run goes on
                    fault_errors.append(f"{kind}: {e!r}")
                struck = entry.get("instance")
                pid = pids.get(str(struck), 0) if kind.startswith(("kill", "crash")) else 0
                deadline = time.monotonic() + 300
                while not _recovered(cluster, size, struck, pid) and time.monotonic() < deadline:
                    await asyncio.sleep(0.1)
                entry["recovered_s"] = time.monotonic() - start
                await asyncio.sleep(rng.uniform(1.0, 3.0))

        watcher = asyncio.create_task(watch())
        await asyncio.gather(faults(), *(one(s) for s in streams))
        done.set()
        await watcher
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
    bins: dict[int, int] = {}
    for s in streams:
        for t in s.times:
            bins[int(t - t0)] = bins.get(int(t - t0), 0) + 1
    rates = [bins.get(b, 0) for b in range(int(end - t0) + 1)]
    median = statistics.median(rates) if rates else 0
    per_fault = []
    recovery: list[float] = []
    for k, entry in enumerate(fault_log):
        ft = entry["at"]
        until = fault_log[k + 1]["at"] if k + 1 < len(fault_log) else end
        stalls, detect = [], []
        for s in streams:
            moved = migrated_at.get(f"r{s.index}")
            if moved is None or not ft <= moved < until:
                continue
            stall = _stall(s.sent, s.times, ft, until)
            if stall is not None:
                stalls.append(stall)
                detect.append(moved - ft)
        recovery += stalls
        window = rates[int(ft - t0) : int(ft - t0) + 10]
        per_fault.append({
            "kind": entry["kind"],
            "instance": entry.get("instance"),
            "at_s": round(ft - t0, 2),
            "migrated_streaming": len(stalls),
            "recovery_p50_s": _percentile(stalls, 0.5),
            "recovery_p99_s": _percentile(stalls, 0.99),
            "seen_migrated_p50_s": _percentile(detect, 0.5),
            "all_serving_again_s": round(entry.get("recovered_s", float("nan")), 2),
            "dip_min_over_median": (min(window or [0]) / median) if median else 0.0,
        })  # fmt: skip
    return {
        "transport": transport,
        "requests": args.requests,
        "failed": failed,
        "differing": differing,
        "duplicated_or_lost": dup_or_lost,
        "leaked_blocks": leaked,
        "migrations": counters,
        "faults": per_fault,
        "recovery_p50_s": _percentile(recovery, 0.5),
        "recovery_p99_s": _percentile(recovery, 0.99),
        "recovered_requests": len(recovery),
        "throughput_dip_min_over_median": min(
            (f["dip_min_over_median"] for f in per_fault), default=None
        ),
        "errors": [s.error for s in streams if s.error][:5],
        "fault_errors": fault_errors,
    }


def _secs(x: float) -> str:
    """Seconds for the tables; a dash where nothing was measured (no request migrated)."""
    return "-" if math.isnan(x) else f"{x:.2f} s"


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
            f"| {r['leaked_blocks']} | {_secs(r['recovery_p50_s'])} / {_secs(r['recovery_p99_s'])} "
            f"| {r['throughput_dip_min_over_median']:.2f} "
            f"| {moved.get('to_prefill', 0)} / {moved.get('to_decode', 0)} |"
        )
    print()
    print("| transport | fault | instance | migrated streaming | recovery p50 / p99 "
          "| seen migrated p50 | all serving again | dip |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        for f in r["faults"]:
            print(
                f"| {r['transport']} | {f['kind']} | {f['instance']} | {f['migrated_streaming']} "
                f"| {_secs(f['recovery_p50_s'])} / {_secs(f['recovery_p99_s'])} "
                f"| {_secs(f['seen_migrated_p50_s'])} | {f['all_serving_again_s']:.1f} s "
                f"| {f['dip_min_over_median']:.2f} |"
            )
    for r in results:
        for e in r["fault_errors"] + r["errors"]:
            print(f"{r['transport']}: {e}")
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(results, f, indent=2)
    bad = any(r["failed"] or r["differing"] or r["duplicated_or_lost"] or r["leaked_blocks"]
              for r in results)  # fmt: skip
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
