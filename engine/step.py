"""The one message per step from the scheduler to the model runner.

The runner lives in the engine's process, so the message carries whole block tables
rather than vLLM v1's diffs against cached worker state: the tables are short lists
and copying them is cheaper than keeping two views of them consistent.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class ScheduledChunk:
    """Compute ``token_ids`` at positions ``start_pos ..`` for one request."""

    request_id: str
    token_ids: list[int]
    start_pos: int
    block_table: list[int]
    # True when the chunk ends the request's known tokens, so its last logits are sampled.
    sample: bool

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def context_len(self) -> int:
        return self.start_pos + len(self.token_ids)


@dataclass(frozen=True)
class StepPlan:
    chunks: list[ScheduledChunk] = field(default_factory=list)
    preempted: list[str] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(c.num_tokens for c in self.chunks)

    @property
    def is_empty(self) -> bool:
        return not self.chunks
