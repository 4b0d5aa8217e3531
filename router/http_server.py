"""The OpenAI-compatible HTTP API over a :class:`~router.service.Router`, on aiohttp.

Routes: ``POST /v1/completions`` and ``POST /v1/chat/completions`` (a JSON response,
or server-sent events with ``"stream": true``), ``GET /v1/models``, ``GET /health``
and ``GET /metrics`` (Prometheus text).

A request's path through a handler: the body is read (at most ``max_body_bytes``) and
parsed into an ``ApiRequest`` (``router.openai_protocol``); the handler opens
``Router.stream`` and waits for the first output before it answers anything, because
the instance checks the prompt (its length against the context, its token ids) when it
accepts the request: a bad request is then a plain 400, never a 200 stream that fails.
Then either the whole response, or one SSE chunk per output and ``data: [DONE]``.

A client that goes away: the runner cancels the handler's task (``handler_cancellation``),
and the output stream is held in ``aclosing``, so the cancellation closes
``Router.stream``, which aborts the request on every instance that holds it.

Errors: every ``RouterError`` is answered through the one table (``router.errors``):
its HTTP status and OpenAI error type. Anything else is a bug of ours: logged, and
answered 500 with the same body shape.
"""

from __future__ import annotations

import hmac
import logging
import uuid
from collections.abc import AsyncGenerator
from contextlib import aclosing
from typing import Any, cast

from aiohttp import web
from aiohttp.typedefs import Handler
from prometheus_client import CONTENT_TYPE_LATEST

from engine.outputs import RequestOutput
from router import dashboard
from router.errors import ErrorKind, RouterError
from router.metrics import RouterMetrics
from router.openai_protocol import (
    ApiRequest,
    TokenText,
    invalid,
    parse_chat,
    parse_completion,
    parse_json_body,
)
from router.openai_response import SSE_DONE, ResponseBuilder, error_body, sse
from router.parallel_sampling import answer_n
from router.service import Router
from router.tokenize_api import VocabularySource, detokenize, render_chat, tokenize

logger = logging.getLogger(__name__)

# Enough for a 128k-token context sent as an array of token ids (~7 bytes each).
MAX_BODY_BYTES = 4 << 20
# Paths anyone may read: load balancers and Prometheus carry no API key.
OPEN_PATHS = frozenset({"/health", "/metrics"})


def error_response(error: RouterError) -> web.Response:
    return web.json_response(error_body(error), status=error.mapping.http_status)


