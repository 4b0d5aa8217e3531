"""The public gRPC API (``baton.v1``) over a :class:`~router.service.Router`.

One grpc.aio server carries ``baton.v1.Baton`` (generate, stream, models),
``baton.v1.BatonAdmin`` (the cluster's state), the standard ``grpc.health.v1.Health``
(SERVING once started, NOT_SERVING from the start of shutdown) and server reflection, so
that stock tools (grpcurl, grpc_health_probe) work against it.

A request's life here: the wire request becomes a ``GenerateInput`` (see
:mod:`router.grpc_wire`), the handler iterates ``Router.stream`` and writes what each
snapshot adds. A client that cancels, or whose deadline passes, gets its handler task
cancelled by grpc; that closes the router's stream, which aborts the request on every
instance. Every failure is a ``RouterError``, answered with the status code of
``router.errors.ERROR_TABLE``; anything else is a bug of ours, logged and answered
INTERNAL, and the server keeps serving.
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import AsyncGenerator, Awaitable, Callable
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any, NoReturn, TypeVar, cast

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from baton.v1 import baton_pb2 as pb
from baton.v1 import baton_pb2_grpc as pb_grpc
from engine.outputs import RequestOutput
from router import grpc_group
from router import grpc_wire as wire
from router.errors import ErrorKind, RouterError
from router.grpc_group import requested_n
from router.service import Router
from router.slo_status import slo_status
from router.tokenize_api import VocabularySource
from router.vocabulary import Vocabulary

logger = logging.getLogger(__name__)

API_SERVICES = tuple(s.full_name for s in pb.DESCRIPTOR.services_by_name.values())
ADMIN_SERVICE = pb.DESCRIPTOR.services_by_name["BatonAdmin"].full_name
HEALTH_SERVICE = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
_T = TypeVar("_T")


@dataclass(frozen=True)
class ServerTLS:
    """PEM files; with ``client_ca_file`` clients must present a certificate it signed."""

    cert_file: str
    key_file: str
    client_ca_file: str | None = None

    def credentials(self) -> grpc.ServerCredentials:
        def read(path: str) -> bytes:
            with open(path, "rb") as f:
                return f.read()

        ca = None if self.client_ca_file is None else read(self.client_ca_file)
        return grpc.ssl_server_credentials(
            [(read(self.key_file), read(self.cert_file))],
            root_certificates=ca,
            require_client_auth=ca is not None,
        )


async def _abort(context: grpc.aio.ServicerContext, err: RouterError) -> NoReturn:
    await context.abort(grpc.StatusCode[err.mapping.grpc_code], err.message)
    raise AssertionError("unreachable: context.abort raises")


async def _answer(context: grpc.aio.ServicerContext, work: Awaitable[_T]) -> _T:
    """``work``'s result, or the call aborted with the status its failure maps to."""
    try:
        return await work
    except RouterError as e:
        await _abort(context, e)
    except Exception:
        logger.exception("grpc: a request failed inside the server")
        await _abort(context, RouterError(ErrorKind.INTERNAL, "internal error"))


def _outputs(router: Router, request: pb.GenerateRequest) -> aclosing[Any]:
    """The router's stream, closed on leaving the block: on a cancel this aborts the
    request at once instead of whenever the generator is collected."""
    try:
        generate_input = wire.generate_input(request)
    except RouterError:
        router.rejected()  # refused before the router saw it: still one outcome
        raise
    return aclosing(cast(AsyncGenerator[RequestOutput, None], router.stream(generate_input)))


