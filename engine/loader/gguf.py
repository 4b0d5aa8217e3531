"""GGUF files (llama.cpp): metadata becomes a ModelConfig, tensors are dequantized to HF layout."""

from __future__ import annotations

import math
import re
from typing import Any

import numpy as np
import torch
from gguf import GGUFReader, ReaderTensor
from gguf.quants import dequantize

from engine.config import ModelConfig, RopeScaling
from engine.loader import LoadedModel, check_weights, expected_shapes, unsupported_architecture
from engine.tokenizer import Tokenizer

_LAYER = re.compile(r"^blk\.(\d+)\.(\w+)\.(weight|bias)$")
_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
# Arrays only the tokenizer needs; every other array in the metadata is left unread.
_TOKENIZER_ARRAYS = (
    "tokenizer.ggml.tokens",
    "tokenizer.ggml.merges",
    "tokenizer.ggml.token_type",
    "tokenizer.ggml.scores",
)
# Llama 3.x's rope scaling as Meta shipped it; llama.cpp stores only the resulting per-frequency
# factors (rope_freqs.weight), so these are the candidates we check those factors against.
_LLAMA3_ROPE_CANDIDATES = ((1.0, 4.0, 8192),)


def load_gguf(path: str, dtype: torch.dtype = torch.float32) -> LoadedModel:
    reader = _open(path)
    metadata = read_metadata(reader, path)
    tensors = {t.name: t for t in reader.tensors}
    config = config_from_metadata(metadata, tensors, path)
    weights = _read_weights(tensors, config, dtype, path)
    check_weights(config, weights, path)
    tokenizer = Tokenizer.from_gguf_metadata(metadata)
    return LoadedModel(config=config, weights=weights, tokenizer=tokenizer, source=path)


class _PlainArrayReader(GGUFReader):
    """GGUFReader over a plain ndarray view of its memmap.

    The reader slices its buffer once per metadata item (~150k times for a 49k-token vocab), and
    np.memmap's per-slice bookkeeping makes that three times slower than on a plain view.
    """

    @property  # type: ignore[override]  # a plain view of the memmap the base class declares
    def data(self) -> np.ndarray:
        return self._plain

    @data.setter
    def data(self, value: np.ndarray) -> None:
        self._plain = value.view(np.ndarray) if isinstance(value, np.memmap) else value


def load_gguf_tokenizer(path: str) -> Tokenizer:
    """Only the tokenizer of a GGUF file (no tensor is dequantized)."""
    return Tokenizer.from_gguf_metadata(read_metadata(_open(path), path))


def _open(path: str) -> GGUFReader:
    try:
        reader = _PlainArrayReader(path)
        for tensor in reader.tensors:
            if tensor.data.nbytes != tensor.n_bytes:
                raise ValueError(f"tensor {tensor.name!r} is cut short")
    # A damaged file fails anywhere in numpy's parsing (ValueError, IndexError, ...): name the file.
    except Exception as err:
        raise ValueError(f"model: cannot read {path!r}: {err}") from err
    return reader


def read_metadata(reader: GGUFReader, path: str) -> dict[str, Any]:
    """The metadata as plain Python values (big arrays other than the tokenizer's are skipped)."""
    metadata: dict[str, Any] = {}
    try:
        for key, field in reader.fields.items():
            if len(field.data) > 1024 and key not in _TOKENIZER_ARRAYS:
                continue
            metadata[key] = field.contents()
    except Exception as err:
        raise ValueError(f"model: cannot read {path!r}: bad metadata: {err}") from err
    return metadata


