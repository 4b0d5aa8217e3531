"""torch.distributed point-to-point transfer over two-rank groups made per (sender, receiver).

There is no global world: the receiver hosts a ``TCPStore`` (its endpoint,
``torch://host:port``) and each pair of instances builds its own two-rank group under a
pair key in that store (sender rank 0, receiver rank 1; gloo on CPU, NCCL on CUDA). A pull:

1. ``Receiver.pull`` takes the pair's lock (one transfer per pair at a time, so both sides
   see transfers in the same order). A pair without a group gets a fresh key
   ``kv/<receiver id>/<source>/<epoch>``.
2. It calls ``request_send(request_id, peer)`` (peer: the store address, the pair key and
   the sizes it expects); the control plane routes that to ``Sender.send``, which queues
   the job on the pair's FIFO worker thread, making that thread and its group for a new
   key and dropping the previous key's. The receiver makes its side of a new group.
3. The sender sends a header (status, request tag, sizes, chunking, checksum flag). An
   error status (request not published, sizes differ) fails the pull at once and keeps
   the pair.
4. Chunks of whole layers, about ``chunk_bytes`` each, through ``DEPTH`` buffers a side:
   the sender gathers the next chunk while earlier ones are in flight, and the receiver
   keeps the next recvs posted while it scatters one. With checksums on, each chunk is
   followed by its int64 checksum.
5. A pull of a part (some layers and KV heads of one sender rank: ``peer["part"]``) reads
   and writes through views of the two caches; everything above is the same.
6. Any other failure drops the pair's group on that side. Dropping a gloo group closes its
   connections, so the other side's next wait fails at once and drops its group too; the
   receiver's next pull uses epoch + 1, and the sender ignores jobs on dead keys.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist

from engine.kv_blocks import KVBlocks, convert, layer_groups
from kv_transfer._torch_groups import (
    DEPTH,
    Group,
    Staging,
    discard,
    make_group,
    request_tag,
    wait,
)
from kv_transfer.base import (
    KVDescriptor,
    KVReceiver,
    KVSender,
    RequestSend,
    TransferError,
    TransferResult,
    TransferStatus,
    _checksum,
    _chunk_groups,
    _failed,
    _part_of,
    _precheck,
    _Publications,
    _write,
)
from kv_transfer.config import TransferConfig
from kv_transfer.parts import KVPart

logger = logging.getLogger(__name__)

SCHEME = "torch://"
TAG_HEADER, TAG_DATA, TAG_SUM = 0, 1, 2
MAGIC = 0x4B5631  # "KV1": a header that does not start with it means the stream is out of step
OK, NOT_PUBLISHED, MISMATCH = 0, 1, 2
# header: [magic, status, request tag, nbytes, num_layers, num_blocks, layers/chunk, checksum]
HEADER_LEN = 8
_REFUSALS = {NOT_PUBLISHED: "is not published", MISMATCH: "differs from the published sizes"}
_DEAD_KEYS_KEPT = 256


class _Refused(TransferError):
    """The sender answered with an error header: the pull fails but the pair stays usable."""


@dataclass
class _SendPair:
    key: str
    store_addr: str
    jobs: queue.Queue[tuple[str, dict[str, str]] | None] = field(default_factory=queue.Queue)
    staging: Staging = field(default_factory=Staging)
    thread: threading.Thread | None = None


class Sender(KVSender):
    def __init__(self, name: str, blocks: KVBlocks, config: TransferConfig):
        super().__init__(name, blocks, config)
        self._pubs = _Publications()
        self._lock = threading.Lock()
        self._pairs: dict[str, _SendPair] = {}  # receiver's store address -> its current pair
        self._dead: dict[str, None] = {}  # pair keys that failed here, oldest first
        self._stopped = False
        self.endpoint = ""

    def start(self) -> str:
        # An identity, not an address: receivers key their pairs by it.
        self.endpoint = f"{SCHEME}{self.config.host}/{self.name}/{uuid.uuid4().hex[:8]}"
        return self.endpoint

    def publish(self, desc: KVDescriptor) -> None:
        self._pubs.publish(desc)

    def retract(self, request_id: str) -> None:
        self._pubs.retract(request_id, 2 * self.config.timeout_s)

    def send(self, request_id: str, peer: dict[str, str]) -> None:
        for k in ("store", "pair", "nbytes", "num_blocks", "checksum"):
            if k not in peer:
                raise ValueError(f"peer: missing {k!r} (has {', '.join(peer)})")
        with self._lock:
            if self._stopped:
                raise TransferError(f"sender {self.name!r} is stopped")
            if peer["pair"] in self._dead:
                logger.warning("send %s: pair %s already failed; dropped", request_id, peer["pair"])
                return
            pair = self._pairs.get(peer["store"])
            if pair is None or pair.key != peer["pair"]:
                if pair is not None:
                    pair.jobs.put(None)  # the receiver moved to a new epoch
                pair = _SendPair(peer["pair"], peer["store"])
                pair.thread = threading.Thread(
                    target=self._run, args=(pair,), name=f"kv-send-{self.name}", daemon=True
                )
                self._pairs[peer["store"]] = pair
                pair.thread.start()
            pair.jobs.put((request_id, dict(peer)))

    def stop(self) -> None:
        with self._lock:
            self._stopped = True
            pairs = list(self._pairs.values())
            self._pairs.clear()
        for pair in pairs:
            pair.jobs.put(None)
        for pair in pairs:
            if pair.thread is not None:
                pair.thread.join(timeout=self.config.timeout_s)

    def _run(self, pair: _SendPair) -> None:
        """The pair's FIFO worker: makes rank 0 of its group, then sends jobs in order."""
        timeout_s, device = self.config.timeout_s, self.blocks.device
        group: Group | None = None
        try:
            host, port = pair.store_addr.rsplit(":", 1)
            store = dist.TCPStore(host, int(port), None, False, timedelta(seconds=timeout_s))
            group = make_group(store, pair.key, 0, device, self.config.host, timeout_s)
            while (job := pair.jobs.get()) is not None:
                self._send_one(group, pair.staging, *job)
        except (RuntimeError, TransferError, ValueError) as e:
            logger.warning("kv send on pair %s failed: %s", pair.key, e)
            with self._lock:
                self._dead[pair.key] = None
                while len(self._dead) > _DEAD_KEYS_KEPT:
                    del self._dead[next(iter(self._dead))]
                if self._pairs.get(pair.store_addr) is pair:
                    del self._pairs[pair.store_addr]
        finally:
            discard(group)

    def _send_one(
        self, group: Group, staging: Staging, request_id: str, peer: dict[str, str]
    ) -> None:
        desc = self._pubs.begin_read(request_id)
        reading = [desc is not None]

        def release() -> None:  # the blocks are no longer read: retract may return
            if reading[0]:
                reading[0] = False
                self._pubs.end_read(request_id)

        try:
            blocks = self.blocks
            if desc is not None:
                try:
                    part = KVPart.decode(peer["part"]) if peer.get("part") else None
                    desc, blocks = _part_of(desc, part, blocks)
                except ValueError as e:
                    logger.warning("send %s: %s", request_id, e)
                    peer = dict(peer, nbytes="-1")  # answered as a size mismatch
            header, groups = self._header(request_id, desc, peer)
            hdr = torch.tensor(header, dtype=torch.int64, device=self.blocks.device)
            sent = group.send([hdr], 1, TAG_HEADER)  # in flight while chunk 0 is gathered
            if header[1] == OK and desc is not None:
                self._send_chunks(group, staging, desc, blocks, groups, bool(header[7]), release)
            wait(sent, self.config.timeout_s, self.blocks.device)
        finally:
            release()

    def _header(
        self, request_id: str, desc: KVDescriptor | None, peer: dict[str, str]
    ) -> tuple[list[int], list[range]]:
        """The header for this job (see HEADER_LEN) and the chunks' layer groups."""
        if desc is None:
            return [MAGIC, NOT_PUBLISHED, request_tag(request_id), 0, 0, 0, 0, 0], []
        status = OK
        if str(desc.nbytes) != peer["nbytes"] or str(desc.num_blocks) != peer["num_blocks"]:
            status = MISMATCH
        checksum = self.config.checksum or peer["checksum"] == "1"
        groups = _chunk_groups(desc.layout, desc.num_blocks, self.config.chunk_bytes)
        sizes = [desc.nbytes, desc.layout.num_layers, desc.num_blocks, len(groups[0])]
        return [MAGIC, status, request_tag(request_id), *sizes, int(checksum)], groups

    def _send_chunks(
        self,
        group: Group,
        staging: Staging,
        desc: KVDescriptor,
        blocks: KVBlocks,
        groups: list[range],
        checksum: bool,
        release: Callable[[], None],
    ) -> None:
        device, timeout_s = self.blocks.device, self.config.timeout_s
        bufs = staging.buffers(desc.layout, len(groups[0]), desc.num_blocks, device)
        sums = [torch.zeros(1, dtype=torch.int64, device=device) for _ in range(DEPTH)]
        pending: list[list[dist.Work]] = [[] for _ in range(DEPTH)]
        for i, layers in enumerate(groups):
            slot = i % DEPTH
            for work in pending[slot]:  # chunk i-DEPTH's sends: its buffer is free again
                wait(work, timeout_s, device)
            buf = blocks.read(layers, desc.block_ids, bufs[slot][: len(layers)])
            pending[slot] = [group.send([buf], 1, TAG_DATA)]
            if checksum:
                sums[slot].fill_(_checksum(buf))
                pending[slot].append(group.send([sums[slot]], 1, TAG_SUM))
        release()
        for works in pending:
            for work in works:
                wait(work, timeout_s, device)


