"""Text <-> token ids on the `tokenizers` package, plus chat templates rendered with jinja2.

Two sources: a Hugging Face directory (tokenizer.json, tokenizer_config.json, optional
chat_template.jinja and generation_config.json) or a GGUF file's `tokenizer.*` metadata, from
which the equivalent `tokenizers` pipeline is rebuilt (as transformers' GGUF converter does).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from datetime import datetime
from functools import lru_cache
from typing import Any

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers
from tokenizers import Tokenizer as Backend

# Tokens that end an assistant turn in common chat templates; each counts as an end of
# generation when the model's template writes it.
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<|end|>", "<end_of_turn>")

# llama.cpp's pre-tokenizer names -> the split regex the vocabulary was trained with.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_SPLITS = {
    "llama-bpe": _LLAMA3_SPLIT,
    "llama3": _LLAMA3_SPLIT,
    "llama-v3": _LLAMA3_SPLIT,
    "smaug-bpe": _LLAMA3_SPLIT,
    "dbrx": _LLAMA3_SPLIT,
    "qwen2": _QWEN2_SPLIT,
    "deepseek-r1-qwen": _QWEN2_SPLIT,
}
# GGUF token types (llama.cpp's llama_token_type)
_UNKNOWN, _CONTROL, _USER_DEFINED = 2, 3, 4


class Tokenizer:
    """A `tokenizers.Tokenizer` plus what generation needs: bos/eos ids and the chat template."""

    def __init__(
        self,
        backend: Backend,
        *,
        bos_token: str | None = None,
        eos_token: str | None = None,
        extra_eos_token_ids: Sequence[int] = (),
        add_bos: bool = False,
        add_eos: bool = False,
        chat_template: str | None = None,
    ) -> None:
        self.backend = backend
        self.bos_token, self.eos_token = bos_token, eos_token
        self.bos_token_id = _token_id(backend, bos_token)
        self.eos_token_id = _token_id(backend, eos_token)
        self.add_bos = add_bos and self.bos_token_id is not None
        self.add_eos = add_eos and self.eos_token_id is not None
        self.chat_template = chat_template
        self.vocab_size = backend.get_vocab_size(with_added_tokens=True)
        self._special_ids = frozenset(
            i for i, t in backend.get_added_tokens_decoder().items() if t.special
        )
        eos = [self.eos_token_id, *extra_eos_token_ids]
        eos += [
            _token_id(backend, t)
            for t in END_OF_TURN_TOKENS
            if chat_template and t in chat_template
        ]
        self.eos_token_ids: tuple[int, ...] = tuple(dict.fromkeys(i for i in eos if i is not None))

    def to_spec(self) -> dict[str, Any]:
        """Everything needed to rebuild this tokenizer elsewhere, as plain JSON-able data
        (the router builds one from an instance's, for logprobs' token text and
        /tokenize; it holds no model files)."""
        return {
            "tokenizer_json": self.backend.to_str(),
            "bos_token": self.bos_token,
            "eos_token": self.eos_token,
            "eos_token_ids": list(self.eos_token_ids),
            "add_bos": self.add_bos,
            "add_eos": self.add_eos,
            "chat_template": self.chat_template,
        }

    @classmethod
    def from_spec(cls, spec: Mapping[str, Any]) -> Tokenizer:
        return cls(
            Backend.from_str(spec["tokenizer_json"]),
            bos_token=spec.get("bos_token"),
            eos_token=spec.get("eos_token"),
            extra_eos_token_ids=[int(i) for i in spec.get("eos_token_ids", ())],
            add_bos=bool(spec.get("add_bos")),
            add_eos=bool(spec.get("add_eos")),
            chat_template=spec.get("chat_template"),
        )

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids: list[int] = self.backend.encode(text, add_special_tokens=False).ids
        if add_special_tokens:
            if self.add_bos and self.bos_token_id is not None:
                ids.insert(0, self.bos_token_id)
            if self.add_eos and self.eos_token_id is not None:
                ids.append(self.eos_token_id)
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        text: str = self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)
        return text

    def is_special(self, token_id: int) -> bool:
        return token_id in self._special_ids

    def apply_chat_template(
        self,
        messages: Sequence[Mapping[str, Any]],
        add_generation_prompt: bool = True,
        *,
        tools: list[dict[str, Any]] | None = None,
        chat_template: str | None = None,
    ) -> str:
        """The conversation as the model's template (or ``chat_template``) writes it;
        ``tools`` reach the template as transformers passes them."""
        template = chat_template or self.chat_template
        if not template:
            raise ValueError("chat_template: this model has no chat template")
        try:
            return _compile_template(template).render(
                messages=messages,
                add_generation_prompt=add_generation_prompt,
                tools=tools,
                documents=None,
                bos_token=self.bos_token or "",
                eos_token=self.eos_token or "",
            )
        except jinja2.TemplateError as err:
            raise ValueError(f"chat_template: {err}") from err

    def encode_chat(
        self, messages: list[dict[str, str]], add_generation_prompt: bool = True
    ) -> list[int]:
        """Token ids of a conversation: the rendered template carries its own special tokens."""
        text = self.apply_chat_template(messages, add_generation_prompt)
        return self.encode(text, add_special_tokens=False)

    @classmethod
    def from_hf_dir(cls, path: str) -> Tokenizer:
        file = os.path.join(path, "tokenizer.json")
        if not os.path.isfile(file):
            raise ValueError(f"model: directory {path!r} has no tokenizer.json")
        try:
            backend = Backend.from_file(file)
        except Exception as err:  # tokenizers raises a bare Exception on bad JSON
            raise ValueError(f"model: cannot read {file!r}: {err}") from err
        config = _read_json(os.path.join(path, "tokenizer_config.json"))
        bos, eos = _token_text(config.get("bos_token")), _token_text(config.get("eos_token"))
        # transformers lets tokenizer_config override tokenizer.json's post-processor; we apply
        # bos/eos ourselves, so read what the post-processor would have added and then drop it.
        add_bos, add_eos = _post_processor_adds(backend, bos, eos)
        backend.post_processor = None
        generation = _read_json(os.path.join(path, "generation_config.json"))
        extra = generation.get("eos_token_id")
        return cls(
            backend,
            bos_token=bos,
            eos_token=eos,
            extra_eos_token_ids=[extra] if isinstance(extra, int) else list(extra or []),
            add_bos=bool(config.get("add_bos_token", add_bos)),
            add_eos=bool(config.get("add_eos_token", add_eos)),
            chat_template=_hf_chat_template(path, config),
        )

    @classmethod
    def from_gguf_metadata(cls, metadata: Mapping[str, Any]) -> Tokenizer:
        """Rebuild the tokenizer from GGUF `tokenizer.*` metadata (keys as llama.cpp names them)."""
        kind = metadata.get("tokenizer.ggml.model")
        tokens: list[str] = list(metadata.get("tokenizer.ggml.tokens") or [])
        types: list[int] = list(metadata.get("tokenizer.ggml.token_type") or [1] * len(tokens))
        if kind == "gpt2":
            backend = _byte_level_bpe(tokens, types, metadata)
            default_add_bos = False
        elif kind == "llama":
            backend = _sentencepiece_bpe(tokens, types, metadata)
            default_add_bos = (
                True  # llama.cpp adds BOS to sentencepiece vocabularies unless told not to
            )
        else:
            raise ValueError(f"model: unsupported GGUF tokenizer {kind!r} (supported: gpt2, llama)")
        specials = [tokens[i] for i, t in enumerate(types) if t in (_CONTROL, _UNKNOWN)]
        backend.add_special_tokens(
            [AddedToken(t, special=True, normalized=False) for t in specials]
        )
        user = [tokens[i] for i, t in enumerate(types) if t == _USER_DEFINED]
        backend.add_tokens([AddedToken(t, special=False, normalized=False) for t in user])

        def token(key: str) -> str | None:
            index = metadata.get(f"tokenizer.ggml.{key}")
            return tokens[index] if index is not None and 0 <= index < len(tokens) else None

        return cls(
            backend,
            bos_token=token("bos_token_id"),
            eos_token=token("eos_token_id"),
            extra_eos_token_ids=[
                metadata[f"tokenizer.ggml.{k}"]
                for k in ("eot_token_id", "eom_token_id")
                if f"tokenizer.ggml.{k}" in metadata
            ],
            add_bos=bool(metadata.get("tokenizer.ggml.add_bos_token", default_add_bos)),
            add_eos=bool(metadata.get("tokenizer.ggml.add_eos_token", False)),
            chat_template=metadata.get("tokenizer.chat_template"),
        )


def _token_id(backend: Backend, token: str | None) -> int | None:
    return None if token is None else backend.token_to_id(token)


def _token_text(value: Any) -> str | None:
    # tokenizer_config stores special tokens as a string or as a serialized AddedToken dict.
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _read_json(file: str) -> dict[str, Any]:
    if not os.path.isfile(file):
        return {}
    try:
        with open(file, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError) as err:
        raise ValueError(f"model: cannot read {file!r}: {err}") from err
    return data if isinstance(data, dict) else {}


def _post_processor_adds(backend: Backend, bos: str | None, eos: str | None) -> tuple[bool, bool]:
    bare = backend.encode("a", add_special_tokens=False).ids
    full = backend.encode("a", add_special_tokens=True).ids
    if len(full) == len(bare):
        return False, False
    bos_id, eos_id = _token_id(backend, bos), _token_id(backend, eos)
    return (bos_id is not None and full[0] == bos_id, eos_id is not None and full[-1] == eos_id)


def _hf_chat_template(path: str, config: Mapping[str, Any]) -> str | None:
    # Newer transformers saves the template to chat_template.jinja (which wins), older ones to
    # tokenizer_config.json or chat_template.json; a list of named templates means "default".
    jinja_file = os.path.join(path, "chat_template.jinja")
    if os.path.isfile(jinja_file):
        with open(jinja_file, encoding="utf-8") as f:
            return f.read()
    template = config.get("chat_template") or _read_json(
        os.path.join(path, "chat_template.json")
    ).get("chat_template")
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    return template if isinstance(template, str) else None


def _raise_exception(message: str) -> None:
    raise jinja2.TemplateError(message)


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    # jinja's own tojson escapes HTML characters; chat templates expect plain JSON.
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


@lru_cache(maxsize=16)
def _compile_template(source: str) -> jinja2.Template:
    """Compile a chat template the way transformers does (sandboxed, trim/lstrip blocks)."""
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(source)
    except jinja2.TemplateError as err:
        raise ValueError(f"chat_template: cannot compile: {err}") from err


@lru_cache(maxsize=1)
def _byte_alphabet() -> dict[int, str]:
    """GPT-2's byte -> printable character table (bytes_to_unicode)."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def _byte_level_bpe(tokens: list[str], types: list[int], metadata: Mapping[str, Any]) -> Backend:
    alphabet = _byte_alphabet()
    letters = set(alphabet.values())

    def spelled(token: str, token_type: int) -> str:
        # Added tokens are matched literally; ordinary ones must be in the byte alphabet.
        if token_type in (_CONTROL, _USER_DEFINED, _UNKNOWN) or set(token) <= letters:
            return token
        return "".join(alphabet[b] for b in token.encode("utf-8"))

    vocab = {spelled(t, k): i for i, (t, k) in enumerate(zip(tokens, types, strict=True))}
    merges = [tuple(m.split(" ", 1)) for m in metadata.get("tokenizer.ggml.merges") or []]
    pre = str(metadata.get("tokenizer.ggml.pre", "default"))
    # Llama 3's tokenizer.json (and llama.cpp for it) take a whole word found in the vocabulary
    # as one token before trying merges.
    ignore_merges = pre in ("llama-bpe", "llama3", "llama-v3", "smaug-bpe")
    backend = Backend(
        models.BPE(vocab=vocab, merges=merges, fuse_unk=False, ignore_merges=ignore_merges)
    )
    if pre in _SPLITS:
        backend.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(_SPLITS[pre]), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    elif pre == "smollm":
        # SmolLM's tokenizer.json: one digit per token, then GPT-2's split.
        backend.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Digits(individual_digits=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
            ]
        )
    else:
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in ("qwen2", "deepseek-r1-qwen"):
        backend.normalizer = normalizers.NFC()  # as Qwen2's tokenizer.json
    backend.decoder = decoders.ByteLevel()
    return backend


