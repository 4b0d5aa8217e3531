"""KV transfer between instances of TP x PP ranks, whatever the two layouts.

Every rank of an instance holds a share of each request's KV (its stage's layers, its
KV heads) at the block ids rank 0's block manager chose, and every rank runs a plain
backend sender or receiver over its own share. A request's path:

1. Prefill rank 0's :class:`ShardedSender` describes the request with the whole model's
   KV layout, its (tp, pp) and every rank's endpoint, and publishes it on each rank
   (``SenderRanks.publish`` returns once they all hold it), before the hand-off leaves.
2. Decode rank 0's :class:`ShardedReceiver` works out, from the two layouts
   (``engine.parallel.layout.kv_transfer_plan``), which parts every decode rank needs
   from which prefill rank. It asks its other ranks to pull theirs
   (``ReceiverRanks.pull``, each running :func:`pull_parts` on that rank) while it pulls
   its own, each part through the plain receiver into a view of that rank's cache.
3. Push-style backends (torch) ask the sender to start through ``request_send``; a
   decode rank other than 0 has no route to the prefill instance, so its requests come
   back to decode rank 0 (``relay``), which forwards them with the pull's own
   ``request_send``; prefill rank 0's ``send`` then hands each to the rank named in the
   part.
4. The pull is DONE only when every part on every rank is; anything else fails it, and
   the decode side recomputes as it does for any failed pull. A remote rank's pull is
   waited for to its end (each of its waits is bounded), so no rank still writes into
   blocks the decode side has freed again.
5. Releasing retracts the request on every prefill rank (each waits out its readers)
   before rank 0 frees the blocks.

One process on both sides (tp = pp = 1) never reaches this module's code paths:
``ShardedReceiver.pull`` hands such a pull straight to the plain receiver.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from typing import Any, Protocol

from engine.config import ParallelConfig
from engine.kv_blocks import KVBlocks, KVLayout
from engine.parallel.layout import KVPull, kv_transfer_plan
from kv_transfer.base import (
    KVDescriptor,
    KVReceiver,
    KVSender,
    RequestSend,
    TransferResult,
    TransferStatus,
    _failed,
)
from kv_transfer.parts import KVPart, select

logger = logging.getLogger(__name__)


class SenderRanks(Protocol):
    """Prefill rank 0's calls to its instance's other ranks (Ray actor calls)."""

    def publish(self, desc: KVDescriptor) -> None:
        """On every other rank; returns once all hold it, raises when one cannot."""

    def retract(self, request_id: str) -> None:
        """On every other rank; returns once none still reads the blocks."""

    def send(self, rank: int, request_id: str, peer: dict[str, str]) -> None:
        """Push-style backends: start ``rank``'s send; returns at once."""


class ReceiverRanks(Protocol):
    """Decode rank 0's calls to its instance's other ranks (Ray actor calls)."""

    def pull(self, rank: int, request: dict[str, Any]) -> dict[str, Any]:
        """``rank`` runs :meth:`RankTransfer.pull`; blocks (bounded) for its result."""


def local_form(desc: KVDescriptor, blocks: KVBlocks) -> KVDescriptor:
    """What one rank publishes of a request: the same blocks in its own share's layout."""
    return replace(desc, layout=blocks.layout, parallel=(1, 1), endpoints=(), part=None)


def result_to_dict(r: TransferResult) -> dict[str, Any]:
    return {"status": r.status.value, "nbytes": r.nbytes, "seconds": r.seconds, "error": r.error}


def result_from_dict(request_id: str, d: dict[str, Any]) -> TransferResult:
    return TransferResult(
        request_id,
        TransferStatus(d["status"]),
        int(d.get("nbytes", 0)),
        float(d.get("seconds", 0.0)),
        d.get("error"),
    )


def piece(desc: KVDescriptor, pull: KVPull) -> KVDescriptor:
    """The descriptor of one part of ``desc`` (its layout is the part's)."""
    layout = replace(desc.layout, num_layers=len(pull.layers), num_kv_heads=len(pull.kv_heads))
    part = KVPart(pull.src_rank, pull.src_layers, pull.src_kv_heads)
    return replace(desc, layout=layout, parallel=(1, 1), endpoints=(), part=part)


def plan_for(desc: KVDescriptor, dst: ParallelConfig) -> list[list[KVPull]]:
    """Per destination rank, the parts it pulls; ValueError when the layouts cannot map."""
    src = ParallelConfig(tp=desc.parallel[0], pp=desc.parallel[1])
    if desc.endpoints and len(desc.endpoints) != src.world_size:
        raise ValueError(f"endpoints: {len(desc.endpoints)} for {src.world_size} sender ranks")
    return kv_transfer_plan(src, dst, desc.layout.num_layers, desc.layout.num_kv_heads)


