"""The OpenAI-compatible HTTP API: request mapping and SSE framing without a server, then
a real server over the session's cluster, driven by the official ``openai`` client
(greedy outputs equal the offline engine's) and by raw HTTP for every kind of bad
input, which must be a 400 naming the field while the server keeps serving."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from typing import Any

import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam
from prometheus_client.parser import text_string_to_metric_families

from cluster import Cluster
from engine import LLM, SamplingParams
from engine.outputs import RequestOutput
from router.errors import RouterError
from router.http_server import MAX_BODY_BYTES
from router.metrics import RouterMetrics
from router.openai_protocol import (
    CHAT_DEFAULT_MAX_TOKENS,
    parse_chat,
    parse_completion,
    parse_json_body,
)
from router.openai_response import ResponseBuilder, sse
from router.service import Router
from tests.router.servers import HttpServerThread, wait_cluster_idle

# -- without a server ------------------------------------------------------------------


def test_completion_body_maps_to_sampling_params() -> None:
    body = {
        "model": "m", "prompt": "hi", "max_tokens": 7, "temperature": 0.5, "top_p": 0.9,
        "top_k": 4, "min_p": 0.1, "seed": 3, "stop": "\n", "presence_penalty": 0.5,
        "frequency_penalty": -0.5, "repetition_penalty": 1.2, "logprobs": 2,
        "ignore_eos": True, "skip_special_tokens": False, "n": 1, "user": "u",
        "stream": True, "stream_options": {"include_usage": True},
    }  # fmt: skip
    api = parse_completion(body, "r1")
    assert api.input.prompt == "hi" and api.input.model == "m" and api.input.request_id == "r1"
    assert api.stream and api.include_usage and api.logprobs
    assert api.input.params == SamplingParams(
        max_tokens=7, temperature=0.5, top_p=0.9, top_k=4, min_p=0.1, seed=3, stop=["\n"],
        presence_penalty=0.5, frequency_penalty=-0.5, repetition_penalty=1.2, logprobs=2,
        ignore_eos=True, skip_special_tokens=False,
    )  # fmt: skip
    # OpenAI's defaults where the body is silent (nulls count as silent).
    plain = parse_completion({"prompt": "x", "temperature": None}, "r2")
    assert plain.input.params == SamplingParams() and not plain.stream and not plain.logprobs


@pytest.mark.parametrize(
    "prompt, text, ids",
    [("a", "a", None), (["a"], "a", None), ([1, 2], None, [1, 2]), ([[1, 2]], None, [1, 2])],
)
def test_completion_prompt_forms(prompt: Any, text: str | None, ids: list[int] | None) -> None:
    api = parse_completion({"prompt": prompt}, "r")
    assert (api.input.prompt, api.input.prompt_token_ids) == (text, ids)


def test_chat_body_maps_to_sampling_params() -> None:
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
    ]
    api = parse_chat({"messages": messages, "max_tokens": 5, "max_completion_tokens": 9}, "r")
    assert api.input.messages == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "a\nb"},
    ]
    assert api.input.params.max_tokens == 9  # max_completion_tokens wins, as in OpenAI
    assert api.input.params.logprobs is None and not api.logprobs
    api = parse_chat({"messages": messages, "logprobs": True, "top_logprobs": 3}, "r")
    assert api.input.params.logprobs == 3 and api.logprobs
    assert api.input.params.max_tokens == CHAT_DEFAULT_MAX_TOKENS
    assert parse_chat({"messages": messages, "logprobs": True}, "r").input.params.logprobs == 0


@pytest.mark.parametrize(
    "kind, body, param",
    [
        ("completion", {}, "prompt"),
        ("completion", {"prompt": ""}, "prompt"),
        ("completion", {"prompt": []}, "prompt"),
        ("completion", {"prompt": ["a", "b"]}, "prompt"),
        ("completion", {"prompt": [1, True]}, "prompt"),
        ("completion", {"prompt": "a", "temperature": "hot"}, "temperature"),
        ("completion", {"prompt": "a", "temperature": -1}, "temperature"),
        ("completion", {"prompt": "a", "top_p": 1.5}, "top_p"),
        ("completion", {"prompt": "a", "max_tokens": 0}, "max_tokens"),
        ("completion", {"prompt": "a", "n": 17}, "n"),
        ("completion", {"prompt": "a", "echo": "yes"}, "echo"),
        ("completion", {"prompt": "a", "model": 5}, "model"),
        ("completion", {"prompt": "a", "stream": "yes"}, "stream"),
        ("completion", {"prompt": "a", "stream_options": {"x": 1}}, "stream_options"),
        ("completion", {"prompt": "a", "logit_bias": {"x": 1}}, "logit_bias"),
        ("chat", {}, "messages"),
        ("chat", {"messages": []}, "messages"),
        ("chat", {"messages": [{"role": "user", "content": 1}]}, "messages[0].content"),
        ("chat", {"messages": [{"content": "a"}]}, "messages[0].role"),
        ("chat", {"messages": [{"role": "user", "content": "a"}], "top_logprobs": 2},
         "top_logprobs"),
        ("chat", {"messages": [{"role": "user", "content": "a"}], "max_completion_tokens": -1},
         "max_completion_tokens"),
        ("chat", {"messages": [{"role": "user", "content": "a"}], "tools": [{}]}, "tools"),
    ],
)  # fmt: skip
def test_bad_bodies_name_the_field(kind: str, body: dict[str, Any], param: str) -> None:
    parse = parse_chat if kind == "chat" else parse_completion
    with pytest.raises(RouterError) as info:
        parse(body, "r")
    assert info.value.param == param and info.value.mapping.http_status == 400
    assert info.value.message.startswith(f"{param}: ")


@pytest.mark.parametrize(
    "raw", [b"", b"{", b"[1, 2]", b'"x"', b'{"a": NaN}', b'{"a": "\xff"}', b"[" * 100_000]
)
def test_bodies_that_are_not_json_objects(raw: bytes) -> None:
    with pytest.raises(RouterError) as info:
        parse_json_body(raw)
    assert info.value.param == "body" and info.value.mapping.http_status == 400


def test_sse_framing_keeps_one_event_per_data_line() -> None:
    assert sse({"text": "a\nb", "é": 1}) == 'data: {"text": "a\\nb", "é": 1}\n\n'.encode()


def _snapshots() -> list[RequestOutput]:
    """A request's outputs: one token, one held back by the detokenizer, then the end."""
    return [
        RequestOutput("r", [1, 2], [5], "Hi", [5], "Hi", logprobs=[[(5, -0.1), (5, -0.1)]]),
        RequestOutput("r", [1, 2], [5, 6], "Hi", [6], "", logprobs=[[(5, -0.1)], [(6, -1.0)]]),
        RequestOutput(
            "r", [1, 2], [5, 6, 7], "Hi there", [7], " there", finished=True,
            finish_reason="length", num_cached_tokens=1,
            logprobs=[[(5, -0.1)], [(6, -1.0)], [(7, -0.5), (8, -0.4)]],
        ),
    ]  # fmt: skip