def _sentencepiece_bpe(tokens: list[str], types: list[int], metadata: Mapping[str, Any]) -> Backend:
    """SentencePiece BPE ("llama" GGUF vocabularies): merges rebuilt from scores, byte fallback."""
    vocab = {t: i for i, t in enumerate(tokens)}
    scores = metadata.get("tokenizer.ggml.scores") or [0.0] * len(tokens)
    merges = _merges_from_scores(vocab, dict(zip(tokens, scores, strict=True)))
    unk_index = metadata.get("tokenizer.ggml.unknown_token_id")
    unk = tokens[unk_index] if unk_index is not None else None
    backend = Backend(
        models.BPE(vocab=vocab, merges=merges, unk_token=unk, fuse_unk=True, byte_fallback=True)
    )
    prefix = bool(metadata.get("tokenizer.ggml.add_space_prefix", True))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(
        replacement="▁", prepend_scheme="first" if prefix else "never", split=False
    )
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if prefix:
        steps.append(decoders.Strip(content=" ", left=1, right=0))
    backend.decoder = decoders.Sequence(steps)
    return backend


def _merges_from_scores(vocab: dict[str, int], scores: dict[str, float]) -> list[tuple[str, str]]:
    """Every split of a token into two known tokens, best-scoring merged token first.

    Same order as transformers' `generate_merges`, so both tokenize identically.
    """
    merges: list[tuple[str, str, float]] = []
    for token, score in scores.items():
        local = [
            (token[:i], token[i:], score)
            for i in range(1, len(token))
            if token[:i] in vocab and token[i:] in vocab
        ]
        local.sort(key=lambda m: (vocab[m[0]], vocab[m[1]]))
        merges.extend(local)
    merges.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
    return [(left, right) for left, right, _ in merges]
