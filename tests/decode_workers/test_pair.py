"""Prefill and decode workers together in one process (local transport): outputs equal
the offline engine's, the fallback recomputes, leases and aborts free every block."""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Iterator

import pytest

from engine import LLM, SamplingParams, llm_engine
from engine.llm_engine import LLMEngine
from engine.step import StepShape
from kv_transfer import TransferConfig
from tests.decode_workers.pair import Pair, final, make_engine, wait_until
from tests.prompts import text_prompts


@pytest.fixture(scope="module")
def engines() -> Iterator[tuple[LLMEngine, LLMEngine]]:
    yield make_engine(), make_engine()


@pytest.fixture(scope="module")
def offline() -> LLM:
    return LLM(None)


@pytest.fixture(autouse=True)
def _all_blocks_free(engines: tuple[LLMEngine, LLMEngine]) -> Iterator[None]:
    yield
    for engine in engines:
        # Workers are stopped by now; whatever a test leaked is still allocated.
        assert not engine.has_unfinished()
        assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


@pytest.fixture(scope="module")
def prompts(offline: LLM):  # type: ignore[no-untyped-def]
    return lambda n, seed=0: text_prompts(offline.engine.tokenizer, n, seed)


def test_greedy_outputs_equal_the_offline_engine(engines, offline, prompts) -> None:
    ids = prompts(8)
    params = [
        SamplingParams(max_tokens=random.Random(i).randrange(2, 24), temperature=0, ignore_eos=True)
        for i in range(8)
    ]
    expected = offline.generate(prompt_token_ids=ids, params=params)
    with Pair(*engines) as pair:
        got = pair.run(ids, params)
        stats = pair.decode.stats()
    assert [o.token_ids for o in got] == [o.token_ids for o in expected]
    assert [o.text for o in got] == [o.text for o in expected]
    assert [o.finish_reason for o in got] == ["length"] * 8
    assert stats.counters["pulls"] == 8 and stats.counters["recomputes"] == 0
    assert stats.counters["kv_bytes"] > 0
    # The loop's time around its steps holds the steps themselves, and they took time.
    assert stats.counters["steps"] > 0
    assert 0 < stats.counters["step_seconds"] < stats.counters["loop_seconds"]


def test_each_side_reports_its_steps_time_by_the_profile(engines) -> None:
    def cost(shape: StepShape) -> float:  # 1 ms per prompt token, 10 ms per decode
        return 1.0 * shape.prefill_tokens + 10.0 * shape.decode_batch

    rng = random.Random(11)  # token ids no other test sent: no prefix-cache hits
    ids = [[rng.randrange(1000, 20000) for _ in range(n)] for n in (17, 40, 33, 64)]
    params = [SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)] * 4
    with Pair(*engines, step_cost=cost) as pair:
        pair.run(ids, params)
        prefill, decode = pair.prefill.stats().counters, pair.decode.stats().counters
    assert prefill["profiled_seconds"] == pytest.approx(1e-3 * sum(map(len, ids)))
    # every decode step's batch, summed, is the tokens it advanced: 5 per request here
    assert decode["token_steps"] == 4 * 5
    assert decode["profiled_seconds"] == pytest.approx(10e-3 * 4 * 5)
    with Pair(*engines) as plain:  # no profile, no such counter
        assert "profiled_seconds" not in plain.decode.stats().counters


def test_seeded_sampling_continues_the_same_random_stream(engines, offline, prompts) -> None:
    ids = prompts(3, seed=1)
    params = [
        SamplingParams(max_tokens=12, temperature=0.9, top_p=0.95, seed=7 + i, ignore_eos=True)
        for i in range(3)
    ]
    expected = offline.generate(prompt_token_ids=ids, params=params)
    with Pair(*engines) as pair:
        got = pair.run(ids, params)
    assert [o.token_ids for o in got] == [o.token_ids for o in expected]


def test_failed_pull_falls_back_to_recompute_with_identical_output(
    engines, offline, prompts
) -> None:
    ids = prompts(4, seed=2)
    params = [SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)] * 4
    expected = offline.generate(prompt_token_ids=ids, params=params)
    transfer = TransferConfig(backend="local", fault_injection=1.0)
    with Pair(*engines, transfer=transfer) as pair:
        got = pair.run(ids, params)
        stats = pair.decode.stats()
        wait_until(lambda: pair.prefill.stats().counters["leases"] == 0)
    assert [o.token_ids for o in got] == [o.token_ids for o in expected]
    assert stats.counters["recomputes"] == 4 and stats.counters["pulls"] == 0


