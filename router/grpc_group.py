"""``n`` > 1 over ``baton.v1``: one sequence group (``Router.open_group``), its
sequences merged into one response (``GenerateResponse.sequences``) or one stream
(each message with its sequence's ``index``)."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Coroutine
from dataclasses import replace
from typing import Any

from baton.v1 import baton_pb2 as pb
from engine.outputs import RequestOutput
from router import grpc_wire as wire
from router.errors import RouterError
from router.openai_extras import MAX_N
from router.parallel_sampling import Merged
from router.service import Router
from router.vocabulary import Vocabulary


def requested_n(router: Router, request: pb.GenerateRequest) -> int:
    """The request's ``n`` (1 when unset); INVALID_ARGUMENT naming it when out of range."""
    if not request.HasField("n"):
        return 1
    if not 1 <= request.n <= MAX_N:
        router.rejected()
        raise RouterError.invalid(f"n: must be in [1, {MAX_N}], got {request.n}", "n")
    return request.n


async def _open(router: Router, request: pb.GenerateRequest, n: int) -> tuple[str, Merged]:
    try:
        generate_input = wire.generate_input(request)
    except RouterError:
        router.rejected()
        raise
    request_id = generate_input.request_id or uuid.uuid4().hex
    streams = await router.open_group(replace(generate_input, request_id=request_id), n)
    merged = Merged(streams)
    merged.start()
    return request_id, merged


def _usage(outs: list[RequestOutput]) -> pb.Usage:
    u = wire.usage(outs[0])
    u.completion_tokens = sum(len(o.token_ids) for o in outs)
    return u


async def generate(
    router: Router, request: pb.GenerateRequest, n: int, vocab: Vocabulary | None
) -> pb.GenerateResponse:
    request_id, merged = await _open(router, request, n)
    last: dict[int, RequestOutput] = {}
    try:
        while len(last) < n or not all(o.finished for o in last.values()):
            i, out = await merged.next()
            last[i] = out
    finally:
        await merged.close()
    outs = [last[i] for i in range(n)]
    response = wire.response(outs[0], router.model_name, vocab)
    response.request_id = request_id
    response.usage.CopyFrom(_usage(outs))
    for i, out in enumerate(outs):
        response.sequences.append(
            pb.SequenceOutput(
                index=i,
                text=out.text,
                token_ids=out.token_ids,
                finish_reason=wire.finish_reason(out),
                logprobs=wire.logprobs(out.logprobs or [], vocab),
            )
        )
    return response


async def stream(
    router: Router,
    request: pb.GenerateRequest,
    n: int,
    vocab: Vocabulary | None,
    write: Callable[[pb.GenerateStreamResponse], Coroutine[Any, Any, None]],
) -> None:
    request_id, merged = await _open(router, request, n)
    last: dict[int, RequestOutput] = {}
    try:
        while len(last) < n or not all(o.finished for o in last.values()):
            i, out = await merged.next()
            last[i] = out
            if not (out.new_token_ids or out.delta_text or out.finished):
                continue
            message = wire.chunk(out, vocab)
            message.request_id, message.index = request_id, i
            message.ClearField("usage")
            if len(last) == n and all(o.finished for o in last.values()):
                message.usage.CopyFrom(_usage([last[j] for j in range(n)]))
            await write(message)
    finally:
        await merged.close()
