"""Paged KV cache bookkeeping: which block holds which tokens. Pure Python, no torch.

A sequence owns a *block table*: the ids of the blocks holding its tokens, in order.
Blocks are shared between sequences through reference counts. With prefix caching,
each full block is identified by a hash of its tokens chained with the hash of the
block before it, so two prompts with the same first N blocks share those blocks.

Free blocks live in one queue ordered by the time they were freed. A freed block that
holds a cached prefix stays findable by its hash until the queue reaches it and hands
it out again (least recently freed first), so eviction is LRU over free blocks.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence


def hash_block(parent_hash: int | None, token_ids: Sequence[int]) -> int:
    """The identity of a full block: its tokens and everything before them."""
    return hash((parent_hash, tuple(token_ids)))


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        if num_blocks <= 0:
            raise ValueError(f"num_blocks: must be > 0, got {num_blocks}")
        if block_size <= 0:
            raise ValueError(f"block_size: must be > 0, got {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self._ref_counts = [0] * num_blocks
        self._block_hash: list[int | None] = [None] * num_blocks
        self._hash_to_block: dict[int, int] = {}
        # Insertion order is the eviction order: first in, first handed out.
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def ref_count(self, block_id: int) -> int:
        return self._ref_counts[block_id]

    def find_cached_prefix(self, token_ids: Sequence[int], max_blocks: int) -> list[int]:
        """Ids of the blocks that already hold the longest cached prefix of ``token_ids``.

        Looks only; call :meth:`acquire` on the result to take references.
        """
        if not self.enable_prefix_caching:
            return []
        found: list[int] = []
        parent: int | None = None
        bs = self.block_size
        for i in range(min(max_blocks, len(token_ids) // bs)):
            parent = hash_block(parent, token_ids[i * bs : (i + 1) * bs])
            block_id = self._hash_to_block.get(parent)
            if block_id is None:
                break
            found.append(block_id)
        return found

    def num_free_after_acquiring(self, block_ids: Sequence[int]) -> int:
        """Free blocks left once ``block_ids`` are referenced (free cached ones leave the queue)."""
        return self.num_free_blocks - sum(1 for b in block_ids if self._ref_counts[b] == 0)

    def acquire(self, block_ids: Sequence[int]) -> None:
        """Take a reference on blocks found by :meth:`find_cached_prefix`."""
        for block_id in block_ids:
            if self._ref_counts[block_id] == 0:
                del self._free[block_id]
            self._ref_counts[block_id] += 1

    def allocate(self, n: int) -> list[int]:
        """Hand out ``n`` fresh blocks, evicting the least recently freed cached ones."""
        if n > self.num_free_blocks:
            raise RuntimeError(f"asked for {n} blocks with {self.num_free_blocks} free")
        out = []
        for _ in range(n):
            block_id, _ = self._free.popitem(last=False)
            old_hash = self._block_hash[block_id]
            if old_hash is not None:
                del self._hash_to_block[old_hash]
                self._block_hash[block_id] = None
            self._ref_counts[block_id] = 1
            out.append(block_id)
        return out

    def free(self, block_ids: Sequence[int]) -> None:
        """Drop one reference from each block; the caller passes a table in reverse so
        that a sequence's tail is evicted before its (more shareable) head."""
        for block_id in block_ids:
            count = self._ref_counts[block_id]
            if count <= 0:
                raise RuntimeError(f"block {block_id} freed more times than allocated")
            self._ref_counts[block_id] = count - 1
            if count == 1:
                self._free[block_id] = None

    def register(self, block_id: int, block_hash: int) -> None:
        """Record that a full, computed block holds the tokens identified by ``block_hash``."""
        if not self.enable_prefix_caching or self._block_hash[block_id] is not None:
            return
        if block_hash in self._hash_to_block:
            return  # another block already caches these tokens; keep the first
        self._block_hash[block_id] = block_hash
        self._hash_to_block[block_hash] = block_id

    def reset_prefix_cache(self) -> None:
        for block_hash in list(self._hash_to_block):
            self._block_hash[self._hash_to_block.pop(block_hash)] = None
