"""Which Ray nodes may host which instance: role label selectors and plan pinning.

An operator labels nodes at ``ray start --labels baton.io/role=prefill`` (a Kubernetes
node group's pods the same way) and gives ``baton serve --prefill-nodes
baton.io/role=prefill``; a role with no selector may use any node, so an unlabelled
cluster works as before. A plan (``baton serve --plan``) pins each instance to a node.

Both become Ray's ``bundle_label_selector`` on the instance's placement group (Ray 2.49+;
a node's id is its built-in label ``ray.io/node-id``). The group is what reserves the
instance's resources, so the selector and the reservation are one atomic step for every
rank, and a TP x PP instance keeps STRICT_PACK; node-affinity scheduling, the other
option, applies to single tasks and actors and cannot be combined with a placement group.

Ray leaves a group that no node can satisfy pending forever, so everything is checked
against the live nodes (:func:`alive_nodes`) before anything starts: a label that no node
has, or a plan that needs more nodes, GPUs or CPUs than there are, is a ``ValueError``
naming the role or the instance and why.

A plan that spreads an instance's PP stages over nodes pins each stage's TP ranks to its
node (each bundle its own ``ray.io/node-id``; the group is then PACK, as STRICT_PACK
would need one node); a stage's node that does not exist, lacks the role's labels or has
no room is refused like a whole instance's.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

NODE_ID_LABEL = "ray.io/node-id"
ROLE_FIELDS = {"prefill": "prefill_nodes", "decode": "decode_nodes", "colocated": "decode_nodes"}


@dataclass(frozen=True)
class Node:
    """A live Ray node as placement sees it."""

    node_id: str
    ip: str
    labels: Mapping[str, str] = field(default_factory=dict)
    resources: Mapping[str, float] = field(default_factory=dict)

    def matches(self, selector: Mapping[str, str]) -> bool:
        return all(self.labels.get(k) == v for k, v in selector.items())

    def fits(self, need: Mapping[str, float]) -> bool:
        return all(self.resources.get(k, 0.0) >= v for k, v in need.items())


def parse_selector(field_name: str, text: str) -> dict[str, str]:
    """``KEY=VALUE[,KEY=VALUE]`` (a node must have every label); ValueError naming the flag."""
    selector: dict[str, str] = {}
    for item in text.split(","):
        key, sep, value = item.strip().partition("=")
        if not sep or not key.strip() or not value.strip():
            raise ValueError(f"{field_name}: must be KEY=VALUE[,KEY=VALUE...], got {text!r}")
        selector[key.strip()] = value.strip()
    return selector


def role_selectors(
    prefill_nodes: Mapping[str, str] | None, decode_nodes: Mapping[str, str] | None
) -> dict[str, dict[str, str]]:
    """Per role, the labels its nodes must have ({} = any node)."""
    out: dict[str, dict[str, str]] = {}
    for name, selector in (("prefill_nodes", prefill_nodes), ("decode_nodes", decode_nodes)):
        if selector is None:
            selector = {}
        if not isinstance(selector, Mapping) or not all(
            isinstance(k, str) and k and isinstance(v, str) and v for k, v in selector.items()
        ):
            raise ValueError(f"{name}: must map label names to values (strings), got {selector!r}")
        out[name] = dict(selector)
    return {role: out[name] for role, name in ROLE_FIELDS.items()}


def alive_nodes() -> list[Node]:
    """The Ray cluster's live nodes, ordered by IP then id (the order plan nodes map to)."""
    import ray

    nodes = [
        Node(n["NodeID"], n["NodeManagerAddress"], dict(n.get("Labels") or {}),
             dict(n.get("Resources") or {}))
        for n in ray.nodes() if n.get("Alive")
    ]  # fmt: skip
    return sorted(nodes, key=lambda n: (_ip_key(n.ip), n.node_id))


def _ip_key(ip: str) -> tuple[int, ...] | tuple[str]:
    parts = ip.split(".")
    return tuple(int(p) for p in parts) if all(p.isdigit() for p in parts) else (ip,)


def check_roles(
    selectors: Mapping[str, Mapping[str, str]], roles: Sequence[str], nodes: Sequence[Node]
) -> None:
    """Every role in use with a selector has a live node carrying its labels."""
    for role in dict.fromkeys(roles):
        selector = selectors.get(role) or {}
        if selector and not any(n.matches(selector) for n in nodes):
            shown = "; ".join(f"{n.ip}: {_user_labels(n)}" for n in nodes) or "none"
            raise ValueError(
                f"{ROLE_FIELDS[role]}: no node of the Ray cluster has labels "
                f"{_fmt(selector)} (live nodes and their labels: {shown})"
            )


