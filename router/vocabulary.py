"""The model's vocabulary on the router: token text and bytes for logprobs, and the
text <-> ids conversions of ``/tokenize`` and ``/detokenize``.

The router holds no model files: it rebuilds the tokenizer from an instance's
``Tokenizer.to_spec()`` (plain data) once, on first use. A token's bytes are what it
contributes to the output, as OpenAI reports them: for byte-level BPE the bytes its
symbols stand for, for SentencePiece vocabularies ``<0xNN>`` byte tokens and ``▁`` as
a space, and a special token's own spelling. Its text is those bytes decoded as UTF-8
(a token that holds part of a character shows U+FFFD there, its bytes stay exact).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from functools import lru_cache
from typing import Any

from engine.tokenizer import Tokenizer, _byte_alphabet

_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")


class Vocabulary:
    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        backend = tokenizer.backend
        self._added = {i: t.content for i, t in backend.get_added_tokens_decoder().items()}
        self._byte_level = "ByteLevel" in repr(backend.decoder)
        self._unbyte = {ch: b for b, ch in _byte_alphabet().items()}
        self.size = tokenizer.vocab_size
        self.bytes = lru_cache(maxsize=65536)(self._bytes)

    @classmethod
    def from_spec(cls, spec: Mapping[str, Any]) -> Vocabulary:
        return cls(Tokenizer.from_spec(spec))

    def _bytes(self, token_id: int) -> bytes:
        if token_id in self._added:
            return self._added[token_id].encode("utf-8")
        piece = self.tokenizer.backend.id_to_token(token_id)
        if piece is None:
            return b""
        if self._byte_level:
            return bytes(self._unbyte[ch] for ch in piece if ch in self._unbyte)
        m = _BYTE_TOKEN.fullmatch(piece)
        if m:
            return bytes([int(m.group(1), 16)])
        return piece.replace("\u2581", " ").encode("utf-8")

    def text(self, token_id: int) -> str:
        return self.bytes(token_id).decode("utf-8", errors="replace")

    def detokenize(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=False)
