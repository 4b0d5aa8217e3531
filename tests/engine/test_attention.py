"""Paged attention backends against dense attention over the same keys and values."""

from __future__ import annotations

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
