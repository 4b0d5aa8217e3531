"""OpenAI's response objects for one request, whole or as stream chunks, and the
server-sent-event framing (the request side is ``router.openai_protocol``). Tool calls
stream as the model writes them (``router.tool_stream``)."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping
from typing import Any

from engine.outputs import RequestOutput
from router import tool_calls
from router.errors import ErrorKind, RouterError
from router.openai_protocol import ApiRequest, TokenBytes, TokenText
from router.tool_stream import ToolCallStream

# -- responses -------------------------------------------------------------------------


def token_id_text(token_id: int) -> str:
    # vLLM's --return-tokens-as-token-ids spelling: the router holds no tokenizer.
    return f"token_id:{token_id}"


class ResponseBuilder:
    """OpenAI's objects for one request, whole or as stream chunks."""

    def __init__(
        self,
        api: ApiRequest,
        model: str,
        token_text: TokenText | None = None,
        token_bytes: TokenBytes | None = None,
        detokenize: Callable[[list[int]], str] | None = None,
    ):
        """``token_text`` / ``token_bytes`` spell a token in logprobs (without them:
        ``token_id:<id>``, no bytes); ``detokenize`` gives an id prompt's text for echo."""
        self.api = api
        self.model = model
        prefix = "chatcmpl" if api.kind == "chat" else "cmpl"
        self.id = f"{prefix}-{api.input.request_id}"
        self.created = int(time.time())
        self._text = token_text or token_id_text
        self._bytes = token_bytes or (
            (lambda t: self._text(t).encode("utf-8")) if token_text else None
        )
        self._detokenize = detokenize
        self._role_sent = False
        self._echo_sent = False
        self._logprobs_sent = 0  # tokens whose logprobs went out in earlier chunks
        self._offset = 0  # completions' text_offset of the next token
        self._tools: ToolCallStream | None = None  # a streamed request with tools

    def _envelope(self, chunk: bool) -> dict[str, Any]:
        kinds = {"chat": "chat.completion", "completion": "text_completion"}
        obj = kinds[self.api.kind] + (".chunk" if chunk and self.api.kind == "chat" else "")
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    @staticmethod
    def usage(out: RequestOutput) -> dict[str, Any]:
        prompt, completion = len(out.prompt_token_ids), len(out.token_ids)
        return {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": out.num_cached_tokens},
        }

    def response(self, out: RequestOutput) -> dict[str, Any]:
        """The whole (non-streamed) response from the final snapshot."""
        choice: dict[str, Any] = {"index": 0}
        reason = out.finish_reason
        if self.api.tools is not None:
            content, calls = tool_calls.extract(self.api.tools, out.text, self.api.tool_parser)
            choice["message"] = tool_calls.message(content, calls)
            reason = "tool_calls" if calls and reason == "stop" else reason
        elif self.api.kind == "chat":
            choice["message"] = {"role": "assistant", "content": out.text}
        else:
            choice["text"] = self._echo(out) + out.text
        choice["logprobs"] = self._logprobs(out.logprobs or []) if self.api.logprobs else None
        choice["finish_reason"] = reason
        body = {**self._envelope(False), "choices": [choice], "usage": self.usage(out)}
        if self.api.prompt_logprobs is not None:
            # vLLM's places: on each choice of a completion, on a chat response.
            prompt = self.prompt_logprobs(out)
            if self.api.kind == "chat":
                body["prompt_logprobs"] = prompt
            else:
                choice["prompt_logprobs"] = prompt
        return body

    def prompt_logprobs(self, out: RequestOutput) -> list[dict[str, dict[str, Any]] | None]:
        """vLLM's shape: None for the first prompt token, then per token
        {token id: {logprob, rank, decoded_token}}, the prompt's token and the top-N."""
        rows = out.prompt_logprobs or []
        if len(rows) != max(0, len(out.prompt_token_ids) - 1):
            message = f"prompt_logprobs: {len(rows)} rows for {len(out.prompt_token_ids)} tokens"
            raise RouterError(ErrorKind.INTERNAL, message)
        entries: list[dict[str, dict[str, Any]] | None] = [None]
        for row in rows:
            entry: dict[str, dict[str, Any]] = {}
            for token, lp, rank in row:
                entry.setdefault(
                    str(token), {"logprob": lp, "rank": rank, "decoded_token": self._text(token)}
                )
            entries.append(entry)
        return entries

    def chunks(self, out: RequestOutput) -> list[dict[str, Any]]:
        """The stream chunks one snapshot adds (none while the detokenizer holds text)."""
        rows = (out.logprobs or [])[self._logprobs_sent :] if self.api.logprobs else []
        self._logprobs_sent += len(rows)
        deltas: list[tuple[dict[str, Any], list[Any], str | None]] = []
        if self.api.kind == "chat" and not self._role_sent:
            self._role_sent = True
            deltas.append(({"role": "assistant", "content": ""}, [], None))
        echo = "" if self._echo_sent else self._echo(out)
        self._echo_sent = True
        if self.api.tools is not None:
            # Content and tool-call deltas as the text grows (router.tool_stream); the
            # logprobs ride on the first chunk of the snapshot (or one of their own).
            if self._tools is None:
                self._tools = ToolCallStream(self.api.tools, self.api.tool_parser)
            tool_deltas = self._tools.deltas(out.text, out.finished)
            if rows and not tool_deltas:
                tool_deltas = [{}]
            for j, d in enumerate(tool_deltas):
                deltas.append((d, rows if j == 0 else [], None))
            if out.finished:
                stop = out.finish_reason == "stop"
                reason = "tool_calls" if self._tools.called and stop else out.finish_reason
                deltas.append(({}, [], reason))
            return [self._chunk(d, r, reason) for d, r, reason in deltas]
        if out.delta_text or rows or echo:
            deltas.append(({"content": echo + out.delta_text}, rows, None))
        if out.finished:
            if self.api.kind == "completion" and deltas:
                deltas[-1] = (*deltas[-1][:2], out.finish_reason)
            else:
                deltas.append(({}, [], out.finish_reason))
        return [self._chunk(delta, r, reason) for delta, r, reason in deltas]

    def _chunk(self, delta: dict[str, Any], rows: list[Any], reason: str | None) -> dict[str, Any]:
        choice: dict[str, Any] = {"index": 0}
        if self.api.kind == "chat":
            choice["delta"] = delta
        else:
            choice["text"] = delta.get("content", "")
        choice["logprobs"] = self._logprobs(rows) if rows else None
        choice["finish_reason"] = reason
        chunk = {**self._envelope(True), "choices": [choice]}
        if self.api.include_usage:
            chunk["usage"] = None  # as OpenAI: only the final chunk carries usage
        return chunk

    def _echo(self, out: RequestOutput) -> str:
        """The prompt's text, when a completion asked for echo."""
        if not self.api.echo:
            return ""
        if self.api.input.prompt is not None:
            text = self.api.input.prompt
        elif self._detokenize is not None:
            text = self._detokenize(out.prompt_token_ids)
        else:
            text = "".join(self._text(t) for t in out.prompt_token_ids)
        if not self._offset:
            self._offset = len(text)  # text_offset counts from the start of the echo
        return text

    def usage_chunk(self, out: RequestOutput) -> dict[str, Any]:
        return {**self._envelope(True), "choices": [], "usage": self.usage(out)}

    def _logprobs(self, rows: list[list[tuple[int, float]]]) -> dict[str, Any]:
        """Each row is (sampled token, logprob) then the top-N of the distribution."""
        if self.api.kind == "chat":
            return {"content": [self._chat_logprob(row) for row in rows], "refusal": None}
        tokens = [self._text(row[0][0]) for row in rows]
        offsets = []
        for token in tokens:
            offsets.append(self._offset)
            self._offset += len(token)
        return {
            "tokens": tokens,
            "token_logprobs": [row[0][1] for row in rows],
            # OpenAI lists the top N plus the sampled token when it is not among them.
            "top_logprobs": [{self._text(t): lp for t, lp in [*row[1:], row[0]]} for row in rows],
            "text_offset": offsets,
        }

    def _entry(self, token_id: int, logprob: float) -> dict[str, Any]:
        data = list(self._bytes(token_id)) if self._bytes is not None else None
        return {"token": self._text(token_id), "logprob": logprob, "bytes": data}

    def _chat_logprob(self, row: list[tuple[int, float]]) -> dict[str, Any]:
        top = [self._entry(t, lp) for t, lp in row[1:]]
        return {**self._entry(*row[0]), "top_logprobs": top}


# -- framing ---------------------------------------------------------------------------

SSE_DONE = b"data: [DONE]\n\n"


def sse(data: Mapping[str, Any]) -> bytes:
    """One server-sent event; JSON escapes newlines, so the data stays on one line."""
    return b"data: " + json.dumps(data, ensure_ascii=False).encode("utf-8") + b"\n\n"


def error_body(error: RouterError) -> dict[str, Any]:
    """OpenAI's error object; the type comes from the one error table."""
    return {
        "error": {
            "message": error.message,
            "type": error.mapping.openai_type,
            "param": error.param,
            "code": None,
        }
    }
