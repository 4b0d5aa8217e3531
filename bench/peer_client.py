"""The load generators of ``baton bench peers``: ``vllm bench serve`` or a built-in twin.

A phase is one run of a client against one server: ``num_prompts`` random prompts of
``input_len`` tokens asking for exactly ``output_len`` tokens each (greedy,
``ignore_eos``), sent at ``rate`` (Poisson; ``inf`` sends all at once) with at most
``max_concurrency`` in flight, prompts drawn from ``seed``. Both clients return the same
summary (:func:`summary_keys`).

``vllm`` runs vLLM's own client from the peer's venv (``--save-result --save-detailed``
into a temporary directory, then its JSON is read). ``builtin`` is for machines without
it (CI): an asyncio + aiohttp streaming client of ``/v1/completions`` whose metrics are
defined exactly as ``vllm bench serve`` 0.32 defines them (vllm/benchmarks/serve.py,
``calculate_metrics``; lib/endpoint_request_func.py,
``async_request_openai_completions``):

- TTFT: from sending to the first SSE chunk with a non-empty ``choices``.
- latency (E2EL): from sending to the last such chunk (not to ``[DONE]``).
- output tokens: ``usage.completion_tokens`` of a chunk without choices (vLLM's client
  reads usage only there).
- TPOT: (latency - TTFT) / (output tokens - 1), for requests of more than one token; for
  goodput a one-token request counts as TPOT 0.
- duration: from the first request's scheduling to the end of the last (the phase's
  wall time); output tok/s = total output tokens / duration; goodput = requests meeting
  every SLO (value <= target) / duration.
- percentiles: numpy's (linear interpolation), means and percentiles over successful
  requests only.

The one difference: vLLM's random dataset sends text decoded from random token ids;
the built-in client sends the token ids themselves (both servers take either).
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import random
import subprocess
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

PERCENTILES = (50, 90, 99)
METRICS = ("ttft", "tpot", "itl", "e2el")


@dataclass(frozen=True)
class Phase:
    name: str
    num_prompts: int
    rate: float  # requests per second; inf: all at once
    max_concurrency: int | None
    seed: int
    input_len: int
    output_len: int


@dataclass(frozen=True)
class Slo:
    ttft_ms: float = 1500.0
    tpot_ms: float = 150.0


@dataclass
class Output:
    """One request, as vLLM's ``RequestFuncOutput``."""

    success: bool = False
    ttft: float = 0.0
    latency: float = 0.0
    output_tokens: int = 0
    itl: list[float] = field(default_factory=list)
    error: str = ""


def summary_keys() -> list[str]:
    keys = ["completed", "failed", "duration", "total_output_tokens", "output_throughput"]
    keys += ["request_throughput", "request_goodput"]
    for m in METRICS:
        keys += [f"mean_{m}_ms"] + [f"p{p}_{m}_ms" for p in PERCENTILES]
    return keys


def summarize(outputs: Sequence[Output], duration: float, slo: Slo) -> dict[str, Any]:
    """``vllm bench serve``'s ``calculate_metrics`` for these outputs."""
    import numpy as np

    ok = [o for o in outputs if o.success]
    lens = [o.output_tokens for o in ok]
    tpots = [(o.latency - o.ttft) / (o.output_tokens - 1) for o in ok if o.output_tokens > 1]
    all_tpots = [
        (o.latency - o.ttft) / (o.output_tokens - 1) if o.output_tokens > 1 else 0.0 for o in ok
    ]
    good = sum(
        o.ttft <= slo.ttft_ms / 1e3 and t <= slo.tpot_ms / 1e3
        for o, t in zip(ok, all_tpots, strict=True)
    )
    values = {
        "ttft": [o.ttft for o in ok],
        "tpot": tpots,
        "itl": [x for o in ok for x in o.itl],
        "e2el": [o.latency for o in ok],
    }
    out: dict[str, Any] = {
        "completed": len(ok),
        "failed": len(outputs) - len(ok),
        "duration": duration,
        "total_output_tokens": sum(lens),
        "output_throughput": sum(lens) / duration,
        "request_throughput": len(ok) / duration,
        "request_goodput": good / duration,
        "output_lens": [o.output_tokens if o.success else 0 for o in outputs],
        "errors": [o.error for o in outputs if o.error][:10],
    }
    for m, xs in values.items():
        out[f"mean_{m}_ms"] = float(np.mean(xs or 0)) * 1e3
        for p in PERCENTILES:
            out[f"p{p}_{m}_ms"] = float(np.percentile(xs or 0, p)) * 1e3
    return out


def random_prompts(
    phase: Phase, vocab: tuple[int, int], count: int | None = None
) -> list[list[int]]:
    rng = random.Random(phase.seed)
    lo, hi = vocab
    n = phase.num_prompts if count is None else count
    return [[rng.randrange(lo, hi) for _ in range(phase.input_len)] for _ in range(n)]


def arrival_gaps(n: int, rate: float, seed: int) -> list[float]:
    """Poisson arrivals, as vLLM's ``get_request`` with burstiness 1."""
    if math.isinf(rate):
        return [0.0] * n
    rng = random.Random(seed)
    return [rng.expovariate(rate) for _ in range(n)]


