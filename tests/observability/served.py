"""A real `baton serve` as a subprocess (free ports, its own embedded Ray), plus a load
thread that keeps requests flowing over the OpenAI HTTP API. Stopped with SIGTERM in
``finally``; killed if it does not stop."""

from __future__ import annotations

import http.client
import json
import threading
import time
from pathlib import Path

from tests.serve_proc import ServeProcess

KEY = "observability-test-key"
# The plan `baton serve --plan` launches: 1 prefill + 1 decode, tp1, with its SLOs
# (TTFT 2 s, TPOT 0.25 s: a loaded CPU misses some, so the misses table has rows).
PLAN_ARGS = [
    "plan", "--model", "smollm2-135m", "--nodes", "1", "--gpus-per-node", "2", "--gpu",
    "A100-80G", "--workload", "synthetic:in=16,out=8", "--ttft-slo", "2", "--tpot-slo",
    "0.25", "--attainment", "0.9", "--rate", "1",
]  # fmt: skip


class Served(ServeProcess):
    """`baton serve --plan PLAN` with an API key, and a small HTTP client for it."""

    def __init__(self, plan: Path, timeout_s: float = 300.0) -> None:
        super().__init__("--api-key", KEY, "--num-kv-blocks", "512", "--plan", str(plan),
                         timeout_s=timeout_s)  # fmt: skip
        self.host, port = self.http.removeprefix("http://").split(":")
        self.port = int(port)

    def request(self, method: str, path: str, body: object = None,
                headers: dict[str, str] | None = None) -> tuple[int, bytes]:  # fmt: skip
        conn = http.client.HTTPConnection(self.host, self.port, timeout=120)
        try:
            data = None if body is None else json.dumps(body).encode()
            h = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
            conn.request(method, path, body=data, headers={**h, **(headers or {})})
            r = conn.getresponse()
            return r.status, r.read()
        finally:
            conn.close()

    def complete(self, i: int, stream: bool) -> int:
        body = {"prompt": f"Tell me about the number {i}.", "max_tokens": 6 + i % 5,
                "temperature": 0, "ignore_eos": True, "stream": stream}  # fmt: skip
        return self.request("POST", "/v1/completions", body)[0]


class Load:
    """Requests one after another (streamed and not) until stopped."""

    def __init__(self, served: Served):
        self.served = served
        self.sent = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.served.complete(self.sent, stream=self.sent % 2 == 0)
            except OSError:
                time.sleep(0.5)
            self.sent += 1

    def __enter__(self) -> Load:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(150)
