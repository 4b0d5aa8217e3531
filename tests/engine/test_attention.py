"""Paged attention backends against dense attention over the same keys and values."""

from __future__ import annotations

import ctypes

import pytest
import torch
import torch.nn.functional as F

from engine import native
from engine.attention import KVCache
from engine.attention.torch_paged import NATIVE_MIN_BATCH, TorchMetadata, TorchPagedAttention
from engine.step import ScheduledChunk

HKV, H, D, BS, N = 2, 6, 16, 4, 64


def dense_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """q: [S, H, D] at the last S positions of k, v: [L, Hkv, D]; causal."""
    s, length = q.shape[0], k.shape[0]
    groups = q.shape[1] // k.shape[1]
    kk = k.repeat_interleave(groups, dim=1).transpose(0, 1)  # [H, L, D]
    vv = v.repeat_interleave(groups, dim=1).transpose(0, 1)
    mask = torch.arange(length)[None, :] <= torch.arange(length - s, length)[:, None]
    out = F.scaled_dot_product_attention(q.transpose(0, 1), kk, vv, attn_mask=mask)
    return out.transpose(0, 1)


def run_step(
    backend: TorchPagedAttention,
    lengths: list[int],
    new: list[int],
    dtype: torch.dtype = torch.float32,
    head_dim: int = D,
) -> tuple[torch.Tensor, torch.Tensor, TorchMetadata]:
    """One step: request i has lengths[i] tokens of context and computes its last new[i].
    The reference is fp32 dense attention over the same (``dtype``-rounded) values."""
    gen = torch.Generator().manual_seed(0)
    shape = backend.cache_shape(N, BS, HKV, head_dim)
    cache = KVCache(torch.zeros(shape, dtype=dtype), torch.zeros(shape, dtype=dtype))
    free = torch.randperm(N, generator=gen).tolist()
    chunks, ks, vs, qs, refs = [], [], [], [], []
    for i, (length, n) in enumerate(zip(lengths, new, strict=True)):
        table = [free.pop() for _ in range(-(-length // BS))]
        k = torch.randn(length, HKV, head_dim, generator=gen).to(dtype)
        v = torch.randn(length, HKV, head_dim, generator=gen).to(dtype)
        q = torch.randn(n, H, head_dim, generator=gen).to(dtype)
        start = length - n
        # The earlier context is already in the cache; the step writes the rest.
        for pos in range(start):
            blk, off = table[pos // BS], pos % BS
            cache.k[:, blk, off] = k[pos]
            cache.v[:, blk, off] = v[pos]
        chunks.append(ScheduledChunk(str(i), [0] * n, start, table, True))
        ks.append(k[start:])
        vs.append(v[start:])
        qs.append(q)
        refs.append(dense_reference(q.float(), k.float(), v.float()))
    meta = backend.build_metadata(chunks, BS, torch.device("cpu"))
    out = backend.forward(torch.cat(qs), torch.cat(ks), torch.cat(vs), cache, meta)
    return out, torch.cat(refs), meta


DECODE = ([5, 9, 16, 17, 30, 3], [1] * 6)
MIXED = ([7, 12, 20, 33], [1, 1, 12, 5])  # two decodes, a fresh prefill, a later chunk


@pytest.mark.parametrize(("lengths", "new"), [DECODE, MIXED])
def test_torch_path_equals_dense(lengths: list[int], new: list[int]) -> None:
    out, ref, meta = run_step(TorchPagedAttention(D), lengths, new)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert meta.native_tables is None


@pytest.mark.parametrize(("lengths", "new", "uses_kernel"), [(*DECODE, True), (*MIXED, False)])
def test_native_kernel_equals_dense(lengths: list[int], new: list[int], uses_kernel: bool) -> None:
    kernel = native.load()
    if kernel is None:
        pytest.skip("no C compiler here: the native decode kernel is not built")
    backend = TorchPagedAttention(D, kernel, NATIVE_MIN_BATCH)  # as BATON_FUSED_OPS=0 sets
    out, ref, meta = run_step(backend, lengths, new)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    # Big decode batches take the kernel; small ones (here 2 < NATIVE_MIN_BATCH) gather.
    assert (meta.native_tables is not None) is uses_kernel
    assert NATIVE_MIN_BATCH > 2


SINGLE = ([40], [1])  # batch-1 decode: the kernel on the calling thread


@pytest.mark.parametrize(("lengths", "new"), [SINGLE, MIXED])
def test_native_kernel_down_to_batch_1_equals_dense(lengths: list[int], new: list[int]) -> None:
    kernel = native.load()
    if kernel is None:
        pytest.skip("no C compiler here: the native decode kernel is not built")
    backend = TorchPagedAttention(D, kernel, native_min_batch=1)  # the default
    out, ref, meta = run_step(backend, lengths, new)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert meta.native_tables is not None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("heads", "kv_heads", "head_dim"),
                         [(9, 3, 64), (8, 8, 64), (12, 2, 64), (10, 2, 80), (8, 1, 128),
                          (4, 4, 48), (4, 2, 20)])
@pytest.mark.parametrize("bs", [16, 8, 5])
def test_native_decode_head_layouts(
    dtype: torch.dtype, heads: int, kv_heads: int, head_dim: int, bs: int
) -> None:
    """The fp32 and bf16 decode kernels over every group size (1 to 8 query heads per kv
    head: keys in groups of three heads, values in tiles of four) and head size (whole and
    partial tiles of 64 value elements, and 20: no whole vector of keys), with blocks that
    hold whole groups of eight keys (16), one group (8) and odd runs whose pairs of keys
    straddle two blocks (5), odd and even context lengths, against dense fp32 attention
    over the same (rounded) values."""
    kernel = native.load()
    if kernel is None or not native.supports(dtype):
        pytest.skip("the native decode kernel is not built for this dtype here")
    gen = torch.Generator().manual_seed(heads * head_dim + bs)
    lengths = [1, 15, 16, 33, 70]
    blocks = len(lengths) * ((max(lengths) + bs - 1) // bs) + 3
    kc = torch.randn(kv_heads, blocks, bs, head_dim, generator=gen).to(dtype)
    vc = torch.randn(kv_heads, blocks, bs, head_dim, generator=gen).to(dtype)
    width = max((n + bs - 1) // bs for n in lengths)
    order = torch.randperm(blocks, generator=gen)
    tables = order[: len(lengths) * width].view(len(lengths), width).contiguous()
    q = torch.randn(len(lengths), heads, head_dim, generator=gen).to(dtype)
    lens = torch.tensor(lengths)
    scratch = torch.empty(native.scratch_size(len(lengths), heads, kv_heads, head_dim,
                                              max(lengths), dtype))
    out = native.paged_decode(kernel, q, kc, vc, tables, lens, scratch, max(lengths), 0.125)
    group = heads // kv_heads
    # bf16: the kernel rounds the probabilities and the output to bf16.
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    for b, n in enumerate(lengths):
        slots = [int(tables[b, j // bs]) * bs + j % bs for j in range(n)]
        k = kc.view(kv_heads, -1, head_dim)[:, slots].float()  # [Hkv, n, D]
        v = vc.view(kv_heads, -1, head_dim)[:, slots].float()
        qb = q[b].float().view(kv_heads, group, head_dim)
        probs = torch.softmax(qb @ k.transpose(1, 2) * 0.125, dim=-1)
        ref = (probs @ v).reshape(heads, head_dim)
        torch.testing.assert_close(out[b].float(), ref, rtol=tol, atol=tol)


def _fp32_prefill_kernel() -> ctypes.CDLL:
    kernel = native.load()
    if kernel is None or not native.prefill_attention_takes(torch.float32, 64):
        pytest.skip("no fp32 prefill attention kernel here (neither AVX-512F nor AVX2)")
    return kernel


@pytest.mark.parametrize(
    ("queries", "keys", "heads", "kv_heads", "head_dim"),
    [(1, 1, 9, 3, 64), (17, 17, 9, 3, 64), (256, 256, 9, 3, 64), (100, 300, 9, 3, 64),
     (33, 70, 4, 2, 32), (5, 5, 4, 4, 64), (90, 90, 9, 3, 64), (19, 19, 3, 3, 48),
     (20, 41, 2, 1, 128), (7, 30, 2, 2, 16), (3, 80, 2, 1, 256)],
)
def test_native_fp32_prefill_attention_equals_dense(
    queries: int, keys: int, heads: int, kv_heads: int, head_dim: int
) -> None:
    """The fp32 prefill kernel: partial blocks of 16 queries and keys and of four query
    rows, a chunk after earlier context, 1 to 3 query heads per kv head, every count of
    16-element value chunks (1 to 4, and past 64 in groups), runs of 64 keys of V and a
    partial last one, key blocks past the scores' groups of four; q, k and v strided
    inside one fused qkv row as the model hands them over (v given its own strides where
    heads == kv_heads)."""
    kernel = _fp32_prefill_kernel()
    gen = torch.Generator().manual_seed(queries * keys + head_dim)
    qkv = torch.randn(keys, (heads + 2 * kv_heads) * head_dim, generator=gen)
    q, k, v = qkv.view(keys, -1, head_dim).split([heads, kv_heads, kv_heads], dim=1)
    q = q[keys - queries:]
    if heads == kv_heads:
        v = v.contiguous()
    out = torch.full((queries, heads, head_dim), float("nan"))
    native.prefill_attention(kernel, q, k, v, out, head_dim**-0.5)
    # fp32 sums in another order than the reference's: equal to rounding.
    torch.testing.assert_close(out, dense_reference(q, k, v), rtol=1e-5, atol=1e-5)


def test_native_fp32_prefill_attention_refuses_what_it_does_not_take() -> None:
    kernel = _fp32_prefill_kernel()
    q, k = torch.zeros(4, 2, 24), torch.zeros(4, 1, 24)  # not a multiple of 16
    with pytest.raises(ValueError, match="cannot take 4 queries of 2 heads x 24"):
        native.prefill_attention(kernel, q, k, k, torch.empty_like(q), 0.1)
    assert not native.prefill_attention_takes(torch.float32, 24)
    assert not native.prefill_attention_takes(torch.float32, 272)
    q16, k16 = q.half(), k.half()
    with pytest.raises(ValueError, match="expected bf16 or fp32"):
        native.prefill_attention(kernel, q16, k16, k16, torch.empty_like(q16), 0.1)
    with pytest.raises(ValueError, match="of one dtype"):
        native.prefill_attention(kernel, q, k.bfloat16(), k, torch.empty_like(q), 0.1)


def test_paged_prefill_fp32_natively_equals_dense() -> None:
    kernel = _fp32_prefill_kernel()
    backend = TorchPagedAttention(64, kernel)
    assert torch.float32 in backend.native_prefill
    # Two decodes, a fresh prefill and a later chunk that reads its context from the cache.
    out, ref, _ = run_step(backend, *MIXED, head_dim=64)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    off = TorchPagedAttention(24, kernel)
    assert torch.float32 not in off.native_prefill
