"""All the Ray wiring in one place: start or join Ray, place instances, start them.

No address starts an embedded local Ray (never a ``ray start`` cluster found on this
machine); an address joins an existing cluster within a bounded time
(``cluster.ray_connect``). Each instance is one placement group with a bundle per rank (one GPU
each when the cluster has GPUs, otherwise CPUs; torch's thread count is set to the CPUs
given): rank 0 is an :class:`~cluster.actors.InstanceActor`, every other rank of a
TP x PP instance a :class:`~cluster.ranks.RankActor`. The group is STRICT_PACK (every
rank on one node: the TP all-reduces and the instance's store want that) when a node
can hold it, PACK otherwise. Actors are restarted by Ray up to ``MAX_RESTARTS`` times;
a TP x PP instance is only ever restarted as a whole (:func:`restart`). Handles to the
other instances are passed in through ``start()``, never looked up from inside.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

import ray
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from cluster import placement, ray_connect
from cluster.actors import INSTANCE_RUNTIME_ENV, InstanceActor, InstanceSpec
from cluster.ranks import RankActor
from cluster.ray_connect import DEFAULT_CONNECT_TIMEOUT_S

logger = logging.getLogger(__name__)

MAX_RESTARTS = 3
# Control calls (add, abort, renew, send) run on actor threads while the worker loop
# steps the engine on its own thread.
ACTOR_CONCURRENCY = 32
# Health pings run on a thread of their own (a Ray concurrency group), never queued
# behind control calls: those that wait on the worker loop (``stats``) are held for as
# long as the engine's step lasts, and a busy instance must not look hung for that.
HEALTH_GROUP = "health"


def remote_class(cls: type, name: str | None = None) -> Any:
    """``cls`` (an actor's plain class with a ``ping``) as a Ray actor class, its ``ping``
    in :data:`HEALTH_GROUP`; ``name``: the class's name in ``ps`` and Ray's tools."""
    base: Any = cls

    def ping(self: Any) -> dict[str, Any]:
        reply: dict[str, Any] = base.ping(self)
        return reply

    body = {"__module__": __name__, "ping": ray.method(concurrency_group=HEALTH_GROUP)(ping)}
    named = type(name or cls.__name__, (cls,), body)
    # Ray's typed overloads of ``remote`` leave out ``concurrency_groups``, its own option.
    return ray.remote(concurrency_groups={HEALTH_GROUP: 1})(named)  # type: ignore[call-overload]


RemoteRank = remote_class(RankActor)


@dataclass
class Instance:
    spec: InstanceSpec
    actor: Any  # ray ActorHandle of rank 0: the instance as everyone else sees it
    group: PlacementGroup
    info: dict[str, Any]
    ranks: list[Any] = field(default_factory=list)  # handles of ranks 1 .. tp * pp - 1

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def actors(self) -> list[Any]:
        return [self.actor, *self.ranks]


def init_ray(
    address: str | None, num_cpus: int, connect_timeout_s: float = DEFAULT_CONNECT_TIMEOUT_S
) -> bool:
    """Start an embedded local Ray or join ``address`` (bounded; see
    ``cluster.ray_connect``); True when this call started Ray."""
    return ray_connect.init_ray(address, num_cpus, connect_timeout_s)


def has_gpus() -> bool:
    return ray.cluster_resources().get("GPU", 0) > 0


def _strategy(
    bundles: list[dict[str, float]], label_selector: list[dict[str, str]] | None = None
) -> str:
    """STRICT_PACK when one node allowed for the instance can hold all its ranks."""
    if len(bundles) == 1 or not placement.one_node(label_selector):
        return "PACK"  # one rank, or PP stages pinned to different nodes by a plan
    need = {k: sum(b.get(k, 0) for b in bundles) for k in bundles[0]}
    selector = label_selector[0] if label_selector else {}
    for node in placement.alive_nodes():
        if node.matches(selector) and node.fits(need):
            return "STRICT_PACK"
    return "PACK"


def _named_class(spec: InstanceSpec) -> Any:
    """Rank 0's actor class, named after the instance (``PrefillInstance_prefill_0``),
    so that ``ps`` (``ray::PrefillInstance_prefill_0``) and Ray's tools tell the
    instances and their roles apart."""
    name = f"{spec.role.capitalize()}Instance_{spec.name.replace('-', '_')}"
    return remote_class(InstanceActor, name)


def create(
    spec: InstanceSpec,
    cpus: float,
    gpus: int,
    timeout_s: float,
    cluster_id: str,
    label_selector: list[dict[str, str]] | None = None,
) -> Instance:
    """Reserve the instance's resources and create its actors (not started yet).
    ``label_selector``: per rank, the node labels its bundle needs (``cluster.placement``)."""
    bundle: dict[str, float] = {"CPU": cpus}
    if gpus:
        bundle["GPU"] = gpus
    bundles = [dict(bundle) for _ in range(spec.world_size)]
    group = placement_group(
        bundles,
        strategy=_strategy(bundles, label_selector),
        name=f"baton-{cluster_id}-{spec.name}",
        bundle_label_selector=label_selector,
    )
    try:
        ray.get(group.ready(), timeout=timeout_s)
    except Exception as e:
        remove_placement_group(group)
        raise TimeoutError(
            f"{spec.name}: no room for {len(bundles)} x {bundle} within {timeout_s:.0f} s "
            f"(cluster has {ray.available_resources()})"
        ) from e

    def options(rank: int) -> dict[str, Any]:
        return dict(
            num_cpus=cpus,
            num_gpus=gpus,
            max_concurrency=ACTOR_CONCURRENCY,
            max_restarts=MAX_RESTARTS,
            runtime_env=INSTANCE_RUNTIME_ENV,  # normal priority: see cluster.actors
            scheduling_strategy=PlacementGroupSchedulingStrategy(
                group, placement_group_bundle_index=rank
            ),
        )

    actor = _named_class(spec).options(**options(0)).remote(spec.to_dict())
    ranks = [
        RemoteRank.options(**options(r)).remote(spec.to_dict(), r)
        for r in range(1, spec.world_size)
    ]
    return Instance(spec, actor, group, {}, ranks)


def start_all(
    instances: list[Instance],
    events_address: str,
    timeout_s: float,
    handles: dict[str, Any] | None = None,
) -> None:
    """Start every instance at once (each rank loads its share of the model) and record
    what they report. ``handles``: every instance's rank 0, for peer calls."""
    handles = handles or {inst.name: inst.actor for inst in instances}
    parallel = [inst for inst in instances if inst.ranks]
    stores = ray.get([inst.actor.rendezvous.remote() for inst in parallel], timeout=timeout_s)
    refs = [inst.actor.start.remote(events_address, handles) for inst in instances]
    rank_refs = [
        [r.start.remote(store, inst.actor) for r in inst.ranks]
        for inst, store in zip(parallel, stores, strict=True)
    ]
    infos = ray.get(refs, timeout=timeout_s)
    rank_infos = [ray.get(group, timeout=timeout_s) for group in rank_refs]
    for inst, info in zip(instances, infos, strict=True):
        inst.info = info
    attached = [
        inst.actor.attach.remote(inst.ranks, [i["endpoint"] for i in infos_])
        for inst, infos_ in zip(parallel, rank_infos, strict=True)
    ]
    ray.get(attached, timeout=timeout_s)


def restart(
    instance: Instance, events_address: str, handles: dict[str, Any], timeout_s: float
) -> None:
    """Start an instance again after a crash. A TP x PP instance restarts as a whole: the
    ranks still running are killed so that Ray brings every rank back fresh (a process
    group that lost a member cannot be trusted), then all start together."""
    if instance.ranks:
        _fresh(instance.actors, timeout_s)
    start_all([instance], events_address, timeout_s, handles)


def _fresh(actors: list[Any], timeout_s: float) -> None:
    """Until every actor is a fresh, unstarted process; raises when one is gone for good."""
    for actor in actors:
        if _started(actor, timeout_s):
            ray.kill(actor, no_restart=False)
    deadline = time.monotonic() + timeout_s
    waiting = list(actors)
    while waiting:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{len(waiting)} ranks did not come back within {timeout_s:.0f}s")
        waiting = [a for a in waiting if _started(a, timeout_s) is not False]
        time.sleep(0.2)


def _started(actor: Any, timeout_s: float) -> bool | None:
    """Whether ``actor`` is started; None while Ray restarts it or it is busy."""
    try:
        return bool(ray.get(actor.ping.remote(), timeout=min(10.0, timeout_s))["started"])
    except (ray.exceptions.GetTimeoutError, ray.exceptions.ActorUnavailableError):
        return None


def destroy(instances: list[Instance], timeout_s: float = 10.0) -> None:
    """Stop workers politely, then kill the actors and free their placement groups."""
    # Rank 0 first: its stop broadcasts STOP, which ends the other ranks' serving.
    refs = [inst.actor.stop.remote() for inst in instances]
    refs += [r.stop.remote() for inst in instances for r in inst.ranks]
    try:
        ray.get(refs, timeout=timeout_s)
    except Exception as e:  # a dead actor cannot stop; it is killed below anyway
        logger.warning("stopping instances: %s", e)
    for inst in instances:
        for actor in inst.actors:
            ray.kill(actor, no_restart=True)
        remove_placement_group(inst.group)
