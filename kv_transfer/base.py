"""The transfer interface: a sender on the prefill side, a receiver on the decode side.

A prefill instance *publishes* a request's KV (a :class:`KVDescriptor` naming its blocks)
while the request's lease holds those blocks, and *retracts* it when the lease ends. A
decode instance *pulls* a descriptor's blocks into blocks it has reserved. Pull-style
backends (grpc, local) serve the pull from the sender directly; push-style backends
(torch) need the sender told to start, which the receiver asks for through the
``request_send`` callback that the control plane (Ray actor calls) provides. Every wait
has a timeout; a pull returns a :class:`TransferResult` rather than raising, so the
decode side can fall back to recomputing the prompt.

A descriptor may name a :class:`~kv_transfer.parts.KVPart` (some layers and KV heads of
one sender rank): every backend serves and writes parts through views of the caches, so
instances of different TP x PP layouts exchange KV part by part (``kv_transfer.sharded``).
"""

from __future__ import annotations

import enum
import queue
import random
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Generator, Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar

import torch

from engine.kv_blocks import HEAD_MAJOR, KVBlocks, KVLayout, layer_groups
from kv_transfer.config import TransferConfig
from kv_transfer.parts import KVPart, select


class TransferStatus(enum.Enum):
    WAITING = "waiting"
    TRANSFERRING = "transferring"
    DONE = "done"
    FAILED = "failed"


class TransferError(RuntimeError):
    """A transfer that cannot complete: unknown request, size mismatch, timeout, fault."""


@dataclass(frozen=True)
class KVDescriptor:
    """What a receiver needs to pull one request's KV: the sender's blocks and layout.

    From a TP x PP sender, ``layout`` is the whole model's KV (every layer and KV head, in
    the sender's order and dtype), ``parallel`` its (tp, pp) and ``endpoints`` each of its
    ranks' endpoints, rank 0 first; the receiver works out which rank holds what. A
    descriptor with a ``part`` asks for that part only, and its ``layout`` is the part's.
    """

    request_id: str
    num_tokens: int  # tokens whose KV the blocks hold
    block_ids: tuple[int, ...]  # on the sender; every rank of an instance shares block ids
    layout: KVLayout  # the sender's (see above)
    parallel: tuple[int, int] = (1, 1)  # the sender's (tp, pp)
    endpoints: tuple[str, ...] = ()  # per sender rank; () for one rank: the hand-off's
    part: KVPart | None = None

    @property
    def num_blocks(self) -> int:
        return len(self.block_ids)

    @property
    def nbytes(self) -> int:
        return self.layout.num_layers * self.layout.bytes_per_layer(self.num_blocks)

    def to_dict(self) -> dict[str, object]:
        """Plain values only, for msgpack frames and actor calls."""
        lay = self.layout
        return {
            "request_id": self.request_id,
            "num_tokens": self.num_tokens,
            "block_ids": list(self.block_ids),
            "layout": {
                "num_layers": lay.num_layers,
                "block_size": lay.block_size,
                "num_kv_heads": lay.num_kv_heads,
                "head_dim": lay.head_dim,
                "dtype": lay.dtype,
                "order": lay.order,
            },
            "parallel": list(self.parallel),
            "endpoints": list(self.endpoints),
            "part": None if self.part is None else self.part.to_list(),
        }

    @classmethod
    def from_dict(cls, d: dict[str, object]) -> KVDescriptor:
        layout = d["layout"]
        if not isinstance(layout, dict):
            raise ValueError("layout: must be a mapping")
        block_ids = d["block_ids"]
        if not isinstance(block_ids, (list, tuple)):
            raise ValueError("block_ids: must be a list")
        parallel = d.get("parallel", (1, 1))
        endpoints = d.get("endpoints", ())
        if not isinstance(parallel, (list, tuple)) or len(parallel) != 2:
            raise ValueError(f"parallel: must be [tp, pp], got {parallel!r}")
        if not isinstance(endpoints, (list, tuple)):
            raise ValueError("endpoints: must be a list")
        part = d.get("part")
        return cls(
            request_id=str(d["request_id"]),
            num_tokens=int(d["num_tokens"]),  # type: ignore[call-overload]
            block_ids=tuple(int(b) for b in block_ids),
            layout=KVLayout(**layout),
            parallel=(int(parallel[0]), int(parallel[1])),
            endpoints=tuple(str(e) for e in endpoints),
            part=None if part is None else KVPart.from_list(part),
        )


@dataclass
class TransferResult:
    request_id: str
    status: TransferStatus
    nbytes: int = 0
    seconds: float = 0.0
    error: str | None = None


# The receiver's way to ask the sender to start pushing: (request_id, peer info) -> None.
# The peer info holds plain strings only (addresses, pair keys).
RequestSend = Callable[[str, dict[str, str]], None]


