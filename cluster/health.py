"""Keeping instances serving: ping each one, bring back the ones Ray restarted.

Ray restarts a crashed instance actor (up to ``builder.MAX_RESTARTS`` times), but the new
process only ran the constructor: it has no model loaded and none of the old requests.
The monitor notices (``ping`` says not started), tells the cluster to give up on the
requests that instance held, and starts it again with the same peers. An actor Ray has
given up on is reported dead and never routed to again.

An instance whose node Ray reports dead (a host lost: its raylet and workers gone) has
its requests failed at once and takes no more; Ray may restart it elsewhere (or wait for
room forever, e.g. when no other node carries its role's labels), and the monitor starts
it again when it comes back.

A TP x PP instance is its ranks together: it is serving only while every rank is, and
one rank that died (or stopped serving rank 0's steps) restarts the whole instance
(``builder.restart``); one that Ray gave up on makes the whole instance dead.
"""

from __future__ import annotations

import enum
import logging
import threading
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
    ):
        """``lost(instance)``: fail the requests it held; ``restart(instance)``: start it;
        ``poll()``: called after every round (the cluster refreshes its load figures)."""
        self.instances = instances
        self.state = {inst.name: Health.SERVING for inst in instances}
        self._restart = restart
        self._poll = poll
        self._lost = lost
        self._interval_s = interval_s
        self._ping_timeout_s = ping_timeout_s
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
        alive = _alive_nodes()
        for inst in self.instances:
            if self.state[inst.name] is Health.DEAD or self._stopping.is_set():
                continue
            node = inst.info.get("node_id")
            lost = node and alive is not None and node not in alive
            if lost and self.state[inst.name] is Health.SERVING:
                logger.error("instance %s: its node %s is dead", inst.name, node)
                self.state[inst.name] = Health.RESTARTING
                self._lost(inst)
            started = self._ping(inst)
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

    def _ping(self, inst: Instance) -> bool | None:
        """Whether every rank of the instance is started; None when one is gone for good."""
        refs = [actor.ping.remote() for actor in inst.actors]
        started = True
        for ref in refs:
            try:
                reply: dict[str, Any] = ray.get(ref, timeout=self._ping_timeout_s)
            except (ray.exceptions.GetTimeoutError, ray.exceptions.ActorUnavailableError):
                continue  # busy, or being restarted by Ray: look again next round
            except ray.exceptions.RayActorError:
                return None
            started = started and bool(reply["started"])
        return started


def _alive_nodes() -> set[str] | None:
    """The ids of the nodes Ray reports alive; None when it cannot say right now."""
    try:
        return {n["NodeID"] for n in ray.nodes() if n.get("Alive")}
    except Exception:  # the GCS busy or restarting: judge by pings alone this round
        logger.debug("listing Ray's nodes failed", exc_info=True)
        return None
