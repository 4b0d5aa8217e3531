"""vllm-flash-attn's varlen kernel reading the paged cache directly (CUDA only).

One kernel call per layer covers prefill chunks and decode tokens alike: queries are
packed by ``cu_seqlens_q``, and each request's keys are read through its block table
up to ``seqused_k``. Needs block_size to be a multiple of 16 (the default is 16).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from engine.attention import KVCache, slot_mapping
from engine.step import ScheduledChunk


@dataclass
class FlashMetadata:
    slot_mapping: torch.Tensor  # [T]
    cu_seqlens_q: torch.Tensor  # [B + 1] int32
    seqused_k: torch.Tensor  # [B] int32
    block_table: torch.Tensor  # [B, max_blocks] int32
    max_seqlen_q: int
    max_seqlen_k: int


class FlashAttention:
    name = "flash"
    kv_order = "block_major"  # see engine.kv_blocks

    def __init__(self, head_dim: int):
        from vllm_flash_attn import flash_attn_varlen_func

        self._varlen = flash_attn_varlen_func
        self.scale = 1.0 / math.sqrt(head_dim)

    @staticmethod
    def cache_shape(
        num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int
    ) -> tuple[int, ...]:
        return (num_blocks, block_size, num_kv_heads, head_dim)

    def build_metadata(
        self, chunks: list[ScheduledChunk], block_size: int, device: torch.device
    ) -> FlashMetadata:
        width = max(len(c.block_table) for c in chunks)
        cu = [0]
        for c in chunks:
            cu.append(cu[-1] + c.num_tokens)

        def i32(x: list[int] | list[list[int]]) -> torch.Tensor:
            return torch.tensor(x, dtype=torch.int32, device=device)

        return FlashMetadata(
            slot_mapping=torch.tensor(
                slot_mapping(chunks, block_size), dtype=torch.long, device=device
            ),
            cu_seqlens_q=i32(cu),
            seqused_k=i32([c.context_len for c in chunks]),
            block_table=i32([c.block_table + [0] * (width - len(c.block_table)) for c in chunks]),
            max_seqlen_q=max(c.num_tokens for c in chunks),
            max_seqlen_k=max(c.context_len for c in chunks),
        )

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache: KVCache, meta: FlashMetadata
    ) -> torch.Tensor:
        num_kv_heads, head_dim = k.shape[1], k.shape[2]
        cache.k.view(-1, num_kv_heads, head_dim).index_copy_(0, meta.slot_mapping, k)
        cache.v.view(-1, num_kv_heads, head_dim).index_copy_(0, meta.slot_mapping, v)
        return self._varlen(
            q,
            cache.k,
            cache.v,
            max_seqlen_q=meta.max_seqlen_q,
            cu_seqlens_q=meta.cu_seqlens_q,
            max_seqlen_k=meta.max_seqlen_k,
            seqused_k=meta.seqused_k,
            softmax_scale=self.scale,
            causal=True,
            block_table=meta.block_table,
        )
