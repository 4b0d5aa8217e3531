"""The cluster on a real local Ray: instances as actors, KV over real transports, token
events over ZeroMQ. Greedy outputs must equal the offline engine's token for token, and
every instance must end each test with all its KV blocks free."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Iterator
from typing import Any

import pytest
import ray

from cluster import Cluster
from cluster.planner.latency import LatencyProfile, ProfileSet
from engine import LLM, SamplingParams
from engine.outputs import RequestOutput
from tests.prompts import text_prompts

# A made-up profile: 1 ms per prompt token, 10 ms per decode in a step.
PROFILES = ProfileSet({(1, 1): LatencyProfile(1, 1, (0, 1, 0), (0, 0, 10), (0, 0, 10))})
# name -> Cluster keyword arguments
LAYOUTS: dict[str, dict[str, Any]] = {
    "torch": dict(transport="torch", profiles=PROFILES),
    "grpc": dict(transport="grpc"),
    "colocated": dict(mode="colocated", prefill=1, decode=1, profiles=PROFILES),
    "torch-2x2": dict(transport="torch", prefill=2, decode=2),
}
NUM_REQUESTS = 32


@pytest.fixture(scope="module")
def workload(offline: LLM) -> tuple[list[list[int]], list[SamplingParams], list[RequestOutput]]:
    ids = text_prompts(offline.engine.tokenizer, NUM_REQUESTS)
    rng = random.Random(0)
    params = [
        SamplingParams(max_tokens=rng.randrange(2, 20), temperature=0, ignore_eos=True) for _ in ids
    ]
    return ids, params, offline.generate(prompt_token_ids=ids, params=params)


@pytest.fixture(scope="module", params=list(LAYOUTS))
def cluster(request: pytest.FixtureRequest, ray_session: None) -> Iterator[Cluster]:
    with Cluster(num_kv_blocks=512, cpus_per_instance=1, **LAYOUTS[request.param]) as c:
        yield c


def wait_all_blocks_free(cluster: Cluster, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        stats = cluster.stats()
        busy = {
            s.name: s.total_blocks - s.free_blocks for s in stats if s.free_blocks != s.total_blocks
        }
        if not busy:
            return
        assert time.monotonic() < deadline, f"KV blocks still in use: {busy}"
        time.sleep(0.1)


@pytest.fixture(autouse=True)
def _blocks_back(request: pytest.FixtureRequest) -> Iterator[None]:
    yield
    if "cluster" in request.fixturenames:
        wait_all_blocks_free(request.getfixturevalue("cluster"))


async def last_output(cluster: Cluster, ids: list[int], params: SamplingParams) -> RequestOutput:
    """One request streamed to its end; its final output."""
    last = None
    async for out in cluster.stream(prompt_token_ids=ids, params=params):
        last = out
    assert last is not None
    return last


def stream_concurrently(
    cluster: Cluster, ids: list[list[int]], params: list[SamplingParams]
) -> list[RequestOutput]:
    """Every prompt streamed at once; each stream's final output."""

    async def run_all() -> list[RequestOutput]:
        return await asyncio.gather(
            *(last_output(cluster, i, p) for i, p in zip(ids, params, strict=True))
        )

    return asyncio.run(run_all())


