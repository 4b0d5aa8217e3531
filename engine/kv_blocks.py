"""Whole-block access to the paged KV cache, for moving a request's KV between instances.

A transfer copies some blocks of every layer out of one instance's cache and into
another's. The unit of copying is a *layer group*: a contiguous staging buffer
``[num_layers_in_group, 2 (k, v), *block_shape]`` holding the chosen blocks of those
layers in the cache's own order, so reading is one ``index_select`` per tensor into the
buffer and writing one ``index_copy_`` back.

The two sides may order their caches differently (the torch backend is head-major,
flash is block-major); :func:`convert` permutes a staging buffer from one order to the
other. Head re-sharding across tensor-parallel layouts belongs here too, later.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from engine.attention import KVCache

# Cache orders: where the block index sits in one layer's K (or V) tensor.
HEAD_MAJOR = "head_major"  # [Hkv, num_blocks, block_size, Dh]
BLOCK_MAJOR = "block_major"  # [num_blocks, block_size, Hkv, Dh]
ORDERS = (HEAD_MAJOR, BLOCK_MAJOR)

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
DTYPE_NAMES = {v: k for k, v in _DTYPES.items()}


@dataclass(frozen=True)
class KVLayout:
    """The shape of one instance's KV cache: enough for a peer to size and place bytes."""

    num_layers: int
    block_size: int
    num_kv_heads: int
    head_dim: int
    dtype: str
    order: str

    def __post_init__(self) -> None:
        if self.dtype not in _DTYPES:
            raise ValueError(f"dtype: must be one of {', '.join(_DTYPES)}, got {self.dtype!r}")
        if self.order not in ORDERS:
            raise ValueError(f"order: must be one of {', '.join(ORDERS)}, got {self.order!r}")

    @property
    def torch_dtype(self) -> torch.dtype:
        return _DTYPES[self.dtype]

    @property
    def element_size(self) -> int:
        return torch.empty((), dtype=self.torch_dtype).element_size()

    def block_shape(self, num_blocks: int) -> tuple[int, ...]:
        """Shape of one layer's K (or V) for ``num_blocks`` gathered blocks."""
        if self.order == HEAD_MAJOR:
            return (self.num_kv_heads, num_blocks, self.block_size, self.head_dim)
        return (num_blocks, self.block_size, self.num_kv_heads, self.head_dim)

    def group_shape(self, num_layers: int, num_blocks: int) -> tuple[int, ...]:
        """Shape of a staging buffer for ``num_layers`` layers: [layers, 2, *block_shape]."""
        return (num_layers, 2, *self.block_shape(num_blocks))

    def bytes_per_layer(self, num_blocks: int) -> int:
        """K and V of one layer for ``num_blocks`` blocks."""
        return (
            2 * num_blocks * self.block_size * self.num_kv_heads * self.head_dim
        ) * self.element_size

    def compatible(self, other: KVLayout) -> str | None:
        """Why blocks of ``other`` cannot be written into this layout, or None if they can."""
        for name in ("num_layers", "block_size", "num_kv_heads", "head_dim", "dtype"):
            if getattr(self, name) != getattr(other, name):
                return f"{name}: {getattr(other, name)!r} does not match {getattr(self, name)!r}"
        return None


def layer_groups(num_layers: int, layers_per_group: int) -> list[range]:
    """Split ``range(num_layers)`` into consecutive groups of at most ``layers_per_group``."""
    if layers_per_group <= 0:
        raise ValueError(f"layers_per_group: must be > 0, got {layers_per_group}")
    return [
        range(start, min(start + layers_per_group, num_layers))
        for start in range(0, num_layers, layers_per_group)
    ]


def convert(buf: torch.Tensor, src: KVLayout, dst: KVLayout) -> torch.Tensor:
    """A staging buffer ``[L, 2, *block_shape]`` in ``src`` order, rearranged to ``dst``'s."""
    if src.order == dst.order:
        return buf
    if src.order == HEAD_MAJOR:  # [L, 2, H, N, bs, D] -> [L, 2, N, bs, H, D]
        return buf.permute(0, 1, 3, 4, 2, 5).contiguous()
    return buf.permute(0, 1, 4, 2, 3, 5).contiguous()  # [L, 2, N, bs, H, D] -> [L, 2, H, N, bs, D]


class KVBlocks:
    """Reads and writes whole blocks of one instance's cache through staging buffers."""

    def __init__(self, caches: list[KVCache], layout: KVLayout):
        if len(caches) != layout.num_layers:
            raise ValueError(f"caches: {len(caches)} layers, layout says {layout.num_layers}")
        self.caches = caches
        self.layout = layout
        self._block_dim = 1 if layout.order == HEAD_MAJOR else 0

    @property
    def device(self) -> torch.device:
        return self.caches[0].k.device

    @property
    def num_blocks(self) -> int:
        return self.caches[0].k.shape[self._block_dim]

    def empty(self, num_layers: int, num_blocks: int) -> torch.Tensor:
        """An uninitialised staging buffer for ``num_layers`` layers of ``num_blocks`` blocks."""
        shape = self.layout.group_shape(num_layers, num_blocks)
        return torch.empty(shape, dtype=self.layout.torch_dtype, device=self.device)

    def _index(self, block_ids: Sequence[int]) -> torch.Tensor:
        bad = next((b for b in block_ids if not 0 <= b < self.num_blocks), None)
        if bad is not None:
            raise ValueError(f"block_ids: {bad} is not a block in [0, {self.num_blocks})")
        return torch.tensor(list(block_ids), dtype=torch.long, device=self.device)

    @torch.inference_mode()
    def read(self, layers: range, block_ids: Sequence[int], out: torch.Tensor) -> torch.Tensor:
        """Copy ``block_ids`` of ``layers`` into ``out`` (see :meth:`empty`); returns ``out``."""
        idx = self._index(block_ids)
        for i, layer in enumerate(layers):
            cache = self.caches[layer]
            torch.index_select(cache.k, self._block_dim, idx, out=out[i, 0])
            torch.index_select(cache.v, self._block_dim, idx, out=out[i, 1])
        return out

    @torch.inference_mode()
    def write(self, layers: range, block_ids: Sequence[int], src: torch.Tensor) -> None:
        """Copy a staging buffer in this cache's order into ``block_ids`` of ``layers``."""
        expected = self.layout.group_shape(len(layers), len(block_ids))
        if tuple(src.shape) != expected:
            raise ValueError(f"src: shape {tuple(src.shape)} does not match {expected}")
        idx = self._index(block_ids)
        src = src.to(self.device)
        for i, layer in enumerate(layers):
            cache = self.caches[layer]
            cache.k.index_copy_(self._block_dim, idx, src[i, 0])
            cache.v.index_copy_(self._block_dim, idx, src[i, 1])
