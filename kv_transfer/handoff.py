"""What a prefill instance hands a decode instance for one request.

It travels as a plain dict (through a Ray actor call), carrying the request, the first
token the prefill side sampled, where and how to pull the KV, and, for seeded sampling,
the request's random generator state so decoding continues the same stream.

A sequence group (``n`` > 1) is one hand-off: ``request_id`` names the group and its
prompt's KV, which travels once; ``children`` are the sequences, each with its own first
token, params (seed + i) and generator state. The decode side forks them off the one
pulled block table (``LLMEngine.share_blocks``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from engine.sampling_params import SamplingParams
from kv_transfer.base import KVDescriptor


@dataclass(frozen=True)
class ChildHandOff:
    """One sequence of a group: what ``LLMEngine.add_prefilled`` needs besides the KV."""

    request_id: str
    first_token: int
    params: SamplingParams
    generator_state: bytes | None = None
    first_logprobs: list[tuple[int, float]] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "request_id": self.request_id,
            "first_token": self.first_token,
            "params": self.params.to_dict(),
            "generator_state": self.generator_state,
            "first_logprobs": _logprobs_out(self.first_logprobs),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ChildHandOff:
        return cls(
            request_id=str(d["request_id"]),
            first_token=int(d["first_token"]),
            params=SamplingParams.from_dict(d["params"]),
            generator_state=d.get("generator_state"),
            first_logprobs=_logprobs_in(d.get("first_logprobs")),
        )


def _logprobs_out(logprobs: list[tuple[int, float]] | None) -> list[list[Any]] | None:
    return None if logprobs is None else [[t, lp] for t, lp in logprobs]


def _logprobs_in(logprobs: Any) -> list[tuple[int, float]] | None:
    return None if logprobs is None else [(int(t), float(lp)) for t, lp in logprobs]


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
    # A sequence group's sequences (None: a single request, first_token and params above).
    children: list[ChildHandOff] | None = None
    # The router's attempt number of this copy of the request (``engine.worker_loop``'s
    # ``Tombstones``): the decode side drops a hand-off of a copy it was told to abort.
    attempt: int = 0

    @property
    def request_ids(self) -> list[str]:
        """The requests the router streams: the children of a group, else this one."""
        if self.children is None:
            return [self.request_id]
        return [c.request_id for c in self.children]

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
            "children": None
            if self.children is None
            else [c.to_dict() for c in self.children],
            "attempt": self.attempt,
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
            children=None
            if d.get("children") is None
            else [ChildHandOff.from_dict(c) for c in d["children"]],
            attempt=int(d.get("attempt", 0)),
        )
