"""Two-rank process groups for the torch backend, and the buffers its chunks move through.

A group joins exactly one sender (rank 0) and one receiver (rank 1) under a pair key in the
receiver's store, with no global world: gloo on CPU, bound to the configured address, and
NCCL when the blocks live on CUDA.
"""

from __future__ import annotations

import hashlib
import math
import time
from datetime import timedelta
from typing import Protocol, cast

import torch
import torch.distributed as dist

from engine.kv_blocks import KVLayout
from kv_transfer.base import TransferError

DEPTH = 3  # chunk buffers per side: one being gathered (scattered), the rest in flight


class Group(Protocol):
    """What is used here of a gloo or NCCL group (the torch stubs lack send and recv)."""

    def send(self, tensors: list[torch.Tensor], dst_rank: int, tag: int) -> dist.Work: ...

    def recv(self, tensors: list[torch.Tensor], src_rank: int, tag: int) -> dist.Work: ...


def request_tag(request_id: str) -> int:
    """56 bits of the request id's hash: a header for another request shows the stream is off."""
    return int.from_bytes(hashlib.blake2b(request_id.encode(), digest_size=7).digest(), "little")


def make_group(
    store: dist.Store, key: str, rank: int, device: torch.device, host: str, timeout_s: float
) -> Group:
    """Blocks until both ranks joined under ``key`` (or ``timeout_s``)."""
    prefixed = dist.PrefixStore(key, store)
    timeout = timedelta(seconds=timeout_s)
    if device.type == "cuda":  # NCCL: not exercised without two GPUs
        nccl_opts = dist.ProcessGroupNCCL.Options()
        nccl_opts._timeout = timeout
        return cast(Group, dist.ProcessGroupNCCL(prefixed, rank, 2, nccl_opts))
    opts = dist.ProcessGroupGloo._Options()  # type: ignore[attr-defined]  # not in the stubs
    # Bind gloo's listener to the configured address, not whatever the hostname resolves to.
    opts._devices = [dist.ProcessGroupGloo.create_device(hostname=host)]
    opts._timeout = timeout
    return cast(Group, dist.ProcessGroupGloo(prefixed, rank, 2, opts))


def wait(work: dist.Work, timeout_s: float, device: torch.device) -> None:
    """Until ``work`` is done; raises (and gloo closes the pair) after ``timeout_s``."""
    if device.type == "cuda":  # NCCL's wait() only orders streams; poll for the host
        deadline = time.monotonic() + timeout_s
        while not work.is_completed():
            if time.monotonic() > deadline:
                raise TransferError(f"timed out after {timeout_s:.1f}s")
            time.sleep(0.0002)
        return
    work.wait(timedelta(seconds=timeout_s))


def discard(group: Group | None) -> None:
    nccl = getattr(dist, "ProcessGroupNCCL", None)  # absent from CPU-only builds
    if nccl is not None and isinstance(group, nccl):
        group.abort()  # gloo needs no abort: dropping the last reference closes its sockets


class Staging:
    """DEPTH reusable chunk buffers, grown to the largest chunk seen."""

    def __init__(self) -> None:
        self._flat: list[torch.Tensor] = []

    def buffers(
        self, layout: KVLayout, num_layers: int, num_blocks: int, device: torch.device
    ) -> list[torch.Tensor]:
        shape = layout.group_shape(num_layers, num_blocks)
        nbytes = math.prod(shape) * layout.element_size
        if not self._flat or self._flat[0].numel() < nbytes or self._flat[0].device != device:
            self._flat = [
                torch.empty(nbytes, dtype=torch.uint8, device=device) for _ in range(DEPTH)
            ]
        return [f[:nbytes].view(layout.torch_dtype).view(shape) for f in self._flat]