@dataclass
class TransferCounters:
    started: int = 0
    done: int = 0
    failed: int = 0
    bytes: int = 0
    seconds: float = 0.0
    errors: list[str] = field(default_factory=list)


class KVSender(ABC):
    """Prefill side: serves the blocks of published requests."""

    def __init__(self, name: str, blocks: KVBlocks, config: TransferConfig):
        self.name = name
        self.blocks = blocks
        self.config = config

    @abstractmethod
    def start(self) -> str:
        """Open whatever the backend listens on; returns the endpoint receivers pull from."""

    def describe(self, request_id: str, num_tokens: int, block_ids: Sequence[int]) -> KVDescriptor:
        """The descriptor a hand-off carries for these blocks of this sender's cache."""
        return KVDescriptor(request_id, num_tokens, tuple(block_ids), self.blocks.layout)

    @abstractmethod
    def publish(self, desc: KVDescriptor) -> None:
        """Make ``desc``'s blocks pullable; the caller keeps them allocated until retracted."""

    @abstractmethod
    def retract(self, request_id: str) -> None:
        """Stop serving a request (pulled, lease expired or aborted); unknown ids are ignored.

        Returns once no transfer of the request is still reading its blocks, so the
        caller may free them."""

    def send(self, request_id: str, peer: dict[str, str]) -> None:
        """Push-style backends: start sending to ``peer``; returns at once."""
        raise TransferError(f"backend of {self.name!r} does not push")

    @abstractmethod
    def stop(self) -> None: ...


class KVReceiver(ABC):
    """Decode side: pulls published blocks into reserved local blocks."""

    def __init__(self, name: str, blocks: KVBlocks, config: TransferConfig):
        self.name = name
        self.blocks = blocks
        self.config = config

    @abstractmethod
    def start(self) -> str:
        """Open whatever the backend listens on; returns this receiver's endpoint."""

    @abstractmethod
    def pull(
        self,
        desc: KVDescriptor,
        source: str,
        dst_block_ids: Sequence[int],
        request_send: RequestSend | None = None,
        into: KVBlocks | None = None,
    ) -> TransferResult:
        """Copy ``desc``'s blocks from the sender at ``source`` into ``dst_block_ids``.

        ``into``: where to write (default: the receiver's whole cache); a view of part of
        it (``kv_transfer.parts.select``) when ``desc`` names a part. Blocks until done,
        failed, or ``config.timeout_s``; never raises for transfer failures. Safe to call
        from several threads at once."""

    @abstractmethod
    def stop(self) -> None: ...


# -- Private helpers shared by the backends. -------------------------------------------


def _failed(request_id: str, error: str, started: float | None = None) -> TransferResult:
    seconds = 0.0 if started is None else time.perf_counter() - started
    return TransferResult(request_id, TransferStatus.FAILED, seconds=seconds, error=error)


def _precheck(
    desc: KVDescriptor, blocks: KVBlocks, dst_block_ids: Sequence[int], config: TransferConfig
) -> str | None:
    """Why a pull must fail before any byte moves (injected fault, layout, sizes), or None."""
    # random() < 1.0 always holds, so fault_injection=1.0 fails every pull.
    if config.fault_injection > 0 and random.random() < config.fault_injection:
        return "injected fault"
    reason = blocks.layout.compatible(desc.layout)
    if reason is not None:
        return f"layout mismatch: {reason}"
    if len(dst_block_ids) != desc.num_blocks:
        return f"dst_block_ids: {len(dst_block_ids)} blocks for {desc.num_blocks} source blocks"
    bad = next((b for b in dst_block_ids if not 0 <= b < blocks.num_blocks), None)
    if bad is not None:
        return f"dst_block_ids: {bad} is not a block in [0, {blocks.num_blocks})"
    return None


def _part_of(
    published: KVDescriptor, part: KVPart | None, blocks: KVBlocks
) -> tuple[KVDescriptor, KVBlocks]:
    """What a sender serves for a pull of ``part`` of a published request: the part's
    descriptor and a view of its blocks. ValueError when the part is not in the cache."""
    if part is None:
        return published, blocks
    view = select(blocks, part.layers, part.heads)
    return replace(published, layout=view.layout, part=part), view


def _checksum(buf: torch.Tensor) -> int:
    """Sum of a contiguous buffer's bytes read as int32 (every staging buffer is 4-aligned)."""
    return int(buf.reshape(-1).view(torch.int32).sum(dtype=torch.int64))