def test_completion_chunks() -> None:
    api = parse_completion({"prompt": "x", "stream": True, "logprobs": 1}, "r")
    builder = ResponseBuilder(api, "m")
    chunks = [c for out in _snapshots() for c in builder.chunks(out)]
    assert [c["choices"][0]["text"] for c in chunks] == ["Hi", "", " there"]
    assert [c["choices"][0]["finish_reason"] for c in chunks] == [None, None, "length"]
    assert all(c["object"] == "text_completion" and c["id"] == "cmpl-r" for c in chunks)
    assert "usage" not in chunks[0]  # only with stream_options.include_usage
    tokens = [t for c in chunks for t in c["choices"][0]["logprobs"]["tokens"]]
    assert tokens == ["token_id:5", "token_id:6", "token_id:7"]  # each token exactly once
    assert chunks[2]["choices"][0]["logprobs"]["top_logprobs"] == [
        {"token_id:8": -0.4, "token_id:7": -0.5}
    ]


def test_chat_chunks_and_usage() -> None:
    api = parse_chat(
        {"messages": [{"role": "user", "content": "x"}], "stream_options": {"include_usage": True}},
        "r",
    )
    builder = ResponseBuilder(api, "m")
    outs = _snapshots()
    chunks = [c for out in outs for c in builder.chunks(out)]
    deltas = [c["choices"][0]["delta"] for c in chunks]
    assert deltas == [
        {"role": "assistant", "content": ""},
        {"content": "Hi"},
        {"content": " there"},
        {},
    ]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert all(c["object"] == "chat.completion.chunk" and c["usage"] is None for c in chunks)
    usage = builder.usage_chunk(outs[-1])
    assert usage["choices"] == [] and usage["usage"] == {
        "prompt_tokens": 2, "completion_tokens": 3, "total_tokens": 5,
        "prompt_tokens_details": {"cached_tokens": 1},
    }  # fmt: skip
    whole = builder.response(outs[-1])
    assert whole["object"] == "chat.completion" and whole["id"] == "chatcmpl-r"
    assert whole["choices"][0]["message"] == {"role": "assistant", "content": "Hi there"}


