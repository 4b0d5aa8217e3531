"""SLO targets, judgement at the exact edges, the live windows, and the zero-initialised
series of the router's metrics (pure Python, a fake clock)."""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections.abc import AsyncIterator
from typing import Any

import pytest

from engine.outputs import RequestOutput
from router.errors import RouterError
from router.metrics import RouterMetrics, exported_series
from router.service import GenerateInput, RequestRecord, Router
from router.slo import (
    Finished,
    PlanPrediction,
    SLOTargets,
    SLOWindows,
    judge,
    parse_window,
    percentile,
)

T = SLOTargets(ttft_s=0.5, tpot_s=0.1, objective=0.9)


@pytest.mark.parametrize(
    ("ttft", "tpot", "expected"),
    [
        (0.5, 0.1, (True, True, True)),  # exactly at both targets: met
        (0.5000001, 0.1, (False, True, False)),
        (0.5, 0.1000001, (True, False, False)),
        (0.0, None, (True, True, True)),  # a single token has no TPOT to miss
        (None, None, (False, True, False)),  # no first token: TTFT missed
        (0.7, 0.2, (False, False, False)),
    ],
)
def test_judgement_at_the_edges(
    ttft: float | None, tpot: float | None, expected: tuple[bool, bool, bool]
) -> None:
    j = judge(ttft, tpot, T)
    assert (j.ttft_met, j.tpot_met, j.joint_met) == expected
    assert j.results()["joint"] == ("met" if expected[2] else "missed")


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"ttft_s": 0, "tpot_s": 0.1}, "slo-ttft"),
        ({"ttft_s": -1, "tpot_s": 0.1}, "slo-ttft"),
        ({"ttft_s": 1, "tpot_s": 0}, "slo-tpot"),
        ({"ttft_s": 1, "tpot_s": float("inf")}, "slo-tpot"),
        ({"ttft_s": 1, "tpot_s": 0.1, "objective": 0}, "slo-attainment"),
        ({"ttft_s": 1, "tpot_s": 0.1, "objective": 1}, "slo-attainment"),
        ({"ttft_s": 1, "tpot_s": 0.1, "objective": 1.5}, "slo-attainment"),
    ],
)
def test_bad_targets_name_the_flag(kwargs: dict[str, float], field: str) -> None:
    with pytest.raises(ValueError, match=field):
        SLOTargets(**kwargs)


def test_windows_parse() -> None:
    assert [parse_window(w) for w in ("1m", "5m", "60m")] == [60, 300, 3600]
    for bad in ("2m", "", None, "60"):
        with pytest.raises(ValueError, match="window"):
            parse_window(bad)


def test_percentile_nearest_rank() -> None:
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 50) == 50
    assert percentile(values, 99) == 99
    assert percentile([3.0], 90) == 3.0
    assert percentile([], 50) is None


class Clock:
    def __init__(self) -> None:
        self.now = 10_000.0

    def __call__(self) -> float:
        return self.now


def finished(clock: Clock, met: bool | None, outcome: str = "ok", ttft: float = 0.2) -> Finished:
    j = None if met is None else judge(ttft if met else 9.0, 0.05, T)
    return Finished(clock(), "m", outcome, ttft_s=ttft, tpot_s=0.05, judgement=j)


def test_windows_count_only_their_span() -> None:
    clock = Clock()
    w = SLOWindows(objective=0.9, clock=clock)
    for _ in range(8):  # 8 met, 120 s ago
        w.add(finished(clock, True))
    clock.now += 120
    w.add(finished(clock, False))  # now: one missed, one error
    w.add(finished(clock, None, outcome="error"))
    one = w.summary(60)
    assert one["requests"] == 2
    assert one["outcomes"] == {"ok": 1, "error": 1, "aborted": 0, "rejected": 0}
    assert one["attainment"]["joint"] == 0.0
    assert one["error_budget_left"] == pytest.approx(1 - 1.0 / 0.1)
    five = w.summary(300)
    assert five["judged"] == 9
    assert five["attainment"]["joint"] == pytest.approx(8 / 9)
    assert five["attainment"]["tpot"] == 1.0
    assert five["goodput_rps"] == pytest.approx(8 / 300)
    assert five["error_budget_left"] == pytest.approx(1 - (1 / 9) / 0.1)
    clock.now += 3601  # past the horizon: everything expires
    assert w.summary(3600)["requests"] == 0
    assert w.summary(3600)["attainment"]["joint"] is None


