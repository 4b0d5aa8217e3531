"""Putting instances on GPUs.

High node affinity (``Allocator``): any instance may go anywhere, so pack them: one that
fits in a node goes whole to the fullest node that still has room (best fit, so big
instances later still find empty nodes); a bigger one takes one node per group of stages.
Inside a node a TP group takes an aligned block (GPUs 0-1, 2-3, ... for tp=2) when one is
free, because NVLink switches and PCIe trees are laid out that way.

Low node affinity (``place_units``): a unit is a set of prefill and decode instances whose
PP stages holding the same layers share a node, so KV moves over NVLink. A unit spans
``inter_op`` nodes; units are laid side by side in groups of ``inter_op`` nodes.
"""

from __future__ import annotations

from dataclasses import dataclass

from cluster.planner._validate import positive_int
from cluster.planner.plan import InstancePlan, Stage

Layout = tuple[int, int]


class Allocator:
    """Free GPUs per node, handed out as aligned TP blocks."""

    def __init__(self, nodes: int, gpus_per_node: int) -> None:
        self.gpus_per_node = gpus_per_node
        self.free = [list(range(gpus_per_node)) for _ in range(nodes)]

    def _take(self, node: int, tp: int) -> tuple[int, ...]:
        free = self.free[node]
        aligned = [
            s for s in range(0, self.gpus_per_node, tp) if all(g in free for g in range(s, s + tp))
        ]
        block = list(range(aligned[0], aligned[0] + tp)) if aligned else sorted(free)[:tp]
        for g in block:
            free.remove(g)
        return tuple(block)

    def place(self, role: str, tp: int, pp: int) -> InstancePlan | None:
        """An instance's stages on free GPUs, or None when the cluster has no room."""
        size = tp * pp
        if size <= self.gpus_per_node:
            fits = [n for n, f in enumerate(self.free) if len(f) >= size]
            if not fits:
                return None
            node = min(fits, key=lambda n: (len(self.free[n]), n))
            return InstancePlan(
                role, tp, pp, tuple(Stage(node, self._take(node, tp)) for _ in range(pp))
            )
        if sum(len(f) // tp for f in self.free) < pp:
            return None
        stages: list[Stage] = []
        node = 0
        while len(stages) < pp:
            if len(self.free[node]) < tp:
                node += 1
                continue
            stages.append(Stage(node, self._take(node, tp)))
        return InstancePlan(role, tp, pp, tuple(stages))


@dataclass(frozen=True)
class Unit:
    """Low-affinity building block: ``n_prefill`` + ``n_decode`` instances over
    ``inter_op`` nodes; each instance has ``pp_local`` stages on every one of them."""

    inter_op: int
    prefill: tuple[int, int]  # (tp, pp_local)
    decode: tuple[int, int]
    n_prefill: int
    n_decode: int

    def __post_init__(self) -> None:
        for name in ("inter_op", "n_prefill", "n_decode"):
            positive_int(getattr(self, name), name)

    @property
    def prefill_layout(self) -> Layout:
        return (self.prefill[0], self.prefill[1] * self.inter_op)

    @property
    def decode_layout(self) -> Layout:
        return (self.decode[0], self.decode[1] * self.inter_op)

    @property
    def gpus_per_node(self) -> int:
        return (
            self.n_prefill * self.prefill[0] * self.prefill[1]
            + self.n_decode * self.decode[0] * self.decode[1]
        )

    @property
    def num_gpus(self) -> int:
        return self.inter_op * self.gpus_per_node


def units_capacity(unit: Unit, nodes: int, gpus_per_node: int) -> int:
    """How many copies of ``unit`` the cluster holds."""
    return (nodes // unit.inter_op) * (gpus_per_node // unit.gpus_per_node)


def _unit_instances(unit: Unit, first_node: int, offset: int) -> list[InstancePlan]:
    out: list[InstancePlan] = []
    cursor = offset
    segments = [("prefill", unit.prefill)] * unit.n_prefill + [
        ("decode", unit.decode)
    ] * unit.n_decode
    for role, (tp, pp_local) in segments:
        stages = [
            Stage(first_node + j, tuple(range(cursor + s * tp, cursor + (s + 1) * tp)))
            for j in range(unit.inter_op)
            for s in range(pp_local)
        ]
        out.append(InstancePlan(role, tp, pp_local * unit.inter_op, tuple(stages)))
        cursor += tp * pp_local
    return out


def place_units(unit: Unit, count: int, nodes: int, gpus_per_node: int) -> list[InstancePlan]:
    """``count`` copies of ``unit``; ValueError if they do not fit."""
    per_group = gpus_per_node // unit.gpus_per_node
    if count > units_capacity(unit, nodes, gpus_per_node):
        raise ValueError(
            f"rate: needs {count} units of {unit.num_gpus} GPUs, the cluster holds "
            f"{units_capacity(unit, nodes, gpus_per_node)}"
        )
    out: list[InstancePlan] = []
    for u in range(count):
        group, slot = divmod(u, per_group)
        out.extend(_unit_instances(unit, group * unit.inter_op, slot * unit.gpus_per_node))
    return out
