"""A real `baton serve` as a subprocess (free ports, its own embedded Ray), plus a load
thread that keeps requests flowing over the OpenAI HTTP API. Stopped with SIGTERM in
``finally``; killed if it does not stop."""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

KEY = "observability-test-key"
# The plan `baton serve --plan` launches: 1 prefill + 1 decode, tp1, with its SLOs
# (TTFT 2 s, TPOT 0.25 s: a loaded CPU misses some, so the misses table has rows).
PLAN_ARGS = [
    "plan", "--model", "smollm2-135m", "--nodes", "1", "--gpus-per-node", "2", "--gpu",
    "A100-80G", "--workload", "synthetic:in=16,out=8", "--ttft-slo", "2", "--tpot-slo",
    "0.25", "--attainment", "0.9", "--rate", "1",
]  # fmt: skip


class Served:
    def __init__(self, proc: subprocess.Popen[str], lines: list[str], http: str, grpc: str):
        self.proc, self.lines, self.http, self.grpc = proc, lines, http, grpc
        self.host, port = http.removeprefix("http://").split(":")
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


def start(plan: Path, timeout_s: float = 300.0) -> Served:
    exe = Path(sys.executable).parent / "baton"
    proc = subprocess.Popen(
        [
            str(exe),
            "serve",
            "--grpc-port",
            "0",
            "--http-port",
            "0",
            "--api-key",
            KEY,
            "--num-kv-blocks",
            "512",
            "--plan",
            str(plan),
        ],  # fmt: skip
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "BATON_LOG_LEVEL": "WARNING"},
        start_new_session=True,  # its own process group: stopped as one
    )
    lines: list[str] = []
    ready = threading.Event()

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("  metrics "):
                ready.set()

    threading.Thread(target=read, daemon=True).start()
    deadline = time.monotonic() + timeout_s
    while not ready.wait(1):
        if proc.poll() is not None or time.monotonic() > deadline:
            stop(proc)
            raise RuntimeError("baton serve did not get ready:\n" + "".join(lines[-60:]))
    text = "".join(lines)
    grpc = re.search(r"gRPC\s+(\S+)", text)
    http_url = re.search(r"HTTP\s+(http://\S+)/v1", text)
    assert grpc and http_url, text
    return Served(proc, lines, http_url.group(1), grpc.group(1))


def stop(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(30)


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