def config_from_metadata(
    meta: dict[str, Any], tensors: dict[str, ReaderTensor], path: str
) -> ModelConfig:
    gguf_arch = str(meta.get("general.architecture"))
    if gguf_arch not in ("llama", "qwen2"):
        raise unsupported_architecture(gguf_arch)
    # llama.cpp converts Mistral models to the llama architecture; only the name tells them apart.
    arch = (
        "mistral"
        if gguf_arch == "llama" and "mistral" in str(meta.get("general.name", "")).lower()
        else gguf_arch
    )

    def get(key: str, default: Any = None) -> Any:
        value = meta.get(f"{gguf_arch}.{key}", default)
        if value is None:
            raise ValueError(f"model: {path!r} metadata is missing {gguf_arch}.{key}")
        return value

    hidden, heads = int(get("embedding_length")), int(get("attention.head_count"))
    head_dim = int(meta.get(f"{gguf_arch}.attention.key_length") or hidden // heads)
    theta = _f32(get("rope.freq_base", 10000.0))
    if "token_embd.weight" not in tensors:
        raise ValueError(f"model: {path!r} is missing tensors token_embd.weight")
    scaling_type = meta.get(f"{gguf_arch}.rope.scaling.type", "none")
    if scaling_type not in ("none", "llama3"):
        raise ValueError(
            f"model: unsupported rope_scaling type {scaling_type!r} (supported: llama3)"
        )
    if "blk.0.attn_output.bias" in tensors:
        raise ValueError(f"model: {path!r} has an attn_output bias, which is not supported")
    rope_freqs = tensors.get("rope_freqs.weight")
    return ModelConfig(
        architecture=arch,
        # The embedding's row count, not the tokenizer's: some files pad the vocab.
        vocab_size=int(tensors["token_embd.weight"].shape[1]),
        hidden_size=hidden,
        intermediate_size=int(get("feed_forward_length")),
        num_layers=int(get("block_count")),
        num_heads=heads,
        num_kv_heads=int(meta.get(f"{gguf_arch}.attention.head_count_kv") or heads),
        head_dim=head_dim,
        max_position_embeddings=int(get("context_length")),
        rms_norm_eps=_f32(get("attention.layer_norm_rms_epsilon")),
        rope_theta=theta,
        rope_scaling=None
        if rope_freqs is None
        else _llama3_scaling(rope_freqs, head_dim, theta, path),
        attention_bias="blk.0.attn_q.bias" in tensors,
        tie_word_embeddings="output.weight" not in tensors,
    )


def _f32(value: Any) -> float:
    # GGUF stores float32: 1e-5 reads back as 9.99999974e-06; use the shortest decimal instead.
    return float(str(np.float32(value)))


def _llama3_scaling(
    tensor: ReaderTensor, head_dim: int, theta: float, path: str
) -> RopeScaling | None:
    """Recover Llama 3's rope scaling from llama.cpp's per-frequency divisors."""
    factors = torch.from_numpy(
        np.array(dequantize(tensor.data, tensor.tensor_type), dtype=np.float64)
    )
    factor = float(factors.max())
    if math.isclose(factor, 1.0):
        return None
    for low, high, original in _LLAMA3_ROPE_CANDIDATES:
        candidate = RopeScaling(factor, low, high, original)
        if torch.allclose(factors, _llama3_divisors(candidate, head_dim, theta), rtol=1e-4):
            return candidate
    raise ValueError(
        f"model: {path!r} has rope_freqs that are not Llama 3 rope scaling (unsupported)"
    )


def _llama3_divisors(s: RopeScaling, head_dim: int, theta: float) -> torch.Tensor:
    # The same formula llama.cpp's converter used to write rope_freqs.weight.
    freqs = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    wavelen = 2 * math.pi / freqs
    smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) / (
        s.high_freq_factor - s.low_freq_factor
    )
    mid = 1.0 / ((1 - smooth) / s.factor + smooth)
    high_wavelen = s.original_max_position_embeddings / s.high_freq_factor
    low_wavelen = s.original_max_position_embeddings / s.low_freq_factor
    return torch.where(
        wavelen < high_wavelen, 1.0, torch.where(wavelen > low_wavelen, s.factor, mid)
    )


def hf_name(gguf_name: str) -> str | None:
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    match = _LAYER.match(gguf_name)
    if match is None or match.group(2) not in _LAYER_NAMES:
        return None
    layer, part, kind = match.groups()
    return f"model.layers.{layer}.{_LAYER_NAMES[part]}.{kind}"


def _read_weights(
    tensors: dict[str, ReaderTensor], config: ModelConfig, dtype: torch.dtype, path: str
) -> dict[str, torch.Tensor]:
    wanted = set(expected_shapes(config))
    weights: dict[str, torch.Tensor] = {}
    for gguf_name, tensor in tensors.items():
        name = hf_name(gguf_name)
        if name is None or name not in wanted:
            continue
        try:
            array = dequantize(
                tensor.data, tensor.tensor_type
            )  # one tensor at a time keeps peak memory low
        except NotImplementedError as err:
            raise ValueError(
                f"model: tensor {gguf_name!r} in {path!r} has unsupported type "
                f"{tensor.tensor_type.name}"
            ) from err
        weight = torch.from_numpy(np.array(array, dtype=np.float32, copy=not array.flags.writeable))
        if config.architecture != "qwen2":
            weight = _undo_rope_permutation(weight, gguf_name, config)
        weights[name] = weight.to(dtype)
    return weights


def _undo_rope_permutation(
    weight: torch.Tensor, gguf_name: str, config: ModelConfig
) -> torch.Tensor:
    """Undo llama.cpp's Q/K row interleaving (its converter permutes them for its rope kernel).

    llama.cpp's converter does `w.reshape(n_head, 2, rows // n_head // 2, ...).swapaxes(1, 2)`
    for llama-architecture models; qwen2 is converted without it.
    """
    if ".attn_q." in gguf_name:
        heads = config.num_heads
    elif ".attn_k." in gguf_name:
        heads = config.num_kv_heads
    else:
        return weight
    rows = weight.shape[0]
    # weight: [heads * head_dim, ...] -> [heads, head_dim / 2, 2, ...] -> swap the last two row axes
    return (
        weight.reshape(heads, rows // heads // 2, 2, *weight.shape[1:])
        .transpose(1, 2)
        .reshape(weight.shape)
        .contiguous()
    )
