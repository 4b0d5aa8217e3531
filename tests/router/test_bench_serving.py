"""The serving benchmark end to end against a real router (both APIs over the session's
cluster): every request completes, the JSON and the PNG are written, and the overhead
figures come from the decode instance's own step counters."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path

import pytest

from bench import serving
from cluster import Cluster
from router.metrics import RouterMetrics
from router.service import Router
from tests.router.servers import HttpServerThread, ServerThread, wait_cluster_idle


@pytest.fixture(scope="module")
def servers(cluster: Cluster) -> Iterator[tuple[HttpServerThread, ServerThread]]:
    metrics = RouterMetrics()  # one: the router records into what /metrics renders
    router = Router(cluster, metrics=metrics)
    http, grpc = HttpServerThread(router, metrics=metrics), ServerThread(router)
    yield http, grpc
    http.stop()
    grpc.stop()


def test_a_short_run_writes_json_and_plot(
    servers: tuple[HttpServerThread, ServerThread],
    cluster: Cluster,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    http, grpc = servers
    out_json, out_png = tmp_path / "serve.json", tmp_path / "serve.png"
    argv = ["--base-url", http.base_url, "--grpc-target", grpc.target, "--num-prompts", "6"]
    argv += ["--input-len", "24", "--output-len", "6", "--request-rate", "8,inf"]
    argv += ["--overhead", "--overhead-streams", "4", "--overhead-rounds", "2", "--no-progress"]
    argv += ["--json-out", str(out_json), "--plot-out", str(out_png)]
    assert serving.main(argv) == 0

    data = json.loads(out_json.read_text())
    assert [r["rate"] for r in data["runs"]] == [8.0, math.inf]
    for run in data["runs"]:
        assert (run["completed"], run["failed"]) == (6, 0), run["errors"]
        assert 0 < run["ttft_s"]["mean"] <= run["e2el_s"]["p99"]
        assert 0.0 <= run["slo_attainment"] <= 1.0
    overhead = data["overhead"]
    assert overhead["streams"] == 4 and len(overhead["rounds"]) == 2
    assert overhead["overhead"] in overhead["overheads"]
    assert overhead["engine_step_mean_s"] > 0 and overhead["e2e_tpot_median_s"] > 0
    assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    printed = capsys.readouterr().out
    assert "| rate (req/s) |" in printed and "router overhead at 4 streams" in printed
    wait_cluster_idle(cluster)
