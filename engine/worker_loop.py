"""The thread that owns an instance's engine.

The engine is not thread-safe, so exactly one thread touches it: this loop. Control
calls arrive from other threads (Ray's actor threads, transfer threads) and are queued
as callables in an inbox that the loop runs between steps. When there is no work the
loop sleeps on the inbox, so a new request wakes it at once.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, TypeVar

logger = logging.getLogger(__name__)

T = TypeVar("T")


class WorkerLoop:
    def __init__(self, name: str, tick: Callable[[], bool], idle_wait_s: float = 0.05):
        """``tick`` does one unit of work and returns False when there was none."""
        self.name = name
        self._tick = tick
        self._idle_wait_s = idle_wait_s
        self._inbox: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self.error: BaseException | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name=f"{self.name}-loop", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stopping.set()
        self._inbox.put(lambda: None)  # wake the loop
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def post(self, fn: Callable[..., Any], *args: Any) -> None:
        """Run ``fn(*args)`` on the loop thread, soon; returns at once. An exception is
        logged: nobody is waiting for it, and it must not take the loop down."""

        def run() -> None:
            try:
                fn(*args)
            except Exception:
                logger.exception("%s: %s failed", self.name, getattr(fn, "__name__", fn))

        self._inbox.put(run)

    def call(self, fn: Callable[..., T], *args: Any, timeout: float = 30.0) -> T:
        """Run ``fn(*args)`` on the loop thread and wait for its result (or exception)."""
        if threading.current_thread() is self._thread:
            return fn(*args)
        future: Future[T] = Future()

        def run() -> None:
            try:
                future.set_result(fn(*args))
            except BaseException as e:  # handed to the caller
                future.set_exception(e)

        self._inbox.put(run)
        return future.result(timeout)

    def _drain(self, block: bool) -> None:
        try:
            fn = self._inbox.get(timeout=self._idle_wait_s) if block else self._inbox.get_nowait()
        except queue.Empty:
            return
        while True:
            fn()
            try:
                fn = self._inbox.get_nowait()
            except queue.Empty:
                return

    def _run(self) -> None:
        busy = True
        try:
            while not self._stopping.is_set():
                self._drain(block=not busy)
                busy = self._tick()
        except BaseException as e:  # the instance is broken: record why, for stats()
            logger.exception("%s: worker loop died", self.name)
            self.error = e


class LoopCrash(BaseException):
    """Raised on a loop's thread by :func:`crash` (``post`` lets it through)."""


def crash(loop: WorkerLoop) -> None:
    """Chaos: make ``loop`` die as an unexpected error in a step would."""

    def boom() -> None:
        raise LoopCrash(f"{loop.name}: worker loop crashed on purpose (chaos)")

    loop._inbox.put(boom)


class Tombstones:
    """Ids of recently aborted requests, so a call that arrives after the abort (Ray does
    not order calls on a threaded actor; a hand-off comes from another instance) is
    dropped instead of starting the request.

    Each call that starts a copy of a request carries its *attempt*: the router's count
    of the request's migrations when it sent that copy. An abort names the newest attempt
    it ends, so a later copy of the same request (migrated back to this instance after it
    left) is not mistaken for a late one: dropping it would leave the request with no
    instance serving it."""

    def __init__(self, ttl_s: float = 120.0, clock: Callable[[], float] | None = None):
        import time

        self._ttl_s = ttl_s
        self._clock = clock or time.monotonic
        self._ids: dict[str, tuple[float, int]] = {}  # id -> (expires at, attempt)

    def add(self, request_id: str, attempt: int = 0) -> None:
        now = self._clock()
        old = self._ids.pop(request_id, None)  # re-added last: it expires last
        if old is not None and old[0] > now:
            attempt = max(attempt, old[1])
        self._ids[request_id] = (now + self._ttl_s, attempt)
        # Dicts keep insertion order, so expired ids are at the front.
        for rid, (expires_at, _) in list(self._ids.items()):
            if expires_at > now:
                break
            del self._ids[rid]

    def covers(self, request_id: str, attempt: int = 0) -> bool:
        """Whether the copy of ``request_id`` sent as ``attempt`` was aborted here."""
        entry = self._ids.get(request_id)
        return entry is not None and entry[0] > self._clock() and attempt <= entry[1]
