"""Model loading: a Hugging Face directory or a GGUF file becomes a `LoadedModel`.

Every loader hands back weights under Hugging Face Llama names, in HF orientation ([out, in]),
so the model code never needs to know where they came from:

    model.embed_tokens.weight                          [V, D]
    model.layers.{i}.input_layernorm.weight            [D]
    model.layers.{i}.post_attention_layernorm.weight   [D]
    model.layers.{i}.self_attn.{q,k,v,o}_proj.weight   [out, in]
    model.layers.{i}.self_attn.{q,k,v}_proj.bias       (only when attention_bias)
    model.layers.{i}.mlp.{gate,up,down}_proj.weight    [out, in]
    model.norm.weight                                  [D]
    lm_head.weight                                     [V, D] (absent when tied)
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from engine.config import SUPPORTED_ARCHITECTURES, ModelConfig
from engine.tokenizer import Tokenizer

__all__ = [
    "LoadedModel",
    "load_model",
    "expected_shapes",
    "check_weights",
    "unsupported_architecture",
]


@dataclass
class LoadedModel:
    config: ModelConfig
    weights: dict[str, torch.Tensor]
    tokenizer: Tokenizer
    source: str


def load_model(path: str | None, dtype: torch.dtype = torch.float32) -> LoadedModel:
    """Load `path` (a model directory or a .gguf file); None loads the default model."""
    # Imported here: hf.py and gguf.py import this package for LoadedModel and check_weights.
    from engine.loader.default import default_model_path
    from engine.loader.gguf import load_gguf
    from engine.loader.hf import load_hf_dir

    if path is None:
        path = default_model_path()
    path = os.fspath(path)
    if not os.path.exists(path):
        raise ValueError(f"model: path {path!r} does not exist")
    if os.path.isdir(path):
        return load_hf_dir(path, dtype)
    if path.lower().endswith(".gguf"):
        return load_gguf(path, dtype)
    raise ValueError(f"model: {path!r} is neither a model directory nor a .gguf file")


def unsupported_architecture(name: str) -> ValueError:
    supported = ", ".join(SUPPORTED_ARCHITECTURES)
    return ValueError(f"model: unsupported architecture {name!r} (supported: {supported})")


def expected_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor a model with this config needs, with its shape."""
    d, v, ffn = config.hidden_size, config.vocab_size, config.intermediate_size
    q_out = config.num_heads * config.head_dim
    kv_out = config.num_kv_heads * config.head_dim
    shapes: dict[str, tuple[int, ...]] = {
        "model.embed_tokens.weight": (v, d),
        "model.norm.weight": (d,),
    }
    if not config.tie_word_embeddings:
        shapes["lm_head.weight"] = (v, d)
    for i in range(config.num_layers):
        p = f"model.layers.{i}."
        shapes[p + "input_layernorm.weight"] = (d,)
        shapes[p + "post_attention_layernorm.weight"] = (d,)
        shapes[p + "self_attn.q_proj.weight"] = (q_out, d)
        shapes[p + "self_attn.k_proj.weight"] = (kv_out, d)
        shapes[p + "self_attn.v_proj.weight"] = (kv_out, d)
        shapes[p + "self_attn.o_proj.weight"] = (d, q_out)
        if config.attention_bias:
            shapes[p + "self_attn.q_proj.bias"] = (q_out,)
            shapes[p + "self_attn.k_proj.bias"] = (kv_out,)
            shapes[p + "self_attn.v_proj.bias"] = (kv_out,)
        shapes[p + "mlp.gate_proj.weight"] = (ffn, d)
        shapes[p + "mlp.up_proj.weight"] = (ffn, d)
        shapes[p + "mlp.down_proj.weight"] = (d, ffn)
    return shapes


def check_weights(config: ModelConfig, weights: Mapping[str, torch.Tensor], source: str) -> None:
    """Raise a ValueError naming the first missing or misshapen tensor."""
    shapes = expected_shapes(config)
    missing = [name for name in shapes if name not in weights]
    if missing:
        more = f" (and {len(missing) - 3} more)" if len(missing) > 3 else ""
        raise ValueError(f"model: {source!r} is missing tensors {', '.join(missing[:3])}{more}")
    for name, shape in shapes.items():
        actual = tuple(weights[name].shape)
        if actual != shape:
            raise ValueError(
                f"model: tensor {name!r} in {source!r} has shape {list(actual)}, "
                f"expected {list(shape)}"
            )
