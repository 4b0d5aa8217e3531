"""The chart's commands run for real: the pods of a rendered RayCluster as processes.

Each pod is a host with its own network stack (``bench/netns.py``): the head
pod and one pod of each worker group. Each container is started the way KubeRay starts it
(``chart.kuberay_argv``: the head keeps the chart's own ``bash -c`` script, the
workers get KubeRay's ``ray start ... --labels=baton.io/role=ROLE --block``), with the
rendered environment (``status.podIP`` is the host's address, the Ray token Secret a
token made for the run) plus what KubeRay adds (``chart.kuberay_env``); each worker first
runs KubeRay's ``wait-gcs-ready`` step (``ray health-check`` against the head). The pod's
``/tmp`` emptyDir is the host's own directory. Then the router must turn ready the way
its readiness probe asks (``GET /health``), every worker's liveness probe must answer,
a chat completion must equal the offline engine's greedy output, ``AdminClient.status()``
must show the prefill instance on the prefill pod's IP and the decode instance on the
decode pod's, and SIGTERM must stop the router within the pod's grace period.

What stands in for Kubernetes, and only that: the host addresses, the token, /tmp, and
two settings of this shared machine that a pod's cgroup would give (Ray's object store
capped at 100 MB, Ray's memory monitor off). Skipped, with the reason printed, where
network namespaces cannot be made (needs root and iproute2).
"""

from __future__ import annotations

import http.client
import json
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from bench import netns
from tests.deploy import chart

MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]
MAX_TOKENS = 16
READY_TIMEOUT_S = 600.0


@dataclass
class Pods:
    net: netns.Network
    rc: dict[str, Any]
    token: str = field(default_factory=lambda: secrets.token_hex(32))
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    @property
    def head(self) -> netns.Host:
        return self.net.hosts[0]

    def env(self, host: netns.Host, group: dict[str, Any], is_head: bool) -> dict[str, str]:
        """The container's environment as the kubelet would give it (plus the test's)."""
        container = group["template"]["spec"]["containers"][0]
        env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "BATON_"))}
        env.update(
            PYTHONPATH=str(chart.ROOT),
            PATH=f"{Path(sys.executable).parent}:{env['PATH']}",
            RAY_memory_monitor_refresh_ms="0",
            RAY_DEFAULT_OBJECT_STORE_MAX_MEMORY_BYTES=str(100 * 10**6),
        )
        start = self.command(host, group, is_head)[-1]  # not KubeRay's own, but close
        env.update(chart.kuberay_env(group, is_head, self.rc["metadata"]["name"],
                                     self.head.ip, start))  # fmt: skip
        for var in container.get("env", []):
            env[var["name"]] = self._value(var, host)
        return env

    def _value(self, var: dict[str, Any], host: netns.Host) -> str:
        if "value" in var:
            return self._tmp(str(var["value"]), host)
        source = var["valueFrom"]
        if source.get("fieldRef", {}).get("fieldPath") == "status.podIP":
            return host.ip
        ref = source["secretKeyRef"]
        assert (ref["name"], ref["key"]) == (self.rc["metadata"]["name"], "auth_token"), ref
        return self.token  # KubeRay's generated Secret for the cluster

    @staticmethod
    def _tmp(text: str, host: netns.Host) -> str:
        return text.replace("/tmp/", f"{host.tmp}/").replace("=/tmp ", f"={host.tmp} ")

    def command(self, host: netns.Host, group: dict[str, Any], is_head: bool) -> list[str]:
        argv = chart.kuberay_argv(group, is_head, f"{self.head.ip}:6379")
        assert argv[:3] == ["/bin/bash", "-c", "--"] and len(argv) == 4, argv
        return [*argv[:3], self._tmp(argv[3], host)]

    def start(self, host: netns.Host, group: dict[str, Any], is_head: bool) -> None:
        argv = self.command(host, group, is_head)
        self.procs.append(self.net.popen(host, argv, self.env(host, group, is_head), "pod.log"))

    def wait_gcs(self, host: netns.Host, group: dict[str, Any], timeout_s: float) -> None:
        """KubeRay's wait-gcs-ready init container: `ray health-check` until it answers."""
        env = self.env(host, group, False)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            argv = ["ray", "health-check", "--address", f"{self.head.ip}:6379"]
            if self.net.run(host, argv, env, timeout=60).returncode == 0:
                return
            time.sleep(2.0)
        raise TimeoutError(f"GCS not ready within {timeout_s:.0f}s:\n{self.log(self.head)}")

    def log(self, host: netns.Host) -> str:
        path = host.tmp / "pod.log"
        return path.read_text(errors="replace")[-3000:] if path.exists() else ""


