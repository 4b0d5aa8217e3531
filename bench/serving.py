"""Serving benchmark: a client in the style of vLLM's ``bench serve``.

Requests go to a running ``baton serve`` over the OpenAI-compatible HTTP API
(``/v1/completions``, streamed), arriving as a Poisson process (``--burstiness 1``) or a
gamma process (burstiness below 1 is burstier, above 1 steadier) at each rate of
``--request-rate``. Prompts are token ids with ShareGPT-like lengths (lognormal around
``--input-len``/``--output-len`` with ``--length-cv``), or the prompt/output token counts
of a JSONL dataset (``{"prompt_tokens": N, "output_tokens": M}`` per line). Every request
asks for exactly its output length (``ignore_eos``). No prompt is sent twice: the warm-up
and every rate after the first get new token ids of the same lengths, so the prefix cache
helps none of them.

Per rate: TTFT, TPOT, ITL and E2EL (mean, median, p90, p99), request and token
throughput, SLO attainment (DistServe's definition: a request counts when it meets both
the TTFT and the TPOT SLO) and goodput (such requests per second). Results are written
as JSON (``--json-out``) and attainment against rate as a PNG (``--plot-out``).

``--overhead`` measures what the router and the token path add: rounds of 32 concurrent
streams, their median end-to-end TPOT beside the decode instances' own step time over the
same window, weighted by the requests each step advanced (read from the admin API's
counters), after one untimed round of the same streams; the median of the rounds. Target:
at most 10% more. A few untimed requests warm the server up before the
first rate.

``--launch`` starts ``baton serve`` itself (and stops it after), with ``--serve-args``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

OVERHEAD_TARGET = 0.10
WARMUP_REQUESTS = 4


@dataclass(frozen=True)
class Request:
    prompt_ids: list[int]
    output_len: int


@dataclass
class Result:
    ok: bool
    prompt_len: int
    output_len: int = 0
    ttft: float = 0.0
    e2e: float = 0.0
    itl: list[float] = field(default_factory=list)
    error: str = ""

    @property
    def tpot(self) -> float | None:
        if self.output_len < 2:
            return None
        return (self.e2e - self.ttft) / (self.output_len - 1)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="baton bench serve", description=__doc__.split("\n")[0])
    p.add_argument("--base-url", default="http://127.0.0.1:8000", help="the HTTP API")
    p.add_argument("--grpc-target", default="127.0.0.1:50051", help="the gRPC API (admin)")
    p.add_argument("--model", default=None, help="model id (default: the server's)")
    p.add_argument("--dataset", default="synthetic", help="'synthetic' or a JSONL file")
    p.add_argument("--num-prompts", type=int, default=64)
    p.add_argument("--input-len", type=int, default=256, help="mean prompt tokens")
    p.add_argument("--output-len", type=int, default=64, help="mean output tokens")
    p.add_argument("--length-cv", type=float, default=0.5, help="spread of lengths (0: fixed)")
    p.add_argument("--request-rate", default="1,2,4", help="req/s, comma-separated; inf = all")
    p.add_argument("--burstiness", type=float, default=1.0, help="gamma shape; 1 = Poisson")
    p.add_argument("--max-concurrency", type=int, default=None)
    p.add_argument("--ttft-slo", type=float, default=2.0, help="seconds")
    p.add_argument("--tpot-slo", type=float, default=0.2, help="seconds")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overhead", action="store_true", help="measure the router's overhead")
    p.add_argument("--overhead-streams", type=int, default=32)
    p.add_argument("--overhead-rounds", type=int, default=3, help="timed rounds (median)")
    p.add_argument("--json-out", default=None)
    p.add_argument("--plot-out", default=None, help="PNG of attainment against rate")
    p.add_argument("--launch", action="store_true", help="start `baton serve` for the run")
    p.add_argument("--serve-args", default="", help="extra `baton serve` arguments")
    p.add_argument("--no-progress", action="store_true")
    return p


# -- workload ---------------------------------------------------------------------------


def _lognormal(rng: random.Random, mean: float, cv: float, lo: int, hi: int) -> int:
    if cv <= 0:
        return max(lo, min(hi, round(mean)))
    sigma = math.sqrt(math.log(1 + cv * cv))
    mu = math.log(mean) - sigma * sigma / 2
    return max(lo, min(hi, round(rng.lognormvariate(mu, sigma))))


def make_requests(args: argparse.Namespace, max_len: int = 2048) -> list[Request]:
    rng = random.Random(args.seed)
    if args.dataset == "synthetic":
        sizes = [
            (
                _lognormal(rng, args.input_len, args.length_cv, 4, max_len // 2),
                _lognormal(rng, args.output_len, args.length_cv, 2, max_len // 4),
            )
            for _ in range(args.num_prompts)
        ]
    else:
        with open(args.dataset) as f:
            rows = [json.loads(line) for line in f if line.strip()]
        sizes = [(int(r["prompt_tokens"]), int(r["output_tokens"])) for r in rows]
        sizes = sizes[: args.num_prompts]
    return [Request(_random_ids(rng, n), m) for n, m in sizes]


def _random_ids(rng: random.Random, n: int) -> list[int]:
    # Token ids of ordinary words in most vocabularies; the content does not matter
    # because every request generates exactly its output length.
    return [rng.randrange(1000, 20000) for _ in range(n)]


def fresh_prompts(requests: Sequence[Request], seed: int) -> list[Request]:
    """The same lengths with new token ids: a workload sent again (another rate, a
    warm-up) must not find its prompts in the instances' prefix caches."""
    rng = random.Random(f"fresh-{seed}")
    return [Request(_random_ids(rng, len(r.prompt_ids)), r.output_len) for r in requests]


