"""Paged attention in plain torch: works on CPU and, slower than flash, on GPU.

The cache is head-major, ``[Hkv, num_blocks, block_size, Dh]``, so gathering blocks
along dim 1 yields, for each request and head, one contiguous ``[L, Dh]`` slab.

Decode tokens (one new token per request) are attended together. On CPU in fp32 or bf16,
with at least one of them (``NATIVE_MIN_BATCH`` with ``BATON_FUSED_OPS=0``), a small C
kernel (``engine/native``) reads keys and values straight from the blocks. Otherwise
each request's blocks are gathered, with one ``index_select`` into a buffer allocated once
per step and reused by every layer, into a padded ``[B, Hkv, L, Dh]`` view masked past
each length, and attended with two matmuls.

Prefill chunks are attended one request at a time; a chunk that starts at position 0
uses its fresh keys directly, a later chunk (or a prefix-cache hit) gathers its earlier
context from the cache. In bf16 on a CPU with AMX or AVX-512 BF16 (and
``BATON_FUSED_OPS`` on) the native kernel attends them (``native.prefill_attention``: 0.6x
SDPA's time for a 256-token chunk of SmolLM2 on AMX, 0.3x with vdpbf16ps on a Zen 4,
where torch's bf16 flash kernel spent a quarter of a prefill step); otherwise SDPA.
"""

from __future__ import annotations

import ctypes
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from engine import envs, native
from engine.attention import KVCache, slot_mapping
from engine.step import ScheduledChunk

# With BATON_FUSED_OPS=0, below this many decode tokens the gather path attends. By
# default the kernel takes any batch: it runs small ones on the calling thread (no thread
# start-up), which beat the gather's ten torch ops per layer at batch 1 (measured
# alternating in one run); its sums differ from the gather's in the last bits.
NATIVE_MIN_BATCH = 4

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
    decode_blocks: torch.Tensor | None = None  # [Bd * max_blocks] block ids, padded with 0
    decode_bias: torch.Tensor | None = None  # [1, Bd, 1, L]: 0 inside each context, -inf past it
    prefills: list[PrefillSegment] = field(default_factory=list)
    # Gather buffers shared by every layer of the step: [Hkv, Bd * max_blocks, bs, Dh].
    k_buf: torch.Tensor | None = None
    v_buf: torch.Tensor | None = None
    # The native kernel's inputs: block tables [Bd, max_blocks], lengths [Bd], and a
    # score buffer shared by every layer of the step.
    native_tables: torch.Tensor | None = None
    native_lens: torch.Tensor | None = None
    native_max_len: int = 0
    scratch: torch.Tensor | None = None


