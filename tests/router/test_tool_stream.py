"""Streamed tool-call deltas, fed the output text a few characters at a time."""

from __future__ import annotations

import json
from typing import Any

import pytest

from router import tool_calls
from router.tool_stream import ToolCallStream

TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}}}}},
    {"type": "function", "function": {"name": "add", "parameters": {
        "type": "object", "properties": {"a": {"type": "integer"}}}}},
]  # fmt: skip


def _plan(choice: Any) -> tool_calls.ToolPlan:
    plan = tool_calls.parse_tools({"tools": TOOLS, "tool_choice": choice})
    assert plan is not None
    return plan


def _feed(stream: ToolCallStream, text: str, step: int = 3) -> list[dict[str, Any]]:
    deltas: list[dict[str, Any]] = []
    for end in range(step, len(text) + step, step):
        deltas += stream.deltas(text[:end], end >= len(text))
    return deltas


def _assemble(deltas: list[dict[str, Any]]) -> tuple[str, list[dict[str, Any]]]:
    content, calls = "", []
    for d in deltas:
        content += d.get("content") or ""
        for c in d.get("tool_calls", []):
            if "id" in c:
                assert c["index"] == len(calls) and c["function"]["arguments"] == ""
                calls.append({"name": c["function"]["name"], "arguments": ""})
            else:
                calls[c["index"]]["arguments"] += c["function"]["arguments"]
    return content, calls


def _first_args_delta(deltas: list[dict[str, Any]]) -> int:
    return next(i for i, d in enumerate(deltas) if "tool_calls" in d and "id" not in
                d["tool_calls"][0])  # fmt: skip


@pytest.mark.parametrize(
    ("choice", "parser", "text", "content", "calls"),
    [
        ({"type": "function", "function": {"name": "add"}}, "hermes", '{"a": 12}', "",
         [("add", {"a": 12})]),
        ("required", "hermes",
         '[{"name": "get_weather", "parameters": {"city": "Pa\\"ris"}}, '
         '{"name": "add", "parameters": {"a": 3}}]', "",
         [("get_weather", {"city": 'Pa"ris'}), ("add", {"a": 3})]),
        ("auto", "hermes",
         'Let me check. <tool_call>\n{"name": "get_weather", "arguments": {"city": '
         '"Oslo"}}\n</tool_call>\n<tool_call>{"name": "add", "arguments": {"a": 1}}'
         '</tool_call>', "Let me check. ",
         [("get_weather", {"city": "Oslo"}), ("add", {"a": 1})]),
        ("auto", "hermes", "Plain text with a < sign <tool", "Plain text with a < sign <tool",
         []),
        ("auto", "hermes", 'Oops <tool_call>{"name": "nope", "arguments": {}}</tool_call>',
         'Oops <tool_call>{"name": "nope", "arguments": {}}</tool_call>', []),
        ("auto", "llama3_json", '{"name": "add", "parameters": {"a": 5}}', "",
         [("add", {"a": 5})]),
        ("auto", "llama3_json",
         ' <|python_tag|> {"name": "get_weather", "parameters": {"city": "Oslo"}}; '
         '{"name": "add", "arguments": {"a": 2}}', "",
         [("get_weather", {"city": "Oslo"}), ("add", {"a": 2})]),
        ("auto", "llama3_json", "Sure: it is sunny.", "Sure: it is sunny.", []),
        ("auto", "llama3_json", "<|python", "<|python", []),
        ("auto", "llama3_json", '{"city": "Oslo"}', '{"city": "Oslo"}', []),
        ("auto", "llama3_json", '{"name": "nope", "parameters": {}}',
         '{"name": "nope", "parameters": {}}', []),
    ],
)  # fmt: skip
def test_deltas_rebuild_the_calls(
    choice: Any, parser: str, text: str, content: str, calls: list[tuple[str, Any]]
) -> None:
    for step in (1, 4, 1000):
        stream = ToolCallStream(_plan(choice), parser)
        got_content, got_calls = _assemble(_feed(stream, text, step))
        assert got_content == content
        assert [(c["name"], json.loads(c["arguments"])) for c in got_calls] == calls
        assert stream.called == bool(calls)
    if parser == "llama3_json":  # the streamed answer is the non-streamed one
        whole_content, whole_calls = tool_calls.extract(_plan(choice), text, parser)
        assert (whole_content or "") == content
        assert [(c["function"]["name"], json.loads(c["function"]["arguments"]))
                for c in whole_calls] == calls  # fmt: skip


def test_calls_stream_before_the_output_is_complete() -> None:
    """The header and the first arguments go out while the model is still writing."""
    stream = ToolCallStream(_plan("auto"), "hermes")
    text = '<tool_call>{"name": "get_weather", "arguments": {"city": "Reykjav'
    deltas = _feed(stream, text, 2)
    _, calls = _assemble(deltas)
    assert calls == [{"name": "get_weather", "arguments": '{"city": "Reykjav'}]
    required = ToolCallStream(_plan("required"), "hermes")
    deltas = _feed(required, '[{"name": "add", "parameters": {"a": 4', 2)
    assert _assemble(deltas)[1] == [{"name": "add", "arguments": '{"a": 4'}]
    assert _first_args_delta(deltas) > 0
    llama = ToolCallStream(_plan("auto"), "llama3_json")
    deltas = _feed(llama, '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Rey', 2)
    assert _assemble(deltas) == ("", [{"name": "get_weather", "arguments": '{"city": "Rey'}])
    assert _first_args_delta(deltas) > 0
    # Plain text is content at once, before the output is complete.
    text = ToolCallStream(_plan("auto"), "llama3_json")
    assert _assemble(_feed(text, "It is sunny in", 2))[0] == "It is sunny in"
