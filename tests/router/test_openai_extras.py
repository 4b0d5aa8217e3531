"""vLLM's extra request fields, structured output, logprobs' token text, echo, /tokenize:
the official ``openai`` client against the session's disaggregated cluster (1 prefill +
1 decode instance), and the SDK over gRPC. After every test, nothing is waiting or
running and every KV block is free on every instance."""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterator
from typing import Any

import jsonschema
import openai
import pytest

import baton
from cluster import Cluster
from engine.sampling_params import StructuredOutput
from router.errors import RouterError
from router.openai_protocol import parse_chat, parse_completion
from router.service import Router
from router.vocabulary import Vocabulary
from tests.router.servers import HttpServerThread, ServerThread, wait_cluster_idle

MSGS: list[Any] = [{"role": "user", "content": "Describe a person as JSON."}]
SCHEMAS: list[dict[str, Any]] = [
    {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 16},
            "age": {"type": "integer", "minimum": 0, "maximum": 150},
        },
        "required": ["name", "age"],
        "additionalProperties": False,
    },
    {
        "type": "object",
        "properties": {
            "city": {"type": "string", "enum": ["Paris", "Rome", "Oslo"]},
            "address": {
                "type": "object",
                "properties": {
                    "street": {"type": "string", "maxLength": 20},
                    "zip": {"type": "string", "pattern": "^[0-9]{5}$"},
                },
                "required": ["street", "zip"],
                "additionalProperties": False,
            },
            "tags": {"type": "array", "items": {"type": "boolean"}, "maxItems": 3},
        },
        "required": ["city", "address", "tags"],
        "additionalProperties": False,
    },
]

# -- without a server ------------------------------------------------------------------


def test_vllm_fields_map_to_sampling_params(caplog: pytest.LogCaptureFixture) -> None:
    body = {
        "prompt": "x", "min_tokens": 3, "logit_bias": {"7": 5}, "allowed_token_ids": [1, 7],
        "bad_words": ["no"], "include_stop_str_in_output": True, "guided_regex": "a+",
        "spaces_between_special_tokens": True, "some_future_field": 1,
    }  # fmt: skip
    with caplog.at_level(logging.WARNING, logger="router.openai_extras"):
        p = parse_completion(body, "r").input.params
    assert (p.min_tokens, p.logit_bias, p.allowed_token_ids) == (3, ((7, 5.0),), (1, 7))
    assert p.bad_words == ("no",) and p.include_stop_str_in_output
    assert p.structured_output == StructuredOutput("regex", "a+")
    assert "some_future_field" in caplog.text and "spaces_between_special_tokens" in caplog.text


def test_response_formats() -> None:
    def spec(fmt: dict[str, Any]) -> StructuredOutput | None:
        return parse_chat(
            {"messages": MSGS, "response_format": fmt}, "r"
        ).input.params.structured_output

    assert spec({"type": "text"}) is None
    assert spec({"type": "json_object"}) == StructuredOutput("json_object")
    fmt = {
        "type": "json_schema",
        "json_schema": {"name": "p", "schema": SCHEMAS[0], "strict": True},
    }
    assert spec(fmt) == StructuredOutput("json", json.dumps(SCHEMAS[0]))


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "p",
          "schema": {"type": "nope"}}}}, "response_format"),
        ({"response_format": {"type": "yaml"}}, "response_format"),
        ({"guided_json": "{oops"}, "guided_json"),
        ({"guided_choice": []}, "guided_choice"),
        ({"guided_regex": "a", "guided_choice": ["b"]}, "guided_choice"),
        ({"logit_bias": {"1": -101}}, "logit_bias"),
        ({"min_tokens": 600}, "min_tokens"),
        ({"top_logprobs": 21, "logprobs": True}, "top_logprobs"),
        ({"n": 5}, "n"),
        ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
    ],
)  # fmt: skip
def test_bad_extras_name_the_field(body: dict[str, Any], param: str) -> None:
    with pytest.raises(RouterError) as info:
        parse_chat({"messages": MSGS, **body}, "r")
    assert info.value.param == param and info.value.message.startswith(f"{param}: ")


