"""transformers baselines for the engine benchmark: same weights, same prompts, fp32.

transformers is a dev extra (the correctness reference), so it is imported inside the
functions here, never at module level. The model is built from the same file the engine
loads: a GGUF through ``from_pretrained(dir, gguf_file=name)`` (transformers dequantizes
and un-permutes it to the same fp32 weights), or a Hugging Face directory.
"""

from __future__ import annotations

import os
import statistics
import time
from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class GenerateResult:
    num_prompts: int
    output_tokens: int
    seconds: float

    @property
    def tokens_per_s(self) -> float:
        return self.output_tokens / self.seconds


def load_model(path: str, dtype: torch.dtype = torch.float32) -> Any:
    """A transformers causal LM in ``dtype`` (fp32 unless told), eval mode, from a GGUF file
    or a model directory."""
    import transformers
    from transformers import AutoModelForCausalLM

    # transformers 5 renamed torch_dtype to dtype; 4.x only knows torch_dtype.
    dtype_kw = "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"
    kwargs: dict[str, Any] = {dtype_kw: dtype}
    if os.path.isdir(path):
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    else:
        directory, name = os.path.split(os.path.abspath(path))
        model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, **kwargs)
    return model.eval()


def _generation_config(model: Any, output_len: int, pad_id: int) -> Any:
    from transformers import GenerationConfig

    # min_new_tokens == max_new_tokens: exactly output_len tokens, eos ignored (like ignore_eos).
    return GenerationConfig(
        max_new_tokens=output_len,
        min_new_tokens=output_len,
        do_sample=False,
        pad_token_id=pad_id,
        eos_token_id=model.generation_config.eos_token_id,
    )


def pad_id_of(model: Any) -> int:
    for candidate in (model.generation_config.pad_token_id, model.generation_config.eos_token_id):
        if isinstance(candidate, int):
            return candidate
        if isinstance(candidate, list) and candidate:
            return int(candidate[0])
    return 0


@torch.inference_mode()
def generate_one_at_a_time(model: Any, prompts: list[list[int]], output_len: int) -> GenerateResult:
    """Each prompt alone through ``model.generate``, back to back: the naive serving loop."""
    config = _generation_config(model, output_len, pad_id_of(model))
    produced = 0
    start = time.perf_counter()
    for prompt in prompts:
        input_ids = torch.tensor([prompt], dtype=torch.long)
        out = model.generate(input_ids, attention_mask=torch.ones_like(input_ids),
                             generation_config=config)
        produced += out.shape[1] - input_ids.shape[1]
    return GenerateResult(len(prompts), produced, time.perf_counter() - start)


@torch.inference_mode()
def generate_padded(
    model: Any, prompts: list[list[int]], output_len: int, batch_size: int
) -> GenerateResult:
    """Static batches of ``batch_size`` prompts, left-padded to the longest, with a mask."""
    pad_id = pad_id_of(model)
    config = _generation_config(model, output_len, pad_id)
    produced = 0
    start = time.perf_counter()
    for first in range(0, len(prompts), batch_size):
        batch = prompts[first:first + batch_size]
        width = max(len(p) for p in batch)
        input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)  # [B, S]
        mask = torch.zeros((len(batch), width), dtype=torch.long)  # [B, S]
        for row, prompt in enumerate(batch):
            input_ids[row, width - len(prompt):] = torch.tensor(prompt, dtype=torch.long)
            mask[row, width - len(prompt):] = 1
        out = model.generate(input_ids, attention_mask=mask, generation_config=config)
        produced += (out.shape[1] - width) * len(batch)
    return GenerateResult(len(prompts), produced, time.perf_counter() - start)


@torch.inference_mode()
def decode_step_seconds(model: Any, prompt: list[int], steps: int, warmup: int = 2) -> float:
    """Median time of one batch-1 decode step: a single-token forward with past_key_values."""
    input_ids = torch.tensor([prompt], dtype=torch.long)  # [1, S]
    out = model(input_ids=input_ids, use_cache=True)
    past = out.past_key_values
    next_id = out.logits[:, -1].argmax(dim=-1, keepdim=True)  # [1, 1]
    times: list[float] = []
    for i in range(warmup + steps):
        start = time.perf_counter()
        out = model(input_ids=next_id, past_key_values=past, use_cache=True)
        past = out.past_key_values
        next_id = out.logits[:, -1].argmax(dim=-1, keepdim=True)
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return statistics.median(times)
