"""The SDK's own behaviour against a scripted server: retries (UNAVAILABLE only, a stream
only before its first chunk), deadlines, the api key header, TLS."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from baton import AsyncClient, Client, RetryPolicy
from baton.errors import DeadlineExceeded, InvalidArgument, Unavailable
from tests.baton.fake_server import FakeServer

FAST = RetryPolicy(max_attempts=3, initial_backoff_s=0.01, max_backoff_s=0.05)


@pytest.fixture
def fake() -> Iterator[FakeServer]:
    server = FakeServer()
    yield server
    server.stop()


def test_unary_calls_are_retried_on_unavailable(fake: FakeServer) -> None:
    fake.servicer.unavailable_first = 2
    with Client(fake.target, retry=FAST) as client:
        out = client.generate("hi")
        assert client.models()[0].id == "fake"
    assert (out.text, out.token_ids, out.finish_reason) == ("ok!", (7, 8), "stop")
    assert out.usage.total_tokens == 5
    assert fake.servicer.calls == {"Generate": 3, "ListModels": 3}


def test_retries_stop_at_max_attempts(fake: FakeServer) -> None:
    fake.servicer.unavailable_first = 10
    with Client(fake.target, retry=FAST) as client, pytest.raises(Unavailable):
        client.generate("hi")
    assert fake.servicer.calls["Generate"] == FAST.max_attempts


def test_other_errors_are_not_retried(fake: FakeServer) -> None:
    fake.servicer.unavailable_first = 1
    fake.servicer.fail_code = grpc.StatusCode.INVALID_ARGUMENT
    with Client(fake.target, retry=FAST) as client, pytest.raises(InvalidArgument) as err:
        client.generate("hi")
    assert err.value.field == "temperature"
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert fake.servicer.calls["Generate"] == 1


def test_a_stream_is_retried_before_its_first_chunk(fake: FakeServer) -> None:
    fake.servicer.unavailable_first = 2
    with Client(fake.target, retry=FAST) as client:
        chunks = list(client.stream("hi"))
    assert "".join(c.text for c in chunks) == "ok!"
    assert [c.finish_reason for c in chunks] == [None, "stop"]
    assert chunks[-1].usage is not None and chunks[0].usage is None
    assert fake.servicer.calls["GenerateStream"] == 3


def test_a_stream_that_yielded_is_never_retried(fake: FakeServer) -> None:
    fake.servicer.fail_mid_stream = True
    seen = []
    with Client(fake.target, retry=FAST) as client, pytest.raises(Unavailable):
        for chunk in client.stream("hi"):
            seen.append(chunk.text)
    assert seen == ["ok"]
    assert fake.servicer.calls["GenerateStream"] == 1


def test_async_client_retries_the_same_way(fake: FakeServer) -> None:
    async def run() -> tuple[str, list[str]]:
        async with AsyncClient(fake.target, retry=FAST) as client:
            fake.servicer.unavailable_first = 2
            out = await client.generate("hi")
            fake.servicer.fail_mid_stream = True
            seen: list[str] = []
            with pytest.raises(Unavailable):
                async for chunk in client.stream("hi"):
                    seen.append(chunk.text)
            return out.text, seen

    assert asyncio.run(run()) == ("ok!", ["ok"])
    # The stream's first two tries failed before a chunk (retried), the third yielded one.
    assert fake.servicer.calls == {"Generate": 3, "GenerateStream": 3}


def test_deadlines_come_from_the_call_or_the_client(fake: FakeServer) -> None:
    fake.servicer.sleep_s = 1.0
    start = time.monotonic()
    with Client(fake.target, timeout=0.2) as client, pytest.raises(DeadlineExceeded):
        client.generate("hi")
    with Client(fake.target) as client, pytest.raises(DeadlineExceeded):
        client.generate("hi", timeout=0.2)
    assert time.monotonic() - start < 1.5


def test_an_unreachable_server_is_unavailable_after_the_retries() -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with Client(f"127.0.0.1:{port}", retry=FAST, timeout=10) as client, pytest.raises(Unavailable):
        client.models()


def test_the_api_key_travels_as_a_bearer_token(fake: FakeServer) -> None:
    with Client(fake.target, api_key="k-123") as client:
        client.generate("hi")
        list(client.stream("hi"))
    assert [m.get("authorization") for m in fake.servicer.metadata] == ["Bearer k-123"] * 2


def test_tls_with_a_ca_file(tmp_path: Path) -> None:
    from tests.kv_transfer.test_grpc_backend import ThrowawayCA

    issued = ThrowawayCA(tmp_path).issue("server")
    creds = grpc.ssl_server_credentials(
        [(Path(issued.key_file).read_bytes(), Path(issued.cert_file).read_bytes())]
    )
    server = FakeServer(creds)
    try:
        with Client(server.target, tls=issued.ca_file) as client:
            assert client.generate("hi").text == "ok!"
        with (
            Client(server.target, retry=FAST, timeout=5) as plain,
            pytest.raises(Unavailable),
        ):
            plain.generate("hi")  # plaintext against a TLS port
    finally:
        server.stop()


def test_bad_client_arguments_fail_at_once() -> None:
    with pytest.raises(ValueError, match="timeout"):
        Client("127.0.0.1:1", timeout=0)
    with pytest.raises(TypeError, match="tls"):
        Client("127.0.0.1:1", tls=42)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="max_attempts"):
        RetryPolicy(max_attempts=0)
