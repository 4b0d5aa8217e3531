"""``n`` > 1: several sequences for one prompt, each with its own ``index``.

The router sends the n sequences as one sequence group (``Router.open_group``,
``cluster.groups``): the prompt is prefilled once, each sequence's first token sampled
from its logits, its KV sent once to one decode instance, where the sequences share the
prompt's blocks. Each sequence streams as a child request (ids ``<request id>-<i>``)
and this module merges their outputs into one response or one stream, each choice with
its ``index``. A seeded request gives sequence i the seed ``seed + i`` (so sequence i is
reproducible, and the sequences differ), as vLLM does.

A bad request is refused before the group is queued (a plain 400, nothing allocated),
and the first output of every child arrives before anything is answered. Leaving early
(a client that goes away) closes every child's stream, which aborts it everywhere.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from dataclasses import replace
from typing import Any, cast

from aiohttp import web

from engine.outputs import RequestOutput
from router.errors import ErrorKind, RouterError
from router.openai_protocol import ApiRequest
from router.openai_response import SSE_DONE, ResponseBuilder, error_body, sse
from router.service import Router


def children(api: ApiRequest, n: int) -> list[ApiRequest]:
    out = []
    for i in range(n):
        params = api.input.params
        if params.seed is not None:
            params = replace(params, seed=params.seed + i)
        rid = f"{api.input.request_id}-{i}"
        out.append(replace(api, input=replace(api.input, params=params, request_id=rid)))
    return out


class Merged:
    """The children's output streams, read concurrently into one queue."""

    def __init__(self, streams: list[AsyncIterator[RequestOutput]]):
        self.streams = [cast(AsyncGenerator[RequestOutput, None], s) for s in streams]
        self.queue: asyncio.Queue[tuple[int, RequestOutput | BaseException]] = asyncio.Queue()
        self.tasks: list[asyncio.Task[None]] = []

    async def _pump(self, i: int) -> None:
        try:
            async for out in self.streams[i]:
                await self.queue.put((i, out))
        except (RouterError, Exception) as e:
            await self.queue.put((i, e))

    def start(self) -> None:
        self.tasks = [asyncio.create_task(self._pump(i)) for i in range(len(self.streams))]

    async def next(self) -> tuple[int, RequestOutput]:
        i, item = await self.queue.get()
        if isinstance(item, BaseException):
            raise item
        return i, item

    async def close(self) -> None:
        for t in self.tasks:
            t.cancel()
        for t in self.tasks:
            with contextlib.suppress(BaseException):
                await t
        for s in self.streams:
            with contextlib.suppress(BaseException):
                await s.aclose()  # aborts a child still running


def _indexed(chunk: dict[str, Any], i: int, parent_id: str) -> dict[str, Any]:
    chunk["id"] = parent_id
    for choice in chunk.get("choices", []):
        choice["index"] = i
    return chunk


async def answer_n(
    request: web.Request,
    router: Router,
    api: ApiRequest,
    n: int,
    make_builder: Callable[[ApiRequest], ResponseBuilder],
) -> web.StreamResponse:
    apis = children(api, n)
    builders = [make_builder(a) for a in apis]
    parent = make_builder(api).id
    try:
        streams = await router.open_group(api.input, n)
    except RouterError as e:
        raise api.client_error(e) from e
    merged = Merged(streams)
    merged.start()
    try:
        pending: list[tuple[int, RequestOutput]] = []
        started: set[int] = set()
        try:
            while len(started) < n:  # every child accepted before the status line
                i, out = await merged.next()
                started.add(i)
                pending.append((i, out))
        except RouterError as e:
            raise api.client_error(e) from e
        if api.stream:
            return await _stream(request, api, builders, parent, merged, pending)
        last: dict[int, RequestOutput] = {}
        try:
            for i, out in pending:
                last[i] = out
            while not all(i in last and last[i].finished for i in range(n)):
                i, out = await merged.next()
                last[i] = out
        except RouterError as e:
            raise api.client_error(e) from e
        whole = [builders[i].response(last[i]) for i in range(n)]
        body = whole[0]
        body["id"] = parent
        body["choices"] = [_indexed(w, i, parent)["choices"][0] for i, w in enumerate(whole)]
        body["usage"] = _usage([last[i] for i in range(n)])
        return web.json_response(body)
    finally:
        await merged.close()


def _usage(outs: list[RequestOutput]) -> dict[str, Any]:
    prompt = len(outs[0].prompt_token_ids)
    completion = sum(len(o.token_ids) for o in outs)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": outs[0].num_cached_tokens},
    }


async def _stream(
    request: web.Request,
    api: ApiRequest,
    builders: list[ResponseBuilder],
    parent: str,
    merged: Merged,
    pending: list[tuple[int, RequestOutput]],
) -> web.StreamResponse:
    response = web.StreamResponse(
        headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
    )
    await response.prepare(request)
    n = len(builders)
    last: dict[int, RequestOutput] = {}
    try:
        while True:
            for i, out in pending:
                last[i] = out
                for chunk in builders[i].chunks(out):
                    await response.write(sse(_indexed(chunk, i, parent)))
            if len(last) == n and all(o.finished for o in last.values()):
                break
            pending = [await merged.next()]
        if api.include_usage:
            usage = builders[0].usage_chunk(last[0])
            usage["id"], usage["usage"] = parent, _usage([last[i] for i in range(n)])
            await response.write(sse(usage))
    except ConnectionResetError:
        return response
    except Exception as e:  # in band, as the one-sequence stream does
        if not isinstance(e, RouterError):
            e = RouterError(ErrorKind.INTERNAL, "internal server error")
        await response.write(sse(error_body(api.client_error(e))))
    await response.write(SSE_DONE)
    await response.write_eof()
    return response
