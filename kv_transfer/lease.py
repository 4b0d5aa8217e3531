"""Leases on the KV blocks a prefill instance holds for a decode instance to pull.

Pure bookkeeping with an injected clock. A lease starts when the prefill side samples a
request's first token, is renewed by the decode side's heartbeats while the request
waits for blocks or is being pulled, and ends when the decode side acknowledges the
pull, the request is aborted, or nobody renews it in time. Whoever ends a lease frees
its blocks.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass


@dataclass
class Lease:
    request_id: str
    block_ids: list[int]
    expires_at: float
    attempt: int = 0  # the router's, of the copy of the request whose KV this is


class LeaseTable:
    def __init__(self, ttl_s: float = 30.0, clock: Callable[[], float] = time.monotonic):
        if not ttl_s > 0:
            raise ValueError(f"lease_ttl_s: must be > 0, got {ttl_s}")
        self.ttl_s = ttl_s
        self._clock = clock
        self._leases: dict[str, Lease] = {}
        self.num_expired = 0

    def __len__(self) -> int:
        return len(self._leases)

    def __contains__(self, request_id: str) -> bool:
        return request_id in self._leases

    @property
    def num_blocks(self) -> int:
        """Blocks held by leases (a block shared by two leases counts twice)."""
        return sum(len(lease.block_ids) for lease in self._leases.values())

    def grant(self, request_id: str, block_ids: list[int], attempt: int = 0) -> Lease:
        if request_id in self._leases:
            raise ValueError(f"request_id: {request_id!r} already holds a lease")
        lease = Lease(request_id, list(block_ids), self._clock() + self.ttl_s, attempt)
        self._leases[request_id] = lease
        return lease

    def renew(self, request_ids: Iterable[str]) -> int:
        """Push back the expiry of the given leases; unknown ids are ignored. Returns the
        number renewed."""
        expires_at = self._clock() + self.ttl_s
        renewed = 0
        for request_id in request_ids:
            lease = self._leases.get(request_id)
            if lease is not None:
                lease.expires_at = expires_at
                renewed += 1
        return renewed

    def get(self, request_id: str) -> Lease | None:
        return self._leases.get(request_id)

    def end(self, request_id: str) -> Lease | None:
        """Remove a lease (pulled or aborted); None if it does not exist."""
        return self._leases.pop(request_id, None)

    def expire(self) -> list[Lease]:
        """Remove and return the leases whose time is up."""
        now = self._clock()
        expired = [lease for lease in self._leases.values() if lease.expires_at <= now]
        for lease in expired:
            del self._leases[lease.request_id]
        self.num_expired += len(expired)
        return expired
