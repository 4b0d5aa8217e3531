"""``n`` > 1 through the cluster: one sequence group, n streams.

The prompt goes to one prefill instance once, as a group (``children``: the n request
ids ``<id>-<i>`` and their params; a seeded request gives sequence i the seed
``seed + i``, so each sequence is reproducible and they differ). The prefill instance
samples the n first tokens from the prompt's logits and hands the prompt's KV to one
decode instance once; there the n sequences fork off the pulled blocks (shared full
blocks, a copy each of the partial last one) and decode as requests of their own.

The router side sees n ordinary requests: each child has its own
:class:`~cluster.stream.RequestStream` (its own trace, so a migration moves each child
on its own, with its own params), and aborting one child aborts it everywhere it is.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import ray

from cluster.dispatch import RouteRequest
from cluster.stream import RequestStream, RequestTrace
from engine.outputs import RequestOutput
from engine.sampling_params import SamplingParams

if TYPE_CHECKING:
    from cluster.cluster import Cluster

MAX_N = 16


def child_params(params: SamplingParams, n: int) -> list[SamplingParams]:
    """Each sequence's params: seed + i when seeded (vLLM's convention), else the same."""
    if params.seed is None:
        return [params] * n
    return [replace(params, seed=params.seed + i) for i in range(n)]


def child_ids(request_id: str, n: int) -> list[str]:
    return [f"{request_id}-{i}" for i in range(n)]


class ChildStream:
    """One sequence's outputs; closing it before the end aborts that sequence (also when
    it was never iterated, unlike an async generator)."""

    def __init__(self, cluster: Cluster, stream: RequestStream, outputs: asyncio.Queue[Any]):
        self._cluster = cluster
        self.stream = stream
        self._outputs = outputs
        self._done = False

    def __aiter__(self) -> ChildStream:
        return self

    async def __anext__(self) -> RequestOutput:
        if self._done:
            raise StopAsyncIteration
        out: RequestOutput = await self._outputs.get()
        if out.finished:
            self._done = True
        return out

    async def aclose(self) -> None:
        self._done = True
        if not self.stream.finished:
            self._cluster.abort(self.stream.request_id)


def _send(
    cluster: Cluster,
    prompt: str | None,
    prompt_token_ids: Sequence[int] | None,
    params: SamplingParams,
    n: int,
    request_id: str,
    messages: list[dict[str, str]] | None,
) -> tuple[list[RequestStream], Any]:
    arrival = time.monotonic()
    receiver = cluster._require_started()
    ids = None if prompt_token_ids is None else list(prompt_token_ids)
    rids = child_ids(request_id, n)
    for rid in [request_id, *rids]:
        if receiver.get(rid) is not None:
            raise ValueError(f"request_id: {rid!r} is already running")
    text = prompt if messages is None else "".join(str(m) for m in messages)
    estimate = len(ids) if ids is not None else len(text or "") // 4
    from cluster.cluster import prefix_key

    first, dest = cluster._route(RouteRequest(request_id, estimate, prefix_key(ids, text)))
    per_child = child_params(params, n)
    streams = []
    for i, (rid, p) in enumerate(zip(rids, per_child, strict=True)):
        trace = RequestTrace(first.name if dest else None, (dest or first).name, arrival)
        # The prompt is queued once: only the first child counts it for routing.
        stream = RequestStream(rid, ids or [], trace, estimate if i == 0 else 0)
        stream.resubmit = dict(
            prompt=prompt, prompt_token_ids=ids, messages=messages, params=p.to_dict()
        )
        receiver.register(stream)
        streams.append(stream)
    ref = first.actor.add_request.remote(
        request_id,
        prompt,
        ids,
        per_child[0].to_dict(),
        None if dest is None else dest.name,
        messages,
        [(rid, p.to_dict()) for rid, p in zip(rids, per_child, strict=True)],
    )
    return streams, ref


async def stream_group(
    cluster: Cluster,
    prompt: str | None,
    params: SamplingParams | None,
    n: int,
    *,
    prompt_token_ids: Sequence[int] | None = None,
    messages: list[dict[str, str]] | None = None,
    request_id: str | None = None,
) -> list[ChildStream]:
    """Send a sequence group; once the first instance accepted it, one stream per
    sequence (index i: ``<request_id>-i``). ValueError naming the field, with nothing
    left running, when it cannot run."""
    params = params or SamplingParams()
    if not isinstance(params, SamplingParams):
        raise ValueError(f"params: must be SamplingParams, got {type(params).__name__}")
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_N:
        raise ValueError(f"n: must be an integer in [1, {MAX_N}], got {n!r}")
    from cluster.admission import when_serving

    rid = request_id or uuid.uuid4().hex
    streams, ref = await when_serving(
        lambda: _send(cluster, prompt, prompt_token_ids, params, n, rid, messages),
        cluster.admission_timeout_s,
    )
    loop = asyncio.get_running_loop()
    children = [ChildStream(cluster, s, s.attach_loop(loop)) for s in streams]
    try:
        try:
            reply = await ref
        except ray.exceptions.RayError as e:
            reply = e
        if isinstance(reply, dict) and "error" in reply and not reply.get("retry"):
            for s in streams:
                cluster._require_started().unregister(s.request_id)
            raise ValueError(reply["error"])
        for s in streams:
            cluster._accepted(s, reply)
    except BaseException:
        for child in children:
            await child.aclose()
        raise
    return children