# -- a real server ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def metrics() -> RouterMetrics:
    return RouterMetrics()


@pytest.fixture(scope="module")
def server(cluster: Cluster, metrics: RouterMetrics) -> Iterator[HttpServerThread]:
    st = HttpServerThread(Router(cluster, metrics=metrics), metrics=metrics)
    yield st
    st.stop()


@pytest.fixture(scope="module")
def model(client: openai.OpenAI) -> str:
    return client.models.list().data[0].id


@pytest.fixture(scope="module")
def offline() -> LLM:
    return LLM(None)


PROMPTS = ["The capital of France is", "def fibonacci(n):"]
QUESTION = "What is the capital of France?"
CHAT: list[ChatCompletionMessageParam] = [{"role": "user", "content": QUESTION}]


def test_models(server: HttpServerThread, client: openai.OpenAI, cluster: Cluster) -> None:
    models = client.models.list().data
    assert [m.id for m in models] == ["SmolLM2-135M-Instruct"]
    assert models[0].model_extra == {"max_model_len": cluster.max_model_len}
    status, body = server.request("GET", "/health")
    assert status == 200 and body["status"] == "ok"


def test_greedy_completions_equal_the_offline_engine(
    client: openai.OpenAI, model: str, offline: LLM
) -> None:
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    expected = offline.generate(PROMPTS, params)
    for prompt, want in zip(PROMPTS, expected, strict=True):
        got = client.completions.create(
            model=model,
            prompt=prompt,
            max_tokens=12,
            temperature=0,
            extra_body={"ignore_eos": True},
        )
        assert got.object == "text_completion" and got.model == model
        assert got.choices[0].text == want.text and got.choices[0].finish_reason == "length"
        assert got.usage is not None and got.usage.completion_tokens == 12
        assert got.usage.prompt_tokens == len(want.prompt_token_ids)
    by_ids = client.completions.create(
        model=model, prompt=expected[0].prompt_token_ids, max_tokens=12, temperature=0,
        extra_body={"ignore_eos": True},
    )  # fmt: skip
    assert by_ids.choices[0].text == expected[0].text


def test_greedy_chat_equals_the_offline_engine(
    client: openai.OpenAI, model: str, offline: LLM
) -> None:
    messages = [{"role": "user", "content": QUESTION}]
    want = offline.chat(messages, SamplingParams(max_tokens=16, temperature=0))[0]
    got = client.chat.completions.create(
        model=model, messages=CHAT, max_completion_tokens=16, temperature=0
    )
    assert got.object == "chat.completion"
    assert got.choices[0].message.role == "assistant"
    assert got.choices[0].message.content == want.text
    assert got.choices[0].finish_reason == want.finish_reason
    assert got.usage is not None and got.usage.completion_tokens == len(want.token_ids)


