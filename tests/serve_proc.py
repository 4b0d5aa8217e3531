"""`baton serve` as a real subprocess, the way a user starts it: its own embedded Ray, its
own process session (so everything it started can be found and killed), free ports, and
its output collected by a reader thread. Shared by every test that needs a whole server.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import TracebackType

EXE = str(Path(sys.executable).parent / "baton")
READY = "  metrics "  # the last endpoint line `baton serve: ready` prints


class ServeFailed(RuntimeError):
    """`baton serve` exited or did not get ready in time; the message holds its output."""


class ServeProcess:
    """One `baton serve ARGS...` with ``--grpc-port 0 --http-port 0`` unless ARGS name
    ports. ``grpc`` (host:port) and ``http`` (http://host:port) are read from its ready
    banner, so they are the ports it really bound."""

    def __init__(self, *args: str, timeout_s: float = 300.0, log_level: str = "WARNING",
                 env: dict[str, str] | None = None) -> None:  # fmt: skip
        argv = [EXE, "serve", *args]
        if "--grpc-port" not in args:
            argv += ["--grpc-port", "0"]
        if "--http-port" not in args:
            argv += ["--http-port", "0"]
        self.lines: list[str] = []
        self.proc = subprocess.Popen(
            argv,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env={**os.environ, "BATON_LOG_LEVEL": log_level, **(env or {})},
            start_new_session=True,  # its own session: stopped, and checked, as one
        )
        self._ready = threading.Event()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        deadline = time.monotonic() + timeout_s
        while not self._ready.wait(1):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.kill()
                raise ServeFailed("baton serve did not get ready:\n" + self.tail(80))
        grpc = re.search(r"gRPC\s+(\S+)", self.text)
        http = re.search(r"HTTP\s+(http://\S+)/v1", self.text)
        assert grpc and http, self.text
        self.grpc: str = grpc.group(1)
        self.http: str = http.group(1)

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)
            if line.startswith(READY):
                self._ready.set()

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def text(self) -> str:
        return "".join(self.lines)

    def tail(self, n: int = 40) -> str:
        return "".join(self.lines[-n:])

    def settle_output(self) -> None:
        """Wait for the reader to take the last lines of an exited server."""
        self._reader.join(10)

    def stop(self, timeout_s: float = 60.0) -> int | None:
        """SIGTERM, then SIGKILL to its whole session if it does not exit in time."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.kill()
        return self.proc.returncode

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(30)

    def session_pids(self) -> list[int]:
        """Live processes of its session (Ray's raylet, workers and agents included)."""
        pids = []
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                if os.getsid(int(entry)) == self.proc.pid:
                    pids.append(int(entry))
            except OSError:
                continue
        return pids

    def __enter__(self) -> ServeProcess:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:  # fmt: skip
        self.stop()