def test_series_buckets_and_misses() -> None:
    clock = Clock()
    w = SLOWindows(objective=0.9, clock=clock)
    w.add(finished(clock, True, ttft=0.1))
    clock.now += 25
    w.add(finished(clock, False, ttft=0.3))
    points = w.series(window_s=60, step_s=10)
    assert len(points) == 6
    assert [p["requests"] for p in points] == [0, 0, 0, 1, 0, 1]
    assert points[-1]["joint"] == 0.0 and points[3]["joint"] == 1.0
    assert points[3]["ttft_s"]["p99"] == 0.1
    misses = w.misses()
    assert len(misses) == 1 and misses[0]["ttft_met"] is False
    assert w.misses(model="other") == []


def value(m: RouterMetrics, name: str, **labels: str) -> float | None:
    return m.registry.get_sample_value(name, labels)


def test_every_label_combination_starts_at_zero() -> None:
    m = RouterMetrics()
    plan = PlanPrediction(0.95, 2.0, 100.0, 50.0, 3.5)
    m.serve_model("m", T, plan, backend="torch")
    for outcome in ("ok", "error", "aborted", "rejected"):
        assert value(m, "baton:requests_total", model_name="m", outcome=outcome) == 0
    for criterion in ("ttft", "tpot", "joint"):
        for result in ("met", "missed"):
            labels = {"model_name": "m", "criterion": criterion, "result": result}
            assert value(m, "baton:slo_requests_total", **labels) == 0
    assert value(m, "baton:ttft_breakdown_seconds_count", model_name="m",
                 component="first_decode_step") == 0  # fmt: skip
    assert value(m, "baton:slo_target_seconds", model_name="m", criterion="tpot") == 0.1
    assert value(m, "baton:slo_objective", model_name="m") == 0.9
    assert value(m, "baton:plan_predicted_attainment", model_name="m") == 0.95
    assert value(m, "baton:plan_max_goodput_rps", model_name="m") == 3.5


def test_the_plans_latency_percentiles_are_gauges() -> None:
    m = RouterMetrics()
    plan = PlanPrediction(
        0.95, 2.0, 100.0, 50.0, 3.5,
        ttft_s={"p50": 0.1, "p90": 0.2, "p99": 0.3},
        tpot_s={"p50": 0.01, "p90": 0.02, "p99": math.inf},  # a request never served
    )  # fmt: skip
    m.serve_model("m", T, plan)
    for metric, want in (("ttft", (0.1, 0.2, 0.3)), ("tpot", (0.01, 0.02, math.inf))):
        got = tuple(
            value(m, f"baton:plan_predicted_{metric}_seconds", model_name="m", quantile=q)
            for q in ("0.5", "0.9", "0.99")
        )
        assert got == want
    text = m.render().decode()
    assert 'baton:plan_predicted_tpot_seconds{model_name="m",quantile="0.99"} +Inf' in text
    assert plan.to_dict()["tpot_s"] == {"p50": 0.01, "p90": 0.02, "p99": None}


def test_a_plan_without_percentiles_exports_no_latency_gauges() -> None:
    m = RouterMetrics()
    m.serve_model("m", T, PlanPrediction(0.95, 2.0, None, None, 3.5))
    assert value(m, "baton:plan_predicted_ttft_seconds", model_name="m", quantile="0.9") is None
    assert value(m, "baton:plan_mean_prompt_tokens", model_name="m") is None
    assert value(m, "baton:plan_rate_rps", model_name="m") == 2.0


def test_each_request_is_judged_once_and_rejections_have_no_latency() -> None:
    m = RouterMetrics()
    m.serve_model("m", T)
    base = dict(model="m", prompt_tokens=3, output_tokens=3, finish_reason="stop", e2e_s=1.0)
    timings = {"queue": 0.05, "prefill": 0.1, "kv_transfer": 0.01, "first_decode_step": 0.02}
    m.request_finished(RequestRecord(**base, ttft_s=0.5, tpot_s=0.1, timings=timings))  # type: ignore[arg-type]
    m.request_finished(RequestRecord(**base, ttft_s=0.6, tpot_s=0.1))  # type: ignore[arg-type]
    m.request_finished(RequestRecord(**base, outcome="rejected"))  # type: ignore[arg-type]
    m.request_finished(RequestRecord(**base, ttft_s=0.1, outcome="aborted"))  # type: ignore[arg-type]

    def slo(criterion: str, result: str) -> float | None:
        return value(m, "baton:slo_requests_total", model_name="m", criterion=criterion,
                     result=result)  # fmt: skip

    assert (slo("joint", "met"), slo("joint", "missed")) == (1, 1)
    assert (slo("ttft", "missed"), slo("tpot", "met")) == (1, 2)
    assert value(m, "baton:requests_total", model_name="m", outcome="rejected") == 1
    assert value(m, "baton:requests_total", model_name="m", outcome="aborted") == 1
    assert value(m, "baton:e2e_request_latency_seconds_count", model_name="m") == 3
    router_queue = value(m, "baton:ttft_breakdown_seconds_sum", model_name="m",
                         component="router_queue")  # fmt: skip
    assert router_queue == pytest.approx(0.5 - 0.05 - 0.1)
    summary = m.windows.summary(60)
    assert summary["outcomes"]["rejected"] == 1 and summary["judged"] == 2


