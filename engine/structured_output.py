"""Structured output: a request's constraint as a grammar, and a matcher that masks tokens.

The grammar engine is llguidance (Rust, CPU wheels, no torch or CUDA needed; its
matcher computes a whole-vocabulary bitmask in tens of microseconds and consumes
tokens incrementally). A request carries only its ``StructuredOutput`` (kind + spec
as plain strings). Every engine that runs the request builds its own matcher from
that spec and *replays* the request's output tokens into it before computing the
next mask (:meth:`Constraint.sync`). So the constraint survives anything that moves
a request between engines -- the prefill -> decode hand-off, a migration that
re-submits prompt + output so far, a preemption that recomputes -- with no matcher
state ever serialised.

Compiling is checked when the request arrives (:meth:`Grammars.check`), so a schema
or regex that does not compile is a ``ValueError`` naming the field before anything
is allocated.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any, cast

import llguidance as llg
import torch

from engine.sampling_params import StructuredOutput
from engine.tokenizer import Tokenizer

# The field a client sets for each kind (OpenAI's or vLLM's name), for error messages.
CLIENT_FIELD = {
    "json": "response_format",
    "json_object": "response_format",
    "regex": "guided_regex",
    "choice": "guided_choice",
    "grammar": "guided_grammar",
}
# llguidance's own JSON options: whitespace as the model likes it, but bounded.
_JSON_OPTIONS = cast(Any, {"whitespace_flexible": False})


def _grammar(spec: StructuredOutput) -> str:
    """llguidance grammar text; ValueError naming the client's field on a bad spec."""
    field = CLIENT_FIELD[spec.kind]
    if spec.kind == "json_object":
        return llg.LLMatcher.grammar_from_json_schema({"type": "object"}, _JSON_OPTIONS)
    if spec.kind == "json":
        try:
            schema = json.loads(spec.spec)
        except ValueError as e:
            raise ValueError(f"{field}: the JSON schema is not valid JSON: {e}") from e
        if not isinstance(schema, (dict, bool)):
            raise ValueError(f"{field}: a JSON schema must be an object")
        try:
            return llg.LLMatcher.grammar_from_json_schema(json.dumps(schema), _JSON_OPTIONS)
        except ValueError as e:
            raise ValueError(f"{field}: invalid JSON schema: {e}") from e
    if spec.kind == "regex":
        return llg.LLMatcher.grammar_from_regex(spec.spec)
    if spec.kind == "choice":
        try:
            choices = json.loads(spec.spec)
        except ValueError:
            choices = None
        if (
            not isinstance(choices, list)
            or not choices
            or not all(isinstance(c, str) for c in choices)
        ):
            raise ValueError(f"{field}: must be a non-empty list of strings")
        alternatives = " | ".join(json.dumps(c) for c in choices)
        return llg.LLMatcher.grammar_from_lark(f"start: {alternatives}")
    return llg.LLMatcher.grammar_from_lark(spec.spec)


class Grammars:
    """One engine's grammar compiler: the llguidance view of its tokenizer (built once,
    ~0.4 s) and the vocabulary width of its logits."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int):
        self.vocab_size = vocab_size
        self._tokenizer = tokenizer
        self._ll: llg.LLTokenizer | None = None

    @property
    def ll_tokenizer(self) -> llg.LLTokenizer:
        if self._ll is None:  # lazily: most engines never see a structured request
            tok = self._tokenizer
            self._ll = llg.LLTokenizer(
                tok.backend.to_str(), n_vocab=tok.vocab_size, eos_token=list(tok.eos_token_ids)
            )
        return self._ll

    def check(self, spec: StructuredOutput) -> str:
        """The compiled grammar text, or ValueError naming the client's field."""
        grammar = _grammar(spec)
        error = llg.LLMatcher.validate_grammar(grammar, self.ll_tokenizer)
        if error:
            first = error.strip().splitlines()[0]
            raise ValueError(f"{CLIENT_FIELD[spec.kind]}: does not compile: {first}")
        return grammar

    def constraint(self, spec: StructuredOutput) -> Constraint:
        matcher = llg.LLMatcher(self.ll_tokenizer, self.check(spec))
        return Constraint(matcher, self.vocab_size, self._tokenizer.eos_token_ids)


class Constraint:
    """One request's matcher, kept in step with its output tokens by replay."""

    def __init__(self, matcher: llg.LLMatcher, vocab_size: int, eos_ids: Sequence[int]):
        self.matcher = matcher
        self.vocab_size = vocab_size
        self.eos_ids = [t for t in eos_ids if t < vocab_size]
        self.consumed = 0  # output tokens fed to the matcher so far

    def sync(self, output_token_ids: Sequence[int]) -> None:
        """Feed the output tokens the matcher has not seen (all of them after a move)."""
        new = list(output_token_ids[self.consumed :])
        if new:
            self.matcher.consume_tokens(new)
            self.consumed = len(output_token_ids)

    def bitmask(self) -> bytes:
        """The next token's mask, one bit per token (little-endian within each byte),
        ``ceil(V / 32) * 4`` bytes; only EOS once the matcher is in an error state."""
        if self.matcher.is_error():
            mask = bytearray((self.vocab_size + 31) // 32 * 4)
            for t in self.eos_ids:
                mask[t // 8] |= 1 << (t % 8)
            return bytes(mask)
        return self.matcher.compute_bitmask()

    def allowed(self, device: torch.device) -> torch.Tensor:
        """[V] bool: the tokens the grammar allows next (only EOS once it is complete).

        A matcher in an error state (a token the grammar refused: only possible if
        something outside the mask chose it) allows only EOS, so the request ends.
        """
        if self.matcher.is_error():
            mask = torch.zeros(self.vocab_size, dtype=torch.bool)
            mask[self.eos_ids] = True
            return mask.to(device)
        packed = torch.frombuffer(bytearray(self.matcher.compute_bitmask()), dtype=torch.uint8)
        bits = packed.unsqueeze(1).bitwise_right_shift(_SHIFTS).bitwise_and_(1).flatten()
        mask = torch.zeros(self.vocab_size, dtype=torch.bool)
        n = min(self.vocab_size, bits.numel())
        mask[:n] = bits[:n].bool()
        return mask.to(device)


_SHIFTS = torch.arange(8, dtype=torch.uint8)  # little-endian bit order within a byte
