"""vLLM's extra request fields, structured output, logprobs' token text, echo, /tokenize:
the official ``openai`` client against the session's disaggregated cluster (1 prefill +
1 decode instance), and the SDK over gRPC. After every test, nothing is waiting or
running and every KV block is free on every instance."""

from __future__ import annotations

import json
import logging
import re
import socket
import time
from collections.abc import Iterator
from dataclasses import replace
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

WEATHER = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 20},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
    },
    "required": ["city", "unit"],
    "additionalProperties": False,
}
TIME = {
    "type": "object",
    "properties": {"zone": {"type": "string", "pattern": "^[A-Z]{3}$"}},
    "required": ["zone"],
    "additionalProperties": False,
}
TOOLS: list[Any] = [
    {"type": "function", "function": {"name": "get_weather", "parameters": WEATHER}},
    {"type": "function", "function": {"name": "get_time", "parameters": TIME}},
]
PARAMS = {"get_weather": WEATHER, "get_time": TIME}
# A Hermes-style template (as Qwen2's): the tools in the system turn, calls in <tool_call>.
HERMES_TEMPLATE = (
    "{% if tools %}<|im_start|>system\nYou may call these tools:\n<tools>\n"
    "{% for t in tools %}{{ t | tojson }}\n{% endfor %}</tools>\n"
    'Answer with <tool_call>{"name": ..., "arguments": ...}</tool_call>.<|im_end|>\n{% endif %}'
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

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
        ({"n": 17}, "n"),
        ({"n": 0}, "n"),
        ({"tools": [{"type": "function", "function": {"name": "f",
                                                      "parameters": {"type": "nope"}}}]}, "tools"),
        ({"tools": [{"type": "function"}]}, "tools"),
        ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "x"}}},
         "tool_choice"),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"tools": TOOLS, "tool_choice": "required", "guided_regex": "a"}, "tool_choice"),
    ],
)  # fmt: skip
def test_bad_extras_name_the_field(body: dict[str, Any], param: str) -> None:
    with pytest.raises(RouterError) as info:
        parse_chat({"messages": MSGS, **body}, "r")
    assert info.value.param == param and info.value.message.startswith(f"{param}: ")


# -- a real server ---------------------------------------------------------------------


@pytest.fixture(autouse=True)
def _idle_after(request: pytest.FixtureRequest) -> Iterator[None]:
    yield
    if {"client", "server", "router"} & set(request.fixturenames):  # tests on the cluster
        wait_cluster_idle(request.getfixturevalue("cluster"))


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
    # Greedy: json_object bounds no string's length, and at temperature 1.0 a small model
    # can wander in one past any max_tokens (the cut object is then not JSON). The
    # json_schema tests cover temperature 1.0. The finish reason says the object closed.
    stream = _chat(client, response_format={"type": "json_object"}, stream=True, max_tokens=512,
                   temperature=0)  # fmt: skip
    chunks = [c for c in stream if c.choices]
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert chunks[-1].choices[0].finish_reason == "stop", text
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
        ({"n": 3, "logit_bias": {"10000000": 5}}, "logit_bias"),  # a group, refused whole
    ]  # fmt: skip
    for stream in (False, True):
        for extra, param in cases:
            body = json.dumps({"messages": MSGS, "max_tokens": 4, "stream": stream, **extra})
            status, reply = server.request("POST", "/v1/chat/completions", body.encode())
            assert status == 400, (extra, reply)
            assert reply["error"]["param"] == param, reply
            wait_cluster_idle(cluster)


def test_sdk_over_grpc(router: Router, vocab: Vocabulary) -> None:
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
            lp = sdk.generate("Paris is", baton.SamplingParams(max_tokens=4, logprobs=2))
            assert lp.logprobs is not None and len(lp.logprobs) == len(lp.token_ids)
            for t, row in zip(lp.token_ids, lp.logprobs, strict=True):
                assert row.sampled.token_id == t and row.sampled.token == vocab.text(t)
                assert row.sampled.bytes == vocab.bytes(t) and len(row.top) == 2
            streamed = [row for c in sdk.stream("Paris is", baton.SamplingParams(
                max_tokens=4, logprobs=1)) for row in c.logprobs or ()]  # fmt: skip
            assert streamed and all(r.sampled.token == vocab.text(r.sampled.token_id)
                                    for r in streamed)  # fmt: skip
            with pytest.raises(baton.BatonError) as info:
                sdk.generate(
                    "Hi", baton.SamplingParams(structured_output=baton.StructuredOutput.regex("a("))
                )
            assert "guided_regex" in str(info.value)
    finally:
        st.stop()


