"""`baton serve` started as a subprocess exactly as the README says, then used the way a
client would: 64 concurrent streams over the SDK (greedy outputs equal the offline
engine's), a cancelled stream, and a clean shutdown on SIGTERM."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import baton
from engine import LLM
from engine import SamplingParams as EngineParams


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


GRPC_PORT, HTTP_PORT = _free_port(), _free_port()
GRPC = f"127.0.0.1:{GRPC_PORT}"
TOPICS = ["rivers", "owls", "glass", "tea", "maps", "bells", "snow", "ships"]


@pytest.fixture(scope="module")
def server() -> Iterator[subprocess.Popen[str]]:
    exe = Path(sys.executable).parent / "baton"
    proc = subprocess.Popen(
        [str(exe), "serve", "--grpc-port", str(GRPC_PORT), "--http-port", str(HTTP_PORT)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "BATON_LOG_LEVEL": "WARNING"},
    )
    assert proc.stdout is not None
    lines: list[str] = []
    ready = threading.Event()

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("baton serve: ready"):
                ready.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    deadline = time.monotonic() + 300
    while not ready.wait(1):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            reader.join(10)
            pytest.fail("baton serve did not get ready:\n" + "".join(lines[-80:]))
    proc.lines = lines  # type: ignore[attr-defined]
    yield proc
    if proc.poll() is None:
        proc.kill()
        proc.wait(30)


def _messages(i: int) -> list[dict[str, str]]:
    return [{"role": "user", "content": f"Write one sentence about {TOPICS[i % 8]} ({i})."}]


def _wait_idle(timeout_s: float = 20.0) -> baton.ClusterStatus:
    deadline = time.monotonic() + timeout_s
    with baton.AdminClient(GRPC) as admin:
        while True:
            status = admin.status()
            if all(
                i.num_running == 0 and i.free_blocks == i.total_blocks for i in status.instances
            ):
                return status
            assert time.monotonic() < deadline, f"not idle: {status}"
            time.sleep(0.2)


def test_the_readme_command_prints_its_endpoints(server: subprocess.Popen[str]) -> None:
    text = "".join(server.lines)  # type: ignore[attr-defined]
    assert GRPC in text and f"http://127.0.0.1:{HTTP_PORT}" in text


def test_64_concurrent_streams_equal_the_offline_engine(server: subprocess.Popen[str]) -> None:
    params = baton.SamplingParams(max_tokens=12, temperature=0)

    async def one(client: baton.AsyncClient, i: int) -> tuple[list[int], str]:
        ids: list[int] = []
        text = ""
        async for chunk in await client.chat(_messages(i), params, stream=True):
            ids.extend(chunk.token_ids)
            text += chunk.text
        return ids, text

    async def all_streams() -> list[tuple[list[int], str]]:
        async with baton.AsyncClient(GRPC) as client:
            return await asyncio.gather(*(one(client, i) for i in range(64)))

    got = asyncio.run(all_streams())
    offline = LLM().chat(
        [_messages(i) for i in range(64)], EngineParams(max_tokens=12, temperature=0)
    )
    assert [ids for ids, _ in got] == [o.token_ids for o in offline]
    assert [text for _, text in got] == [o.text for o in offline]
    _wait_idle()


def test_a_cancelled_stream_frees_every_instance(server: subprocess.Popen[str]) -> None:
    params = baton.SamplingParams(max_tokens=400, temperature=0, ignore_eos=True)
    with baton.Client(GRPC) as client:
        stream = client.stream("Count slowly:", params)
        for n, _ in enumerate(stream, 1):
            if n == 3:
                break
        stream.close()  # type: ignore[attr-defined]
    status = _wait_idle()
    assert {i.role for i in status.instances} == {"prefill", "decode"}


def test_sigterm_shuts_down_cleanly(server: subprocess.Popen[str]) -> None:
    server.send_signal(signal.SIGTERM)
    assert server.wait(120) == 0
    text = "".join(server.lines)  # type: ignore[attr-defined]
    assert "stopped" in text
    assert "SIGTERM received" not in text  # Ray's C-level handler, replaced once it is up
