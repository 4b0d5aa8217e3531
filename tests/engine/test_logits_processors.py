"""Logits processing and structured output, on the real SmolLM2 engine (offline)."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest
import torch

from engine import LLM, SamplingParams
from engine.sampling_params import StructuredOutput

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 8}, "maxItems": 3},
    },
    "required": ["name", "age", "tags"],
    "additionalProperties": False,
}
PROMPT = [{"role": "user", "content": "Describe a person as JSON."}]


def test_min_tokens_masks_eos_until_reached(smollm: LLM) -> None:
    eos = smollm.tokenizer.eos_token_ids
    # "Say hi" ends quickly under greedy decoding; min_tokens forces it on.
    short = smollm.chat(
        [{"role": "user", "content": "Say hi"}], SamplingParams(temperature=0, max_tokens=64)
    )[0]
    assert short.finish_reason == "stop"
    params = SamplingParams(temperature=0, max_tokens=64, min_tokens=len(short.token_ids) + 10)
    out = smollm.chat([{"role": "user", "content": "Say hi"}], params)[0]
    assert len(out.token_ids) >= params.min_tokens
    assert not set(out.token_ids[: params.min_tokens]) & set(eos)


def test_logit_bias_forces_a_token_and_allowed_ids_restrict(smollm: LLM) -> None:
    token = smollm.tokenizer.encode(" banana", add_special_tokens=False)[0]
    out = smollm.generate("Hello", SamplingParams(max_tokens=5, logit_bias={str(token): 100}))[0]
    assert out.token_ids == [token] * 5
    allowed = smollm.tokenizer.encode(" yes no", add_special_tokens=False)
    out = smollm.generate("Hello", SamplingParams(max_tokens=6, allowed_token_ids=allowed))[0]
    assert set(out.token_ids) <= set(allowed)


def test_bad_words_are_never_generated(smollm: LLM) -> None:
    base = smollm.generate("The capital of France is", SamplingParams(temperature=0, max_tokens=8))
    assert "Paris" in base[0].text
    out = smollm.generate(
        "The capital of France is",
        SamplingParams(temperature=0, max_tokens=8, bad_words=["Paris"]),
    )[0]
    assert "Paris" not in out.text


def test_include_stop_str_in_output(smollm: LLM) -> None:
    params = SamplingParams(temperature=0, max_tokens=16, stop=["Paris"])
    out = smollm.generate("The capital of France is", params)[0]
    assert "Paris" not in out.text
    with_stop = SamplingParams(temperature=0, max_tokens=16, stop=["Paris"],
                               include_stop_str_in_output=True)  # fmt: skip
    out2 = smollm.generate("The capital of France is", with_stop)[0]
    assert out2.text == out.text + "Paris"


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_json_schema_output_validates(smollm: LLM, temperature: float) -> None:
    spec = StructuredOutput("json", json.dumps(SCHEMA))
    params = [
        SamplingParams(temperature=temperature, seed=s, max_tokens=120, structured_output=spec)
        for s in range(4)
    ]
    for out in smollm.chat([PROMPT] * 4, params):
        assert out.finish_reason == "stop", out.text
        jsonschema.validate(json.loads(out.text), SCHEMA)


def test_regex_and_choice(smollm: LLM) -> None:
    pattern = StructuredOutput("regex", r"\d{3}-[a-z]{2,4}")
    regex = SamplingParams(temperature=1.0, seed=1, max_tokens=20, structured_output=pattern)
    out = smollm.generate("Code:", regex)[0]
    assert re.fullmatch(r"\d{3}-[a-z]{2,4}", out.text), out.text
    choice = StructuredOutput("choice", json.dumps(["red", "green", "blue"]))
    outs = smollm.chat([PROMPT] * 3, [
        SamplingParams(temperature=1.0, seed=s, max_tokens=5, structured_output=choice)
        for s in range(3)
    ])  # fmt: skip
    assert all(o.text in ("red", "green", "blue") for o in outs)


def test_constraint_survives_a_move_by_replay(smollm: LLM) -> None:
    """A fresh matcher fed the output so far at once masks exactly as one that consumed
    it token by token (what a hand-off or a migration relies on)."""
    spec = StructuredOutput("json", json.dumps(SCHEMA))
    params = SamplingParams(temperature=0, max_tokens=120, structured_output=spec)
    whole = smollm.chat(PROMPT, params)[0].token_ids
    grammars = smollm.engine.grammars
    stepwise, moved = grammars.constraint(spec), grammars.constraint(spec)
    cpu = torch.device("cpu")
    for n in range(1, len(whole)):
        stepwise.sync(whole[:n])
        if n in (1, len(whole) // 2, len(whole) - 1):
            fresh = grammars.constraint(spec)
            fresh.sync(whole[:n])
            assert torch.equal(stepwise.allowed(cpu), fresh.allowed(cpu))
            # and the next token of the original run is allowed
            assert bool(fresh.allowed(cpu)[whole[n]])
    moved.sync(whole[:-1])
    assert torch.equal(moved.allowed(cpu), stepwise.allowed(cpu))


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"structured_output": StructuredOutput("json", '{"type": "nope"}')}, "response_format"),
        ({"structured_output": StructuredOutput("json", "{not json")}, "response_format"),
        ({"structured_output": StructuredOutput("regex", "a(b")}, "guided_regex"),
        ({"structured_output": StructuredOutput("choice", "[]")}, "guided_choice"),
        ({"logit_bias": {"10000000": 1}}, "logit_bias"),
        ({"allowed_token_ids": [10000000]}, "allowed_token_ids"),
    ],
)
def test_bad_constraints_name_the_field_and_allocate_nothing(
    smollm: LLM, kwargs: dict, field: str
) -> None:
    with pytest.raises(ValueError, match=f"^{field}: "):
        smollm.generate("Hi", SamplingParams(max_tokens=4, **kwargs))


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"logit_bias": {"5": 101}}, "logit_bias"),
        ({"logit_bias": {"x": 1}}, "logit_bias"),
        ({"min_tokens": 20, "max_tokens": 10}, "min_tokens"),
        ({"bad_words": "x"}, "bad_words"),
        ({"allowed_token_ids": []}, "allowed_token_ids"),
    ],
)
def test_bad_params_name_the_field(kwargs: dict, field: str) -> None:
    with pytest.raises(ValueError, match=f"^{field}: "):
        SamplingParams(**kwargs)


def test_params_round_trip_through_a_dict() -> None:
    p = SamplingParams(
        logit_bias={3: 1.5}, allowed_token_ids=[1, 2], bad_words=["x"], min_tokens=2,
        structured_output={"kind": "regex", "spec": "a+"}, include_stop_str_in_output=True,
    )  # fmt: skip
    d = json.loads(json.dumps(p.to_dict()))  # JSON-able, as it crosses sockets
    assert SamplingParams.from_dict(d) == p
