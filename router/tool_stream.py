"""Streamed tool calls in OpenAI's delta shape, sent as the model writes them.

A :class:`ToolCallStream` is fed the output text released so far at each snapshot and
returns the deltas that text adds: ``{"content": ...}`` for plain text, and per call
``{"tool_calls": [{"index", "id", "type", "function": {"name", "arguments": ""}}]}`` once
its name is complete, then ``{"tool_calls": [{"index", "function": {"arguments": ...}}]}``
as its arguments grow. The arguments streamed are the model's own text of the JSON value
(what it wrote, whitespace included), so their concatenation parses to the same value
the non-streamed response reports.

- named function: the whole output is the arguments object; the header goes first.
- required: the output is a JSON array of ``{"name", "parameters"}`` (the grammar's);
  each item's call streams as soon as its name is complete.
- auto, Hermes/Qwen2: text before ``<tool_call>`` is content (a possible start of the
  tag is held back until told apart); each ``<tool_call>{"name", "arguments"}`` block
  streams as a call. Should no block hold a call of a known tool, the held text goes
  out as content at the end, as the non-streamed response has it.
- auto, Llama 3 JSON: an output that starts (after spaces and an optional
  ``<|python_tag|>``) with ``{`` is held as a possible call; each top-level object's call
  streams once its name (a known tool) is complete, then its ``parameters`` (or
  ``arguments``) as they grow, objects separated by ``;``. Any other output is content at
  once. Should no object name a known tool, the held text goes out as content at the
  end. Unlike the non-streamed answer, calls already sent stay sent if a later object
  turns out not to be a call.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import Any

from router import tool_calls

_OPEN, _CLOSE = "<tool_call>", "</tool_call>"
_PYTHON_TAG = "<|python_tag|>"


@dataclass
class _Call:
    name: str | None = None
    args_start: int | None = None  # index in the scanned text where the value begins
    args_end: int | None = None  # exclusive, once the value is complete


@dataclass
class _Scanner:
    """Walks JSON text as it grows: in each object at ``depth`` (1 = the top level),
    the string value of ``"name"`` and where the value of the first of ``args_keys``
    present lies."""

    depth: int
    args_keys: tuple[str, ...]
    calls: list[_Call] = field(default_factory=list)
    _pos: int = 0
    _level: int = 0
    _in_string: bool = False
    _escape: bool = False
    _string: list[str] = field(default_factory=list)
    _expect_key: bool = False
    _key: str | None = None
    _args_pending: bool = False  # the args value starts at the next non-space character

    def feed(self, text: str) -> None:
        for i in range(self._pos, len(text)):
            self._step(text[i], i)
        self._pos = len(text)

    def _step(self, ch: str, i: int) -> None:
        if self._in_string:
            if self._escape:
                self._escape = False
            elif ch == "\\":
                self._escape = True
            elif ch == '"':
                self._in_string = False
                if self._level == self.depth:
                    self._string_done("".join(self._string))
                return
            self._string.append(ch)
            return
        if self._args_pending and not ch.isspace():
            self._args_pending = False
            self.calls[-1].args_start = i
        if ch == '"':
            self._in_string, self._string = True, []
        elif ch in "{[":
            self._level += 1
            if ch == "{" and self._level == self.depth:
                self.calls.append(_Call())
                self._expect_key, self._key = True, None
        elif ch in "}]":
            if self._level == self.depth:
                self._value_done(i)
            self._level -= 1
        elif self._level == self.depth:
            if ch == ":":
                self._expect_key = False
                call = self.calls[-1] if self.calls else None
                free = call is not None and call.args_start is None
                self._args_pending = free and self._key in self.args_keys
            elif ch == ",":
                self._value_done(i)
                self._expect_key = True

    def _string_done(self, value: str) -> None:
        if self._expect_key:
            self._key = value
        elif self._key == "name" and self.calls:
            self.calls[-1].name = value

    def _value_done(self, i: int) -> None:
        call = self.calls[-1] if self.calls else None
        if call is None or self._key not in self.args_keys or call.args_start is None:
            return
        if call.args_end is None:
            call.args_end = i


@dataclass
class _Sent:
    id: str
    args: int = 0  # characters of the arguments sent


class ToolCallStream:
    def __init__(self, plan: tool_calls.ToolPlan, parser: str):
        self.plan = plan
        self.parser = parser
        self.names = {t.name for t in plan.tools}
        self._content = 0  # characters of the text sent as content
        self._sent: list[_Sent] = []
        self._keys: list[_Call] = []  # the scanned call behind each sent one, by index
        self._scanners: list[_Scanner] = []
        self._array = _Scanner(depth=2, args_keys=("parameters",))
        self._llama = _Scanner(depth=1, args_keys=("parameters", "arguments"))

    @property
    def called(self) -> bool:
        """Whether any tool call went out (the finish reason is then ``tool_calls``)."""
        return bool(self._sent)

    def deltas(self, text: str, finished: bool) -> list[dict[str, Any]]:
        if self.plan.mode == "named":
            return self._named(text)
        if self.plan.mode == "required":
            self._array.feed(text)
            return self._calls(text, self._array.calls)
        if self.parser == "llama3_json":
            return self._llama3(text, finished)
        return self._hermes(text, finished)

    def _llama3(self, text: str, finished: bool) -> list[dict[str, Any]]:
        lead = len(text) - len(text.lstrip())
        rest = text[lead:]
        if rest.startswith(_PYTHON_TAG):
            after = rest[len(_PYTHON_TAG) :]
            start = lead + len(_PYTHON_TAG) + len(after) - len(after.lstrip())
        elif _PYTHON_TAG.startswith(rest) and not finished:
            return []  # nothing yet, or a possible start of the tag
        else:
            start = lead
        body = text[start:]
        if not body and not finished:
            return []
        if not body.startswith("{") or self._content:  # content, as extract has it
            return self._rest_as_content(text)
        self._llama.feed(body)
        out = self._calls(body, self._llama.calls)
        if finished and not self._sent:
            out += self._rest_as_content(text)  # no call after all
        return out

    def _rest_as_content(self, text: str) -> list[dict[str, Any]]:
        if len(text) <= self._content:
            return []
        out = [{"content": text[self._content :]}]
        self._content = len(text)
        return out

    def _named(self, text: str) -> list[dict[str, Any]]:
        out = []
        if not self._sent:
            out.append(self._header(0, self.plan.named or ""))
        if len(text) > self._sent[0].args:
            out.append(self._args(0, text[self._sent[0].args :]))
            self._sent[0].args = len(text)
        return out

    def _hermes(self, text: str, finished: bool) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        start = text.find(_OPEN)
        end = len(text) if start < 0 else start
        if start < 0 and not finished:
            end -= _held_back(text)
        if end > self._content:
            out.append({"content": text[self._content : end]})
            self._content = end
        if start < 0:
            return out
        found = []
        for k, block in enumerate(text[start:].split(_OPEN)[1:]):
            if k == len(self._scanners):
                self._scanners.append(_Scanner(depth=1, args_keys=("arguments",)))
            body = block.split(_CLOSE)[0]
            scanner = self._scanners[k]
            scanner.feed(body)
            if scanner.calls:
                found.append((scanner.calls[0], body))
        for call, body in found:
            out += self._calls(body, [call])
        if finished and not self._sent and len(text) > self._content:
            out.append({"content": text[self._content :]})  # no call after all
            self._content = len(text)
        return out

    def _calls(self, text: str, calls: list[_Call]) -> list[dict[str, Any]]:
        out = []
        for call in calls:
            index = self._index_of(call)
            if index is None:
                if call.name is None or call.name not in self.names:
                    continue
                index = len(self._sent)
                self._keys.append(call)
                out.append(self._header(index, call.name))
            if call.args_start is None:
                continue
            stop = call.args_end if call.args_end is not None else len(text)
            sent = self._sent[index]
            have = stop - call.args_start
            if have > sent.args:
                out.append(self._args(index, text[call.args_start + sent.args : stop]))
                sent.args = have
        return out

    def _index_of(self, call: _Call) -> int | None:
        for i, known in enumerate(self._keys):
            if known is call:
                return i
        return None

    def _header(self, index: int, name: str) -> dict[str, Any]:
        self._sent.append(_Sent(f"call_{uuid.uuid4().hex[:24]}"))
        head = {"index": index, "id": self._sent[index].id, "type": "function",
                "function": {"name": name, "arguments": ""}}  # fmt: skip
        return {"tool_calls": [head]}

    @staticmethod
    def _args(index: int, text: str) -> dict[str, Any]:
        return {"tool_calls": [{"index": index, "function": {"arguments": text}}]}


def _held_back(text: str) -> int:
    """How many characters at the end of ``text`` could begin ``<tool_call>``."""
    for n in range(min(len(_OPEN) - 1, len(text)), 0, -1):
        if _OPEN.startswith(text[-n:]):
            return n
    return 0