class OpenAIHandlers:
    def __init__(
        self,
        router: Router,
        metrics: RouterMetrics | None = None,
        api_key: str | None = None,
        token_text: TokenText | None = None,
        max_body_bytes: int = MAX_BODY_BYTES,
    ):
        self.router = router
        self.metrics = metrics
        self.api_key = api_key
        self.token_text = token_text
        self.max_body_bytes = max_body_bytes
        self.vocabulary = VocabularySource(router)  # token text, echo, /tokenize

    # -- middlewares -------------------------------------------------------------------

    @web.middleware
    async def errors(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            return await handler(request)
        except RouterError as e:
            return error_response(e)
        except web.HTTPNotFound:
            message = f"path: no route for {request.method} {request.path}"
            return error_response(RouterError(ErrorKind.NOT_FOUND, message, "path"))
        except web.HTTPException:  # 405 and the like: aiohttp's own answer
            raise
        except Exception:
            logger.exception("HTTP %s %s failed", request.method, request.path)
            return error_response(RouterError(ErrorKind.INTERNAL, "internal server error"))

    @web.middleware
    async def auth(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        # The dashboard's paths check the key (or its session) themselves.
        checked_later = request.path.startswith(dashboard.PREFIXES)
        if self.api_key is not None and request.path not in OPEN_PATHS and not checked_later:
            given = request.headers.get("Authorization", "")
            # Constant time: the comparison must not tell how much of a guess was right.
            if not hmac.compare_digest(given.encode(), f"Bearer {self.api_key}".encode()):
                raise RouterError(
                    ErrorKind.UNAUTHENTICATED,
                    "api_key: missing or wrong API key (send 'Authorization: Bearer <key>')",
                    "api_key",
                )
        return await handler(request)

    # -- handlers ----------------------------------------------------------------------

    async def completions(self, request: web.Request) -> web.StreamResponse:
        try:
            api = parse_completion(await self._body(request), uuid.uuid4().hex)
        except RouterError:
            self.router.rejected()  # refused before the router saw it: still one outcome
            raise
        return await self._answer(request, api)

    async def chat(self, request: web.Request) -> web.StreamResponse:
        try:
            api = parse_chat(await self._body(request), uuid.uuid4().hex)
        except RouterError:
            self.router.rejected()
            raise
        return await self._answer(request, api)

    async def tokenize(self, request: web.Request) -> web.Response:
        return web.json_response(await tokenize(self.vocabulary, await self._body(request)))

    async def detokenize(self, request: web.Request) -> web.Response:
        return web.json_response(await detokenize(self.vocabulary, await self._body(request)))

    async def models(self, request: web.Request) -> web.Response:
        data = [
            {
                "id": m.id,
                "object": "model",
                "created": m.created,
                "owned_by": "baton",
                "max_model_len": m.max_model_len,
            }
            for m in self.router.models()
        ]
        return web.json_response({"object": "list", "data": data})

    async def health(self, request: web.Request) -> web.Response:
        """200 while every role the cluster needs has a serving instance, else 503."""
        if self.router.shutting_down:
            raise RouterError(ErrorKind.UNAVAILABLE, "server: shutting down")
        cluster = self.router.cluster
        states = cluster.health()
        roles = {i.name: i.spec.role for i in cluster.instances}
        serving = {roles.get(name) for name, state in states.items() if state == "serving"}
        needed = {"prefill", "decode"} if cluster.mode == "disaggregated" else {"colocated"}
        if not needed <= serving:
            missing = ", ".join(sorted(needed - serving))
            message = f"cluster: no serving {missing} instance ({states})"
            raise RouterError(ErrorKind.UNAVAILABLE, message)
        all_up = all(state == "serving" for state in states.values())
        return web.json_response({"status": "ok" if all_up else "degraded", "instances": states})

    async def prometheus(self, request: web.Request) -> web.Response:
        if self.metrics is None:
            raise RouterError(ErrorKind.NOT_FOUND, "path: this server keeps no metrics", "path")
        await self.metrics.refresh(self.router)
        return web.Response(
            body=self.metrics.render(), headers={"Content-Type": CONTENT_TYPE_LATEST}
        )

    # -- the generation path -------------------------------------------------------------

    async def _body(self, request: web.Request) -> dict[str, Any]:
        try:
            raw = await request.read()
        except web.HTTPRequestEntityTooLarge as e:
            raise invalid("body", f"larger than the limit of {self.max_body_bytes} bytes") from e
        return parse_json_body(raw)

    async def _answer(self, request: web.Request, api: ApiRequest) -> web.StreamResponse:
        if api.template_messages is not None:  # tools or a chat_template: render here
            api = await render_chat(self.vocabulary, api)
        vocab = None
        spelled = api.logprobs or api.echo or api.prompt_logprobs is not None
        if self.token_text is None and spelled:
            vocab = await self.vocabulary.get()
        def make_builder(a: ApiRequest) -> ResponseBuilder:
            return ResponseBuilder(
                a,
                self.router.model_name,
                self.token_text or (vocab.text if vocab else None),
                vocab.bytes if vocab else None,
                vocab.detokenize if vocab else None,
            )

        if api.n > 1:
            return await answer_n(request, self.router, api, api.n, make_builder)
        builder = make_builder(api)
        # Router.stream is an async generator (its annotation says only AsyncIterator);
        # aclosing closes it on any exit, a cancellation included.
        stream = cast(AsyncGenerator[RequestOutput, None], self.router.stream(api.input))
        async with aclosing(stream) as outputs:
            try:
                first = await anext(outputs)
                if api.stream:
                    return await self._stream(request, api, builder, first, outputs)
                last = first
                async for out in outputs:
                    last = out
            except RouterError as e:
                raise api.client_error(e) from e
            except StopAsyncIteration:
                raise RouterError(ErrorKind.INTERNAL, "the request produced no output") from None
        return web.json_response(builder.response(last))

    async def _stream(
        self,
        request: web.Request,
        api: ApiRequest,
        builder: ResponseBuilder,
        out: RequestOutput,
        outputs: AsyncGenerator[RequestOutput, None],  # the rest of Router.stream
    ) -> web.StreamResponse:
        response = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
        )
        await response.prepare(request)
        try:
            while True:
                for chunk in builder.chunks(out):
                    await response.write(sse(chunk))
                if out.finished:
                    break
                out = await anext(outputs)
            if api.include_usage:
                await response.write(sse(builder.usage_chunk(out)))
        except ConnectionResetError:  # the client left; closing `outputs` aborts
            return response
        except Exception as e:  # the status line is gone: report in band, as vLLM does
            if not isinstance(e, RouterError):
                logger.exception("stream of %s failed", api.input.request_id)
                e = RouterError(ErrorKind.INTERNAL, "internal server error")
            await response.write(sse(error_body(api.client_error(e))))
        await response.write(SSE_DONE)
        await response.write_eof()
        return response


def create_app(
    router: Router,
    *,
    metrics: RouterMetrics | None = None,
    api_key: str | None = None,
    max_body_bytes: int = MAX_BODY_BYTES,
    token_text: TokenText | None = None,
) -> web.Application:
    h = OpenAIHandlers(router, metrics, api_key, token_text, max_body_bytes)
    app = web.Application(middlewares=[h.errors, h.auth], client_max_size=max_body_bytes)
    app.add_routes(
        [
            web.post("/v1/completions", h.completions),
            web.post("/v1/chat/completions", h.chat),
            web.get("/v1/models", h.models),
            web.post("/tokenize", h.tokenize),
            web.post("/detokenize", h.detokenize),
            web.get("/health", h.health),
            web.get("/metrics", h.prometheus),
        ]
    )
    dashboard.add_routes(app, router, metrics, api_key)  # /dashboard, /api/v1/slo
    return app


async def start_http_server(
    router: Router,
    host: str,
    port: int,
    *,
    metrics: RouterMetrics | None,
    api_key: str | None = None,
    max_body_bytes: int = MAX_BODY_BYTES,
    token_text: TokenText | None = None,
    shutdown_timeout_s: float = 10.0,
) -> tuple[web.AppRunner, int]:
    """Serve on ``host:port`` (0 picks a free port) in the running loop; returns the
    runner (``await runner.cleanup()`` stops it, letting streams finish for up to
    ``shutdown_timeout_s``) and the bound port. ``token_text`` spells a token id in
    logprobs; without it tokens read ``token_id:<id>``."""
    app = create_app(
        router,
        metrics=metrics,
        api_key=api_key,
        max_body_bytes=max_body_bytes,
        token_text=token_text,
    )
    # handler_cancellation: a client that disconnects cancels its handler, which aborts
    # the request in the cluster instead of generating for nobody.
    runner = web.AppRunner(app, handler_cancellation=True, shutdown_timeout=shutdown_timeout_s)
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port).start()
    except BaseException:
        await runner.cleanup()
        raise
    bound = runner.addresses[0][1]
    logger.info("OpenAI-compatible HTTP API on http://%s:%d/v1", host, bound)
    return runner, int(bound)
