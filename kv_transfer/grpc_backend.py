"""KV streamed over gRPC: the receiver pulls, the sender's server streams bounded chunks.

The sender runs a ``grpc.server`` (``grpc://host:port``; TLS with client certificates when
``config.tls`` is set). A pull is one server-streaming ``Pull`` call bounded by
``timeout_s``:

1. The receiver sends the request id, the sizes it expects and its largest acceptable
   message (its ``chunk_bytes``). The sender answers NOT_FOUND for an unpublished
   request and FAILED_PRECONDITION for other sizes; the receiver turns either into a
   FAILED result.
2. The sender gathers a group of whole layers (about ``chunk_bytes``) and streams it as
   one message or, for a layer larger than that, several messages at byte offsets, each
   with an optional checksum. A helper thread gathers and encodes up to two messages
   ahead of grpc's sending; its read of the blocks ends after the last group is gathered
   or once the call ended, and ``retract`` waits for that.
   A request naming a ``part`` (some layers and KV heads of one sender rank) is served
   from a view of the cache holding just that part; the stream is the same.
3. The receiver checks each message's place (index, layers, offset, total) before using
   it, scatters a group once complete (a single-message group straight from the received
   bytes), and fails if the stream ends short.

Receivers keep one channel per sender endpoint. Chunks skip the protobuf message classes
on the data path (:func:`encode_chunk`, :func:`decode_chunk`, the same wire format): the
sender copies a staging buffer once into the encoded message, and the receiver reads the
data in place from the received bytes, where the generated classes would copy it twice
on each side.
"""

from __future__ import annotations

import contextlib
import ctypes
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import torch

from engine.kv_blocks import KVBlocks, convert
from kv_transfer.base import (
    KVDescriptor,
    KVReceiver,
    KVSender,
    RequestSend,
    TransferError,
    TransferResult,
    TransferStatus,
    _ahead,
    _checksum,
    _chunk_groups,
    _failed,
    _part_of,
    _precheck,
    _Publications,
    _write,
)
from kv_transfer.config import TLSConfig, TransferConfig
from kv_transfer.parts import KVPart
from kv_transfer.proto import kv_transfer_pb2 as pb

SCHEME = "grpc://"
_SERVICE = pb.DESCRIPTOR.services_by_name["KVTransfer"].full_name
_PULL = f"/{_SERVICE}/Pull"
_SERVER_THREADS = 16  # concurrent Pull streams one sender serves
_MESSAGE_SLACK = 64 << 10  # room for a chunk's other fields beside its data
# Received bytes are immutable; tensors made on them are only read (converted, copied).
warnings.filterwarnings("ignore", message="The given buffer is not writable", module=__name__)


def _read_tls(tls: TLSConfig) -> tuple[bytes, bytes, bytes]:
    """(certificate chain, private key, CA) as PEM bytes."""
    read = Path.read_bytes
    return read(Path(tls.cert_file)), read(Path(tls.key_file)), read(Path(tls.ca_file))


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters
_malloc_tuned = False


def _keep_freed_memory() -> None:
    """Have glibc keep freed message-sized buffers for reuse (process-wide, once).

    grpc allocates every message afresh on both sides, and glibc hands buffers this big
    back to the OS when freed, so each message page-faulted its memory in again: about a
    third of the throughput on the loopback benchmark. Buffers under 32 MiB now come from
    the heap, and up to 128 MiB of free heap top is kept. No-op off glibc."""
    global _malloc_tuned
    if _malloc_tuned:
        return
    _malloc_tuned = True
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return
    mallopt(_M_MMAP_THRESHOLD, 32 << 20)
    mallopt(_M_TRIM_THRESHOLD, 128 << 20)


def _options(chunk_bytes: int) -> list[tuple[str, int]]:
    limit = chunk_bytes + _MESSAGE_SLACK
    return [("grpc.max_send_message_length", limit), ("grpc.max_receive_message_length", limit)]


# -- KVChunk on the wire ------------------------------------------------------------------

