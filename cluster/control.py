"""The operator's side of a running cluster: desired state, and a controller that moves
the running cluster towards it one safe step at a time (as Kubernetes' controllers do).

Desired state is a count of instances per role plus, per instance, whether it is
cordoned (no new work is routed to it). ``scale`` sets the counts; the controller
(:meth:`Controller.reconcile`, run on a thread of its own after every change and on a
timer) compares them with what runs and takes one step: start one instance of a role
that is short (it gets traffic as soon as it is started), or drain one of a role that
has too many. A drain is cordon, wait for the in-flight requests to finish (up to its
timeout), migrate what is left (``cluster.migration``, cause "drained"), then remove
the instance. Every step is safe to repeat: a start that failed leaves nothing behind,
a drain of an instance already gone is done.

The controller knows the cluster only through :class:`ClusterOps`, the few calls the
facade (``cluster.cluster.Cluster``) gives it.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

from cluster.stream import RequestStream

logger = logging.getLogger(__name__)

DEFAULT_DRAIN_TIMEOUT_S = 30.0
RETRY_PAUSE_S = 5.0


class ClusterOps(Protocol):
    def running(self) -> dict[str, str]:
        """name -> role of every instance that runs (serving or not)."""
        ...

    def in_flight(self, name: str) -> int:
        """Requests routed to the instance and not finished."""
        ...

    def add_instance(self, role: str) -> str:
        """Create and start one instance of ``role``; returns its name once started."""
        ...

    def migrate_all(self, name: str, cause: str) -> int: ...

    def remove_instance(self, name: str) -> None:
        """Stop the instance's processes and forget it."""
        ...


@dataclass
class Drain:
    name: str
    deadline: float
    done: threading.Event = field(default_factory=threading.Event)
    migrated: int = 0


