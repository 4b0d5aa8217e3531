"""Role selectors and plan pinning over a list of nodes (pure Python, exact answers)."""

from __future__ import annotations

import pytest

from cluster.placement import (
    NODE_ID_LABEL,
    Node,
    PlannedInstance,
    bundle_selectors,
    check_roles,
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
    assert bundle_selectors({ROLE: "decode"}, 2, NODES[1]) == [
        {ROLE: "decode", NODE_ID_LABEL: "b"}
    ] * 2


def test_pin_plan() -> None:
    sel = role_selectors({ROLE: "prefill"}, {ROLE: "decode"})
    plan = [PlannedInstance("prefill-0", "prefill", 2, 1, (0,)),
            PlannedInstance("decode-0", "decode", 1, 1, (1,))]  # fmt: skip
    got = pin_plan(plan, 2, NODES, {"CPU": 2.0}, sel)
    pinned = {k: v.node_id if v else None for k, v in got.items()}
    assert pinned == {"prefill-0": "a", "decode-0": "b"}
    with pytest.raises(ValueError, match="^plan: needs 3 nodes, the Ray cluster has 2 live"):
        pin_plan(plan, 3, NODES, {"CPU": 1.0}, sel)
    with pytest.raises(ValueError, match=r"^plan: instance prefill-0 \(prefill, tp2 pp1\) does not "
                       r"fit on node 0 \(10.0.0.1\): the plan puts CPU=6 there, it has CPU=4"):
        pin_plan(plan, 2, NODES, {"CPU": 3.0}, sel)
    swapped = [PlannedInstance("prefill-0", "prefill", 1, 1, (1,))]
    with pytest.raises(ValueError, match="^plan: instance prefill-0 .* lacks the labels"):
        pin_plan(swapped, 2, NODES, {"CPU": 1.0}, sel)
    spread = [PlannedInstance("prefill-0", "prefill", 1, 2, (0, 1))]
    assert pin_plan(spread, 2, NODES, {"CPU": 1.0}, sel) == {"prefill-0": None}
