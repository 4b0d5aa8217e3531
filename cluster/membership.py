"""Adding and removing instances of a running cluster: the calls the controller
(``cluster.control``) makes on the facade's behalf (:class:`~cluster.control.ClusterOps`).

A new instance gets the next unused name of its role (names are never reused, so a
late event or abort of a removed instance cannot reach a new one), its placement group
and actors (``cluster.builder``), and every instance's handle as its peers; the
instances already running learn its handle (``add_peers``) before it is listed, so the
first request routed to it can be handed off. Removing one stops its worker, kills its
actors and frees its placement group; its requests were migrated by the drain first.
"""

from __future__ import annotations

import logging
import os
import re
from typing import TYPE_CHECKING

import ray

from cluster import builder

if TYPE_CHECKING:
    from cluster.cluster import Cluster

logger = logging.getLogger(__name__)

PLACEMENT_WAIT_S = 30.0


class Membership:
    def __init__(self, cluster: Cluster):
        self._c = cluster
        self._next: dict[str, int] = {}
        for inst in cluster.instances:
            m = re.fullmatch(r"(\w+)-(\d+)", inst.name)
            if m:
                role, k = m.group(1), int(m.group(2))
                self._next[role] = max(self._next.get(role, 0), k + 1)

    def running(self) -> dict[str, str]:
        return {i.name: i.spec.role for i in list(self._c.instances)}

    def in_flight(self, name: str) -> int:
        receiver = self._c._receiver
        if receiver is None:
            return 0
        return sum(
            1 for s in receiver.streams().values() if name in (s.trace.prefill, s.trace.decode)
        )

    def migrate_all(self, name: str, cause: str) -> int:
        migrator = self._c.migrator
        return 0 if migrator is None else migrator.lost(name, cause)

    def add_instance(self, role: str) -> str:
        c = self._c
        receiver = c._require_started()
        k = self._next.get(role, 0)
        self._next[role] = k + 1
        name = f"{role}-{k}"
        # As at start: the per-instance share of the machine (Ray's CPUs are logical).
        cpus = c.cpus_per_instance or max(1, (os.cpu_count() or 1) // max(1, len(c.instances)))
        spec = c.instance_spec(name, role, cpus)
        gpus = 1 if builder.has_gpus() else 0
        # A bounded wait for room: the controller tries again later rather than hang. The
        # role's node labels hold as at start (no plan pinning: a plan sized the start).
        selector = c.role_selector(role, spec.world_size)
        inst = builder.create(
            spec, cpus, gpus, min(c.start_timeout_s, PLACEMENT_WAIT_S), c.id, selector
        )
        try:
            handles = {i.name: i.actor for i in c.instances} | {name: inst.actor}
            builder.start_all([inst], receiver.address, c.start_timeout_s, handles)
            ray.get(
                [i.actor.add_peers.remote({name: inst.actor}) for i in c.instances],
                timeout=c.start_timeout_s,
            )
        except BaseException:
            builder.destroy([inst])
            raise
        c.instances.append(inst)
        if c._health is not None:
            c._health.add(inst)
        return name

    def remove_instance(self, name: str) -> None:
        c = self._c
        inst = next((i for i in c.instances if i.name == name), None)
        if inst is None:
            return
        c.instances.remove(inst)
        if c._health is not None:
            c._health.forget(name)
        builder.destroy([inst])
