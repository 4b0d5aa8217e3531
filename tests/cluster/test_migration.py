"""Migrator bookkeeping, alone: where a lost instance's requests go. The instances are
fakes of the actor handles (each call recorded, answered at once); the real path runs
in tests/cluster/test_chaos.py."""

from __future__ import annotations

from concurrent.futures import Future
from typing import Any

from cluster.dispatch import InstanceLoad
from cluster.migration import Migrator, Target, pick_decode, pick_prefill
from cluster.stream import RequestStream, RequestTrace
from engine.events import TokenEvent
from engine.worker_loop import Tombstones


class FakeCall:
    def __init__(self, actor: FakeActor, method: str):
        self.actor, self.method = actor, method

    def remote(self, *args: Any, **kwargs: Any) -> FakeCall:
        self.actor.calls.append((self.method, args, kwargs))
        return self

    def future(self) -> Future[Any]:
        f: Future[Any] = Future()
        if self.actor.hold:  # answered later, by the test
            self.actor.held.append(f)
            return f
        f.set_result(self.actor.replies.pop(0) if self.actor.replies else {"prompt_token_ids": [1]})
        return f


class FakeActor:
    def __init__(self) -> None:
        self.calls: list[tuple[str, tuple[Any, ...], dict[str, Any]]] = []
        self.replies: list[dict[str, Any]] = []
        self.hold = False
        self.held: list[Future[Any]] = []

    def __getattr__(self, method: str) -> FakeCall:
        return FakeCall(self, method)


LOADS = [
    InstanceLoad("prefill-0", "prefill", queued_prompt_tokens=50),
    InstanceLoad("prefill-1", "prefill", queued_prompt_tokens=10),
    InstanceLoad("prefill-2", "prefill", queued_prompt_tokens=30),
    InstanceLoad("decode-0", "decode", active=3, free_blocks=100, total_blocks=100),
    InstanceLoad("decode-1", "decode", active=1, free_blocks=100, total_blocks=100),
]


class Setup:
    def __init__(self, live: set[str]):
        self.actors = {x.name: FakeActor() for x in LOADS}
        self.live = live
        self.streams: dict[str, RequestStream] = {}
        self.aborted: list[tuple[str, str, int]] = []  # (instance, request, up to attempt)
        self.failed: list[str] = []
        loads = lambda: [x for x in LOADS if x.name in self.live]  # noqa: E731
        self.migrator = Migrator(
            lambda: self.streams,
            lambda ex: self._target(pick_decode(loads(), ex)),
            lambda name, rid, attempt: self.aborted.append((name, rid, attempt)),
            lambda rid, msg: self.failed.append(rid),
            pick_prefill=lambda ex: self._target(pick_prefill(loads(), ex)),
        )

    def _target(self, name: str | None) -> Target | None:
        return None if name is None else Target(name, self.actors[name])

    def stream(self, rid: str, prefill: str, decode: str, tokens: int = 0) -> RequestStream:
        s = RequestStream(rid, [1, 2, 3], RequestTrace(prefill, decode, 0.0))
        s.resubmit = dict(prompt=None, prompt_token_ids=[1, 2, 3], messages=None, params={})
        for i in range(tokens):
            s.push(TokenEvent(rid, i, [10 + i], source=prefill if i == 0 else decode))
        self.streams[rid] = s
        return s


def test_unstarted_prefills_go_to_another_prefill_instance() -> None:
    t = Setup(live={"prefill-1", "prefill-2", "decode-0", "decode-1"})
    s = t.stream("r", "prefill-0", "decode-0")
    assert t.migrator.lost("prefill-0", "dead") == 1
    # The least queued live prefill instance, handing off to the least busy decode one.
    assert t.actors["prefill-1"].calls == [
        ("add_request", ("r", None, [1, 2, 3], {}, "decode-1", None), {"attempt": 1})
    ]
    assert s.trace.prefill == "prefill-1" and s.trace.decode == "decode-1"
    assert t.aborted == [("prefill-0", "r", 0)]
    c = t.migrator.counters
    assert (c["migrations_dead"], c["to_prefill"], c["to_decode"], c["prefill_fallbacks"]) == (
        1, 1, 0, 0,
    )  # fmt: skip
    # The dead instance's late first token is ignored; the new one's is taken.
    s.push(TokenEvent("r", 0, [99], source="prefill-0"))
    assert s._out.token_ids == []
    s.push(TokenEvent("r", 0, [10], source="prefill-1"))
    s.push(TokenEvent("r", 1, [11], source="decode-1"))
    assert s._out.token_ids == [10, 11]


def test_without_a_live_prefill_instance_decode_recomputes() -> None:
    t = Setup(live={"decode-0", "decode-1"})
    t.stream("r", "prefill-0", "decode-0")
    assert t.migrator.lost("prefill-0", "dead") == 1
    assert t.actors["decode-1"].calls == [
        ("resume_request", ("r", None, [1, 2, 3], [], {}, None), {"attempt": 1})
    ]
    c = t.migrator.counters
    assert (c["to_prefill"], c["to_decode"], c["prefill_fallbacks"]) == (0, 1, 1)