@dataclass
class _RecvPair:
    lock: threading.Lock = field(default_factory=threading.Lock)
    epoch: int = 0
    key: str = ""
    group: Group | None = None
    staging: Staging = field(default_factory=Staging)


class Receiver(KVReceiver):
    def __init__(self, name: str, blocks: KVBlocks, config: TransferConfig):
        super().__init__(name, blocks, config)
        self._id = f"{name}-{uuid.uuid4().hex[:8]}"
        self._store: dist.TCPStore | None = None
        self._store_addr = ""
        self._lock = threading.Lock()
        self._pairs: dict[str, _RecvPair] = {}  # source endpoint -> pair

    def start(self) -> str:
        timeout = timedelta(seconds=self.config.timeout_s)
        self._store = dist.TCPStore(
            self.config.host, 0, None, True, timeout, wait_for_workers=False
        )
        self._store_addr = f"{self.config.host}:{self._store.port}"
        return SCHEME + self._store_addr

    def pull(
        self,
        desc: KVDescriptor,
        source: str,
        dst_block_ids: Sequence[int],
        request_send: RequestSend | None = None,
        into: KVBlocks | None = None,
    ) -> TransferResult:
        started = time.perf_counter()
        blocks = self.blocks if into is None else into
        reason = _precheck(desc, blocks, dst_block_ids, self.config)
        if reason is None and request_send is None:
            reason = "the torch backend pushes: pull needs request_send"
        if reason is None and self._store is None:
            reason = "receiver not started"
        if reason is not None or request_send is None:
            return _failed(desc.request_id, reason or "", started)
        with self._lock:
            pair = self._pairs.setdefault(source, _RecvPair())
        if not pair.lock.acquire(timeout=self.config.timeout_s):
            return _failed(
                desc.request_id, f"timed out queueing behind {source}'s transfers", started
            )
        try:
            self._transfer(pair, desc, source, dst_block_ids, request_send, blocks)
        except _Refused as e:
            return _failed(desc.request_id, str(e), started)
        except (RuntimeError, TransferError, ValueError) as e:
            self._drop(pair)  # the next pull makes a fresh pair under the next epoch
            return _failed(desc.request_id, f"{type(e).__name__}: {e}", started)
        finally:
            pair.lock.release()
        return TransferResult(
            desc.request_id, TransferStatus.DONE, desc.nbytes, time.perf_counter() - started
        )

    def stop(self) -> None:
        with self._lock:
            pairs = list(self._pairs.values())
            self._pairs.clear()
        for pair in pairs:
            if pair.lock.acquire(timeout=self.config.timeout_s):
                self._drop(pair)
                pair.lock.release()
        self._store = None

    def _drop(self, pair: _RecvPair) -> None:
        discard(pair.group)
        pair.group = None

    def _transfer(
        self,
        pair: _RecvPair,
        desc: KVDescriptor,
        source: str,
        dst_block_ids: Sequence[int],
        request_send: RequestSend,
        blocks: KVBlocks,
    ) -> None:
        device, timeout_s = self.blocks.device, self.config.timeout_s
        if pair.group is None:
            pair.epoch += 1
            pair.key = f"kv/{self._id}/{source}/{pair.epoch}"
        peer = {
            "store": self._store_addr,
            "pair": pair.key,
            "nbytes": str(desc.nbytes),
            "num_blocks": str(desc.num_blocks),
            "checksum": str(int(self.config.checksum)),
        }
        if desc.part is not None:
            peer["part"] = desc.part.encode()
        try:
            request_send(desc.request_id, peer)
        except Exception as e:  # the control plane's call: any failure fails this pull
            raise TransferError(f"request_send failed: {e}") from e
        if pair.group is None:
            assert self._store is not None
            pair.group = make_group(self._store, pair.key, 1, device, self.config.host, timeout_s)
        hdr = torch.zeros(HEADER_LEN, dtype=torch.int64, device=device)
        wait(pair.group.recv([hdr], 0, TAG_HEADER), timeout_s, device)
        lpc, checksum = self._check_header(hdr.tolist(), desc)
        self._recv_chunks(pair, desc, dst_block_ids, lpc, checksum, blocks)

    def _check_header(self, h: list[int], desc: KVDescriptor) -> tuple[int, bool]:
        if h[0] != MAGIC or h[2] != request_tag(desc.request_id):
            raise TransferError("header out of step with this request")
        if h[1] != OK:
            refusal = _REFUSALS.get(h[1], f"status {h[1]}")
            raise _Refused(f"sender: request {desc.request_id!r} {refusal}")
        want = [desc.nbytes, desc.layout.num_layers, desc.num_blocks]
        if h[3:6] != want or not 1 <= h[6] <= desc.layout.num_layers:
            raise TransferError(
                f"size mismatch: sender sends (nbytes, layers, blocks, layers/chunk) "
                f"{tuple(h[3:7])}, receiver expects {tuple(want)}"
            )
        return h[6], bool(h[7])

    def _recv_chunks(
        self,
        pair: _RecvPair,
        desc: KVDescriptor,
        dst_block_ids: Sequence[int],
        layers_per_chunk: int,
        checksum: bool,
        blocks: KVBlocks,
    ) -> None:
        device, timeout_s, group = self.blocks.device, self.config.timeout_s, pair.group
        assert group is not None
        groups = layer_groups(desc.layout.num_layers, layers_per_chunk)
        bufs = pair.staging.buffers(desc.layout, layers_per_chunk, desc.num_blocks, device)
        sums = [torch.zeros(1, dtype=torch.int64, device=device) for _ in range(DEPTH)]

        def post(i: int) -> tuple[torch.Tensor, list[dist.Work]]:
            buf = bufs[i % DEPTH][: len(groups[i])]
            works = [group.recv([buf], 0, TAG_DATA)]
            if checksum:
                works.append(group.recv([sums[i % DEPTH]], 0, TAG_SUM))
            return buf, works

        # DEPTH - 1 recvs stay posted while a chunk is scattered, so the sender never
        # waits for this thread to wake up and post the next one.
        pending = [post(i) for i in range(min(DEPTH - 1, len(groups)))]
        for i, layers in enumerate(groups):
            buf, works = pending.pop(0)
            for work in works:
                wait(work, timeout_s, device)
            if i + DEPTH - 1 < len(groups):
                pending.append(post(i + DEPTH - 1))
            if checksum and _checksum(buf) != int(sums[i % DEPTH].item()):
                raise TransferError(f"checksum mismatch in chunk {i} (layers {layers})")
            _write(blocks, layers, dst_block_ids, convert(buf, desc.layout, blocks.layout))
