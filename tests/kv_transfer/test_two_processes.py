"""Sender and receiver in two processes, as in the product (prefill and decode actors)."""

from __future__ import annotations

import contextlib
import json
import queue
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import IO, Any

import pytest

from kv_transfer import RequestSend, TransferConfig, TransferResult, TransferStatus, create_receiver
from tests.kv_transfer.helpers import assert_moved, descriptor, make_blocks

# grpc hands over immutable bytes, which the receiver reads in place (torch warns, once).
pytestmark = pytest.mark.filterwarnings("ignore:The given buffer is not writable")

REPO = Path(__file__).resolve().parents[2]
SEED = 7


class SenderProcess:
    """tests/kv_transfer/sender_proc.py in a child process."""

    def __init__(self, backend: str):
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.kv_transfer.sender_proc", backend, str(SEED)],
            cwd=REPO,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        self._lines: queue.Queue[str] = queue.Queue()
        self._lock = threading.Lock()
        assert self.proc.stdout is not None
        threading.Thread(target=_pump, args=(self.proc.stdout, self._lines), daemon=True).start()
        self.endpoint: str = json.loads(self._lines.get(timeout=60))["endpoint"]

    def _write(self, **cmd: Any) -> None:
        assert self.proc.stdin is not None
        with self._lock:
            self.proc.stdin.write(json.dumps(cmd) + "\n")
            self.proc.stdin.flush()

    def call(self, **cmd: Any) -> None:
        self._write(**cmd)
        assert json.loads(self._lines.get(timeout=30)) == {"ok": True}

    def request_send(self, request_id: str, peer: dict[str, str]) -> None:
        self._write(op="send", request_id=request_id, peer=peer)

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self._write(op="stop")
                self.proc.wait(timeout=20)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait(timeout=10)


def _pump(stream: IO[str], lines: queue.Queue[str]) -> None:
    for line in stream:
        lines.put(line)


@pytest.mark.parametrize("backend", ["torch", "grpc"])
def test_pull_from_a_sender_in_another_process(backend: str) -> None:
    src = make_blocks(seed=SEED)  # the same contents as the child's
    receiver = create_receiver("rx", make_blocks(seed=None), TransferConfig(backend, timeout_s=10))
    receiver.start()
    child = SenderProcess(backend)
    try:
        jobs = {f"r{i}": ([i, 20 - i, 31 - i], [3 * i, 3 * i + 2, 3 * i + 1]) for i in range(4)}
        for rid, (src_ids, _) in jobs.items():
            child.call(op="publish", request_id=rid, block_ids=src_ids)
        results: dict[str, TransferResult] = {}

        def pull(rid: str) -> None:
            desc = descriptor(src, rid, jobs[rid][0])
            results[rid] = receiver.pull(desc, child.endpoint, jobs[rid][1], child.request_send)

        threads = [threading.Thread(target=pull, args=(rid,)) for rid in jobs]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=30)
        for rid, (src_ids, dst_ids) in jobs.items():
            assert results[rid].status is TransferStatus.DONE, results[rid].error
            assert_moved(src, src_ids, receiver.blocks, dst_ids)

        child.call(op="retract", request_id="r0")
        t0 = time.perf_counter()
        res = receiver.pull(
            descriptor(src, "r0", [0, 20, 31]), child.endpoint, [0, 1, 2], child.request_send
        )
        assert res.status is TransferStatus.FAILED and "not published" in (res.error or "")
        assert time.perf_counter() - t0 < 5

        child.proc.kill()  # the prefill instance dies: the next pull fails, and fast
        child.proc.wait(timeout=10)
        t0 = time.perf_counter()
        res = receiver.pull(
            descriptor(src, "r1", jobs["r1"][0]),
            child.endpoint,
            [0, 1, 2],
            _ignore_errors(child.request_send),
        )
        assert res.status is TransferStatus.FAILED
        assert time.perf_counter() - t0 < 5
    finally:
        child.close()
        receiver.stop()


def _ignore_errors(request_send: RequestSend) -> RequestSend:
    def call(request_id: str, peer: dict[str, str]) -> None:
        with contextlib.suppress(OSError):  # the child is gone; the transfer must notice
            request_send(request_id, peer)

    return call
