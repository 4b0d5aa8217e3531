"""Runs one step: builds the flat batch from a StepPlan, runs the model, samples.

``LLMEngine`` drives any :class:`Runner`: this single-process ``ModelRunner``, or rank
0's ``ParallelRunner`` (``engine/parallel/worker.py``), which also hands the step to
the instance's other ranks.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import nn

from engine import prompt_logprobs
from engine.attention import AttentionBackend, KVCache
from engine.kv_cache import KVShape
from engine.models import LlamaForCausalLM
from engine.sampler import Sampler, SamplerOutput, SamplingRequest
from engine.step import ScheduledChunk, StepPlan


class Runner(Protocol):
    """What LLMEngine needs of whatever runs its steps."""

    @property
    def model(self) -> nn.Module: ...
    @property
    def caches(self) -> list[KVCache]: ...
    @property
    def backend(self) -> AttentionBackend: ...
    @property
    def kv_shape(self) -> KVShape: ...

    def execute(
        self, plan: StepPlan, sampling: Mapping[str, SamplingRequest]
    ) -> tuple[list[str], SamplerOutput]: ...

    def close(self) -> None: ...


@dataclass
class FlatBatch:
    """A step's chunks laid end to end: what the model's forward takes."""

    chunks: list[ScheduledChunk]  # decode chunks first
    token_ids: list[int] = field(default_factory=list)  # [T]
    positions: list[int] = field(default_factory=list)  # [T]
    sample_rows: list[int] = field(default_factory=list)  # [N] rows whose logits are sampled
    sampled: list[str] = field(default_factory=list)  # [N] their request ids


def flat_batch(plan: StepPlan) -> FlatBatch:
    batch = FlatBatch(_decode_first(plan.chunks))
    for c in batch.chunks:
        batch.token_ids.extend(c.token_ids)
        batch.positions.extend(range(c.start_pos, c.context_len))
        if c.sample:
            batch.sample_rows.append(len(batch.token_ids) - 1)
            batch.sampled.append(c.request_id)
    return batch


class ModelRunner:
    def __init__(
        self,
        model: LlamaForCausalLM,
        caches: list[KVCache],
        backend: AttentionBackend,
        block_size: int,
        device: torch.device,
        sampler: Sampler | None = None,
    ):
        self.model = model
        self.caches = caches
        self.backend = backend
        self.block_size = block_size
        self.device = device
        self.sampler = sampler or Sampler()

    @property
    def kv_shape(self) -> KVShape:
        return KVShape.of(self.model.config)

    @torch.inference_mode()
    def execute(
        self, plan: StepPlan, sampling: Mapping[str, SamplingRequest]
    ) -> tuple[list[str], SamplerOutput]:
        """Run the plan; returns the ids of the sampled requests and their samples."""
        batch = flat_batch(plan)
        meta = self.backend.build_metadata(batch.chunks, self.block_size, self.device)
        input_ids = torch.tensor(batch.token_ids, dtype=torch.long, device=self.device)
        pos = torch.tensor(batch.positions, dtype=torch.long, device=self.device)
        hidden = self.model(input_ids, pos, self.backend, meta, self.caches)  # [T, D]
        # prompt_logprobs (s19-api's block): logits at every prompt position of the chunks
        # that ask, not only the sampled rows (engine/prompt_logprobs.py).
        prompt = None
        if prompt_logprobs.wanted(batch.chunks):
            prompt = prompt_logprobs.compute(self.model, hidden, batch.chunks)
        if not batch.sample_rows:
            return [], SamplerOutput(token_ids=[], logprobs=[], prompt_logprobs=prompt)
        # Logits only where a token is sampled: the LM head is a fifth of this model's FLOPs.
        rows = torch.tensor(batch.sample_rows, device=self.device)
        logits = self.model.compute_logits(hidden[rows])
        sampled = batch.sampled
        out = self.sampler(logits, [sampling[r] for r in sampled])
        out.prompt_logprobs = prompt
        return sampled, out

    def close(self) -> None:
        """Nothing to release: the model and cache go with the runner."""


def _decode_first(chunks: list[ScheduledChunk]) -> list[ScheduledChunk]:
    """Decode chunks (one token after some context) lead, as the attention backends expect."""
    decode = [c for c in chunks if c.is_decode]
    rest = [c for c in chunks if not c.is_decode]
    return decode + rest
