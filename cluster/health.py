"""Keeping instances serving: ping each one, bring back the ones Ray restarted.

Ray restarts a crashed instance actor (up to ``builder.MAX_RESTARTS`` times), but the new
process only ran the constructor: it has no model loaded and none of the old requests.
The monitor notices (a ping fails, or says not started), tells the cluster to migrate
the requests that instance held (``cluster.migration``), and starts it again with the
same peers. An instance that misses two rounds of pings in a row (stopped, hung) is
unresponsive: its requests migrate and nothing is routed to it until it answers again.
A ping does not wait for the worker loop and runs on a thread of its own in the actor
(``builder.HEALTH_GROUP``), so an instance busy with a long step still answers.
An actor Ray has given up on is reported dead and never routed to again.

An instance whose node Ray reports dead (a host lost: its raylet and workers gone) is
unresponsive at once: its requests migrate and it takes no more; Ray may restart it
elsewhere (or wait for room forever, e.g. when no other node carries its role's labels),
and the monitor starts it again when it comes back.

An instance whose worker loop died inside a live process (an unexpected error in a step:
the process still answers pings, but serves nothing) says so in its ping (``loop``):
its requests migrate (cause "crashed") and its processes are killed, so that Ray starts
them afresh and the monitor starts it again as after a crash.

A TP x PP instance is its ranks together: it is serving only while every rank is, and
one rank that died (or stopped serving rank 0's steps) restarts the whole instance
(``builder.restart``); one that Ray gave up on makes the whole instance dead.
"""

from __future__ import annotations

import contextlib
import enum
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import ray

from cluster.builder import Instance

logger = logging.getLogger(__name__)


class Health(enum.Enum):
    SERVING = "serving"
    RESTARTING = "restarting"
    UNRESPONSIVE = "unresponsive"  # missed pings; back to serving when it answers
    DEAD = "dead"


