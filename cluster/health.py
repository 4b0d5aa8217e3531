"""Keeping instances serving: ping each one, bring back the ones Ray restarted.

Ray restarts a crashed instance actor (up to ``builder.MAX_RESTARTS`` times), but the new
process only ran the constructor: it has no model loaded and none of the old requests.
The monitor notices (``ping`` says not started), tells the cluster to give up on the
requests that instance held, and starts it again with the same peers. An actor Ray has
given up on is reported dead and never routed to again.

A TP x PP instance is its ranks together: it is serving only while every rank is, and
one rank that died (or stopped serving rank 0's steps) restarts the whole instance
(``builder.restart``); one that Ray gave up on makes the whole instance dead.
"""

from __future__ import annotations

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
    DEAD = "dead"


class HealthMonitor:
    def __init__(
        self,
        instances: list[Instance],
        restart: Callable[[Instance], None],
        lost: Callable[[Instance], None],
        interval_s: float = 2.0,
        poll: Callable[[], None] | None = None,
        ping_timeout_s: float = 10.0,
        unavailable_s: float = 20.0,
    ):
        """``lost(instance)``: fail the requests it held; ``restart(instance)``: start it;
        ``poll()``: called after every round (the cluster refreshes its load figures).
        ``unavailable_s``: an instance that answers no ping for this long (its node is
        gone and Ray waits for room to restart it elsewhere, perhaps forever) has its
        requests failed and takes none until it is back."""
        self.instances = instances
        self.state = {inst.name: Health.SERVING for inst in instances}
        self._restart = restart
        self._poll = poll
        self._lost = lost
        self._interval_s = interval_s
        self._ping_timeout_s = ping_timeout_s
        self._unavailable_s = unavailable_s
        self._unavailable_since: dict[str, float] = {}
        self._answered: dict[str, bool] = {}  # by the last _ping: did any rank answer
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="baton-health", daemon=True)

    def serving(self) -> set[str]:
        return {name for name, h in self.state.items() if h is Health.SERVING}

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        if self._thread.is_alive():
            self._thread.join(self._ping_timeout_s + 5)

    def _run(self) -> None:
        while not self._stopping.wait(self._interval_s):
            self.check()
            if self._poll is not None:
                try:
                    self._poll()
                except Exception:  # a slow instance; the figures are only a hint
                    logger.debug("polling stats failed", exc_info=True)

    def check(self) -> dict[str, Health]:
        """Ping every instance once and act on what changed."""
        for inst in self.instances:
            if self.state[inst.name] is Health.DEAD or self._stopping.is_set():
                continue
            started = self._ping(inst)
            if started is not None and self._unanswered(inst, started):
                continue
            if started is None:
                logger.error("instance %s is dead", inst.name)
                self.state[inst.name] = Health.DEAD
                self._lost(inst)
            elif not started:
                logger.warning("instance %s was restarted by Ray; starting it again", inst.name)
                self.state[inst.name] = Health.RESTARTING
                self._lost(inst)
                try:
                    self._restart(inst)
                except Exception:
                    logger.exception("restarting %s failed; will retry", inst.name)
                    continue
                self.state[inst.name] = Health.SERVING
        return dict(self.state)

    def _unanswered(self, inst: Instance, started: bool) -> bool:
        """True while ``inst`` answers no ping (``_ping`` said started, having heard
        nothing); past ``unavailable_s`` its requests fail once and it takes no more."""
        if not started or self._answered.pop(inst.name, True):
            self._unavailable_since.pop(inst.name, None)
            if started and self.state[inst.name] is Health.RESTARTING:
                self.state[inst.name] = Health.SERVING  # back without a restart
            return False
        since = self._unavailable_since.setdefault(inst.name, time.monotonic())
        if time.monotonic() - since > self._unavailable_s and (
            self.state[inst.name] is Health.SERVING
        ):
            logger.error("instance %s has not answered for %.0f s", inst.name, self._unavailable_s)
            self.state[inst.name] = Health.RESTARTING
            self._lost(inst)
        return True

    def _ping(self, inst: Instance) -> bool | None:
        """Whether every rank of the instance is started; None when one is gone for good."""
        refs = [actor.ping.remote() for actor in inst.actors]
        started, answered = True, 0
        for ref in refs:
            try:
                reply: dict[str, Any] = ray.get(ref, timeout=self._ping_timeout_s)
            except (ray.exceptions.GetTimeoutError, ray.exceptions.ActorUnavailableError):
                continue  # busy, or being restarted by Ray: look again next round
            except ray.exceptions.RayActorError:
                return None
            answered += 1
            started = started and bool(reply["started"])
        self._answered[inst.name] = answered > 0
        return started
