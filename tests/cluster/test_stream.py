"""RequestStream: events from two instances, in any order, become ordered outputs;
dispatch picks the least loaded instance."""

from __future__ import annotations

import queue

import pytest

from cluster.dispatch import least_loaded
from cluster.stream import RequestStream, RequestTrace
from engine.events import TokenEvent


def drain(stream: RequestStream) -> list:
    out = []
    while True:
        try:
            out.append(stream.get(timeout=0))
        except queue.Empty:
            return out


def test_events_are_released_in_output_order() -> None:
    stream = RequestStream("r", [1, 2, 3], RequestTrace("p", "d", 0.0))
    # The decode instance's tokens arrive before the prefill instance's first token.
    stream.push(TokenEvent("r", 1, [11], "b", source="d"))
    assert drain(stream) == []
    stream.push(TokenEvent("r", 2, [12], "c", finish_reason="length", source="d"))
    stream.push(TokenEvent("r", 0, [10], "a", source="p"))
    outs = drain(stream)
    assert [o.new_token_ids for o in outs] == [[10], [11], [12]]
    assert outs[-1].token_ids == [10, 11, 12] and outs[-1].text == "abc"
    assert outs[-1].finished and outs[-1].finish_reason == "length"
    assert outs[-1].prompt_token_ids == [1, 2, 3]


def test_finish_and_late_events() -> None:
    stream = RequestStream("r", [1], RequestTrace("p", "d", 0.0))
    stream.push(TokenEvent("r", 0, [10], "a"))
    stream.finish("abort")
    stream.push(TokenEvent("r", 1, [11], "b"))  # after the abort: ignored
    outs = drain(stream)
    assert outs[-1].finish_reason == "abort" and outs[-1].token_ids == [10]


def test_an_error_event_finishes_the_stream_at_once() -> None:
    stream = RequestStream("r", [1], RequestTrace("p", "d", 0.0))
    stream.push(TokenEvent("r", 0, [], finish_reason="error", error="boom"))
    assert drain(stream)[-1].finish_reason == "error"


def test_least_loaded_breaks_ties_by_order() -> None:
    assert least_loaded({"a": 3, "b": 1, "c": 1}) == "b"
    with pytest.raises(ValueError, match="instances"):
        least_loaded({})


def test_a_repeated_event_adds_neither_tokens_nor_text() -> None:
    # Around a migration, tokens already streamed can arrive again (from the instance a
    # request left, restarted under its name): once is enough, text included.
    stream = RequestStream("r", [1], RequestTrace("p", "d", 0.0))
    stream.push(TokenEvent("r", 0, [10], "no", source="p"))
    stream.push(TokenEvent("r", 1, [11], " longer", source="d"))
    stream.push(TokenEvent("r", 1, [11], " longer", source="d"))
    stream.push(TokenEvent("r", 2, [12], " just", finish_reason="length", source="d"))
    outs = drain(stream)
    assert [o.new_token_ids for o in outs] == [[10], [11], [12]]
    assert outs[-1].token_ids == [10, 11, 12] and outs[-1].text == "no longer just"
