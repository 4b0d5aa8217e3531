"""`baton apply`'s layout check, alone: a plan whose layouts (TP x PP) or mode differ
from the running cluster's is refused naming the instance; against a real server in
tests/cluster/test_admin_cli.py."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from cluster.admin_cli import layout_refusal

PLAN = {"mode": "disaggregated", "prefill": 2, "decode": 1,
        "prefill_parallel": (2, 1), "decode_parallel": (1, 1)}  # fmt: skip


def _status(mode: str = "disaggregated", **layouts: tuple[int, int]) -> Any:
    instances = [
        SimpleNamespace(name=name, role=name.rsplit("_", 1)[0], tp=tp, pp=pp)
        for name, (tp, pp) in layouts.items()
    ]
    return SimpleNamespace(mode=mode, instances=instances)


def test_matching_layouts_apply() -> None:
    status = _status(prefill_0=(2, 1), decode_0=(1, 1), decode_1=(1, 1))
    assert layout_refusal(PLAN, status) is None


def test_a_different_layout_is_refused_naming_the_instance() -> None:
    status = _status(prefill_0=(2, 1), decode_0=(1, 1), decode_1=(1, 2))
    refusal = layout_refusal(PLAN, status)
    assert refusal is not None
    assert refusal.startswith("instance decode_1: runs tp1pp2 but the plan wants tp1pp1")


def test_instances_not_serving_are_skipped_but_a_role_must_be_seen() -> None:
    assert (
        layout_refusal(PLAN, _status(prefill_0=(0, 0), prefill_1=(2, 1), decode_0=(1, 1))) is None
    )
    refusal = layout_refusal(PLAN, _status(prefill_0=(2, 1), decode_0=(0, 0)))
    assert refusal is not None and refusal.startswith("decode: no instance is serving")


def test_a_mode_change_is_refused() -> None:
    plan = {"mode": "colocated", "prefill": 0, "decode": 2, "decode_parallel": (1, 1)}
    refusal = layout_refusal(plan, _status(prefill_0=(1, 1), decode_0=(1, 1)))
    assert refusal is not None and "it is colocated but the cluster runs disaggregated" in refusal
    assert layout_refusal(plan, _status("colocated", colocated_0=(1, 1))) is None