def warmup_prompts(requests: Sequence[Request], seed: int) -> list[Request]:
    """The untimed first requests: the workload's first few, with token ids of their own."""
    return fresh_prompts(requests[:WARMUP_REQUESTS], seed)


def prompts_for_rate(requests: Sequence[Request], index: int, seed: int) -> list[Request]:
    """What the ``index``-th rate sends: the workload itself first, then new token ids of
    the same lengths, so no rate is helped by an earlier one's cached prompts."""
    return list(requests) if index == 0 else fresh_prompts(requests, seed + index)


def arrival_gaps(n: int, rate: float, burstiness: float, seed: int) -> list[float]:
    """Gaps between arrivals: gamma with shape ``burstiness`` and mean 1/rate."""
    if math.isinf(rate):
        return [0.0] * n
    rng = random.Random(seed)
    theta = 1.0 / (rate * burstiness)
    return [rng.gammavariate(burstiness, theta) for _ in range(n)]


# -- one request ----------------------------------------------------------------------------


async def send(session: Any, args: argparse.Namespace, req: Request, model: str) -> Result:
    body = {
        "model": model,
        "prompt": req.prompt_ids,
        "max_tokens": req.output_len,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    result = Result(ok=False, prompt_len=len(req.prompt_ids))
    start = time.perf_counter()
    last = start
    try:
        async with session.post(f"{args.base_url}/v1/completions", json=body) as resp:
            if resp.status != 200:
                result.error = f"HTTP {resp.status}: {(await resp.text())[:200]}"
                return result
            async for raw in resp.content:
                line = raw.decode().strip()
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[len("data: ") :])
                now = time.perf_counter()
                if chunk.get("choices"):
                    if result.ttft == 0.0:
                        result.ttft = now - start
                    else:
                        result.itl.append(now - last)
                    last = now
                if chunk.get("usage"):
                    result.output_len = chunk["usage"]["completion_tokens"]
        result.e2e = time.perf_counter() - start
        result.ok = result.output_len > 0
    except Exception as e:  # a failed request is a result, not a crash of the benchmark
        result.error = repr(e)
    return result


async def run_rate(
    args: argparse.Namespace, requests: Sequence[Request], rate: float, model: str
) -> tuple[list[Result], float]:
    import aiohttp

    gaps = arrival_gaps(len(requests), rate, args.burstiness, args.seed)
    limit = asyncio.Semaphore(args.max_concurrency or len(requests))
    progress = None
    if not args.no_progress:
        from tqdm import tqdm

        progress = tqdm(total=len(requests), desc=f"rate {rate:g}", file=sys.stderr)

    async def one(session: Any, req: Request) -> Result:
        async with limit:
            r = await send(session, args, req, model)
        if progress is not None:
            progress.update(1)
        return r

    timeout = aiohttp.ClientTimeout(total=None, sock_read=600)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        tasks = []
        start = time.perf_counter()
        for req, gap in zip(requests, gaps, strict=True):
            await asyncio.sleep(gap)
            tasks.append(asyncio.create_task(one(session, req)))
        results = await asyncio.gather(*tasks)
        duration = time.perf_counter() - start
    if progress is not None:
        progress.close()
    return list(results), duration


