"""OpenAI's request shapes, with no sockets: the HTTP server's pure half (responses are
``router.openai_response``).

A handler turns a JSON body into an :class:`ApiRequest` (:func:`parse_completion`,
:func:`parse_chat`), iterates ``Router.stream`` with its ``GenerateInput``, and turns the
output snapshots into OpenAI's response objects or SSE chunks with a
``router.openai_response.ResponseBuilder``. Every client mistake is a ``RouterError.invalid`` whose
``param`` is the request field as the client spelled it: the engine reports its own
names (``prompt_token_ids``, ``max_tokens``, ``logprobs``), which
:meth:`ApiRequest.client_error` renames to the field the client sent.

vLLM's extra fields and structured output are read in ``router.openai_extras``.
Unknown fields are accepted and ignored with a warning in the log, as vLLM does.

Not supported, and answered with a 400 naming the field: several prompts in one
request, ``n`` above ``openai_extras.MAX_N`` (16), ``best_of`` other than 1, ``suffix``,
and ``prompt_logprobs`` with ``stream`` (as vLLM). ``prompt_logprobs`` (vLLM's extra, an
int 0..20) is a sampling parameter; the response carries it in vLLM's shape. Tool
calling is ``router.tool_calls``; ``n`` > 1 is ``router.parallel_sampling``.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from engine.sampling_params import SamplingParams
from router import openai_extras as extras
from router import tool_calls
from router.errors import RouterError
from router.service import GenerateInput

Kind = Literal["completion", "chat"]
Body = Mapping[str, Any]
TokenText = Callable[[int], str]
TokenBytes = Callable[[int], bytes]

# Passed to SamplingParams under the same names (vLLM's extensions included).
SAMPLING_FIELDS = (
    "temperature", "top_p", "top_k", "min_p", "seed", "presence_penalty",
    "frequency_penalty", "repetition_penalty", "stop", "stop_token_ids", "ignore_eos",
    "skip_special_tokens", "prompt_logprobs",
)  # fmt: skip
# Accepted and ignored: bookkeeping for OpenAI's platform, no effect on one answer.
IGNORED_FIELDS = ("user", "metadata", "store", "service_tier", "prompt_cache_key")
_COMMON = {"model", "stream", "stream_options", "n", "max_tokens", "logit_bias"}
_COMMON |= {*SAMPLING_FIELDS, *IGNORED_FIELDS, *extras.EXTRA_SAMPLING_FIELDS}
_COMMON |= set(extras.STRUCTURED_FIELDS)
COMPLETION_FIELDS = frozenset(_COMMON | {"prompt", "logprobs", "best_of", "echo", "suffix"})
CHAT_FIELDS = frozenset(
    _COMMON
    | {"messages", "max_completion_tokens", "logprobs", "top_logprobs", "tools"}
    | {"tool_choice", "parallel_tool_calls", "response_format", "tool_parser", "chat_template"}
)
# OpenAI's chat default is "until the model stops"; without the prompt's token count
# (the instance tokenizes) the router cannot fill the rest of the context, so a fixed
# budget stands in. Clients that need more say so with max_tokens.
CHAT_DEFAULT_MAX_TOKENS = 512


def invalid(name: str, message: str) -> RouterError:
    return RouterError.invalid(f"{name}: {message}", name)


def json_type(value: object) -> str:
    """The JSON name of a decoded value's type, for messages a client understands."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    names = {str: "string", int: "integer", float: "number", list: "array", dict: "object"}
    return names.get(type(value), type(value).__name__)


