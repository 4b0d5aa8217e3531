"""The fused CPU path (native residual-add + RMSNorm, rotary, SiLU x mul; the default,
off with BATON_FUSED_OPS=0) against the plain torch path and transformers: the same greedy
token ids, alone and in mixed batches, through prefill, chunked prefill and decode; and
BATON_FUSED_OPS=0 falls back to the torch path."""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pytest
import torch

from engine import LLM, SamplingParams, native
from tests.engine.helpers import llama_model, make_tiny_model_dir, skip_without_native_kernels
from tests.engine.test_parity import hf_greedy, natural_prompts

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module", autouse=True)
def _kernel() -> None:
    skip_without_native_kernels()


@contextmanager
def _path(llm: LLM, fused: bool) -> Iterator[None]:
    """Run ``llm``'s model on the fused or the torch path for the block."""
    model = llama_model(llm)
    start = model.fused
    model.fused = native.load() if fused else None
    try:
        yield
    finally:
        model.fused = start


def _both(llm: LLM, prompts: list[list[int]], params: SamplingParams) -> tuple[list, list]:
    out = []
    for fused in (True, False):
        with _path(llm, fused):
            out.append([o.token_ids for o in llm.generate(prompt_token_ids=prompts,
                                                          params=params)])
    return out[0], out[1]


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_tiny_fused_equals_eager_and_transformers(
    arch: str, tmp_path_factory: pytest.TempPathFactory, make_llm: Callable[..., LLM]
) -> None:
    # 48 tokens per step: the 77-token prompt is prefilled in chunks beside decodes.
    path = make_tiny_model_dir(tmp_path_factory.mktemp(arch), arch)
    llm = make_llm(str(path), max_num_batched_tokens=48)
    rng = random.Random(2)
    vocab = llm.engine.model_config.vocab_size
    prompts = [[rng.randrange(vocab) for _ in range(n)] for n in (2, 16, 33, 77)]
    params = SamplingParams(max_tokens=20, temperature=0, ignore_eos=True)
    fused, eager = _both(llm, prompts, params)
    ref_model = transformers.AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    ref = hf_greedy(ref_model.eval(), prompts, 20)
    assert fused == eager == ref
    alone, alone_eager = _both(llm, prompts[2:3], params)  # batch 1: prefill, then decode
    assert alone == alone_eager == ref[2:3]


def test_smollm2_fused_equals_eager(smollm: LLM) -> None:
    prompts = natural_prompts(
        lambda t: smollm.tokenizer.encode(t, add_special_tokens=False), [12, 40, 150, 260]
    )
    params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    blocks = smollm.engine.block_manager
    try:
        blocks.reset_prefix_cache()
        fused, eager = _both(smollm, prompts, params)  # a mixed batch
        assert fused == eager
        alone, alone_eager = _both(smollm, prompts[1:2], params)  # batch 1
        assert alone == alone_eager == fused[1:2]
    finally:
        # Leave no cached prefix of these prompts to the parity tests sharing this engine:
        # a hit computes attention another way than transformers does.
        blocks.reset_prefix_cache()


def test_fused_ops_switch(
    monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory
) -> None:
    path = make_tiny_model_dir(tmp_path_factory.mktemp("llama-switch"), "llama")
    prompts = [[5, 6, 7], list(range(10, 40))]
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    ref_model = transformers.AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    ref = hf_greedy(ref_model.eval(), prompts, 8)
    for value, fused in ((None, True), ("0", False)):
        if value is None:
            monkeypatch.delenv("BATON_FUSED_OPS", raising=False)  # the default: on
        else:
            monkeypatch.setenv("BATON_FUSED_OPS", value)
        llm = LLM(str(path), num_kv_blocks=64)
        model = llama_model(llm)
        assert (model.fused is not None) is fused
        # The native GEMV is in use either way: the switch is about the fused kernels.
        assert model.lm_head.kernel is not None
        assert (llm.engine.runner.backend.native_min_batch == 1) is fused  # type: ignore[attr-defined]
        got = [o.token_ids for o in llm.generate(prompt_token_ids=prompts, params=params)]
        assert got == ref, f"BATON_FUSED_OPS={value}"
        del llm


def test_fused_path_rejects_positions_past_the_rope_tables(smollm: LLM) -> None:
    model = llama_model(smollm)
    limit = model.rope.cos.shape[0]
    with pytest.raises(ValueError, match="max_position_embeddings"):
        model.forward_fused(
            torch.zeros(1, model.config.hidden_size),
            torch.tensor([limit]),
            smollm.engine.runner.backend,
            None,  # type: ignore[arg-type]  # the check comes first
            smollm.engine.runner.caches,
            native.load(),  # type: ignore[arg-type]
        )
