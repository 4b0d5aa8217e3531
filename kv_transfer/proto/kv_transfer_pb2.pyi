from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable
from typing import ClassVar as _ClassVar, Optional as _Optional

DESCRIPTOR: _descriptor.FileDescriptor

class PullRequest(_message.Message):
    __slots__ = ("request_id", "nbytes", "num_blocks", "checksum", "max_chunk_bytes", "part")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    NBYTES_FIELD_NUMBER: _ClassVar[int]
    NUM_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    CHECKSUM_FIELD_NUMBER: _ClassVar[int]
    MAX_CHUNK_BYTES_FIELD_NUMBER: _ClassVar[int]
    PART_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    nbytes: int
    num_blocks: int
    checksum: bool
    max_chunk_bytes: int
    part: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, request_id: _Optional[str] = ..., nbytes: _Optional[int] = ..., num_blocks: _Optional[int] = ..., checksum: _Optional[bool] = ..., max_chunk_bytes: _Optional[int] = ..., part: _Optional[_Iterable[int]] = ...) -> None: ...

class KVChunk(_message.Message):
    __slots__ = ("index", "num_chunks", "layer_start", "layer_end", "offset", "total_bytes", "has_checksum", "checksum", "data")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    NUM_CHUNKS_FIELD_NUMBER: _ClassVar[int]
    LAYER_START_FIELD_NUMBER: _ClassVar[int]
    LAYER_END_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    HAS_CHECKSUM_FIELD_NUMBER: _ClassVar[int]
    CHECKSUM_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    index: int
    num_chunks: int
    layer_start: int
    layer_end: int
    offset: int
    total_bytes: int
    has_checksum: bool
    checksum: int
    data: bytes
    def __init__(self, index: _Optional[int] = ..., num_chunks: _Optional[int] = ..., layer_start: _Optional[int] = ..., layer_end: _Optional[int] = ..., offset: _Optional[int] = ..., total_bytes: _Optional[int] = ..., has_checksum: _Optional[bool] = ..., checksum: _Optional[int] = ..., data: _Optional[bytes] = ...) -> None: ...
