"""What the engine reports about a request after a step."""

from __future__ import annotations

from dataclasses import dataclass, field

from engine.sequence import RequestMetrics


@dataclass
class RequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int]  # every output token so far
    text: str  # every output character released so far
    new_token_ids: list[int] = field(default_factory=list)
    delta_text: str = ""
    finished: bool = False
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    logprobs: list[list[tuple[int, float]]] | None = None
    num_cached_tokens: int = 0
    metrics: RequestMetrics | None = None


@dataclass(frozen=True)
class EngineStats:
    num_waiting: int
    num_running: int
    free_blocks: int
    total_blocks: int
    num_preemptions: int
