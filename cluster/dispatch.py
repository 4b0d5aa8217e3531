"""Choosing instances for a request: the inputs a routing policy sees, and the default.

A policy is a function of the request (its size and a prefix key) and each serving
instance's load, returning the instance that gets the prompt and, when disaggregated,
the decode instance it hands off to. Load is the cluster's own count of what it has
sent (current to the request) plus the instance's last polled stats (a moment old).
Pure Python, no Ray: the router's policies (``router/policies.py``) plug in here.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class RouteRequest:
    request_id: str
    num_prompt_tokens: int  # exact for token ids, estimated for text
    prefix_key: int | None = None  # identifies the prompt's first block, for cache affinity


@dataclass(frozen=True)
class InstanceLoad:
    name: str
    role: str  # "prefill" | "decode" | "colocated"
    queued_prompt_tokens: int = 0  # sent to it, first token not back yet
    active: int = 0  # routed to it (as prompt or decode destination), not finished
    free_blocks: int = 0  # last polled
    total_blocks: int = 0
    running: int = 0  # last polled


# A decode instance with no more free KV blocks than this share of its cache counts as
# full: the router's default decode pick, and the planner's simulator, pass it over.
DECODE_RESERVE_FRACTION = 0.1


def decode_preference(
    free: float, capacity: float, active: int, reserve_fraction: float = DECODE_RESERVE_FRACTION
) -> tuple[int, float, float]:
    """The order decode instances are picked in, lowest first; the router's default pick
    and the planner's simulator both use it. With room (``free`` KV above
    ``reserve_fraction`` of ``capacity``): the fewest active requests, then the most free
    KV. Without: the most free KV, then the fewest active."""
    if free > capacity * reserve_fraction:
        return (0, active, -free)
    return (1, -free, active)


# (request, loads of the serving instances) -> (prompt instance, decode instance or None)
RoutePolicy = Callable[[RouteRequest, Sequence[InstanceLoad]], tuple[str, str | None]]


def least_loaded(loads: Mapping[str, float]) -> str:
    """The instance with the smallest load; ties go to the first in iteration order."""
    if not loads:
        raise ValueError("instances: none to choose from")
    return min(loads, key=lambda name: loads[name])


def default_policy(request: RouteRequest, loads: Sequence[InstanceLoad]) -> tuple[str, str | None]:
    """Fewest queued prompt tokens for the prompt; fewest active requests to decode."""
    prefill = {x.name: x.queued_prompt_tokens for x in loads if x.role == "prefill"}
    decode = {x.name: x.active for x in loads if x.role != "prefill"}
    dest = least_loaded(decode)
    if not prefill:
        return dest, None
    return least_loaded(prefill), dest