# -- a real server ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(cluster: Cluster) -> Iterator[HttpServerThread]:
    st = HttpServerThread(Router(cluster), metrics=None)
    yield st
    st.stop()


@pytest.fixture(scope="module")
def client(server: HttpServerThread) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="x", max_retries=0)


@pytest.fixture(scope="module")
def vocab(cluster: Cluster) -> Vocabulary:
    return Vocabulary.from_spec(cluster.tokenizer_spec())


@pytest.fixture(autouse=True)
def _idle_after(cluster: Cluster) -> Iterator[None]:
    yield
    wait_cluster_idle(cluster)


def _chat(client: openai.OpenAI, **kwargs: Any) -> Any:
    return client.chat.completions.create(model="", messages=MSGS, **kwargs)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
@pytest.mark.parametrize("schema", range(len(SCHEMAS)))
def test_json_schema_outputs_validate(
    client: openai.OpenAI, schema: int, temperature: float
) -> None:
    fmt = {
        "type": "json_schema",
        "json_schema": {"name": "s", "schema": SCHEMAS[schema], "strict": True},
    }
    for seed in (1, 2):
        out = _chat(client, response_format=fmt, temperature=temperature, seed=seed, max_tokens=150)
        choice = out.choices[0]
        assert choice.finish_reason == "stop", choice.message.content
        jsonschema.validate(json.loads(choice.message.content), SCHEMAS[schema])
        if temperature == 0:
            break


def test_json_object_and_guided_fields_streamed(client: openai.OpenAI) -> None:
    stream = _chat(client, response_format={"type": "json_object"}, stream=True, max_tokens=150,
                   temperature=1.0, seed=3)  # fmt: skip
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert isinstance(json.loads(text), dict)
    out = client.completions.create(model="", prompt="Zip code:", max_tokens=10, temperature=1.0,
                                    extra_body={"guided_regex": "[0-9]{5}"})  # fmt: skip
    assert re.fullmatch("[0-9]{5}", out.choices[0].text)
    out2 = _chat(client, extra_body={"guided_choice": ["yes", "no"]}, temperature=1.0, max_tokens=5)
    assert out2.choices[0].message.content in ("yes", "no")


def test_min_tokens_logit_bias_bad_words(client: openai.OpenAI, vocab: Vocabulary) -> None:
    hi = [{"role": "user", "content": "Say hi"}]
    base = client.chat.completions.create(model="", messages=hi, temperature=0, max_tokens=64)
    n = base.usage.completion_tokens
    longer = client.chat.completions.create(
        model="", messages=hi, temperature=0, max_tokens=n + 20, extra_body={"min_tokens": n + 10}
    )
    assert longer.usage.completion_tokens >= n + 10
    banana = vocab.tokenizer.encode(" banana", add_special_tokens=False)[0]
    forced = client.completions.create(
        model="", prompt="Hello", max_tokens=4, logit_bias={str(banana): 100}
    )
    assert forced.choices[0].text == " banana" * 4
    paris = client.completions.create(model="", prompt="The capital of France is", max_tokens=8,
                                      temperature=0)  # fmt: skip
    assert "Paris" in paris.choices[0].text
    banned = client.completions.create(
        model="", prompt="The capital of France is", max_tokens=8, temperature=0,
        extra_body={"bad_words": ["Paris"]},
    )  # fmt: skip
    assert "Paris" not in banned.choices[0].text