def test_concurrent_streams_equal_the_offline_engine(cluster: Cluster, workload) -> None:
    ids, params, expected = workload
    got = stream_concurrently(cluster, ids, params)
    assert [o.token_ids for o in got] == [o.token_ids for o in expected]
    assert [o.text for o in got] == [o.text for o in expected]
    assert all(o.finish_reason == "length" for o in got)
    stats = cluster.stats()
    if cluster.mode == "disaggregated":
        pulls = sum(s.counters.get("pulls", 0) for s in stats)
        assert pulls == sum(1 for p in params if p.max_tokens > 1)
        assert all(s.counters.get("recomputes", 0) == 0 for s in stats)
    if cluster.role_profiles:  # each instance timed its steps by the profile too
        for s in stats:
            assert s.counters["profiled_seconds"] > 0
            if s.role == "decode":  # decode steps only: 10 ms per token advanced
                assert s.counters["profiled_seconds"] == pytest.approx(
                    0.010 * s.counters["token_steps"]
                )
            if s.role == "prefill":  # at most every prompt token (some hit the cache)
                assert s.counters["profiled_seconds"] <= 1e-3 * sum(map(len, ids)) + 1e-9
    if len(cluster.instances) == 4:  # the 2 + 2 layout spreads the load
        assert all(
            s.counters.get("handoffs", 0) > 0 or s.counters.get("pulls", 0) > 0 for s in stats
        )


def test_abort_mid_stream_frees_kv_on_every_instance(cluster: Cluster, offline: LLM) -> None:
    ids = text_prompts(offline.engine.tokenizer, 1, seed=9)[0]
    params = SamplingParams(max_tokens=500, temperature=0, ignore_eos=True)

    async def read_three() -> list[RequestOutput]:
        seen = []
        async for out in cluster.stream(prompt_token_ids=ids, params=params):
            seen.append(out)
            if len(seen) == 3:
                break  # leaving the loop aborts the request everywhere
        return seen

    seen = asyncio.run(read_three())
    assert len(seen) == 3 and not seen[-1].finished
    # _blocks_back then waits for every instance to free the request's blocks.


def test_bad_requests_are_refused_by_name_and_the_cluster_keeps_serving(
    cluster: Cluster, offline: LLM
) -> None:
    with pytest.raises(ValueError, match="prompt"):
        cluster.submit(prompt_token_ids=[])
    with pytest.raises(ValueError, match="max_tokens"):
        cluster.submit(prompt_token_ids=[1, 2, 3], params=SamplingParams(max_tokens=10**6))
    with pytest.raises(ValueError, match="prompt_token_ids"):
        cluster.submit(prompt_token_ids=[-5])
    out = cluster.generate(["Hello"], SamplingParams(max_tokens=3, temperature=0, ignore_eos=True))
    assert len(out[0].token_ids) == 3


def test_failed_pulls_fall_back_to_recompute_with_identical_output(
    ray_session: None, workload
) -> None:
    ids, params, expected = workload
    n = 8
    with Cluster(num_kv_blocks=512, cpus_per_instance=1, fault_injection=1.0) as c:
        got = c.generate(prompt_token_ids=ids[:n], params=params[:n])
        stats = {s.name: s for s in c.stats()}
        wait_all_blocks_free(c)
    assert [o.token_ids for o in got] == [o.token_ids for o in expected[:n]]
    assert stats["decode-0"].counters["recomputes"] == sum(
        1 for p in params[:n] if p.max_tokens > 1
    )
    assert stats["decode-0"].counters["pulls"] == 0


def test_an_instance_ray_restarts_is_started_again_and_serves(ray_session: None) -> None:
    with Cluster(num_kv_blocks=256, cpus_per_instance=1, health_interval_s=0.5) as c:
        params = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
        before = c.generate(["The river"], params)[0]
        decode = next(i for i in c.instances if i.spec.role == "decode")
        ray.kill(decode.actor, no_restart=False)  # the process dies; Ray starts a new one
        deadline = time.monotonic() + 120
        while c.health().get(decode.name) != "serving" or not _restarted(c, decode.name):
            assert time.monotonic() < deadline, f"not serving again: {c.health()}"
            time.sleep(0.2)
        after = c.generate(["The river"], params)[0]
        assert after.token_ids == before.token_ids
        wait_all_blocks_free(c)


def _restarted(cluster: Cluster, name: str) -> bool:
    # A fresh instance has served nothing yet (or just the one request after restart).
    stats = {s.name: s for s in cluster.stats()}
    return name in stats and stats[name].counters["pulls"] == 0