class TorchPagedAttention:
    name = "torch"
    kv_order = "head_major"  # see engine.kv_blocks

    def __init__(
        self,
        head_dim: int,
        native_kernel: ctypes.CDLL | None = None,
        native_min_batch: int | None = None,
    ):
        """``native_kernel``: the loaded C decode kernel, for fp32 or bf16 caches on CPU;
        ``native_min_batch``: the fewest decode tokens it takes (default: see above)."""
        self.scale = 1.0 / math.sqrt(head_dim)
        self.native = native_kernel
        if native_min_batch is None:
            native_min_batch = 1 if envs.fused_ops() else NATIVE_MIN_BATCH
        self.native_min_batch = native_min_batch
        # New keys/values written by the native copy (fp32 or bf16 CPU caches) rather than
        # index_copy_; off with BATON_FUSED_OPS=0.
        self.native_kv_write = envs.fused_ops()
        # The dtypes of prefill chunks attended natively (bf16: AMX tiles or vdpbf16ps;
        # fp32: AVX-512F or AVX2), for this head size.
        self.native_prefill = frozenset(
            dtype for dtype in (torch.bfloat16, torch.float32)
            if native_kernel is not None and envs.fused_ops()
            and native.prefill_attention_takes(dtype, head_dim))

    @staticmethod
    def cache_shape(
        num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int
    ) -> tuple[int, ...]:
        return (num_kv_heads, num_blocks, block_size, head_dim)

    def build_metadata(
        self, chunks: list[ScheduledChunk], block_size: int, device: torch.device
    ) -> TorchMetadata:
        """``chunks`` must list decode chunks (one token, some context) first."""
        slots = torch.tensor(slot_mapping(chunks, block_size), dtype=torch.long, device=device)
        decode = [c for c in chunks if c.is_decode]
        meta = TorchMetadata(slot_mapping=slots, num_decode=len(decode))
        if decode and self.native is not None and len(decode) >= self.native_min_batch:
            _plan_native_decode(meta, decode)
        elif decode:
            _plan_gather_decode(meta, decode, block_size, device)
        return self._add_prefills(meta, chunks, block_size, device)

    def _add_prefills(
        self,
        meta: TorchMetadata,
        chunks: list[ScheduledChunk],
        block_size: int,
        device: torch.device,
    ) -> TorchMetadata:
        offset = meta.num_decode
        for c in chunks[meta.num_decode :]:
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
        # q: [T, H, Dh]; k, v: [T, Hkv, Dh]; cache.k/v: [Hkv, N, bs, Dh]
        hkv, _, bs, dh = cache.k.shape
        if not (self.native_kv_write and self.native is not None
                and native.kv_write(self.native, k, v, cache.k, cache.v, meta.slot_mapping)):
            cache.k.view(hkv, -1, dh).index_copy_(1, meta.slot_mapping, k.transpose(0, 1))
            cache.v.view(hkv, -1, dh).index_copy_(1, meta.slot_mapping, v.transpose(0, 1))
        out = torch.empty_like(q)
        nd = meta.num_decode
        if nd and meta.native_tables is not None:
            assert self.native is not None and meta.native_lens is not None
            if meta.scratch is None:
                size = native.scratch_size(nd, q.shape[1], hkv, dh, meta.native_max_len, q.dtype)
                meta.scratch = torch.empty(size, dtype=torch.float32)
            out[:nd] = native.paged_decode(
                self.native,
                q[:nd],
                cache.k,
                cache.v,
                meta.native_tables,
                meta.native_lens,
                meta.scratch,
                meta.native_max_len,
                self.scale,
            )
        elif nd:
            assert meta.decode_blocks is not None and meta.decode_bias is not None
            if meta.k_buf is None or meta.v_buf is None:
                shape = (hkv, meta.decode_blocks.numel(), bs, dh)
                meta.k_buf = cache.k.new_empty(shape)
                meta.v_buf = cache.v.new_empty(shape)
            torch.index_select(cache.k, 1, meta.decode_blocks, out=meta.k_buf)
            torch.index_select(cache.v, 1, meta.decode_blocks, out=meta.v_buf)
            out[:nd] = self._decode(q[:nd], meta.k_buf, meta.v_buf, meta.decode_bias, hkv)
        for seg in meta.prefills:
            sl = slice(seg.start, seg.start + seg.length)
            if seg.block_ids is None:
                ks, vs = k[sl].transpose(0, 1), v[sl].transpose(0, 1)  # [Hkv, S, Dh]
            else:
                ctx = seg.start_pos + seg.length
                ks = cache.k.index_select(1, seg.block_ids).view(hkv, -1, dh)[:, :ctx]
                vs = cache.v.index_select(1, seg.block_ids).view(hkv, -1, dh)[:, :ctx]
            if q.dtype in self.native_prefill:
                assert self.native is not None
                native.prefill_attention(
                    self.native, q[sl], ks.transpose(0, 1), vs.transpose(0, 1), out[sl],
                    self.scale)
                continue
            o = self._sdpa(
                q[sl].transpose(0, 1).unsqueeze(0),  # [1, H, S, Dh]
                ks.unsqueeze(0),
                vs.unsqueeze(0),
                seg.mask,
                causal=seg.mask is None,
            )
            out[sl] = o[0].transpose(0, 1)
        return out

    def _decode(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor, hkv: int
    ) -> torch.Tensor:
        """One query per request against its gathered context, as two batched matmuls.

        SDPA's CPU kernels carry a fixed cost per call that dwarfs a single query's work;
        plain matmuls over the head-major buffer need no copy of the keys at all.
        """
        bd, h, dh = q.shape
        qg = q.view(bd, hkv, h // hkv, dh).transpose(0, 1)  # [Hkv, Bd, G, Dh]
        k = k.view(hkv, bd, -1, dh)  # [Hkv, Bd, L, Dh]
        v = v.view(hkv, bd, -1, dh)
        scores = torch.matmul(qg, k.transpose(-1, -2)).mul_(self.scale)  # [Hkv, Bd, G, L]
        probs = scores.add_(bias.to(scores.dtype)).softmax(dim=-1)
        out = torch.matmul(probs, v)  # [Hkv, Bd, G, Dh]
        return out.transpose(0, 1).reshape(bd, h, dh)

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


def _padded_tables(decode: list[ScheduledChunk]) -> list[list[int]]:
    width = max(len(c.block_table) for c in decode)
    return [c.block_table + [0] * (width - len(c.block_table)) for c in decode]


def _plan_native_decode(meta: TorchMetadata, decode: list[ScheduledChunk]) -> None:
    meta.native_tables = torch.tensor(_padded_tables(decode), dtype=torch.long)
    meta.native_lens = torch.tensor([c.context_len for c in decode], dtype=torch.long)
    meta.native_max_len = max(c.context_len for c in decode)


def _plan_gather_decode(
    meta: TorchMetadata, decode: list[ScheduledChunk], block_size: int, device: torch.device
) -> None:
    tables = _padded_tables(decode)
    meta.decode_blocks = torch.tensor(
        [b for row in tables for b in row], dtype=torch.long, device=device
    )
    lens = torch.tensor([c.context_len for c in decode], device=device)
    positions = torch.arange(len(tables[0]) * block_size, device=device)
    inside = positions[None, :] < lens[:, None]  # [Bd, L]
    bias = torch.zeros(inside.shape, dtype=torch.float32, device=device)
    meta.decode_bias = bias.masked_fill_(~inside, float("-inf"))[None, :, None, :]
