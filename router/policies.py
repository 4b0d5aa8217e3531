"""Dispatch policies: which prefill instance gets a prompt, which decode instance it goes
on to. Pure functions over ``cluster.dispatch.InstanceLoad`` figures, plus two small
policy objects that keep the state a policy needs (an affinity table, a cursor).

- Prefill: fewest queued prompt tokens, with prefix-cache affinity: a prompt whose first
  block was last sent to instance X goes to X again (its blocks are likely still cached
  there) unless X is more than ``max_imbalance_tokens`` behind the least loaded one.
- Decode: the fewest requests routed to it and not finished, among the instances whose
  KV cache has room (free blocks above ``reserve_fraction`` of it); the most free blocks
  when none has. The live count comes first because free blocks are polled, a moment
  old: by them alone a burst would all go to the instance that looked emptiest. And
  while memory is plentiful, what slows a decode step is the batch it runs.
- Round-robin, as an option, for both.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

from cluster.dispatch import (
    DECODE_RESERVE_FRACTION,
    InstanceLoad,
    RouteRequest,
    decode_preference,
)


def pick_prefill(
    loads: Sequence[InstanceLoad], preferred: str | None = None, max_imbalance_tokens: int = 2048
) -> str:
    """Fewest queued prompt tokens; ``preferred`` wins while within the imbalance bound."""
    prefill = [x for x in loads if x.role == "prefill"]
    if not prefill:
        raise ValueError("instances: no prefill instance to choose from")
    least = min(prefill, key=lambda x: x.queued_prompt_tokens)
    for x in prefill:
        if x.name == preferred and (
            x.queued_prompt_tokens - least.queued_prompt_tokens <= max_imbalance_tokens
        ):
            return x.name
    return least.name


def pick_decode(
    loads: Sequence[InstanceLoad], reserve_fraction: float = DECODE_RESERVE_FRACTION
) -> str:
    """``decode_preference`` on the polled free blocks and the live active count, then
    the fewest running."""
    decode = [x for x in loads if x.role != "prefill"]
    if not decode:
        raise ValueError("instances: no decode instance to choose from")

    def key(x: InstanceLoad) -> tuple[tuple[int, float, float], int]:
        room = decode_preference(x.free_blocks, x.total_blocks, x.active, reserve_fraction)
        return room, x.running

    return min(decode, key=key).name


class LoadAwarePolicy:
    """The default: :func:`pick_prefill` with an LRU affinity table, :func:`pick_decode`."""

    def __init__(self, max_imbalance_tokens: int = 2048, affinity_entries: int = 4096):
        self.max_imbalance_tokens = max_imbalance_tokens
        self._entries = affinity_entries
        self._affinity: OrderedDict[int, str] = OrderedDict()

    def __call__(
        self, request: RouteRequest, loads: Sequence[InstanceLoad]
    ) -> tuple[str, str | None]:
        dest = pick_decode(loads)
        if not any(x.role == "prefill" for x in loads):
            return dest, None  # colocated: the decode pick does both
        key = request.prefix_key
        preferred = None if key is None else self._affinity.get(key)
        first = pick_prefill(loads, preferred, self.max_imbalance_tokens)
        if key is not None:
            self._affinity[key] = first
            self._affinity.move_to_end(key)
            while len(self._affinity) > self._entries:
                self._affinity.popitem(last=False)
        return first, dest


class RoundRobinPolicy:
    def __init__(self) -> None:
        self._turn = 0

    def __call__(
        self, request: RouteRequest, loads: Sequence[InstanceLoad]
    ) -> tuple[str, str | None]:
        prefill = sorted(x.name for x in loads if x.role == "prefill")
        decode = sorted(x.name for x in loads if x.role != "prefill")
        if not decode:
            raise ValueError("instances: no decode instance to choose from")
        turn, self._turn = self._turn, self._turn + 1
        dest = decode[turn % len(decode)]
        return (prefill[turn % len(prefill)], dest) if prefill else (dest, None)


POLICIES = {"load": LoadAwarePolicy, "round-robin": RoundRobinPolicy}


def make_policy(name: str) -> LoadAwarePolicy | RoundRobinPolicy:
    if name not in POLICIES:
        raise ValueError(f"policy: must be one of {', '.join(POLICIES)}, got {name!r}")
    return POLICIES[name]()
