"""Prometheus metrics of the router, named in vLLM's style (``baton:...``); the one
module that names them (``METRIC_NAMES``), which the Grafana and rule generators check.

Per request: the router calls :meth:`RouterMetrics.request_finished` exactly once per
request, whatever its outcome (ok, error, aborted, rejected), with the latencies it
measured and the durations the instances measured. The request feeds the latency
histograms (TTFT; TPOT per request and inter-token latency per token, two metrics; end
to end; the TTFT breakdown), is judged once against its model's SLO targets
(``router.slo``), and joins the live windows behind ``/api/v1/slo``. Every label
combination of the outcome and SLO counters exists at zero from the start (see
:meth:`RouterMetrics.serve_model`), so ratios never vanish.

Per instance: queue lengths, KV use, state, step and KV-transfer counters are read from
``Router.status()`` when ``/metrics`` is scraped (``router.instance_metrics``), so an
idle router polls nobody, and a dead instance's series disappear.

Everything lives on the object's own ``CollectorRegistry``: two routers in one process
(tests) do not collide, and nothing leaks into the process-wide default registry.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector

from engine.outputs import InstanceStats
from router.instance_metrics import ClusterView, InstanceCollector
from router.service import RequestRecord
from router.slo import (
    CRITERIA,
    OUTCOMES,
    RESULTS,
    Finished,
    PlanPrediction,
    SLOTargets,
    SLOWindows,
    judge,
)

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

# The components of TTFT (and of the second token, which follows the KV pull): where a
# request's time went before it streamed. router_queue is what the instances did not
# measure: routing, the RPC to the prefill instance, the first token's trip back.
BREAKDOWN = ("router_queue", "prefill_queue", "prefill_compute", "kv_transfer",
             "first_decode_step")  # fmt: skip
_TIMING_OF = {"prefill_queue": "queue", "prefill_compute": "prefill",
              "kv_transfer": "kv_transfer", "first_decode_step": "first_decode_step"}  # fmt: skip

# Every metric family Baton exports (the names Prometheus shows, before the
# _bucket/_sum/_count/_total suffixes); dashboards and rules may name only these.
HISTOGRAMS = (
    "baton:time_to_first_token_seconds", "baton:time_per_output_token_seconds",
    "baton:inter_token_latency_seconds", "baton:e2e_request_latency_seconds",
    "baton:kv_transfer_seconds", "baton:ttft_breakdown_seconds",
)  # fmt: skip
COUNTERS = (
    "baton:prompt_tokens", "baton:generation_tokens", "baton:request_success",
    "baton:kv_recomputes", "baton:requests", "baton:slo_requests",
    "baton:instance_steps", "baton:instance_step_seconds", "baton:kv_transfer_bytes",
    "baton:kv_transfer_failures", "baton:request_migrations",
    "baton:request_migration_failures",
    "baton:request_migration_targets", "baton:prefill_recompute_fallbacks",
)  # fmt: skip
GAUGES = (
    "baton:num_requests_waiting", "baton:num_requests_running", "baton:kv_cache_usage_perc",
    "baton:instance_state", "baton:instance_info", "baton:slo_target_seconds",
    "baton:slo_objective",
    "baton:plan_predicted_attainment", "baton:plan_rate_rps", "baton:plan_mean_prompt_tokens",
    "baton:plan_mean_output_tokens", "baton:plan_max_goodput_rps",
    "baton:plan_predicted_ttft_seconds", "baton:plan_predicted_tpot_seconds",
)  # fmt: skip
# The plan's simulated percentiles, as the ``quantile`` label of its latency gauges.
PLAN_QUANTILES = {"p50": "0.5", "p90": "0.9", "p99": "0.99"}


def exported_series() -> frozenset[str]:
    """Every series name a query may use: gauges, counters with ``_total``, and the
    histograms' ``_bucket``, ``_sum`` and ``_count``."""
    names = set(GAUGES) | {f"{c}{x}" for c in COUNTERS for x in ("_total", "_created")}
    names |= {f"{h}{x}" for h in HISTOGRAMS for x in ("_bucket", "_sum", "_count", "_created")}
    return frozenset(names)


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
        targets = CounterMetricFamily(
            "baton:request_migration_targets",
            "Migrated requests by where they went: prefill (a lost prefill instance's "
            "request without a token, sent to another prefill instance) or decode "
            "(resumed on a decode instance, which recomputes its KV).",
            labels=("model_name", "target"),
        )
        fallbacks = CounterMetricFamily(
            "baton:prefill_recompute_fallbacks",
            "A lost prefill instance's requests recomputed on a decode instance because "
            "no prefill instance was live.",
            labels=("model_name",),
        )
        for key, value in sorted(self.counters.items()):
            if key.startswith("migrations_"):
                moved.add_metric([self.model, key[len("migrations_") :]], value)
        failed.add_metric([self.model], self.counters.get("migration_failures", 0.0))
        for target in ("prefill", "decode"):
            targets.add_metric([self.model, target], self.counters.get(f"to_{target}", 0.0))
        fallbacks.add_metric([self.model], self.counters.get("prefill_fallbacks", 0.0))
        yield from (moved, failed, targets, fallbacks)


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
            "Per token: time between consecutive outputs of a request, as the router saw them.",
            model, buckets=TPOT_BUCKETS, registry=r,
        )  # fmt: skip
        self.e2e = Histogram(
            "baton:e2e_request_latency_seconds",
            "Time from the request's arrival at the router to its last output.",
            model, buckets=E2E_BUCKETS, registry=r,
        )  # fmt: skip
        self.kv_transfer = Histogram(
            "baton:kv_transfer_seconds",
            "Time the decode instance spent pulling a request's KV cache, by backend.",
            [*model, "backend"], buckets=KV_TRANSFER_BUCKETS, registry=r,
        )  # fmt: skip
        self.breakdown = Histogram(
            "baton:ttft_breakdown_seconds",
            "Where a request's time went before it streamed, by component (router_queue, "
            "prefill_queue, prefill_compute, kv_transfer, first_decode_step).",
            [*model, "component"], buckets=TTFT_BUCKETS, registry=r,
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
        self.outcomes = Counter(
            "baton:requests",
            "Requests by outcome: ok, error, aborted (or the client left), rejected.",
            [*model, "outcome"],
            registry=r,
        )
        self.slo = Counter(
            "baton:slo_requests",
            "Requests finished ok, judged against the SLO: criterion ttft, tpot or joint "
            "(both), result met or missed.",
            [*model, "criterion", "result"],
            registry=r,
        )
        self.slo_target = Gauge(
            "baton:slo_target_seconds", "SLO target by criterion (ttft, tpot).",
            [*model, "criterion"], registry=r,
        )  # fmt: skip
        self.slo_objective = Gauge(
            "baton:slo_objective", "Share of requests that must meet both SLOs.", model,
            registry=r,
        )  # fmt: skip
        self.plan = {
            name: Gauge(f"baton:plan_{name}", doc, model, registry=r)
            for name, doc in (
                ("predicted_attainment", "Joint attainment the running plan predicted."),
                ("rate_rps", "Request rate (req/s) the running plan assumed."),
                ("mean_prompt_tokens", "Mean prompt length the running plan assumed."),
                ("mean_output_tokens", "Mean output length the running plan assumed."),
                ("max_goodput_rps", "The plan's goodput: req/s within both SLOs."),
            )
        }
        self.plan_latency = {
            metric: Gauge(
                f"baton:plan_predicted_{metric}_seconds",
                f"{metric.upper()} percentile the running plan's simulation predicted at its "
                "rate (quantile 0.5, 0.9, 0.99).",
                [*model, "quantile"], registry=r,
            )  # fmt: skip
            for metric in ("ttft", "tpot")
        }
        self.instances = InstanceCollector()
        r.register(self.instances)
        self.migrations = MigrationCollector()
        r.register(self.migrations)
        self.targets: dict[str, SLOTargets] = {}
        self.predictions: dict[str, PlanPrediction] = {}
        self.backend = ""
        self.windows = SLOWindows()

    def serve_model(
        self,
        model: str,
        targets: SLOTargets | None = None,
        prediction: PlanPrediction | None = None,
        backend: str = "",
    ) -> None:
        """Declare a served model: every label combination starts at zero."""
        self.backend = backend
        for outcome in OUTCOMES:
            self.outcomes.labels(model, outcome)
        for component in BREAKDOWN:
            self.breakdown.labels(model, component)
        for histogram in (self.ttft, self.tpot, self.itl, self.e2e):
            histogram.labels(model)
        for counter in (self.prompt_tokens, self.generation_tokens, self.recomputes):
            counter.labels(model)
        if backend:
            self.kv_transfer.labels(model, backend)
        if targets is not None:
            self.targets[model] = targets
            self.windows.objective = targets.objective
            for criterion in CRITERIA:
                for result in RESULTS:
                    self.slo.labels(model, criterion, result)
            self.slo_target.labels(model, "ttft").set(targets.ttft_s)
            self.slo_target.labels(model, "tpot").set(targets.tpot_s)
            self.slo_objective.labels(model).set(targets.objective)
        if prediction is not None:
            self._predict(model, prediction)

    def _predict(self, model: str, prediction: PlanPrediction) -> None:
        self.predictions[model] = prediction
        p = prediction
        for name, value in (
            ("predicted_attainment", p.attainment),
            ("rate_rps", p.rate_rps),
            ("mean_prompt_tokens", p.mean_prompt_tokens),
            ("mean_output_tokens", p.mean_output_tokens),
            ("max_goodput_rps", p.max_goodput_rps),
        ):
            if value is not None:
                self.plan[name].labels(model).set(value)
        for metric, quantiles in (("ttft", p.ttft_s), ("tpot", p.tpot_s)):
            for key, seconds in (quantiles or {}).items():
                self.plan_latency[metric].labels(model, PLAN_QUANTILES[key]).set(seconds)

    def request_finished(self, record: RequestRecord) -> None:
        """Record one request; never raises (the router calls it on its way out)."""
        try:
            self._record(record)
        except Exception:
            logger.exception("metrics: could not record request %s", record.request_id)

    def _record(self, record: RequestRecord) -> None:
        model = record.model
        self.outcomes.labels(model, record.outcome).inc()
        breakdown = self._breakdown(record)
        judgement = None
        if record.outcome == "ok" and model in self.targets:
            judgement = judge(record.ttft_s, record.tpot_s, self.targets[model])
            for criterion, result in judgement.results().items():
                self.slo.labels(model, criterion, result).inc()
        self.windows.add(
            Finished(
                t=self.windows.clock(), model=model, outcome=record.outcome,
                request_id=record.request_id, ttft_s=record.ttft_s, tpot_s=record.tpot_s,
                judgement=judgement, prompt_tokens=record.prompt_tokens,
                output_tokens=record.output_tokens, prefill_instance=record.prefill_instance,
                decode_instance=record.decode_instance, kv_transfer_s=record.kv_transfer_s,
                kv_backend=record.kv_backend,
                extra=breakdown,
            )
        )  # fmt: skip
        if record.outcome == "rejected":
            return  # it never ran: no latencies, no tokens
        if record.ttft_s is not None:
            self.ttft.labels(model).observe(record.ttft_s)
        if record.tpot_s is not None:
            self.tpot.labels(model).observe(record.tpot_s)
        itl = self.itl.labels(model)
        for gap in record.itl_s:
            itl.observe(gap)
        self.e2e.labels(model).observe(record.e2e_s)
        if record.kv_transfer_s is not None:
            self.kv_transfer.labels(model, record.kv_backend).observe(record.kv_transfer_s)
        for component, seconds in breakdown.items():
            self.breakdown.labels(model, component).observe(seconds)
        self.prompt_tokens.labels(model).inc(record.prompt_tokens)
        self.generation_tokens.labels(model).inc(record.output_tokens)
        self.request_success.labels(model, record.finish_reason).inc()
        if record.recomputed:
            self.recomputes.labels(model).inc()

    @staticmethod
    def _breakdown(record: RequestRecord) -> dict[str, float]:
        t = record.timings
        parts = {c: t[name] for c, name in _TIMING_OF.items() if name in t}
        if record.recomputed:
            parts.pop("kv_transfer", None)  # a failed pull, not a transfer
        if record.ttft_s is not None and "queue" in t and "prefill" in t:
            parts["router_queue"] = max(0.0, record.ttft_s - t["queue"] - t["prefill"])
        return parts

    def update_instances(
        self,
        model: str,
        instances: Sequence[InstanceStats],
        states: dict[str, str] | None = None,
        roles: dict[str, str] | None = None,
    ) -> None:
        self.instances.view = ClusterView(
            model, self.backend, list(instances), dict(states or {}), dict(roles or {})
        )

    async def refresh(self, router: Router) -> None:
        """Re-read every instance's load; on failure keep the last reading, because a
        scrape must answer even while an instance hangs or restarts."""
        try:
            status = await asyncio.wait_for(router.status(), self.status_timeout_s)
        except Exception as e:  # any failure: log it and serve the old values
            logger.warning("metrics: cluster status unavailable: %r", e)
            return
        roles = {i.name: i.spec.role for i in router.cluster.instances}
        self.backend = status.transport
        # The operator's view (ready, cordoned, draining, ...), not bare health.
        self.update_instances(status.model, status.instances, status.states, roles)
        self.migrations.model = status.model
        self.migrations.counters = {k: float(v) for k, v in status.counters.items()}

    def render(self) -> bytes:
        """The Prometheus text exposition of everything in the registry."""
        return generate_latest(self.registry)
