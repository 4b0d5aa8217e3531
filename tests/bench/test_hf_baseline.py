"""transformers baselines on a tiny random Llama: exact token counts, eos ignored."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from bench import hf_baseline

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Any:
    config = transformers.LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    torch.manual_seed(0)
    path: Path = tmp_path_factory.mktemp("tiny-llama")
    transformers.LlamaForCausalLM(config).save_pretrained(path)
    return hf_baseline.load_model(str(path))


def test_one_at_a_time_makes_exactly_output_len_tokens(tiny_model: Any) -> None:
    r = hf_baseline.generate_one_at_a_time(tiny_model, [[5, 6, 7], [8, 9]], output_len=6)
    assert (r.num_prompts, r.output_tokens) == (2, 12)
    assert r.tokens_per_s > 0


def test_padded_batches_make_exactly_output_len_tokens(tiny_model: Any) -> None:
    prompts = [[5, 6, 7, 8, 9], [10, 11], [12, 13, 14]]
    r = hf_baseline.generate_padded(tiny_model, prompts, output_len=5, batch_size=2)
    assert (r.num_prompts, r.output_tokens) == (3, 15)


def test_decode_step_time(tiny_model: Any) -> None:
    assert hf_baseline.decode_step_seconds(tiny_model, [5, 6, 7], steps=3) > 0