def _get(host: netns.Host | str, port: int, path: str) -> tuple[int, bytes]:
    ip = host if isinstance(host, str) else host.ip
    conn = http.client.HTTPConnection(ip, port, timeout=10)
    try:
        conn.request("GET", path)
        reply = conn.getresponse()
        return reply.status, reply.read()
    finally:
        conn.close()


def _post(host: netns.Host, port: int, path: str, body: dict[str, Any]) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection(host.ip, port, timeout=300)
    try:
        conn.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
        reply = conn.getresponse()
        return reply.status, reply.read()
    finally:
        conn.close()


@pytest.fixture(scope="module")
def pods() -> Iterator[Pods]:
    reason = netns.unavailable()
    if reason is not None:
        print(f"chart run test skipped: {reason}", file=sys.stderr)
        pytest.skip(f"cannot make network namespaces: {reason}")
    (rc,) = [o for o in chart.manifests(chart.render({})) if o["kind"] == "RayCluster"]
    net = netns.Network(3)
    made = Pods(net, rc)
    try:
        net.up()
        made.start(made.head, rc["spec"]["headGroupSpec"], True)
        for host, group in zip(net.hosts[1:], rc["spec"]["workerGroupSpecs"], strict=True):
            made.wait_gcs(host, group, 180.0)
            made.start(host, group, False)
        yield made
    finally:
        for proc in made.procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
        net.down()


def _wait_ready(pods: Pods, client: ThreadPoolExecutor, port: int) -> None:
    """The router's readiness probe: GET /health on the HTTP port answers 200."""
    deadline = time.monotonic() + READY_TIMEOUT_S
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = client.submit(_get, pods.head, port, "/health").result()
            if last[0] == 200:
                return
        except OSError as e:
            last = e
        if pods.procs[0].poll() is not None:
            break
        time.sleep(2.0)
    raise AssertionError(f"router never ready ({last}):\n{pods.log(pods.head)}")


def _in_head(pods: Pods, code: str) -> Any:
    """Run ``code`` in the head pod's namespace (gRPC's own threads need a process there);
    it prints one JSON line, returned."""
    env = {"PYTHONPATH": str(chart.ROOT), "PATH": os.environ["PATH"]}
    got = pods.net.run(pods.head, [sys.executable, "-c", code], env, timeout=60)
    assert got.returncode == 0, got.stderr[-2000:]
    return json.loads(got.stdout.strip().splitlines()[-1])


def _status(pods: Pods, port: int) -> list[dict[str, Any]]:
    """AdminClient.status(), as `baton status` would show it, from the head pod."""
    out: list[dict[str, Any]] = _in_head(pods, (
        "import json, dataclasses; from baton import AdminClient;"
        f"s = AdminClient('{pods.head.ip}:{port}').status(timeout=30);"
        "print(json.dumps([dataclasses.asdict(i) for i in s.instances]))"
    ))  # fmt: skip
    return out


def _grpc_health(pods: Pods, port: int) -> str:
    """The router's liveness probe: grpc.health.v1 Check(service="") on the pod IP."""
    status: str = _in_head(pods, (
        "import grpc, json; from grpc_health.v1 import health_pb2, health_pb2_grpc;"
        f"ch = grpc.insecure_channel('{pods.head.ip}:{port}');"
        "r = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=10);"
        "print(json.dumps(health_pb2.HealthCheckResponse.ServingStatus.Name(r.status)))"
    ))  # fmt: skip
    return status


