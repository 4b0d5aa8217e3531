"""The shape of a decoder-only model: all the planner needs to know about it.

Sizes drive memory (weights, KV bytes per token) and the analytic latency model (FLOPs and
bytes per token). A spec comes from a preset, or from a Hugging Face ``config.json``
(Llama, Mistral, Qwen2, OPT and friends name the same quantities differently).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from cluster.planner._validate import from_fields, positive_int, require

_DTYPE_BYTES = {"float16": 2, "bfloat16": 2, "float32": 4, "float8": 1, "int8": 1}


@dataclass(frozen=True)
class ModelSpec:
    """Layer counts and widths; ``gated_mlp``: Llama's SwiGLU has 3 matrices, OPT's MLP 2."""

    name: str
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    bytes_per_param: int = 2  # weights and KV cache alike (fp16/bf16)
    gated_mlp: bool = True
    tie_word_embeddings: bool = False

    def __post_init__(self) -> None:
        for name in (
            "num_layers",
            "hidden_size",
            "num_heads",
            "num_kv_heads",
            "head_dim",
            "intermediate_size",
            "vocab_size",
            "bytes_per_param",
        ):
            positive_int(getattr(self, name), name)
        require(
            self.num_heads % self.num_kv_heads == 0,
            "num_kv_heads",
            f"must divide num_heads ({self.num_heads}), got {self.num_kv_heads}",
        )

    @property
    def params_per_layer(self) -> int:
        q_o = 2 * self.hidden_size * self.num_heads * self.head_dim
        k_v = 2 * self.hidden_size * self.num_kv_heads * self.head_dim
        mlp = (3 if self.gated_mlp else 2) * self.hidden_size * self.intermediate_size
        return q_o + k_v + mlp

    @property
    def num_params(self) -> int:
        embeddings = self.vocab_size * self.hidden_size
        lm_head = 0 if self.tie_word_embeddings else embeddings
        return self.num_layers * self.params_per_layer + embeddings + lm_head

    @property
    def weight_bytes(self) -> int:
        return self.num_params * self.bytes_per_param

    @property
    def kv_bytes_per_token(self) -> int:
        """K and V of one token over all layers (the whole model, all TP/PP shards)."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * self.bytes_per_param

    @property
    def flops_per_token(self) -> int:
        """Matmul FLOPs of one token through every layer and the LM head (2 per MAC)."""
        return 2 * (self.num_layers * self.params_per_layer + self.vocab_size * self.hidden_size)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelSpec:
        return from_fields(cls, data, "model")


PRESETS: dict[str, ModelSpec] = {
    "llama-13b": ModelSpec(
        "llama-13b",
        num_layers=40,
        hidden_size=5120,
        num_heads=40,
        num_kv_heads=40,
        head_dim=128,
        intermediate_size=13824,
        vocab_size=32000,
    ),
    "opt-13b": ModelSpec(
        "opt-13b",
        num_layers=40,
        hidden_size=5120,
        num_heads=40,
        num_kv_heads=40,
        head_dim=128,
        intermediate_size=20480,
        vocab_size=50272,
        gated_mlp=False,
        tie_word_embeddings=True,
    ),
    "opt-66b": ModelSpec(
        "opt-66b",
        num_layers=64,
        hidden_size=9216,
        num_heads=72,
        num_kv_heads=72,
        head_dim=128,
        intermediate_size=36864,
        vocab_size=50272,
        gated_mlp=False,
        tie_word_embeddings=True,
    ),
    "llama-65b": ModelSpec(
        "llama-65b",
        num_layers=80,
        hidden_size=8192,
        num_heads=64,
        num_kv_heads=64,
        head_dim=128,
        intermediate_size=22016,
        vocab_size=32000,
    ),
    "smollm2-135m": ModelSpec(
        "smollm2-135m",
        num_layers=30,
        hidden_size=576,
        num_heads=9,
        num_kv_heads=3,
        head_dim=64,
        intermediate_size=1536,
        vocab_size=49152,
        tie_word_embeddings=True,
    ),
}


def _field(config: dict[str, Any], *keys: str) -> Any:
    for key in keys:
        if key in config:
            return config[key]
    raise ValueError(f"config.{keys[0]}: missing (also tried {', '.join(keys[1:]) or 'nothing'})")


def from_hf_config(config: dict[str, Any], name: str = "") -> ModelSpec:
    """A spec from a Hugging Face ``config.json`` dict (Llama-style or OPT-style keys)."""
    require(isinstance(config, dict), "config", "must be a JSON object")
    model_type = str(config.get("model_type", ""))
    hidden = int(_field(config, "hidden_size", "n_embd", "d_model"))
    heads = int(_field(config, "num_attention_heads", "n_head"))
    dtype = str(config.get("torch_dtype") or config.get("dtype") or "float16")
    require(
        dtype in _DTYPE_BYTES,
        "config.torch_dtype",
        f"must be one of {', '.join(_DTYPE_BYTES)}, got {dtype!r}",
    )
    return ModelSpec(
        name=name or str(config.get("_name_or_path") or model_type or "model"),
        num_layers=int(_field(config, "num_hidden_layers", "n_layer")),
        hidden_size=hidden,
        num_heads=heads,
        num_kv_heads=int(config.get("num_key_value_heads") or heads),
        head_dim=int(config.get("head_dim") or hidden // heads),
        intermediate_size=int(_field(config, "intermediate_size", "ffn_dim", "n_inner")),
        vocab_size=int(_field(config, "vocab_size")),
        bytes_per_param=_DTYPE_BYTES[dtype],
        gated_mlp=model_type not in ("opt", "gpt2", "gpt_neox", "falcon"),
        tie_word_embeddings=bool(config.get("tie_word_embeddings", model_type == "opt")),
    )


def load_model(name_or_path: str) -> ModelSpec:
    """A preset by name, or a ``config.json`` path, or a directory holding one."""
    if name_or_path.lower() in PRESETS:
        return PRESETS[name_or_path.lower()]
    path = Path(name_or_path)
    if path.is_dir():
        path = path / "config.json"
    require(
        path.is_file(),
        "model",
        f"must be a preset ({', '.join(PRESETS)}) or a config.json path, got {name_or_path!r}",
    )
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"model: {path} is not valid JSON ({exc})") from exc
    return from_hf_config(config, name=path.parent.name or path.stem)


GPU_MEMORY_UTILIZATION = 0.9  # share of HBM the engine may take, as vLLM's default
ACTIVATION_RESERVE_GB = 1.0  # per GPU: activations, CUDA graphs, allocator slack


def kv_capacity_tokens(model: ModelSpec, memory_gb: float, tp: int, pp: int) -> int:
    """Tokens of KV cache an instance of ``tp * pp`` GPUs holds after its weights.

    Weights split evenly over all ``tp * pp`` GPUs and KV bytes over the same GPUs, so the
    instance's totals are what count. Zero or less: the layout does not fit.
    """
    gpus = tp * pp
    usable = gpus * (memory_gb * GPU_MEMORY_UTILIZATION - ACTIVATION_RESERVE_GB) * 1e9
    return max(0, int((usable - model.weight_bytes) // model.kv_bytes_per_token))
