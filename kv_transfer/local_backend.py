"""In-process transfer: a receiver copies straight out of a sender living in the same process.

Senders register under ``local://<name>`` when started. A pull looks the sender up, checks
the request is published (and counts itself as a reader so ``retract`` waits for it),
then copies the blocks a layer group at a time through a staging buffer, converting the
cache order when the two sides differ. For one-process tests and benchmarks.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence

from engine.kv_blocks import KVBlocks, convert
from kv_transfer.base import (
    KVDescriptor,
    KVReceiver,
    KVSender,
    RequestSend,
    TransferError,
    TransferResult,
    TransferStatus,
    _chunk_groups,
    _failed,
    _part_of,
    _precheck,
    _Publications,
    _write,
)
from kv_transfer.config import TransferConfig

SCHEME = "local://"

_registry_lock = threading.Lock()
_registry: dict[str, Sender] = {}  # endpoint -> started sender


class Sender(KVSender):
    def __init__(self, name: str, blocks: KVBlocks, config: TransferConfig):
        super().__init__(name, blocks, config)
        self.endpoint = SCHEME + name
        self._pubs = _Publications()

    def start(self) -> str:
        with _registry_lock:
            other = _registry.get(self.endpoint)
            if other is not None and other is not self:
                raise TransferError(f"{self.endpoint}: another local sender is started there")
            _registry[self.endpoint] = self
        return self.endpoint

    def publish(self, desc: KVDescriptor) -> None:
        self._pubs.publish(desc)

    def retract(self, request_id: str) -> None:
        self._pubs.retract(request_id, 2 * self.config.timeout_s)

    def stop(self) -> None:
        with _registry_lock:
            if _registry.get(self.endpoint) is self:
                del _registry[self.endpoint]


class Receiver(KVReceiver):
    def start(self) -> str:
        return SCHEME + self.name

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
        if reason is not None:
            return _failed(desc.request_id, reason, started)
        with _registry_lock:
            sender = _registry.get(source)
        if sender is None:
            return _failed(desc.request_id, f"no local sender at {source!r}", started)
        published = sender._pubs.begin_read(desc.request_id)
        if published is None:
            return _failed(
                desc.request_id, f"{source}: request {desc.request_id!r} is not published", started
            )
        try:
            published, src = _part_of(published, desc.part, sender.blocks)
            if published.layout != desc.layout:
                return _failed(
                    desc.request_id,
                    f"layout mismatch: {source} publishes "
                    f"{published.layout}, the receiver expects {desc.layout}",
                    started,
                )
            if published.nbytes != desc.nbytes:
                return _failed(
                    desc.request_id,
                    f"size mismatch: {source} publishes "
                    f"{published.nbytes} bytes, the receiver expects {desc.nbytes}",
                    started,
                )
            self._copy(src, published, dst_block_ids, blocks)
        except (ValueError, RuntimeError) as e:
            return _failed(desc.request_id, f"copy failed: {e}", started)
        finally:
            sender._pubs.end_read(desc.request_id)
        return TransferResult(
            desc.request_id, TransferStatus.DONE, desc.nbytes, time.perf_counter() - started
        )

    def _copy(
        self, src: KVBlocks, desc: KVDescriptor, dst_block_ids: Sequence[int], dst: KVBlocks
    ) -> None:
        groups = _chunk_groups(desc.layout, desc.num_blocks, self.config.chunk_bytes)
        staging = src.empty(len(groups[0]), desc.num_blocks)
        for group in groups:
            buf = src.read(group, desc.block_ids, staging[: len(group)])
            _write(dst, group, dst_block_ids, convert(buf, desc.layout, dst.layout))

    def stop(self) -> None:
        pass