async def _request(session: Any, url: str, body: dict[str, Any]) -> Output:
    out = Output()
    start = last = time.perf_counter()
    try:
        async with session.post(url, json=body) as resp:
            if resp.status != 200:
                out.error = f"HTTP {resp.status}: {(await resp.text())[:200]}"
                return out
            async for raw in resp.content:
                line = raw.decode().strip()
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                data = json.loads(line.removeprefix("data: "))
                if data.get("choices"):
                    now = time.perf_counter()
                    if not out.success:
                        out.success, out.ttft = True, now - start
                    else:
                        out.itl.append(now - last)
                    last = now
                elif usage := data.get("usage"):
                    out.output_tokens = int(usage.get("completion_tokens") or 0)
                elif "error" in data:
                    out.error = json.dumps(data["error"])[:200]
            out.latency = last - start
            if out.success and not out.output_tokens:
                out.error = "no usage chunk: output tokens unknown"
            out.success = out.success and not out.error
    except Exception as e:  # a failed request is a result, not a crash of the phase
        out.success, out.error = False, repr(e)
    return out


async def _run_builtin(
    base_url: str, model: str, phase: Phase, vocab: tuple[int, int]
) -> tuple[list[Output], float]:
    import aiohttp

    url = f"{base_url}/v1/completions"

    def body(ids: list[int]) -> dict[str, Any]:
        return {"model": model, "prompt": ids, "max_tokens": phase.output_len,
                "temperature": 0, "ignore_eos": True, "stream": True,
                "stream_options": {"include_usage": True}}  # fmt: skip

    prompts = random_prompts(phase, vocab)
    limit = asyncio.Semaphore(phase.max_concurrency or len(prompts))
    timeout = aiohttp.ClientTimeout(total=None, sock_read=600)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        # vLLM's client first sends one test request; a prompt of another seed, so
        # that no prompt of the phase is in a prefix cache.
        warm = random_prompts(replace_seed(phase, phase.seed + 10_000), vocab, 1)[0]
        test = await _request(session, url, body(warm))
        if not test.success:
            raise RuntimeError(f"initial test request failed: {test.error}")

        async def one(ids: list[int]) -> Output:
            async with limit:
                return await _request(session, url, body(ids))

        start = time.perf_counter()
        tasks = []
        gaps = arrival_gaps(len(prompts), phase.rate, phase.seed)
        for ids, gap in zip(prompts, gaps, strict=True):
            await asyncio.sleep(gap)
            tasks.append(asyncio.create_task(one(ids)))
        outputs = await asyncio.gather(*tasks)
        duration = time.perf_counter() - start
    return list(outputs), duration


def replace_seed(phase: Phase, seed: int) -> Phase:
    from dataclasses import replace

    return replace(phase, seed=seed)


def run_builtin(
    base_url: str, model: str, phase: Phase, slo: Slo, vocab: tuple[int, int]
) -> dict[str, Any]:
    outputs, duration = asyncio.run(_run_builtin(base_url, model, phase, vocab))
    return summarize(outputs, duration, slo)


def run_vllm_bench(
    vllm: Path, base_url: str, model: str, tokenizer: Path, phase: Phase, slo: Slo
) -> dict[str, Any]:
    """One phase with ``vllm bench serve``; its saved JSON, reduced to our keys."""
    with tempfile.TemporaryDirectory(prefix="baton-peers-") as tmp:
        cmd = [
            str(vllm), "bench", "serve", "--backend", "openai", "--base-url", base_url,
            "--endpoint", "/v1/completions", "--model", model, "--tokenizer", str(tokenizer),
            "--dataset-name", "random", "--random-input-len", str(phase.input_len),
            "--random-output-len", str(phase.output_len), "--num-prompts",
            str(phase.num_prompts), "--request-rate", str(phase.rate), "--seed",
            str(phase.seed), "--temperature", "0", "--ignore-eos",
            "--goodput", f"ttft:{slo.ttft_ms:g}", f"tpot:{slo.tpot_ms:g}",
            "--percentile-metrics", ",".join(METRICS),
            "--metric-percentiles", ",".join(map(str, PERCENTILES)),
            "--save-result", "--save-detailed", "--result-dir", tmp,
            "--result-filename", "result.json", "--disable-tqdm",
        ]  # fmt: skip
        if phase.max_concurrency:
            cmd += ["--max-concurrency", str(phase.max_concurrency)]
        env = dict(os.environ, HF_HUB_OFFLINE="1")
        env.pop("PYTHONPATH", None)  # the peer's venv alone
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=3600)
        if proc.returncode != 0:
            raise RuntimeError(
                f"vllm bench serve failed ({proc.returncode}): {proc.stderr[-2000:]}"
            )
        data = json.loads((Path(tmp) / "result.json").read_text())
    out = {k: data.get(k) for k in summary_keys()}
    out["output_lens"] = data.get("output_lens", [])
    out["errors"] = [e for e in data.get("errors", []) if e][:10]
    return out
