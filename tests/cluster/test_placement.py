"""Role selectors and plan pinning over a list of nodes (pure Python, exact answers)."""

from __future__ import annotations

import pytest

from cluster.placement import (
    NODE_ID_LABEL,
    Node,
    PlannedInstance,
    bundle_selectors,
    check_roles,
    one_node,
    parse_selector,
    pin_plan,
    role_selectors,
)

ROLE = "baton.io/role"
NODES = [
    Node("a", "10.0.0.1", {ROLE: "prefill"}, {"CPU": 4.0}),
    Node("b", "10.0.0.2", {ROLE: "decode"}, {"CPU": 2.0}),
]


def test_parse_selector() -> None:
    assert parse_selector("f", "baton.io/role=prefill, zone=a") == {ROLE: "prefill", "zone": "a"}
    for bad in ("", "x", "=v", "k=", "k=v,"):
        with pytest.raises(ValueError, match="^prefill-nodes: must be KEY=VALUE"):
            parse_selector("prefill-nodes", bad)


def test_role_selectors_and_missing_label() -> None:
    sel = role_selectors({ROLE: "prefill"}, None)
    assert sel == {"prefill": {ROLE: "prefill"}, "decode": {}, "colocated": {}}
    check_roles(sel, ["prefill", "decode"], NODES)
    with pytest.raises(ValueError, match="^decode_nodes: no node of the Ray cluster has labels "
                       "baton.io/role=gpu .*10.0.0.2: baton.io/role=decode"):
        check_roles(role_selectors(None, {ROLE: "gpu"}), ["prefill", "decode"], NODES)
    with pytest.raises(ValueError, match="^prefill_nodes: must map"):
        role_selectors({"x": 1}, None)  # type: ignore[dict-item]


def test_bundle_selectors() -> None:
    assert bundle_selectors({}, 2) is None
    assert bundle_selectors({ROLE: "decode"}, 2, [NODES[1]]) == [
        {ROLE: "decode", NODE_ID_LABEL: "b"}
    ] * 2
    # TP2 x PP2 spread by a plan: ranks are stage-major, each stage's ranks on its node.
    assert bundle_selectors({}, 4, NODES) == [
        {NODE_ID_LABEL: "a"}, {NODE_ID_LABEL: "a"}, {NODE_ID_LABEL: "b"}, {NODE_ID_LABEL: "b"}
    ]
    assert one_node(bundle_selectors({ROLE: "decode"}, 2, [NODES[1], NODES[1]]))
    assert one_node(None) and not one_node(bundle_selectors({}, 4, NODES))


def test_pin_plan() -> None:
    sel = role_selectors({ROLE: "prefill"}, {ROLE: "decode"})
    plan = [PlannedInstance("prefill-0", "prefill", 2, 1, (0,)),
            PlannedInstance("decode-0", "decode", 1, 1, (1,))]  # fmt: skip
    got = pin_plan(plan, 2, NODES, {"CPU": 2.0}, sel)
    pinned = {k: [n.node_id for n in v] for k, v in got.items()}
    assert pinned == {"prefill-0": ["a"], "decode-0": ["b"]}
    with pytest.raises(ValueError, match="^plan: needs 3 nodes, the Ray cluster has 2 live"):
        pin_plan(plan, 3, NODES, {"CPU": 1.0}, sel)
    with pytest.raises(ValueError, match=r"^plan: instance prefill-0 \(prefill, tp2 pp1\) does not "
                       r"fit on node 0 \(10.0.0.1\): the plan puts CPU=6 there, it has CPU=4"):
        pin_plan(plan, 2, NODES, {"CPU": 3.0}, sel)
    swapped = [PlannedInstance("prefill-0", "prefill", 1, 1, (1,))]
    with pytest.raises(ValueError, match="^plan: instance prefill-0 .* lacks the labels"):
        pin_plan(swapped, 2, NODES, {"CPU": 1.0}, sel)
    anywhere = role_selectors(None, None)
    spread = [PlannedInstance("prefill-0", "prefill", 1, 2, (0, 1))]
    assert pin_plan(spread, 2, NODES, {"CPU": 1.0}, anywhere) == {"prefill-0": tuple(NODES)}


def test_pin_plan_pp_stages_across_nodes() -> None:
    """Each PP stage on its plan node, checked per stage: labels, room, existence."""
    anywhere = role_selectors(None, None)
    tp2pp2 = [PlannedInstance("prefill-0", "prefill", 2, 2, (0, 1))]
    got = pin_plan(tp2pp2, 2, NODES, {"CPU": 1.0}, anywhere)
    assert [n.node_id for n in got["prefill-0"]] == ["a", "b"]
    # Stage 1's node (b, 2 CPUs) cannot hold a second TP2 stage's ranks beside decode's.
    busy = [*tp2pp2, PlannedInstance("decode-0", "decode", 1, 1, (1,))]
    with pytest.raises(ValueError, match=r"^plan: instance decode-0 \(decode, tp1 pp1\) does "
                       r"not fit on node 1 \(10.0.0.2\): the plan puts CPU=3 there, it has CPU=2"):
        pin_plan(busy, 2, NODES, {"CPU": 1.0}, anywhere)
    labelled = role_selectors({ROLE: "prefill"}, None)
    with pytest.raises(ValueError, match=r"^plan: instance prefill-0 \(prefill\) stage 1 is "
                       r"planned on node 1 \(10.0.0.2\), which lacks the labels "
                       r"baton.io/role=prefill"):
        pin_plan(tp2pp2, 2, NODES, {"CPU": 1.0}, labelled)
    with pytest.raises(ValueError, match=r"^plan: instance prefill-0 \(prefill, tp2 pp2\) "
                       r"stage 1 does not fit on node 1 \(10.0.0.2\): the plan puts CPU=4"):
        pin_plan(tp2pp2, 2, NODES, {"CPU": 2.0}, anywhere)
    short = [PlannedInstance("prefill-0", "prefill", 1, 2, (0,))]
    with pytest.raises(ValueError, match=r"^plan: instance prefill-0 \(prefill, tp1 pp2\) has "
                       r"1 stages, not 2"):
        pin_plan(short, 1, NODES, {"CPU": 1.0}, anywhere)
    beyond = [PlannedInstance("prefill-0", "prefill", 1, 2, (0, 5))]
    with pytest.raises(ValueError, match=r"stage 1 is planned on node 5, the Ray cluster has "
                       r"nodes 0-1"):
        pin_plan(beyond, 2, NODES, {"CPU": 1.0}, anywhere)
