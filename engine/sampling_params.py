"""Per-request sampling settings, validated once when the request arrives.

A bad value raises ``ValueError`` naming the field and the value, so the HTTP/gRPC
front door can answer 400 with the message as is, before the request reaches a batch.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NoReturn

MAX_LOGPROBS = 20
LOGIT_BIAS_LIMIT = 100.0  # OpenAI's range: [-100, 100]
STRUCTURED_KINDS = ("json", "json_object", "regex", "choice", "grammar")
# torch.Generator.manual_seed accepts exactly this range.
_SEED_MIN, _SEED_MAX = -(2**63), 2**64 - 1


def _fail(name: str, message: str) -> NoReturn:
    raise ValueError(f"{name}: {message}")


def _type_name(value: object) -> str:
    return type(value).__name__


def _check_int(name: str, value: object) -> int:
    # bool is an int subclass; max_tokens=True is a client bug, not 1.
    if isinstance(value, bool) or not isinstance(value, int):
        _fail(name, f"must be an int, got {_type_name(value)} {value!r}")
    return value


def _check_float(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        _fail(name, f"must be a number, got {_type_name(value)} {value!r}")
    if not math.isfinite(value):
        _fail(name, f"must be finite, got {value!r}")
    return float(value)


def _check_bool(name: str, value: object) -> bool:
    if not isinstance(value, bool):
        _fail(name, f"must be a bool, got {_type_name(value)} {value!r}")
    return bool(value)


def _normalise_stop(value: object) -> tuple[str, ...]:
    if value is None:
        return ()
    items: tuple[object, ...]
    if isinstance(value, str):
        items = (value,)
    elif isinstance(value, (list, tuple)):
        items = tuple(value)
    else:
        raise ValueError(f"stop: must be a str or a list of str, got {_type_name(value)}")
    for item in items:
        if not isinstance(item, str):
            _fail("stop", f"every stop must be a str, got {_type_name(item)}")
        if not item:
            _fail("stop", "stop strings must be non-empty, got ''")
    return tuple(str(s) for s in items)


def _normalise_stop_token_ids(value: object) -> tuple[int, ...]:
    if value is None:
        return ()
    if not isinstance(value, (list, tuple)):
        raise ValueError(f"stop_token_ids: must be a list of int, got {_type_name(value)}")
    for item in value:
        if isinstance(item, bool) or not isinstance(item, int):
            _fail("stop_token_ids", f"every id must be an int, got {_type_name(item)} {item!r}")
        if item < 0:
            _fail("stop_token_ids", f"ids must be >= 0, got {item}")
    return tuple(int(i) for i in value)


def _normalise_logit_bias(value: object) -> tuple[tuple[int, float], ...]:
    """{token id (int or its decimal string): bias} -> sorted (id, bias) pairs."""
    if value is None:
        return ()
    items: list[tuple[object, object]]
    if isinstance(value, Mapping):
        items = list(value.items())
    elif isinstance(value, (list, tuple)):  # the normalised form, as to_dict writes it
        items = [tuple(pair) for pair in value]
    else:
        _fail("logit_bias", f"must be an object of token id -> bias, got {_type_name(value)}")
    out: dict[int, float] = {}
    for key, bias in items:
        try:
            token = int(key) if isinstance(key, (int, str)) and not isinstance(key, bool) else -1
        except ValueError:
            token = -1
        if token < 0:
            _fail("logit_bias", f"keys must be token ids (integers >= 0), got {key!r}")
        b = _check_float("logit_bias", bias)
        if not -LOGIT_BIAS_LIMIT <= b <= LOGIT_BIAS_LIMIT:
            _fail("logit_bias", f"bias of token {token} must be in [-100, 100], got {b}")
        out[token] = b
    return tuple(sorted(out.items()))


def _normalise_ids(name: str, value: object) -> tuple[int, ...] | None:
    if value is None:
        return None
    if not isinstance(value, (list, tuple)):
        _fail(name, f"must be a list of int, got {_type_name(value)}")
    for item in value:
        if isinstance(item, bool) or not isinstance(item, int) or item < 0:
            _fail(name, f"every id must be an int >= 0, got {item!r}")
    return tuple(int(i) for i in value)


def _normalise_words(value: object) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str) or not isinstance(value, (list, tuple)):
        _fail("bad_words", f"must be a list of str, got {_type_name(value)}")
    for item in value:
        if not isinstance(item, str) or not item.strip():
            _fail("bad_words", f"every word must be a non-empty str, got {item!r}")
    return tuple(value)


@dataclass(frozen=True)
class StructuredOutput:
    """A constraint on the output text: ``kind`` is json (``spec`` a JSON schema, as
    text), json_object (any JSON object), regex, choice (``spec`` a JSON list of
    strings) or grammar (Lark). Plain strings, so it crosses any socket as is."""

    kind: str
    spec: str = ""

    def __post_init__(self) -> None:
        if self.kind not in STRUCTURED_KINDS:
            _fail("structured_output", f"kind must be one of {STRUCTURED_KINDS}, got {self.kind!r}")
        if not isinstance(self.spec, str):
            _fail("structured_output", f"spec must be a str, got {_type_name(self.spec)}")

    @classmethod
    def coerce(cls, value: object) -> StructuredOutput | None:
        if value is None or isinstance(value, StructuredOutput):
            return value
        if isinstance(value, Mapping) and set(value) <= {"kind", "spec"}:
            return cls(str(value.get("kind")), value.get("spec", ""))
        _fail("structured_output", f"must be {{kind, spec}}, got {value!r}")


@dataclass(frozen=True)
class SamplingParams:
    """How to pick the tokens of one request (vLLM's names and meanings).

    ``temperature == 0`` is greedy. ``top_k`` of -1 or 0 disables it. ``stop`` accepts
    a str, a list of str or None and is stored as a tuple; ``stop_token_ids`` likewise.
    ``logprobs=N`` returns the sampled token's logprob and the top-N of the model's
    raw distribution for every generated token.
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    seed: int | None = None
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None
    skip_special_tokens: bool = True
    # Logits processing (engine/logits_processors.py), vLLM's names and meanings.
    min_tokens: int = 0
    logit_bias: tuple[tuple[int, float], ...] = ()
    allowed_token_ids: tuple[int, ...] | None = None
    bad_words: tuple[str, ...] = ()
    include_stop_str_in_output: bool = False
    structured_output: StructuredOutput | None = None
    # vLLM's extra: the prompt tokens' logprobs and the top-N at each prompt position
    # (engine/prompt_logprobs.py); computed on a prefill, never from the prefix cache.
    prompt_logprobs: int | None = None

    if TYPE_CHECKING:
        # The signature callers type-check against: stop and stop_token_ids take any
        # sequence (or None) and are stored as tuples. At run time the dataclass's own
        # __init__ is used; tests check this list matches the fields.
        def __init__(
            self,
            max_tokens: int = 16,
            temperature: float = 1.0,
            top_p: float = 1.0,
            top_k: int = -1,
            min_p: float = 0.0,
            seed: int | None = None,
            repetition_penalty: float = 1.0,
            presence_penalty: float = 0.0,
            frequency_penalty: float = 0.0,
            stop: str | Sequence[str] | None = (),
            stop_token_ids: Sequence[int] | None = (),
            ignore_eos: bool = False,
            logprobs: int | None = None,
            skip_special_tokens: bool = True,
            min_tokens: int = 0,
            logit_bias: Mapping[int | str, float] | Sequence[tuple[int, float]] | None = (),
            allowed_token_ids: Sequence[int] | None = None,
            bad_words: Sequence[str] | None = (),
            include_stop_str_in_output: bool = False,
            structured_output: StructuredOutput | Mapping[str, str] | None = None,
            prompt_logprobs: int | None = None,
        ) -> None: ...

    def __post_init__(self) -> None:
        self._validate_ints()
        self._validate_floats()
        set_ = object.__setattr__  # frozen: normalised values are written once, here
        set_(self, "stop", _normalise_stop(self.stop))
        set_(self, "stop_token_ids", _normalise_stop_token_ids(self.stop_token_ids))
        _check_bool("ignore_eos", self.ignore_eos)
        _check_bool("skip_special_tokens", self.skip_special_tokens)
        _check_bool("include_stop_str_in_output", self.include_stop_str_in_output)
        set_(self, "logit_bias", _normalise_logit_bias(self.logit_bias))
        set_(self, "allowed_token_ids", _normalise_ids("allowed_token_ids", self.allowed_token_ids))
        if self.allowed_token_ids == ():
            _fail("allowed_token_ids", "must not be empty")
        set_(self, "bad_words", _normalise_words(self.bad_words))
        set_(self, "structured_output", StructuredOutput.coerce(self.structured_output))

    def _validate_ints(self) -> None:
        if _check_int("max_tokens", self.max_tokens) < 1:
            _fail("max_tokens", f"must be >= 1, got {self.max_tokens}")
        if _check_int("top_k", self.top_k) < -1:
            _fail("top_k", f"must be -1 or 0 (disabled) or >= 1, got {self.top_k}")
        if self.seed is not None and not _SEED_MIN <= _check_int("seed", self.seed) <= _SEED_MAX:
            _fail("seed", f"must be in [-2**63, 2**64 - 1], got {self.seed}")
        if not 0 <= _check_int("min_tokens", self.min_tokens) <= self.max_tokens:
            _fail(
                "min_tokens", f"must be in [0, max_tokens={self.max_tokens}], got {self.min_tokens}"
            )
        n_logprobs = self.logprobs
        if n_logprobs is not None and not 0 <= _check_int("logprobs", n_logprobs) <= MAX_LOGPROBS:
            _fail("logprobs", f"must be in [0, {MAX_LOGPROBS}], got {self.logprobs}")
        n_prompt = self.prompt_logprobs
        if (
            n_prompt is not None
            and not 0 <= _check_int("prompt_logprobs", n_prompt) <= MAX_LOGPROBS
        ):
            _fail("prompt_logprobs", f"must be in [0, {MAX_LOGPROBS}], got {n_prompt}")

    def _validate_floats(self) -> None:
        ranges = {
            "temperature": (lambda v: v >= 0, "must be >= 0"),
            "top_p": (lambda v: 0 < v <= 1, "must be in (0, 1]"),
            "min_p": (lambda v: 0 <= v <= 1, "must be in [0, 1]"),
            "repetition_penalty": (lambda v: v > 0, "must be > 0"),
            "presence_penalty": (lambda v: -2 <= v <= 2, "must be in [-2, 2]"),
            "frequency_penalty": (lambda v: -2 <= v <= 2, "must be in [-2, 2]"),
        }
        for name, (ok, rule) in ranges.items():
            value = _check_float(name, getattr(self, name))
            if not ok(value):
                _fail(name, f"{rule}, got {value}")
            object.__setattr__(self, name, value)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def has_penalties(self) -> bool:
        return (
            self.repetition_penalty != 1.0
            or self.presence_penalty != 0.0
            or self.frequency_penalty != 0.0
        )

    @property
    def has_logits_processing(self) -> bool:
        """Whether any row-wise logits processor applies (engine/logits_processors.py)."""
        return bool(
            self.min_tokens
            or self.logit_bias
            or self.allowed_token_ids is not None
            or self.bad_words
            or self.structured_output is not None
        )

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SamplingParams:
        """Build from a request body's fields; unknown keys are an error, named."""
        if not isinstance(data, Mapping):
            raise ValueError(f"sampling params: must be an object, got {_type_name(data)}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(str(k) for k in data if k not in known)
        if unknown:
            names = ", ".join(repr(k) for k in unknown)
            raise ValueError(f"{unknown[0]}: unknown sampling parameter(s) {names}")
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able fields (tuples become lists); ``from_dict`` inverts it."""
        out = dataclasses.asdict(self)
        out["stop"] = list(self.stop)
        out["stop_token_ids"] = list(self.stop_token_ids)
        out["logit_bias"] = [[t, b] for t, b in self.logit_bias]
        if self.allowed_token_ids is not None:
            out["allowed_token_ids"] = list(self.allowed_token_ids)
        out["bad_words"] = list(self.bad_words)
        return out