def test_streamed_completion_with_usage(client: openai.OpenAI, model: str) -> None:
    args: dict[str, Any] = dict(
        model=model,
        prompt=PROMPTS[0],
        max_tokens=10,
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    whole = client.completions.create(**args)
    chunks = list(
        client.completions.create(**args, stream=True, stream_options={"include_usage": True})
    )
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == whole.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage
    assert all(c.usage is None for c in chunks[:-1])


def test_streamed_chat_with_usage(client: openai.OpenAI, model: str) -> None:
    args: dict[str, Any] = dict(model=model, messages=CHAT, max_tokens=12, temperature=0)
    whole = client.chat.completions.create(**args)
    chunks = list(
        client.chat.completions.create(**args, stream=True, stream_options={"include_usage": True})
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert chunks[-2].choices[0].finish_reason == whole.choices[0].finish_reason
    assert chunks[-1].usage is not None and whole.usage is not None
    assert chunks[-1].usage.total_tokens == whole.usage.total_tokens
    plain = list(client.chat.completions.create(**args, stream=True))
    assert all(c.usage is None for c in plain)


def test_logprobs(client: openai.OpenAI, model: str) -> None:
    got = client.completions.create(
        model=model, prompt=PROMPTS[0], max_tokens=4, temperature=0, logprobs=2,
        extra_body={"ignore_eos": True},
    )  # fmt: skip
    lp = got.choices[0].logprobs
    assert lp is not None and lp.tokens is not None and lp.top_logprobs is not None
    assert len(lp.tokens) == len(lp.top_logprobs) == 4
    # Greedy: the sampled token is the most likely one, so it is among the top 2.
    assert all(
        len(top) == 2 and tok in top for tok, top in zip(lp.tokens, lp.top_logprobs, strict=True)
    )
    chat = client.chat.completions.create(
        model=model, messages=CHAT, max_tokens=4, temperature=0, logprobs=True, top_logprobs=3
    )
    assert chat.choices[0].logprobs is not None and chat.usage is not None
    content = chat.choices[0].logprobs.content
    assert content is not None and len(content) == chat.usage.completion_tokens
    assert all(len(c.top_logprobs) == 3 and c.logprob <= 0 for c in content)


def _bad_cases(model: str, max_len: int) -> list[tuple[str, bytes, str]]:
    """(path, body, the field the 400 must name)."""
    c, chat = "/v1/completions", "/v1/chat/completions"
    msgs = [{"role": "user", "content": "hi"}]

    def j(**body: Any) -> bytes:
        return json.dumps({"model": model, **body}).encode()

    return [
        (c, j(prompt=""), "prompt"),
        (c, j(prompt="hello " * (max_len + 50), max_tokens=1), "prompt"),
        (c, j(prompt=[10**9]), "prompt"),
        (c, j(prompt="hi", max_tokens=max_len), "max_tokens"),
        (c, j(prompt="hi", temperature=-0.5), "temperature"),
        (c, j(prompt="hi", temperature="hot"), "temperature"),
        (c, j(prompt="hi", top_p=1.5), "top_p"),
        (c, j(prompt="hi", stop=5), "stop"),
        (c, j(prompt="hi", n=0), "n"),
        (c, j(prompt=["a", "b"]), "prompt"),
        (c, j(prompt="hi", stream=True, max_tokens=max_len), "max_tokens"),
        (c, json.dumps({"model": "gpt-4", "prompt": "hi"}).encode(), "model"),
        (c, j(), "prompt"),
        (c, b'{"prompt": "hi",', "body"),
        (c, b"[1, 2, 3]", "body"),
        (c, b'{"prompt": "\xff\xfe"}', "body"),
        (c, b'{"prompt": "' + b"a" * (MAX_BODY_BYTES + 1) + b'"}', "body"),
        (chat, j(), "messages"),
        (chat, j(messages="hi"), "messages"),
        (chat, j(messages=[{"role": "user", "content": 7}]), "messages[0].content"),
        (chat, j(messages=msgs, max_completion_tokens=max_len), "max_completion_tokens"),
        (chat, j(messages=msgs, top_logprobs=2), "top_logprobs"),
        (chat, j(messages=msgs, logit_bias={"5": 101}), "logit_bias"),
    ]


def test_bad_requests_are_400_naming_the_field(
    server: HttpServerThread, client: openai.OpenAI, model: str, cluster: Cluster
) -> None:
    for path, body, param in _bad_cases(model, cluster.max_model_len):
        status, reply = server.request("POST", path, body, {"Content-Type": "application/json"})
        assert status == 400, (path, body[:80], reply)
        error = reply["error"]
        assert error["param"] == param, (body[:80], error)
        assert error["message"].startswith(f"{param}: ") and error["code"] is None
        assert error["type"] == "invalid_request_error"
    status, reply = server.request("GET", "/v1/nothing")
    assert status == 404 and reply["error"]["type"] == "not_found_error"
    # ...and the server still serves.
    got = client.completions.create(model=model, prompt="Hi", max_tokens=2, temperature=0)
    assert got.choices[0].finish_reason in ("stop", "length")
    wait_cluster_idle(cluster)


def test_api_key(cluster: Cluster) -> None:
    keyed = HttpServerThread(Router(cluster), metrics=RouterMetrics(), api_key="s3cret")
    try:
        for key in ("wrong", None):
            headers = {"Authorization": f"Bearer {key}"} if key else {}
            status, reply = keyed.request("GET", "/v1/models", headers=headers)
            assert status == 401 and reply["error"]["type"] == "authentication_error"
        good = openai.OpenAI(base_url=f"http://127.0.0.1:{keyed.port}/v1", api_key="s3cret")
        assert good.models.list().data
        bad = openai.OpenAI(
            base_url=f"http://127.0.0.1:{keyed.port}/v1", api_key="x", max_retries=0
        )
        with pytest.raises(openai.AuthenticationError):
            bad.models.list()
        assert keyed.request("GET", "/health")[0] == 200  # exempt: probes carry no key
        assert keyed.request("GET", "/metrics")[0] == 200
    finally:
        keyed.stop()


def _decode_running(cluster: Cluster) -> int:
    return sum(s.num_running for s in cluster.stats() if s.role == "decode")


@pytest.mark.parametrize("stream", [True, False])
def test_client_disconnect_aborts_the_request(
    server: HttpServerThread, model: str, cluster: Cluster, stream: bool
) -> None:
    # Thousands of tokens: far longer than the 10 s the cluster gets to go idle.
    body = json.dumps(
        {"model": model, "prompt": "Tell me a story.", "max_tokens": 4000, "ignore_eos": True,
         "temperature": 0, "stream": stream}
    ).encode()  # fmt: skip
    head = f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n\r\n"
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        sock.sendall(head.encode() + body)
        if stream:
            received = b""
            while received.count(b"data: ") < 3:
                received += sock.recv(65536)
            assert received.startswith(b"HTTP/1.1 200")
        deadline = time.monotonic() + 10
        while _decode_running(cluster) == 0:
            assert time.monotonic() < deadline, "the request never reached the decode instance"
            time.sleep(0.05)
    wait_cluster_idle(cluster, timeout_s=10)


def test_metrics_endpoint(
    server: HttpServerThread, client: openai.OpenAI, model: str, cluster: Cluster
) -> None:
    for prompt in PROMPTS:
        client.completions.create(
            model=model, prompt=prompt, max_tokens=4, temperature=0, extra_body={"ignore_eos": True}
        )
    status, text = server.request("GET", "/metrics")
    assert status == 200
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }
    counts = {name: v for (name, _), v in samples.items() if name.endswith("_seconds_count")}
    for name in ("time_to_first_token", "time_per_output_token", "inter_token_latency",
                 "e2e_request_latency", "kv_transfer"):  # fmt: skip
        assert counts[f"baton:{name}_seconds_count"] >= 2, name
    by_metric = {(name, dict(labels).get("instance_name")) for name, labels in samples}
    for instance in cluster.stats():
        for gauge in ("num_requests_waiting", "num_requests_running", "kv_cache_usage_perc"):
            assert (f"baton:{gauge}", instance.name) in by_metric
    finished = {
        dict(labels)["finished_reason"]: v
        for (name, labels), v in samples.items()
        if name == "baton:request_success_total"
    }
    assert finished["length"] >= 2
