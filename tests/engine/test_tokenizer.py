"""Tokenizer: equal to transformers' tokenizer for the same files (GGUF and HF directories)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
from gguf import GGUFWriter
from tokenizers import Tokenizer as Backend
from tokenizers import models, pre_tokenizers, trainers

from engine.loader.default import default_model_path
from engine.loader.gguf import load_gguf_tokenizer
from engine.tokenizer import Tokenizer
from tests.engine.helpers import make_tiny_model_dir
from tests.engine.test_loader import write_tiny_gguf

transformers = pytest.importorskip("transformers")

TEXTS = [
    "Hello world",
    "  leading spaces and trailing  ",
    "The year 2024 had 366 days; pi≈3.14159 and 1,000,000 > 999.",
    "a 123 4567 x=12.5",
    "def f(x):\n    return x ** 2  # square\n\n\tif x != 0:\n\t\tpass",
    "naïve café über 日本語のテキスト 中文 한국어",
    "emoji 😀🎉👩‍👩‍👧 flags 🇫🇷",
    "line1\r\nline2\n\n\nline3",
    "combining e\u0301 and ḁ̵̛",
    "I'm sure they've said we'll can't",
    "<|im_start|>user\nHi<|im_end|>\n",
    "",
    " ",
]
CONVERSATIONS = [
    [{"role": "user", "content": "Hi there"}],
    [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello! 😀"},
        {"role": "user", "content": "2+2?"},
    ],
]


def assert_same(ours: Tokenizer, theirs: Any, texts: list[str] = TEXTS) -> None:
    for text in texts:
        ids = theirs.encode(text)
        assert ours.encode(text) == ids, text
        assert ours.encode(text, add_special_tokens=False) == theirs.encode(
            text, add_special_tokens=False
        )
        for skip in (True, False):
            assert ours.decode(ids, skip_special_tokens=skip) == theirs.decode(
                ids, skip_special_tokens=skip
            ), text


def assert_same_chat(ours: Tokenizer, theirs: Any) -> None:
    for messages in CONVERSATIONS:
        for generation in (True, False):
            want = theirs.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=generation
            )
            got = ours.apply_chat_template(messages, add_generation_prompt=generation)
            assert got == want
            assert ours.encode(got) == theirs.encode(want)


# ---------------------------------------------------------------- SmolLM2 GGUF


@pytest.fixture(scope="module")
def smollm_pair() -> tuple[Tokenizer, Any]:
    path = Path(default_model_path())
    theirs = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    return load_gguf_tokenizer(str(path)), theirs


def test_smollm2_equals_transformers(smollm_pair: tuple[Tokenizer, Any]) -> None:
    assert_same(*smollm_pair)


def test_smollm2_chat_template_equals_transformers(smollm_pair: tuple[Tokenizer, Any]) -> None:
    ours, theirs = smollm_pair
    assert_same_chat(ours, theirs)
    assert ours.apply_chat_template([{"role": "user", "content": "hi"}]) == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
        "<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    )


def test_smollm2_special_tokens(smollm_pair: tuple[Tokenizer, Any]) -> None:
    ours, _ = smollm_pair
    assert (ours.bos_token_id, ours.eos_token_ids, ours.vocab_size, ours.add_bos) == (
        1,
        (2,),
        49152,
        False,
    )
    assert [i for i in range(100) if ours.is_special(i)] == list(range(17))
    # digits are single tokens (SmolLM's Digits pre-tokenizer)
    assert [ours.decode([i]) for i in ours.encode("x 2024")] == ["x", " ", "2", "0", "2", "4"]


# ---------------------------------------------------------------- HF directories


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model_dir(tmp_path_factory.mktemp("tok") / "llama", "llama")


def test_hf_dir_equals_transformers(tiny_dir: Path) -> None:
    ours = Tokenizer.from_hf_dir(str(tiny_dir))
    theirs = transformers.AutoTokenizer.from_pretrained(str(tiny_dir))
    assert_same(ours, theirs)
    assert_same_chat(ours, theirs)
    assert (ours.bos_token_id, ours.eos_token_ids, ours.add_bos) == (1, (2,), False)
    assert [ours.is_special(i) for i in range(4)] == [True, True, True, False]


def test_hf_dir_bos_from_post_processor(tiny_dir: Path, tmp_path: Path) -> None:
    """A Llama-3-style tokenizer.json whose post-processor prepends BOS (no add_bos_token key)."""
    shutil.copytree(tiny_dir, tmp_path / "m")
    spec = json.loads((tmp_path / "m" / "tokenizer.json").read_text())
    spec["post_processor"] = {
        "type": "TemplateProcessing",
        "single": [
            {"SpecialToken": {"id": "<|im_start|>", "type_id": 0}},
            {"Sequence": {"id": "A", "type_id": 0}},
        ],
        "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
        "special_tokens": {
            "<|im_start|>": {"id": "<|im_start|>", "ids": [1], "tokens": ["<|im_start|>"]}
        },
    }
    (tmp_path / "m" / "tokenizer.json").write_text(json.dumps(spec))
    (tmp_path / "m" / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 0]}))
    ours = Tokenizer.from_hf_dir(str(tmp_path / "m"))
    theirs = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "m"))
    assert ours.add_bos
    assert ours.encode("Hello")[0] == 1
    assert_same(ours, theirs)
    assert ours.eos_token_ids == (2, 0)


def test_hf_dir_without_tokenizer(tiny_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"^model: directory '.*' has no tokenizer.json$"):
        Tokenizer.from_hf_dir(str(tmp_path))
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"^model: cannot read '.*tokenizer.json'"):
        Tokenizer.from_hf_dir(str(tmp_path))


def test_chat_template_errors(tiny_dir: Path) -> None:
    ours = Tokenizer.from_hf_dir(str(tiny_dir))
    ours.chat_template = "{{ raise_exception('roles must alternate') }}"
    with pytest.raises(ValueError, match=r"^chat_template: roles must alternate$"):
        ours.apply_chat_template([{"role": "user", "content": "x"}])
    ours.chat_template = "{{ messages | tojson }}{{ bos_token }}"
    assert ours.apply_chat_template([{"role": "user", "content": "é<"}]) == (
        '[{"role": "user", "content": "é<"}]<|im_start|>'
    )
    ours.chat_template = None
    with pytest.raises(ValueError, match=r"^chat_template: this model has no chat template$"):
        ours.apply_chat_template([{"role": "user", "content": "x"}])


# ---------------------------------------------------------------- other GGUF tokenizers


@pytest.mark.parametrize("pre", ["default", "llama-bpe", "qwen2"])
def test_gguf_byte_level_pre_tokenizers(tiny_dir: Path, tmp_path: Path, pre: str) -> None:
    write_tiny_gguf(tiny_dir, tmp_path / "m.gguf", pre=pre)
    ours = load_gguf_tokenizer(str(tmp_path / "m.gguf"))
    theirs = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="m.gguf")
    if pre == "qwen2":
        # Qwen2's tokenizer.json normalizes to NFC (transformers' GGUF converter leaves that out)
        assert ours.encode("e\u0301") == ours.encode("\u00e9") == theirs.encode("\u00e9")
        assert_same(ours, theirs, [t for t in TEXTS if "\u0301" not in t])
    else:
        assert_same(ours, theirs)
    assert_same_chat(ours, theirs)


def write_sentencepiece_gguf(path: Path) -> None:
    """A llama-style (SentencePiece BPE, byte fallback) vocabulary, as llama.cpp stores one."""
    trained = Backend(models.BPE())
    trained.pre_tokenizer = pre_tokenizers.Metaspace(
        replacement="▁", prepend_scheme="first", split=False
    )
    corpus = [
        "The quick brown fox jumps over the lazy dog.",
        "Hello world, hello tokens!",
        "def main():\n    return 42",
        "tokenizers build merges from scores",
    ] * 4
    trained.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=200, show_progress=False))
    vocab = trained.get_vocab()
    pieces = sorted(vocab, key=vocab.__getitem__)
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + pieces
    types = [2, 3, 3] + [6] * 256 + [1] * len(pieces)
    scores = [0.0] * 259 + [-float(i) for i in range(len(pieces))]
    writer = GGUFWriter(str(path), "llama")
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    writer.add_uint32("tokenizer.ggml.eot_token_id", 2)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.close()


def test_gguf_sentencepiece_equals_transformers(tmp_path: Path) -> None:
    write_sentencepiece_gguf(tmp_path / "sp.gguf")
    ours = load_gguf_tokenizer(str(tmp_path / "sp.gguf"))
    theirs = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="sp.gguf")
    texts = [t for t in TEXTS if "<|" not in t] + ["<s> hello </s>", "tabs\tand  double  spaces"]
    assert_same(ours, theirs, texts)
    assert (ours.bos_token_id, ours.eos_token_ids, ours.add_bos) == (1, (2,), True)
    assert ours.encode("Hello")[0] == 1
    # byte fallback: an emoji outside the vocabulary becomes its four UTF-8 bytes
    emoji = ours.encode("😀", add_special_tokens=False)
    assert [ours.backend.id_to_token(i) for i in emoji][-4:] == [
        "<0xF0>",
        "<0x9F>",
        "<0x98>",
        "<0x80>",
    ]
    assert ours.decode(emoji) == "😀"


def test_gguf_unsupported_tokenizer() -> None:
    with pytest.raises(
        ValueError, match=r"^model: unsupported GGUF tokenizer 'bert' \(supported: gpt2, llama\)$"
    ):
        Tokenizer.from_gguf_metadata(
            {"tokenizer.ggml.model": "bert", "tokenizer.ggml.tokens": ["a"]}
        )