def test_n_over_grpc_with_the_sdk(router: Router, cluster: Cluster) -> None:
    st = ServerThread(router)
    try:
        with baton.Client(st.target) as sdk:
            greedy = baton.SamplingParams(max_tokens=6, temperature=0)
            one = sdk.generate("The capital of France is", greedy)
            before = [_counter(cluster, r, c) for r, c in MOVES]
            three = sdk.generate("The capital of France is", replace(greedy, n=3, logprobs=1))
            after = [_counter(cluster, r, c) for r, c in MOVES]
            assert [b - a for a, b in zip(before, after, strict=True)] == [1, 1, 3]
            assert [s.index for s in three.sequences] == [0, 1, 2]
            assert [s.token_ids for s in three.sequences] == [one.token_ids] * 3
            assert all(s.logprobs and len(s.logprobs) == 6 for s in three.sequences)
            assert three.text == one.text and three.usage.completion_tokens == 18
            seeded = baton.SamplingParams(max_tokens=8, temperature=1.0, seed=3, n=3)
            a = sdk.generate("Once upon a time", seeded)
            texts: dict[int, str] = {}
            ends: dict[int, str | None] = {}
            usage = []
            for c in sdk.stream("Once upon a time", seeded):
                texts[c.index] = texts.get(c.index, "") + c.text
                if c.finish_reason:
                    ends[c.index] = c.finish_reason
                if c.usage is not None:
                    usage.append(c.usage)
            assert [texts[i] for i in range(3)] == [s.text for s in a.sequences]
            assert set(ends) == {0, 1, 2} and len(usage) == 1
            assert usage[0].completion_tokens == sum(len(s.token_ids) for s in a.sequences)
            alone = sdk.generate("Once upon a time", replace(seeded, n=None, seed=5))
            assert alone.text == a.sequences[2].text  # sequence i: the seed + i request
            for bad in (17, 0):
                with pytest.raises(baton.BatonError) as info:
                    sdk.generate("Hi", replace(greedy, n=bad))
                assert info.value.code.name == "INVALID_ARGUMENT" and info.value.field == "n"
            with pytest.raises(baton.BatonError) as info:  # a group refused whole
                sdk.generate("Hi", replace(greedy, n=2, logit_bias={10_000_000: 1.0}))
            assert info.value.field == "logit_bias"
    finally:
        st.stop()


def test_tool_call_parsers() -> None:
    from router.tool_calls import extract, parse_tools

    plan = parse_tools({"tools": TOOLS})
    assert plan is not None and plan.mode == "auto"
    call = '{"name": "get_time", "arguments": {"zone": "UTC"}}'
    text = f"Let me check.\n<tool_call>\n{call}\n</tool_call>"
    content, calls = extract(plan, text, "hermes")
    assert content == "Let me check." and calls[0]["function"]["name"] == "get_time"
    assert json.loads(calls[0]["function"]["arguments"]) == {"zone": "UTC"}
    llama = (
        '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Oslo", "unit": "celsius"}}'
    )
    content, calls = extract(plan, llama, "llama3_json")
    assert content is None and json.loads(calls[0]["function"]["arguments"])["city"] == "Oslo"
    assert extract(plan, "Just text.", "hermes") == ("Just text.", [])
    assert extract(plan, '{"name": "unknown", "parameters": {}}', "llama3_json")[1] == []


