"""The KV transfer's share of TTFT on a real local cluster, per transport.

One prefill and one decode instance (one CPU each) serve 512-token SmolLM2 prompts one
at a time, so nothing queues. For each request the cluster records the time to first
token (arrival at the cluster to the first token event) and the decode instance reports
how long the pull of the prompt's KV took; the share is the pull time over the TTFT.
Each prompt is distinct text (no prefix-cache hits), so every prefill computes all 512
tokens. Target: at most 10% at 512 tokens.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass
from typing import Any

PROMPT_WORDS = ["river", "stone", "cloud", "lamp", "garden", "engine", "violin", "harbor"]
TARGET_SHARE = 0.10


@dataclass(frozen=True)
class TTFTShare:
    transport: str
    prompt_tokens: int
    requests: int
    ttft_ms: float  # median
    kv_transfer_ms: float  # median
    kv_mib: float
    share: float  # median of per-request transfer / TTFT

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _prompt(tokenizer: Any, i: int, tokens: int) -> list[int]:
    words = [
        PROMPT_WORDS[(i * 7 + j * 3) % len(PROMPT_WORDS)] + str(j % (i + 5)) for j in range(tokens)
    ]
    ids: list[int] = tokenizer.encode(" ".join(words))
    return ids[:tokens]


def measure_ttft_share(
    transports: list[str], prompt_tokens: int = 512, requests: int = 8
) -> list[TTFTShare]:
    from cluster import Cluster
    from engine.loader import load_model
    from engine.sampling_params import SamplingParams

    tokenizer = load_model(None).tokenizer
    params = SamplingParams(max_tokens=2, temperature=0, ignore_eos=True)
    rows = []
    for transport in transports:
        with Cluster(transport=transport, cpus_per_instance=1) as cluster:
            ttfts, pulls, shares = [], [], []
            nbytes = 0.0
            for i in range(requests + 1):  # the first request warms up the pair
                stream = cluster.submit(
                    prompt_token_ids=_prompt(tokenizer, i, prompt_tokens), params=params
                )
                while not (out := stream.get(timeout=300)).finished:
                    pass
                assert out.metrics and out.metrics.first_token_time is not None
                ttft = out.metrics.first_token_time - out.metrics.arrival_time
                pull = stream.trace.timings.get("kv_transfer", float("nan"))
                if i > 0:
                    ttfts.append(ttft)
                    pulls.append(pull)
                    shares.append(pull / ttft)
                time.sleep(0.05)
            stats = {s.name: s for s in cluster.stats()}
            decode = stats["decode-0"].counters
            nbytes = decode["kv_bytes"] / max(1, decode["pulls"])
        rows.append(
            TTFTShare(
                transport=transport,
                prompt_tokens=prompt_tokens,
                requests=requests,
                ttft_ms=1e3 * statistics.median(ttfts),
                kv_transfer_ms=1e3 * statistics.median(pulls),
                kv_mib=nbytes / (1 << 20),
                share=statistics.median(shares),
            )
        )
    return rows


def format_markdown(rows: list[TTFTShare]) -> str:
    lines = [
        "| transport | prompt tokens | KV MiB | TTFT ms | KV pull ms | pull / TTFT | target |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        ok = "met" if r.share <= TARGET_SHARE else "missed"
        lines.append(
            f"| {r.transport} | {r.prompt_tokens} | {r.kv_mib:.1f} | {r.ttft_ms:.0f} | "
            f"{r.kv_transfer_ms:.1f} | {100 * r.share:.1f}% | <= 10% ({ok}) |"
        )
    return "\n".join(lines)
