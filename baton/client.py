"""The blocking clients: :class:`Client` generates, :class:`AdminClient` reports the
cluster's state.

    with Client("localhost:50051") as client:
        print(client.generate("Hello", SamplingParams(max_tokens=8)).text)
        for chunk in client.chat([{"role": "user", "content": "Hi"}], stream=True):
            print(chunk.text, end="")

Every call has a deadline (``timeout`` seconds: the call's, else the client's). Leaving a
stream early (``break``, ``close()``, an exception) cancels the call, which aborts the
request in the cluster.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Literal, TypeVar, overload

import grpc

from baton import _convert
from baton._connection import TLS, ConnectionConfig, Deadline, RetryPolicy, retry_delay
from baton.errors import from_rpc_error
from baton.types import Chunk, ClusterStatus, Completion, Message, ModelInfo, Prompt, SamplingParams
from baton.v1 import baton_pb2 as pb
from baton.v1 import baton_pb2_grpc as pb_grpc

_C = TypeVar("_C", bound="_Connection")


class _Connection:
    _STUB: Callable[[grpc.Channel], Any]

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
        """``tls``: True for the system's roots, a CA file (PEM) or ``grpc.ChannelCredentials``;
        ``timeout``: the default deadline of a call in seconds (None: 300); ``retry``: the
        backoff for UNAVAILABLE; ``options``: gRPC channel arguments."""
        self._config = c = ConnectionConfig.make(target, api_key, tls, timeout, retry, options)
        self._channel = (
            grpc.insecure_channel(target, c.options)
            if c.credentials is None
            else grpc.secure_channel(target, c.credentials, c.options)
        )
        self._stub = self._STUB(self._channel)

    def _unary(self, method: Callable[..., Any], request: Any, timeout: float | None) -> Any:
        config = self._config
        deadline = config.deadline(timeout)
        attempt = 0
        while True:
            attempt += 1
            try:
                return method(request, timeout=deadline.remaining(), metadata=config.metadata)
            except grpc.RpcError as e:
                delay = retry_delay(config.retry, attempt, e, deadline)
                if delay is None:
                    raise from_rpc_error(e) from e
            time.sleep(delay)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self: _C) -> _C:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Client(_Connection):
    """Generation against a Baton server (``target`` is ``host:port``)."""

    _STUB = pb_grpc.BatonStub

    def generate(
        self,
        prompt: Prompt,
        params: SamplingParams | None = None,
        *,
        model: str | None = None,
        request_id: str | None = None,
        timeout: float | None = None,
    ) -> Completion:
        """Run a prompt (text, or token ids) to completion."""
        request = _convert.generate_request(prompt, None, params, model, request_id)
        return _convert.completion(self._unary(self._stub.Generate, request, timeout))

    def stream(
        self,
        prompt: Prompt,
        params: SamplingParams | None = None,
        *,
        model: str | None = None,
        request_id: str | None = None,
        timeout: float | None = None,
    ) -> Iterator[Chunk]:
        """Chunks as tokens are generated; the last has finish_reason and usage."""
        request = _convert.generate_request(prompt, None, params, model, request_id)
        return self._stream(request, self._config.deadline(timeout))

    @overload
    def chat(
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
    def chat(
        self,
        messages: Sequence[Message],
        params: SamplingParams | None = None,
        *,
        stream: Literal[True],
        model: str | None = None,
        request_id: str | None = None,
        timeout: float | None = None,
    ) -> Iterator[Chunk]: ...

    def chat(
        self,
        messages: Sequence[Message],
        params: SamplingParams | None = None,
        *,
        stream: bool = False,
        model: str | None = None,
        request_id: str | None = None,
        timeout: float | None = None,
    ) -> Completion | Iterator[Chunk]:
        """A conversation rendered with the model's chat template."""
        request = _convert.generate_request(None, messages, params, model, request_id)
        if stream:
            return self._stream(request, self._config.deadline(timeout))
        return _convert.completion(self._unary(self._stub.Generate, request, timeout))

    def models(self, *, timeout: float | None = None) -> list[ModelInfo]:
        reply = self._unary(self._stub.ListModels, pb.ListModelsRequest(), timeout)
        return _convert.models(reply)

    def _stream(self, request: pb.GenerateRequest, deadline: Deadline) -> Iterator[Chunk]:
        config = self._config
        attempt = 0
        while True:
            attempt += 1
            call = self._stub.GenerateStream(
                request, timeout=deadline.remaining(), metadata=config.metadata
            )
            started = False
            try:
                for message in call:
                    started = True
                    yield _convert.chunk(message)
                return
            except grpc.RpcError as e:
                delay = None if started else retry_delay(config.retry, attempt, e, deadline)
                if delay is None:
                    raise from_rpc_error(e) from e
            finally:
                call.cancel()  # a no-op once the call is over; otherwise it aborts the request
            time.sleep(delay)


class AdminClient(_Connection):
    """The cluster's state, from the ``BatonAdmin`` service."""

    _STUB = pb_grpc.BatonAdminStub

    def status(self, *, timeout: float | None = None) -> ClusterStatus:
        reply = self._unary(self._stub.Status, pb.StatusRequest(), timeout)
        return _convert.status(reply)

    # Operations: each returns the server's one-line message (or rows); see baton.proto.

    def cordon(self, instance: str, *, timeout: float | None = None) -> str:
        request = pb.InstanceRequest(instance=instance)
        return str(self._unary(self._stub.Cordon, request, timeout).message)

    def uncordon(self, instance: str, *, timeout: float | None = None) -> str:
        request = pb.InstanceRequest(instance=instance)
        return str(self._unary(self._stub.Uncordon, request, timeout).message)

    def drain(
        self, instance: str, timeout_s: float | None = None, *, timeout: float | None = None
    ) -> str:
        """Returns once the instance is gone (``timeout``: the call's own deadline)."""
        request = pb.DrainRequest(instance=instance, timeout_s=timeout_s)
        return str(self._unary(self._stub.Drain, request, timeout).message)

    def scale(
        self,
        prefill: int | None = None,
        decode: int | None = None,
        *,
        dry_run: bool = False,
        drain_timeout_s: float | None = None,
        timeout: float | None = None,
    ) -> list[dict[str, int | str]]:
        """Per pool changed: {"role", "running", "desired"}."""
        request = pb.ScaleRequest(
            prefill=prefill, decode=decode, dry_run=dry_run, drain_timeout_s=drain_timeout_s
        )
        reply = self._unary(self._stub.Scale, request, timeout)
        return [{"role": c.role, "running": c.running, "desired": c.desired} for c in reply.changes]

    def requests(self, *, timeout: float | None = None) -> list[dict[str, object]]:
        reply = self._unary(self._stub.ListRequests, pb.ListRequestsRequest(), timeout)
        return [
            {"request_id": r.request_id, "state": r.state, "instances": list(r.instances),
             "tokens": r.tokens, "age_s": r.age_s, "migrations": r.migrations}
            for r in reply.requests
        ]  # fmt: skip

    def abort(self, request_id: str, *, timeout: float | None = None) -> str:
        request = pb.AbortRequest(request_id=request_id)
        return str(self._unary(self._stub.Abort, request, timeout).message)
