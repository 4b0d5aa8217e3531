"""``bench/multihost.py``: serving on one namespace host against two.

By default only its input checks (no hosts made). With ``BATON_SLOW_TESTS=1`` (about two
minutes per run here; root): the benchmark at a tiny size, where the placement each mode
claims is checked against the instances' node IPs and the KV counters, and a run that
fails (serve never ready) still removes every namespace it made.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench import multihost, netns

SLOW = pytest.mark.skipif(
    os.environ.get("BATON_SLOW_TESTS") != "1", reason="slow multi-host test: BATON_SLOW_TESTS=1"
)
TINY = ["--num-prompts", "3", "--request-rate", "4", "--input-len", "32", "--output-len", "6"]
# A mode twice: each run reads its own serve log (an earlier run's "ready" must not match).
TWICE = ["--modes", "one-host,two-host,two-host"]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--modes", "three-host"], "modes: unknown mode 'three-host'"),
        (["--transports", "local"], "transports: 'local' is not torch or grpc"),
        (["--request-rate", "1,0"], "request-rate: must be > 0, got '0'"),
        (["--request-rate", "fast"], "request-rate: 'fast' is not a number"),
        (["--num-prompts", "0"], "num-prompts: must be >= 1, got 0"),
    ],
)
def test_bad_input_is_refused_before_any_host_is_made(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert multihost.main(argv) == 2
    assert f"error: {message}" in capsys.readouterr().err


def _namespaces() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True)
    return {line.split()[0] for line in out.stdout.splitlines() if line.startswith("bt")}


@pytest.fixture
def root() -> None:
    reason = netns.unavailable()
    if reason is not None:
        print(f"multihost bench test skipped: {reason}", file=sys.stderr)
        pytest.skip(f"cannot make network namespaces: {reason}")


@SLOW
@pytest.mark.slow
@pytest.mark.usefixtures("root")
def test_tiny_run_compares_one_host_with_two(tmp_path: Path) -> None:
    before = _namespaces()
    out = tmp_path / "multihost.json"
    assert multihost.main([*TINY, *TWICE, "--json-out", str(out)]) == 0
    assert _namespaces() == before  # everything it made is gone
    data = json.loads(out.read_text())
    assert "sharing its" in data["note"]
    assert [r["mode"] for r in data["results"]] == ["one-host", "two-host", "two-host"]
    results = {r["mode"]: r for r in data["results"]}
    where = {
        mode: {i["role"]: i["node_ip"] for i in r["instances"].values()}
        for mode, r in results.items()
    }
    assert where["one-host"]["prefill"] == where["one-host"]["decode"]
    assert where["two-host"]["prefill"] == where["one-host"]["prefill"]
    assert where["two-host"]["decode"] != where["two-host"]["prefill"]
    for r in data["results"]:
        (run,) = r["runs"]
        assert run["completed"] == 3 and run["failed"] == 0
        assert 0.0 <= run["slo_attainment"] <= 1.0
        # The timed requests' KV moved between the instances (warm-up excluded).
        kv = r["kv"]
        assert 0 < kv["pulls"] <= 3 and kv["pulls"] == kv["handoffs"]
        assert kv["kv_bytes"] > 0 and kv["recomputes"] == 0


@SLOW
@pytest.mark.slow
@pytest.mark.usefixtures("root")
def test_a_failed_run_still_removes_every_host(capsys: pytest.CaptureFixture[str]) -> None:
    before = _namespaces()
    assert multihost.main([*TINY, "--modes", "one-host", "--ready-timeout", "1"]) == 1
    err = capsys.readouterr().err
    assert "error: multihost: one-host over torch failed" in err
    assert "baton serve not ready in 1s" in err
    assert _namespaces() == before