class HealthMonitor:
    def __init__(
        self,
        instances: list[Instance],
        restart: Callable[[Instance], None],
        lost: Callable[[Instance, str], None],
        interval_s: float = 2.0,
        poll: Callable[[], None] | None = None,
        ping_timeout_s: float | None = None,
        max_misses: int = 2,
    ):
        """``lost(instance, cause)``: migrate the requests it held (cause "dead", "hung"
        or "restarted"); ``restart(instance)``: start it again (on a thread of its own,
        so the other instances are still watched); ``poll()``: called after every round
        (the cluster refreshes its load figures). Every round pings all instances at once
        and waits ``ping_timeout_s`` (default: ``interval_s``) for the answers; one that
        misses ``max_misses`` rounds in a row (stopped, or its node gone) is lost."""
        self.instances = instances  # the cluster's list: scaling adds and removes
        self.state = {inst.name: Health.SERVING for inst in instances}
        self._restart = restart
        self._poll = poll
        self._lost = lost
        self._interval_s = interval_s
        self._ping_timeout_s = interval_s if ping_timeout_s is None else ping_timeout_s
        self._max_misses = max_misses
        self._misses: dict[str, int] = {}
        self.pids: dict[str, int] = {}  # rank 0's process id, from its last ping
        self._restarting: set[str] = set()
        self._killed: set[str] = set()  # broken loops killed, until Ray restarts them
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="baton-health", daemon=True)

    def serving(self) -> set[str]:
        return {name for name, h in self.state.items() if h is Health.SERVING}

    def add(self, inst: Instance) -> None:
        """A new instance, started: watch it from now on."""
        self.state[inst.name] = Health.SERVING

    def forget(self, name: str) -> None:
        self.state.pop(name, None)
        self._misses.pop(name, None)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        if self._thread.is_alive():
            self._thread.join(self._ping_timeout_s + self._interval_s + 5)

    def answering(self) -> set[str]:
        """The serving instances that answered the last round's pings (a stopped one
        that missed a round is left out of the stats poll, so it costs no extra wait)."""
        return {n for n in self.serving() if not self._misses.get(n)}

    def _run(self) -> None:
        # Rounds start every interval (a round that took longer, waiting on a hung
        # instance, is followed at once), so a hang is seen two intervals after it began.
        last = time.monotonic()
        while not self._stopping.wait(max(0.0, last + self._interval_s - time.monotonic())):
            last = time.monotonic()
            try:
                self.check()
            except Exception:  # never let the watcher die
                logger.exception("health round failed")
            if self._poll is not None:
                try:
                    self._poll()
                except Exception:  # a slow instance; the figures are only a hint
                    logger.debug("polling stats failed", exc_info=True)

    def check(self) -> dict[str, Health]:
        """Ping every instance once (all at once) and act on what changed."""
        watched = [
            i for i in list(self.instances)
            if i.name in self.state and self.state[i.name] is not Health.DEAD
        ]  # fmt: skip
        self._check_nodes(watched)
        refs = {inst.name: [a.ping.remote() for a in inst.actors] for inst in watched}
        flat = [r for rs in refs.values() for r in rs]
        if flat:
            ray.wait(flat, num_returns=len(flat), timeout=self._ping_timeout_s)
        for inst in watched:
            if self._stopping.is_set() or inst.name not in self.state:
                continue
            self._act(inst, _verdict(refs[inst.name]))
            with contextlib.suppress(Exception):  # no answer this round: keep the last
                self.pids[inst.name] = int(ray.get(refs[inst.name][0], timeout=0)["pid"])
        return dict(self.state)

    def _check_nodes(self, watched: list[Instance]) -> None:
        """A serving instance whose node Ray reports dead (its host lost) is unresponsive at
        once: its requests migrate now rather than after two missed ping rounds."""
        alive = _alive_nodes()
        if alive is None:
            return
        for inst in watched:
            node = inst.info.get("node_id")
            if node and node not in alive and self.state.get(inst.name) is Health.SERVING:
                logger.error("instance %s: its node %s is dead", inst.name, node)
                self.state[inst.name] = Health.UNRESPONSIVE
                self._lost(inst, "dead")

    def _act(self, inst: Instance, verdict: str) -> None:
        name, state = inst.name, self.state[inst.name]
        if verdict == "dead":
            logger.error("instance %s is dead", name)
            self.state[name] = Health.DEAD
            self._lost(inst, "dead")
        elif verdict in ("miss", "gone"):
            if verdict == "gone":
                self._killed.discard(name)
            self._misses[name] = self._misses.get(name, 0) + 1
            if state is Health.SERVING and (
                verdict == "gone" or self._misses[name] >= self._max_misses
            ):
                cause = "restarted" if verdict == "gone" else "hung"
                logger.warning(
                    "instance %s is unresponsive (%s); migrating its requests", name, cause
                )
                self.state[name] = Health.UNRESPONSIVE
                self._lost(inst, cause)
        elif verdict == "broken":  # its loop died; the process lives on, serving nothing
            self._misses[name] = 0
            if state is Health.SERVING:
                logger.error("instance %s: its worker loop died; migrating its requests", name)
                self.state[name] = Health.UNRESPONSIVE
                self._lost(inst, "crashed")
            if name not in self._killed:
                self._killed.add(name)
                logger.warning("instance %s: killing its processes so Ray restarts them", name)
                for actor in inst.actors:
                    with contextlib.suppress(Exception):
                        ray.kill(actor, no_restart=False)
        elif verdict == "fresh":  # Ray restarted the process: nothing loaded, no requests
            self._killed.discard(name)
            self._misses[name] = 0
            if state in (Health.SERVING, Health.UNRESPONSIVE):
                logger.warning("instance %s was restarted by Ray; starting it again", name)
                self._lost(inst, "restarted")
            self.state[name] = Health.RESTARTING
            if name not in self._restarting:
                self._restarting.add(name)
                threading.Thread(
                    target=self._restart_one,
                    args=(inst,),
                    name=f"baton-restart-{name}",
                    daemon=True,
                ).start()
        else:  # started
            self._misses[name] = 0
            if state is Health.UNRESPONSIVE or (
                state is Health.RESTARTING and name not in self._restarting
            ):
                logger.info("instance %s is serving again", name)
                self.state[name] = Health.SERVING

    def _restart_one(self, inst: Instance) -> None:
        try:
            self._restart(inst)
        except Exception:
            logger.exception("restarting %s failed; will retry", inst.name)
        finally:
            self._restarting.discard(inst.name)


def _verdict(refs: list[Any]) -> str:
    """One instance's answer to a round of pings: "started", "fresh" (a rank is a new
    process with nothing loaded), "broken" (a rank's worker loop died in a live
    process), "miss" (no answer in time), "gone" (a rank's process died; Ray is
    restarting it) or "dead" (Ray gave up on a rank)."""
    verdict = "started"
    for ref in refs:
        try:
            reply: dict[str, Any] = ray.get(ref, timeout=0)
        except ray.exceptions.GetTimeoutError:
            verdict = "miss" if verdict in ("started", "fresh", "broken") else verdict
            continue
        except ray.exceptions.ActorUnavailableError:
            verdict = "gone" if verdict != "dead" else verdict
            continue
        except ray.exceptions.RayActorError:
            return "dead"
        except ray.exceptions.RayError:
            # The ping's worker was killed under it (Ray's memory monitor raises an
            # OutOfMemoryError): the process is gone and Ray restarts the actor.
            verdict = "gone" if verdict != "dead" else verdict
            continue
        if reply["started"] and reply.get("loop") is False and verdict in ("started", "fresh"):
            verdict = "broken"
        elif not reply["started"] and verdict == "started":
            verdict = "fresh"
    return verdict


def _alive_nodes() -> set[str] | None:
    """The ids of the nodes Ray reports alive; None when it cannot say right now."""
    try:
        return {n["NodeID"] for n in ray.nodes() if n.get("Alive")}
    except Exception:  # the GCS busy or restarting: judge by pings alone this round
        logger.debug("listing Ray's nodes failed", exc_info=True)
        return None
