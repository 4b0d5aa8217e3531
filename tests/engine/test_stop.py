from __future__ import annotations

from collections.abc import Sequence

import pytest

from engine.sampling_params import SamplingParams
from engine.stop import StopChecker, StopDecision, stop_hold_back

EOS = 0


def run(
    params: SamplingParams, pieces: Sequence[str], ids: Sequence[int] | None = None
) -> tuple[list[str], list[StopDecision], str]:
    """Drive a checker the way the engine does: (deltas, decisions, final text).

    pieces[i] is the text token ids[i] adds (token ids default to 1, 2, ...).
    """
    checker = StopChecker(params, eos_token_ids=(EOS,))
    token_ids = list(ids) if ids is not None else list(range(1, len(pieces) + 1))
    text, emitted, deltas, decisions = "", 0, [], []
    output: list[int] = []
    for token, piece in zip(token_ids, pieces, strict=True):
        output.append(token)
        text += piece
        d = checker.check(output, token, text)
        assert d.text_end >= emitted
        deltas.append(text[emitted : d.text_end])
        emitted = d.text_end
        decisions.append(d)
        if d.finished:
            break
    return deltas, decisions, text[:emitted]


def test_no_stop_streams_everything_until_length() -> None:
    deltas, decisions, final = run(SamplingParams(max_tokens=3), ["a", "b", "c", "d"])
    assert deltas == ["a", "b", "c"]
    assert [d.finish_reason for d in decisions] == [None, None, "length"]
    assert final == "abc"


def test_stop_string_across_tokens_is_held_back_and_cut() -> None:
    deltas, decisions, final = run(
        SamplingParams(stop="###", max_tokens=10), ["Hello", " #", "#", "# world", "!"]
    )
    # " #" and "##" might start "###": held back, then the match cuts them off.
    assert deltas == ["Hello", " ", "", ""]
    assert decisions[-1] == StopDecision("stop", len("Hello "), "###")
    assert final == "Hello "


def test_held_back_text_is_released_when_it_cannot_match() -> None:
    deltas, decisions, final = run(SamplingParams(stop=["##"], max_tokens=3), ["a#", "b", "c"])
    assert deltas == ["a", "#b", "c"]
    assert decisions[-1].finish_reason == "length"
    assert final == "a#bc"


def test_stop_inside_one_token_drops_the_rest() -> None:
    _, decisions, final = run(SamplingParams(stop=["<end>"]), ["x", "yy<end>zz"])
    assert decisions[-1] == StopDecision("stop", 3, "<end>")
    assert final == "xyy"


def test_earliest_stop_wins() -> None:
    _, decisions, final = run(SamplingParams(stop=["world", "lo"]), ["hello world"])
    assert final == "hel" and decisions[-1].stop_reason == "lo"


def test_stop_string_on_the_last_allowed_token_reports_stop() -> None:
    _, decisions, final = run(SamplingParams(stop="END", max_tokens=2), ["ab", "cEND"])
    assert decisions[-1].finish_reason == "stop"
    assert final == "abc"


def test_length_releases_held_back_text() -> None:
    deltas, decisions, final = run(SamplingParams(stop="###", max_tokens=2), ["x", "##"])
    assert deltas == ["x", "##"]
    assert decisions[-1] == StopDecision("length", 3)
    assert final == "x##"


@pytest.mark.parametrize("eos_text", ["</s>", ""])
def test_eos_stops_and_its_text_is_not_emitted(eos_text: str) -> None:
    # With skip_special_tokens=False the eos has text; without, it adds nothing.
    deltas, decisions, final = run(
        SamplingParams(stop="##", max_tokens=10), ["hi", " #", eos_text, "more"], [5, 6, EOS, 7]
    )
    assert decisions[-1] == StopDecision("stop", len("hi #"), None)
    assert deltas == ["hi", " ", "#"]  # the held-back "#" is released at the finish
    assert final == "hi #"


def test_ignore_eos_continues_to_length() -> None:
    params = SamplingParams(ignore_eos=True, max_tokens=3)
    deltas, decisions, final = run(params, ["a", "", "b", "c"], [5, EOS, 6, 7])
    assert [d.finish_reason for d in decisions] == [None, None, "length"]
    assert final == "ab"


def test_stop_token_ids_stop_even_with_ignore_eos() -> None:
    params = SamplingParams(stop_token_ids=[42], ignore_eos=True)
    _, decisions, final = run(params, ["a", "<x>", "b"], [5, 42, 6])
    assert decisions[-1] == StopDecision("stop", 1, 42)
    assert final == "a"


def test_first_token_eos_gives_empty_text() -> None:
    _, decisions, final = run(SamplingParams(), ["</s>"], [EOS])
    assert decisions == [StopDecision("stop", 0, None)]
    assert final == ""


def test_max_tokens_one() -> None:
    _, decisions, final = run(SamplingParams(max_tokens=1), ["abc", "d"])
    assert decisions == [StopDecision("length", 3)]
    assert final == "abc"


def test_check_after_finish_repeats_the_decision() -> None:
    checker = StopChecker(SamplingParams(max_tokens=1), eos_token_ids=(EOS,))
    first = checker.check([3], 3, "x")
    assert checker.check([3, 4], 4, "xy") == first
    assert checker.emitted == 1


def test_long_stream_only_new_text_is_searched() -> None:
    # A stop string completed across many small pieces still matches exactly once.
    pieces = ["word "] * 50 + ["S", "T", "O", "P", " tail"]
    _, decisions, final = run(SamplingParams(stop="STOP", max_tokens=100), pieces)
    assert decisions[-1] == StopDecision("stop", 250, "STOP")
    assert final == "word " * 50


@pytest.mark.parametrize(
    ("text", "stops", "expected"),
    [
        ("abc", ["###"], 0),
        ("ab#", ["###"], 1),
        ("a##", ["###"], 2),
        ("###", ["###"], 2),  # proper prefixes only: a full match is the caller's job
        ("xab", ["abc", "b"], 2),
        ("", ["abc"], 0),
        ("a", ["abcd", "ab"], 1),
        ("hello", [], 0),
    ],
)
def test_stop_hold_back(text: str, stops: list[str], expected: int) -> None:
    assert stop_hold_back(text, stops) == expected
