"""The router's servers, each in an event loop of its own on a background thread, so that
sync tests (and asyncio.run in the test's thread) can call them over real sockets."""

from __future__ import annotations

import asyncio
import http.client
import json
import threading
import time
from collections.abc import Coroutine
from typing import Any, TypeVar

from cluster import Cluster
from router.grpc_server import GrpcServer, start_grpc_server
from router.http_server import start_http_server
from router.service import Router

T = TypeVar("T")


class _LoopThread:
    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()

    def call(self, coro: Coroutine[Any, Any, T], timeout: float = 30.0) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def _shutdown(self, stopping: Coroutine[Any, Any, Any]) -> None:
        try:
            self.call(stopping)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(timeout=10)
            self.loop.close()


class ServerThread(_LoopThread):
    """The gRPC API server."""

    def __init__(self, router: Router, **kwargs: Any):
        super().__init__()
        started = self.call(start_grpc_server(router, "127.0.0.1", 0, **kwargs))
        self.server: GrpcServer = started[0]
        self.port: int = started[1]

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stop(self) -> None:
        self._shutdown(self.server.stop(grace=0.5))


class HttpServerThread(_LoopThread):
    """The OpenAI-compatible HTTP server."""

    def __init__(self, router: Router, **kwargs: Any):
        super().__init__()
        self.runner, self.port = self.call(start_http_server(router, "127.0.0.1", 0, **kwargs))

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self._shutdown(self.runner.cleanup())

    def request(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        headers: dict[str, str] | None = None,
    ) -> tuple[int, Any]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        try:
            conn.request(method, path, body=body, headers=headers or {})
            response = conn.getresponse()
            data = response.read()
            ctype = response.getheader("Content-Type", "")
            return response.status, json.loads(data) if "json" in ctype else data.decode()
        finally:
            conn.close()


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