# -- statistics ----------------------------------------------------------------------------


def _percentiles(values: Sequence[float]) -> dict[str, float]:
    if not values:
        return {
            "mean": float("nan"),
            "median": float("nan"),
            "p90": float("nan"),
            "p99": float("nan"),
        }
    ordered = sorted(values)

    def pct(q: float) -> float:
        return ordered[min(len(ordered) - 1, math.ceil(q * len(ordered)) - 1)]

    return {
        "mean": statistics.fmean(ordered),
        "median": statistics.median(ordered),
        "p90": pct(0.90),
        "p99": pct(0.99),
    }


def summarize(
    results: Sequence[Result], duration: float, ttft_slo: float, tpot_slo: float
) -> dict[str, Any]:
    ok = [r for r in results if r.ok]
    meets = [r for r in ok if r.ttft <= ttft_slo and (r.tpot is None or r.tpot <= tpot_slo)]
    return {
        "completed": len(ok),
        "failed": len(results) - len(ok),
        "errors": sorted({r.error for r in results if r.error})[:5],
        "duration_s": duration,
        "request_throughput": len(ok) / duration,
        "output_token_throughput": sum(r.output_len for r in ok) / duration,
        "ttft_s": _percentiles([r.ttft for r in ok]),
        "tpot_s": _percentiles([t for r in ok if (t := r.tpot) is not None]),
        "itl_s": _percentiles([x for r in ok for x in r.itl]),
        "e2el_s": _percentiles([r.e2e for r in ok]),
        "slo_attainment": len(meets) / len(results) if results else 0.0,
        "goodput": len(meets) / duration,
    }


# -- the router's overhead -------------------------------------------------------------------


InstanceCounters = dict[str, tuple[str, dict[str, float]]]  # name -> (role, counters)


def instance_counters(target: str) -> InstanceCounters:
    """Per instance name: its role and its counters, from the admin API."""
    import baton

    with baton.AdminClient(target) as admin:
        status = admin.status()
    return {inst.name: (inst.role, dict(inst.counters)) for inst in status.instances}


def decode_totals(counters: InstanceCounters) -> dict[str, float]:
    """Every counter summed over the decode-side instances."""
    totals: dict[str, float] = {}
    for role, values in counters.values():
        if role != "prefill":
            for name, value in values.items():
                totals[name] = totals.get(name, 0.0) + value
    return totals


def decode_counters(target: str) -> dict[str, float]:
    """Every counter summed over the decode-side instances, from the admin API."""
    return decode_totals(instance_counters(target))


def _decode_token_steps(target: str) -> tuple[float, float]:
    """(tokens, seconds) over the decode-side instances: each step's time counted once
    per request it advanced (``token_step_seconds``)."""
    c = decode_counters(target)
    return c.get("token_steps", 0.0), c.get("token_step_seconds", 0.0)


