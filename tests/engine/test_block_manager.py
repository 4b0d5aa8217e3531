"""Block manager: exact block ids, reference counts, prefix hits and LRU eviction."""

from __future__ import annotations

import pytest

from engine.block_manager import BlockManager, hash_block

BS = 4


def tokens(n: int, start: int = 0) -> list[int]:
    return list(range(start, start + n))


def publish(bm: BlockManager, table: list[int], ids: list[int]) -> None:
    """Register every full block of ``ids`` as the model would after computing it."""
    parent = None
    for i in range(len(ids) // BS):
        parent = hash_block(parent, ids[i * BS : (i + 1) * BS])
        bm.register(table[i], parent)


def test_allocate_hands_out_lowest_ids_first_and_free_returns_them() -> None:
    bm = BlockManager(num_blocks=8, block_size=BS)
    assert bm.allocate(3) == [0, 1, 2]
    assert bm.allocate(2) == [3, 4]
    assert bm.num_free_blocks == 3
    bm.free([1, 0])
    assert bm.num_free_blocks == 5
    # Never-used blocks were queued first, then 1 and 0 in the order they were freed.
    assert bm.allocate(5) == [5, 6, 7, 1, 0]


def test_allocating_more_than_free_raises_and_changes_nothing() -> None:
    bm = BlockManager(num_blocks=2, block_size=BS)
    with pytest.raises(RuntimeError):
        bm.allocate(3)
    assert bm.num_free_blocks == 2


def test_double_free_is_an_error() -> None:
    bm = BlockManager(num_blocks=2, block_size=BS)
    [b] = bm.allocate(1)
    bm.free([b])
    with pytest.raises(RuntimeError):
        bm.free([b])


def test_blocks_needed_rounds_up() -> None:
    bm = BlockManager(num_blocks=2, block_size=BS)
    assert [bm.blocks_needed(n) for n in (0, 1, 4, 5, 8, 9)] == [0, 1, 1, 2, 2, 3]


def test_prefix_hit_finds_full_blocks_only() -> None:
    bm = BlockManager(num_blocks=8, block_size=BS)
    ids = tokens(10)  # two full blocks and a partial one
    table = bm.allocate(3)
    publish(bm, table, ids)
    assert bm.find_cached_prefix(ids, max_blocks=10) == [0, 1]
    assert bm.find_cached_prefix(ids[:7], max_blocks=10) == [0]
    assert bm.find_cached_prefix(ids, max_blocks=1) == [0]
    # A different first block breaks the chain even when the second block matches.
    assert bm.find_cached_prefix([99] + ids[1:], max_blocks=10) == []


def test_shared_blocks_are_reference_counted() -> None:
    bm = BlockManager(num_blocks=8, block_size=BS)
    ids = tokens(8)
    table = bm.allocate(2)
    publish(bm, table, ids)
    hit = bm.find_cached_prefix(ids, max_blocks=2)
    bm.acquire(hit)
    assert [bm.ref_count(b) for b in table] == [2, 2]
    bm.free(list(reversed(table)))
    assert bm.num_free_blocks == 6
    bm.free(list(reversed(hit)))
    assert bm.num_free_blocks == 8


def test_freed_cached_blocks_stay_findable_until_evicted_lru() -> None:
    bm = BlockManager(num_blocks=4, block_size=BS)
    a, b = tokens(4, 0), tokens(4, 100)
    ta = bm.allocate(1)
    publish(bm, ta, a)
    tb = bm.allocate(1)
    publish(bm, tb, b)
    bm.free(ta)  # freed first: evicted first
    bm.free(tb)
    assert bm.num_free_blocks == 4
    assert bm.find_cached_prefix(a, 1) == ta and bm.find_cached_prefix(b, 1) == tb
    # Blocks 2 and 3 were never used, so they go before any cached block.
    assert bm.allocate(2) == [2, 3]
    assert bm.allocate(1) == ta  # a's block is the least recently freed: evicted
    assert bm.find_cached_prefix(a, 1) == []
    assert bm.find_cached_prefix(b, 1) == tb


def test_acquiring_a_free_cached_block_takes_it_out_of_the_free_queue() -> None:
    bm = BlockManager(num_blocks=3, block_size=BS)
    ids = tokens(4)
    t = bm.allocate(1)
    publish(bm, t, ids)
    bm.free(t)
    hit = bm.find_cached_prefix(ids, 1)
    assert bm.num_free_after_acquiring(hit) == 2
    bm.acquire(hit)
    assert bm.num_free_blocks == 2
    assert bm.allocate(2) == [1, 2]  # the cached block is in use, not handed out


def test_register_keeps_the_first_block_for_a_hash() -> None:
    bm = BlockManager(num_blocks=4, block_size=BS)
    ids = tokens(4)
    t1, t2 = bm.allocate(1), bm.allocate(1)
    publish(bm, t1, ids)
    publish(bm, t2, ids)
    assert bm.find_cached_prefix(ids, 1) == t1


def test_prefix_caching_off_finds_nothing() -> None:
    bm = BlockManager(num_blocks=4, block_size=BS, enable_prefix_caching=False)
    ids = tokens(8)
    t = bm.allocate(2)
    publish(bm, t, ids)
    assert bm.find_cached_prefix(ids, 2) == []


def test_reset_prefix_cache_forgets_hashes() -> None:
    bm = BlockManager(num_blocks=4, block_size=BS)
    ids = tokens(4)
    t = bm.allocate(1)
    publish(bm, t, ids)
    bm.reset_prefix_cache()
    assert bm.find_cached_prefix(ids, 1) == []


@pytest.mark.parametrize(
    "kwargs", [{"num_blocks": 0, "block_size": 4}, {"num_blocks": 4, "block_size": 0}]
)
def test_bad_sizes_raise(kwargs: dict[str, int]) -> None:
    with pytest.raises(ValueError, match=next(k for k, v in kwargs.items() if v == 0)):
        BlockManager(**kwargs)
