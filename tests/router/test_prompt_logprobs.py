"""vLLM's ``prompt_logprobs`` on the disaggregated cluster (1 prefill + 1 decode
instance): computed on the prefill instance, carried with the first token, answered in
vLLM's shape over HTTP (the official ``openai`` client, ``extra_body``) and as proto
fields over gRPC (the SDK); equal to transformers' log_softmax over the prompt's logits.
Bad values are refused naming the field, with nothing allocated; after every test every
KV block is free on every instance."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import openai
import pytest

import baton
from cluster import Cluster
from router.service import Router
from router.vocabulary import Vocabulary
from tests.router.servers import HttpServerThread, ServerThread, wait_cluster_idle

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

TOL = 2e-3  # fp32 on both sides; the kernels' summation orders differ
TEXT = "The history of computing is a story of ideas that took decades to meet machines."
MSGS: list[Any] = [{"role": "user", "content": "Name a colour."}]
Reference = Callable[[list[int]], Any]  # ids -> log_softmax [P, V]


@pytest.fixture(scope="module")
def reference() -> Reference:
    from engine.loader.default import default_model_path

    path = Path(default_model_path())
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32
    ).eval()

    def log_softmax(ids: list[int]) -> Any:
        with torch.no_grad():
            return torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), dim=-1)

    return log_softmax


@pytest.fixture(autouse=True)
def _idle_after(cluster: Cluster) -> Iterator[None]:
    yield
    wait_cluster_idle(cluster)


def check_vllm_shape(
    entries: list[Any], ids: list[int], ref: Any, top: int, vocab: Vocabulary
) -> None:
    """vLLM's list: None, then {token id: {logprob, rank, decoded_token}} per token."""
    assert len(entries) == len(ids) and entries[0] is None
    for i, entry in enumerate(entries[1:]):
        want = ref[i]
        token = ids[i + 1]
        assert str(token) == next(iter(entry))  # the prompt's token first
        assert top <= len(entry) <= top + 1  # the top-N, plus the prompt's token if not in it
        for key, value in entry.items():
            t = int(key)
            assert abs(value["logprob"] - float(want[t])) < TOL, (i, t)
            assert abs(value["rank"] - (int((want > want[t]).sum()) + 1)) <= 1
            assert value["decoded_token"] == vocab.text(t)
        best = [int(k) for k, v in entry.items() if v["rank"] <= top and int(k) != token]
        assert all(float(want[t]) >= float(want.topk(top).values[-1]) - TOL for t in best)


def test_completions_and_chat_over_http(
    client: openai.OpenAI, server: HttpServerThread, vocab: Vocabulary, reference: Reference
) -> None:
    ids = vocab.tokenizer.encode(TEXT, add_special_tokens=False)
    ref = reference(ids)
    out = client.completions.create(
        model="", prompt=ids, max_tokens=3, temperature=0, extra_body={"prompt_logprobs": 2}
    )
    check_vllm_shape(out.choices[0].prompt_logprobs, ids, ref, 2, vocab)  # type: ignore[attr-defined]
    # n = 2: the prompt computed once; each choice carries it (vLLM's completions).
    two = client.completions.create(
        model="", prompt=ids, max_tokens=2, temperature=0, n=2, extra_body={"prompt_logprobs": 0}
    )
    for choice in two.choices:
        check_vllm_shape(choice.prompt_logprobs, ids, ref, 0, vocab)  # type: ignore[attr-defined]
    # Chat: on the response (vLLM's place); the ids are the rendered template's.
    status, tok = server.request(
        "POST", "/tokenize", json.dumps({"messages": MSGS, "add_generation_prompt": True}).encode()
    )
    assert status == 200
    chat_ids = tok["tokens"]
    chat = client.chat.completions.create(
        model="", messages=MSGS, max_tokens=2, extra_body={"prompt_logprobs": 1}
    )
    assert chat.usage is not None and chat.usage.prompt_tokens == len(chat_ids)
    check_vllm_shape(chat.prompt_logprobs, chat_ids, reference(chat_ids), 1, vocab)  # type: ignore[attr-defined]
    plain = client.completions.create(model="", prompt=ids, max_tokens=1)
    assert getattr(plain.choices[0], "prompt_logprobs", None) is None


def test_sdk_over_grpc(router: Router, vocab: Vocabulary, reference: Reference) -> None:
    ids = vocab.tokenizer.encode(TEXT, add_special_tokens=False)
    ref = reference(ids)
    st = ServerThread(router)
    try:
        with baton.Client(st.target) as sdk:
            params = baton.SamplingParams(max_tokens=3, temperature=0, prompt_logprobs=3)
            out = sdk.generate(ids, params)
            rows = out.prompt_logprobs
            assert rows is not None and len(rows) == len(ids) - 1
            for i, row in enumerate(rows):
                want = ref[i]
                assert row.sampled.token_id == ids[i + 1]
                assert row.sampled.token == vocab.text(ids[i + 1])
                assert abs(row.sampled.logprob - float(want[ids[i + 1]])) < TOL
                assert abs(row.sampled.rank - (int((want > want[ids[i + 1]]).sum()) + 1)) <= 1
                ref_top = want.topk(3)
                assert [t.rank for t in row.top] == [1, 2, 3]
                for j, t in enumerate(row.top):
                    assert abs(t.logprob - float(ref_top.values[j])) < TOL
                    assert abs(float(want[t.token_id]) - t.logprob) < TOL
            chunks = list(sdk.stream(ids, params))
            firsts = [c for c in chunks if c.prompt_logprobs]
            assert len(firsts) == 1 and firsts[0].token_ids  # with the first token
            assert firsts[0].prompt_logprobs == rows
            assert b"".join(c.text.encode() for c in chunks).decode() == out.text
    finally:
        st.stop()


@pytest.mark.parametrize("value", [-1, 21, 1.5, "2", True])
def test_bad_values_400_naming_the_field(
    server: HttpServerThread, cluster: Cluster, value: object
) -> None:
    for path, body in (
        ("/v1/completions", {"prompt": "Hi", "max_tokens": 2}),
        ("/v1/chat/completions", {"messages": MSGS, "max_tokens": 2}),
    ):
        raw = json.dumps({**body, "prompt_logprobs": value}).encode()
        status, reply = server.request("POST", path, raw)
        assert status == 400, reply
        assert reply["error"]["param"] == "prompt_logprobs", reply
        wait_cluster_idle(cluster)


def test_stream_refused_and_grpc_invalid_argument(
    server: HttpServerThread, router: Router, cluster: Cluster
) -> None:
    raw = json.dumps({"prompt": "Hi", "stream": True, "prompt_logprobs": 1}).encode()
    status, reply = server.request("POST", "/v1/completions", raw)
    assert status == 400 and reply["error"]["param"] == "prompt_logprobs", reply
    st = ServerThread(router)
    try:
        with baton.Client(st.target) as sdk:
            for bad in (-1, 21, True):
                with pytest.raises(baton.BatonError) as info:
                    sdk.generate("Hi", baton.SamplingParams(max_tokens=2, prompt_logprobs=bad))
                assert info.value.field == "prompt_logprobs", info.value
                wait_cluster_idle(cluster)
    finally:
        st.stop()
