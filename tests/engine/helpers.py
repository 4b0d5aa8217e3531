"""Test helpers for the engine tests (transformers is a dev-only dependency, used here only)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from engine.models import LlamaForCausalLM

CHATML_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a tiny test model.<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # ids 0, 1, 2
_CORPUS = [
    "The quick brown fox jumps over the lazy dog. 0123456789",
    "Hello, world! def main():\n    return 42\n",
    "Streaming text: über café naïve résumé, 日本語のテキスト, emoji 😀🎉 and more.",
    "Once upon a time there was a small language model that served tokens in batches.",
    "Paged attention keeps the key value cache in fixed size blocks.",
]
_ARCH_CLASSES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM"),
    "mistral": ("MistralConfig", "MistralForCausalLM"),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
}


def make_tiny_tokenizer(vocab_size: int = 512) -> Any:
    """A byte-level BPE trained on a fixed corpus (deterministic), ChatML specials at ids 0..2."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_CORPUS * 4, trainer=trainer)
    return tokenizer


def make_tiny_model_dir(path: str | Path, arch: str, **overrides: Any) -> Path:
    """Save a tiny random-weight HF model (safetensors) plus a ChatML tokenizer into `path`.

    arch: "llama" | "mistral" | "qwen2". Defaults: hidden 64, 2 layers, 4 heads, 2 kv heads (GQA),
    the tiny tokenizer's vocabulary. `overrides` go to the transformers config, except:
    seed (int, default 0), max_shard_size (e.g. "20KB" to force a sharded checkpoint).
    """
    import torch
    import transformers

    path = Path(path)
    seed = overrides.pop("seed", 0)
    max_shard_size = overrides.pop("max_shard_size", None)
    tokenizer = make_tiny_tokenizer()
    config_name, model_name = _ARCH_CLASSES[arch]
    kwargs: dict[str, Any] = dict(
        vocab_size=tokenizer.get_vocab_size(),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
    )
    kwargs.update(overrides)
    config = getattr(transformers, config_name)(**kwargs)
    torch.manual_seed(seed)
    model = getattr(transformers, model_name)(config).to(torch.float32).eval()
    with torch.no_grad():  # random non-trivial norms and biases, so a loader mixing them up shows
        for name, param in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith(".bias"):
                param.copy_(
                    1.0 + 0.1 * torch.randn_like(param)
                    if "norm" in name
                    else 0.1 * torch.randn_like(param)
                )
    save_kwargs: dict[str, Any] = {"safe_serialization": True}
    if max_shard_size is not None:
        save_kwargs["max_shard_size"] = max_shard_size
    model.save_pretrained(path, **save_kwargs)
    hf_tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        unk_token="<|endoftext|>",
        pad_token="<|im_end|>",
        chat_template=CHATML_TEMPLATE,
    )
    hf_tokenizer.save_pretrained(path)
    return path


def skip_without_native_kernels() -> None:
    """Skip the calling test (or module fixture) where the C kernels are not built."""
    import pytest

    from engine import native

    if native.load() is None:
        pytest.skip("no C compiler here: the native kernels are not built")


def llama_model(llm: Any) -> LlamaForCausalLM:
    """The ``LlamaForCausalLM`` an ``LLM`` runs (single process)."""
    from engine.models import LlamaForCausalLM

    model = llm.engine.runner.model
    assert isinstance(model, LlamaForCausalLM)
    return model
