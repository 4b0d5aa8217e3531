"""Runs one step: builds the flat batch from a StepPlan, runs the model, samples."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from engine.attention import AttentionBackend, KVCache
from engine.models import LlamaForCausalLM
from engine.sampler import Sampler, SamplerOutput, SamplingRequest
from engine.step import ScheduledChunk, StepPlan


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

    @torch.inference_mode()
    def execute(
        self, plan: StepPlan, sampling: Mapping[str, SamplingRequest]
    ) -> tuple[list[str], SamplerOutput]:
        """Run the plan; returns the ids of the sampled requests and their samples."""
        chunks = _decode_first(plan.chunks)
        meta = self.backend.build_metadata(chunks, self.block_size, self.device)
        ids: list[int] = []
        positions: list[int] = []
        last: list[int] = []
        sampled: list[str] = []
        for c in chunks:
            ids.extend(c.token_ids)
            positions.extend(range(c.start_pos, c.context_len))
            if c.sample:
                last.append(len(ids) - 1)
                sampled.append(c.request_id)
        input_ids = torch.tensor(ids, dtype=torch.long, device=self.device)
        pos = torch.tensor(positions, dtype=torch.long, device=self.device)
        hidden = self.model(input_ids, pos, self.backend, meta, self.caches)  # [T, D]
        if not last:
            return [], SamplerOutput(token_ids=[], logprobs=[])
        # Logits only where a token is sampled: the LM head is a fifth of this model's FLOPs.
        logits = self.model.compute_logits(hidden[torch.tensor(last, device=self.device)])
        return sampled, self.sampler(logits, [sampling[r] for r in sampled])


def _decode_first(chunks: list[ScheduledChunk]) -> list[ScheduledChunk]:
    """Decode chunks (one token after some context) lead, as the attention backends expect."""
    decode = [c for c in chunks if c.num_tokens == 1 and c.start_pos > 0]
    rest = [c for c in chunks if not (c.num_tokens == 1 and c.start_pos > 0)]
    return decode + rest
