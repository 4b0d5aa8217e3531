"""What a prefill instance hands a decode instance for one request.

It travels as a plain dict (through a Ray actor call), carrying the request, the first
token the prefill side sampled, where and how to pull the KV, and, for seeded sampling,
the request's random generator state so decoding continues the same stream.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from engine.sampling_params import SamplingParams
from kv_transfer.base import KVDescriptor


@dataclass(frozen=True)
class HandOff:
    request_id: str
    prompt_token_ids: list[int]
    first_token: int
    params: SamplingParams
    kv: KVDescriptor
    source: str  # the prefill instance's name, for control calls (renew, release, send)
    source_endpoint: str  # its sender's endpoint, for the transfer itself
    generator_state: bytes | None = None
    first_logprobs: list[tuple[int, float]] | None = None
    num_cached_tokens: int = 0
    timings: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "request_id": self.request_id,
            "prompt_token_ids": list(self.prompt_token_ids),
            "first_token": self.first_token,
            "params": self.params.to_dict(),
            "kv": self.kv.to_dict(),
            "source": self.source,
            "source_endpoint": self.source_endpoint,
            "generator_state": self.generator_state,
            "first_logprobs": None
            if self.first_logprobs is None
            else [[t, lp] for t, lp in self.first_logprobs],
            "num_cached_tokens": self.num_cached_tokens,
            "timings": dict(self.timings),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> HandOff:
        logprobs = d.get("first_logprobs")
        return cls(
            request_id=str(d["request_id"]),
            prompt_token_ids=[int(t) for t in d["prompt_token_ids"]],
            first_token=int(d["first_token"]),
            params=SamplingParams.from_dict(d["params"]),
            kv=KVDescriptor.from_dict(d["kv"]),
            source=str(d["source"]),
            source_endpoint=str(d["source_endpoint"]),
            generator_state=d.get("generator_state"),
            first_logprobs=None
            if logprobs is None
            else [(int(t), float(lp)) for t, lp in logprobs],
            num_cached_tokens=int(d.get("num_cached_tokens", 0)),
            timings={str(k): float(v) for k, v in d.get("timings", {}).items()},
        )
