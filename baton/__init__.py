"""Baton's public client SDK.

    from baton import Client, SamplingParams

    with Client("localhost:50051") as client:
        out = client.generate("The capital of France is", SamplingParams(temperature=0))
        print(out.text, out.usage)

``Client`` and ``AsyncClient`` generate (unary, streamed, chat); ``AdminClient`` and
``AsyncAdminClient`` report the cluster's pools and instances. Failures raise the
classes of :mod:`baton.errors`. The generated stubs of the gRPC API are ``baton.v1``.
This package imports only grpc and protobuf, so a client installs and imports quickly.
"""

from __future__ import annotations

from baton._connection import DEFAULT_TIMEOUT_S, RetryPolicy
from baton.aio import AsyncAdminClient, AsyncClient
from baton.client import AdminClient, Client
from baton.errors import BatonError
from baton.types import (
    Chunk,
    ClusterStatus,
    Completion,
    InstanceStatus,
    Logprobs,
    ModelInfo,
    PoolStatus,
    SamplingParams,
    SequenceOutput,
    SLOStatus,
    SLOWindow,
    StructuredOutput,
    TokenLogprob,
    Usage,
)

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_TIMEOUT_S",
    "AdminClient",
    "AsyncAdminClient",
    "AsyncClient",
    "BatonError",
    "Chunk",
    "Client",
    "ClusterStatus",
    "Completion",
    "InstanceStatus",
    "Logprobs",
    "ModelInfo",
    "PoolStatus",
    "RetryPolicy",
    "SLOStatus",
    "SLOWindow",
    "SamplingParams",
    "SequenceOutput",
    "StructuredOutput",
    "TokenLogprob",
    "Usage",
    "__version__",
]
