"""A second SIGTERM while `baton serve` drains a long request exits at once, without
waiting out `--shutdown-timeout` (as uvicorn and vLLM do on a second Ctrl-C)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import baton


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_a_second_sigterm_while_draining_exits_at_once() -> None:
    grpc_port, http_port = _free_port(), _free_port()
    exe = Path(sys.executable).parent / "baton"
    proc = subprocess.Popen(
        [str(exe), "serve", "--grpc-port", str(grpc_port), "--http-port", str(http_port),
         "--shutdown-timeout", "600"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "BATON_LOG_LEVEL": "WARNING"},
        start_new_session=True,
    )  # fmt: skip
    lines: list[str] = []
    ready = threading.Event()

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("baton serve: ready"):
                ready.set()

    threading.Thread(target=read, daemon=True).start()
    try:
        deadline = time.monotonic() + 300
        while not ready.wait(1):
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail("baton serve did not get ready:\n" + "".join(lines[-80:]))
        params = baton.SamplingParams(max_tokens=4000, temperature=0, ignore_eos=True)
        with baton.Client(f"127.0.0.1:{grpc_port}") as client:
            stream = client.stream("Count slowly:", params)
            next(iter(stream))  # the request is running on the decode instance
            proc.send_signal(signal.SIGTERM)
            time.sleep(3)
            # Draining: the long request keeps it up (the timeout is 600 s).
            assert proc.poll() is None, "".join(lines[-40:])
            sent = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            code = proc.wait(30)
            waited = time.monotonic() - sent
        assert code == 128 + signal.SIGTERM
        assert waited < 30
        time.sleep(0.5)  # the reader thread takes the last lines
        assert "SIGTERM again, exiting without draining" in "".join(lines)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
        # Nothing of its Ray is left behind in its session (the workers die with it).
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and _session_alive(proc.pid):
            time.sleep(0.5)
        assert not _session_alive(proc.pid), "processes of the killed serve are left"


def _session_alive(sid: int) -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            if os.getsid(int(entry)) == sid:
                pids.append(int(entry))
        except OSError:
            continue
    return pids
