"""Between ``baton.v1`` messages and the router's types, for the gRPC servicers.

A request that cannot be read (no prompt, a sampling value out of range) raises
``RouterError.invalid`` naming the field, so that it is answered INVALID_ARGUMENT.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from baton.v1 import baton_pb2 as pb
from engine.outputs import InstanceStats, RequestOutput
from engine.sampling_params import SamplingParams
from router.errors import RouterError
from router.service import ClusterStatus, GenerateInput, ModelInfo
from router.vocabulary import Vocabulary

# Repeated and map fields (empty means "none"); every other sampling field is optional.
_REPEATED = ("stop", "stop_token_ids", "allowed_token_ids", "bad_words", "logit_bias")
FINISH_REASONS = {
    "stop": pb.FINISH_REASON_STOP,
    "length": pb.FINISH_REASON_LENGTH,
    "abort": pb.FINISH_REASON_ABORT,
}
ROLE_ORDER = ("prefill", "decode", "colocated")  # pools in the order a request meets them
HEALTH = {
    "serving": pb.INSTANCE_HEALTH_SERVING,
    "restarting": pb.INSTANCE_HEALTH_RESTARTING,
    "dead": pb.INSTANCE_HEALTH_DEAD,
    "unresponsive": pb.INSTANCE_HEALTH_UNRESPONSIVE,
}


def sampling_params(message: pb.SamplingParams) -> SamplingParams:
    """The fields the client set; the rest keep the engine's defaults."""
    data: dict[str, Any] = {}
    for f in message.DESCRIPTOR.fields:
        if f.name == "logit_bias":
            if message.logit_bias:
                data[f.name] = dict(message.logit_bias)
        elif f.name in _REPEATED:
            values = list(getattr(message, f.name))
            if values:
                data[f.name] = values
        elif f.name == "structured_output":
            if message.HasField(f.name):
                so = message.structured_output
                data[f.name] = {"kind": so.kind, "spec": so.spec}
        elif message.HasField(f.name):
            data[f.name] = getattr(message, f.name)
    try:
        return SamplingParams.from_dict(data)
    except ValueError as e:
        raise RouterError.invalid(str(e)) from e


def generate_input(request: pb.GenerateRequest) -> GenerateInput:
    params = sampling_params(request.params)
    model = request.model or None
    request_id = request.request_id or None
    which = request.WhichOneof("input")
    if which == "prompt":
        return GenerateInput(model, prompt=request.prompt, params=params, request_id=request_id)
    if which == "prompt_token_ids":
        ids = list(request.prompt_token_ids.ids)
        return GenerateInput(model, prompt_token_ids=ids, params=params, request_id=request_id)
    if which == "messages":
        messages = [{"role": m.role, "content": m.content} for m in request.messages.messages]
        return GenerateInput(model, messages=messages, params=params, request_id=request_id)
    raise RouterError.invalid("prompt: give one of prompt, prompt_token_ids or messages")


def usage(out: RequestOutput) -> pb.Usage:
    return pb.Usage(
        prompt_tokens=len(out.prompt_token_ids),
        completion_tokens=len(out.token_ids),
        cached_tokens=out.num_cached_tokens,
    )


def logprobs(
    items: Sequence[Sequence[tuple[int, float]]], vocab: Vocabulary | None = None
) -> list[pb.Logprobs]:
    """The engine's per-token lists: the sampled token first, then the top-N; each
    token's text and bytes when the vocabulary is given."""

    def one(token: int, lp: float) -> pb.TokenLogprob:
        if vocab is None:
            return pb.TokenLogprob(token_id=token, logprob=lp)
        data = vocab.bytes(token)
        text = data.decode("utf-8", errors="replace")
        return pb.TokenLogprob(token_id=token, logprob=lp, token=text, bytes=data)

    return [
        pb.Logprobs(sampled=one(*item[0]), top=[one(t, lp) for t, lp in item[1:]])
        for item in items
        if item
    ]


def prompt_logprobs(
    rows: Sequence[Sequence[tuple[int, float, int]]] | None, vocab: Vocabulary | None = None
) -> list[pb.Logprobs]:
    """The engine's prompt_logprobs rows: the prompt's token, then the top-N; with ranks."""
    out = []
    for row in rows or []:
        [item] = logprobs([[(t, lp) for t, lp, _ in row]], vocab)
        item.sampled.rank = row[0][2]
        for entry, (_, _, rank) in zip(item.top, row[1:], strict=True):
            entry.rank = rank
        out.append(item)
    return out


