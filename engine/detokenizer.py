"""Streaming detokenization: token ids in, text deltas out, never half a character.

vLLM's scheme with two offsets into the output ids: `prefix` marks where the decode window
starts (text already emitted), `read` where the emitted text ends. Each push decodes only
ids[prefix:], so the cost per token stays O(window) instead of O(output length). A delta is
released only when the window's text does not end in U+FFFD, i.e. the last token did not stop
inside a multi-byte UTF-8 character (an emoji split over two byte tokens, say).
"""

from __future__ import annotations

from collections.abc import Sequence

from engine.tokenizer import Tokenizer

_REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
    """Text of one request's output ids; deltas concatenated + flush() == tokenizer.decode(ids)."""

    def __init__(
        self,
        tokenizer: Tokenizer,
        prompt_token_ids: Sequence[int],
        skip_special_tokens: bool = True,
    ) -> None:
        # The prompt is deliberately not used as decode context: the text is that of the output
        # ids alone, so it equals tokenizer.decode(output ids) (a SentencePiece word-initial space
        # at the very start is stripped exactly as decode strips it).
        self._tokenizer = tokenizer
        self._skip_special = skip_special_tokens
        self._ids: list[int] = []
        self._prefix = 0
        self._read = 0
        self._text = ""

    @property
    def text(self) -> str:
        return self._text

    @property
    def token_ids(self) -> list[int]:
        return self._ids

    def push(self, token_ids: Sequence[int]) -> str:
        """Add new ids; return the text they complete (possibly "")."""
        self._ids.extend(token_ids)
        prefix_text, window_text = self._decode_window()
        if len(window_text) <= len(prefix_text) or window_text.endswith(_REPLACEMENT):
            # Nothing new (e.g. a skipped special token) or the window ends mid-character: hold.
            return ""
        return self._emit(window_text[len(prefix_text) :])

    def flush(self) -> str:
        """At finish: release whatever is held back, even an invalid trailing byte (as U+FFFD)."""
        prefix_text, window_text = self._decode_window()
        if len(window_text) <= len(prefix_text):
            return ""
        return self._emit(window_text[len(prefix_text) :])

    def _decode_window(self) -> tuple[str, str]:
        decode = self._tokenizer.decode
        prefix_text = decode(
            self._ids[self._prefix : self._read], skip_special_tokens=self._skip_special
        )
        window_text = decode(self._ids[self._prefix :], skip_special_tokens=self._skip_special)
        return prefix_text, window_text

    def _emit(self, delta: str) -> str:
        # The window now ends on a character boundary: start the next one at the last read point.
        self._prefix, self._read = self._read, len(self._ids)
        self._text += delta
        return delta
