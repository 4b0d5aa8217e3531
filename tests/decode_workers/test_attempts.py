"""A request may come back to an instance it was aborted on (``engine.worker_loop``'s
``Tombstones``): a newer copy (a higher attempt) runs there, a late call for an aborted
copy does not. The prefill and decode workers wired as the cluster wires them
(``tests.decode_workers.pair``), on a tiny random model, so this runs in seconds."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from cluster.stream import RequestStream, RequestTrace
from engine.config import CacheConfig, EngineConfig
from engine.llm_engine import LLMEngine
from engine.sampling_params import SamplingParams
from tests.decode_workers.pair import Pair, final, wait_until
from tests.engine.helpers import make_tiny_model_dir

PARAMS = SamplingParams(max_tokens=5, temperature=0, ignore_eos=True)
# Long enough that a call made on its first token lands while it runs.
LONG = SamplingParams(max_tokens=32, temperature=0, ignore_eos=True)
IDS = [5, 17, 42, 99, 7, 63, 12]


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pair]:
    model = make_tiny_model_dir(tmp_path_factory.mktemp("tiny") / "llama", "llama")
    config = EngineConfig(model=str(model), cache=CacheConfig(num_blocks=64))
    engines = LLMEngine.from_config(config), LLMEngine.from_config(config)
    with Pair(*engines) as p:
        yield p
    for engine in engines:
        assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def _listen(pair: Pair, request_id: str, prefill: str | None) -> RequestStream:
    stream = RequestStream(request_id, IDS, RequestTrace(prefill, "decode-0", 0.0))
    pair.sink.streams[request_id] = stream
    return stream


def test_a_request_resumed_where_it_was_aborted_before_runs(pair: Pair) -> None:
    """All prefill instances lost: the request fell back to another decode instance and
    its first destination, this one, was told to abort it; then that other instance was
    lost too, and the request came back here (attempt 2)."""
    stream = _listen(pair, "back", None)
    pair.decode.abort("back", 1)
    pair.decode.resume("back", IDS, [], PARAMS, attempt=2)
    out = final(stream, 30)
    assert (out.finish_reason, len(out.token_ids)) == ("length", 5)


def test_a_late_resume_of_an_aborted_copy_is_dropped(pair: Pair) -> None:
    resumes = pair.decode.stats().counters["resumes"]
    pair.decode.abort("late", 2)
    pair.decode.resume("late", IDS, [], PARAMS, attempt=2)
    assert pair.decode.stats().counters["resumes"] == resumes  # stats() runs after it


def test_a_request_re_dispatched_to_a_prefill_instance_it_left_runs(pair: Pair) -> None:
    stream = _listen(pair, "again", "prefill-0")
    pair.prefill.abort("again", 0)
    pair.prefill.add_request("again", IDS, PARAMS, "decode-0", attempt=1)
    out = final(stream, 30)
    assert (out.finish_reason, len(out.token_ids)) == ("length", 5)


def test_a_hand_off_of_an_aborted_copy_is_released_a_newer_ones_is_pulled(pair: Pair) -> None:
    """The decode side hears of the abort before the prefill side (another sender)."""
    pulls = pair.decode.stats().counters["pulls"]
    _listen(pair, "stale", "prefill-0")
    pair.decode.abort("stale", 1)
    pair.prefill.add_request("stale", IDS, PARAMS, "decode-0", attempt=1)
    wait_until(lambda: "stale" in pair.peers.releases)
    assert pair.decode.stats().counters["pulls"] == pulls
    wait_until(lambda: pair.prefill.stats().counters["leases"] == 0)

    stream = _listen(pair, "newer", "prefill-0")
    pair.decode.abort("newer", 1)
    pair.prefill.add_request("newer", IDS, PARAMS, "decode-0", attempt=2)
    out = final(stream, 30)
    assert (out.finish_reason, len(out.token_ids)) == ("length", 5)
    assert pair.decode.stats().counters["pulls"] == pulls + 1


def test_a_late_abort_of_an_older_copy_leaves_a_newer_one_running(pair: Pair) -> None:
    """The request migrated back here (attempt 1) and runs when the abort of the copy it
    left here before (attempt 0) comes in: Ray does not order the two calls."""
    stream = _listen(pair, "overtaken", None)
    pair.decode.resume("overtaken", IDS, [], LONG, attempt=1)
    stream.get(timeout=30)  # its first token: running
    pair.decode.abort("overtaken", 0)
    out = final(stream, 30)
    assert (out.finish_reason, len(out.token_ids)) == ("length", LONG.max_tokens)


def test_an_abort_of_the_running_copy_drops_it(pair: Pair) -> None:
    stream = _listen(pair, "ended", None)
    pair.decode.resume("ended", IDS, [], LONG, attempt=1)
    stream.get(timeout=30)
    pair.decode.abort("ended", 1)
    stats = pair.decode.stats()  # runs after the abort
    assert (stats.num_running, stats.num_waiting) == (0, 0)
    assert not stream.finished


def test_a_late_abort_of_an_older_copy_leaves_a_newer_one_queued_on_prefill(pair: Pair) -> None:
    stream = _listen(pair, "requeued", "prefill-0")
    pair.prefill.add_request("requeued", IDS, PARAMS, "decode-0", attempt=1)
    pair.prefill.abort("requeued", 0)
    out = final(stream, 30)
    assert (out.finish_reason, len(out.token_ids)) == ("length", 5)


def test_a_late_abort_of_an_older_copy_leaves_a_newer_ones_kv_leased(
    pair: Pair, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The abort comes in while the newer copy's hand-off is on its way to decode."""
    counters = pair.decode.stats().counters
    handoffs: list[dict[str, Any]] = []
    monkeypatch.setattr(pair.prefill, "hand_off", lambda _, h: handoffs.append(h))
    stream = _listen(pair, "leased", "prefill-0")
    pair.prefill.add_request("leased", IDS, PARAMS, "decode-0", attempt=1)
    wait_until(lambda: handoffs)
    pair.prefill.abort("leased", 0)
    assert pair.prefill.stats().counters["leases"] == 1  # runs after the abort
    pair.decode.add_handoff(handoffs[0])
    out = final(stream, 30)
    assert (out.finish_reason, len(out.token_ids)) == ("length", 5)
    after = pair.decode.stats().counters
    assert after["pulls"] == counters["pulls"] + 1  # the KV was there, not recomputed
    assert after["recomputes"] == counters["recomputes"]


def test_a_late_abort_of_an_older_copy_leaves_a_newer_groups_child_running(pair: Pair) -> None:
    """A sequence group's children hold the attempt of the hand-off they were forked off."""
    kids = {kid: _listen(pair, kid, "prefill-0") for kid in ("kid-0", "kid-1")}
    children = [(kid, LONG) for kid in kids]
    pair.prefill.add_request("kids", IDS, LONG, "decode-0", children=children, attempt=1)
    for stream in kids.values():
        stream.get(timeout=30)  # the first token, from prefill
        stream.get(timeout=30)  # the second, from decode: running there
    pair.decode.abort("kid-0", 0)
    pair.decode.abort("kid-1", 1)
    out = final(kids["kid-0"], 30)
    assert (out.finish_reason, len(out.token_ids)) == ("length", LONG.max_tokens)
    assert not kids["kid-1"].finished
