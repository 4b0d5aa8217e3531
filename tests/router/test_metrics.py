"""Router metrics: exact histogram and counter values from request records, per-instance
gauges from instance stats, the text exposition, and the real router feeding them."""

from __future__ import annotations

import asyncio

import pytest
from prometheus_client.parser import text_string_to_metric_families

from cluster import Cluster
from engine import SamplingParams
from engine.outputs import InstanceStats
from router.instance_metrics import instance_node
from router.metrics import RouterMetrics
from router.service import GenerateInput, RequestRecord, Router

M = {"model_name": "m"}


def record(**overrides: object) -> RequestRecord:
    values: dict[str, object] = dict(
        model="m", prompt_tokens=5, output_tokens=4, finish_reason="stop", e2e_s=1.2,
        ttft_s=0.3, tpot_s=0.3, itl_s=[0.2, 0.3, 0.4], kv_transfer_s=0.004, kv_backend="torch",
    )  # fmt: skip
    values.update(overrides)
    return RequestRecord(**values)  # type: ignore[arg-type]


def value(metrics: RouterMetrics, name: str, **labels: str) -> float | None:
    return metrics.registry.get_sample_value(name, labels)


def test_request_records_feed_histograms_and_counters() -> None:
    m = RouterMetrics()
    m.request_finished(record())
    m.request_finished(record(finish_reason="length", recomputed=True, kv_transfer_s=None))
    # A request that produced no token has no TTFT, TPOT or inter-token gaps.
    m.request_finished(record(finish_reason="abort", output_tokens=0, ttft_s=None, tpot_s=None,
                              itl_s=[]))  # fmt: skip
    assert value(m, "baton:time_to_first_token_seconds_count", **M) == 2
    assert value(m, "baton:time_to_first_token_seconds_sum", **M) == pytest.approx(0.6)
    assert value(m, "baton:time_to_first_token_seconds_bucket", le="0.25", **M) == 0
    assert value(m, "baton:time_to_first_token_seconds_bucket", le="0.5", **M) == 2
    assert value(m, "baton:time_per_output_token_seconds_count", **M) == 2
    assert value(m, "baton:inter_token_latency_seconds_count", **M) == 6
    assert value(m, "baton:inter_token_latency_seconds_sum", **M) == pytest.approx(1.8)
    assert value(m, "baton:e2e_request_latency_seconds_count", **M) == 3
    assert value(m, "baton:kv_transfer_seconds_count", backend="torch", **M) == 2
    assert value(m, "baton:kv_transfer_seconds_bucket", le="0.0025", backend="torch", **M) == 0
    assert value(m, "baton:prompt_tokens_total", **M) == 15
    assert value(m, "baton:generation_tokens_total", **M) == 8
    for reason in ("stop", "length", "abort"):
        assert value(m, "baton:request_success_total", finished_reason=reason, **M) == 1
    assert value(m, "baton:kv_recomputes_total", **M) == 1


def stats(name: str, role: str, free: int, total: int = 100, waiting: int = 0) -> InstanceStats:
    return InstanceStats(name, role, waiting, 2, free, total, 0)


def test_instance_gauges_follow_the_latest_status() -> None:
    m = RouterMetrics()
    m.update_instances(
        "m", [stats("prefill-0", "prefill", 75, waiting=3), stats("decode-0", "decode", 10)]
    )
    p = {"instance_name": "prefill-0", "role": "prefill", "node": "local", **M}
    d = {"instance_name": "decode-0", "role": "decode", "node": "local", **M}
    assert value(m, "baton:num_requests_waiting", **p) == 3
    assert value(m, "baton:num_requests_running", **d) == 2
    assert value(m, "baton:kv_cache_usage_perc", **p) == pytest.approx(0.25)
    assert value(m, "baton:kv_cache_usage_perc", **d) == pytest.approx(0.9)
    # An instance that left the status (dead, restarting) leaves the exposition too.
    m.update_instances("m", [stats("decode-0", "decode", 0, total=0)])
    assert value(m, "baton:kv_cache_usage_perc", **p) is None
    assert value(m, "baton:kv_cache_usage_perc", **d) == 0.0  # no cache yet: not "full"


def test_exposition_parses_and_registries_are_separate() -> None:
    a, b = RouterMetrics(), RouterMetrics()  # the same names twice in one process
    a.request_finished(record())
    a.update_instances("m", [stats("decode-0", "decode", 50)])
    names = {f.name for f in text_string_to_metric_families(a.render().decode())}
    assert {
        "baton:time_to_first_token_seconds", "baton:time_per_output_token_seconds",
        "baton:inter_token_latency_seconds", "baton:e2e_request_latency_seconds",
        "baton:kv_transfer_seconds", "baton:prompt_tokens", "baton:generation_tokens",
        "baton:request_success", "baton:kv_recomputes", "baton:num_requests_waiting",
        "baton:num_requests_running", "baton:kv_cache_usage_perc",
    } <= names  # fmt: skip
    assert value(b, "baton:e2e_request_latency_seconds_count", **M) is None


def test_the_router_feeds_the_metrics(cluster: Cluster) -> None:
    metrics = RouterMetrics()
    router = Router(cluster, metrics=metrics)
    params = SamplingParams(max_tokens=5, temperature=0, ignore_eos=True)

    async def run() -> None:
        for prompt in ("One", "Two"):
            out = await router.generate(GenerateInput(prompt=prompt, params=params))
            assert len(out.token_ids) == 5
        await metrics.refresh(router)

    asyncio.run(run())
    model = {"model_name": router.model_name}
    assert value(metrics, "baton:generation_tokens_total", **model) == 10
    assert value(metrics, "baton:request_success_total", finished_reason="length", **model) == 2
    assert (value(metrics, "baton:inter_token_latency_seconds_count", **model) or 0) >= 2
    backend = {"backend": cluster.transport}
    assert value(metrics, "baton:kv_transfer_seconds_count", **backend, **model) == 2
    for s in cluster.stats():
        labels = {"instance_name": s.name, "role": s.role, "node": instance_node(s), **model}
        assert value(metrics, "baton:num_requests_running", **labels) is not None
    # A status that does not come in time keeps the last reading rather than failing.
    metrics.status_timeout_s = 0
    asyncio.run(metrics.refresh(router))
    assert len(metrics.instances.view.instances) == len(cluster.stats())
