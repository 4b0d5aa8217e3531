"""Paged attention in plain torch: works on CPU and, slower than flash, on GPU.

Decode tokens (one new token per request) are attended together: each request's
blocks are gathered into a padded [B, L] view in one indexing op and masked past its
length. Prefill chunks are attended one request at a time; a chunk that starts at
position 0 uses its fresh keys directly, a later chunk (or a prefix-cache hit) gathers
its earlier context from the cache.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from engine.attention import KVCache, slot_mapping
from engine.step import ScheduledChunk

_HAS_GQA = "enable_gqa" in (F.scaled_dot_product_attention.__doc__ or "")


@dataclass
class PrefillSegment:
    start: int  # first token of the chunk in the flat batch
    length: int
    start_pos: int  # tokens already in the cache before the chunk
    block_ids: torch.Tensor | None  # [nblocks], None when start_pos == 0
    mask: torch.Tensor | None  # [length, start_pos + length], None when start_pos == 0


@dataclass
class TorchMetadata:
    slot_mapping: torch.Tensor
    num_decode: int
    decode_block_tables: torch.Tensor | None = None  # [Bd, max_blocks]
    decode_mask: torch.Tensor | None = None  # [Bd, 1, 1, max_blocks * block_size]
    prefills: list[PrefillSegment] = field(default_factory=list)


class TorchPagedAttention:
    name = "torch"

    def __init__(self, head_dim: int):
        self.scale = 1.0 / math.sqrt(head_dim)

    def build_metadata(
        self, chunks: list[ScheduledChunk], block_size: int, device: torch.device
    ) -> TorchMetadata:
        """``chunks`` must list decode chunks (one token, some context) first."""
        slots = torch.tensor(slot_mapping(chunks, block_size), dtype=torch.long, device=device)
        decode = [c for c in chunks if c.num_tokens == 1 and c.start_pos > 0]
        meta = TorchMetadata(slot_mapping=slots, num_decode=len(decode))
        if decode:
            width = max(len(c.block_table) for c in decode)
            tables = [c.block_table + [0] * (width - len(c.block_table)) for c in decode]
            meta.decode_block_tables = torch.tensor(tables, dtype=torch.long, device=device)
            lens = torch.tensor([c.context_len for c in decode], device=device)
            positions = torch.arange(width * block_size, device=device)
            meta.decode_mask = (positions[None, :] < lens[:, None])[:, None, None, :]
        offset = len(decode)
        for c in chunks[len(decode) :]:
            seg = PrefillSegment(offset, c.num_tokens, c.start_pos, None, None)
            if c.start_pos > 0:
                nblocks = -(-c.context_len // block_size)
                seg.block_ids = torch.tensor(
                    c.block_table[:nblocks], dtype=torch.long, device=device
                )
                q_pos = torch.arange(c.start_pos, c.context_len, device=device)
                k_pos = torch.arange(c.context_len, device=device)
                seg.mask = k_pos[None, :] <= q_pos[:, None]
            meta.prefills.append(seg)
            offset += c.num_tokens
        return meta

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache: KVCache, meta: TorchMetadata
    ) -> torch.Tensor:
        # q: [T, H, Dh]; k, v: [T, Hkv, Dh]; cache.k/v: [N, bs, Hkv, Dh]
        num_kv_heads, head_dim = k.shape[1], k.shape[2]
        cache.k.view(-1, num_kv_heads, head_dim).index_copy_(0, meta.slot_mapping, k)
        cache.v.view(-1, num_kv_heads, head_dim).index_copy_(0, meta.slot_mapping, v)
        out = torch.empty_like(q)
        nd = meta.num_decode
        if nd:
            assert meta.decode_block_tables is not None
            kg = cache.k[meta.decode_block_tables].flatten(1, 2)  # [Bd, L, Hkv, Dh]
            vg = cache.v[meta.decode_block_tables].flatten(1, 2)
            o = self._sdpa(
                q[:nd].unsqueeze(2), kg.transpose(1, 2), vg.transpose(1, 2), meta.decode_mask
            )
            out[:nd] = o.squeeze(2)  # [Bd, H, 1, Dh] -> [Bd, H, Dh]
        for seg in meta.prefills:
            sl = slice(seg.start, seg.start + seg.length)
            if seg.block_ids is None:
                ks, vs = k[sl], v[sl]
            else:
                ctx = seg.start_pos + seg.length
                ks = cache.k[seg.block_ids].flatten(0, 1)[:ctx]
                vs = cache.v[seg.block_ids].flatten(0, 1)[:ctx]
            o = self._sdpa(
                q[sl].transpose(0, 1).unsqueeze(0),  # [1, H, S, Dh]
                ks.transpose(0, 1).unsqueeze(0),
                vs.transpose(0, 1).unsqueeze(0),
                seg.mask,
                causal=seg.mask is None,
            )
            out[sl] = o[0].transpose(0, 1)
        return out

    def _sdpa(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        mask: torch.Tensor | None,
        causal: bool = False,
    ) -> torch.Tensor:
        # q: [B, H, S, Dh]; k, v: [B, Hkv, L, Dh]
        groups = q.shape[1] // k.shape[1]
        if groups > 1 and not _HAS_GQA:
            k = k.repeat_interleave(groups, dim=1)
            v = v.repeat_interleave(groups, dim=1)
        kwargs = {"enable_gqa": True} if groups > 1 and _HAS_GQA else {}
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=causal, scale=self.scale, **kwargs
        )
