"""Between the SDK's types and the ``baton.v1`` messages.

A value protobuf cannot hold (a str for a float, a token id past 2**31) is the caller's
mistake: it raises :class:`~baton.errors.InvalidArgument` naming the field, as the
server would have.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence

from baton.errors import InvalidArgument
from baton.types import (
    Chunk,
    ClusterStatus,
    Completion,
    InstanceStatus,
    Logprobs,
    Message,
    ModelInfo,
    PoolStatus,
    Prompt,
    SamplingParams,
    SequenceOutput,
    SLOStatus,
    SLOWindow,
    TokenLogprob,
    Usage,
)
from baton.v1 import baton_pb2 as pb

FINISH_REASONS = {
    pb.FINISH_REASON_STOP: "stop",
    pb.FINISH_REASON_LENGTH: "length",
    pb.FINISH_REASON_ABORT: "abort",
}
HEALTH = {
    pb.INSTANCE_HEALTH_SERVING: "serving",
    pb.INSTANCE_HEALTH_RESTARTING: "restarting",
    pb.INSTANCE_HEALTH_DEAD: "dead",
    pb.INSTANCE_HEALTH_UNRESPONSIVE: "unresponsive",
}
# repeated fields: empty means "none"
_SEQUENCES = ("stop", "stop_token_ids", "allowed_token_ids", "bad_words")


def sampling_params(params: SamplingParams) -> pb.SamplingParams:
    out = pb.SamplingParams()
    for f in dataclasses.fields(params):
        value = getattr(params, f.name)
        try:
            if f.name in _SEQUENCES:
                getattr(out, f.name).extend(value or ())
            elif f.name == "logit_bias":
                out.logit_bias.update({int(k): float(v) for k, v in (value or {}).items()})
            elif f.name == "n":
                continue  # a field of the request (generate_request)
            elif f.name == "prompt_logprobs" and isinstance(value, bool):
                raise TypeError(f"must be an int, got bool {value!r}")
            elif f.name == "structured_output":
                if value is not None:
                    out.structured_output.kind = value.kind
                    out.structured_output.spec = value.spec
            elif value is not None:
                setattr(out, f.name, value)
        except (TypeError, ValueError) as e:
            raise InvalidArgument(f"{f.name}: {e}") from e
    return out


def _set_messages(request: pb.GenerateRequest, messages: Sequence[Message]) -> None:
    request.messages.SetInParent()  # an empty chat is still a chat (the server refuses it)
    for i, m in enumerate(messages):
        try:
            request.messages.messages.add(role=m["role"], content=m["content"])
        except (KeyError, TypeError, ValueError) as e:
            raise InvalidArgument(f"messages[{i}]: needs str role and content ({e})") from e


def generate_request(
    prompt: Prompt | None = None,
    messages: Sequence[Message] | None = None,
    params: SamplingParams | None = None,
    model: str | None = None,
    request_id: str | None = None,
) -> pb.GenerateRequest:
    """At most one of ``prompt`` (text or token ids) and ``messages``."""
    request = pb.GenerateRequest(model=model or "", request_id=request_id or "")
    if messages is not None:
        _set_messages(request, messages)
    elif isinstance(prompt, str):
        request.prompt = prompt
    elif prompt is not None:
        try:
            request.prompt_token_ids.SetInParent()
            request.prompt_token_ids.ids.extend(prompt)
        except (TypeError, ValueError) as e:
            raise InvalidArgument(f"prompt: must be a str or a sequence of int ({e})") from e
    if params is not None:
        if not isinstance(params, SamplingParams):
            raise InvalidArgument(f"params: must be SamplingParams, got {type(params).__name__}")
        request.params.CopyFrom(sampling_params(params))
        if params.n is not None:
            if isinstance(params.n, bool) or not isinstance(params.n, int) or params.n < 1:
                raise InvalidArgument(f"n: must be a positive integer, got {params.n!r}")
            request.n = params.n
    return request


def usage(u: pb.Usage) -> Usage:
    return Usage(u.prompt_tokens, u.completion_tokens, u.cached_tokens)


def logprobs(items: Iterable[pb.Logprobs]) -> tuple[Logprobs, ...] | None:
    def one(t: pb.TokenLogprob) -> TokenLogprob:
        return TokenLogprob(t.token_id, t.logprob, t.token, t.bytes, t.rank)

    out = tuple(Logprobs(one(x.sampled), tuple(one(t) for t in x.top)) for x in items)
    return out or None  # not asked for (or nothing generated)


def completion(r: pb.GenerateResponse) -> Completion:
    return Completion(
        request_id=r.request_id,
        model=r.model,
        text=r.text,
        token_ids=tuple(r.token_ids),
        finish_reason=FINISH_REASONS.get(r.finish_reason),
        usage=usage(r.usage),
        logprobs=logprobs(r.logprobs),
        sequences=tuple(
            SequenceOutput(
                s.index, s.text, tuple(s.token_ids),
                FINISH_REASONS.get(s.finish_reason), logprobs(s.logprobs),
            )  # fmt: skip
            for s in r.sequences
        ),
        prompt_logprobs=logprobs(r.prompt_logprobs),
    )


def chunk(r: pb.GenerateStreamResponse) -> Chunk:
    return Chunk(
        request_id=r.request_id,
        text=r.text,
        token_ids=tuple(r.token_ids),
        finish_reason=FINISH_REASONS.get(r.finish_reason),
        usage=usage(r.usage) if r.HasField("usage") else None,
        logprobs=logprobs(r.logprobs),
        index=r.index,
        prompt_logprobs=logprobs(r.prompt_logprobs),
    )


def models(r: pb.ListModelsResponse) -> list[ModelInfo]:
    return [ModelInfo(m.id, m.max_model_len, m.created) for m in r.models]


def _instance(i: pb.InstanceStatus) -> InstanceStatus:
    return InstanceStatus(
        name=i.name,
        role=i.role,
        health=HEALTH.get(i.health, "unknown"),
        num_waiting=i.num_waiting,
        num_running=i.num_running,
        free_blocks=i.free_blocks,
        total_blocks=i.total_blocks,
        kv_usage=i.kv_usage,
        num_preemptions=i.num_preemptions,
        counters=dict(i.counters),
        node_id=i.node_id,
        node_ip=i.node_ip,
        tp=i.tp or 1,
        pp=i.pp or 1,
        state=i.state,
        pid=i.pid,
        step_time_ms=i.step_time_ms,
        dtype=i.dtype,
    )


def status(r: pb.StatusResponse) -> ClusterStatus:
    pools = tuple(
        PoolStatus(
            role=p.role,
            instances=tuple(_instance(i) for i in p.instances),
            num_waiting=p.num_waiting,
            num_running=p.num_running,
            free_blocks=p.free_blocks,
            total_blocks=p.total_blocks,
            kv_usage=p.kv_usage,
        )
        for p in r.pools
    )
    slo = _slo(r.slo) if r.HasField("slo") else None
    return ClusterStatus(r.model, r.mode, r.transport, pools, dict(r.counters), slo)


def _slo(s: pb.SLOStatus) -> SLOStatus:
    def share(w: pb.SLOWindow, name: str) -> float | None:
        return getattr(w, name) if w.HasField(name) else None

    windows = tuple(
        SLOWindow(w.window, w.judged, share(w, "joint"), share(w, "ttft"), share(w, "tpot"))
        for w in s.windows
    )
    return SLOStatus(s.ttft_target_s, s.tpot_target_s, s.objective, windows)