class Controller:
    def __init__(self, ops: ClusterOps, desired: dict[str, int], interval_s: float = 1.0):
        self._ops = ops
        self.desired = dict(desired)
        self.cordoned: set[str] = set()
        self.draining: dict[str, Drain] = {}
        self.starting: dict[str, str] = {}  # placeholder name -> role, while one starts
        self.errors: list[str] = []  # the last failures of a step, newest last
        self._interval_s = interval_s
        self._lock = threading.RLock()
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="baton-control", daemon=True)

    # -- desired state (any thread) --------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(10)

    def routable(self, name: str) -> bool:
        """Whether new requests may go to the instance."""
        return name not in self.cordoned and name not in self.draining

    def state(self, name: str) -> str | None:
        """cordoned / draining, or None when the operator set nothing for it."""
        if name in self.draining:
            return "draining"
        if name in self.cordoned:
            return "cordoned"
        return None

    def states(self, health: dict[str, str]) -> dict[str, str]:
        """Per instance (``health``: the monitor's view): what an operator sees."""
        with self._lock:
            out = {name: "starting" for name in self.starting}
            for name in self._ops.running():
                h = health.get(name, "starting")
                out[name] = (self.state(name) or "ready") if h == "serving" else h
        return out

    def check_instance(self, name: str) -> str:
        running = self._ops.running()
        if name not in running:
            known = ", ".join(sorted(running)) or "none"
            raise KeyError(f"instance: no instance named {name!r} (running: {known})")
        return running[name]

    def cordon(self, name: str) -> None:
        self.check_instance(name)
        with self._lock:
            self.cordoned.add(name)

    def uncordon(self, name: str) -> None:
        self.check_instance(name)
        with self._lock:
            if name in self.draining:
                raise ValueError(f"instance: {name} is draining; it cannot be uncordoned")
            self.cordoned.discard(name)

    def drain(self, name: str, timeout_s: float = DEFAULT_DRAIN_TIMEOUT_S) -> Drain:
        """Start draining ``name`` (the role's desired count drops by one); returns the
        drain, whose ``done`` is set once the instance is gone."""
        if not timeout_s >= 0:
            raise ValueError(f"timeout: must be >= 0 seconds, got {timeout_s}")
        role = self.check_instance(name)
        with self._lock:
            if name in self.draining:
                return self.draining[name]
            roles = self._ops.running()
            left = sum(1 for n, r in roles.items() if r == role and n not in self.draining) - 1
            if left < 1 and role != "colocated" or left < 0:
                raise ValueError(f"instance: {name} is the last {role} instance; scale up first")
            self.desired[role] = min(self.desired.get(role, 0), left)
            self.cordoned.add(name)
            d = self.draining[name] = Drain(name, time.monotonic() + timeout_s)
        self._wake.set()
        return d

    def scale(self, counts: dict[str, int], drain_timeout_s: float | None = None) -> None:
        """Set the desired number of instances per role; the controller gets there."""
        for role, n in counts.items():
            if not isinstance(n, int) or isinstance(n, bool) or n < 1:
                raise ValueError(f"{role}: must be a positive number of instances, got {n!r}")
        with self._lock:
            self.desired.update(counts)
            if drain_timeout_s is not None:
                self._drain_timeout_s = drain_timeout_s
        self._wake.set()

    # -- the controller's thread -------------------------------------------------------

    def _run(self) -> None:
        while not self._stopping.is_set():
            try:
                busy = self.reconcile()
            except Exception as e:  # a failed step is retried after a pause
                logger.exception("control step failed")
                self._error(f"{type(e).__name__}: {e}")
                self._stopping.wait(RETRY_PAUSE_S)
                busy = False
            if not busy:
                self._wake.wait(self._interval_s)
                self._wake.clear()

    def _error(self, message: str) -> None:
        with self._lock:
            self.errors = [*self.errors[-9:], message]

    def reconcile(self) -> bool:
        """One step towards the desired state; True when it did something."""
        for d in list(self.draining.values()):
            if self._drain_step(d):
                return True
        running = self._ops.running()
        for role, want in sorted(self.desired.items()):
            have = [n for n, r in running.items() if r == role and n not in self.draining]
            if len(have) < want:
                self._add(role)
                return True
            if len(have) > want:
                # Cordoned ones first, then the least busy.
                victim = min(have, key=lambda n: (n not in self.cordoned, self._ops.in_flight(n)))
                timeout = getattr(self, "_drain_timeout_s", DEFAULT_DRAIN_TIMEOUT_S)
                with self._lock:
                    self.cordoned.add(victim)
                    self.draining[victim] = Drain(victim, time.monotonic() + timeout)
                return True
        return False

    def _add(self, role: str) -> None:
        placeholder = f"{role}-(starting)"
        with self._lock:
            self.starting[placeholder] = role
        try:
            name = self._ops.add_instance(role)
            logger.info("scale: %s started", name)
        finally:
            with self._lock:
                self.starting.pop(placeholder, None)

    def _drain_step(self, d: Drain) -> bool:
        """Wait (not busy), migrate at the deadline, remove once empty."""
        if d.name not in self._ops.running():
            self._finish(d)
            return False
        if self._ops.in_flight(d.name) and time.monotonic() < d.deadline:
            return False
        if self._ops.in_flight(d.name):
            d.migrated += self._ops.migrate_all(d.name, "drained")
            logger.info("drain %s: migrated %d requests at the timeout", d.name, d.migrated)
            if self._ops.in_flight(d.name):
                return False  # the migrations are on their way; look again next round
        self._ops.remove_instance(d.name)
        self._finish(d)
        logger.info("drain %s: removed", d.name)
        return True

    def _finish(self, d: Drain) -> None:
        with self._lock:
            self.draining.pop(d.name, None)
            self.cordoned.discard(d.name)
        d.done.set()


def requests_in_flight(streams: dict[str, RequestStream]) -> list[dict[str, Any]]:
    """One row per request in flight, oldest first."""
    now = time.monotonic()
    rows = []
    for rid, s in streams.items():
        t = s.trace
        tokens = len(t.token_times)
        state = "prefill" if t.prefill and not tokens else "decode"
        rows.append(
            dict(
                request_id=rid,
                state=state,
                instances=[n for n in (t.prefill, t.decode) if n],
                tokens=tokens,
                age_s=now - t.arrival,
                migrations=s.migrations,
            )
        )
    return sorted(rows, key=lambda r: -r["age_s"])
