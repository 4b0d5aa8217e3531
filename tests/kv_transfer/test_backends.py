"""What every backend must do: exact bytes into the right blocks, failures as results."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from engine.kv_blocks import BLOCK_MAJOR, HEAD_MAJOR
from kv_transfer import KVDescriptor, TransferResult, TransferStatus
from tests.kv_transfer.conftest import MakeLink
from tests.kv_transfer.helpers import (
    NUM_BLOCKS,
    assert_moved,
    descriptor,
    gathered,
    make_blocks,
)

# grpc hands over immutable bytes, which the receiver reads in place (torch warns, once).
pytestmark = pytest.mark.filterwarnings("ignore:The given buffer is not writable")

BACKENDS = ["local", "torch", "grpc"]
SRC_IDS = [5, 3, 9, 1, 17, 30]
FRAGMENTED = [30, 0, 12, 7, 2, 21]  # every block its own run: index_copy_ path
CONSECUTIVE = [10, 11, 12, 13, 20, 21]  # two runs: slice-copy path


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dst_ids", [FRAGMENTED, CONSECUTIVE], ids=["fragmented", "runs"])
@pytest.mark.parametrize("checksum", [False, True], ids=["plain", "checksum"])
def test_bytes_arrive_in_the_right_blocks(
    make_link: MakeLink, backend: str, dst_ids: list[int], checksum: bool
) -> None:
    # 4096-byte chunks: a layer of 6 blocks is 1536 bytes, so several chunks per pull.
    link = make_link(backend, chunk_bytes=4096, checksum=checksum)
    desc = descriptor(link.src, "r1", SRC_IDS)
    link.sender.publish(desc)
    before = link.dst.caches[0].k.clone()

    res = link.pull(desc, dst_ids)

    assert res.status is TransferStatus.DONE, res.error
    assert res.nbytes == desc.nbytes and res.seconds > 0
    assert_moved(link.src, SRC_IDS, link.dst, dst_ids)
    untouched = [b for b in range(NUM_BLOCKS) if b not in dst_ids]
    after = link.dst.caches[0].k
    assert torch.equal(after[:, untouched], before[:, untouched])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("orders", [(HEAD_MAJOR, BLOCK_MAJOR), (BLOCK_MAJOR, HEAD_MAJOR)])
def test_cache_order_is_converted(
    make_link: MakeLink, backend: str, orders: tuple[str, str]
) -> None:
    link = make_link(backend, make_blocks(orders[0], seed=2), make_blocks(orders[1], seed=None))
    desc = descriptor(link.src, "r1", SRC_IDS)
    link.sender.publish(desc)

    res = link.pull(desc, FRAGMENTED)

    assert res.status is TransferStatus.DONE, res.error
    assert_moved(link.src, SRC_IDS, link.dst, FRAGMENTED)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_layer_larger_than_a_chunk(make_link: MakeLink, backend: str) -> None:
    # 16 blocks of 512 bytes a layer: 8 KiB per layer against 4 KiB chunks.
    link = make_link(backend, chunk_bytes=4096, checksum=True)
    ids = list(range(31, 15, -1))
    desc = descriptor(link.src, "big", ids)
    link.sender.publish(desc)

    res = link.pull(desc, list(range(16)))

    assert res.status is TransferStatus.DONE, res.error
    assert_moved(link.src, ids, link.dst, list(range(16)))


@pytest.mark.parametrize("backend", BACKENDS)
def test_concurrent_pulls(make_link: MakeLink, backend: str) -> None:
    link = make_link(backend, chunk_bytes=4096)
    jobs = []
    for i in range(6):
        src_ids, dst_ids = [i, i + 8, i + 16], [3 * i, 3 * i + 1, 3 * i + 2]
        desc = descriptor(link.src, f"r{i}", src_ids)
        link.sender.publish(desc)
        jobs.append((desc, src_ids, dst_ids))
    results: dict[str, TransferResult] = {}

    def run(desc: KVDescriptor, dst_ids: list[int]) -> None:
        res = link.pull(desc, dst_ids)
        results[res.request_id] = res

    threads = [threading.Thread(target=run, args=(d, ids)) for d, _, ids in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)

    for desc, src_ids, dst_ids in jobs:
        res = results[desc.request_id]
        assert res.status is TransferStatus.DONE, res.error
        assert_moved(link.src, src_ids, link.dst, dst_ids)


@pytest.mark.parametrize("backend", BACKENDS)
def test_unknown_request_fails_fast_and_the_link_still_works(
    make_link: MakeLink, backend: str
) -> None:
    link = make_link(backend, timeout_s=20.0)
    desc = descriptor(link.src, "nobody-published-me", SRC_IDS)

    t0 = time.perf_counter()
    res = link.pull(desc, FRAGMENTED)

    assert time.perf_counter() - t0 < 5.0  # far under timeout_s
    assert res.status is TransferStatus.FAILED
    assert res.error is not None and "not published" in res.error
    assert not link.dst.caches[0].k.any()

    good = descriptor(link.src, "r1", SRC_IDS)
    link.sender.publish(good)
    assert link.pull(good, FRAGMENTED).status is TransferStatus.DONE
    assert_moved(link.src, SRC_IDS, link.dst, FRAGMENTED)


@pytest.mark.parametrize("backend", BACKENDS)
def test_layout_mismatch_fails(make_link: MakeLink, backend: str) -> None:
    link = make_link(backend, dst=make_blocks(seed=None, head_dim=16))
    desc = descriptor(link.src, "r1", SRC_IDS)
    link.sender.publish(desc)

    res = link.pull(desc, FRAGMENTED)

    assert res.status is TransferStatus.FAILED
    assert res.error is not None and "layout mismatch: head_dim" in res.error
    assert link.sends == []  # refused before asking the sender for anything


@pytest.mark.parametrize("backend", BACKENDS)
def test_sizes_are_checked_against_what_the_sender_published(
    make_link: MakeLink, backend: str
) -> None:
    link = make_link(backend)
    link.sender.publish(descriptor(link.src, "r1", SRC_IDS))
    stale = descriptor(link.src, "r1", SRC_IDS[:4])  # the receiver thinks 4 blocks

    res = link.pull(stale, FRAGMENTED[:4])

    assert res.status is TransferStatus.FAILED
    assert res.error is not None and ("size mismatch" in res.error or "differs" in res.error)
    assert not link.dst.caches[0].k.any()


@pytest.mark.parametrize("backend", BACKENDS)
def test_wrong_number_of_destination_blocks_fails(make_link: MakeLink, backend: str) -> None:
    link = make_link(backend)
    desc = descriptor(link.src, "r1", SRC_IDS)
    link.sender.publish(desc)

    res = link.pull(desc, FRAGMENTED[:2])

    assert res.status is TransferStatus.FAILED
    assert res.error is not None and "dst_block_ids" in res.error


@pytest.mark.parametrize("backend", BACKENDS)
def test_fault_injection_fails_before_any_byte_moves(make_link: MakeLink, backend: str) -> None:
    link = make_link(backend, rx_config={"fault_injection": 1.0})
    desc = descriptor(link.src, "r1", SRC_IDS)
    link.sender.publish(desc)

    results = [link.pull(desc, FRAGMENTED) for _ in range(3)]

    assert all(r.status is TransferStatus.FAILED for r in results)
    assert all(r.error == "injected fault" for r in results)
    assert link.sends == []
    assert not link.dst.caches[0].k.any()


@pytest.mark.parametrize("backend", BACKENDS)
def test_retract_after_a_pull_stops_serving(make_link: MakeLink, backend: str) -> None:
    link = make_link(backend)
    desc = descriptor(link.src, "r1", SRC_IDS)
    link.sender.publish(desc)
    assert link.pull(desc, FRAGMENTED).status is TransferStatus.DONE

    link.sender.retract("r1")
    link.sender.retract("never-published")  # ignored

    res = link.pull(desc, CONSECUTIVE)
    assert res.status is TransferStatus.FAILED
    assert res.error is not None and "not published" in res.error


@pytest.mark.parametrize("backend", BACKENDS)
def test_retract_during_a_pull_waits_for_the_reads(make_link: MakeLink, backend: str) -> None:
    """Once retract returns the caller frees (here: zeroes) the blocks; the pull must have
    read all of them before that, or fail; never a mix of old and zeroed bytes."""
    src = make_blocks(seed=3, num_blocks=256)
    dst = make_blocks(seed=None, num_blocks=256)
    link = make_link(backend, src, dst, chunk_bytes=4096)
    ids = list(range(255, -1, -1))
    desc = descriptor(src, "r1", ids)
    link.sender.publish(desc)
    expected = gathered(src, ids, HEAD_MAJOR).clone()
    result: list[TransferResult] = []
    puller = threading.Thread(target=lambda: result.append(link.pull(desc, list(range(256)))))

    puller.start()
    time.sleep(0.005)
    link.sender.retract("r1")
    for cache in src.caches:  # the blocks are freed and reused at once
        cache.k.zero_()
        cache.v.zero_()
    puller.join(timeout=30)

    res = result[0]
    if res.status is TransferStatus.DONE:
        assert torch.equal(gathered(dst, list(range(256)), HEAD_MAJOR), expected)
    else:
        assert res.error is not None and "not published" in res.error
