"""IncrementalDetokenizer: deltas concatenate to decode(), never half a character."""

from __future__ import annotations

import random

import pytest

from engine.detokenizer import IncrementalDetokenizer
from engine.loader.default import default_model_path
from engine.loader.gguf import load_gguf_tokenizer
from engine.tokenizer import Tokenizer
from tests.engine.test_tokenizer import write_sentencepiece_gguf

TEXTS = [
    "Plain English text, streamed one token at a time.",
    "emoji 😀🎉 family 👩‍👩‍👧 flag 🇫🇷 end",
    "日本語のテキストと中文和한국어",
    "combining e\u0301 and ḁ̵̛ marks",
    "code:\n    return {'k': [1, 2, 3]}\n",
    "😀",
]


@pytest.fixture(scope="module")
def smollm() -> Tokenizer:
    return load_gguf_tokenizer(default_model_path())


@pytest.fixture(scope="module")
def sentencepiece(tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    path = tmp_path_factory.mktemp("sp") / "sp.gguf"
    write_sentencepiece_gguf(path)
    return load_gguf_tokenizer(str(path))


def stream(
    tokenizer: Tokenizer,
    ids: list[int],
    chunks: list[int] | None = None,
    skip_special_tokens: bool = True,
) -> list[str]:
    detok = IncrementalDetokenizer(tokenizer, [1, 2, 3], skip_special_tokens=skip_special_tokens)
    deltas, pos = [], 0
    for size in chunks or [1] * len(ids):
        deltas.append(detok.push(ids[pos : pos + size]))
        pos += size
    deltas.append(detok.flush())
    assert "".join(deltas) == detok.text
    return deltas


@pytest.mark.parametrize("text", TEXTS)
def test_deltas_concatenate_to_decode(smollm: Tokenizer, text: str) -> None:
    ids = smollm.encode(text, add_special_tokens=False)
    deltas = stream(smollm, ids)
    assert "".join(deltas) == smollm.decode(ids) == text
    assert not any("\ufffd" in d for d in deltas)


def test_multibyte_characters_are_held_until_complete(smollm: Tokenizer) -> None:
    ids = smollm.encode("a😀b", add_special_tokens=False)
    # the emoji's four bytes span several byte-level tokens
    assert len(ids) > 3
    deltas = stream(smollm, ids)
    assert [d for d in deltas if d] == ["a", "😀", "b"]
    assert deltas.count("") == len(ids) - 3 + 1  # the held pushes, plus an empty flush


def test_cjk_never_split(smollm: Tokenizer) -> None:
    text = "日本語のテキスト"
    ids = smollm.encode(text, add_special_tokens=False)
    deltas = stream(smollm, ids)
    assert "".join(deltas) == text
    for delta in deltas:  # every delta is whole characters of the text, in order
        assert all(ch in text for ch in delta)


def test_random_chunking(smollm: Tokenizer) -> None:
    text = " ".join(TEXTS)
    ids = smollm.encode(text, add_special_tokens=False)
    rng = random.Random(0)
    for _ in range(5):
        chunks, left = [], len(ids)
        while left:
            chunks.append(min(left, rng.randint(0, 5)))
            left -= chunks[-1]
        assert "".join(stream(smollm, ids, chunks)) == text


def test_special_tokens(smollm: Tokenizer) -> None:
    ids = smollm.encode("<|im_start|>assistant\nHi 😀<|im_end|>", add_special_tokens=False)
    assert "".join(stream(smollm, ids)) == "assistant\nHi 😀" == smollm.decode(ids)
    kept = "".join(stream(smollm, ids, skip_special_tokens=False))
    assert (
        kept
        == "<|im_start|>assistant\nHi 😀<|im_end|>"
        == smollm.decode(ids, skip_special_tokens=False)
    )


def test_invalid_tail_is_released_by_flush(smollm: Tokenizer) -> None:
    emoji = smollm.encode("😀", add_special_tokens=False)
    ids = smollm.encode("ok ", add_special_tokens=False) + emoji[:1]  # output stops mid-character
    detok = IncrementalDetokenizer(smollm, [])
    assert detok.push(ids) == ""  # ends inside a character: held
    tail = detok.flush()
    assert tail.startswith("ok ") and tail.endswith("\ufffd")
    assert detok.text == smollm.decode(ids)


def test_window_stays_small(smollm: Tokenizer) -> None:
    """vLLM-style offsets: each push decodes a few tokens, not the whole output."""
    ids = smollm.encode(" ".join(TEXTS) * 4, add_special_tokens=False)
    seen: list[int] = []

    class Counting(Tokenizer):
        def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:  # type: ignore[override]
            seen.append(len(ids))
            return super().decode(ids, skip_special_tokens)

    counting = Counting.__new__(Counting)
    counting.__dict__.update(smollm.__dict__)
    assert "".join(stream(counting, ids)) == smollm.decode(ids)
    assert len(ids) > 200 and max(seen) <= 8


def test_sentencepiece_spaces(sentencepiece: Tokenizer) -> None:
    for text in ["Hello world, hello tokens!", "  two  spaces", "emoji 😀 via bytes", "é"]:
        ids = sentencepiece.encode(text, add_special_tokens=False)
        deltas = stream(sentencepiece, ids)
        assert "".join(deltas) == sentencepiece.decode(ids)
        assert not any("\ufffd" in d for d in deltas)
    # the word-initial "▁" of the first token is stripped exactly as decode() strips it
    deltas = stream(sentencepiece, sentencepiece.encode("Hello world", add_special_tokens=False))
    assert "".join(deltas) == "Hello world"
    assert next(d for d in deltas if d).startswith("H")


def test_prompt_is_not_part_of_text(smollm: Tokenizer) -> None:
    prompt = smollm.encode("A prompt that ends mid", add_special_tokens=False)
    detok = IncrementalDetokenizer(smollm, prompt)
    out = smollm.encode(" sentence.", add_special_tokens=False)
    assert detok.push(out) + detok.flush() == " sentence."
