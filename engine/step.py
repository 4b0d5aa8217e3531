"""The one message per step from the scheduler to the model runner.

The runner lives in the engine's process, so the message carries whole block tables
rather than vLLM v1's diffs against cached worker state: the tables are short lists
and copying them is cheaper than keeping two views of them consistent.
"""

from __future__ import annotations

from collections.abc import Callable
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
    # prompt_logprobs (engine/prompt_logprobs.py): the top-N wanted at every position this
    # chunk computes (None: only the sampled row's logits); the targets are the chunk's
    # own next tokens, then ``next_token`` (the prompt's token after the chunk).
    prompt_logprobs: int | None = None
    next_token: int | None = None

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def context_len(self) -> int:
        return self.start_pos + len(self.token_ids)

    @property
    def is_decode(self) -> bool:
        """One token after some context: a decode row (a prompt's last token on its own,
        after earlier chunks, counts too, and is computed the same way)."""
        return len(self.token_ids) == 1 and self.start_pos > 0


@dataclass(frozen=True)
class StepShape:
    """What one step computes, in the terms of the planner's latency model."""

    prefill_tokens: int = 0  # prompt (or recomputed) tokens
    # Over the prompt chunks, end^2 - start^2: attention over each prompt so far.
    prefill_sq: int = 0
    decode_batch: int = 0  # one-token chunks after a prompt: decodes
    decode_context: int = 0  # their context lengths, summed


# A latency model's time for a step of this shape, in ms (the planner's profile, given to
# an instance so it can report how far its steps are from it).
StepCost = Callable[[StepShape], float]


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

    def shape(self) -> StepShape:
        tokens = sq = batch = context = 0
        for c in self.chunks:
            if c.is_decode:
                batch += 1
                context += c.context_len
            else:
                tokens += c.num_tokens
                sq += c.context_len**2 - c.start_pos**2
        return StepShape(tokens, sq, batch, context)
