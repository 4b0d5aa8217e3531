"""Joining the ranks of one instance into its own process group, for a launcher.

A launcher (the cluster's Ray actors) starts one process per rank. Rank 0 hosts a
``TCPStore`` on a port the OS picks (:func:`host_store`) and the launcher hands its
address to the other ranks; every rank then calls :func:`join` at the same time. The
instance's group is each process's default group and holds only that instance's ranks:
there is no world spanning instances, so instances start, restart and stop alone.
Every wait on the store and the groups is bounded by ``timeout_s``.
"""

from __future__ import annotations

from datetime import timedelta

import torch
import torch.distributed as dist

from engine.config import ParallelConfig
from engine.parallel.comm import ParallelGroups, build_groups, destroy_groups

_PREFIX = "baton-instance"


def host_store(host: str, timeout_s: float) -> tuple[dist.TCPStore, str]:
    """Rank 0: a store on a free port of ``host``; returns it and its ``host:port``."""
    timeout = timedelta(seconds=timeout_s)
    store = dist.TCPStore(host, 0, None, True, timeout, wait_for_workers=False)
    return store, f"{host}:{store.port}"


def join(
    address: str,
    rank: int,
    parallel: ParallelConfig,
    device: torch.device,
    timeout_s: float,
    store: dist.TCPStore | None = None,
) -> ParallelGroups:
    """Every rank, together: the instance's groups (gloo on CPU, NCCL on CUDA).

    ``store``: rank 0 passes the one it hosts; the others connect to ``address``."""
    if dist.is_initialized():
        raise RuntimeError("join: this process already belongs to an instance's group")
    timeout = timedelta(seconds=timeout_s)
    if store is None:
        host, port = address.rsplit(":", 1)
        store = dist.TCPStore(host, int(port), None, False, timeout)
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(
        backend,
        store=dist.PrefixStore(_PREFIX, store),
        rank=rank,
        world_size=parallel.world_size,
        timeout=timeout,
    )
    return build_groups(parallel, timeout=timeout)


def leave(groups: ParallelGroups) -> None:
    """Release the groups :func:`join` made; safe when they already failed."""
    try:
        destroy_groups(groups)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
