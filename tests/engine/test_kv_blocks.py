"""Whole-block KV access: exact blocks read and written, order conversion, bad input."""

from __future__ import annotations

import pytest
import torch

from engine.attention import KVCache
from engine.kv_blocks import BLOCK_MAJOR, HEAD_MAJOR, KVBlocks, KVLayout, convert, layer_groups


def make(order: str, num_blocks: int = 6, seed: int = 0) -> KVBlocks:
    layout = KVLayout(3, 4, 2, 8, "float32", order)
    torch.manual_seed(seed)
    shape = layout.block_shape(num_blocks)
    caches = [KVCache(torch.randn(shape), torch.randn(shape)) for _ in range(3)]
    return KVBlocks(caches, layout)


def block(blocks: KVBlocks, layer: int, which: int, block_id: int) -> torch.Tensor:
    t = blocks.caches[layer].k if which == 0 else blocks.caches[layer].v
    if blocks.layout.order == HEAD_MAJOR:
        return t[:, block_id].permute(1, 0, 2)  # -> [bs, H, D]
    return t[block_id]


@pytest.mark.parametrize("dst_order", [HEAD_MAJOR, BLOCK_MAJOR])
def test_blocks_land_in_the_named_destination_blocks(dst_order: str) -> None:
    src, dst = make(HEAD_MAJOR, seed=1), make(dst_order, seed=2)
    src_ids, dst_ids = [4, 0, 2], [1, 5, 3]
    untouched = block(dst, 0, 0, 0).clone()
    for layers in layer_groups(3, 2):
        buf = src.read(layers, src_ids, src.empty(len(layers), 3))
        dst.write(layers, dst_ids, convert(buf, src.layout, dst.layout))
    for layer in range(3):
        for which in (0, 1):
            for s, d in zip(src_ids, dst_ids, strict=True):
                assert torch.equal(block(src, layer, which, s), block(dst, layer, which, d))
    assert torch.equal(block(dst, 0, 0, 0), untouched)


def test_layer_groups_cover_every_layer_once() -> None:
    assert layer_groups(5, 2) == [range(0, 2), range(2, 4), range(4, 5)]
    with pytest.raises(ValueError, match="layers_per_group"):
        layer_groups(5, 0)


def test_bad_input_names_the_field() -> None:
    blocks = make(HEAD_MAJOR)
    with pytest.raises(ValueError, match="block_ids"):
        blocks.read(range(1), [6], blocks.empty(1, 1))
    with pytest.raises(ValueError, match="src"):
        blocks.write(range(1), [0], torch.zeros(1, 2, 1))
    with pytest.raises(ValueError, match="order"):
        KVLayout(1, 1, 1, 1, "float32", "sideways")
    other = KVLayout(3, 4, 2, 16, "float32", HEAD_MAJOR)
    assert "head_dim" in (blocks.layout.compatible(other) or "")
