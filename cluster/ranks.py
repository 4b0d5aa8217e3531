"""The other ranks of a TP x PP instance (rank 0 is :class:`cluster.actors.InstanceActor`).

:class:`RankActor` is rank ``r`` > 0 as a Ray actor (a plain class; ``cluster.builder``
applies ``ray.remote``): it joins the instance's process group, loads its share of the
model and KV cache, serves rank 0's steps on a thread, and does its share of every KV
transfer. :class:`RayRanks` is rank 0's side of those calls. Like ``cluster.actors``,
heavy imports happen only in ``start()``, inside the Ray worker.
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import replace
from typing import Any

from cluster.actors import (
    InstanceSpec,
    engine_config,
    join_group,
    normal_priority,
    transfer_config,
)

logger = logging.getLogger(__name__)


class RayRanks:
    """Rank 0's calls to its instance's other ranks (``kv_transfer.sharded``'s
    ``SenderRanks`` and ``ReceiverRanks``); every wait is bounded."""

    def __init__(self, handles: list[Any], timeout_s: float):
        self._handles = handles  # rank r's handle at r - 1
        self._timeout_s = timeout_s

    def publish(self, desc: Any) -> None:
        import ray

        d = desc.to_dict()
        ray.get([h.publish_kv.remote(d) for h in self._handles], timeout=self._timeout_s)

    def retract(self, request_id: str) -> None:
        import ray

        refs = [h.retract_kv.remote(request_id) for h in self._handles]
        ray.get(refs, timeout=3 * self._timeout_s)  # each waits out its readers

    def send(self, rank: int, request_id: str, peer: dict[str, str]) -> None:
        self._handles[rank - 1].send_kv.remote(request_id, peer)

    def pull(self, rank: int, request: dict[str, Any]) -> dict[str, Any]:
        import ray

        # Generous: the rank's own waits are each bounded by the timeout, and a pull
        # abandoned early could still write into blocks freed meanwhile.
        parts = max(1, len(request["desc"].get("endpoints", ())))
        ref = self._handles[rank - 1].pull_part.remote(request)
        reply: dict[str, Any] = ray.get(ref, timeout=(2 * parts + 2) * self._timeout_s)
        return reply


def close_parallel(engine: Any, groups: Any) -> None:
    """Stop the other ranks (STOP broadcast) and leave the group; a dead rank's failure is
    logged, the actor is killed next anyway."""
    try:
        engine.close()
        from engine.parallel.launch import leave

        leave(groups)
    except Exception as e:
        logger.warning("closing the instance's ranks: %s", e)


class RankActor:
    """Rank ``rank`` > 0 of a TP x PP instance: its share of the model and KV cache,
    serving rank 0's steps on a thread, and its share of every transfer."""

    def __init__(self, spec: dict[str, Any], rank: int):
        self.spec = InstanceSpec(**spec)
        self.rank = rank
        self.info: dict[str, Any] = {}
        self._thread: threading.Thread | None = None
        self._transfer: Any = None  # kv_transfer.sharded.RankTransfer
        self._driver: Any = None  # rank 0's handle
        self._groups: Any = None

    def ping(self) -> dict[str, Any]:
        """Started while it serves rank 0's steps; a failed group ends that."""
        started = self._thread is not None and self._thread.is_alive()
        return {"name": self.spec.name, "rank": self.rank, "started": started,
                "pid": os.getpid(), "nice": os.getpriority(os.PRIO_PROCESS, 0),
                "dtype": self.info.get("dtype")}  # fmt: skip

    def start(self, store_address: str, driver: Any) -> dict[str, Any]:
        """Join the instance's group at rank 0's ``store_address`` and load this rank's share
        (together with every other rank); ``driver`` is rank 0's handle."""
        if self._thread is not None:
            return self.info
        from cluster.node_address import resolve_host

        self.spec = replace(self.spec, host=resolve_host(self.spec.host))
        normal_priority(f"{self.spec.name} rank {self.rank}")
        import torch

        torch.set_num_threads(self.spec.num_threads)
        self._groups = join_group(self.spec, self.rank, store_address)
        from engine.parallel.worker import create_worker

        worker = create_worker(engine_config(self.spec), self._groups)
        self._transfer = self._build_transfer(worker.kv_blocks)
        self._driver = driver
        self.info = {"name": self.spec.name, "rank": self.rank, "endpoint": self._transfer.start(),
                     "dtype": worker.kv_blocks.layout.dtype}  # fmt: skip
        name = f"{self.spec.name}-rank{self.rank}"
        self._thread = threading.Thread(target=self._serve, args=(worker,), name=name, daemon=True)
        self._thread.start()
        return self.info

    def _serve(self, worker: Any) -> None:
        try:
            worker.serve()
        except Exception:  # rank 0 is gone or the group broke: ping now says so
            logger.exception("%s rank %d stopped serving", self.spec.name, self.rank)

    def _build_transfer(self, blocks: Any) -> Any:
        from engine.config import ParallelConfig
        from kv_transfer import RankTransfer, create_receiver, create_sender

        s, config = self.spec, transfer_config(self.spec)
        name, parallel = f"{s.name}.r{self.rank}", ParallelConfig(tp=s.tp, pp=s.pp)
        if s.role == "prefill":
            return RankTransfer(self.rank, parallel, sender=create_sender(name, blocks, config))
        if s.role == "decode":
            receiver = create_receiver(name, blocks, config)
            return RankTransfer(self.rank, parallel, receiver=receiver)
        return RankTransfer(self.rank, parallel)

    # -- rank 0's transfer calls; a restarted (unstarted) rank drops them -----------------

    def publish_kv(self, desc: dict[str, Any]) -> None:
        if self._transfer is not None:
            self._transfer.publish(desc)

    def retract_kv(self, request_id: str) -> None:
        if self._transfer is not None:
            self._transfer.retract(request_id)

    def send_kv(self, request_id: str, peer: dict[str, str]) -> None:
        if self._transfer is not None:
            self._transfer.send(request_id, peer)

    def pull_part(self, request: dict[str, Any]) -> dict[str, Any]:
        if self._transfer is None:
            return {"status": "failed", "error": f"rank {self.rank} is not started"}
        driver = self._driver

        def request_send(request_id: str, peer: dict[str, str]) -> None:
            driver.relay_send.remote(request_id, peer)  # rank 0 knows the prefill instance

        result: dict[str, Any] = self._transfer.pull(request, request_send)
        return result

    def stop(self) -> None:
        if self._transfer is not None:
            self._transfer.stop()
            self._transfer = None
        if self._thread is not None:
            self._thread.join(timeout=5.0)  # rank 0's STOP ends it
            if not self._thread.is_alive() and self._groups is not None:
                from engine.parallel.launch import leave

                leave(self._groups)
                self._groups = None
