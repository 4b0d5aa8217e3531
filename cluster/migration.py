"""Request migration: a request whose instance is lost continues on another one.

When a decode (or colocated) instance dies, hangs, restarts or is drained past its
timeout, every request it held is re-submitted to another decode instance: the prompt
as first sent plus the tokens already streamed, which the new instance replays as
*output* (``LLMEngine.add_resumed``: penalties, stop rules, max_tokens and the seeded
draws, a function of (seed, position), go on as if nothing happened) while it
recomputes their KV. The client's stream (``RequestStream.begin_migration``) stops
listening to the old instances and takes the new one's tokens from the index it had
reached, so nothing is duplicated or lost and the output is the fault-free one.

A request a prefill instance held before its first token (queued, or mid-prefill) is
*re-dispatched* instead: sent afresh to a live prefill instance (``pick_prefill``), with
a decode destination, and handed off to decode as usual; the stream ignores the old
prefill instance from then on. Only when no prefill instance is live does it fall back
to a decode instance, which recomputes the prompt (counted apart, see ``counters``).
A request whose first token is out (handed off, or its hand-off lost with the
instance) goes to a decode instance with that token, as above; the decode side
recomputes the prompt. A request migrated more than ``limit`` times ends with an error
finish. Where no instance can take it right now, it waits (``retry`` runs on every
health round) up to ``wait_s``.

Every copy sent is numbered (its *attempt*: the stream's ``migrations`` once moved),
and the aborts of the old copies name the attempt before it. An instance drops a late
call for a copy it was told to abort, but takes a newer copy of the same request: a
request may come back to an instance it left (all prefill instances lost, its decode
destination changed, then the new one lost too).

``counters``: ``migrations_<cause>`` (every move), ``to_prefill`` (re-dispatched to a
prefill instance), ``to_decode`` (resumed on a decode instance), ``prefill_fallbacks``
(a prefill instance's unstarted request resumed on decode because no prefill instance
was live), ``migration_failures``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import ray

from cluster.dispatch import InstanceLoad, decode_preference
from cluster.stream import RequestStream

logger = logging.getLogger(__name__)

CAUSES = ("dead", "hung", "restarted", "drained", "unavailable", "crashed")


@dataclass
class Target:
    """A decode instance a request can move to: its name and rank-0 actor handle."""

    name: str
    actor: Any


def pick_decode(loads: Sequence[InstanceLoad], exclude: set[str]) -> str | None:
    """The decode (or colocated) instance to move a request to: the routing default's
    order (``decode_preference``) among the routable ones not excluded."""
    decode = [x for x in loads if x.role != "prefill" and x.name not in exclude]
    if not decode:
        return None
    best = min(decode, key=lambda x: decode_preference(x.free_blocks, x.total_blocks, x.active))
    return best.name


def pick_prefill(loads: Sequence[InstanceLoad], exclude: set[str]) -> str | None:
    """The prefill instance to re-dispatch a request to: the routable one not excluded
    with the fewest queued prompt tokens (the routing default's order)."""
    prefill = [x for x in loads if x.role == "prefill" and x.name not in exclude]
    if not prefill:
        return None
    return min(prefill, key=lambda x: x.queued_prompt_tokens).name


class Migrator:
    def __init__(
        self,
        streams: Callable[[], dict[str, RequestStream]],
        pick: Callable[[set[str]], Target | None],
        abort_on: Callable[[str, str, int], None],
        fail: Callable[[str, str], object],
        limit: int = 3,
        wait_s: float = 60.0,
        pick_prefill: Callable[[set[str]], Target | None] | None = None,
    ):
        """``streams()``: the requests in flight; ``pick(exclude)``: the decode instance
        to move to (see :func:`pick_decode`), None when there is none;
        ``abort_on(instance, request_id, attempt)``: a fire-and-forget abort of the old
        copies (up to ``attempt``);
        ``fail(request_id, message)``: end a request with an error finish everywhere;
        ``pick_prefill(exclude)``: the live prefill instance to re-dispatch an unstarted
        prefill to, None when there is none (or no prefill pool)."""
        self._streams = streams
        self._pick = pick
        self._pick_prefill = pick_prefill
        self._abort_on = abort_on
        self._fail_request = fail
        self.limit = limit
        self.wait_s = wait_s
        self._lock = threading.Lock()
        self._waiting: dict[str, tuple[RequestStream, str, float]] = {}
        self.counters: dict[str, int] = {f"migrations_{c}": 0 for c in CAUSES}
        self.counters.update(to_prefill=0, to_decode=0, prefill_fallbacks=0)
        self.counters["migration_failures"] = 0

    def lost(self, instance: str, cause: str) -> int:
        """Migrate every request that ``instance`` held; returns how many moved."""
        moved = 0
        for stream in self._streams().values():
            t = stream.trace
            if t.prefill == instance and not t.token_times:  # queued or mid-prefill
                moved += self.redispatch(stream, cause, {instance})
                continue
            on_decode = t.decode == instance
            # A prefill instance's request is its own until the decode side made a token.
            on_prefill = t.prefill == instance and len(t.token_times) < 2
            if (on_decode or on_prefill) and self.migrate(stream, cause, {instance}):
                moved += 1
        return moved

    def redispatch(self, stream: RequestStream, cause: str, exclude: set[str]) -> bool:
        """Send a request that has no token yet to a live prefill instance (not in
        ``exclude``); without one, resume it on a decode instance (:meth:`migrate`)."""
        if stream.finished:
            return False
        if stream.migrations >= self.limit:
            self._fail(stream, f"request migrated {stream.migrations} times; giving up")
            return False
        target = None if self._pick_prefill is None else self._pick_prefill(exclude)
        dest = self._pick(exclude)
        if target is None or dest is None:
            moved = self.migrate(stream, cause, exclude)
            if moved and target is None:
                self.counters["prefill_fallbacks"] += 1
                logger.warning(
                    "request %s: no prefill instance is live; its prompt is recomputed on "
                    "a decode instance", stream.request_id,
                )  # fmt: skip
            return moved
        old = stream.trace.prefill
        began = stream.begin_redispatch(exclude, target.name, dest.name)
        if began == "moved":
            return False
        if began == "started":  # its first token came in meanwhile: handed off, or lost
            return self.migrate(stream, cause, exclude)
        self.counters[f"migrations_{cause}"] += 1
        self.counters["to_prefill"] += 1
        attempt = stream.migrations
        for name in ({old} | exclude) - {None, target.name, dest.name}:
            self._abort_on(str(name), stream.request_id, attempt - 1)
        r = stream.resubmit
        ids = r.get("prompt_token_ids") or (stream.prompt_token_ids or None)
        logger.info(
            "request %s: re-dispatched to prefill %s, decode %s (%s)",
            stream.request_id, target.name, dest.name, cause,
        )  # fmt: skip
        ref = target.actor.add_request.remote(
            stream.request_id, r.get("prompt"), ids, r.get("params"), dest.name, r.get("messages"),
            attempt=attempt,
        )  # fmt: skip
        ref.future().add_done_callback(
            lambda f: self._answered(stream, target.name, cause, f, self.redispatch, attempt)
        )
        return True

    def migrate(self, stream: RequestStream, cause: str, exclude: set[str]) -> bool:
        """Move one request off the instances in ``exclude`` (and its current ones)."""
        if stream.finished:
            return False
        if stream.migrations >= self.limit:
            self._fail(stream, f"request migrated {stream.migrations} times; giving up")
            return False
        away = {n for n in (stream.trace.prefill, stream.trace.decode) if n} | exclude
        target = self._pick(exclude)
        if target is None:
            with self._lock:
                self._waiting.setdefault(
                    stream.request_id, (stream, cause, time.monotonic() + self.wait_s)
                )
            logger.warning("request %s: no decode instance to migrate to yet", stream.request_id)
            return False
        outputs = stream.begin_migration(away, target.name)
        if outputs is None:
            return False
        self.counters[f"migrations_{cause}"] += 1
        self.counters["to_decode"] += 1
        attempt = stream.migrations
        for name in away - {target.name}:
            self._abort_on(name, stream.request_id, attempt - 1)
        r = stream.resubmit
        ids = r.get("prompt_token_ids") or (stream.prompt_token_ids or None)
        logger.info(
            "request %s: migrating to %s after %d tokens (%s)",
            stream.request_id, target.name, len(outputs), cause,
        )  # fmt: skip
        ref = target.actor.resume_request.remote(
            stream.request_id, r.get("prompt"), ids, outputs, r.get("params"), r.get("messages"),
            attempt=attempt,
        )  # fmt: skip
        ref.future().add_done_callback(
            lambda f: self._answered(stream, target.name, cause, f, self.migrate, attempt)
        )
        return True

    def _answered(
        self,
        stream: RequestStream,
        name: str,
        cause: str,
        future: Any,
        again: Callable[[RequestStream, str, set[str]], bool],
        attempt: int,
    ) -> None:
        """The new instance's answer to the copy sent as ``attempt``: accepted, or try
        another (``again``, without ``name``), or fail clearly. A refusal that comes after
        the request moved on (a health round saw ``name`` lost first) is of a copy nobody
        listens to: moving the request again would only spend its migrations."""
        try:
            reply = future.result()
        except ray.exceptions.RayError as e:
            reply = {"error": f"{name}: {e}", "retry": True}
        if "error" not in reply:
            if not stream.prompt_token_ids:
                stream.set_prompt(reply["prompt_token_ids"])
            return
        if stream.migrations != attempt:
            return
        if reply.get("retry"):
            again(stream, cause, {name})
        else:
            self._fail(stream, str(reply["error"]))

    def waiting(self) -> int:
        """How many requests wait for a decode instance to migrate to."""
        with self._lock:
            return len(self._waiting)

    def retry(self) -> None:
        """Migrate the requests that waited for a decode instance (each health round)."""
        with self._lock:
            waiting, self._waiting = self._waiting, {}
        now = time.monotonic()
        for stream, cause, deadline in waiting.values():
            if stream.finished:
                continue
            if now > deadline:
                self._fail(stream, "no decode instance could take the request over")
            elif not self.migrate(stream, cause, set()):
                with self._lock:  # keep the first deadline
                    if stream.request_id in self._waiting:
                        self._waiting[stream.request_id] = (stream, cause, deadline)

    def _fail(self, stream: RequestStream, message: str) -> None:
        self.counters["migration_failures"] += 1
        logger.error("request %s failed: %s", stream.request_id, message)
        self._fail_request(stream.request_id, message)
