"""`baton status`'s SLO line from the router's live windows: the wire message (router),
the SDK's types (baton._convert) and the CLI's text, with an injected clock. The same
through a real server and the real CLI: tests/cluster/test_admin_cli.py."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any, cast

from baton import _convert
from baton.v1 import baton_pb2 as pb
from cluster.admin_cli import slo_line, status_table
from router.metrics import RouterMetrics
from router.service import Router
from router.slo import Finished, SLOTargets, judge
from router.slo_status import slo_status

NOW = 10_000.0
TARGETS = SLOTargets(ttft_s=1.0, tpot_s=0.1, objective=0.9)


def _router(metrics: RouterMetrics) -> Router:
    return cast(Router, SimpleNamespace(metrics=metrics, model_name="m"))


def _finished(age_s: float, ttft_s: float, tpot_s: float) -> Finished:
    return Finished(t=NOW - age_s, model="m", outcome="ok", ttft_s=ttft_s, tpot_s=tpot_s,
                    judgement=judge(ttft_s, tpot_s, TARGETS))  # fmt: skip


def _status(slo: pb.SLOStatus | None) -> Any:
    response = pb.StatusResponse(model="m", mode="disaggregated", transport="torch")
    if slo is not None:
        response.slo.CopyFrom(slo)
    return _convert.status(response)


def test_without_targets_there_is_no_slo_status() -> None:
    metrics = RouterMetrics()
    metrics.serve_model("m")
    assert slo_status(_router(metrics)) is None
    status = _status(None)
    assert status.slo is None
    assert status_table(status).splitlines()[-1] == (
        "SLO attainment: no SLO targets set (baton serve --slo-ttft/--slo-tpot or --plan)"
    )


def test_windows_on_the_wire_in_the_sdk_and_in_the_table() -> None:
    metrics = RouterMetrics()
    metrics.windows.clock = lambda: NOW
    metrics.serve_model("m", TARGETS)
    metrics.windows.add(_finished(1000, 0.5, 0.05))  # 60m only: met
    metrics.windows.add(_finished(120, 2.0, 0.05))  # 5m and 60m: TTFT missed
    metrics.windows.add(_finished(30, 0.5, 0.05))  # every window: met
    metrics.windows.add(Finished(t=NOW - 10, model="m", outcome="error"))  # not judged
    wire = slo_status(_router(metrics))
    assert wire is not None
    status = _status(wire)
    slo = status.slo
    assert (slo.ttft_target_s, slo.tpot_target_s, slo.objective) == (1.0, 0.1, 0.9)
    got = [(w.window, w.judged, w.joint, w.ttft, w.tpot) for w in slo.windows]
    assert got == [
        ("1m", 1, 1.0, 1.0, 1.0),
        ("5m", 2, 0.5, 0.5, 1.0),
        ("60m", 3, 2 / 3, 2 / 3, 1.0),
    ]
    assert slo_line(slo) == (
        "SLO attainment (joint): 1m 100% (1 req) · 5m 50% (2 req) · 60m 66.7% (3 req); "
        "objective 90% (TTFT <= 1 s, TPOT <= 0.1 s)"
    )


def test_a_window_with_nothing_judged_shows_dashes() -> None:
    metrics = RouterMetrics()
    metrics.windows.clock = lambda: NOW
    metrics.serve_model("m", TARGETS)
    metrics.windows.add(_finished(600, 0.5, 0.5))  # 60m only: TPOT missed
    wire = slo_status(_router(metrics))
    assert wire is not None
    assert not wire.windows[0].HasField("joint")  # unset, not 0
    slo = _status(wire).slo
    assert (slo.windows[0].joint, slo.windows[2].joint, slo.windows[2].tpot) == (None, 0.0, 0.0)
    assert slo_line(slo).startswith("SLO attainment (joint): 1m -- · 5m -- · 60m 0% (1 req);")
