from __future__ import annotations

import ast
import dataclasses
from pathlib import Path
from typing import Any

import pytest

from engine import sampling_params
from engine.sampling_params import SamplingParams


def test_defaults() -> None:
    p = SamplingParams()
    assert p.max_tokens == 16
    assert p.temperature == 1.0
    assert p.top_p == 1.0 and p.top_k == -1 and p.min_p == 0.0
    assert p.seed is None and p.logprobs is None
    assert p.stop == () and p.stop_token_ids == ()
    assert not p.greedy and not p.has_penalties


def test_normalisation() -> None:
    assert SamplingParams(stop="###").stop == ("###",)
    assert SamplingParams(stop=["a", "b"]).stop == ("a", "b")
    assert SamplingParams(stop=None).stop == ()
    assert SamplingParams(stop_token_ids=[7, 9]).stop_token_ids == (7, 9)
    assert SamplingParams(stop_token_ids=None).stop_token_ids == ()
    p = SamplingParams(temperature=1, top_p=1, repetition_penalty=2)
    assert isinstance(p.temperature, float) and p.temperature == 1.0
    assert isinstance(p.repetition_penalty, float) and p.repetition_penalty == 2.0


def test_greedy_and_penalties_properties() -> None:
    assert SamplingParams(temperature=0).greedy
    assert not SamplingParams(temperature=0.1).greedy
    assert SamplingParams(repetition_penalty=1.1).has_penalties
    assert SamplingParams(presence_penalty=-0.5).has_penalties
    assert SamplingParams(frequency_penalty=0.5).has_penalties


def test_frozen_and_hashable() -> None:
    p = SamplingParams(stop=["x"])
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.temperature = 0.5  # type: ignore[misc]
    assert hash(p) == hash(SamplingParams(stop="x"))
    assert p == SamplingParams(stop=("x",))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_tokens": 0}, "max_tokens: must be >= 1, got 0"),
        ({"max_tokens": True}, "max_tokens: must be an int, got bool True"),
        ({"max_tokens": 2.0}, "max_tokens: must be an int, got float 2.0"),
        ({"temperature": -1.0}, "temperature: must be >= 0, got -1.0"),
        ({"temperature": "hot"}, "temperature: must be a number, got str 'hot'"),
        ({"temperature": float("nan")}, "temperature: must be finite, got nan"),
        ({"temperature": True}, "temperature: must be a number, got bool True"),
        ({"top_p": 0.0}, "top_p: must be in (0, 1], got 0.0"),
        ({"top_p": 1.5}, "top_p: must be in (0, 1], got 1.5"),
        ({"top_k": -2}, "top_k: must be -1 or 0 (disabled) or >= 1, got -2"),
        ({"top_k": 1.5}, "top_k: must be an int, got float 1.5"),
        ({"min_p": -0.1}, "min_p: must be in [0, 1], got -0.1"),
        ({"min_p": 1.1}, "min_p: must be in [0, 1], got 1.1"),
        ({"repetition_penalty": 0.0}, "repetition_penalty: must be > 0, got 0.0"),
        ({"presence_penalty": 2.5}, "presence_penalty: must be in [-2, 2], got 2.5"),
        ({"frequency_penalty": -2.1}, "frequency_penalty: must be in [-2, 2], got -2.1"),
        ({"stop": 5}, "stop: must be a str or a list of str, got int"),
        ({"stop": ["a", 3]}, "stop: every stop must be a str, got int"),
        ({"stop": ["a", ""]}, "stop: stop strings must be non-empty"),
        ({"stop": ""}, "stop: stop strings must be non-empty"),
        ({"stop_token_ids": 5}, "stop_token_ids: must be a list of int, got int"),
        ({"stop_token_ids": [1, "2"]}, "stop_token_ids: every id must be an int, got str '2'"),
        ({"stop_token_ids": [True]}, "stop_token_ids: every id must be an int, got bool True"),
        ({"stop_token_ids": [-1]}, "stop_token_ids: ids must be >= 0, got -1"),
        ({"logprobs": 21}, "logprobs: must be in [0, 20], got 21"),
        ({"logprobs": -1}, "logprobs: must be in [0, 20], got -1"),
        ({"seed": "1"}, "seed: must be an int, got str '1'"),
        ({"seed": 2**64}, "seed: must be in [-2**63, 2**64 - 1]"),
        ({"ignore_eos": 1}, "ignore_eos: must be a bool, got int 1"),
        ({"skip_special_tokens": "no"}, "skip_special_tokens: must be a bool, got str 'no'"),
    ],
)
def test_invalid_values_name_the_field(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError) as err:
        SamplingParams(**kwargs)
    assert str(err.value).startswith(message)


@pytest.mark.parametrize("top_k", [-1, 0, 1, 50])
def test_top_k_valid_values(top_k: int) -> None:
    assert SamplingParams(top_k=top_k).top_k == top_k


def test_edge_values_accepted() -> None:
    p = SamplingParams(
        max_tokens=1,
        temperature=0.0,
        top_p=1.0,
        min_p=1.0,
        logprobs=20,
        seed=-1,
        presence_penalty=-2.0,
        frequency_penalty=2.0,
        repetition_penalty=0.01,
    )
    assert p.logprobs == 20 and p.seed == -1


def test_from_dict_and_to_dict_round_trip() -> None:
    p = SamplingParams.from_dict({"temperature": 0.5, "stop": ["a"], "stop_token_ids": [3]})
    assert p == SamplingParams(temperature=0.5, stop=("a",), stop_token_ids=(3,))
    d = p.to_dict()
    assert d["stop"] == ["a"] and d["stop_token_ids"] == [3]
    assert SamplingParams.from_dict(d) == p


def test_from_dict_rejects_unknown_keys_by_name() -> None:
    message = r"^best_of: unknown sampling parameter\(s\) 'best_of', 'n'"
    with pytest.raises(ValueError, match=message):
        SamplingParams.from_dict({"n": 2, "best_of": 3, "temperature": 0.1})


def test_from_dict_validates_values() -> None:
    with pytest.raises(ValueError, match=r"^top_p: must be in \(0, 1\], got 2.0"):
        SamplingParams.from_dict({"top_p": 2})
    with pytest.raises(ValueError, match="must be an object"):
        SamplingParams.from_dict([("top_p", 1)])  # type: ignore[arg-type]


def test_type_checking_init_matches_the_fields() -> None:
    # The TYPE_CHECKING __init__ only exists for mypy; keep it in step with the fields.
    source = Path(sampling_params.__file__).read_text()
    cls = next(
        n
        for n in ast.walk(ast.parse(source))
        if isinstance(n, ast.ClassDef) and n.name == "SamplingParams"
    )
    init = next(n for n in ast.walk(cls) if isinstance(n, ast.FunctionDef) and n.name == "__init__")
    names = [a.arg for a in init.args.args[1:]]
    defaults = [ast.literal_eval(d) for d in init.args.defaults]
    fields = dataclasses.fields(SamplingParams)
    assert names == [f.name for f in fields]
    assert defaults == [f.default for f in fields]
