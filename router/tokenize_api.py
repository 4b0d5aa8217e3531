"""``POST /tokenize`` and ``POST /detokenize`` as vLLM serves them, and the router's
copy of the model's vocabulary that they (and logprobs' token text) use.

/tokenize: ``{"prompt": str, "add_special_tokens": true}`` or ``{"messages": [...],
"add_generation_prompt": true}`` -> ``{"count", "max_model_len", "tokens",
"token_strs"}`` (token_strs with ``"return_token_strs": true``).
/detokenize: ``{"tokens": [ids]}`` -> ``{"prompt": str}``.
"""

from __future__ import annotations

import asyncio
from typing import Any

from router import tool_calls
from router.errors import ErrorKind, RouterError
from router.openai_protocol import ApiRequest, _get, _messages, invalid
from router.service import Router
from router.vocabulary import Vocabulary


class VocabularySource:
    """Fetches the tokenizer from an instance once, on first use."""

    def __init__(self, router: Router):
        self.router = router
        self._vocab: Vocabulary | None = None
        self._lock = asyncio.Lock()

    async def get(self) -> Vocabulary:
        async with self._lock:
            if self._vocab is None:
                fetch = getattr(self.router.cluster, "tokenizer_spec", None)
                if fetch is None:
                    raise RouterError(ErrorKind.UNAVAILABLE, "cluster: has no tokenizer to share")
                try:
                    spec = await asyncio.to_thread(fetch)
                except RuntimeError as e:
                    raise RouterError(ErrorKind.UNAVAILABLE, f"cluster: {e}") from e
                self._vocab = await asyncio.to_thread(Vocabulary.from_spec, spec)
            return self._vocab


async def tokenize(source: VocabularySource, body: dict[str, Any]) -> dict[str, Any]:
    router = source.router
    router._check_model(_get(body, "model", str))
    vocab = await source.get()
    tok = vocab.tokenizer
    if body.get("messages") is not None:
        _messages(body["messages"])
        generation = _get(body, "add_generation_prompt", bool, True)
        plan = (
            tool_calls.parse_tools({**body, "tool_choice": "auto"}) if body.get("tools") else None
        )
        template = _get(body, "chat_template", str)
        try:
            text = tok.apply_chat_template(
                body["messages"],
                generation,
                tools=plan.template_tools if plan else None,
                chat_template=template,
            )
        except ValueError as e:
            raise invalid("chat_template" if template else "messages", str(e)) from e
        ids = tok.encode(text, add_special_tokens=_get(body, "add_special_tokens", bool, False))
    else:
        prompt = _get(body, "prompt", str)
        if prompt is None:
            raise invalid("prompt", "is required (or messages)")
        ids = tok.encode(prompt, add_special_tokens=_get(body, "add_special_tokens", bool, True))
    strs = [vocab.text(t) for t in ids] if _get(body, "return_token_strs", bool, False) else None
    return {
        "count": len(ids),
        "max_model_len": router.cluster.max_model_len,
        "tokens": ids,
        "token_strs": strs,
    }


async def detokenize(source: VocabularySource, body: dict[str, Any]) -> dict[str, Any]:
    source.router._check_model(_get(body, "model", str))
    ids = body.get("tokens")
    if not isinstance(ids, list) or not all(
        isinstance(t, int) and not isinstance(t, bool) for t in ids
    ):
        raise invalid("tokens", "must be an array of token ids")
    vocab = await source.get()
    bad = next((t for t in ids if not 0 <= t < vocab.size), None)
    if bad is not None:
        raise invalid("tokens", f"{bad} is not a token id in [0, {vocab.size})")
    return {"prompt": vocab.detokenize(ids)}


async def render_chat(source: VocabularySource, api: ApiRequest) -> ApiRequest:
    """A chat the router renders itself (with tools, or the request's chat_template)."""
    assert api.template_messages is not None
    tok = (await source.get()).tokenizer
    plan = api.tools
    try:
        text = tok.apply_chat_template(
            api.template_messages,
            True,
            tools=plan.template_tools if plan else None,
            chat_template=api.chat_template,
        )
    except ValueError as e:
        raise invalid("chat_template" if api.chat_template else "messages", str(e)) from e
    ids = tok.encode(text, add_special_tokens=False)
    parser = plan.parser if plan is not None and plan.parser else None
    return api.rendered(
        ids, parser or tool_calls.parser_for(api.chat_template or tok.chat_template)
    )