def _check_calls(calls: Any) -> None:
    assert calls
    for call in calls:
        assert call.type == "function" and call.id
        jsonschema.validate(json.loads(call.function.arguments), PARAMS[call.function.name])


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_forced_tool_calls_validate(client: openai.OpenAI, temperature: float) -> None:
    ask = [{"role": "user", "content": "What is the weather in Paris?"}]
    named = {"type": "function", "function": {"name": "get_weather"}}
    common: dict[str, Any] = {
        "model": "",
        "messages": ask,
        "tools": TOOLS,
        "temperature": temperature,
    }
    out = client.chat.completions.create(**common, tool_choice=named, seed=7, max_tokens=100)
    assert out.choices[0].finish_reason == "tool_calls" and out.choices[0].message.content is None
    _check_calls(out.choices[0].message.tool_calls)
    assert out.choices[0].message.tool_calls[0].function.name == "get_weather"
    out = client.chat.completions.create(**common, tool_choice="required", seed=8, max_tokens=150)
    _check_calls(out.choices[0].message.tool_calls)
    # streamed: OpenAI's delta shape, reassembled the way clients do
    stream = client.chat.completions.create(
        **common, tool_choice=named, seed=9, max_tokens=100, stream=True
    )
    parts, reasons, pieces = _reassemble(stream)
    assert reasons[-1] == "tool_calls" and parts[0]["name"] == "get_weather"
    jsonschema.validate(json.loads(parts[0]["arguments"]), WEATHER)
    assert pieces[0] > 2  # the arguments streamed as the model wrote them, not at the end
    stream = client.chat.completions.create(
        **common, tool_choice="required", seed=8, max_tokens=150, stream=True
    )
    parts, reasons, pieces = _reassemble(stream)
    assert reasons[-1] in ("tool_calls", "length") and parts and pieces[0] > 2
    if reasons[-1] == "tool_calls":
        streamed = [(p["name"], json.loads(p["arguments"])) for p in parts.values()]
        assert streamed == [
            (c.function.name, json.loads(c.function.arguments))
            for c in out.choices[0].message.tool_calls
        ]  # the same seeded output as the whole response above


def _reassemble(stream: Any) -> tuple[dict[int, dict[str, str]], list[Any], dict[int, int]]:
    """Tool-call deltas put together as clients do; with each call's argument chunks."""
    parts: dict[int, dict[str, str]] = {}
    pieces: dict[int, int] = {}
    reasons = []
    for chunk in stream:
        for d in chunk.choices[0].delta.tool_calls or []:
            part = parts.setdefault(d.index, {"name": "", "arguments": ""})
            part["name"] += d.function.name or ""
            part["arguments"] += d.function.arguments or ""
            pieces[d.index] = pieces.get(d.index, 0) + bool(d.function.arguments)
        reasons.append(chunk.choices[0].finish_reason)
    return parts, reasons, pieces


def test_auto_and_none_tool_choice(client: openai.OpenAI, server: HttpServerThread) -> None:
    shots: list[Any] = [
        {"role": "user", "content": "Time in UTC?"},
        {"role": "assistant",
         "content": '<tool_call>{"name": "get_time", "arguments": {"zone": "UTC"}}</tool_call>'},
        {"role": "user", "content": "Time in CET?"},
    ]  # fmt: skip
    out = client.chat.completions.create(
        model="", messages=shots, tools=TOOLS, temperature=0, max_tokens=40,
        extra_body={"chat_template": HERMES_TEMPLATE},
    )  # fmt: skip
    choice = out.choices[0]
    assert choice.message.tool_calls, choice.message.content  # the model follows the shot
    assert choice.finish_reason == "tool_calls"
    _check_calls(choice.message.tool_calls)
    stream = client.chat.completions.create(
        model="", messages=shots, tools=TOOLS, temperature=0, max_tokens=40, stream=True,
        extra_body={"chat_template": HERMES_TEMPLATE},
    )  # fmt: skip
    parts, reasons, pieces = _reassemble(stream)
    assert reasons[-1] == "tool_calls" and pieces[0] > 1
    assert [(p["name"], json.loads(p["arguments"])) for p in parts.values()] == [
        (c.function.name, json.loads(c.function.arguments)) for c in choice.message.tool_calls
    ]
    plain = client.chat.completions.create(
        model="", messages=shots, tools=TOOLS, tool_choice="none", temperature=0, max_tokens=8
    )
    assert plain.choices[0].message.tool_calls is None and plain.choices[0].message.content
    # the template received the tools
    body = {"messages": shots, "chat_template": HERMES_TEMPLATE}
    without = server.request("POST", "/tokenize", json.dumps(body).encode())[1]["count"]
    with_tools = server.request("POST", "/tokenize", json.dumps({**body, "tools": TOOLS}).encode())
    assert with_tools[1]["count"] > without


def _counter(cluster: Cluster, role: str, name: str) -> float:
    return sum(s.counters.get(name, 0) for s in cluster.stats() if s.role == role)


