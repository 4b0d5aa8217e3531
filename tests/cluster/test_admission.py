"""Admission while no decode instance serves, and a worker loop that dies in a live
process, on a real 1 prefill + 1 decode cluster (local Ray, the real model): the only
decode instance is stopped (SIGSTOP) or its loop crashed, and requests sent meanwhile
wait for it (``cluster.admission``) instead of being refused, or fail once the
admission timeout passed, or leave nothing behind when their client goes away."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections.abc import Iterator

import pytest
import ray

from cluster import Cluster
from cluster.admission import NoInstanceServing
from engine import LLM, SamplingParams
from engine.outputs import RequestOutput
from tests.cluster.test_cluster import last_output, wait_all_blocks_free
from tests.prompts import text_prompts


def _greedy(
    offline: LLM, n: int, max_tokens: int
) -> tuple[list[list[int]], SamplingParams, list[RequestOutput]]:
    """``n`` prompts, greedy parameters for ``max_tokens`` tokens, and the offline
    engine's outputs for them (what the cluster must answer)."""
    ids = text_prompts(offline.engine.tokenizer, n)
    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    return ids, params, offline.generate(prompt_token_ids=ids, params=params)


def _decode(cluster: Cluster) -> tuple[str, int]:
    name = next(i.name for i in cluster.instances if i.spec.role == "decode")
    pid = cluster.pids()[name]
    assert pid > 0  # never signal pid 0
    return name, pid


def _serving_decode(cluster: Cluster) -> tuple[str, int]:
    """The decode instance's name and pid, once it serves (a test before may have left it
    restarting)."""
    _wait_health(cluster, _decode(cluster)[0], {"serving"})
    return _decode(cluster)


def _wait_health(cluster: Cluster, name: str, want: set[str], timeout_s: float = 240.0) -> None:
    deadline = time.monotonic() + timeout_s
    while cluster.health().get(name) not in want:
        assert time.monotonic() < deadline, f"{name}: {cluster.health()}"
        time.sleep(0.1)


@contextlib.contextmanager
def _stopped(pid: int) -> Iterator[None]:
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(pid, signal.SIGCONT)


def test_a_request_waits_for_the_only_decode_instance_to_come_back(
    one_each: Cluster, offline: LLM
) -> None:
    ids, params, expected = _greedy(offline, 2, max_tokens=12)
    name, pid = _serving_decode(one_each)

    async def run() -> list[RequestOutput]:
        with _stopped(pid):
            await asyncio.to_thread(_wait_health, one_each, name, {"unresponsive"})
            tasks = [asyncio.create_task(last_output(one_each, i, params)) for i in ids]
            # The loop stays free while they wait: this sleep returns on time.
            t = time.monotonic()
            await asyncio.sleep(1.0)
            assert time.monotonic() - t < 1.5
            assert not any(task.done() for task in tasks)
            assert one_each.requests() == []  # nothing registered while waiting
        return list(await asyncio.gather(*tasks))

    outs = asyncio.run(run())
    assert [o.token_ids for o in outs] == [e.token_ids for e in expected]
    assert [o.finish_reason for o in outs] == ["length", "length"]
    wait_all_blocks_free(one_each)


def test_past_the_admission_timeout_it_fails_clearly_and_a_cancelled_wait_leaves_nothing(
    one_each: Cluster, offline: LLM
) -> None:
    ids = text_prompts(offline.engine.tokenizer, 1)[0]
    params = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
    name, pid = _serving_decode(one_each)
    old = one_each.admission_timeout_s
    one_each.admission_timeout_s = 1.0

    async def run() -> float:
        with _stopped(pid):
            await asyncio.to_thread(_wait_health, one_each, name, {"unresponsive"})
            t = time.monotonic()
            with pytest.raises(NoInstanceServing, match="no instance is serving.*waited 1 s"):
                await last_output(one_each, ids, params)
            waited = time.monotonic() - t
            one_each.admission_timeout_s = 60.0
            task = asyncio.create_task(last_output(one_each, ids, params))
            await asyncio.sleep(0.3)
            task.cancel()  # the client went away while it waited
            with pytest.raises(asyncio.CancelledError):
                await task
            assert one_each.requests() == []
        return waited

    try:
        waited = asyncio.run(run())
    finally:
        one_each.admission_timeout_s = old
    assert 1.0 <= waited < 10.0  # the bound, not a speed target: it did not wait forever
    _wait_health(one_each, name, {"serving"})
    assert one_each.requests() == []
    wait_all_blocks_free(one_each)


def test_a_dead_worker_loop_in_a_live_process_is_restarted_and_its_requests_migrate(
    one_each: Cluster, offline: LLM
) -> None:
    ids, params, expected = _greedy(offline, 4, max_tokens=40)
    name, pid = _serving_decode(one_each)
    actor = next(i.actor for i in one_each.instances if i.name == name)
    assert one_each.migrator is not None
    before = one_each.migrator.counters["migrations_crashed"]

    async def run() -> list[RequestOutput]:
        tasks = [asyncio.create_task(last_output(one_each, i, params)) for i in ids]
        while not any(r["tokens"] > 2 for r in one_each.requests()):
            await asyncio.sleep(0.05)
        assert await actor.crash_loop.remote()
        return list(await asyncio.gather(*tasks))

    outs = asyncio.run(run())
    assert [o.token_ids for o in outs] == [e.token_ids for e in expected]
    assert one_each.migrator.counters["migrations_crashed"] > before
    _wait_health(one_each, name, {"serving"})
    assert one_each.pids()[name] != pid  # a new process
    assert ray.get(actor.ping.remote())["loop"]
    wait_all_blocks_free(one_each)
