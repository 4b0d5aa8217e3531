"""Per-instance series, rebuilt from the last cluster status at each scrape.

Every series is labelled ``model_name``, ``instance``, ``role`` and ``node``; an instance
that is gone drops out instead of freezing at its last value. The counters the instances
keep (steps, step seconds, KV bytes pulled, failed pulls) are exposed as Prometheus
counters, so ``rate()`` gives step time and transfer bandwidth; they restart from zero
with the instance, which ``rate()`` handles.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from engine.outputs import InstanceStats

# "instance_name", not "instance": Prometheus sets "instance" to the scrape target.
INSTANCE_LABELS = ("model_name", "instance_name", "role", "node")
# Instance states as an operator sees them (Cluster.states: health plus cordon/drain).
STATES = ("starting", "ready", "cordoned", "draining", "restarting", "unresponsive", "dead")


def kv_cache_usage(stats: InstanceStats) -> float:
    if stats.total_blocks <= 0:
        return 0.0
    return 1.0 - stats.free_blocks / stats.total_blocks


def instance_node(stats: InstanceStats) -> str:
    """The node an instance runs on, once the status reports it; "local" until then."""
    return stats.node_ip or stats.node_id or "local"


@dataclass
class ClusterView:
    """What the last status said; replaced whole on each refresh."""

    model: str = ""
    backend: str = ""
    instances: Sequence[InstanceStats] = ()
    states: Mapping[str, str] = field(default_factory=dict)  # Cluster.states()
    roles: Mapping[str, str] = field(default_factory=dict)


class InstanceCollector(Collector):
    def __init__(self) -> None:
        self.view = ClusterView()

    def collect(self) -> Iterable[Metric]:
        v = self.view

        def gauge(name: str, doc: str, extra: Sequence[str] = ()) -> GaugeMetricFamily:
            return GaugeMetricFamily(name, doc, labels=[*INSTANCE_LABELS, *extra])

        def counter(name: str, doc: str, extra: Sequence[str] = ()) -> CounterMetricFamily:
            return CounterMetricFamily(name, doc, labels=[*INSTANCE_LABELS, *extra])

        waiting = gauge("baton:num_requests_waiting", "Requests in the instance's waiting queue.")
        running = gauge("baton:num_requests_running", "Requests in the instance's running batch.")
        kv = gauge("baton:kv_cache_usage_perc", "Fraction of KV cache blocks in use (1 = full).")
        state = gauge("baton:instance_state", "1 for the instance's current state.", ["state"])
        steps = counter("baton:instance_steps", "Engine steps the instance ran.")
        step_s = counter("baton:instance_step_seconds", "Seconds the instance spent in steps.")
        kv_bytes = counter(
            "baton:kv_transfer_bytes", "KV cache bytes this instance pulled.", ["backend"]
        )
        kv_fail = counter(
            "baton:kv_transfer_failures",
            "KV pulls that failed (the prompt was recomputed instead).",
            ["backend"],
        )
        info = gauge(
            "baton:instance_info",
            "Where each instance runs: 1 per instance, its Ray node and layout as labels.",
            ["node_id", "node_ip", "layout"],
        )
        nodes: dict[str, str] = {}
        for s in v.instances:
            node = nodes[s.name] = instance_node(s)
            labels = [v.model, s.name, s.role, node]
            info.add_metric([*labels, s.node_id, s.node_ip, f"tp{s.tp}pp{s.pp}"], 1.0)
            waiting.add_metric(labels, s.num_waiting)
            running.add_metric(labels, s.num_running)
            kv.add_metric(labels, kv_cache_usage(s))
            steps.add_metric(labels, s.counters.get("steps", 0.0))
            step_s.add_metric(labels, s.counters.get("step_seconds", 0.0))
            if s.role == "decode":
                kv_bytes.add_metric([*labels, v.backend], s.counters.get("kv_bytes", 0.0))
                kv_fail.add_metric([*labels, v.backend], s.counters.get("recomputes", 0.0))
        for name, current in v.states.items():
            labels = [v.model, name, v.roles.get(name, ""), nodes.get(name, "local")]
            for st in STATES:
                state.add_metric([*labels, st], 1.0 if st == current else 0.0)
        yield from (info, waiting, running, kv, state, steps, step_s, kv_bytes, kv_fail)