def test_the_rendered_pods_serve(pods: Pods) -> None:
    from engine import LLM, SamplingParams

    head = pods.rc["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    ports = {p["name"]: p["containerPort"] for p in head["ports"]}
    with ThreadPoolExecutor(1, initializer=netns.enter, initargs=(pods.head,)) as client:
        _wait_ready(pods, client, ports["http"])
        body = {"model": "SmolLM2-135M-Instruct", "messages": MESSAGES,
                "max_tokens": MAX_TOKENS, "temperature": 0}  # fmt: skip
        status, raw = client.submit(_post, pods.head, ports["http"], "/v1/chat/completions",
                                    body).result()  # fmt: skip
    assert status == 200, raw[:2000]
    got = json.loads(raw)["choices"][0]["message"]["content"]
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0)
    assert got == LLM(None).chat(MESSAGES, params)[0].text

    head_probe = head["livenessProbe"]["grpc"]["port"]
    assert _grpc_health(pods, head_probe) == "SERVING"
    # An instance's node is reported while it is serving ("" otherwise: a busy machine
    # can make the health monitor doubt one for a moment), so ask until both are.
    want = {"prefill-0": pods.net.hosts[1].ip, "decode-0": pods.net.hosts[2].ip}
    deadline = time.monotonic() + 120.0
    while True:
        instances = {i["name"]: i for i in _status(pods, ports["grpc"])}
        got_ips = {name: instances[name]["node_ip"] for name in want}
        if all(got_ips.values()) or time.monotonic() > deadline:
            break
        time.sleep(2.0)
    assert got_ips == want, instances


def test_worker_probes_answer(pods: Pods) -> None:
    """Each worker pod's startup/liveness/readiness probe: the raylet's health through the
    node's dashboard agent, which only `ray[default]` runs (the images install it); and
    the head's Ray dashboard is not reachable on the pod's address."""
    try:
        import aiohttp_cors  # noqa: F401  (one of ray[default]'s agent dependencies)
    except ImportError:
        print("worker probe test skipped: this venv has ray without [default]", file=sys.stderr)
        pytest.skip("Ray's dashboard agent needs ray[default], not installed here")
    groups = pods.rc["spec"]["workerGroupSpecs"]
    with ThreadPoolExecutor(1, initializer=netns.enter, initargs=(pods.head,)) as client:
        for host, group in zip(pods.net.hosts[1:], groups, strict=True):
            container = group["template"]["spec"]["containers"][0]
            ports = {p["name"]: p["containerPort"] for p in container["ports"]}
            for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
                get = container[probe]["httpGet"]
                status, body = client.submit(_get, host, ports[get["port"]], get["path"]).result()
                assert status == 200 and b"success" in body, (group["groupName"], probe, body)
        # The Ray dashboard runs (ray[default]) but on the head's loopback only.
        dashboard = int(pods.rc["spec"]["headGroupSpec"]["rayStartParams"]["dashboard-port"])
        with pytest.raises(ConnectionRefusedError):
            client.submit(_get, pods.head, dashboard, "/").result()
        assert client.submit(_get, "127.0.0.1", dashboard, "/").result()[0] == 200


def test_sigterm_stops_the_router_within_the_grace_period(pods: Pods) -> None:
    head = pods.procs[0]
    grace = pods.rc["spec"]["headGroupSpec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    # The kubelet signals the container's PID 1: bash exec'd into `baton serve`.
    serve = [p for p in pods.net.pids(pods.head) if _is_serve(p)]
    assert serve == [head.pid], (serve, head.pid)
    os.kill(head.pid, signal.SIGTERM)
    head.wait(timeout=grace)
    assert head.returncode == 0, pods.log(pods.head)


def _is_serve(pid: int) -> bool:
    try:
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return b"serve" in cmd and any(c.endswith(b"baton") for c in cmd)


def test_head_gives_up_when_workers_never_join() -> None:
    """No worker pod joins: the head's script stops within router.workersJoinTimeoutSeconds
    with a message naming what is missing (the pod then restarts), never hangs."""
    reason = netns.unavailable()
    if reason is not None:
        pytest.skip(f"cannot make network namespaces: {reason}")
    values = {"router": {"workersJoinTimeoutSeconds": 5}}
    (rc,) = [o for o in chart.manifests(chart.render(values)) if o["kind"] == "RayCluster"]
    net = netns.Network(1)
    alone = Pods(net, rc)
    try:
        net.up()
        alone.start(alone.head, rc["spec"]["headGroupSpec"], True)
        code = alone.procs[0].wait(timeout=120)  # ray start, then 5 s of waiting
        log = alone.log(alone.head)
        assert code != 0, log
        assert "worker pods not joined in time: want {'prefill': 1, 'decode': 1}" in log, log
        assert "have {'prefill': 0, 'decode': 0}" in log
    finally:
        for proc in alone.procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
        net.down()