class BatonServicer(pb_grpc.BatonServicer):
    def __init__(self, router: Router):
        self.router = router
        self.vocabulary = VocabularySource(router)  # logprobs' token text

    async def _vocab(self, request: pb.GenerateRequest) -> Vocabulary | None:
        params = request.params
        wanted = params.HasField("logprobs") or params.HasField("prompt_logprobs")
        return await self.vocabulary.get() if wanted else None

    async def Generate(  # noqa: N802 (grpc's method names)
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> pb.GenerateResponse:
        async def run() -> pb.GenerateResponse:
            n = requested_n(self.router, request)
            if n > 1:
                vocab = await self._vocab(request)
                return await grpc_group.generate(self.router, request, n, vocab)
            last = None
            async with _outputs(self.router, request) as outputs:
                async for out in outputs:
                    last = out
            if last is None:
                raise RouterError(ErrorKind.INTERNAL, "the request produced no output")
            return wire.response(last, self.router.model_name, await self._vocab(request))

        return await _answer(context, run())

    async def GenerateStream(  # noqa: N802
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> None:
        async def run() -> None:
            n = requested_n(self.router, request)
            vocab = await self._vocab(request)
            if n > 1:
                await grpc_group.stream(self.router, request, n, vocab, context.write)
                return
            async with _outputs(self.router, request) as outputs:
                async for out in outputs:
                    if out.new_token_ids or out.delta_text or out.finished:
                        await context.write(wire.chunk(out, vocab))

        await _answer(context, run())

    async def ListModels(  # noqa: N802
        self, request: pb.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListModelsResponse:
        async def run() -> pb.ListModelsResponse:
            return wire.models(self.router.models())

        return await _answer(context, run())


class BatonAdminServicer(pb_grpc.BatonAdminServicer):
    def __init__(self, router: Router):
        self.router = router

    async def Status(  # noqa: N802
        self, request: pb.StatusRequest, context: grpc.aio.ServicerContext
    ) -> pb.StatusResponse:
        async def run() -> pb.StatusResponse:
            out = wire.status(await self.router.status())
            slo = slo_status(self.router)
            if slo is not None:
                out.slo.CopyFrom(slo)
            return out

        return await _answer(context, run())


async def _unauthenticated(request: Any, context: grpc.aio.ServicerContext) -> None:
    await _abort(context, RouterError(ErrorKind.UNAUTHENTICATED, "missing or wrong api key"))


_HANDLER_KINDS: dict[tuple[bool, bool], Callable[..., grpc.RpcMethodHandler]] = {
    (False, False): grpc.unary_unary_rpc_method_handler,
    (False, True): grpc.unary_stream_rpc_method_handler,
    (True, False): grpc.stream_unary_rpc_method_handler,
    (True, True): grpc.stream_stream_rpc_method_handler,
}


class ApiKeyInterceptor(grpc.aio.ServerInterceptor):
    """Refuses calls without ``authorization: Bearer <key>``; health checks are exempt,
    so that load balancers and probes need no secret."""

    def __init__(self, api_key: str | None, admin_key: str | None = None):
        """``admin_key``: when set, ``BatonAdmin`` takes only it (a client's key cannot
        drain the cluster); it opens the generation API too. Without it, the api key
        opens both."""
        self._keys = [f"Bearer {k}".encode() for k in (api_key, admin_key) if k is not None]
        self._admin = None if admin_key is None else [f"Bearer {admin_key}".encode()]

    def _authorized(self, metadata: Any, method: str = "") -> bool:
        admin = self._admin is not None and method.startswith(f"/{ADMIN_SERVICE}/")
        expected = self._admin if admin and self._admin is not None else self._keys
        if not expected:
            return True  # only an admin key is set and this is not an admin call
        for key, value in metadata or ():
            if key == "authorization":
                given = value.encode() if isinstance(value, str) else bytes(value)
                # compare_digest against each: no timing oracle
                return any([hmac.compare_digest(given, e) for e in expected])
        return False

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if (
            handler is None
            or details.method.startswith(f"/{HEALTH_SERVICE}/")
            or self._authorized(details.invocation_metadata, details.method)
        ):
            return handler
        make = _HANDLER_KINDS[(handler.request_streaming, handler.response_streaming)]
        return make(
            _unauthenticated,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )


class GrpcServer:
    """The running server; :meth:`stop` reports NOT_SERVING before draining."""

    def __init__(self, server: grpc.aio.Server, health_servicer: Any, port: int):
        self.server = server
        self.health = health_servicer
        self.port = port

    async def stop(self, grace: float | None = 5.0) -> None:
        """Refuse new calls and give running ones ``grace`` seconds to finish."""
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace)

    async def wait_for_termination(self, timeout: float | None = None) -> bool:
        return bool(await self.server.wait_for_termination(timeout))


async def start_grpc_server(
    router: Router,
    host: str = "127.0.0.1",
    port: int = 50051,
    *,
    api_key: str | None = None,
    tls: ServerTLS | grpc.ServerCredentials | None = None,
    admin_key: str | None = None,
) -> tuple[GrpcServer, int]:
    """Bind and start; returns the server and the bound port (``port=0`` picks one)."""
    keyed = api_key is not None or admin_key is not None
    interceptors = [ApiKeyInterceptor(api_key, admin_key)] if keyed else []
    # No SO_REUSEPORT: a second server on a taken port must fail, not share it.
    server = grpc.aio.server(interceptors=interceptors, options=[("grpc.so_reuseport", 0)])
    pb_grpc.add_BatonServicer_to_server(BatonServicer(router), server)
    from router.admin import AdminServicer  # it builds on this module's servicer

    pb_grpc.add_BatonAdminServicer_to_server(AdminServicer(router), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (*API_SERVICES, HEALTH_SERVICE, reflection.SERVICE_NAME), server
    )
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    if tls is None:
        bound = server.add_insecure_port(address)
    else:
        creds = tls.credentials() if isinstance(tls, ServerTLS) else tls
        bound = server.add_secure_port(address, creds)
    await server.start()
    for service in ("", *API_SERVICES):  # "": the server as a whole
        await health_servicer.set(service, health_pb2.HealthCheckResponse.SERVING)
    logger.info("grpc: serving %s on %s:%d", ", ".join(API_SERVICES), host, bound)
    return GrpcServer(server, health_servicer, bound), bound
