"""prompt_logprobs on the real model equal transformers' log_softmax over the prompt's
logits, whole or in chunks, with the prefix cache warm, alone and in a group (n > 1)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from engine import LLM, SamplingParams
from engine.loader.default import default_model_path
from tests.engine.test_parity import natural_prompts

transformers = pytest.importorskip("transformers")

TOL = 2e-3  # fp32 both sides; kernels differ in summation order


@pytest.fixture(scope="module")
def reference() -> Callable[[list[int]], torch.Tensor]:
    path = Path(default_model_path())
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32
    ).eval()

    def log_softmax(ids: list[int]) -> torch.Tensor:
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0].float()
        return torch.log_softmax(logits, dim=-1)  # [P, V]

    return log_softmax


def check_rows(
    rows: list[list[tuple[int, float, int]]] | None, ids: list[int], ref: torch.Tensor, top: int
) -> None:
    assert rows is not None and len(rows) == len(ids) - 1
    for i, row in enumerate(rows):
        token, lp, rank = row[0]
        assert token == ids[i + 1]
        want = ref[i]
        assert abs(lp - float(want[token])) < TOL, (i, lp, float(want[token]))
        assert abs(rank - (int((want > want[token]).sum()) + 1)) <= 1  # near-ties may swap
        assert len(row) == 1 + top
        ref_top = want.topk(top)
        for j, (t, v, r) in enumerate(row[1:]):
            assert r == j + 1
            assert abs(v - float(ref_top.values[j])) < TOL
            assert abs(float(want[t]) - v) < TOL  # the token has that logprob (ties may swap)


def test_prompt_logprobs_equal_transformers(
    smollm: LLM, make_llm: Callable[..., LLM], reference: Callable[[list[int]], torch.Tensor]
) -> None:
    [ids] = natural_prompts(lambda t: smollm.tokenizer.encode(t, add_special_tokens=False), [70])
    ref = reference(ids)
    params = SamplingParams(max_tokens=2, temperature=0, prompt_logprobs=3)
    [out] = smollm.generate(prompt_token_ids=[ids], params=params)
    check_rows(out.prompt_logprobs, ids, ref, 3)
    # Warm prefix cache: the request bypasses it and still gets every position.
    [again] = smollm.generate(prompt_token_ids=[ids], params=params)
    assert again.num_cached_tokens == 0
    check_rows(again.prompt_logprobs, ids, ref, 3)
    # Without prompt_logprobs the same prompt does hit the cache (so the bypass mattered).
    [plain] = smollm.generate(prompt_token_ids=[ids], params=SamplingParams(max_tokens=1))
    assert plain.num_cached_tokens > 0 and plain.prompt_logprobs is None
    # Chunked prefill (16-token chunks) gives the same values, and the first token.
    chunked = make_llm(None, max_num_batched_tokens=16, num_kv_blocks=64)
    [c] = chunked.generate(prompt_token_ids=[ids], params=params)
    check_rows(c.prompt_logprobs, ids, ref, 3)
    assert c.token_ids == out.token_ids
    # A group (n > 1) computes them once; each sequence reports them.
    zero = SamplingParams(max_tokens=2, temperature=0, prompt_logprobs=0)
    engine = smollm.engine
    engine.add_request(
        "g", params=zero, prompt_token_ids=ids, children=[("g-0", zero), ("g-1", zero)]
    )
    firsts = {}
    while engine.has_unfinished():
        for o in engine.step():
            firsts.setdefault(o.request_id, o.prompt_logprobs)
    assert set(firsts) == {"g-0", "g-1"}
    for rows in firsts.values():
        check_rows(rows, ids, ref, 0)


@pytest.mark.parametrize("value", [-1, 21, 1.5, True, "2"])
def test_bad_prompt_logprobs_named(value: object) -> None:
    with pytest.raises(ValueError, match="^prompt_logprobs: "):
        SamplingParams(prompt_logprobs=value)  # type: ignore[arg-type]
