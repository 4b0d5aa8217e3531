"""Dispatch policies, with exact expectations (no cluster)."""

from __future__ import annotations

import pytest

from cluster.dispatch import InstanceLoad, RouteRequest
from router.policies import (
    LoadAwarePolicy,
    RoundRobinPolicy,
    make_policy,
    pick_decode,
    pick_prefill,
)


def p(name: str, queued: int) -> InstanceLoad:
    return InstanceLoad(name, "prefill", queued_prompt_tokens=queued)


def d(name: str, free: int, running: int = 0, active: int = 0, total: int = 100) -> InstanceLoad:
    return InstanceLoad(
        name, "decode", free_blocks=free, total_blocks=total, running=running, active=active
    )


def test_prefill_goes_to_the_fewest_queued_tokens_unless_affinity_is_close_enough() -> None:
    loads = [p("a", 500), p("b", 100), d("x", 50)]
    assert pick_prefill(loads) == "b"
    assert pick_prefill(loads, preferred="a", max_imbalance_tokens=400) == "a"
    assert pick_prefill(loads, preferred="a", max_imbalance_tokens=399) == "b"
    assert pick_prefill(loads, preferred="gone") == "b"


def test_decode_prefers_the_fewest_active_requests_among_instances_with_room() -> None:
    # The live count decides while both have room, whatever the (polled) free blocks say.
    assert pick_decode([d("x", 90, active=2), d("y", 40, active=1)]) == "y"
    assert pick_decode([d("x", 40, active=1), d("y", 90, active=1)]) == "y"
    assert pick_decode([d("x", 85, running=2), d("y", 85, running=1)]) == "y"
    # An instance at its reserve (10 of 100 blocks) is passed over, however idle.
    assert pick_decode([d("x", 10, active=0), d("y", 60, active=5)]) == "y"
    # Nowhere has room: the most free blocks.
    assert pick_decode([d("x", 10, active=0), d("y", 5, active=0)]) == "x"
    assert pick_decode([d("x", 40), d("y", 40)], reserve_fraction=0.5) == "x"
    with pytest.raises(ValueError, match="instances"):
        pick_decode([p("a", 0)])


def test_load_aware_policy_keeps_a_prefix_on_the_instance_that_cached_it() -> None:
    policy = LoadAwarePolicy(max_imbalance_tokens=1000)
    loads = [p("a", 0), p("b", 0), d("x", 50)]
    assert policy(RouteRequest("1", 100, prefix_key=7), loads) == ("a", "x")
    # "b" is now less loaded, but "a" holds prefix 7 and is within the bound.
    loads = [p("a", 600), p("b", 0), d("x", 50)]
    assert policy(RouteRequest("2", 100, prefix_key=7), loads) == ("a", "x")
    assert policy(RouteRequest("3", 100, prefix_key=8), loads) == ("b", "x")
    loads = [p("a", 1600), p("b", 0), d("x", 50)]
    assert policy(RouteRequest("4", 100, prefix_key=7), loads) == ("b", "x")


def test_colocated_loads_route_to_one_instance() -> None:
    loads = [
        InstanceLoad("c0", "colocated", free_blocks=10, total_blocks=100),
        InstanceLoad("c1", "colocated", free_blocks=90, total_blocks=100),
    ]
    assert LoadAwarePolicy()(RouteRequest("1", 5), loads) == ("c1", None)


def test_round_robin_cycles_each_pool() -> None:
    policy = make_policy("round-robin")
    assert isinstance(policy, RoundRobinPolicy)
    loads = [p("a", 0), p("b", 0), d("x", 1), d("y", 1), d("z", 1)]
    picks = [policy(RouteRequest(str(i), 1), loads) for i in range(4)]
    assert picks == [("a", "x"), ("b", "y"), ("a", "z"), ("b", "x")]
    with pytest.raises(ValueError, match="policy"):
        make_policy("random")
