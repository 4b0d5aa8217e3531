"""Starting and joining Ray: never a stray cluster, bounded joins, signals always work."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A port that accepts TCP and never speaks Ray (a wrong port, a firewall's proxy)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(16)
        yield s.getsockname()[1]


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    return {**env, "PYTHONPATH": str(REPO), **extra}


def test_no_address_starts_an_embedded_ray_even_when_ray_address_points_elsewhere(
    silent_port: int,
) -> None:
    """Plain ray.init() would follow RAY_ADDRESS (or /tmp/ray's current cluster) there."""
    code = (
        "import ray; from cluster.ray_connect import init_ray; assert init_ray(None, 1);"
        "print('GCS', ray.get_runtime_context().gcs_address); ray.shutdown()"
    )
    got = subprocess.run(
        [sys.executable, "-c", code], env=_env(RAY_ADDRESS=f"127.0.0.1:{silent_port}"),
        capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    assert got.returncode == 0, got.stderr[-2000:]
    gcs = got.stdout.split("GCS ", 1)[1].strip()
    assert not gcs.endswith(f":{silent_port}")


def test_serve_joining_a_silent_port_gives_up_with_the_address(silent_port: int) -> None:
    argv = [sys.executable, "-m", "cluster.cli", "serve", "--address",
            f"127.0.0.1:{silent_port}", "--connect-timeout", "5"]  # fmt: skip
    got = subprocess.run(argv, env=_env(), capture_output=True, text=True, timeout=120)
    assert got.returncode == 69
    assert f"error: address: 127.0.0.1:{silent_port} answers but Ray did not accept" in (
        got.stderr
    )


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_stops_serve_while_it_joins(silent_port: int, sig: signal.Signals) -> None:
    argv = [sys.executable, "-m", "cluster.cli", "serve", "--address",
            f"127.0.0.1:{silent_port}", "--connect-timeout", "300"]  # fmt: skip
    proc = subprocess.Popen(argv, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)  # fmt: skip
    try:
        time.sleep(4.0)  # inside the join by now (the probe connects at once)
        assert proc.poll() is None
        proc.send_signal(sig)
        out, _ = proc.communicate(timeout=60)  # far below the 300 s join: it did stop
        assert proc.returncode == 0 and "baton serve: stopped" in out
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
