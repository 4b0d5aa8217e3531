"""An instance busy with one long step is not hung: its health pings answer, and the
stats polls that cannot be answered until the step ends give up with their caller
instead of holding the actor's threads.

The actor is the real instance actor class (``builder.remote_class`` of
``InstanceActor``, with the cluster's options) on a local Ray, and the monitor and the
stats poll are the cluster's. Only the worker is a stand-in: its loop is a real
``WorkerLoop`` whose step lasts until the test ends it, as a prefill step did for
half a minute on a loaded 2-core CI machine (no model is loaded).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import pytest
import ray

from cluster import Cluster, builder
from cluster.actors import InstanceActor, InstanceSpec
from cluster.health import Health, HealthMonitor
from engine.outputs import InstanceStats
from engine.worker_loop import WorkerLoop


class StalledWorker:
    """What the instance actor reads of a worker (``loop``, ``stats``), its loop in a
    step that never ends (the test kills the actor)."""

    def __init__(self) -> None:
        self.loop = WorkerLoop("stalled", self._tick)
        self.loop.start()

    def _tick(self) -> bool:
        threading.Event().wait()
        return False

    def stats(self, timeout_s: float = 30.0) -> InstanceStats:
        return self.loop.call(
            lambda: InstanceStats("busy", "prefill", 0, 0, 1, 1, 0), timeout=timeout_s
        )


class StalledInstance(InstanceActor):
    def stall(self) -> None:
        """Serve with a worker whose loop is in a long step."""
        self.worker = StalledWorker()

    def wait_for_step(self) -> None:
        """A control call that waits for the worker loop, as ``stats`` did unbounded."""
        self.worker.loop.call(lambda: None, timeout=60.0)


@pytest.fixture
def busy(ray_session: None) -> Iterator[builder.Instance]:
    spec = InstanceSpec("busy-0", "prefill")
    cls = builder.remote_class(StalledInstance, "PrefillInstance_busy_0")
    actor: Any = cls.options(max_concurrency=builder.ACTOR_CONCURRENCY).remote(spec.to_dict())
    try:
        ray.get(actor.stall.remote(), timeout=60)
        ray.get(actor.ping.remote(), timeout=60)  # its first imports torch
        yield builder.Instance(spec, actor, group=None, info={})
    finally:
        ray.kill(actor, no_restart=True)


def test_an_instance_mid_step_answers_pings_and_is_not_declared_hung(
    busy: builder.Instance,
) -> None:
    lost: list[str] = []
    monitor = HealthMonitor(
        [busy], lambda inst: None, lambda inst, cause: lost.append(cause), interval_s=0.5
    )
    cluster = Cluster()  # not started: only its stats poll of ``instances`` is used
    cluster.instances = [busy]
    # The health thread's rounds (``HealthMonitor._run``): ping, then poll the stats,
    # giving up on them as the cluster does. More rounds than the actor has threads.
    for _ in range(builder.ACTOR_CONCURRENCY + 8):
        monitor.check()
        assert cluster.stats(0.1, monitor.answering()) == []  # the step goes on
    assert lost == [] and monitor.state["busy-0"] is Health.SERVING
    # Control calls still get a thread.
    ray.get(busy.actor.add_peers.remote({}), timeout=5)


def test_pings_answer_while_every_control_thread_waits(busy: builder.Instance) -> None:
    waiting = [busy.actor.wait_for_step.remote() for _ in range(builder.ACTOR_CONCURRENCY + 1)]
    assert ray.wait(waiting, timeout=0.5)[0] == []
    assert ray.get(busy.actor.ping.remote(), timeout=5)["started"]
