from __future__ import annotations

import pytest

from cluster.planner.placement import Allocator, Unit, place_units, units_capacity
from cluster.planner.plan import Stage


def test_tp_groups_take_aligned_blocks_and_best_fit_nodes() -> None:
    alloc = Allocator(nodes=2, gpus_per_node=8)
    a = alloc.place("decode", tp=1, pp=1)
    b = alloc.place("prefill", tp=2, pp=1)
    c = alloc.place("prefill", tp=4, pp=1)
    assert a is not None and b is not None and c is not None
    assert a.stages == (Stage(0, (0,)),)
    assert b.stages == (Stage(0, (2, 3)),)  # aligned: 1 is free but 1-2 is not a block
    assert c.stages == (Stage(0, (4, 5, 6, 7)),)  # the fullest node that still fits
    d = alloc.place("decode", tp=8, pp=1)
    assert d is not None and d.stages == (Stage(1, tuple(range(8))),)
    assert alloc.place("decode", tp=2, pp=1) is None  # only GPU 1 of node 0 is left


def test_an_instance_bigger_than_a_node_spans_nodes_by_stage() -> None:
    alloc = Allocator(nodes=3, gpus_per_node=4)
    inst = alloc.place("prefill", tp=4, pp=3)
    assert inst is not None
    assert [s.node for s in inst.stages] == [0, 1, 2]
    assert inst.nodes == (0, 1, 2) and inst.num_gpus == 12
    assert alloc.place("decode", tp=1, pp=1) is None


def test_low_affinity_units_share_nodes_stage_by_stage() -> None:
    unit = Unit(inter_op=2, prefill=(2, 1), decode=(1, 2), n_prefill=1, n_decode=1)
    assert unit.gpus_per_node == 4 and unit.num_gpus == 8
    assert unit.prefill_layout == (2, 2) and unit.decode_layout == (1, 4)
    assert units_capacity(unit, nodes=4, gpus_per_node=8) == 4
    instances = place_units(unit, count=3, nodes=4, gpus_per_node=8)
    assert [(i.role, i.tp, i.pp) for i in instances] == [("prefill", 2, 2), ("decode", 1, 4)] * 3
    assert instances[0].stages == (Stage(0, (0, 1)), Stage(1, (0, 1)))
    assert instances[1].stages == (Stage(0, (2,)), Stage(0, (3,)), Stage(1, (2,)), Stage(1, (3,)))
    assert instances[2].stages[0] == Stage(0, (4, 5))  # the second unit: same nodes, next GPUs
    assert instances[4].stages[0] == Stage(2, (0, 1))  # the third: the next pair of nodes
    with pytest.raises(ValueError, match="^rate: needs 5 units of 8 GPUs, the cluster holds 4"):
        place_units(unit, count=5, nodes=4, gpus_per_node=8)
