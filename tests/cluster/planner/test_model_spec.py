from __future__ import annotations

import json
from pathlib import Path

import pytest

from cluster.planner.model_spec import (
    PRESETS,
    from_hf_config,
    kv_capacity_tokens,
    load_model,
)

SMOLLM2_CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 576,
    "intermediate_size": 1536,
    "num_attention_heads": 9,
    "num_hidden_layers": 30,
    "num_key_value_heads": 3,
    "vocab_size": 49152,
    "tie_word_embeddings": True,
    "torch_dtype": "bfloat16",
}


def test_llama_13b_sizes() -> None:
    m = PRESETS["llama-13b"]
    assert m.num_params == 13_015_449_600
    assert m.kv_bytes_per_token == 2 * 40 * 40 * 128 * 2
    assert m.weight_bytes == 2 * m.num_params


def test_opt_66b_has_an_ungated_mlp() -> None:
    m = PRESETS["opt-66b"]
    assert m.params_per_layer == 4 * 9216 * 9216 + 2 * 9216 * 36864
    assert round(m.num_params / 1e9, 1) == 65.7


def test_smollm2_from_its_hf_config_matches_the_preset() -> None:
    spec = from_hf_config(SMOLLM2_CONFIG, name="smollm2-135m")
    assert spec == PRESETS["smollm2-135m"]
    assert spec.num_params == 134_479_872


def test_opt_style_config_keys() -> None:
    config = {
        "model_type": "opt",
        "hidden_size": 5120,
        "ffn_dim": 20480,
        "num_attention_heads": 40,
        "num_hidden_layers": 40,
        "vocab_size": 50272,
        "torch_dtype": "float16",
    }
    spec = from_hf_config(config, name="opt-13b")
    assert spec == PRESETS["opt-13b"]


def test_missing_config_field_is_named() -> None:
    config = dict(SMOLLM2_CONFIG)
    del config["num_hidden_layers"]
    with pytest.raises(ValueError, match="^config.num_hidden_layers: missing"):
        from_hf_config(config)


def test_unknown_dtype_is_named() -> None:
    with pytest.raises(ValueError, match="^config.torch_dtype: "):
        from_hf_config({**SMOLLM2_CONFIG, "torch_dtype": "int3"})


def test_load_model_from_a_preset_a_file_and_a_directory(tmp_path: Path) -> None:
    assert load_model("LLAMA-13B") is PRESETS["llama-13b"]
    model_dir = tmp_path / "SmolLM2"
    model_dir.mkdir()
    (model_dir / "config.json").write_text(json.dumps(SMOLLM2_CONFIG))
    by_dir = load_model(str(model_dir))
    by_file = load_model(str(model_dir / "config.json"))
    assert by_dir == by_file
    assert by_dir.name == "SmolLM2"
    assert by_dir.num_kv_heads == 3


def test_load_model_rejects_an_unknown_name(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="^model: must be a preset"):
        load_model(str(tmp_path / "nothing-here"))


def test_kv_capacity_counts_weights_once_over_all_gpus() -> None:
    m = PRESETS["llama-13b"]
    usable = 2 * (80.0 * 0.9 - 1.0) * 1e9
    expected = int((usable - m.weight_bytes) // m.kv_bytes_per_token)
    assert kv_capacity_tokens(m, 80.0, tp=2, pp=1) == expected
    assert kv_capacity_tokens(m, 80.0, tp=1, pp=2) == expected
    assert kv_capacity_tokens(PRESETS["opt-66b"], 80.0, tp=1, pp=1) == 0