def test_the_exposition_names_only_declared_series() -> None:
    m = RouterMetrics()
    m.serve_model("m", T, PlanPrediction(0.9, 1.0, 10.0, 10.0, 2.0), backend="torch")
    text = m.render().decode()
    names = {line.split("{")[0].split(" ")[0] for line in text.splitlines() if line[:1] != "#"}
    names.discard("")
    assert names <= exported_series(), names - exported_series()


# -- the failure path, with a fake cluster (the real paths: test_slo_paths.py) ------------


class FailingCluster:
    """Yields one token, then the instance reports an error."""

    model = None
    transport = "torch"
    max_model_len = 100

    async def stream(self, *args: Any, **kwargs: Any) -> AsyncIterator[RequestOutput]:
        yield RequestOutput("r", [1, 2], [5], "x", new_token_ids=[5])
        yield RequestOutput("r", [1, 2], [5], "x", finished=True, finish_reason="error")


def test_an_instance_failure_is_an_error_recorded_once() -> None:
    metrics = RouterMetrics()
    router = Router(FailingCluster(), "m", metrics)  # type: ignore[arg-type]
    metrics.serve_model("m", T)

    async def run() -> None:
        with pytest.raises(RouterError):
            await router.generate(GenerateInput(prompt="x"))

    asyncio.run(run())
    get = metrics.registry.get_sample_value
    assert get("baton:requests_total", {"model_name": "m", "outcome": "error"}) == 1
    assert get("baton:requests_total", {"model_name": "m", "outcome": "ok"}) == 0
    assert get("baton:slo_requests_total", {"model_name": "m", "criterion": "joint",
                                            "result": "missed"}) == 0  # fmt: skip


class RefusingCluster(FailingCluster):
    """The instance refuses the prompt (as a too-long prompt is refused)."""

    async def stream(self, *args: Any, **kwargs: Any) -> AsyncIterator[RequestOutput]:
        raise ValueError("prompt: too long")
        yield  # an async generator, like Cluster.stream


class SilentCluster(FailingCluster):
    """Takes the request and never answers: the client gives up first."""

    async def stream(self, *args: Any, **kwargs: Any) -> AsyncIterator[RequestOutput]:
        await asyncio.Event().wait()
        yield RequestOutput("r", [], [], "")


def outcomes(cluster: Any, request: GenerateInput) -> dict[str, float | None]:
    metrics = RouterMetrics()
    router = Router(cluster, "m", metrics)
    metrics.serve_model("m", T)

    async def run() -> None:
        task = asyncio.ensure_future(router.generate(request))
        done, _ = await asyncio.wait([task], timeout=0.2)
        if not done:
            task.cancel()
        with contextlib.suppress(RouterError, asyncio.CancelledError):
            await task

    asyncio.run(run())
    get = metrics.registry.get_sample_value
    return {o: get("baton:requests_total", {"model_name": "m", "outcome": o})
            for o in ("ok", "error", "aborted", "rejected")}  # fmt: skip


@pytest.mark.parametrize(
    ("cluster", "request_", "expected"),
    [
        (RefusingCluster(), GenerateInput(prompt="x"), "rejected"),
        (FailingCluster(), GenerateInput(prompt="x", model="other"), "rejected"),
        (SilentCluster(), GenerateInput(prompt="x"), "aborted"),  # cancelled before output
        (FailingCluster(), GenerateInput(prompt="x"), "error"),
    ],
)
def test_each_way_out_is_one_outcome(cluster: Any, request_: GenerateInput, expected: str) -> None:
    got = outcomes(cluster, request_)
    assert got == {o: (1.0 if o == expected else 0.0) for o in got}