_DATA_FIELD = pb.KVChunk.DESCRIPTOR.fields_by_name["data"].number
_INT_FIELDS = {f.number: f.name for f in pb.KVChunk.DESCRIPTOR.fields if f.name != "data"}


@dataclass
class Chunk:
    """A decoded ``KVChunk`` whose ``data`` is a view into the received bytes."""

    index: int = 0
    num_chunks: int = 0
    layer_start: int = 0
    layer_end: int = 0
    offset: int = 0
    total_bytes: int = 0
    has_checksum: int = 0
    checksum: int = 0
    data: memoryview = field(default_factory=lambda: memoryview(b""))


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def encode_chunk(head: pb.KVChunk, data: memoryview) -> bytes:
    """``head`` (a ``KVChunk`` without data) serialized, then ``data``: one copy of it."""
    key = _varint(_DATA_FIELD << 3 | 2)
    return b"".join((head.SerializeToString(), key, _varint(data.nbytes), data))


def decode_chunk(raw: bytes) -> Chunk:
    """A serialized ``KVChunk``, any field order, without copying its data."""
    chunk, pos = Chunk(), 0

    def varint() -> int:
        nonlocal pos
        value = shift = 0
        while True:
            if pos >= len(raw):
                raise ValueError("KVChunk: truncated message")
            byte = raw[pos]
            pos += 1
            value |= (byte & 0x7F) << shift
            shift += 7
            if byte < 0x80:
                return value

    while pos < len(raw):
        key = varint()
        number, wire = key >> 3, key & 7
        if wire == 0:
            value = varint()
            if number in _INT_FIELDS:  # int64 negatives arrive as 64-bit two's complement
                setattr(chunk, _INT_FIELDS[number], value - (1 << 64) if value >> 63 else value)
        elif wire == 2:
            size = varint()
            if number == _DATA_FIELD:
                chunk.data = memoryview(raw)[pos : pos + size]
            pos += size
        elif wire in (1, 5):  # fixed-width fields of a newer schema: skipped
            pos += 8 if wire == 1 else 4
        else:
            raise ValueError(f"KVChunk: wire type {wire} of field {number} is not supported")
    if pos != len(raw):
        raise ValueError("KVChunk: truncated message")
    return chunk


