"""All the Ray wiring in one place: start or join Ray, place instances, start them.

``ray.init()`` with no address starts an embedded local Ray; an address joins an
existing cluster. Each instance is one actor in its own placement group (one GPU when
the cluster has GPUs, otherwise CPUs; torch's thread count is set to the CPUs given),
restarted by Ray up to ``MAX_RESTARTS`` times. Handles to the other instances are
passed in through ``start()``, never looked up from inside.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

import ray
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from cluster.actors import InstanceActor, InstanceSpec

logger = logging.getLogger(__name__)

MAX_RESTARTS = 3
# Control calls (add, abort, renew, send) run on actor threads while the worker loop
# steps the engine on its own thread.
ACTOR_CONCURRENCY = 32

RemoteInstance = ray.remote(InstanceActor)


@dataclass
class Instance:
    spec: InstanceSpec
    actor: Any  # ray ActorHandle
    group: PlacementGroup
    info: dict[str, Any]

    @property
    def name(self) -> str:
        return self.spec.name


def init_ray(address: str | None, num_cpus: int) -> bool:
    """Start a local Ray or join ``address``; True when this call started Ray."""
    if ray.is_initialized():
        return False
    if address is None:
        ray.init(
            num_cpus=max(num_cpus, os.cpu_count() or 1),
            include_dashboard=False,
            logging_level=logging.WARNING,
            # The object store carries only control messages here; keep it small.
            object_store_memory=128 << 20,
        )
    else:
        ray.init(address=address, logging_level=logging.WARNING)
    return True


def has_gpus() -> bool:
    return ray.cluster_resources().get("GPU", 0) > 0


def create(
    spec: InstanceSpec, cpus: float, gpus: int, timeout_s: float, cluster_id: str
) -> Instance:
    """Reserve the instance's resources and create its actor (not started yet)."""
    bundle: dict[str, float] = {"CPU": cpus}
    if gpus:
        bundle["GPU"] = gpus
    group = placement_group([bundle], strategy="PACK", name=f"baton-{cluster_id}-{spec.name}")
    try:
        ray.get(group.ready(), timeout=timeout_s)
    except Exception as e:
        remove_placement_group(group)
        raise TimeoutError(
            f"{spec.name}: no room for {bundle} within {timeout_s:.0f} s "
            f"(cluster has {ray.available_resources()})"
        ) from e
    actor = RemoteInstance.options(
        num_cpus=cpus,
        num_gpus=gpus,
        max_concurrency=ACTOR_CONCURRENCY,
        max_restarts=MAX_RESTARTS,
        scheduling_strategy=PlacementGroupSchedulingStrategy(group),
    ).remote(spec.to_dict())
    return Instance(spec, actor, group, {})


def start_all(instances: list[Instance], events_address: str, timeout_s: float) -> None:
    """Start every instance at once (each loads the model) and record what they report."""
    handles = {inst.name: inst.actor for inst in instances}
    refs = [inst.actor.start.remote(events_address, handles) for inst in instances]
    infos = ray.get(refs, timeout=timeout_s)
    for inst, info in zip(instances, infos, strict=True):
        inst.info = info


def destroy(instances: list[Instance], timeout_s: float = 10.0) -> None:
    """Stop workers politely, then kill the actors and free their placement groups."""
    refs = [inst.actor.stop.remote() for inst in instances]
    try:
        ray.get(refs, timeout=timeout_s)
    except Exception as e:  # a dead actor cannot stop; it is killed below anyway
        logger.warning("stopping instances: %s", e)
    for inst in instances:
        ray.kill(inst.actor, no_restart=True)
        remove_placement_group(inst.group)
