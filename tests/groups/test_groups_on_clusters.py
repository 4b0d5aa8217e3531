"""Sequence groups (n > 1) where they are hardest: on tensor-parallel instances, and with
their prefill instance dying before the first token.

A tiny random-weight Llama (4 query heads over 2 KV heads, 4 layers) on a real local Ray.
Greedy sequences of a group must equal each other and the offline engine's greedy output,
token for token, and every KV block must be free on every instance afterwards.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path
from typing import Any

import pytest

from cluster import Cluster
from engine import LLM, SamplingParams
from engine.outputs import RequestOutput
from tests.cluster.test_cluster import wait_all_blocks_free
from tests.engine.helpers import make_tiny_model_dir

pytest.importorskip("transformers")

N = 3
# 37 tokens: two full blocks and a partial one, which a fork must copy or recompute.
PROMPT = [(7 * i + 3) % 460 + 3 for i in range(37)]
GREEDY = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("groups")
    return make_tiny_model_dir(root / "gqa", "llama", num_hidden_layers=4, num_key_value_heads=2)


@pytest.fixture(scope="module")
def expected(model_dir: Path) -> list[int]:
    offline = LLM(str(model_dir), device="cpu", num_kv_blocks=64)
    [out] = offline.generate(prompt_token_ids=[PROMPT], params=GREEDY)
    return out.token_ids


def _cluster(model_dir: Path, **kwargs: Any) -> Cluster:
    return Cluster(
        str(model_dir), num_kv_blocks=64, cpus_per_instance=1, start_timeout_s=180,
        transfer_timeout_s=20, **kwargs,
    )  # fmt: skip


async def _group(cluster: Cluster, request_id: str) -> list[RequestOutput]:
    streams = await cluster.stream_n(None, GREEDY, N, prompt_token_ids=PROMPT,
                                     request_id=request_id)  # fmt: skip

    async def last(stream: Any) -> RequestOutput:
        outs = [out async for out in stream]
        assert outs
        return outs[-1]

    return list(await asyncio.wait_for(asyncio.gather(*(last(s) for s in streams)), 180))


LAYOUTS = [((1, 1), (2, 1)), ((2, 1), (1, 1))]


@pytest.mark.parametrize("layout", LAYOUTS, ids=["1x1-to-tp2", "tp2-to-1x1"])
def test_n_greedy_on_tp2_equals_the_offline_engine(
    ray_session: None, model_dir: Path, expected: list[int], layout: Any
) -> None:
    """TP decode: the fork has no whole-block KV access, so each child's table stops at
    the full blocks and the partial tail is recomputed. TP prefill: the group's blocks
    are held and handed off as one."""
    prefill, decode = layout
    with _cluster(model_dir, prefill_parallel=prefill, decode_parallel=decode) as c:
        outs = asyncio.run(_group(c, "tp-group"))
        assert [o.request_id for o in outs] == [f"tp-group-{i}" for i in range(N)]
        assert [o.token_ids for o in outs] == [expected] * N
        assert all(o.finish_reason == "length" for o in outs)
        stats = {s.name: s for s in c.stats()}
        assert stats["decode-0"].counters["recomputes"] == 0  # the KV was pulled
        if prefill != (1, 1):  # a TP stage returns sampled rows only: refused, named
            asks = SamplingParams(max_tokens=2, prompt_logprobs=1)
            with pytest.raises(ValueError, match="^prompt_logprobs: "):
                c.submit(prompt_token_ids=PROMPT, params=asks)
        wait_all_blocks_free(c)


def test_a_group_whose_prefill_instance_dies_is_redispatched(
    ray_session: None, model_dir: Path, expected: list[int]
) -> None:
    """The group reaches prefill-0 while it is stopped (SIGSTOP), before any token;
    prefill-0 is then killed. Each sequence moves to prefill-1 (or, failing that, to
    the decode instance) and still gives the greedy output, once, in order."""
    with _cluster(model_dir, prefill=2, decode=1, health_interval_s=0.5) as c:
        assert c.migrator is not None
        before = dict(c.migrator.counters)
        c.cordon("prefill-1")  # the group goes to prefill-0
        pid = c.pids()["prefill-0"]
        assert pid > 0
        os.kill(pid, signal.SIGSTOP)
        killed = False
        try:

            async def run() -> list[RequestOutput]:
                task = asyncio.create_task(_group(c, "dying"))
                await asyncio.sleep(1.0)  # sent to the stopped instance
                assert not task.done()
                c.uncordon("prefill-1")
                nonlocal killed
                os.kill(pid, signal.SIGKILL)
                killed = True
                return await task

            outs = asyncio.run(run())
        finally:
            if not killed:  # our own stopped process, never a recycled pid
                os.kill(pid, signal.SIGKILL)
        assert [o.token_ids for o in outs] == [expected] * N
        assert all(o.finish_reason == "length" for o in outs)
        counters = c.migrator.counters
        moved = sum(counters.get(k, 0) - before.get(k, 0) for k in ("to_prefill", "to_decode"))
        assert moved == N, counters
        assert counters["migration_failures"] == before.get("migration_failures", 0)
        deadline = time.monotonic() + 180
        while set(c.health().values()) != {"serving"}:
            assert time.monotonic() < deadline, f"not serving again: {c.health()}"
            time.sleep(0.5)
        wait_all_blocks_free(c)


def test_prompt_logprobs_on_a_colocated_instance(ray_session: None, model_dir: Path) -> None:
    """Colocated, the decode worker computes the prompt and sends its logprobs with the
    first token: the offline engine's rows."""
    asks = SamplingParams(max_tokens=3, temperature=0, ignore_eos=True, prompt_logprobs=2)
    offline = LLM(str(model_dir), device="cpu", num_kv_blocks=64)
    [want] = offline.generate(prompt_token_ids=[PROMPT], params=asks)
    assert want.prompt_logprobs is not None and len(want.prompt_logprobs) == len(PROMPT) - 1
    with _cluster(model_dir, mode="colocated", prefill=0, decode=1) as c:
        stream = c.submit(prompt_token_ids=PROMPT, params=asks)
        while not (out := stream.get(timeout=60)).finished:
            pass
        assert out.token_ids == want.token_ids
        got = out.prompt_logprobs
        assert got is not None and len(got) == len(want.prompt_logprobs)
        for g, w in zip(got, want.prompt_logprobs, strict=True):
            assert [(t, r) for t, _, r in g] == [(t, r) for t, _, r in w]
            assert all(abs(a[1] - b[1]) < 1e-4 for a, b in zip(g, w, strict=True))
        wait_all_blocks_free(c)
