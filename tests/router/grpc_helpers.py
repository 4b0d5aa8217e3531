"""Runs the gRPC API server in an event loop of its own on a background thread, so that
sync tests (and asyncio.run in the test's thread) can call it over real sockets."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Coroutine
from typing import Any, TypeVar

from cluster import Cluster
from router.grpc_server import GrpcServer, start_grpc_server
from router.service import Router

T = TypeVar("T")


class ServerThread:
    def __init__(self, router: Router, **kwargs: Any):
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()
        started = self.call(start_grpc_server(router, "127.0.0.1", 0, **kwargs))
        self.server: GrpcServer = started[0]
        self.port: int = started[1]

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def call(self, coro: Coroutine[Any, Any, T], timeout: float = 30.0) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self) -> None:
        try:
            self.call(self.server.stop(grace=0.5))
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(timeout=10)
            self.loop.close()


def wait_cluster_idle(cluster: Cluster, timeout_s: float = 10.0) -> None:
    """Nothing waiting or running, and every KV block free, on every instance."""
    deadline = time.monotonic() + timeout_s
    while True:
        busy = {
            s.name: (s.num_waiting, s.num_running, s.total_blocks - s.free_blocks)
            for s in cluster.stats()
            if (s.num_waiting, s.num_running, s.total_blocks - s.free_blocks) != (0, 0, 0)
        }
        if not busy:
            return
        assert time.monotonic() < deadline, f"(waiting, running, blocks in use): {busy}"
        time.sleep(0.1)
