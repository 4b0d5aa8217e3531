"""When a request is done, and how much of its text a client may see so far.

One ``StopChecker`` per request, called once per generated token, after the token
was appended to the request and pushed through its incremental detokenizer::

    checker = StopChecker(params, tokenizer.eos_token_ids)
    ...
    seq.token_ids.append(tok)                     # the token is always kept
    text += detok.push([tok])                     # full output text so far
    d = checker.check(seq.output_token_ids, tok, text)
    delta, emitted = text[emitted:d.text_end], d.text_end
    if d.finished:
        final_text = text[:d.text_end]            # finish_reason = d.finish_reason

Order of the rules (vLLM's):
  1. the token is an eos id and not ``ignore_eos``, or is in ``stop_token_ids``
     -> "stop"; the token stays in token_ids but its own text is not emitted.
  2. a stop string appears in the text -> "stop"; the text is cut just before the
     earliest match (the stop string and anything after it are never emitted).
     A stop string completed by the max_tokens-th token still reports "stop".
     With ``include_stop_str_in_output`` the text is cut just after the match.
  0. (before all) while the output is shorter than ``min_tokens`` nothing stops it.
  3. ``len(output_token_ids) >= max_tokens`` -> "length"; all text is released.
  4. otherwise not finished; ``text_end`` holds back the longest suffix of the text
     that is a proper prefix of some stop string, so a client never sees the start
     of a stop string that later matches. Held-back text is released as soon as it
     can no longer start a stop string, and at any finish not caused by a stop string.

``text_end`` never decreases across calls. At a "length" finish all the text passed
in is released; what the detokenizer itself still holds (an incomplete UTF-8
character) is the caller's to flush.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from engine.sampling_params import SamplingParams


@dataclass(frozen=True)
class StopDecision:
    finish_reason: str | None  # "stop" | "length" | None (not finished)
    text_end: int  # text[:text_end] may be emitted now
    # What stopped it, as vLLM reports: the stop string or the stop token id
    # (None for eos and length).
    stop_reason: str | int | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


def stop_hold_back(text: str, stops: Sequence[str]) -> int:
    """Length of the longest suffix of text that is a proper prefix of some stop."""
    best = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), best, -1):
            if text.endswith(stop[:n]):
                best = n
                break
    return best


class StopChecker:
    """Per-request stop rules; see the module docstring for how to call it."""

    def __init__(self, params: SamplingParams, eos_token_ids: Sequence[int]) -> None:
        self.params = params
        self._stop_ids = frozenset(params.stop_token_ids)
        self._eos_ids = frozenset(() if params.ignore_eos else eos_token_ids)
        self._stops = params.stop
        self._max_stop_len = max((len(s) for s in self._stops), default=0)
        self._text_len = 0  # len(text) at the previous call
        self._emitted = 0  # the previous text_end
        self._final: StopDecision | None = None

    @property
    def emitted(self) -> int:
        """The text_end of the latest decision."""
        return self._emitted

    def check(self, output_token_ids: Sequence[int], new_token_id: int, text: str) -> StopDecision:
        """Decide after one new token.

        Args:
            output_token_ids: every generated token so far, new_token_id included
                (only its length is used: the max_tokens rule).
            new_token_id: the token just generated.
            text: the whole detokenized output text so far, including the new
                token's text (or not: for rule 1 it is dropped either way).
        """
        if self._final is not None:
            return self._final
        decision = self._decide(new_token_id, len(output_token_ids), text)
        decision = StopDecision(
            decision.finish_reason, max(decision.text_end, self._emitted), decision.stop_reason
        )
        self._text_len = len(text)
        self._emitted = decision.text_end
        if decision.finished:
            self._final = decision
        return decision

    def _decide(self, token: int, num_output_tokens: int, text: str) -> StopDecision:
        if num_output_tokens < self.params.min_tokens:
            # vLLM: nothing stops a request before min_tokens (EOS and stop ids are also
            # masked in the sampler); text that could start a stop string is held back.
            return StopDecision(None, len(text) - stop_hold_back(text, self._stops))
        if token in self._eos_ids:
            return StopDecision("stop", min(self._text_len, len(text)))
        if token in self._stop_ids:
            return StopDecision("stop", min(self._text_len, len(text)), token)
        match = self._find_stop(text)
        if match is not None:
            end = match[0] + len(match[1]) if self.params.include_stop_str_in_output else match[0]
            return StopDecision("stop", end, match[1])
        if num_output_tokens >= self.params.max_tokens:
            return StopDecision("length", len(text))
        return StopDecision(None, len(text) - stop_hold_back(text, self._stops))

    def _find_stop(self, text: str) -> tuple[int, str] | None:
        """Earliest stop string in text (first listed wins a tie), as (start, stop)."""
        if not self._stops:
            return None
        # Earlier text was checked already: a new match must end in the new part.
        start = max(0, self._text_len - self._max_stop_len + 1)
        best: tuple[int, str] | None = None
        for stop in self._stops:
            pos = text.find(stop, start)
            if pos != -1 and (best is None or pos < best[0]):
                best = (pos, stop)
        return best
