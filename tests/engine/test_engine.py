"""The engine's step API, streaming, aborts, seeded sampling and bad input."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from engine import LLM, SamplingParams


def test_generate_and_chat_return_text_and_finish_reasons(smollm: LLM) -> None:
    [out] = smollm.generate(
        ["The capital of France is"], SamplingParams(max_tokens=8, temperature=0)
    )
    assert out.finish_reason == "length" and len(out.token_ids) == 8
    assert out.text == smollm.tokenizer.decode(out.token_ids)
    [chat] = smollm.chat(
        [{"role": "user", "content": "Say hello."}], SamplingParams(max_tokens=64, temperature=0)
    )
    assert chat.finish_reason == "stop"  # the model ends its turn with <|im_end|>
    assert chat.token_ids[-1] in smollm.tokenizer.eos_token_ids
    assert chat.text and "<|im_end|>" not in chat.text


def test_parameter_count_counts_the_tied_embedding_once(smollm: LLM) -> None:
    assert smollm.engine.num_parameters == 134_515_008  # SmolLM2-135M, as its GGUF stores it


def test_streamed_deltas_concatenate_to_the_final_text(smollm: LLM) -> None:
    engine = smollm.engine
    engine.add_request(
        "s", "Write a list of three fruits:", SamplingParams(max_tokens=30, temperature=0)
    )
    deltas, final = [], None
    while engine.has_unfinished():
        for out in engine.step():
            deltas.append(out.delta_text)
            final = out
    assert final is not None and final.finished
    assert "".join(deltas) == final.text
    [again] = smollm.generate(
        ["Write a list of three fruits:"], SamplingParams(max_tokens=30, temperature=0)
    )
    assert again.token_ids == final.token_ids


def test_stop_string_is_not_emitted(smollm: LLM) -> None:
    params = SamplingParams(max_tokens=40, temperature=0)
    [free] = smollm.generate(["Count: one, two, three,"], params)
    words = free.text.split()
    assert len(words) >= 2
    stop = words[1]
    [stopped] = smollm.generate(
        ["Count: one, two, three,"], SamplingParams(max_tokens=40, temperature=0, stop=[stop])
    )
    assert stopped.finish_reason == "stop"
    assert stop not in stopped.text
    assert free.text.startswith(stopped.text)


def test_abort_mid_decode_frees_blocks(smollm: LLM) -> None:
    engine = smollm.engine
    engine.add_request("x", "Once upon a time", SamplingParams(max_tokens=100, ignore_eos=True))
    for _ in range(3):
        engine.step()
    assert engine.stats().free_blocks < engine.stats().total_blocks
    out = engine.abort("x")
    assert out is not None and out.finish_reason == "abort" and out.finished
    assert engine.abort("x") is None
    assert engine.stats().free_blocks == engine.stats().total_blocks


def test_seeded_sampling_is_reproducible_across_batch_compositions(smollm: LLM) -> None:
    seeded = SamplingParams(max_tokens=20, temperature=0.9, top_p=0.95, seed=1234)
    prompt = "Tell me about the sea."
    [alone] = smollm.generate([prompt], seeded)
    crowd = smollm.generate(
        ["Hello there", prompt, "Numbers: 1 2 3", prompt],
        [
            SamplingParams(max_tokens=25, temperature=1.0),
            seeded,
            SamplingParams(max_tokens=5, temperature=0.7, seed=9),
            seeded,
        ],
    )
    assert crowd[1].token_ids == alone.token_ids == crowd[3].token_ids
    [other] = smollm.generate(
        [prompt], SamplingParams(max_tokens=20, temperature=0.9, top_p=0.95, seed=4321)
    )
    assert other.token_ids != alone.token_ids


def test_logprobs_are_returned_per_token(smollm: LLM) -> None:
    [out] = smollm.generate(["Hi"], SamplingParams(max_tokens=4, temperature=0, logprobs=3))
    assert out.logprobs is not None and len(out.logprobs) == 4
    for token, entry in zip(out.token_ids, out.logprobs, strict=True):
        assert entry[0][0] == token
        assert len(entry) == 4  # the sampled token, then the top 3
        assert entry[0][1] == pytest.approx(entry[1][1])  # greedy: the sampled token is the top one


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"prompts": [""]}, "prompt"),
        ({"prompt_token_ids": [[]]}, "prompt"),
        ({"prompt_token_ids": [[1, 2, 10**9]]}, "prompt_token_ids"),
        ({"prompt_token_ids": [[1] * 9000]}, "prompt"),
        ({"prompts": ["hi"], "params": SamplingParams(max_tokens=10**7)}, "max_tokens"),
        (
            {"prompt_token_ids": [[1] * 8000], "params": SamplingParams(max_tokens=500)},
            "max_tokens",
        ),
        ({"prompts": ["a", "b"], "params": [SamplingParams()]}, "params"),
    ],
)
def test_bad_requests_raise_value_error_and_leave_nothing_allocated(
    smollm: LLM, kwargs: dict, field: str
) -> None:
    with pytest.raises(ValueError, match=field):
        smollm.generate(**kwargs)


def test_a_bad_prompt_in_a_batch_leaves_nothing_allocated(smollm: LLM) -> None:
    with pytest.raises(ValueError, match="prompt"):
        smollm.generate(["fine", "also fine", ""], SamplingParams(max_tokens=3))
    # The autouse fixture asserts that no request is left and every block is free.


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"max_tokens": 0}, "max_tokens"),
        ({"temperature": -1.0}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_k": -2}, "top_k"),
        ({"stop": 5}, "stop"),
    ],
)
def test_bad_sampling_params_name_the_field(kwargs: dict, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        SamplingParams(**kwargs)


@pytest.mark.parametrize("model", ["/nonexistent/model", "/nonexistent/model.gguf"])
def test_nonexistent_model_names_the_path(model: str, make_llm: Callable[..., LLM]) -> None:
    with pytest.raises(ValueError, match="model"):
        make_llm(model)


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(max_tokens=24, temperature=0, ignore_eos=True, frequency_penalty=0.5),
        SamplingParams(max_tokens=24, temperature=0.9, top_p=0.95, seed=7, presence_penalty=0.3),
    ],
    ids=["greedy-penalised", "seeded"],
)
def test_a_resumed_request_continues_exactly(smollm: LLM, params: SamplingParams) -> None:
    """A migration's resume: the tokens generated elsewhere replay as output (penalties,
    max_tokens, seeded draws by position) and the rest equals an uninterrupted run."""
    prompt = "Tell me about the sea:"
    [whole] = smollm.generate([prompt], params)
    engine = smollm.engine
    ids = whole.prompt_token_ids
    for cut in (1, 9):
        engine.add_resumed("r", ids, whole.token_ids[:cut], params)
        final = None
        while engine.has_unfinished():
            for out in engine.step():
                final = out
        assert final is not None and final.finished
        assert final.token_ids == whole.token_ids
        assert final.finish_reason == whole.finish_reason
    with pytest.raises(ValueError, match="output_token_ids"):
        engine.add_resumed("r", ids, whole.token_ids, params)  # already finished
    assert engine.stats().free_blocks == engine.stats().total_blocks
