"""Greedy output equals transformers token for token (fp32, the same weights).

The reference loads the same files through transformers' own loaders (its GGUF reader
for SmolLM2), so these tests check our loaders as well as the model and the engine.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from engine import LLM, SamplingParams
from engine.loader.default import default_model_path
from tests.engine.helpers import make_tiny_model_dir

transformers = pytest.importorskip("transformers")

GREEDY_64 = SamplingParams(max_tokens=64, temperature=0, ignore_eos=True)

TEXT = (
    "The history of computing is a story of ideas that took decades to meet the machines "
    "able to carry them. Babbage drew the analytical engine in 1837; Lovelace wrote what many "
    "call the first program for it. A century later Turing asked what it means to compute at "
    "all, and during the war engineers built machines of relays and valves to break codes and "
    "to aim guns. Transistors replaced valves, integrated circuits replaced boards of "
    "transistors, and by 1971 a whole processor fit on one chip. "
)


def natural_prompts(
    tokenizer_encode: Callable[[str], list[int]], lengths: list[int]
) -> list[list[int]]:
    ids = tokenizer_encode(TEXT * 8)
    rng = random.Random(0)
    out = []
    for n in lengths:
        start = rng.randrange(0, len(ids) - n)
        out.append(ids[start : start + n])
    return out


def hf_greedy(model: torch.nn.Module, prompts: list[list[int]], max_new: int) -> list[list[int]]:
    """Plain greedy decoding with transformers' forward and its KV cache, EOS included."""
    outs = []
    with torch.no_grad():
        for ids in prompts:
            out = model(torch.tensor([ids]), use_cache=True)
            tokens = [int(out.logits[0, -1].argmax())]
            for _ in range(max_new - 1):
                out = model(
                    torch.tensor([[tokens[-1]]]),
                    past_key_values=out.past_key_values,
                    use_cache=True,
                )
                tokens.append(int(out.logits[0, -1].argmax()))
            outs.append(tokens)
    return outs


@pytest.mark.slow
def test_smollm2_gguf_batch_of_16_equals_transformers(smollm: LLM) -> None:
    path = Path(default_model_path())
    lengths = [10, 17, 33, 48, 64, 90, 128, 150, 200, 256, 300, 333, 400, 450, 480, 500]
    prompts = natural_prompts(
        lambda t: smollm.tokenizer.encode(t, add_special_tokens=False), lengths
    )
    ours = smollm.generate(prompt_token_ids=prompts, params=GREEDY_64)
    ref_model = transformers.AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32
    ).eval()
    ref = hf_greedy(ref_model, prompts, 64)
    for i, (o, r) in enumerate(zip(ours, ref, strict=True)):
        assert o.token_ids == r, f"prompt {i} ({lengths[i]} tokens) diverged"


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])
def test_tiny_random_models_equal_transformers(
    arch: str, tmp_path_factory: pytest.TempPathFactory, make_llm: Callable[..., LLM]
) -> None:
    path = make_tiny_model_dir(tmp_path_factory.mktemp(arch), arch)
    llm = make_llm(str(path))
    rng = random.Random(1)
    vocab = llm.engine.model_config.vocab_size
    prompts = [[rng.randrange(vocab) for _ in range(n)] for n in (3, 15, 16, 17, 40, 77)]
    params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    ours = llm.generate(prompt_token_ids=prompts, params=params)
    ref_model = transformers.AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    ref = hf_greedy(ref_model.eval(), prompts, 24)
    assert [o.token_ids for o in ours] == ref
    # Alone, a request decodes through the small-batch paths (native GEMV on CPU).
    [alone] = llm.generate(prompt_token_ids=[prompts[4]], params=params)
    assert alone.token_ids == ref[4]


def _prompts(llm: LLM, lengths: list[int]) -> list[list[int]]:
    return natural_prompts(lambda t: llm.tokenizer.encode(t, add_special_tokens=False), lengths)


def test_prefix_cache_hit_equals_miss(make_llm: Callable[..., LLM]) -> None:
    cached = make_llm(None)
    uncached = make_llm(None, enable_prefix_caching=False)
    shared = _prompts(cached, [100])[0]
    prompts = [shared + [42, 7, 99], shared + [5], shared[:64] + [8, 9, 10]]
    params = SamplingParams(max_tokens=16, temperature=0)
    cached.engine.block_manager.reset_prefix_cache()  # other tests share this engine
    cached.generate(prompt_token_ids=[shared], params=params)  # warm the cache
    hit = cached.generate(prompt_token_ids=prompts, params=params)
    miss = uncached.generate(prompt_token_ids=prompts, params=params)
    assert [o.num_cached_tokens for o in hit] == [96, 96, 64]
    assert [o.num_cached_tokens for o in miss] == [0, 0, 0]
    assert [o.token_ids for o in hit] == [o.token_ids for o in miss]


def test_chunked_prefill_equals_whole(make_llm: Callable[..., LLM]) -> None:
    whole = make_llm(None, enable_prefix_caching=False)
    chunked = make_llm(None, enable_prefix_caching=False, max_num_batched_tokens=48)
    prompts = _prompts(whole, [300, 130, 20])
    params = SamplingParams(max_tokens=16, temperature=0)
    a = whole.generate(prompt_token_ids=prompts, params=params)
    b = chunked.generate(prompt_token_ids=prompts, params=params)
    assert [o.token_ids for o in a] == [o.token_ids for o in b]


def test_forced_preemption_equals_none(make_llm: Callable[..., LLM]) -> None:
    roomy = make_llm(None, enable_prefix_caching=False)
    tight = make_llm(None, enable_prefix_caching=False, num_kv_blocks=12)
    prompts = _prompts(roomy, [60, 70, 80, 50])
    params = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)
    a = roomy.generate(prompt_token_ids=prompts, params=params)
    before = tight.engine.stats().num_preemptions
    b = tight.generate(prompt_token_ids=prompts, params=params)
    assert tight.engine.stats().num_preemptions > before
    assert [o.token_ids for o in a] == [o.token_ids for o in b]