def test_n_sequences(client: openai.OpenAI, server: HttpServerThread, cluster: Cluster) -> None:
    prompt = "The capital of France is"
    one = client.completions.create(model="", prompt=prompt, max_tokens=8, temperature=0)
    before = [_counter(cluster, r, c) for r, c in MOVES]
    three = client.completions.create(model="", prompt=prompt, max_tokens=8, temperature=0, n=3)
    # One prompt prefilled, handed off and pulled once; three sequences forked off it.
    after = [_counter(cluster, r, c) for r, c in MOVES]
    assert [b - a for a, b in zip(before, after, strict=True)] == [1, 1, 3]
    assert [c.index for c in three.choices] == [0, 1, 2]
    assert [c.text for c in three.choices] == [one.choices[0].text] * 3
    assert three.usage.completion_tokens == 3 * one.usage.completion_tokens
    seeded = {"model": "", "messages": MSGS, "max_tokens": 12, "temperature": 1.0, "seed": 11}
    a = client.chat.completions.create(**seeded, n=3)
    b = client.chat.completions.create(**seeded, n=3)
    texts = [c.message.content for c in a.choices]
    assert texts == [c.message.content for c in b.choices]
    # sequence i of a seeded request is the seed + i request's sequence
    single = client.chat.completions.create(**{**seeded, "seed": 12})
    assert texts[1] == single.choices[0].message.content
    stream = client.chat.completions.create(**seeded, n=3, stream=True)
    got: dict[int, str] = {}
    finished = set()
    for chunk in stream:
        for c in chunk.choices:
            got[c.index] = got.get(c.index, "") + (c.delta.content or "")
            if c.finish_reason:
                finished.add(c.index)
    assert [got[i] for i in range(3)] == texts and finished == {0, 1, 2}
    status, reply = server.request(
        "POST", "/v1/completions", json.dumps({"prompt": "x", "n": 17}).encode()
    )
    assert status == 400 and reply["error"]["param"] == "n"


MOVES = [("prefill", "handoffs"), ("decode", "pulls"), ("decode", "forked")]


@pytest.mark.parametrize("stream", [True, False])
def test_n_client_disconnect_aborts_every_sequence(
    server: HttpServerThread, cluster: Cluster, stream: bool
) -> None:
    body = json.dumps(
        {"prompt": "Tell me a story.", "max_tokens": 4000, "ignore_eos": True, "n": 3,
         "stream": stream, "response_format": None}
    ).encode()  # fmt: skip
    head = f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n\r\n"
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        sock.sendall(head.encode() + body)
        deadline = time.monotonic() + 30
        while sum(s.num_running for s in cluster.stats() if s.role == "decode") < 3:
            assert time.monotonic() < deadline, "the 3 sequences never all reached decode"
            time.sleep(0.05)
    wait_cluster_idle(cluster, timeout_s=15)


def test_llama3_json_auto_calls_stream_incrementally(client: openai.OpenAI) -> None:
    """Llama 3 JSON's auto: the call's header, then its parameters in several pieces,
    while the model writes them; the same call as the non-streamed answer. The output is
    pinned to a call's shape with guided_json, so the test does not hang on the model."""
    shots: list[Any] = [
        {"role": "user", "content": "Time in UTC?"},
        {"role": "assistant", "content": '{"name": "get_time", "parameters": {"zone": "UTC"}}'},
        {"role": "user", "content": "Time in CET?"},
    ]  # fmt: skip
    call = {
        "type": "object",
        "properties": {"name": {"const": "get_time"}, "parameters": TIME},
        "required": ["name", "parameters"],
        "additionalProperties": False,
    }
    extra = {"tool_parser": "llama3_json", "guided_json": call}
    kwargs: dict[str, Any] = dict(
        model="", messages=shots, tools=TOOLS, temperature=0, max_tokens=40, extra_body=extra
    )
    out = client.chat.completions.create(**kwargs)
    choice = out.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.tool_calls
    _check_calls(choice.message.tool_calls)
    parts, reasons, pieces = _reassemble(client.chat.completions.create(**kwargs, stream=True))
    assert reasons[-1] == "tool_calls" and pieces[0] > 1  # arguments streamed in pieces
    assert [(p["name"], json.loads(p["arguments"])) for p in parts.values()] == [
        (c.function.name, json.loads(c.function.arguments)) for c in choice.message.tool_calls
    ]