def test_handed_off_requests_resume_on_decode_and_later_ones_stay() -> None:
    t = Setup(live={"prefill-1", "decode-0", "decode-1"})
    t.stream("handed-off", "prefill-0", "decode-0", tokens=1)
    t.stream("decoding", "prefill-0", "decode-0", tokens=3)
    assert t.migrator.lost("prefill-0", "dead") == 1
    assert t.actors["prefill-1"].calls == []
    assert [(m, a[0], a[3]) for m, a, _ in t.actors["decode-1"].calls] == [
        ("resume_request", "handed-off", [10])
    ]
    assert t.streams["decoding"].migrations == 0


def test_a_refusing_prefill_instance_is_passed_over() -> None:
    t = Setup(live={"prefill-1", "prefill-2", "decode-0", "decode-1"})
    t.actors["prefill-1"].replies = [{"error": "restarting", "retry": True}]
    s = t.stream("r", "prefill-0", "decode-0")
    t.migrator.lost("prefill-0", "hung")
    assert [m for m, _, _ in t.actors["prefill-1"].calls] == ["add_request"]
    assert [m for m, _, _ in t.actors["prefill-2"].calls] == ["add_request"]
    assert s.trace.prefill == "prefill-2" and s.migrations == 2
    assert t.migrator.counters["migrations_hung"] == 2 and not t.failed


def test_a_request_moved_already_is_not_moved_twice() -> None:
    """The health round and the refused first call may both see the same lost request."""
    t = Setup(live={"prefill-1", "prefill-2", "decode-0", "decode-1"})
    s = t.stream("r", "prefill-0", "decode-0")
    assert t.migrator.redispatch(s, "dead", {"prefill-0"})
    assert not t.migrator.redispatch(s, "unavailable", {"prefill-0"})
    assert sum(len(a.calls) for a in t.actors.values()) == 1
    assert s.migrations == 1


def test_the_migration_limit_ends_the_request() -> None:
    t = Setup(live={"prefill-1", "decode-1"})
    t.migrator.limit = 1
    s = t.stream("r", "prefill-0", "decode-0")
    t.migrator.lost("prefill-0", "dead")
    t.migrator.lost("prefill-1", "dead")
    assert t.failed == ["r"] and s.migrations == 1
    assert t.migrator.counters["migration_failures"] == 1


def test_a_request_back_on_an_instance_it_left_is_a_newer_copy_there() -> None:
    """Both prefill instances lost at once (the CI hang): the request falls back to the
    decode instance other than its destination, which is told to abort it; that one is
    then lost too, and the request goes back to its first destination. That instance
    must take it: the abort it had ends older copies only (``Tombstones``)."""
    t = Setup(live={"decode-0", "decode-1"})
    s = t.stream("r", "prefill-0", "decode-0")
    t.migrator.lost("prefill-0", "hung")
    assert s.trace.decode == "decode-1"
    t.live = {"decode-0"}
    t.migrator.lost("decode-1", "dead")
    assert s.trace.decode == "decode-0" and not t.failed
    tombstones = Tombstones()  # decode-0's
    for name, rid, attempt in t.aborted:
        if name == "decode-0":
            tombstones.add(rid, attempt)
    [(method, _, kwargs)] = t.actors["decode-0"].calls
    assert method == "resume_request" and not tombstones.covers("r", kwargs["attempt"])
    assert tombstones.covers("r", 0)  # its late hand-off from prefill-0 is still dropped


def test_tombstones_keep_the_newest_attempt_aborted_until_they_expire() -> None:
    now = [0.0]
    tombstones = Tombstones(ttl_s=10.0, clock=lambda: now[0])
    tombstones.add("r", 2)
    tombstones.add("r", 1)  # a late abort of an older copy
    assert tombstones.covers("r", 2) and not tombstones.covers("r", 3)
    now[0] = 11.0
    assert not tombstones.covers("r", 0)


def test_a_late_refusal_from_an_instance_the_request_left_moves_nothing() -> None:
    """decode-1 dies before answering the resume it was sent, and the health round moves
    the request on first; the call's failure arrives after that."""
    t = Setup(live={"decode-0", "decode-1"})
    t.actors["decode-1"].hold = True
    s = t.stream("r", "prefill-0", "decode-0", tokens=3)
    t.migrator.lost("decode-0", "dead")
    assert s.trace.decode == "decode-1"
    t.live = {"decode-0"}  # restarted by now
    t.migrator.lost("decode-1", "dead")
    assert s.trace.decode == "decode-0" and s.migrations == 2
    [late] = t.actors["decode-1"].held
    late.set_result({"error": "decode-1: the actor died", "retry": True})
    assert s.migrations == 2 and len(t.actors["decode-0"].calls) == 1 and not t.failed