def parse_json_body(raw: bytes) -> dict[str, Any]:
    """The request body as a JSON object; a 400 naming ``body`` otherwise."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise invalid("body", f"not valid UTF-8 (byte {e.start})") from e
    if not text.strip():
        raise invalid("body", "empty; expected a JSON object")

    def no_constants(name: str) -> None:  # NaN and Infinity are not JSON
        raise ValueError(f"{name} is not valid JSON")

    try:
        data = json.loads(text, parse_constant=no_constants)
    except (ValueError, RecursionError) as e:  # RecursionError: absurdly deep nesting
        raise invalid("body", f"malformed JSON: {e}") from e
    if not isinstance(data, dict):
        raise invalid("body", f"must be a JSON object, got {json_type(data)}")
    return data


def _get(body: Body, name: str, kind: type, default: Any = None) -> Any:
    """An optional field of one JSON type (null = absent); bool is never an int."""
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) != (kind is bool) or not isinstance(value, kind):
        expected = json_type(kind())
        article = "an" if expected[0] in "aeiou" else "a"
        raise invalid(name, f"must be {article} {expected}, got {json_type(value)}")
    return value


@dataclass(frozen=True)
class ApiRequest:
    kind: Kind
    input: GenerateInput
    stream: bool = False
    include_usage: bool = False
    logprobs: bool = False  # render logprobs in the response
    echo: bool = False  # completions: the prompt's text before the output
    tools: tool_calls.ToolPlan | None = None  # chat with tool calling on
    # Chat the router renders itself (tools, or the request's own chat_template):
    # the client's messages, the template, and the tool-call format parsed in "auto".
    template_messages: list[dict[str, Any]] | None = None
    chat_template: str | None = None
    tool_parser: str = "hermes"
    n: int = 1  # sequences for this prompt (router.parallel_sampling)
    aliases: Mapping[str, str] = field(default_factory=dict)  # engine field -> client's

    @property
    def prompt_logprobs(self) -> int | None:
        params = self.input.params
        return None if params is None else params.prompt_logprobs

    def client_error(self, error: RouterError) -> RouterError:
        return rename_param(error, self.aliases)

    def rendered(self, prompt_token_ids: list[int], tool_parser: str) -> ApiRequest:
        """This request with its chat already rendered into token ids."""
        gen = replace(self.input, messages=None, prompt_token_ids=prompt_token_ids)
        return replace(self, input=gen, template_messages=None, tool_parser=tool_parser)


def rename_param(error: RouterError, aliases: Mapping[str, str]) -> RouterError:
    """The error with the engine's field name replaced by the one the client sent."""
    name = aliases.get(error.param or "")
    if name is None or error.param is None:
        return error
    message = error.message
    if message.startswith(f"{error.param}: "):
        message = f"{name}: {message[len(error.param) + 2 :]}"
    return RouterError(error.kind, message, name)


def _check_common(body: Body, allowed: frozenset[str], request_id: str = "") -> tuple[bool, bool]:
    """Fields both endpoints share; returns (stream, include_usage)."""
    extras.warn_ignored(body, allowed, request_id)
    _get(body, "model", str)
    if not 1 <= _get(body, "n", int, 1) <= extras.MAX_N:
        raise invalid("n", f"must be in [1, {extras.MAX_N}], got {body['n']}")
    _get(body, "logit_bias", dict)
    _get(body, "user", str)
    stream = _get(body, "stream", bool, False)
    if stream and body.get("prompt_logprobs") is not None:  # as vLLM
        raise invalid("prompt_logprobs", "is not available when stream=true")
    options = _get(body, "stream_options", dict, {})
    if set(options) - {"include_usage"}:
        raise invalid(
            "stream_options", f"unknown option(s) {sorted(set(options) - {'include_usage'})}"
        )
    include_usage = _get(options, "include_usage", bool, False)
    return stream, include_usage


def _sampling(body: Body, extra: dict[str, Any], aliases: dict[str, str]) -> SamplingParams:
    fields = {k: body[k] for k in SAMPLING_FIELDS if body.get(k) is not None}
    fields.update(extras.extra_sampling(body))
    constraint, source = extras.structured_output(body)
    if constraint is not None and "structured_output" not in extra:
        fields["structured_output"] = constraint
        # The instance names the field of the constraint's kind; the client used this one.
        for name in ("response_format", "guided_regex", "guided_choice", "guided_grammar"):
            aliases[name] = source or name
    try:
        return SamplingParams.from_dict({**fields, **extra})
    except ValueError as e:
        raise rename_param(RouterError.invalid(str(e)), aliases) from e


def _prompt(value: object) -> tuple[str | None, list[int] | None]:
    """A completion prompt: a string or token ids, alone or as a batch of one."""
    if value is None:
        raise invalid("prompt", "is required")
    if isinstance(value, list) and value and all(isinstance(v, (str, list)) for v in value):
        if len(value) > 1:
            raise invalid("prompt", f"{len(value)} prompts: send one request per prompt")
        value = value[0]
    if isinstance(value, str):
        if not value:
            raise invalid("prompt", "must not be empty")
        return value, None
    if isinstance(value, list) and all(
        isinstance(t, int) and not isinstance(t, bool) for t in value
    ):
        if not value:
            raise invalid("prompt", "must not be empty")
        return None, list(value)
    raise invalid("prompt", f"must be a string or an array of token ids, got {json_type(value)}")


