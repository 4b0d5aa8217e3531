"""Per-request logits processing, applied by the sampler before it picks a token.

What a request can ask (vLLM's names and meanings), in the order applied to its row:

  allowed_token_ids -> every other token masked
  bad_words         -> a word's last token masked when the output ends with the rest of
                       it (a one-token word is always masked); each word is tokenized
                       with and without a leading space, as vLLM does
  min_tokens        -> EOS and stop_token_ids masked while the output is shorter
  logit_bias        -> added to the raw logit of each listed token
  structured output -> only the tokens the grammar allows (engine/structured_output.py)

A processor holds no state a move would lose: the grammar's matcher is brought up to
date by replaying the output tokens, so an engine that receives the request mid-way
builds a fresh processor and gets the same masks. The sampler calls
:func:`apply_logits_processors` once per step (its one hook); rows without a
processor cost nothing.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from engine.sampling_params import SamplingParams
from engine.structured_output import Constraint, Grammars
from engine.tokenizer import Tokenizer


class LogitsProcessor:
    def __init__(
        self,
        params: SamplingParams,
        vocab_size: int,
        eos_token_ids: Sequence[int],
        bad_words: Sequence[Sequence[int]] = (),
        constraint: Constraint | None = None,
    ):
        self.params = params
        self.vocab_size = vocab_size
        ends = [] if params.min_tokens == 0 else [*eos_token_ids, *params.stop_token_ids]
        self._end_ids = [t for t in ends if t < vocab_size]
        self._bias_ids = [t for t, _ in params.logit_bias]
        self._bias = [b for _, b in params.logit_bias]
        self._allowed = params.allowed_token_ids
        self._bad_words = [list(w) for w in bad_words if w]
        self.constraint = constraint

    def apply(self, row: torch.Tensor, output_token_ids: Sequence[int]) -> None:
        """Process one row of logits [V] in place (the grammar mask is applied for the
        whole batch at once, by apply_logits_processors)."""
        if self._allowed is not None:
            keep = torch.zeros_like(row, dtype=torch.bool)
            keep[list(self._allowed)] = True
            row.masked_fill_(~keep, float("-inf"))
        banned = self._banned(output_token_ids)
        if banned:
            row[banned] = float("-inf")
        if len(output_token_ids) < self.params.min_tokens and self._end_ids:
            row[self._end_ids] = float("-inf")
        if self._bias_ids:
            row[self._bias_ids] += torch.tensor(self._bias, dtype=row.dtype, device=row.device)

    def _banned(self, output: Sequence[int]) -> list[int]:
        out = []
        for word in self._bad_words:
            prefix = word[:-1]
            if not prefix or list(output[len(output) - len(prefix) :]) == prefix:
                out.append(word[-1])
        return out


def build_processor(
    params: SamplingParams, tokenizer: Tokenizer, grammars: Grammars
) -> LogitsProcessor | None:
    """The request's processor, or None when it asks for no processing.

    Raises ValueError naming the field for what only the engine can check: token ids
    outside the vocabulary, and a grammar that does not compile.
    """
    if not params.has_logits_processing:
        return None
    vocab = grammars.vocab_size
    for name, ids in (
        ("logit_bias", [t for t, _ in params.logit_bias]),
        ("allowed_token_ids", params.allowed_token_ids or ()),
    ):
        bad = next((t for t in ids if t >= vocab), None)
        if bad is not None:
            raise ValueError(f"{name}: token id {bad} is outside the vocabulary [0, {vocab})")
    words: list[list[int]] = []
    for word in params.bad_words:
        for text in (word, " " + word.lstrip()):
            ids = tokenizer.encode(text, add_special_tokens=False)
            if ids and ids not in words:
                words.append(ids)
    constraint = None
    if params.structured_output is not None:
        constraint = grammars.constraint(params.structured_output)
    return LogitsProcessor(params, vocab, tokenizer.eos_token_ids, words, constraint)


def apply_logits_processors(
    logits: torch.Tensor, rows: Sequence[tuple[LogitsProcessor | None, Sequence[int]]]
) -> torch.Tensor:
    """A processed copy of logits [B, V] (``logits`` itself when no row asks)."""
    if all(p is None for p, _ in rows):
        return logits
    out = logits.clone()
    constrained: list[int] = []
    masks: list[bytes] = []
    for i, (processor, output_ids) in enumerate(rows):
        if processor is None:
            continue
        processor.apply(out[i], output_ids)
        if processor.constraint is not None:
            processor.constraint.sync(output_ids)
            constrained.append(i)
            masks.append(processor.constraint.bitmask())
    if constrained:
        _mask_rows(out, constrained, masks)
    return out


_SHIFTS = torch.arange(8, dtype=torch.uint8)


def _mask_rows(out: torch.Tensor, idx: list[int], masks: list[bytes]) -> None:
    """-inf where each row's grammar bitmask has a 0 bit. One batched unpack and one
    masked fill: a loop of small per-row ops stalls in OpenMP barriers on shared cores."""
    vocab = out.shape[1]
    packed = torch.frombuffer(bytearray(b"".join(masks)), dtype=torch.uint8).view(len(idx), -1)
    bits = packed.unsqueeze(2).bitwise_right_shift(_SHIFTS).bitwise_and_(1)
    allowed = bits.view(len(idx), -1)[:, :vocab].bool().to(out.device)  # [k, V]
    if allowed.shape[1] < vocab:  # logits wider than the tokenizer: extra ids never allowed
        pad = torch.zeros(len(idx), vocab - allowed.shape[1], dtype=torch.bool, device=out.device)
        allowed = torch.cat([allowed, pad], dim=1)
    if len(idx) == out.shape[0]:
        out.masked_fill_(~allowed, float("-inf"))
    else:
        rows = out[idx]
        rows.masked_fill_(~allowed, float("-inf"))
        out[idx] = rows