def pull_parts(
    receiver: KVReceiver,
    desc: KVDescriptor,
    pulls: Sequence[KVPull],
    source: str,
    dst_block_ids: Sequence[int],
    request_send: RequestSend | None,
) -> TransferResult:
    """One rank's parts, in order, into its own cache share; the first failure ends it."""
    started = time.perf_counter()
    nbytes = 0
    for p in pulls:
        endpoint = desc.endpoints[p.src_rank] if desc.endpoints else source
        try:
            into = select(receiver.blocks, p.dst_layers, p.dst_kv_heads)
        except ValueError as e:
            return _failed(desc.request_id, f"plan does not fit this rank: {e}", started)
        r = receiver.pull(piece(desc, p), endpoint, dst_block_ids, request_send, into=into)
        if r.status is not TransferStatus.DONE:
            return _failed(desc.request_id, f"part from sender rank {p.src_rank}: {r.error}")
        nbytes += r.nbytes
    seconds = time.perf_counter() - started
    return TransferResult(desc.request_id, TransferStatus.DONE, nbytes, seconds)


class ShardedSender(KVSender):
    """Prefill rank 0's sender: its own share plus the other ranks', as one sender."""

    def __init__(self, local: KVSender, parallel: ParallelConfig, model_layout: KVLayout):
        """``model_layout``: the whole model's KV (all layers and KV heads) in this
        instance's order and dtype; what a receiver plans from."""
        super().__init__(local.name, local.blocks, local.config)
        self.local = local
        self.parallel = parallel
        self.model_layout = model_layout
        self.endpoints: tuple[str, ...] = ()
        self._ranks: SenderRanks | None = None

    def attach(self, ranks: SenderRanks, endpoints: Sequence[str]) -> None:
        """The other ranks, once they are started; ``endpoints`` of every rank, rank 0 first."""
        if len(endpoints) != self.parallel.world_size:
            raise ValueError(f"endpoints: {len(endpoints)} for {self.parallel.world_size} ranks")
        self._ranks, self.endpoints = ranks, tuple(endpoints)

    def start(self) -> str:
        return self.local.start()

    def describe(self, request_id: str, num_tokens: int, block_ids: Sequence[int]) -> KVDescriptor:
        p = self.parallel
        return KVDescriptor(
            request_id,
            num_tokens,
            tuple(block_ids),
            self.model_layout,
            (p.tp, p.pp),
            self.endpoints,
        )

    def publish(self, desc: KVDescriptor) -> None:
        self.local.publish(local_form(desc, self.blocks))
        if self._ranks is None:
            logger.warning("%s: publishing %s before the ranks attached", self.name, desc)
            return
        try:
            self._ranks.publish(desc)
        except Exception as e:  # that rank's parts then fail, and decode recomputes
            logger.warning("%s: publishing %s on the other ranks: %s", self.name, desc, e)

    def retract(self, request_id: str) -> None:
        try:
            if self._ranks is not None:
                self._ranks.retract(request_id)
        except Exception as e:  # a dead rank reads nothing; the instance restarts
            logger.warning("%s: retracting %s on the other ranks: %s", self.name, request_id, e)
        finally:
            self.local.retract(request_id)

    def send(self, request_id: str, peer: dict[str, str]) -> None:
        rank = KVPart.decode(peer["part"]).rank if peer.get("part") else 0
        if rank == 0:
            self.local.send(request_id, peer)
        elif self._ranks is not None and rank < self.parallel.world_size:
            self._ranks.send(rank, request_id, peer)
        else:
            logger.warning("%s: send %s to unknown rank %d dropped", self.name, request_id, rank)

    def stop(self) -> None:
        self.local.stop()


