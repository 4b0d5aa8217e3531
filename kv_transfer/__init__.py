"""Moving KV-cache blocks between instances.

One small interface (:mod:`kv_transfer.base`): a sender on the prefill side publishes a
request's blocks under its lease, a receiver on the decode side pulls them into blocks
it reserved. Backends are registered by name and imported only when chosen:

- ``torch``: torch.distributed point-to-point, NCCL on CUDA and gloo on CPU, over
  two-rank groups made per (sender, receiver) pair on demand through the receiver's
  rendezvous store, so instances join and leave without a fixed world; pipelined by
  chunks of layers.
- ``grpc``: KV bytes streamed in bounded protobuf chunks; TLS-capable; for clusters where
  the collective library cannot connect the two sides.
- ``local``: an in-process copy, for one-process tests.

Between instances of different TP x PP layouts the KV moves part by part (some layers
and KV heads of one rank, :mod:`kv_transfer.parts`), orchestrated by
:mod:`kv_transfer.sharded` over the same backends.

Leases (:mod:`kv_transfer.lease`) bound how long a sender holds blocks nobody pulls.
This package imports only ``engine`` types.
"""

from __future__ import annotations

import importlib

from engine.kv_blocks import KVBlocks
from kv_transfer.base import (
    KVDescriptor,
    KVReceiver,
    KVSender,
    RequestSend,
    TransferError,
    TransferResult,
    TransferStatus,
)
from kv_transfer.config import BACKENDS, TLSConfig, TransferConfig
from kv_transfer.parts import KVPart
from kv_transfer.sharded import RankTransfer, ShardedReceiver, ShardedSender

# name -> module defining ``Sender`` and ``Receiver``; imported on first use.
_BACKENDS: dict[str, str] = {
    "torch": "kv_transfer.torch_backend",
    "grpc": "kv_transfer.grpc_backend",
    "local": "kv_transfer.local_backend",
}


def register_backend(name: str, module: str) -> None:
    """Make ``module`` (defining ``Sender`` and ``Receiver``) available as ``name``."""
    _BACKENDS[name] = module


def _module(name: str):  # type: ignore[no-untyped-def]
    if name not in _BACKENDS:
        raise ValueError(f"transport: unknown backend {name!r} (known: {', '.join(_BACKENDS)})")
    return importlib.import_module(_BACKENDS[name])


def create_sender(name: str, blocks: KVBlocks, config: TransferConfig) -> KVSender:
    sender: KVSender = _module(config.backend).Sender(name, blocks, config)
    return sender


def create_receiver(name: str, blocks: KVBlocks, config: TransferConfig) -> KVReceiver:
    receiver: KVReceiver = _module(config.backend).Receiver(name, blocks, config)
    return receiver


__all__ = [
    "BACKENDS",
    "KVDescriptor",
    "KVPart",
    "KVReceiver",
    "KVSender",
    "RankTransfer",
    "RequestSend",
    "ShardedReceiver",
    "ShardedSender",
    "TLSConfig",
    "TransferConfig",
    "TransferError",
    "TransferResult",
    "TransferStatus",
    "create_receiver",
    "create_sender",
    "register_backend",
]