class Sender(KVSender):
    def __init__(self, name: str, blocks: KVBlocks, config: TransferConfig):
        super().__init__(name, blocks, config)
        self._pubs = _Publications()
        self._server: grpc.Server | None = None

    def start(self) -> str:
        _keep_freed_memory()
        server = grpc.server(
            futures.ThreadPoolExecutor(_SERVER_THREADS, thread_name_prefix=f"kv-grpc-{self.name}"),
            options=_options(self.config.chunk_bytes),
        )
        pull = grpc.unary_stream_rpc_method_handler(
            self._pull,
            request_deserializer=pb.PullRequest.FromString,
            response_serializer=lambda encoded: encoded,  # chunks are encoded by _chunks
        )
        server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(_SERVICE, {"Pull": pull}),)
        )
        address = f"{self.config.host}:0"
        if self.config.tls is None:
            port = server.add_insecure_port(address)
        else:
            cert, key, ca = _read_tls(self.config.tls)
            creds = grpc.ssl_server_credentials(
                [(key, cert)], root_certificates=ca, require_client_auth=True
            )
            port = server.add_secure_port(address, creds)
        if port == 0:
            raise TransferError(f"host: cannot listen on {address}")
        server.start()
        self._server = server
        return f"{SCHEME}{self.config.host}:{port}"

    def publish(self, desc: KVDescriptor) -> None:
        self._pubs.publish(desc)

    def retract(self, request_id: str) -> None:
        self._pubs.retract(request_id, 2 * self.config.timeout_s)

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop(grace=1.0).wait(self.config.timeout_s)
            self._server = None

    def _pull(self, request: pb.PullRequest, context: grpc.ServicerContext) -> Iterator[bytes]:
        rid = request.request_id
        desc = self._pubs.begin_read(rid)
        if desc is None:
            context.abort(grpc.StatusCode.NOT_FOUND, f"request {rid!r} is not published")
        assert desc is not None
        try:
            part = KVPart.from_list(list(request.part)) if request.part else None
            desc, blocks = _part_of(desc, part, self.blocks)
        except ValueError as e:
            self._pubs.end_read(rid)
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"request {rid!r}: {e}")
        if request.nbytes != desc.nbytes or request.num_blocks != desc.num_blocks:
            self._pubs.end_read(rid)
            context.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"size mismatch: request {rid!r} is published with {desc.nbytes} bytes in "
                f"{desc.num_blocks} blocks, the receiver expects {request.nbytes} bytes "
                f"in {request.num_blocks}",
            )
        lock, reading = threading.Lock(), [True]

        def release() -> None:  # once: after the last gather, or when the gathering stops
            with lock:
                if reading[0]:
                    reading[0] = False
                    self._pubs.end_read(rid)

        limit = self.config.chunk_bytes
        if request.max_chunk_bytes:
            limit = min(limit, request.max_chunk_bytes)
        checksum = request.checksum or self.config.checksum
        chunks = self._chunks(desc, blocks, limit, checksum, release)
        stop = threading.Event()
        context.add_callback(stop.set)  # the call ended: done, cancelled or past its deadline
        # A helper thread gathers and encodes the next chunk while grpc sends this one.
        name = f"kv-grpc-gather-{self.name}"
        yield from _ahead(chunks, 2, self.config.timeout_s, name, stop, on_exit=release)

    def _chunks(
        self,
        desc: KVDescriptor,
        blocks: KVBlocks,
        limit: int,
        checksum: bool,
        release: Callable[[], None],
    ) -> Iterator[bytes]:
        piece = max(4, limit - limit % 64)  # keep pieces int32-aligned for the checksum
        groups = _chunk_groups(desc.layout, desc.num_blocks, piece)
        staging = blocks.empty(len(groups[0]), desc.num_blocks)
        per_layer = desc.layout.bytes_per_layer(desc.num_blocks)
        num_chunks = sum(-(-len(g) * per_layer // piece) for g in groups)
        index = 0
        for gi, layers in enumerate(groups):
            buf = blocks.read(layers, desc.block_ids, staging[: len(layers)])
            if gi == len(groups) - 1:
                release()
            flat = buf.reshape(-1).view(torch.uint8).cpu()
            for offset in range(0, flat.numel(), piece):
                part = flat[offset : offset + piece]
                head = pb.KVChunk(
                    index=index,
                    num_chunks=num_chunks,
                    layer_start=layers.start,
                    layer_end=layers.stop,
                    offset=offset,
                    total_bytes=desc.nbytes,
                    has_checksum=checksum,
                    checksum=_checksum(part) if checksum else 0,
                )
                yield encode_chunk(head, part.numpy().data)
                index += 1


class Receiver(KVReceiver):
    def __init__(self, name: str, blocks: KVBlocks, config: TransferConfig):
        super().__init__(name, blocks, config)
        self._lock = threading.Lock()
        self._channels: dict[str, tuple[grpc.Channel, grpc.UnaryStreamMultiCallable]] = {}
        self._creds: grpc.ChannelCredentials | None = None

    def start(self) -> str:
        _keep_freed_memory()
        if self.config.tls is not None:
            cert, key, ca = _read_tls(self.config.tls)
            self._creds = grpc.ssl_channel_credentials(
                root_certificates=ca, private_key=key, certificate_chain=cert
            )
        return f"{SCHEME}{self.config.host}/{self.name}"  # pull-only: nothing listens here

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
        if reason is None and not source.startswith(SCHEME):
            reason = f"source: not a {SCHEME} endpoint: {source!r}"
        if reason is not None:
            return _failed(desc.request_id, reason, started)
        request = pb.PullRequest(
            request_id=desc.request_id,
            nbytes=desc.nbytes,
            num_blocks=desc.num_blocks,
            checksum=self.config.checksum,
            max_chunk_bytes=self.config.chunk_bytes,
            part=[] if desc.part is None else desc.part.to_list(),
        )
        stream = self._pull_call(source)(request, timeout=self.config.timeout_s)
        try:
            self._receive(stream, desc, dst_block_ids, blocks)
        except grpc.RpcError as e:
            code = e.code() if isinstance(e, grpc.Call) else None
            details = e.details() if isinstance(e, grpc.Call) else str(e)
            name = code.name if code is not None else "UNKNOWN"
            return _failed(desc.request_id, f"{source}: {name}: {details}", started)
        except (TransferError, ValueError, RuntimeError) as e:
            stream.cancel()
            return _failed(desc.request_id, f"{type(e).__name__}: {e}", started)
        return TransferResult(
            desc.request_id, TransferStatus.DONE, desc.nbytes, time.perf_counter() - started
        )

    def stop(self) -> None:
        with self._lock:
            channels = list(self._channels.values())
            self._channels.clear()
        for channel, _ in channels:
            channel.close()

    def _pull_call(self, source: str) -> grpc.UnaryStreamMultiCallable:
        with self._lock:
            if source not in self._channels:
                target = source[len(SCHEME) :]
                options = _options(self.config.chunk_bytes)
                channel = (
                    grpc.insecure_channel(target, options)
                    if self._creds is None
                    else grpc.secure_channel(target, self._creds, options)
                )
                call = channel.unary_stream(
                    _PULL,
                    request_serializer=pb.PullRequest.SerializeToString,
                    response_deserializer=decode_chunk,
                )
                self._channels[source] = (channel, call)
            return self._channels[source][1]

    def _receive(
        self,
        stream: Iterator[Chunk],
        desc: KVDescriptor,
        dst_block_ids: Sequence[int],
        blocks: KVBlocks,
    ) -> None:
        # A helper thread takes the next chunk off the stream while this one is scattered.
        chunks = _ahead(stream, 2, self.config.timeout_s, f"kv-grpc-recv-{self.name}")
        with contextlib.closing(chunks):
            self._scatter(chunks, desc, dst_block_ids, blocks)

    def _scatter(
        self,
        chunks: Iterator[Chunk],
        desc: KVDescriptor,
        dst_block_ids: Sequence[int],
        blocks: KVBlocks,
    ) -> None:
        lay, nb = desc.layout, desc.num_blocks
        per_layer = lay.bytes_per_layer(nb)
        next_layer, filled, staging = 0, 0, torch.empty(0, dtype=torch.uint8)
        index, msg = -1, Chunk()  # for an empty stream
        for index, msg in enumerate(chunks):
            layers = range(msg.layer_start, msg.layer_end)
            group_bytes = len(layers) * per_layer
            data = msg.data
            place = (msg.index, msg.total_bytes, msg.layer_start, msg.offset)
            if place != (index, desc.nbytes, next_layer, filled) or not (
                0 < len(data) <= group_bytes - filled and msg.layer_end <= lay.num_layers
            ):
                raise TransferError(
                    f"size mismatch: chunk (index, total, first layer, offset, layers, bytes) "
                    f"{(*place, len(layers), len(data))}; expected "
                    f"{(index, desc.nbytes, next_layer, filled)} within {lay.num_layers} layers"
                )
            piece = torch.frombuffer(data, dtype=torch.uint8)
            if msg.has_checksum and _checksum(piece) != msg.checksum:
                raise TransferError(f"checksum mismatch in chunk {index} (layers {layers})")
            if len(data) == group_bytes:
                buf = piece  # the whole group in one message: no staging copy
            else:
                if filled == 0:
                    staging = torch.empty(group_bytes, dtype=torch.uint8)
                staging[filled : filled + len(data)].copy_(piece)
                buf = staging
            filled += len(data)
            if filled == group_bytes:
                group = buf.view(lay.torch_dtype).view(lay.group_shape(len(layers), nb))
                _write(blocks, layers, dst_block_ids, convert(group, lay, blocks.layout))
                next_layer, filled = msg.layer_end, 0
        if next_layer != lay.num_layers or filled or index + 1 != msg.num_chunks:
            raise TransferError(f"stream ended at layer {next_layer} of {lay.num_layers}")