def parse_completion(body: Body, request_id: str) -> ApiRequest:
    """``POST /v1/completions``."""
    stream, include_usage = _check_common(body, COMPLETION_FIELDS, request_id)
    if _get(body, "best_of", int, 1) != 1:
        raise invalid("best_of", "only best_of=1 is supported")
    echo = _get(body, "echo", bool, False)
    if _get(body, "suffix", str):
        raise invalid("suffix", "is not supported")
    prompt, ids = _prompt(body.get("prompt"))
    extra = {"logprobs": _get(body, "logprobs", int)}
    if body.get("max_tokens") is not None:
        extra["max_tokens"] = body["max_tokens"]
    aliases = {"prompt_token_ids": "prompt"}
    params = _sampling(body, extra, aliases)
    return ApiRequest(
        "completion",
        GenerateInput(body.get("model"), prompt, ids, params=params, request_id=request_id),
        stream,
        include_usage,
        params.logprobs is not None,
        echo,
        n=body.get("n") or 1,
        aliases=aliases,
    )


def _content(value: object, where: str) -> str:
    """A message's content: a string, or an array of text parts (joined by newlines)."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        texts = []
        for i, part in enumerate(value):
            if not isinstance(part, dict) or part.get("type") != "text":
                raise invalid(f"{where}[{i}]", "only parts of type 'text' are supported")
            texts.append(_get(part, "text", str, ""))
        return "\n".join(texts)
    raise invalid(where, f"must be a string or an array of text parts, got {json_type(value)}")


def _messages(value: object) -> list[dict[str, str]]:
    if value is None:
        raise invalid("messages", "is required")
    if not isinstance(value, list) or not value:
        raise invalid("messages", f"must be a non-empty array, got {json_type(value)}")
    out = []
    for i, m in enumerate(value):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise invalid(where, "must be an object with role and content")
        role = m.get("role")
        if not isinstance(role, str) or not role:
            raise invalid(f"{where}.role", f"must be a non-empty string, got {json_type(role)}")
        content = m.get("content")
        if content is None and (m.get("tool_calls") or role == "assistant"):
            content = ""  # an assistant turn that only called tools
        out.append({"role": role, "content": _content(content, f"{where}.content")})
    return out


def _check_chat_unsupported(body: Body) -> None:
    _get(body, "parallel_tool_calls", bool)
    _get(body, "chat_template", str)


def parse_chat(body: Body, request_id: str) -> ApiRequest:
    """``POST /v1/chat/completions``."""
    stream, include_usage = _check_common(body, CHAT_FIELDS, request_id)
    _check_chat_unsupported(body)
    messages = _messages(body.get("messages"))
    want_logprobs = _get(body, "logprobs", bool, False)
    top = _get(body, "top_logprobs", int)
    if top is not None and not want_logprobs:
        raise invalid("top_logprobs", "requires logprobs: true")
    limit = "max_completion_tokens" if body.get("max_completion_tokens") is not None else None
    limit = limit or ("max_tokens" if body.get("max_tokens") is not None else None)
    extra = {
        "logprobs": (top or 0) if want_logprobs else None,
        "max_tokens": body[limit] if limit else CHAT_DEFAULT_MAX_TOKENS,
    }
    aliases = {"prompt": "messages", "prompt_token_ids": "messages", "logprobs": "top_logprobs"}
    aliases["max_tokens"] = limit or "max_tokens"
    plan = tool_calls.parse_tools(body)
    constraint = plan.constraint if plan is not None else None
    if constraint is not None:
        if extras.structured_output(body)[0] is not None:
            raise invalid("tool_choice", "a forced tool call cannot have another output constraint")
        extra["structured_output"] = constraint
        aliases["response_format"] = "tools"  # the instance compiles the tools' schemas
    params = _sampling(body, extra, aliases)
    template = body.get("chat_template")
    render = plan is not None or template is not None
    return ApiRequest(
        "chat",
        GenerateInput(body.get("model"), messages=messages, params=params, request_id=request_id),
        stream,
        include_usage,
        want_logprobs,
        tools=plan,
        template_messages=[dict(m) for m in body["messages"]] if render else None,
        chat_template=template,
        n=body.get("n") or 1,
        aliases=aliases,
    )