def test_first_token_that_finishes_never_leaves_the_prefill_side(engines, prompts) -> None:
    with Pair(*engines) as pair:
        out = pair.run(prompts(1, seed=3), [SamplingParams(max_tokens=1)])[0]
        stats = pair.prefill.stats()
    assert len(out.token_ids) == 1 and out.finish_reason == "length"
    assert stats.counters["handoffs"] == 0 and stats.counters["finished_at_prefill"] == 1


def test_unpulled_kv_is_freed_when_its_lease_expires(engines, prompts) -> None:
    handed: list[dict] = []
    with Pair(*engines, lease_ttl_s=0.3, hand_off=lambda _, h: handed.append(h)) as pair:
        stream = pair.submit("lost", prompts(1, seed=4)[0], SamplingParams(max_tokens=5))
        first = stream.get(timeout=60)
        assert first.token_ids and not first.finished
        wait_until(lambda: pair.prefill.stats().counters["expired_leases"] == 1)
        stats = pair.prefill.stats()
    assert len(handed) == 1 and stats.free_blocks == stats.total_blocks


def test_abort_mid_stream_frees_both_sides(engines, prompts) -> None:
    with Pair(*engines) as pair:
        stream = pair.submit(
            "long", prompts(1, seed=5)[0], SamplingParams(max_tokens=400, ignore_eos=True)
        )
        wait_until(lambda: len(pair.sink.events) >= 3, timeout_s=60)  # decoding by now
        pair.prefill.abort("long")
        pair.decode.abort("long")
        stream.finish("abort")
        out = final(stream)
        wait_until(lambda: pair.decode.stats().num_running == 0)
        stats = [pair.prefill.stats(), pair.decode.stats()]
    assert out.finish_reason == "abort" and len(out.token_ids) < 400
    assert all(s.free_blocks == s.total_blocks for s in stats)


def test_a_second_hand_off_of_one_request_is_released(engines, offline, prompts) -> None:
    """A prefill instance that hung, its request re-dispatched to another, wakes and hands
    off too: the decode side keeps one copy, releases the other, and the output is the
    offline engine's with every block free on both sides."""
    ids = prompts(1, seed=6)
    params = [SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)]
    expected = offline.generate(prompt_token_ids=ids, params=params)[0]
    with Pair(*engines, hand_off=lambda _, h: handed.append(h)) as pair:
        handed: list[dict] = []
        stream = pair.submit("twice", ids[0], params[0])
        wait_until(lambda: len(handed) == 1, timeout_s=60)
        pair.decode.add_handoff(handed[0])
        pair.decode.add_handoff(dict(handed[0]))
        out = final(stream)
        wait_until(lambda: pair.prefill.stats().counters["leases"] == 0)
        wait_until(lambda: pair.decode.stats().num_running == 0)
    assert out.token_ids == expected.token_ids


def test_a_resumed_request_does_not_ask_for_its_prompt_logprobs_again(
    engines, offline, prompts, monkeypatch
):
    # A migrated request's prompt logprobs went out with its first token on the prefill
    # side; the decode instance that resumes it only continues the output, even one
    # that cannot compute them (a TP/PP instance: its runner is not a ModelRunner).
    monkeypatch.setattr(llm_engine, "ModelRunner", type("OtherRunner", (), {}))
    ids = prompts(1, seed=5)[0]
    plain = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    expected = offline.generate(prompt_token_ids=[ids], params=[plain])[0]
    asked = dataclasses.replace(plain, prompt_logprobs=2)
    with Pair(*engines) as pair:
        pair.decode.resume("resumed", ids, expected.token_ids[:3], asked)
        events = pair.sink.events
        wait_until(lambda: any(e.finish_reason for e in events), timeout_s=120)
    assert [e.error for e in events] == [None] * len(events)
    assert [t for e in events for t in e.token_ids] == expected.token_ids[3:]
    assert [e.prompt_logprobs for e in events] == [None] * len(events)
