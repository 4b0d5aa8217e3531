"""Admission while a role has no serving instance: wait for one, bounded.

A request that arrives while every decode instance (or, disaggregated, every prefill
instance) is dead, restarting, hung or cordoned is not refused at once: it waits, without
blocking the event loop, for an instance of that role to serve again (Ray restarting a
killed process and the health monitor starting it: about ten seconds), up to the
cluster's ``admission_timeout_s`` (``baton serve --admission-timeout``, default 30 s).
Past that it fails with :class:`NoInstanceServing` (a ``RuntimeError``: the router answers
gRPC UNAVAILABLE / HTTP 503) naming how long it waited. Nothing is registered while a
request waits, so a client that goes away (its task cancelled, its own deadline passed)
leaves nothing behind. Requests that migrate wait for a target under the same bound
(``cluster.migration``).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

T = TypeVar("T")

DEFAULT_ADMISSION_TIMEOUT_S = 30.0
POLL_S = 0.05  # how often a waiting request looks again (routing is a cheap local check)


class NoInstanceServing(RuntimeError):
    """No instance of a role the request needs is serving right now."""


def check_timeout(value: object) -> float:
    """``admission_timeout_s`` as given; ValueError naming the field."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
        raise ValueError(f"admission-timeout: must be a number of seconds >= 0, got {value!r}")
    return float(value)


def _expired(error: NoInstanceServing, timeout_s: float) -> NoInstanceServing:
    return NoInstanceServing(f"{error} (waited {timeout_s:g} s for one to come back)")


class _Tries(Generic[T]):
    """``send()`` tried until it succeeds (then :attr:`result`), or until ``timeout_s``
    passed (then :class:`NoInstanceServing`); iterating yields how long to sleep before
    the next try, so the async and the blocking wait share one loop and sleep their own
    way."""

    def __init__(self, send: Callable[[], T], timeout_s: float, poll_s: float) -> None:
        self._send = send
        self._timeout_s = timeout_s
        self._poll_s = poll_s
        self.result: T

    def __iter__(self) -> Iterator[float]:
        deadline = time.monotonic() + self._timeout_s
        while True:
            try:
                self.result = self._send()
                return
            except NoInstanceServing as e:
                if time.monotonic() >= deadline:
                    raise _expired(e, self._timeout_s) from None
            yield min(self._poll_s, max(0.0, deadline - time.monotonic()))


async def when_serving(send: Callable[[], T], timeout_s: float, poll_s: float = POLL_S) -> T:
    """``send()`` (it routes, raising :class:`NoInstanceServing` while it cannot), retried
    every ``poll_s`` without blocking the loop until it succeeds or ``timeout_s`` passed."""
    tries = _Tries(send, timeout_s, poll_s)
    for delay in tries:
        await asyncio.sleep(delay)
    return tries.result


def when_serving_sync(send: Callable[[], T], timeout_s: float, poll_s: float = POLL_S) -> T:
    """:func:`when_serving` for the blocking API (``Cluster.submit`` / ``generate``)."""
    tries = _Tries(send, timeout_s, poll_s)
    for delay in tries:
        time.sleep(delay)
    return tries.result