def finish_reason(out: RequestOutput) -> pb.FinishReason:
    if not out.finished:
        return pb.FINISH_REASON_UNSPECIFIED
    return FINISH_REASONS.get(out.finish_reason or "abort", pb.FINISH_REASON_ABORT)


def response(
    out: RequestOutput, model: str, vocab: Vocabulary | None = None
) -> pb.GenerateResponse:
    return pb.GenerateResponse(
        request_id=out.request_id,
        model=model,
        text=out.text,
        token_ids=out.token_ids,
        finish_reason=finish_reason(out),
        usage=usage(out),
        logprobs=logprobs(out.logprobs or [], vocab),
        prompt_logprobs=prompt_logprobs(out.prompt_logprobs, vocab),
    )


def chunk(out: RequestOutput, vocab: Vocabulary | None = None) -> pb.GenerateStreamResponse:
    """What ``out`` adds to the stream; ``out.logprobs`` holds every token's so far."""
    new = out.new_token_ids
    message = pb.GenerateStreamResponse(
        request_id=out.request_id,
        text=out.delta_text,
        token_ids=new,
        logprobs=logprobs(
            out.logprobs[len(out.logprobs) - len(new) :] if out.logprobs else [], vocab
        ),
        finish_reason=finish_reason(out),
    )
    if new and len(new) == len(out.token_ids):  # the first token: the prompt's logprobs
        message.prompt_logprobs.extend(prompt_logprobs(out.prompt_logprobs, vocab))
    if out.finished:
        message.usage.CopyFrom(usage(out))
    return message


def models(infos: Sequence[ModelInfo]) -> pb.ListModelsResponse:
    return pb.ListModelsResponse(
        models=[
            pb.ModelInfo(id=m.id, max_model_len=m.max_model_len, created=m.created) for m in infos
        ]
    )


def _kv_usage(free: int, total: int) -> float:
    return 1.0 - free / total if total else 0.0


def _instance(name: str, stats: InstanceStats | None, health: str) -> pb.InstanceStatus:
    out = pb.InstanceStatus(
        name=name,
        # An instance that is not serving reports no stats; its name says its role.
        role=stats.role if stats else name.rsplit("-", 1)[0],
        health=HEALTH.get(health, pb.INSTANCE_HEALTH_UNSPECIFIED),
    )
    if stats is not None:
        out.num_waiting = stats.num_waiting
        out.num_running = stats.num_running
        out.free_blocks = stats.free_blocks
        out.total_blocks = stats.total_blocks
        out.kv_usage = _kv_usage(stats.free_blocks, stats.total_blocks)
        out.num_preemptions = stats.num_preemptions
        out.counters.update({k: float(v) for k, v in stats.counters.items()})
        out.node_id, out.node_ip, out.tp, out.pp = (
            stats.node_id, stats.node_ip, stats.tp, stats.pp
        )
    return out


def status(s: ClusterStatus) -> pb.StatusResponse:
    stats = {i.name: i for i in s.instances}
    pools: dict[str, pb.PoolStatus] = {}
    for name in sorted(set(stats) | set(s.health) | set(s.states)):
        inst = _instance(name, stats.get(name), s.health.get(name, "serving"))
        _operations(inst, s, stats.get(name))
        pool = pools.setdefault(inst.role, pb.PoolStatus(role=inst.role))
        pool.instances.append(inst)
        pool.num_waiting += inst.num_waiting
        pool.num_running += inst.num_running
        pool.free_blocks += inst.free_blocks
        pool.total_blocks += inst.total_blocks
    for pool in pools.values():
        pool.kv_usage = _kv_usage(pool.free_blocks, pool.total_blocks)
    rank = {role: i for i, role in enumerate(ROLE_ORDER)}
    ordered = sorted(pools.values(), key=lambda p: (rank.get(p.role, len(rank)), p.role))
    return pb.StatusResponse(
        model=s.model, mode=s.mode, transport=s.transport, pools=ordered,
        counters={k: float(v) for k, v in s.counters.items()},
    )  # fmt: skip


def _operations(inst: pb.InstanceStatus, s: ClusterStatus, stats: InstanceStats | None) -> None:
    """What ``baton status`` adds: the operator's state, pid, dtype and mean step time."""
    inst.state = s.states.get(inst.name, "")
    inst.pid = s.pids.get(inst.name, 0)
    inst.dtype = s.dtypes.get(inst.name, "")
    if stats is not None and stats.counters.get("steps"):
        inst.step_time_ms = 1e3 * stats.counters["step_seconds"] / stats.counters["steps"]