def _user_labels(node: Node) -> str:
    return _fmt({k: v for k, v in node.labels.items() if not k.startswith("ray.io/")}) or "{}"


def _fmt(selector: Mapping[str, str]) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(selector.items()))


def bundle_selectors(
    selector: Mapping[str, str], world_size: int, stages: Sequence[Node] | None = None
) -> list[dict[str, str]] | None:
    """The placement group's ``bundle_label_selector``: the role's labels on every rank,
    plus, when pinned, the id of the node of each rank's PP stage (``stages``: one node per
    stage; ranks are stage-major, ``rank = stage * tp + tp_rank``); None when nothing
    restricts the instance."""
    if not selector and not stages:
        return None
    if stages and world_size % len(stages):
        raise ValueError(f"{world_size} ranks do not split into {len(stages)} stages")
    tp = world_size // len(stages) if stages else world_size
    out = []
    for rank in range(world_size):
        labels = dict(selector)
        if stages:
            labels[NODE_ID_LABEL] = stages[rank // tp].node_id
        out.append(labels)
    return out


def one_node(selectors: Sequence[Mapping[str, str]] | None) -> bool:
    """Whether every rank may share one node: the ranks' selectors do not pin them to
    different nodes (then STRICT_PACK cannot hold, and the group uses PACK)."""
    pinned = {s.get(NODE_ID_LABEL) for s in selectors or ()}
    return len(pinned) <= 1


@dataclass(frozen=True)
class PlannedInstance:
    """A plan instance as the cluster needs it: role, layout and the node of each stage."""

    name: str
    role: str
    tp: int
    pp: int
    nodes: tuple[int, ...]  # plan node per stage


def pin_plan(
    instances: Sequence[PlannedInstance],
    plan_nodes: int,
    nodes: Sequence[Node],
    bundle: Mapping[str, float],
    selectors: Mapping[str, Mapping[str, str]],
) -> dict[str, tuple[Node, ...]]:
    """Each planned instance's Ray node per PP stage: plan node i is the i-th live node
    (by IP). A TP x PP instance on one node keeps all its ranks there; one whose stages the
    plan spreads over nodes has each stage's TP ranks pinned to that stage's node.

    ValueError naming the first instance that cannot be placed and why: its stages do not
    match its pp, a stage's plan node does not exist, does not carry the role's labels,
    or lacks room for the ranks put there (all instances on a node together)."""
    if plan_nodes > len(nodes):
        raise ValueError(
            f"plan: needs {plan_nodes} nodes, the Ray cluster has {len(nodes)} live "
            f"({', '.join(n.ip for n in nodes) or 'none'})"
        )
    used: dict[str, dict[str, float]] = {}
    out: dict[str, tuple[Node, ...]] = {}
    for inst in instances:
        if len(inst.nodes) != inst.pp:
            raise ValueError(
                f"plan: instance {inst.name} ({inst.role}, tp{inst.tp} pp{inst.pp}) has "
                f"{len(inst.nodes)} stages, not {inst.pp}"
            )
        selector = selectors.get(inst.role) or {}
        stages = []
        for stage, index in enumerate(inst.nodes):
            where = f"stage {stage} " if len(set(inst.nodes)) > 1 else ""
            if not 0 <= index < len(nodes):
                raise ValueError(
                    f"plan: instance {inst.name} ({inst.role}) {where}is planned on node "
                    f"{index}, the Ray cluster has nodes 0-{len(nodes) - 1}"
                )
            node = nodes[index]
            if not node.matches(selector):
                raise ValueError(
                    f"plan: instance {inst.name} ({inst.role}) {where}is planned on node "
                    f"{index} ({node.ip}), which lacks the labels {_fmt(selector)}"
                )
            total = used.setdefault(node.node_id, {})
            for key, value in bundle.items():
                total[key] = total.get(key, 0.0) + value * inst.tp
            if not node.fits(total):
                raise ValueError(
                    f"plan: instance {inst.name} ({inst.role}, tp{inst.tp} pp{inst.pp}) "
                    f"{where}does not fit on node {index} ({node.ip}): the plan puts "
                    f"{_fmt_res(total)} there, it has {_fmt_res(node.resources, total)}"
                )
            stages.append(node)
        out[inst.name] = tuple(stages)
    return out


def _fmt_res(res: Mapping[str, float], keys: Any = None) -> str:
    keys = keys if keys is not None else res
    return ", ".join(f"{k}={res.get(k, 0.0):g}" for k in keys)
