"""Small KV caches with random contents, and the checks the backend tests share."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from engine.attention import KVCache
from engine.kv_blocks import HEAD_MAJOR, KVBlocks, KVLayout, convert
from kv_transfer import KVDescriptor

NUM_LAYERS, NUM_KV_HEADS, HEAD_DIM, BLOCK_SIZE, NUM_BLOCKS = 4, 2, 8, 4, 32


def make_blocks(
    order: str = HEAD_MAJOR,
    seed: int | None = 0,
    num_blocks: int = NUM_BLOCKS,
    dtype: str = "float32",
    num_layers: int = NUM_LAYERS,
    head_dim: int = HEAD_DIM,
) -> KVBlocks:
    """Caches of ``num_layers`` layers filled from ``seed`` (zeros when ``seed`` is None)."""
    layout = KVLayout(num_layers, BLOCK_SIZE, NUM_KV_HEADS, head_dim, dtype, order)
    shape = layout.block_shape(num_blocks)
    gen = torch.Generator().manual_seed(seed or 0)

    def tensor() -> torch.Tensor:
        if seed is None:
            return torch.zeros(shape, dtype=layout.torch_dtype)
        return torch.randn(shape, generator=gen).to(layout.torch_dtype)

    return KVBlocks([KVCache(tensor(), tensor()) for _ in range(num_layers)], layout)


def descriptor(blocks: KVBlocks, request_id: str, block_ids: Sequence[int]) -> KVDescriptor:
    return KVDescriptor(
        request_id, len(block_ids) * blocks.layout.block_size, tuple(block_ids), blocks.layout
    )


def gathered(blocks: KVBlocks, block_ids: Sequence[int], order: str) -> torch.Tensor:
    """Every layer's ``block_ids`` in ``order``: [layers, 2, *block_shape]."""
    lay = blocks.layout
    out = blocks.empty(lay.num_layers, len(block_ids))
    blocks.read(range(lay.num_layers), block_ids, out)
    dst = KVLayout(lay.num_layers, lay.block_size, lay.num_kv_heads, lay.head_dim, lay.dtype, order)
    return convert(out, lay, dst)


def assert_moved(
    src: KVBlocks, src_ids: Sequence[int], dst: KVBlocks, dst_ids: Sequence[int]
) -> None:
    """The bytes of ``src_ids`` sit exactly in ``dst_ids`` (compared in dst's order)."""
    want = gathered(src, src_ids, dst.layout.order)
    got = gathered(dst, dst_ids, dst.layout.order)
    assert torch.equal(want.view(torch.uint8), got.view(torch.uint8))
