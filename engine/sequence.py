"""A request's state inside one engine: its tokens, progress and block table."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from engine.outputs import RequestMetrics
from engine.sampling_params import SamplingParams


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    """One request. ``num_computed_tokens`` of ``token_ids`` have KV in ``block_table``.

    Prompt and output share one list so that a request preempted mid-decode is
    recomputed exactly like a longer prompt.
    """

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    block_table: list[int] = field(default_factory=list)
    # Hashes of the full blocks of token_ids, computed lazily for prefix caching.
    block_hashes: list[int] = field(default_factory=list)
    num_cached_tokens: int = 0
    num_preemptions: int = 0
    status: SequenceStatus = SequenceStatus.WAITING
    finish_reason: str | None = None
    generator: torch.Generator | None = None
    # engine.logits_processors.LogitsProcessor, built by the engine from params when
    # first needed; rebuilt (by replaying the output) wherever the request moves.
    logits_processor: Any = None
    metrics: RequestMetrics = field(default_factory=lambda: RequestMetrics(time.monotonic()))
    # n > 1, a sequence group: this Sequence computes the prompt once and its one sampled
    # row gives each child its first token (same logits, each child's own params and
    # seed); the children then share the prompt's blocks (LLMEngine.share_blocks).
    children: list[Sequence] | None = None
    parent: Sequence | None = None  # a child's group, until it has its first token
    # params.prompt_logprobs: one row per prompt token after the first, filled while the
    # prompt is computed (engine/prompt_logprobs.py); None when not asked.
    prompt_logprobs: list[list[tuple[int, float, int]]] | None = None

    def __post_init__(self) -> None:
        if not self.token_ids:
            self.token_ids = list(self.prompt_token_ids)
        if self.params.prompt_logprobs is not None and self.prompt_logprobs is None:
            self.prompt_logprobs = []
        if self.params.seed is not None and self.generator is None:
            self.generator = torch.Generator().manual_seed(self.params.seed)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED
