"""The asyncio clients: :class:`AsyncClient` and :class:`AsyncAdminClient`, the same
calls as :mod:`baton.client` as coroutines and async iterators.

    async with AsyncClient("localhost:50051") as client:
        completion = await client.generate("Hello")
        async for chunk in client.stream("Hello"):
            ...
        async for chunk in await client.chat(messages, stream=True):
            ...

Make a client inside the event loop that uses it. Leaving a stream early, or cancelling
the task reading it, cancels the call, which aborts the request in the cluster.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any, Literal, TypeVar, overload

import grpc

from baton import _convert
from baton._connection import TLS, ConnectionConfig, Deadline, RetryPolicy, retry_delay
from baton.errors import from_rpc_error
from baton.types import Chunk, ClusterStatus, Completion, Message, ModelInfo, Prompt, SamplingParams
from baton.v1 import baton_pb2 as pb
from baton.v1 import baton_pb2_grpc as pb_grpc

_C = TypeVar("_C", bound="_AsyncConnection")


class _AsyncConnection:
    _STUB: Callable[[grpc.aio.Channel], Any]

    def __init__(
        self,
        target: str,
        api_key: str | None = None,
        tls: TLS = None,
        timeout: float | None = None,
        *,
        retry: RetryPolicy | None = None,
        options: dict[str, Any] | None = None,
    ):
        """Arguments as :class:`baton.Client`'s."""
        self._config = c = ConnectionConfig.make(target, api_key, tls, timeout, retry, options)
        self._channel = (
            grpc.aio.insecure_channel(target, c.options)
            if c.credentials is None
            else grpc.aio.secure_channel(target, c.credentials, c.options)
        )
        self._stub = self._STUB(self._channel)

    async def _unary(self, method: Callable[..., Any], request: Any, timeout: float | None) -> Any:
        config = self._config
        deadline = config.deadline(timeout)
        attempt = 0
        while True:
            attempt += 1
            try:
                return await method(request, timeout=deadline.remaining(), metadata=config.metadata)
            except grpc.RpcError as e:
                delay = retry_delay(config.retry, attempt, e, deadline)
                if delay is None:
                    raise from_rpc_error(e) from e
            await asyncio.sleep(delay)

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self: _C) -> _C:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


class AsyncClient(_AsyncConnection):
    """Generation against a Baton server, from asyncio (``target`` is ``host:port``)."""

    _STUB = pb_grpc.BatonStub

    async def generate(
        self,
        prompt: Prompt,
        params: SamplingParams | None = None,
        *,
        model: str | None = None,
        request_id: str | None = None,
        timeout: float | None = None,
    ) -> Completion:
        request = _convert.generate_request(prompt, None, params, model, request_id)
        return _convert.completion(await self._unary(self._stub.Generate, request, timeout))

    def stream(
        self,
        prompt: Prompt,
        params: SamplingParams | None = None,
        *,
        model: str | None = None,
        request_id: str | None = None,
        timeout: float | None = None,
    ) -> AsyncIterator[Chunk]:
        """Chunks as tokens are generated (``async for``); the request is checked here,
        before the first ``await``."""
        request = _convert.generate_request(prompt, None, params, model, request_id)
        return self._stream(request, self._config.deadline(timeout))

    @overload
    async def chat(
        self,
        messages: Sequence[Message],
        params: SamplingParams | None = None,
        *,
        stream: Literal[False] = False,
        model: str | None = None,
        request_id: str | None = None,
        timeout: float | None = None,
    ) -> Completion: ...

    @overload
    async def chat(
        self,
        messages: Sequence[Message],
        params: SamplingParams | None = None,
        *,
        stream: Literal[True],
        model: str | None = None,
        request_id: str | None = None,
        timeout: float | None = None,
    ) -> AsyncIterator[Chunk]: ...

    async def chat(
        self,
        messages: Sequence[Message],
        params: SamplingParams | None = None,
        *,
        stream: bool = False,
        model: str | None = None,
        request_id: str | None = None,
        timeout: float | None = None,
    ) -> Completion | AsyncIterator[Chunk]:
        """With ``stream=True`` the awaited result is an async iterator of chunks (as in
        the OpenAI SDK)."""
        request = _convert.generate_request(None, messages, params, model, request_id)
        if stream:
            return self._stream(request, self._config.deadline(timeout))
        return _convert.completion(await self._unary(self._stub.Generate, request, timeout))

    async def models(self, *, timeout: float | None = None) -> list[ModelInfo]:
        reply = await self._unary(self._stub.ListModels, pb.ListModelsRequest(), timeout)
        return _convert.models(reply)

    async def _stream(
        self, request: pb.GenerateRequest, deadline: Deadline
    ) -> AsyncIterator[Chunk]:
        config = self._config
        attempt = 0
        while True:
            attempt += 1
            call = self._stub.GenerateStream(
                request, timeout=deadline.remaining(), metadata=config.metadata
            )
            started = False
            try:
                async for message in call:
                    started = True
                    yield _convert.chunk(message)
                return
            except grpc.RpcError as e:
                delay = None if started else retry_delay(config.retry, attempt, e, deadline)
                if delay is None:
                    raise from_rpc_error(e) from e
            finally:
                call.cancel()  # a no-op once the call is over; otherwise it aborts the request
            await asyncio.sleep(delay)


class AsyncAdminClient(_AsyncConnection):
    """The cluster's state, from the ``BatonAdmin`` service, from asyncio."""

    _STUB = pb_grpc.BatonAdminStub

    async def status(self, *, timeout: float | None = None) -> ClusterStatus:
        reply = await self._unary(self._stub.Status, pb.StatusRequest(), timeout)
        return _convert.status(reply)
