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


# Run in a fresh process: the count of "ray::IDLE" workers among its descendants (the
# embedded Ray's raylet is its child, and the workers the raylet's), polled for `wait` s.
_IDLE_WORKERS = """
import os, time

def idle_workers():
    parents = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as f:
                parents[int(pid)] = int(f.read().rsplit(")", 1)[1].split()[1])
        except OSError:
            pass
    def mine(pid):
        while pid > 1:
            pid = parents.get(pid, 0)
            if pid == os.getpid():
                return True
        return False
    n = 0
    for pid in filter(mine, parents):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                n += f.read().startswith(b"ray::IDLE")
        except OSError:
            pass
    return n

def poll(wait):
    start = time.monotonic()
    while time.monotonic() - start < wait and not idle_workers():
        time.sleep(0.5)
    return idle_workers(), time.monotonic() - start
"""


def test_the_embedded_ray_starts_no_idle_worker_pool() -> None:
    """Ray's default starts plain workers for the first driver (the control, with Ray's
    own defaults); Baton's embedded Ray does not: no instance could use them."""
    code = _IDLE_WORKERS + (
        "import ray\n"
        "from cluster.ray_connect import init_ray\n"
        "ray.init(address='local', num_cpus=1, include_dashboard=False,"
        " object_store_memory=128 << 20)\n"
        "control, took = poll(60); ray.shutdown()\n"
        "assert init_ray(None, 1)\n"
        "ours, _ = poll(max(5.0, 2 * took)); ray.shutdown()\n"
        "print('IDLE', control, ours)\n"
    )
    got = subprocess.run(
        [sys.executable, "-c", code], env=_env(), capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert got.returncode == 0, got.stderr[-2000:]
    control, ours = map(int, got.stdout.split("IDLE ", 1)[1].split())
    assert control >= 1, "Ray's default no longer prestarts workers?"
    assert ours == 0


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
