"""Tool calling for ``/v1/chat/completions``: ``tools`` and ``tool_choice``.

- ``none``: the tools are ignored (the output is plain content).
- ``required`` / a named function: enforced through the grammar, so the arguments are
  always valid JSON for the function's ``parameters`` schema, whatever the model. Named:
  the output *is* the arguments object. Required: a JSON array of ``{"name",
  "parameters"}`` objects, one of the tools each (vLLM's shape), at least one.
- ``auto`` (the default when tools are given): the model writes freely in its own
  tool-call format, and the router parses the finished text. Formats, chosen from the
  chat template (or the request's ``tool_parser`` field): ``hermes`` (Hermes / Qwen2:
  ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``, any number) and
  ``llama3_json`` (Llama 3.x: the whole output one JSON object ``{"name", "parameters"}``
  or several separated by ``;``, optionally after ``<|python_tag|>``). Text that is not a
  call stays content.

The chat template receives ``tools`` (as transformers' ``apply_chat_template`` does):
when a request has tools, the router renders the prompt itself with the model's
template (or the request's ``chat_template``) and sends the token ids.

Streaming: a request with tools streams its tool calls in OpenAI's delta shape as the
model writes them (``router.tool_stream``: a delta per call with its index, id and name,
then its arguments as they grow), Llama 3 JSON's ``auto`` included.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from engine.sampling_params import StructuredOutput
from router.errors import RouterError
from router.openai_extras import check_schema

Body = Mapping[str, Any]
PARSERS = ("hermes", "llama3_json")
_HERMES = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.DOTALL)


def invalid(name: str, message: str) -> RouterError:
    return RouterError.invalid(f"{name}: {message}", name)


@dataclass(frozen=True)
class Tool:
    name: str
    parameters: dict[str, Any]
    raw: dict[str, Any]  # as the client sent it, for the chat template


@dataclass(frozen=True)
class ToolPlan:
    tools: tuple[Tool, ...]
    mode: str  # "auto" | "required" | "named"
    named: str | None = None
    parser: str | None = None  # auto: which format to parse; None: from the template

    @property
    def constraint(self) -> StructuredOutput | None:
        if self.mode == "named":
            tool = next(t for t in self.tools if t.name == self.named)
            return StructuredOutput("json", json.dumps(tool.parameters))
        if self.mode == "required":
            items = [
                {
                    "type": "object",
                    "properties": {"name": {"const": t.name}, "parameters": t.parameters},
                    "required": ["name", "parameters"],
                    "additionalProperties": False,
                }
                for t in self.tools
            ]
            schema = {"type": "array", "minItems": 1, "items": {"anyOf": items}}
            return StructuredOutput("json", json.dumps(schema))
        return None

    @property
    def template_tools(self) -> list[dict[str, Any]]:
        return [t.raw for t in self.tools]


def _tool(i: int, value: object) -> Tool:
    where = f"tools[{i}]"
    if not isinstance(value, dict) or value.get("type", "function") != "function":
        raise invalid("tools", f"{where}: must be an object of type 'function'")
    fn = value.get("function")
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
        raise invalid("tools", f"{where}.function.name: must be a non-empty string")
    params = fn.get("parameters", {"type": "object", "properties": {}})
    if not isinstance(params, dict):
        raise invalid("tools", f"{where}.function.parameters: must be a JSON schema object")
    try:
        check_schema("tools", params)
    except RouterError as e:
        raise invalid("tools", f"{where}.function.parameters: {e.message[len('tools: ') :]}") from e
    return Tool(fn["name"], params, value)


def parse_tools(body: Body) -> ToolPlan | None:
    """The request's tool plan; None when tool calling is off (no tools, or "none")."""
    tools = body.get("tools")
    choice = body.get("tool_choice")
    if tools is None:
        if choice not in (None, "none", "auto"):
            raise invalid("tool_choice", "needs tools")
        return None
    if not isinstance(tools, list) or not tools:
        raise invalid("tools", "must be a non-empty array of functions")
    parsed = tuple(_tool(i, t) for i, t in enumerate(tools))
    names = [t.name for t in parsed]
    if len(set(names)) != len(names):
        raise invalid("tools", "function names must be unique")
    parser = body.get("tool_parser")
    if parser is not None and parser not in PARSERS:
        raise invalid("tool_parser", f"must be one of {PARSERS}, got {parser!r}")
    if choice in (None, "auto"):
        return ToolPlan(parsed, "auto", parser=parser)
    if choice == "none":
        return None
    if choice == "required":
        return ToolPlan(parsed, "required")
    if isinstance(choice, dict) and choice.get("type") == "function":
        name = (choice.get("function") or {}).get("name")
        if name not in names:
            raise invalid("tool_choice", f"names no tool in tools: {name!r}")
        return ToolPlan(parsed, "named", named=name)
    raise invalid("tool_choice", "must be none, auto, required or {type: function, function}")


def parser_for(chat_template: str | None) -> str:
    """The tool-call format the model's template teaches (hermes when it does not say)."""
    template = chat_template or ""
    if "<|python_tag|>" in template or "ipython" in template:
        return "llama3_json"
    return "hermes"


def _call(name: str, arguments: object) -> dict[str, Any]:
    args = arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)
    return {
        "id": f"call_{uuid.uuid4().hex[:24]}",
        "type": "function",
        "function": {"name": name, "arguments": args},
    }


def _named_call(obj: object, tools: set[str], args_key: str) -> dict[str, Any] | None:
    if not isinstance(obj, dict) or obj.get("name") not in tools:
        return None
    args = obj.get(args_key, obj.get("arguments", obj.get("parameters", {})))
    return _call(obj["name"], args)


def extract(plan: ToolPlan, text: str, parser: str) -> tuple[str | None, list[dict[str, Any]]]:
    """(content, tool calls) from the finished output text."""
    names = {t.name for t in plan.tools}
    if plan.mode == "named":
        return None, [_call(plan.named or "", text)]
    if plan.mode == "required":
        try:
            items = json.loads(text)
        except ValueError:
            return text, []  # cut short by max_tokens: no complete call to report
        calls = [_named_call(i, names, "parameters") for i in items]
        return None, [c for c in calls if c is not None]
    if parser == "llama3_json":
        return _llama3(text, names)
    return _hermes(text, names)


def _hermes(text: str, names: set[str]) -> tuple[str | None, list[dict[str, Any]]]:
    if "<tool_call>" not in text:
        return text, []
    calls = []
    for body in _HERMES.findall(text):
        try:
            call = _named_call(json.loads(body), names, "arguments")
        except ValueError:
            call = None
        if call is not None:
            calls.append(call)
    if not calls:
        return text, []
    content = text[: text.index("<tool_call>")].strip()
    return content or None, calls


def _llama3(text: str, names: set[str]) -> tuple[str | None, list[dict[str, Any]]]:
    body = text.strip().removeprefix("<|python_tag|>").strip()
    if not body.startswith("{"):
        return text, []
    calls = []
    decoder = json.JSONDecoder()
    pos = 0
    while pos < len(body):
        try:
            obj, end = decoder.raw_decode(body, pos)
        except ValueError:
            return text, []
        call = _named_call(obj, names, "parameters")
        if call is None:
            return text, []
        calls.append(call)
        pos = end
        while pos < len(body) and body[pos] in " \n\t;":
            pos += 1
    return None, calls


def message(content: str | None, calls: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {"role": "assistant", "content": content}
    if calls:
        out["tool_calls"] = calls
    return out