async def measure_overhead(args: argparse.Namespace, model: str) -> dict[str, Any]:
    """Rounds of ``--overhead-streams`` concurrent streams (64 prompt and 64 output
    tokens each), after one untimed round (a cold round staggers the streams' arrival at
    the decode instance). Per round: the streams' median end-to-end TPOT over the step
    time their tokens waited for on the decode instances, in the same window."""
    n = args.overhead_streams
    rng = random.Random(args.seed + 1)
    requests = [Request([rng.randrange(1000, 20000) for _ in range(64)], 64) for _ in range(n)]
    await run_rate(args, requests, float("inf"), model)
    rounds = []
    for _ in range(args.overhead_rounds):
        tokens0, secs0 = await asyncio.to_thread(_decode_token_steps, args.grpc_target)
        results, _ = await run_rate(args, requests, float("inf"), model)
        tokens1, secs1 = await asyncio.to_thread(_decode_token_steps, args.grpc_target)
        tpots = [t for r in results if r.ok and (t := r.tpot) is not None]
        step = (secs1 - secs0) / max(1.0, tokens1 - tokens0)
        tpot = statistics.median(tpots) if tpots else float("nan")
        rounds.append({"e2e_tpot_median_s": tpot, "engine_step_s": step})
    overheads = [r["e2e_tpot_median_s"] / r["engine_step_s"] - 1 for r in rounds]
    # The middle round (the upper one of an even count), so its figures go together.
    middle = sorted(range(len(rounds)), key=lambda i: overheads[i])[len(rounds) // 2]
    return {
        "streams": n,
        "rounds": rounds,
        "e2e_tpot_median_s": rounds[middle]["e2e_tpot_median_s"],
        "engine_step_mean_s": rounds[middle]["engine_step_s"],
        "overhead": overheads[middle],
        "overheads": overheads,
        "target": OVERHEAD_TARGET,
    }


# -- output ----------------------------------------------------------------------------------


def format_markdown(runs: Sequence[dict[str, Any]]) -> str:
    lines = [
        "| rate (req/s) | done | req/s | out tok/s | TTFT mean / p90 / p99 (s) "
        "| TPOT mean / p90 / p99 (s) | ITL p99 (s) | E2EL median (s) | attainment | goodput |",
        "|---:|---:|---:|---:|---|---|---:|---:|---:|---:|",
    ]
    for r in runs:
        t, p = r["ttft_s"], r["tpot_s"]
        lines.append(
            f"| {r['rate']:g} | {r['completed']} | {r['request_throughput']:.2f} | "
            f"{r['output_token_throughput']:.1f} | {t['mean']:.2f} / {t['p90']:.2f} / "
            f"{t['p99']:.2f} | {p['mean']:.3f} / {p['p90']:.3f} / {p['p99']:.3f} | "
            f"{r['itl_s']['p99']:.3f} | {r['e2el_s']['median']:.2f} | "
            f"{100 * r['slo_attainment']:.0f}% | {r['goodput']:.2f} |"
        )
    return "\n".join(lines)


def plot(runs: Sequence[dict[str, Any]], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rates = [r["rate"] for r in runs if not math.isinf(r["rate"])]
    attainment = [100 * r["slo_attainment"] for r in runs if not math.isinf(r["rate"])]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(rates, attainment, marker="o")
    ax.set_xlabel("request rate (req/s)")
    ax.set_ylabel("SLO attainment (%)")
    ax.set_ylim(0, 105)
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# -- main ------------------------------------------------------------------------------------


def server_model(base_url: str) -> str:
    import urllib.request

    with urllib.request.urlopen(f"{base_url}/v1/models", timeout=30) as resp:
        data = json.load(resp)
    return str(data["data"][0]["id"])


def launch_server(args: argparse.Namespace) -> subprocess.Popen[str]:
    cmd = [sys.executable, "-m", "cluster.cli", "serve", *args.serve_args.split()]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    for line in proc.stdout:  # wait for "ready"
        print(line, end="", file=sys.stderr)
        if "ready" in line:
            return proc
    raise RuntimeError(f"baton serve exited with {proc.wait()} before it was ready")


async def _run(args: argparse.Namespace) -> dict[str, Any]:
    model = args.model or await asyncio.to_thread(server_model, args.base_url)
    requests = make_requests(args)
    # Untimed: the first requests pay for connections and first-use kernel builds.
    await run_rate(args, warmup_prompts(requests, args.seed), float("inf"), model)
    runs = []
    for i, text in enumerate(args.request_rate.split(",")):
        rate = float(text)
        sent = prompts_for_rate(requests, i, args.seed)
        results, duration = await run_rate(args, sent, rate, model)
        summary = summarize(results, duration, args.ttft_slo, args.tpot_slo)
        runs.append({"rate": rate, **summary})
    out: dict[str, Any] = {
        "model": model,
        "config": {k: v for k, v in vars(args).items() if k != "serve_args"},
        "runs": runs,
    }
    if args.overhead:
        out["overhead"] = await measure_overhead(args, model)
    return out


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    proc = launch_server(args) if args.launch else None
    try:
        out = asyncio.run(_run(args))
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(60)
    print(format_markdown(out["runs"]))
    if "overhead" in out:
        o = out["overhead"]
        print(
            f"\nrouter overhead at {o['streams']} streams: "
            f"e2e TPOT {1e3 * o['e2e_tpot_median_s']:.1f} ms vs engine step "
            f"{1e3 * o['engine_step_mean_s']:.1f} ms: "
            f"{100 * o['overhead']:+.1f}%, median of rounds "
            f"{', '.join(f'{100 * x:+.1f}%' for x in o['overheads'])} "
            f"(target <= {100 * OVERHEAD_TARGET:.0f}%)"
        )
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(out, f, indent=2, default=str)
    if args.plot_out:
        plot(
            out["runs"],
            args.plot_out,
            f"{out['model']}: TTFT <= {args.ttft_slo}s, TPOT <= {args.tpot_slo}s",
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