class _Publications:
    """A sender's published descriptors and how many transfers are reading each one's blocks.

    ``retract`` must not return while a transfer still gathers a request's blocks (the
    caller frees them next), so readers register with ``begin_read``/``end_read``."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._descs: dict[str, KVDescriptor] = {}
        self._readers: dict[str, int] = {}

    def publish(self, desc: KVDescriptor) -> None:
        with self._cond:
            self._descs[desc.request_id] = desc

    def begin_read(self, request_id: str) -> KVDescriptor | None:
        """The request's descriptor, counted as read until ``end_read``; None if unpublished."""
        with self._cond:
            desc = self._descs.get(request_id)
            if desc is not None:
                self._readers[request_id] = self._readers.get(request_id, 0) + 1
            return desc

    def end_read(self, request_id: str) -> None:
        with self._cond:
            left = self._readers.get(request_id, 0) - 1
            if left > 0:
                self._readers[request_id] = left
            else:
                self._readers.pop(request_id, None)
                self._cond.notify_all()

    def retract(self, request_id: str, timeout_s: float) -> None:
        with self._cond:
            self._descs.pop(request_id, None)
            # A stuck transfer fails its next wait (each bounded by the config's timeout_s)
            # and ends its read, so callers pass a multiple of that.
            if not self._cond.wait_for(lambda: request_id not in self._readers, timeout_s):
                raise TransferError(
                    f"retract {request_id!r}: a transfer still reads its blocks after "
                    f"{timeout_s:.1f}s"
                )


def _chunk_groups(layout: KVLayout, num_blocks: int, chunk_bytes: int) -> list[range]:
    """Layer groups of about ``chunk_bytes`` each (at least one layer): the unit of sending."""
    per_layer = max(1, layout.bytes_per_layer(num_blocks))
    return layer_groups(layout.num_layers, max(1, chunk_bytes // per_layer))


def _runs(block_ids: Sequence[int]) -> list[tuple[int, int, int]]:
    """Maximal runs of consecutive ids: (position in block_ids, first id, length)."""
    runs: list[tuple[int, int, int]] = []
    start = 0
    for i in range(1, len(block_ids) + 1):
        if i == len(block_ids) or block_ids[i] != block_ids[i - 1] + 1:
            runs.append((start, block_ids[start], i - start))
            start = i
    return runs


# Above this many runs per block, index_copy_ is as fast as one slice copy per run.
_MAX_RUNS_SHARE = 0.25


@torch.inference_mode()
def _write(blocks: KVBlocks, layers: range, block_ids: Sequence[int], src: torch.Tensor) -> None:
    """``blocks.write``, but as slice copies when ``block_ids`` form few runs of consecutive ids.

    CPU ``index_copy_`` moves element by element (about 5x slower than a slice ``copy_``
    here), which made scattering the slowest step of a transfer; freshly reserved blocks
    mostly come in runs. (A candidate for ``KVBlocks.write`` itself.)"""
    runs = _runs(block_ids)
    expected = blocks.layout.group_shape(len(layers), len(block_ids))
    if len(runs) > max(1, int(_MAX_RUNS_SHARE * len(block_ids))) or tuple(src.shape) != expected:
        blocks.write(layers, block_ids, src)  # validates, and handles fragmented ids
        return
    if block_ids and not 0 <= min(block_ids) <= max(block_ids) < blocks.num_blocks:
        raise ValueError(f"block_ids: outside [0, {blocks.num_blocks})")
    src = src.to(blocks.device)
    dim = 1 if blocks.layout.order == HEAD_MAJOR else 0
    for i, layer in enumerate(layers):
        cache = blocks.caches[layer]
        for kv, dst in enumerate((cache.k, cache.v)):
            for pos, first, n in runs:
                dst.narrow(dim, first, n).copy_(src[i, kv].narrow(dim, pos, n))


_T = TypeVar("_T")


def _ahead(
    items: Iterator[_T],
    depth: int,
    timeout_s: float,
    name: str,
    stop: threading.Event | None = None,
    on_exit: Callable[[], None] | None = None,
) -> Generator[_T, None, None]:
    """``items`` run by a helper thread up to ``depth`` items ahead of the consumer.

    Overlaps producing (gathering, receiving) with consuming (sending, scattering). Closing
    the returned generator, or setting ``stop``, ends the helper at its next item; it then
    closes ``items`` and calls ``on_exit``, on its own thread."""
    slots: queue.Queue[tuple[int, Any]] = queue.Queue(depth)
    stop = stop or threading.Event()

    def put(kind: int, value: Any) -> bool:
        while not stop.is_set():
            try:
                slots.put((kind, value), timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in items:
                if not put(0, item):
                    return
            put(1, None)
        except Exception as e:  # handed to the consumer, which raises it
            put(2, e)
        finally:
            close = getattr(items, "close", None)
            if close is not None:
                close()
            if on_exit is not None:
                on_exit()

    threading.Thread(target=produce, name=name, daemon=True).start()
    try:
        while True:
            try:
                kind, value = slots.get(timeout=timeout_s)
            except queue.Empty:
                raise TransferError(f"{name}: nothing produced in {timeout_s:.1f}s") from None
            if kind == 1:
                return
            if kind == 2:
                raise value
            yield value
    finally:
        stop.set()
