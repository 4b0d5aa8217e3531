"""`baton serve` started as a subprocess exactly as the README says, then used the way a
client would: 64 concurrent streams over the SDK (greedy outputs equal the offline
engine's), a cancelled stream, and a clean shutdown on SIGTERM."""

from __future__ import annotations

import asyncio
import gc
import signal
import time
import urllib.request
from collections.abc import Iterator

import pytest

import baton
from engine import LLM
from engine import SamplingParams as EngineParams
from tests.serve_proc import ServeProcess

TOPICS = ["rivers", "owls", "glass", "tea", "maps", "bells", "snow", "ships"]


@pytest.fixture(scope="module")
def server() -> Iterator[ServeProcess]:
    # The README's command, on ports of its own choosing (it prints them), with a smaller
    # KV cache than the CPU default (2 GiB per instance): the whole suite shares 24 GiB.
    gc.collect()  # what earlier tests dropped in reference cycles, before 3 more engines
    served = ServeProcess("--num-kv-blocks", "512")
    yield served
    if served.proc.poll() is None:
        served.kill()


def _messages(i: int) -> list[dict[str, str]]:
    return [{"role": "user", "content": f"Write one sentence about {TOPICS[i % 8]} ({i})."}]


def _wait_idle(server: ServeProcess, timeout_s: float = 20.0) -> baton.ClusterStatus:
    deadline = time.monotonic() + timeout_s
    with baton.AdminClient(server.grpc) as admin:
        while True:
            status = admin.status()
            if all(
                i.num_running == 0 and i.free_blocks == i.total_blocks for i in status.instances
            ):
                return status
            assert time.monotonic() < deadline, f"not idle: {status}"
            time.sleep(0.2)


def test_the_readme_command_prints_its_endpoints(server: ServeProcess) -> None:
    # The banner names the ports it bound: both front doors answer there.
    assert "baton serve: ready" in server.text, server.text
    with urllib.request.urlopen(f"{server.http}/v1/models", timeout=30) as r:
        assert r.status == 200
    with baton.AdminClient(server.grpc) as admin:
        assert {i.role for i in admin.status().instances} == {"prefill", "decode"}


def test_64_concurrent_streams_equal_the_offline_engine(server: ServeProcess) -> None:
    params = baton.SamplingParams(max_tokens=12, temperature=0)

    async def one(client: baton.AsyncClient, i: int) -> tuple[list[int], str]:
        ids: list[int] = []
        text = ""
        async for chunk in await client.chat(_messages(i), params, stream=True):
            ids.extend(chunk.token_ids)
            text += chunk.text
        return ids, text

    async def all_streams() -> list[tuple[list[int], str]]:
        async with baton.AsyncClient(server.grpc) as client:
            return await asyncio.gather(*(one(client, i) for i in range(64)))

    got = asyncio.run(all_streams())
    offline = LLM(num_kv_blocks=512).chat(
        [_messages(i) for i in range(64)], EngineParams(max_tokens=12, temperature=0)
    )
    assert [ids for ids, _ in got] == [o.token_ids for o in offline]
    assert [text for _, text in got] == [o.text for o in offline]
    _wait_idle(server)


def test_a_cancelled_stream_frees_every_instance(server: ServeProcess) -> None:
    params = baton.SamplingParams(max_tokens=400, temperature=0, ignore_eos=True)
    with baton.Client(server.grpc) as client:
        stream = client.stream("Count slowly:", params)
        for n, _ in enumerate(stream, 1):
            if n == 3:
                break
        stream.close()  # type: ignore[attr-defined]
    status = _wait_idle(server)
    assert {i.role for i in status.instances} == {"prefill", "decode"}


def test_sigterm_shuts_down_cleanly(server: ServeProcess) -> None:
    server.proc.send_signal(signal.SIGTERM)
    assert server.proc.wait(120) == 0
    server.settle_output()
    text = server.text
    assert "stopped" in text
    assert "SIGTERM received" not in text  # Ray's C-level handler, replaced once it is up
