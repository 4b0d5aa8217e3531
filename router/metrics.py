"""Prometheus metrics of the router, named in vLLM's style (``baton:...``).

Two sources. Per request: the router calls :meth:`RouterMetrics.request_finished` with
the latencies it measured (TTFT, TPOT, inter-token gaps, end to end) and the KV
transfer time the decode instance measured; these feed histograms and counters. Per
instance: queue lengths and KV cache use are read from ``Router.status()`` when
``/metrics`` is scraped (:meth:`RouterMetrics.refresh`), so an idle router polls
nobody, and a dead instance's series disappear instead of freezing at their last value.

Everything lives on the object's own ``CollectorRegistry``: two routers in one process
(tests) do not collide, and nothing leaks into the process-wide default registry.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from engine.outputs import InstanceStats
from router.service import RequestRecord

if TYPE_CHECKING:
    from router.service import Router

logger = logging.getLogger(__name__)

# vLLM's buckets, so that dashboards built for it read these the same way.
TTFT_BUCKETS = (
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
    7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0,
)  # fmt: skip
TPOT_BUCKETS = (
    0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
    10.0, 20.0, 40.0, 80.0,
)  # fmt: skip
E2E_BUCKETS = (
    0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0,
    120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0,
)  # fmt: skip
# A pull of one request's KV: milliseconds on one host, up to seconds across nodes.
KV_TRANSFER_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
    10.0, 30.0,
)  # fmt: skip

_INSTANCE_LABELS = ("model_name", "instance", "role")


class InstanceCollector(Collector):
    """Per-instance gauges from the last cluster status; replaced whole on each refresh."""

    def __init__(self) -> None:
        self.model = ""
        self.instances: Sequence[InstanceStats] = ()

    def collect(self) -> Iterable[Metric]:
        families = {
            "waiting": GaugeMetricFamily(
                "baton:num_requests_waiting",
                "Requests in the instance's waiting queue.",
                labels=_INSTANCE_LABELS,
            ),
            "running": GaugeMetricFamily(
                "baton:num_requests_running",
                "Requests in the instance's running batch.",
                labels=_INSTANCE_LABELS,
            ),
            "kv": GaugeMetricFamily(
                "baton:kv_cache_usage_perc",
                "Fraction of the instance's KV cache blocks in use (1 = full).",
                labels=_INSTANCE_LABELS,
            ),
        }
        for s in self.instances:
            labels = [self.model, s.name, s.role]
            families["waiting"].add_metric(labels, s.num_waiting)
            families["running"].add_metric(labels, s.num_running)
            families["kv"].add_metric(labels, kv_cache_usage(s))
        yield from families.values()


class MigrationCollector(Collector):
    """The cluster's migration counters (``cluster.migration``), from the last status."""

    def __init__(self) -> None:
        self.model = ""
        self.counters: dict[str, float] = {}

    def collect(self) -> Iterable[Metric]:
        moved = CounterMetricFamily(
            "baton:request_migrations",
            "Requests moved to another instance, by cause (dead, hung, restarted, "
            "drained, unavailable).",
            labels=("model_name", "cause"),
        )
        failed = CounterMetricFamily(
            "baton:request_migration_failures",
            "Requests that could not be migrated (limit reached, nowhere to go) and failed.",
            labels=("model_name",),
        )
        for key, value in sorted(self.counters.items()):
            if key.startswith("migrations_"):
                moved.add_metric([self.model, key[len("migrations_") :]], value)
        failed.add_metric([self.model], self.counters.get("migration_failures", 0.0))
        yield moved
        yield failed


def kv_cache_usage(stats: InstanceStats) -> float:
    if stats.total_blocks <= 0:
        return 0.0
    return 1.0 - stats.free_blocks / stats.total_blocks


class RouterMetrics:
    """The router's metrics sink (``router.service.MetricsSink``) and ``/metrics`` body."""

    def __init__(self, registry: CollectorRegistry | None = None, status_timeout_s: float = 5.0):
        self.registry = registry if registry is not None else CollectorRegistry()
        self.status_timeout_s = status_timeout_s
        r, model = self.registry, ["model_name"]
        self.ttft = Histogram(
            "baton:time_to_first_token_seconds",
            "Time from the request's arrival at the router to its first token.",
            model, buckets=TTFT_BUCKETS, registry=r,
        )  # fmt: skip
        self.tpot = Histogram(
            "baton:time_per_output_token_seconds",
            "Per request: (end - first token) / (output tokens - 1).",
            model, buckets=TPOT_BUCKETS, registry=r,
        )  # fmt: skip
        self.itl = Histogram(
            "baton:inter_token_latency_seconds",
            "Time between consecutive outputs of a request, as the router saw them.",
            model, buckets=TPOT_BUCKETS, registry=r,
        )  # fmt: skip
        self.e2e = Histogram(
            "baton:e2e_request_latency_seconds",
            "Time from the request's arrival at the router to its last output.",
            model, buckets=E2E_BUCKETS, registry=r,
        )  # fmt: skip
        self.kv_transfer = Histogram(
            "baton:kv_transfer_seconds",
            "Time the decode instance spent pulling a request's KV cache.",
            model, buckets=KV_TRANSFER_BUCKETS, registry=r,
        )  # fmt: skip
        self.prompt_tokens = Counter(
            "baton:prompt_tokens", "Prompt tokens of finished requests.", model, registry=r
        )
        self.generation_tokens = Counter(
            "baton:generation_tokens", "Tokens generated by finished requests.", model, registry=r
        )
        self.request_success = Counter(
            "baton:request_success",
            "Finished requests, by finish reason (stop, length, abort).",
            [*model, "finished_reason"],
            registry=r,
        )
        self.recomputes = Counter(
            "baton:kv_recomputes",
            "Requests whose KV pull failed and whose prompt the decode instance recomputed.",
            model,
            registry=r,
        )
        self.instances = InstanceCollector()
        r.register(self.instances)
        self.migrations = MigrationCollector()
        r.register(self.migrations)

    def request_finished(self, record: RequestRecord) -> None:
        model = record.model
        if record.ttft_s is not None:
            self.ttft.labels(model).observe(record.ttft_s)
        if record.tpot_s is not None:
            self.tpot.labels(model).observe(record.tpot_s)
        itl = self.itl.labels(model)
        for gap in record.itl_s:
            itl.observe(gap)
        self.e2e.labels(model).observe(record.e2e_s)
        if record.kv_transfer_s is not None:
            self.kv_transfer.labels(model).observe(record.kv_transfer_s)
        self.prompt_tokens.labels(model).inc(record.prompt_tokens)
        self.generation_tokens.labels(model).inc(record.output_tokens)
        self.request_success.labels(model, record.finish_reason).inc()
        if record.recomputed:
            self.recomputes.labels(model).inc()

    def update_instances(self, model: str, instances: Sequence[InstanceStats]) -> None:
        self.instances.model = model
        self.instances.instances = list(instances)

    async def refresh(self, router: Router) -> None:
        """Re-read every instance's load; on failure keep the last reading, because a
        scrape must answer even while an instance hangs or restarts."""
        try:
            status = await asyncio.wait_for(router.status(), self.status_timeout_s)
        except Exception as e:  # any failure: log it and serve the old values
            logger.warning("metrics: cluster status unavailable: %r", e)
            return
        self.update_instances(status.model, status.instances)
        self.migrations.model = status.model
        self.migrations.counters = {k: float(v) for k, v in status.counters.items()}

    def render(self) -> bytes:
        """The Prometheus text exposition of everything in the registry."""
        return generate_latest(self.registry)
