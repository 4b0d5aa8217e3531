"""The SDK end to end against the real gRPC server and cluster: greedy outputs equal the
offline engine's token for token, sync and asyncio, unary, streamed and chat.

(These live beside the server tests because they need the session's ``router`` fixture,
which tests/router/conftest.py defines; a copy under tests/baton would start a second
cluster.)"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest

import baton
from baton import AsyncAdminClient, AsyncClient, Client, Completion
from cluster import Cluster
from engine import LLM
from engine import SamplingParams as EngineParams
from engine.outputs import RequestOutput
from router.service import Router
from tests.router.servers import ServerThread, wait_cluster_idle

PROMPTS = ["The history of computing is", "Write a haiku about the sea."]
CHAT = [{"role": "user", "content": "Name three colours."}]
MAX_TOKENS = 10
PARAMS = baton.SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
ENGINE_PARAMS = EngineParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)


Offline = tuple[list[RequestOutput], RequestOutput]


@pytest.fixture(scope="module")
def server(router: Router) -> Iterator[ServerThread]:
    st = ServerThread(router)
    yield st
    st.stop()


@pytest.fixture(scope="module")
def offline() -> Offline:
    """The offline engine's answers: the prompts, then the chat."""
    llm = LLM(None)
    return llm.generate(PROMPTS, ENGINE_PARAMS), llm.chat(CHAT, ENGINE_PARAMS)[0]


@pytest.fixture(autouse=True)
def _idle_after(cluster: Cluster) -> Iterator[None]:
    yield
    wait_cluster_idle(cluster)


def _same(got: Completion, want: RequestOutput) -> None:
    assert list(got.token_ids) == want.token_ids
    assert got.text == want.text
    assert got.finish_reason == "length"
    assert (got.usage.prompt_tokens, got.usage.completion_tokens) == (
        len(want.prompt_token_ids),
        MAX_TOKENS,
    )


def test_sync_client_matches_the_offline_engine(server: ServerThread, offline: Offline) -> None:
    outputs, chat = offline
    with Client(server.target) as client:
        for prompt, want in zip(PROMPTS, outputs, strict=True):
            got = client.generate(prompt, PARAMS)
            _same(got, want)
            chunks = list(client.stream(prompt, PARAMS))
            assert "".join(c.text for c in chunks) == got.text
            assert [t for c in chunks for t in c.token_ids] == list(got.token_ids)
            assert chunks[-1].finish_reason == "length" and chunks[-1].usage == got.usage
        _same(client.chat(CHAT, PARAMS), chat)
        streamed = list(client.chat(CHAT, PARAMS, stream=True))
        assert [t for c in streamed for t in c.token_ids] == chat.token_ids
        # Token ids in, token ids out.
        by_ids = client.generate(outputs[0].prompt_token_ids, PARAMS)
        assert list(by_ids.token_ids) == outputs[0].token_ids


def test_async_client_matches_the_offline_engine(server: ServerThread, offline: Offline) -> None:
    outputs, chat = offline

    async def run() -> None:
        async with AsyncClient(server.target) as client:
            got = await asyncio.gather(*(client.generate(p, PARAMS) for p in PROMPTS))
            for g, want in zip(got, outputs, strict=True):
                _same(g, want)
            chunks = [c async for c in client.stream(PROMPTS[0], PARAMS)]
            assert "".join(c.text for c in chunks) == got[0].text
            _same(await client.chat(CHAT, PARAMS), chat)
            streamed = [c async for c in await client.chat(CHAT, PARAMS, stream=True)]
            assert "".join(c.text for c in streamed) == chat.text

    asyncio.run(run())


def test_cancelling_an_async_stream_aborts_the_request(
    server: ServerThread, cluster: Cluster
) -> None:
    long = baton.SamplingParams(temperature=0, max_tokens=4000, ignore_eos=True)

    async def run() -> None:
        async with AsyncClient(server.target) as client:
            started = asyncio.Event()

            async def read() -> None:
                async for _ in client.stream("Count", long):
                    started.set()

            task = asyncio.create_task(read())
            await asyncio.wait_for(started.wait(), timeout=30)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task

    asyncio.run(run())
    wait_cluster_idle(cluster)


def test_models_and_status(server: ServerThread, router: Router, cluster: Cluster) -> None:
    with Client(server.target) as client:
        (model,) = client.models()
    assert (model.id, model.max_model_len) == (router.model_name, cluster.max_model_len)
    with baton.AdminClient(server.target) as admin:
        status = admin.status()
    assert (status.model, status.mode, status.transport) == (
        router.model_name,
        "disaggregated",
        "torch",
    )
    assert [p.role for p in status.pools] == ["prefill", "decode"]
    assert {i.name: i.health for i in status.instances} == {
        "prefill-0": "serving",
        "decode-0": "serving",
    }

    async def run() -> baton.ClusterStatus:
        async with AsyncAdminClient(server.target) as admin:
            return await admin.status()

    assert [i.total_blocks for i in asyncio.run(run()).instances] == [1024, 1024]
