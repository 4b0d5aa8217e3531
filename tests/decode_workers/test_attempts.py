"""A request may come back to an instance it was aborted on (``engine.worker_loop``'s
``Tombstones``): a newer copy (a higher attempt) runs there, a late call for an aborted
copy does not. The prefill and decode workers wired as the cluster wires them
(``tests.decode_workers.pair``), on a tiny random model, so this runs in seconds."""

from __future__ import annotations

import threading
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


def test_a_late_resume_of_an_older_copy_leaves_a_newer_one_running(pair: Pair) -> None:
    """The resume of attempt 0 comes in after the request moved on and back (attempt 1)."""
    resumes = pair.decode.stats().counters["resumes"]
    stream = _listen(pair, "resumed-twice", None)
    pair.decode.resume("resumed-twice", IDS, [], LONG, attempt=1)
    stream.get(timeout=30)  # its first token: running
    pair.decode.resume("resumed-twice", IDS, [], LONG, attempt=0)
    assert pair.decode.stats().counters["resumes"] == resumes + 1  # runs after the resume
    out = final(stream, 30)
    assert (out.finish_reason, len(out.token_ids)) == ("length", LONG.max_tokens)
    stats = pair.decode.stats()
    assert (stats.num_running, stats.num_waiting) == (0, 0)  # no second copy runs


def _leased(
    pair: Pair, monkeypatch: pytest.MonkeyPatch, request_id: str, attempt: int
) -> tuple[list[dict[str, Any]], RequestStream]:
    """Prefill a copy and hold its hand-off back (the KV stays leased), and every later
    one; returns the hand-offs and the request's stream."""
    handoffs: list[dict[str, Any]] = []
    monkeypatch.setattr(pair.prefill, "hand_off", lambda _, h: handoffs.append(h))
    stream = _listen(pair, request_id, "prefill-0")
    pair.prefill.add_request(request_id, IDS, PARAMS, "decode-0", attempt=attempt)
    wait_until(lambda: handoffs)
    return handoffs, stream


def _pulled(pair: Pair, handoff: dict[str, Any], stream: RequestStream) -> None:
    """Deliver the hand-off: the request finishes, its lease is released, and the prefill
    side ends with nothing leased and every block free (each freed once) and its loop up."""
    pulls = pair.decode.stats().counters["pulls"]
    pair.decode.add_handoff(handoff)
    out = final(stream, 30)
    assert (out.finish_reason, len(out.token_ids)) == ("length", 5)
    assert pair.decode.stats().counters["pulls"] == pulls + 1  # the KV was published
    wait_until(lambda: pair.prefill.stats().counters["leases"] == 0)
    stats = pair.prefill.stats()
    assert stats.counters["leased_blocks"] == 0
    assert stats.free_blocks == stats.total_blocks
    assert pair.prefill.loop.alive and pair.prefill.loop.error is None


def test_a_newer_copy_prefilled_while_an_older_ones_kv_is_leased_supersedes_it(
    pair: Pair, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The request was re-dispatched back here (attempt 1) while the KV of the copy it
    left here (attempt 0) is still leased, its abort not in yet: the newer copy's lease
    replaces the older one's, whose blocks are freed, and its hand-off is pulled."""
    handoffs, stream = _leased(pair, monkeypatch, "leased-twice", 0)
    pair.prefill.add_request("leased-twice", IDS, PARAMS, "decode-0", attempt=1)
    wait_until(lambda: len(handoffs) == 2)
    assert [h["attempt"] for h in handoffs] == [0, 1]
    assert pair.prefill.stats().counters["leases"] == 1
    pair.prefill.abort("leased-twice", 0)  # late: leaves the newer lease alone
    _pulled(pair, handoffs[1], stream)


def test_a_late_abort_of_an_older_copy_ends_its_lease_beside_a_newer_queued_one(
    pair: Pair, monkeypatch: pytest.MonkeyPatch
) -> None:
    handoffs, stream = _leased(pair, monkeypatch, "queued-over", 0)
    # The newer copy and the abort reach the loop together, before it steps again.
    leases: list[int] = []
    held = threading.Event()
    pair.prefill.loop.post(held.wait, 30)
    pair.prefill.add_request("queued-over", IDS, PARAMS, "decode-0", attempt=1)
    pair.prefill.abort("queued-over", 0)
    pair.prefill.loop.post(lambda: leases.append(len(pair.prefill.leases)))
    held.set()
    wait_until(lambda: len(handoffs) == 2)
    assert leases == [0]  # the older copy's lease ended at its abort
    _pulled(pair, handoffs[1], stream)


def test_a_late_add_of_an_older_copy_leaves_a_newer_ones_kv_leased(
    pair: Pair, monkeypatch: pytest.MonkeyPatch
) -> None:
    handoffs, stream = _leased(pair, monkeypatch, "added-late", 1)
    pair.prefill.add_request("added-late", IDS, PARAMS, "decode-0", attempt=0)
    stats = pair.prefill.stats()  # runs after the add
    assert (stats.num_running, stats.num_waiting, stats.counters["leases"]) == (0, 0, 1)
    _pulled(pair, handoffs[0], stream)
    assert len(handoffs) == 1


def test_a_late_release_of_an_older_copys_kv_leaves_a_newer_ones_leased(
    pair: Pair, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A decode instance releasing the hand-off of the copy the request left (attempt 0:
    a late, tombstoned hand-off) does not end the lease of the copy leased here now."""
    handoffs, stream = _leased(pair, monkeypatch, "released-late", 1)
    pair.prefill.release("released-late", 0)
    assert pair.prefill.stats().counters["leases"] == 1  # runs after the release
    _pulled(pair, handoffs[0], stream)  # pulled, not recomputed


def test_a_release_of_the_leased_copy_ends_its_lease(
    pair: Pair, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, stream = _leased(pair, monkeypatch, "released", 1)
    pair.prefill.release("released", 1)
    stats = pair.prefill.stats()
    assert (stats.counters["leases"], stats.counters["leased_blocks"]) == (0, 0)
    assert stats.free_blocks == stats.total_blocks
    pair.prefill.abort("released", 1)
    pair.decode.abort("released", 1)


def test_a_late_hand_off_of_an_older_copy_leaves_a_newer_one_pending(
    pair: Pair, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two hand-offs of one request wait on the decode side, the newer copy's (attempt 1)
    first: the older one's is released (which leaves the newer lease) and the newer one's
    KV is pulled, not recomputed."""
    handoffs, stream = _leased(pair, monkeypatch, "handed-late", 1)
    older = {**handoffs[0], "attempt": 0}  # as the copy the request left would send it
    before = pair.decode.stats().counters
    held = threading.Event()
    pair.decode.loop.post(held.wait, 30)  # both reach the loop before it admits either
    pair.decode.add_handoff(handoffs[0])
    pair.decode.add_handoff(older)
    held.set()
    out = final(stream, 30)
    assert (out.finish_reason, len(out.token_ids)) == ("length", 5)
    after = pair.decode.stats().counters
    assert after["pulls"] == before["pulls"] + 1
    assert after["recomputes"] == before["recomputes"]
    wait_until(lambda: pair.prefill.stats().counters["leases"] == 0)
    assert pair.prefill.stats().free_blocks == pair.prefill.stats().total_blocks
