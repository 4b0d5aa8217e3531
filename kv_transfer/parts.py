"""A part of a cache: some layers and KV heads of one sender rank, and views onto it.

Instances of different TP x PP layouts hold different slices of every request's KV: a
pipeline stage holds a run of layers, a TP rank a run of KV heads. A transfer between
them moves *parts*, each one contiguous run of layers x one contiguous run of heads
(``engine.parallel.layout.kv_transfer_plan`` says which), so both sides only need a
view of their cache restricted to a part. The backends read and write through such a
view exactly as through the whole cache; a part therefore costs no new code path in
them, only the part's name on the wire.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from engine.attention import KVCache
from engine.kv_blocks import HEAD_MAJOR, KVBlocks


@dataclass(frozen=True)
class KVPart:
    """Layers and KV heads of sender rank ``rank``'s cache, in that cache's own indices."""

    rank: int
    layers: range
    heads: range

    def to_list(self) -> list[int]:
        """Plain ints for the wire: [rank, first layer, end layer, first head, end head]."""
        r, layers, heads = self.rank, self.layers, self.heads
        return [r, layers.start, layers.stop, heads.start, heads.stop]

    @classmethod
    def from_list(cls, values: object) -> KVPart:
        if not isinstance(values, (list, tuple)) or len(values) != 5:
            raise ValueError(f"part: must be 5 ints [rank, l0, l1, h0, h1], got {values!r}")
        rank, l0, l1, h0, h1 = (int(v) for v in values)
        if rank < 0 or not 0 <= l0 < l1 or not 0 <= h0 < h1:
            raise ValueError(f"part: empty or negative ranges in {list(values)!r}")
        return cls(rank, range(l0, l1), range(h0, h1))

    def encode(self) -> str:
        """The part as one string (the torch backend's peer info holds strings only)."""
        return ",".join(str(v) for v in self.to_list())

    @classmethod
    def decode(cls, text: str) -> KVPart:
        try:
            return cls.from_list([int(v) for v in text.split(",")])
        except ValueError as e:
            raise ValueError(f"part: cannot read {text!r}: {e}") from None


def select(blocks: KVBlocks, layers: range, heads: range) -> KVBlocks:
    """A view of ``blocks`` holding only ``layers`` x ``heads`` (no copy).

    Writes through the view land in the cache. Head-major caches keep a contiguous view
    (heads are the outer dimension); block-major ones get a strided one, which
    ``index_select`` and ``index_copy_`` handle as well. ValueError when the part is not
    inside the cache."""
    lay = blocks.layout
    if not (0 <= layers.start < layers.stop <= lay.num_layers):
        raise ValueError(f"part: layers {layers} are not within the cache's {lay.num_layers}")
    if not (0 <= heads.start < heads.stop <= lay.num_kv_heads):
        raise ValueError(f"part: KV heads {heads} are not within the cache's {lay.num_kv_heads}")
    if len(layers) == lay.num_layers and len(heads) == lay.num_kv_heads:
        return blocks
    dim = 0 if lay.order == HEAD_MAJOR else 2
    caches = [
        KVCache(
            k=c.k.narrow(dim, heads.start, len(heads)), v=c.v.narrow(dim, heads.start, len(heads))
        )
        for c in blocks.caches[layers.start : layers.stop]
    ]
    return KVBlocks(caches, replace(lay, num_layers=len(layers), num_kv_heads=len(heads)))
