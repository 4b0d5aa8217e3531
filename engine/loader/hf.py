"""Hugging Face model directories: config.json plus one or sharded *.safetensors files."""

from __future__ import annotations

import json
import os
from typing import Any

import torch
from safetensors import safe_open

from engine.config import ModelConfig, RopeScaling
from engine.loader import LoadedModel, check_weights, expected_shapes, unsupported_architecture
from engine.tokenizer import Tokenizer

_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
}
_MODEL_TYPES = {"llama": "llama", "mistral": "mistral", "qwen2": "qwen2"}


def load_hf_dir(path: str, dtype: torch.dtype = torch.float32) -> LoadedModel:
    config = config_from_dict(_read_json(path, "config.json"))
    names = set(expected_shapes(config))
    weights = {name: tensor.to(dtype) for name, tensor in _read_safetensors(path, names).items()}
    check_weights(config, weights, path)
    return LoadedModel(
        config=config, weights=weights, tokenizer=Tokenizer.from_hf_dir(path), source=path
    )


def config_from_dict(raw: dict[str, Any]) -> ModelConfig:
    """ModelConfig from a config.json dict (transformers 4 or 5 layout)."""
    arch = _architecture(raw)
    if raw.get("mlp_bias"):
        raise ValueError("model: mlp_bias=true is not supported")
    if arch != "qwen2" and raw.get("attention_bias"):
        # transformers' Llama puts attention_bias on o_proj too, which ModelConfig cannot express
        raise ValueError(
            f"model: attention_bias=true is not supported for {arch} (o_proj has a bias)"
        )
    hidden = _required(raw, "hidden_size")
    heads = _required(raw, "num_attention_heads")
    rope_theta, rope_scaling = _rope(raw)
    max_positions = int(raw.get("max_position_embeddings", 2048))
    window = raw.get("sliding_window")
    if window and (arch == "mistral" or raw.get("use_sliding_window")):
        # No sliding-window attention here: the model is only exact up to the window.
        max_positions = min(max_positions, int(window))
    return ModelConfig(
        architecture=arch,
        vocab_size=_required(raw, "vocab_size"),
        hidden_size=hidden,
        intermediate_size=_required(raw, "intermediate_size"),
        num_layers=_required(raw, "num_hidden_layers"),
        num_heads=heads,
        num_kv_heads=int(raw.get("num_key_value_heads") or heads),
        head_dim=int(raw.get("head_dim") or hidden // heads),
        max_position_embeddings=max_positions,
        rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
        rope_theta=rope_theta,
        rope_scaling=rope_scaling,
        attention_bias=arch == "qwen2",  # Qwen2 always has q/k/v biases (and none on o_proj)
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
        hidden_act=str(raw.get("hidden_act", "silu")),
    )


def rope_scaling_from_dict(scaling: dict[str, Any] | None) -> RopeScaling | None:
    if not scaling:
        return None
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type == "default":
        return None
    if rope_type != "llama3":
        raise ValueError(f"model: unsupported rope_scaling type {rope_type!r} (supported: llama3)")
    try:
        return RopeScaling(
            factor=float(scaling["factor"]),
            low_freq_factor=float(scaling["low_freq_factor"]),
            high_freq_factor=float(scaling["high_freq_factor"]),
            original_max_position_embeddings=int(scaling["original_max_position_embeddings"]),
        )
    except KeyError as err:
        raise ValueError(f"model: rope_scaling is missing {err.args[0]!r}") from None


def _rope(raw: dict[str, Any]) -> tuple[float, RopeScaling | None]:
    # transformers 5 writes rope_theta and the scaling together under rope_parameters.
    params = raw.get("rope_parameters")
    if isinstance(params, dict):
        theta = params.get("rope_theta", raw.get("rope_theta", 10000.0))
        return float(theta), rope_scaling_from_dict(params)
    return float(raw.get("rope_theta", 10000.0)), rope_scaling_from_dict(raw.get("rope_scaling"))


def _architecture(raw: dict[str, Any]) -> str:
    names = raw.get("architectures") or []
    if names:
        if names[0] not in _ARCHITECTURES:
            raise unsupported_architecture(str(names[0]))
        return _ARCHITECTURES[names[0]]
    model_type = raw.get("model_type")
    if model_type not in _MODEL_TYPES:
        raise unsupported_architecture(str(model_type))
    return _MODEL_TYPES[model_type]


def _required(raw: dict[str, Any], key: str) -> int:
    if key not in raw:
        raise ValueError(f"model: config.json is missing {key!r}")
    return int(raw[key])


def _read_json(path: str, name: str) -> dict[str, Any]:
    file = os.path.join(path, name)
    if not os.path.isfile(file):
        raise ValueError(f"model: directory {path!r} has no {name}")
    try:
        with open(file, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError) as err:
        raise ValueError(f"model: cannot read {file!r}: {err}") from err
    if not isinstance(data, dict):
        raise ValueError(f"model: cannot read {file!r}: not a JSON object")
    return data


def _safetensors_files(path: str) -> list[str]:
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        weight_map = _read_json(path, "model.safetensors.index.json").get("weight_map", {})
        files = [os.path.join(path, name) for name in sorted(set(weight_map.values()))]
        for file in files:
            if not os.path.isfile(file):
                raise ValueError(f"model: shard {file!r} listed in {index!r} does not exist")
        return files
    files = sorted(os.path.join(path, n) for n in os.listdir(path) if n.endswith(".safetensors"))
    if not files:
        raise ValueError(f"model: directory {path!r} has no *.safetensors weights")
    return files


def _read_safetensors(path: str, names: set[str]) -> dict[str, torch.Tensor]:
    """The tensors in `names` from every shard; anything else (e.g. rotary inv_freq) is skipped."""
    weights: dict[str, torch.Tensor] = {}
    for file in _safetensors_files(path):
        try:
            with safe_open(file, framework="pt") as f:
                for key in f.keys():  # noqa: SIM118  (safe_open has no __iter__)
                    if key in names:
                        weights[key] = f.get_tensor(key)
        except Exception as err:  # safetensors raises its own SafetensorError, and OSError
            raise ValueError(f"model: cannot read {file!r}: {err}") from err
    return weights
