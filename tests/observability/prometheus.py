"""Debian's Prometheus for tests: ``promtool`` on rule files, and a real server on
loopback (a free port, its own temporary directory, killed in ``finally``) scraping a
target. Skips, saying why, when the machine has no Prometheus."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

INSTALL = "apt-get install -y prometheus"


def tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"no {name} on this machine ({INSTALL})")
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Prometheus:
    def __init__(self, port: int):
        self.url = f"http://127.0.0.1:{port}"

    def api(self, path: str, **params: str) -> Any:
        query = urllib.parse.urlencode(params)
        with urllib.request.urlopen(f"{self.url}{path}?{query}", timeout=30) as r:
            body = json.loads(r.read())
        assert body["status"] == "success", body
        return body["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        data = self.api("/api/v1/query", query=expr)
        return list(data["result"]) if data["resultType"] == "vector" else [data["result"]]

    def wait_for(self, expr: str, timeout_s: float = 60.0) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout_s
        while True:
            result = self.query(expr)
            if result or time.monotonic() > deadline:
                return result
            time.sleep(1)


@contextmanager
def server(target: str, rule_file: Path, scrape_s: int = 1) -> Iterator[Prometheus]:
    """Prometheus scraping ``target`` (host:port, path /metrics) with ``rule_file``."""
    exe = tool("prometheus")
    with tempfile.TemporaryDirectory(prefix="baton-prometheus-") as tmp:
        config = Path(tmp) / "prometheus.yml"
        config.write_text(
            f"global:\n  scrape_interval: {scrape_s}s\n  evaluation_interval: {scrape_s}s\n"
            f"rule_files: [{json.dumps(str(rule_file))}]\n"
            "scrape_configs:\n  - job_name: baton\n"
            f"    static_configs: [{{targets: [{json.dumps(target)}]}}]\n"
        )
        port = free_port()
        proc = subprocess.Popen(
            [
                exe,
                f"--config.file={config}",
                f"--storage.tsdb.path={tmp}/data",
                f"--web.listen-address=127.0.0.1:{port}",
                "--log.level=warn",
            ],  # fmt: skip
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            prom = Prometheus(port)
            deadline = time.monotonic() + 60
            while True:
                try:
                    urllib.request.urlopen(f"{prom.url}/-/ready", timeout=2).read()
                    break
                except OSError:
                    if proc.poll() is not None or time.monotonic() > deadline:
                        proc.kill()
                        _, err = proc.communicate(timeout=30)
                        raise RuntimeError(f"prometheus did not start:\n{err}") from None
                    time.sleep(0.3)
            yield prom
        finally:
            proc.kill()
            proc.wait(30)
