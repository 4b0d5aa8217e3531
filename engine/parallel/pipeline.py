"""Pipeline parallelism: a stage is a contiguous run of a loaded model's decoder layers.

``PipelineStage`` takes the parts of a built ``LlamaForCausalLM`` that one stage runs
and drops the rest, so a stage holds only its layers' weights (and the runner sizes its
KV cache for those layers only). Activations cross stages as one ``[T, D]`` tensor: the
model's residual stream *is* its hidden state (each layer adds to ``x``), so there is
no separate residual to send.

Where the ends live, and why:

- the first stage embeds the tokens and also holds the LM head: rank 0 owns the
  scheduler and every request's sampling state (seeded generators that a KV hand-off
  carries on, penalty history, logprobs), so the last stage sends back the final hidden
  states of the sampled rows (``[N, D]``, a few KB) and rank 0's stage computes logits
  and samples. Nothing about a request has to be mirrored on another rank, and a tied
  embedding is the LM head with no second copy.
- the last stage applies the final norm, before the rows go back.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from engine.attention import AttentionBackend, AttentionMetadata, KVCache
from engine.models.llama import Linear, LlamaForCausalLM, RMSNorm


class PipelineStage(nn.Module):
    """One stage's share of a Llama model; with one stage, the whole model."""

    def __init__(self, model: LlamaForCausalLM, layers: range, first: bool, last: bool):
        super().__init__()
        self.config = model.config
        self.layer_ids = layers
        self.is_first = first
        self.is_last = last
        self.rope = model.rope
        self.layers = nn.ModuleList(model.layers[i] for i in layers)
        self.embed_tokens: nn.Embedding | None = model.embed_tokens if first else None
        self.lm_head: Linear | None = model.lm_head if first else None
        self.norm: RMSNorm | None = model.norm if last else None

    def forward(
        self,
        x: torch.Tensor,
        positions: torch.Tensor,
        backend: AttentionBackend,
        meta: AttentionMetadata,
        caches: list[KVCache],
    ) -> torch.Tensor:
        """``x``: token ids [T] on the first stage, else the previous stage's [T, D].
        Returns [T, D]: normed on the last stage, else the activations to pass on."""
        if self.embed_tokens is not None:
            x = self.embed_tokens(x)  # [T] -> [T, D]
        rope = self.rope.tables(positions, x.dtype)
        for layer, cache in zip(self.layers, caches, strict=True):
            x = layer(x, rope, backend, meta, cache)
        return self.norm(x) if self.norm is not None else x

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        # hidden: [N, D] -> [N, V] fp32
        if self.lm_head is None:
            raise ValueError("stage: only the first stage holds the LM head")
        return self.lm_head(hidden).float()


def send_activations(x: torch.Tensor, dst: int, group: dist.ProcessGroup | None) -> None:
    """Send ``x`` to global rank ``dst``; the receiver knows its shape from the plan."""
    dist.send(x.contiguous(), dst=dst, group=group)


def recv_activations(
    shape: tuple[int, ...],
    dtype: torch.dtype,
    device: torch.device,
    src: int,
    group: dist.ProcessGroup | None,
) -> torch.Tensor:
    out = torch.empty(shape, dtype=dtype, device=device)
    dist.recv(out, src=src, group=group)
    return out