class ShardedReceiver(KVReceiver):
    """Decode rank 0's receiver: pulls the parts of every rank of its instance."""

    def __init__(self, local: KVReceiver, parallel: ParallelConfig, max_pulls: int = 16):
        super().__init__(local.name, local.blocks, local.config)
        self.local = local
        self.parallel = parallel
        self._ranks: ReceiverRanks | None = None
        self._pool: ThreadPoolExecutor | None = None
        self._max_pulls = max_pulls
        self._lock = threading.Lock()
        self._sends: dict[str, RequestSend] = {}  # request id -> its pull's request_send

    def attach(self, ranks: ReceiverRanks) -> None:
        self._ranks = ranks

    def start(self) -> str:
        if self.parallel.world_size > 1:
            self._pool = ThreadPoolExecutor(self._max_pulls, thread_name_prefix="kv-rank-pull")
        return self.local.start()

    def stop(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
        self.local.stop()

    def relay(self, request_id: str, peer: dict[str, str]) -> None:
        """Another rank's ``request_send`` for a pull running here; unknown ids are dropped
        (that rank's wait then times out and the pull fails)."""
        with self._lock:
            send = self._sends.get(request_id)
        if send is not None:
            send(request_id, peer)

    def pull(
        self,
        desc: KVDescriptor,
        source: str,
        dst_block_ids: Sequence[int],
        request_send: RequestSend | None = None,
        into: KVBlocks | None = None,
    ) -> TransferResult:
        if desc.parallel == (1, 1) and self.parallel.world_size == 1 and desc.part is None:
            return self.local.pull(desc, source, dst_block_ids, request_send, into)
        started = time.perf_counter()
        try:
            plan = plan_for(desc, self.parallel)
        except ValueError as e:
            return _failed(desc.request_id, f"layouts do not map: {e}", started)
        if self.parallel.world_size > 1 and (self._ranks is None or self._pool is None):
            return _failed(desc.request_id, "receiver: the other ranks are not attached", started)
        request = {"desc": desc.to_dict(), "source": source, "dst_block_ids": list(dst_block_ids)}
        if request_send is not None:
            with self._lock:
                self._sends[desc.request_id] = request_send
        try:
            pool = self._pool
            ranks = range(1, len(plan)) if pool is not None else range(0)
            futures = [pool.submit(self._remote, r, request) for r in ranks if pool is not None]
            own = pull_parts(self.local, desc, plan[0], source, dst_block_ids, request_send)
            results = [own] + [f.result() for f in futures]  # each bounded by its call
        finally:
            with self._lock:
                self._sends.pop(desc.request_id, None)
        failed = [r for r in results if r.status is not TransferStatus.DONE]
        if failed:
            return _failed(desc.request_id, "; ".join(str(r.error) for r in failed), started)
        nbytes = sum(r.nbytes for r in results)
        return TransferResult(
            desc.request_id, TransferStatus.DONE, nbytes, time.perf_counter() - started
        )

    def _remote(self, rank: int, request: dict[str, Any]) -> TransferResult:
        rid = str(request["desc"]["request_id"])
        assert self._ranks is not None
        try:
            return result_from_dict(rid, self._ranks.pull(rank, request))
        except Exception as e:  # the rank died or timed out: this pull fails
            return _failed(rid, f"rank {rank}: {type(e).__name__}: {e}")


class RankTransfer:
    """The transfer side of a rank other than 0: its sender or receiver, driven by rank 0
    through plain values (the rank actor forwards its calls here)."""

    def __init__(
        self,
        rank: int,
        parallel: ParallelConfig,
        sender: KVSender | None = None,
        receiver: KVReceiver | None = None,
    ):
        self.rank = rank
        self.parallel = parallel
        self.sender = sender
        self.receiver = receiver

    def start(self) -> str:
        if self.sender is not None:
            return self.sender.start()
        return self.receiver.start() if self.receiver is not None else ""

    def publish(self, desc: dict[str, Any]) -> None:
        if self.sender is not None:
            self.sender.publish(local_form(KVDescriptor.from_dict(desc), self.sender.blocks))

    def retract(self, request_id: str) -> None:
        if self.sender is not None:
            self.sender.retract(request_id)

    def send(self, request_id: str, peer: dict[str, str]) -> None:
        if self.sender is not None:
            self.sender.send(request_id, peer)

    def pull(self, request: dict[str, Any], request_send: RequestSend | None) -> dict[str, Any]:
        """This rank's parts of ``request`` (see :meth:`ShardedReceiver.pull`)."""
        started = time.perf_counter()
        try:
            desc = KVDescriptor.from_dict(request["desc"])
            pulls = plan_for(desc, self.parallel)[self.rank]
        except (KeyError, ValueError, IndexError) as e:
            return result_to_dict(_failed("?", f"rank {self.rank}: bad pull request: {e}"))
        if self.receiver is None:
            return result_to_dict(_failed(desc.request_id, f"rank {self.rank}: no receiver"))
        source, dst = str(request["source"]), [int(b) for b in request["dst_block_ids"]]
        try:
            result = pull_parts(self.receiver, desc, pulls, source, dst, request_send)
        except Exception as e:  # a backend bug must not leave rank 0 waiting
            logger.exception("rank %d: pull of %s raised", self.rank, desc.request_id)
            result = _failed(desc.request_id, f"rank {self.rank}: {e!r}", started)
        return result_to_dict(result)

    def stop(self) -> None:
        for side in (self.sender, self.receiver):
            if side is not None:
                side.stop()
