"""Turns sampled tokens into text deltas and finish decisions, per request."""

from __future__ import annotations

from engine.detokenizer import IncrementalDetokenizer
from engine.sequence import Sequence
from engine.stop import StopChecker
from engine.tokenizer import Tokenizer


class RequestState:
    """The output side of one request: detokenizer, stop checker, text released so far."""

    def __init__(self, seq: Sequence, tokenizer: Tokenizer):
        self.seq = seq
        self.detokenizer = IncrementalDetokenizer(
            tokenizer, seq.prompt_token_ids, skip_special_tokens=seq.params.skip_special_tokens
        )
        self.stop = StopChecker(seq.params, tokenizer.eos_token_ids)
        self.released = 0
        self.logprobs: list[list[tuple[int, float]]] | None = (
            [] if seq.params.logprobs is not None else None
        )

    @property
    def text(self) -> str:
        return self.detokenizer.text[: self.released]

    def process(
        self, token_id: int, logprobs: list[tuple[int, float]] | None
    ) -> tuple[str, str | None]:
        """Record one sampled token; returns the text it releases and the finish reason."""
        seq = self.seq
        seq.token_ids.append(token_id)
        if self.logprobs is not None and logprobs is not None:
            self.logprobs.append(logprobs)
        self.detokenizer.push([token_id])
        # add_request checked that prompt + max_tokens fits the context, so max_tokens
        # is the only length limit here.
        if seq.num_output_tokens >= seq.params.max_tokens:
            self.detokenizer.flush()  # the last token: release any incomplete character
        decision = self.stop.check(seq.output_token_ids, token_id, self.detokenizer.text)
        delta = self.detokenizer.text[self.released : decision.text_end]
        self.released = max(self.released, decision.text_end)
        return delta, decision.finish_reason
