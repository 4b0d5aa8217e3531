"""A decode step's decoder layers in one native call (``native.decode_layers``).

The fused path (``LlamaForCausalLM.forward_fused``) calls about ten C kernels a layer from
Python. At batch 1 on SmolLM2 in bf16 the Python and torch dispatch between them took
about 3 ms of a 12 ms step (two cores, EPYC). For a step of decode tokens only, whose
every GEMM a C kernel computes (``Linear.native_route``: up to ``SMALL_LINEAR_MAX_ROWS``
rows on the GEMV, more up to ``native.tile_rows(dtype)`` on the tile-layout copies: bf16's
``amx_pack``, fp32's ``fp32_tile_pack``), the layer stack runs as one C call that strings
the same kernels together in the same order: the same bits as the fused path.

The call reads the layers' weights and caches from a table of their addresses. It is built
on the first step of each route (which kernel, which weights) and kept, with the tensors
it points at, until ``forget`` (``LlamaForCausalLM.routes_changed``).
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from engine import native
from engine.attention import KVCache

if TYPE_CHECKING:
    from engine.models.llama import LlamaForCausalLM


@dataclass
class LayerTable:
    """The addresses ``native.decode_layers`` reads, for one route."""

    kind: int  # native.LINEAR_*
    table: torch.Tensor  # [L, len(native.DECODE_LAYER_POINTERS)] int64
    keep: list[torch.Tensor]  # the tensors at those addresses, held while the table lives
    dims: tuple[int, int, int, int, int]  # heads, kv heads, head size, intermediate, hidden
    eps: float


# A route's key: the dtype, then whether the rows fit the GEMV and the tile kernels.
RouteKey = tuple[torch.dtype, bool, bool]


class NativeDecodeStep:
    """Runs eligible decode steps of the model it belongs to natively; ``run`` returns
    None otherwise. It holds no reference to the model (the model holds it), so the two
    go with their last reference, not with the cycle collector (the tables keep the KV
    caches alive)."""

    def __init__(self) -> None:
        # Per route, the cache list it was decided for and its table (None: not native).
        self._tables: dict[RouteKey, tuple[list[KVCache], LayerTable | None]] = {}

    def forget(self) -> None:
        """Drop the tables: a Linear's route or weight, or the caches, changed."""
        self._tables.clear()

    def run(self, model: LlamaForCausalLM, x: torch.Tensor, positions: torch.Tensor,
            backend: Any, meta: Any, caches: list[KVCache],
            lib: ctypes.CDLL) -> torch.Tensor | None:
        """The final norm of the layer stack's output for the embedded decode tokens ``x``
        [T, D] (contiguous; updated in place), or None (nothing run) where the step is not
        decode-only, the attention is not the native paged kernel, or a GEMM would not run
        in C. ``positions`` must be contiguous and inside the rotary tables (the caller
        checks)."""
        from engine.models.llama import SMALL_LINEAR_MAX_ROWS

        t = x.shape[0]
        if not (t > 0 and getattr(backend, "native", None) is not None
                and getattr(backend, "native_kv_write", False)
                and getattr(meta, "native_tables", None) is not None
                and meta.num_decode == t and not meta.prefills):
            return None
        key = (x.dtype, t <= SMALL_LINEAR_MAX_ROWS, t <= native.tile_rows(x.dtype))
        known = self._tables.get(key)
        if known is None or known[0] is not caches:
            known = self._tables[key] = (caches, _build(model, t, x.dtype, caches))
        entry = known[1]
        if entry is None:
            return None  # this route does not run natively
        rope = model.rope
        cache = caches[0].k
        return native.decode_layers(
            lib, entry.kind, x, entry.table, model.norm.weight, entry.dims, entry.eps,
            rope.cos, rope.sin, positions, meta.slot_mapping, meta.native_tables,
            meta.native_lens, meta.native_max_len, (cache.shape[1], cache.shape[2]),
            backend.scale)


def _build(model: LlamaForCausalLM, rows: int, dtype: torch.dtype,
           caches: list[KVCache]) -> LayerTable | None:
    """The table for ``rows`` rows of ``dtype``, or None where any layer would leave C:
    a GEMM torch computes, two layers on different kernels, a bias the driver does not
    add, a forward hook (tensor parallelism's all-reduce), differing norms or shapes."""
    from engine.models.llama import DecoderLayer

    layers = [layer for layer in model.layers if isinstance(layer, DecoderLayer)]
    if (not layers or len(caches) != len(layers) or len(layers) != len(model.layers)
            or any(_hooked(m) for m in model.layers.modules())
            or model.norm.weight.dtype != dtype or model.rope.cos.dtype != torch.float32):
        return None
    first = layers[0]
    attn0 = first.self_attn
    dims = (attn0.num_heads, attn0.num_kv_heads, attn0.head_dim,
            first.mlp.intermediate_size, model.config.hidden_size)
    eps = model.norm.eps
    kind: int | None = None
    rows_out: list[list[int]] = []
    keep: list[torch.Tensor] = []
    for layer, cache in zip(layers, caches, strict=True):
        attn, mlp = layer.self_attn, layer.mlp
        norms = (layer.input_layernorm, layer.post_attention_layernorm)
        if ((attn.num_heads, attn.num_kv_heads, attn.head_dim, mlp.intermediate_size,
             model.config.hidden_size) != dims
                or any(n.eps != eps or n.weight.dtype != dtype for n in norms)
                or any(lin.bias is not None
                       for lin in (attn.o_proj, mlp.gate_up_proj, mlp.down_proj))
                or not _cache_fits(cache, dtype, dims)
                or cache.k.shape != caches[0].k.shape or cache.v.shape != cache.k.shape):
            return None
        weights = []
        for lin in (attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj):
            route = lin.native_route(rows, dtype)
            if route is None or (kind is not None and route[0] != kind):
                return None
            kind = route[0]
            weights.append(route[1])
        bias = attn.qkv_proj.bias
        tensors = [norms[0].weight, norms[1].weight, weights[0], bias, weights[1],
                   weights[2], weights[3], cache.k, cache.v]
        rows_out.append([0 if p is None else p.data_ptr() for p in tensors])
        keep.extend(p for p in tensors if p is not None)
    assert kind is not None
    table = torch.tensor(rows_out, dtype=torch.int64)
    if table.shape[1] != len(native.DECODE_LAYER_POINTERS):
        raise RuntimeError("native_step: the layer table's columns do not match "
                           "native.DECODE_LAYER_POINTERS")
    if not all(p.is_contiguous() for p in keep):
        return None
    return LayerTable(kind, table, keep, dims, eps)


def _hooked(module: nn.Module) -> bool:
    return bool(module._forward_hooks or module._forward_pre_hooks)


def _cache_fits(cache: KVCache, dtype: torch.dtype, dims: tuple[int, ...]) -> bool:
    """Head-major [Hkv, N, bs, Dh] caches of ``dtype`` on CPU, contiguous."""
    _, kv_heads, head_dim, _, _ = dims
    return all(c.dtype == dtype and c.is_cpu and c.is_contiguous() and c.dim() == 4
               and c.shape[0] == kv_heads and c.shape[3] == head_dim
               for c in (cache.k, cache.v))