@pytest.mark.parametrize("stream", [False, True])
def test_logprobs_carry_token_text_and_bytes(
    client: openai.OpenAI, vocab: Vocabulary, stream: bool
) -> None:
    kwargs: dict[str, Any] = {
        "logprobs": True,
        "top_logprobs": 2,
        "max_tokens": 8,
        "temperature": 0,
    }
    if stream:
        chunks = list(_chat(client, stream=True, **kwargs))
        entries = [e for c in chunks if c.choices and c.choices[0].logprobs
                   for e in c.choices[0].logprobs.content]  # fmt: skip
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    else:
        out = _chat(client, **kwargs)
        entries, text = out.choices[0].logprobs.content, out.choices[0].message.content
    ids = vocab.tokenizer.encode(text, add_special_tokens=False)
    assert ids and [e.token for e in entries[: len(ids)]] == [vocab.text(i) for i in ids]
    for e in entries:
        assert bytes(e.bytes).decode("utf-8", "replace") == e.token
        assert len(e.top_logprobs) == 2 and not e.token.startswith("token_id:")
    out = client.completions.create(model="", prompt="The capital of France is", max_tokens=4,
                                    temperature=0, logprobs=1, echo=True)  # fmt: skip
    lp = out.choices[0].logprobs
    assert out.choices[0].text == "The capital of France is" + "".join(lp.tokens)
    assert lp.text_offset[0] == len("The capital of France is")


def test_tokenize_detokenize_and_models(server: HttpServerThread, cluster: Cluster) -> None:
    status, body = server.request(
        "POST", "/tokenize", json.dumps({"prompt": "Hello world"}).encode()
    )
    assert status == 200 and body["count"] == len(body["tokens"]) > 0
    assert body["max_model_len"] == cluster.max_model_len
    status, back = server.request(
        "POST", "/detokenize", json.dumps({"tokens": body["tokens"]}).encode()
    )
    assert status == 200 and back["prompt"] == "Hello world"
    status, chat = server.request("POST", "/tokenize", json.dumps({"messages": MSGS}).encode())
    assert status == 200 and chat["count"] > body["count"]
    status, bad = server.request("POST", "/detokenize", json.dumps({"tokens": [10**9]}).encode())
    assert status == 400 and bad["error"]["param"] == "tokens"


def test_bad_input_is_400_naming_the_field_with_nothing_allocated(
    server: HttpServerThread, cluster: Cluster
) -> None:
    bad_pattern = {"type": "object", "properties": {"a": {"type": "string", "pattern": "(["}}}
    cases = [  # the instance checks these when it accepts the request
        ({"guided_regex": "a(b"}, "guided_regex"),
        ({"logit_bias": {"10000000": 5}}, "logit_bias"),
        ({"allowed_token_ids": [10000000]}, "allowed_token_ids"),
        ({"guided_json": bad_pattern}, "guided_json"),
    ]  # fmt: skip
    for stream in (False, True):
        for extra, param in cases:
            body = json.dumps({"messages": MSGS, "max_tokens": 4, "stream": stream, **extra})
            status, reply = server.request("POST", "/v1/chat/completions", body.encode())
            assert status == 400, (extra, reply)
            assert reply["error"]["param"] == param, reply
            wait_cluster_idle(cluster)


def test_sdk_over_grpc(router: Router) -> None:
    st = ServerThread(router)
    try:
        with baton.Client(st.target) as sdk:
            so = baton.StructuredOutput.json_schema(SCHEMAS[1])
            params = baton.SamplingParams(max_tokens=150, temperature=1.0, seed=5,
                                          structured_output=so)  # fmt: skip
            out = sdk.chat(MSGS, params)
            jsonschema.validate(json.loads(out.text), SCHEMAS[1])
            forced = sdk.generate("Hello", baton.SamplingParams(max_tokens=3, logit_bias={29: 100},
                                                                 min_tokens=3))  # fmt: skip
            assert list(forced.token_ids) == [29, 29, 29]
            with pytest.raises(baton.BatonError) as info:
                sdk.generate(
                    "Hi", baton.SamplingParams(structured_output=baton.StructuredOutput.regex("a("))
                )
            assert "guided_regex" in str(info.value)
    finally:
        st.stop()
