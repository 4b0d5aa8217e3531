"""The SDK's request and response types: frozen dataclasses, no protobuf in sight.

The field names follow the server's (and vLLM's). The SDK does not validate sampling
values itself: the server does, and answers INVALID_ARGUMENT naming the field, so one
set of rules holds for every client.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

Message = Mapping[str, str]  # {"role": "user", "content": "..."}
Prompt = str | Sequence[int]  # text, or token ids


@dataclass(frozen=True)
class StructuredOutput:
    """An output constraint the server enforces with a grammar: ``kind`` is "json"
    (``spec`` a JSON schema as text), "json_object", "regex", "choice" (``spec`` a JSON
    array of strings) or "grammar" (Lark). Build one with the class methods."""

    kind: str
    spec: str = ""

    @classmethod
    def json_schema(cls, schema: Mapping[str, Any]) -> StructuredOutput:
        return cls("json", json.dumps(schema))

    @classmethod
    def json_object(cls) -> StructuredOutput:
        return cls("json_object")

    @classmethod
    def regex(cls, pattern: str) -> StructuredOutput:
        return cls("regex", pattern)

    @classmethod
    def choice(cls, options: Sequence[str]) -> StructuredOutput:
        return cls("choice", json.dumps(list(options)))


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens. A field left at None takes the server's default (max_tokens
    16, temperature 1.0, top_p 1.0, top_k -1, min_p 0.0, penalties off, no logprobs,
    skip_special_tokens True). ``temperature=0`` is greedy. ``stop`` takes a str or a
    sequence of str and is stored as a tuple."""

    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    seed: int | None = None
    repetition_penalty: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    stop: Sequence[str] = ()
    stop_token_ids: Sequence[int] = ()
    ignore_eos: bool | None = None
    logprobs: int | None = None  # the top-N per token, 0..20
    skip_special_tokens: bool | None = None
    min_tokens: int | None = None  # EOS and stop ids masked until this many tokens
    logit_bias: Mapping[int, float] | None = None  # token id -> bias in [-100, 100]
    allowed_token_ids: Sequence[int] = ()  # empty: any token
    bad_words: Sequence[str] = ()
    include_stop_str_in_output: bool | None = None
    structured_output: StructuredOutput | None = None
    # vLLM's prompt_logprobs: each prompt token's logprob and the top-N (0..20) at its
    # position (Completion.prompt_logprobs); the prompt is then computed in full.
    prompt_logprobs: int | None = None
    # Sequences for the prompt, 1..16 (None: 1): computed once, its KV shared; a seeded
    # request gives sequence i the seed + i. See Completion.sequences and Chunk.index.
    n: int | None = None

    def __post_init__(self) -> None:
        # Frozen: the normalised sequences are written once, here, so instances hash.
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)
        object.__setattr__(self, "stop", stop)
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        object.__setattr__(self, "allowed_token_ids", tuple(self.allowed_token_ids))
        object.__setattr__(self, "bad_words", tuple(self.bad_words))


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0  # prompt tokens served from the prefix cache

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass(frozen=True)
class TokenLogprob:
    token_id: int
    logprob: float
    token: str = ""  # the token's text (U+FFFD where it holds part of a character)
    bytes: bytes = b""  # its exact UTF-8 bytes
    rank: int = 0  # prompt_logprobs only: 1 = the most likely token (0: not given)


@dataclass(frozen=True)
class Logprobs:
    """One generated token's logprobs, of the model's raw distribution."""

    sampled: TokenLogprob
    top: tuple[TokenLogprob, ...] = ()  # best first


@dataclass(frozen=True)
class Completion:
    request_id: str
    model: str
    text: str
    token_ids: tuple[int, ...]
    finish_reason: str | None  # "stop" | "length" | "abort"
    usage: Usage
    logprobs: tuple[Logprobs, ...] | None = None  # one per token, when asked for
    # n > 1: every sequence by index (the fields above are sequence 0's; usage counts
    # the prompt once and every sequence's tokens).
    sequences: tuple[SequenceOutput, ...] = ()
    # When asked for: one per prompt token after the first; sampled is the prompt's token.
    prompt_logprobs: tuple[Logprobs, ...] | None = None


@dataclass(frozen=True)
class SequenceOutput:
    """One of the n sequences of a request."""

    index: int
    text: str
    token_ids: tuple[int, ...]
    finish_reason: str | None
    logprobs: tuple[Logprobs, ...] | None = None


@dataclass(frozen=True)
class Chunk:
    """What one stream message adds. Text can lag the tokens (an incomplete character, a
    possible stop string); the chunks' text concatenated is the completion's text."""

    request_id: str
    text: str
    token_ids: tuple[int, ...]
    finish_reason: str | None = None  # set on the last chunk only
    usage: Usage | None = None  # set on the last chunk only
    logprobs: tuple[Logprobs, ...] | None = None
    # n > 1: the sequence this chunk extends; finish_reason ends each sequence, usage
    # (every sequence's) comes on the last chunk of the stream.
    index: int = 0
    prompt_logprobs: tuple[Logprobs, ...] | None = None  # on the chunk of the first token


@dataclass(frozen=True)
class ModelInfo:
    id: str
    max_model_len: int
    created: int  # unix seconds


@dataclass(frozen=True)
class InstanceStatus:
    name: str
    role: str  # "prefill" | "decode" | "colocated"
    health: str  # "serving" | "restarting" | "dead"
    num_waiting: int
    num_running: int
    free_blocks: int
    total_blocks: int
    kv_usage: float  # fraction of KV blocks in use
    num_preemptions: int
    counters: Mapping[str, float] = field(default_factory=dict)
    node_id: str = ""  # the Ray node of its rank 0 ("" while it is not serving)
    node_ip: str = ""
    tp: int = 1
    pp: int = 1
    # starting | ready | cordoned | draining | restarting | unresponsive | dead
    state: str = ""
    pid: int = 0
    step_time_ms: float = 0.0
    dtype: str = ""  # its weights and KV cache ("bfloat16", ...; "" before it serves)


@dataclass(frozen=True)
class PoolStatus:
    role: str
    instances: tuple[InstanceStatus, ...]
    num_waiting: int
    num_running: int
    free_blocks: int
    total_blocks: int
    kv_usage: float


@dataclass(frozen=True)
class SLOWindow:
    """The router's attainment over the requests that finished in one window."""

    window: str  # "1m" | "5m" | "60m"
    judged: int  # requests finished ok and judged against the targets
    joint: float | None  # share meeting both SLOs; None when nothing was judged
    ttft: float | None
    tpot: float | None


@dataclass(frozen=True)
class SLOStatus:
    ttft_target_s: float
    tpot_target_s: float
    objective: float  # share of requests that must meet both
    windows: tuple[SLOWindow, ...]  # shortest first


@dataclass(frozen=True)
class ClusterStatus:
    model: str
    mode: str  # "disaggregated" | "colocated"
    transport: str
    pools: tuple[PoolStatus, ...]
    counters: Mapping[str, float] = field(default_factory=dict)  # migrations by cause
    slo: SLOStatus | None = None  # the router's live attainment; None: no SLO targets

    @property
    def instances(self) -> tuple[InstanceStatus, ...]:
        return tuple(i for pool in self.pools for i in pool.instances)
