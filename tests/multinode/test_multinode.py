"""Baton across hosts with their own network stacks (``bench/netns.py``).

Three hosts on one bridge: a head (Ray's GCS and ``baton serve``), a host labelled
``baton.io/role=prefill`` and one labelled ``decode``, Ray's token authentication on.
``baton serve --address`` runs in the head's namespace with ``--prefill-nodes`` /
``--decode-nodes``; clients reach its HTTP API from threads moved into that namespace.

By default: greedy parity over the torch transport with KV crossing hosts, Ray's token
refusing a node without it, and bad node-facing input (a label no node has). With
``BATON_SLOW_TESTS=1`` also: grpc transport, a TP x PP prefill instance on one host with a
TP1 decode on the other, a PP2 prefill instance whose stages a plan puts on two hosts, and
losing the decode host during streamed requests.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import pytest

from bench import netns

MAX_TOKENS = 12
SLOW = pytest.mark.skipif(
    os.environ.get("BATON_SLOW_TESTS") != "1", reason="slow multi-host test: BATON_SLOW_TESTS=1"
)


@pytest.fixture(scope="module")
def hosts() -> Iterator[netns.RayHosts]:
    reason = netns.unavailable()
    if reason is not None:
        print(f"multinode tests skipped: {reason}", file=sys.stderr)
        pytest.skip(f"cannot make network namespaces: {reason}")
    with netns.three_hosts() as made:
        yield made


@pytest.fixture(scope="module")
def offline() -> Any:
    from engine import LLM

    return LLM(None)


@pytest.fixture(scope="module")
def prompts(offline: Any) -> list[list[int]]:
    from tests.prompts import text_prompts

    return text_prompts(offline.engine.tokenizer, 32)


@pytest.fixture(scope="module")
def expected(offline: Any, prompts: list[list[int]]) -> list[str]:
    from engine import SamplingParams

    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True)
    return [o.text for o in offline.generate(prompt_token_ids=prompts, params=params)]


class Server:
    """``baton serve`` on the head host; HTTP and gRPC on the head's loopback."""

    def __init__(self, hosts: netns.RayHosts, proc: subprocess.Popen[bytes], log: Path):
        self.hosts, self.proc, self.log = hosts, proc, log
        self.http_port = self.grpc_port = 0

    @property
    def head(self) -> netns.Host:
        return self.hosts.net.hosts[0]

    def wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            text = self.log.read_text(errors="replace")
            if "baton serve: ready" in text:
                self.grpc_port = int(re.search(r"gRPC +[\d.]+:(\d+)", text).group(1))  # type: ignore[union-attr]
                self.http_port = int(re.search(r"HTTP +http://[\d.]+:(\d+)", text).group(1))  # type: ignore[union-attr]
                return
            if self.proc.poll() is not None:
                raise RuntimeError(f"baton serve exited {self.proc.returncode}:\n{text[-3000:]}")
            time.sleep(1.0)
        tail = self.log.read_text()[-3000:]
        raise TimeoutError(f"baton serve not ready in {timeout_s:.0f}s:\n{tail}")

    def post(self, path: str, body: dict[str, Any], timeout: float = 300.0) -> tuple[int, bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", self.http_port, timeout=timeout)
        try:
            conn.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
            reply = conn.getresponse()
            return reply.status, reply.read()
        finally:
            conn.close()

    def status(self) -> list[dict[str, Any]]:
        """Every instance as AdminClient.status() reports it (run on the head host)."""
        code = (
            "import json, dataclasses; from baton import AdminClient;"
            f"s = AdminClient('127.0.0.1:{self.grpc_port}').status(timeout=30);"
            "print(json.dumps([dataclasses.asdict(i) for i in s.instances]))"
        )
        got = self.hosts.net.run(self.head, [sys.executable, "-c", code], self.hosts.env(), 60)
        assert got.returncode == 0, got.stderr[-2000:]
        out: list[dict[str, Any]] = json.loads(got.stdout.strip().splitlines()[-1])
        return out

    def pool(self, n: int) -> ThreadPoolExecutor:
        """Client threads living in the head host's network namespace."""
        return ThreadPoolExecutor(n, initializer=netns.enter, initargs=(self.head,))


@contextmanager
def serving(
    hosts: netns.RayHosts, *extra: str, timeout_s: float = 420.0, roles: bool = True
) -> Iterator[Server]:
    head = hosts.net.hosts[0]
    log = head.tmp / f"serve-{time.monotonic_ns()}.log"
    role_args = ["--prefill-nodes", "baton.io/role=prefill",
                 "--decode-nodes", "baton.io/role=decode"] if roles else []  # fmt: skip
    argv = [sys.executable, "-m", "cluster.cli", "serve", "--address", hosts.address,
            *role_args, "--http-port", "0", "--grpc-port", "0", "--num-kv-blocks", "256",
            *extra]  # fmt: skip
    proc = hosts.net.popen(head, argv, hosts.env(), log.name)
    server = Server(hosts, proc, log)
    try:
        server.wait_ready(timeout_s)
        yield server
    finally:
        stop(proc)


def stop(proc: subprocess.Popen[bytes], timeout_s: float = 60.0) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


def complete(server: Server, model: str, ids: list[int]) -> str:
    body = {"model": model, "prompt": ids, "max_tokens": MAX_TOKENS, "temperature": 0,
            "ignore_eos": True}  # fmt: skip
    status, raw = server.post("/v1/completions", body)
    assert status == 200, raw[:500]
    text: str = json.loads(raw)["choices"][0]["text"]
    return text


def check_parity(server: Server, prompts: Sequence[list[int]], expected: Sequence[str]) -> None:
    """32 concurrent greedy requests equal the offline engine's, and every one's KV crossed
    from the prefill host to the decode host (node IPs and the transfer counters)."""
    with server.pool(len(prompts)) as pool:
        got = list(pool.map(lambda ids: complete(server, "SmolLM2-135M-Instruct", ids), prompts))
    assert got == list(expected)
    instances = {i["name"]: i for i in server.status()}
    prefill, decode = instances["prefill-0"], instances["decode-0"]
    ips = {h.index: h.ip for h in server.hosts.net.hosts}
    assert (prefill["node_ip"], decode["node_ip"]) == (ips[1], ips[2])
    assert prefill["node_id"] and decode["node_id"] and prefill["node_id"] != decode["node_id"]
    # Every request either finished at its first token or was handed over and pulled.
    handed = prefill["counters"]["handoffs"]
    assert handed + prefill["counters"]["finished_at_prefill"] == len(prompts)
    assert handed > 0 and decode["counters"]["pulls"] == handed
    assert decode["counters"]["kv_bytes"] > 0 and decode["counters"].get("recomputes", 0) == 0


def test_greedy_parity_across_hosts_torch(
    hosts: netns.RayHosts, prompts: list[list[int]], expected: list[str]
) -> None:
    with serving(hosts, "--transport", "torch") as server:
        check_parity(server, prompts, expected)
        layouts = {(i["tp"], i["pp"]) for i in server.status()}
        assert layouts == {(1, 1)}


@SLOW
def test_greedy_parity_across_hosts_grpc(
    hosts: netns.RayHosts, prompts: list[list[int]], expected: list[str]
) -> None:
    with serving(hosts, "--transport", "grpc") as server:
        check_parity(server, prompts, expected)


def test_a_label_no_node_has_is_refused_before_anything_starts(hosts: netns.RayHosts) -> None:
    head = hosts.net.hosts[0]
    argv = [sys.executable, "-m", "cluster.cli", "serve", "--address", hosts.address,
            "--decode-nodes", "baton.io/role=gpu", "--http-port", "0",
            "--grpc-port", "0"]  # fmt: skip
    got = hosts.net.run(head, argv, hosts.env(), timeout=120)
    assert got.returncode == 2, got.stderr[-2000:]
    assert "error: decode_nodes: no node of the Ray cluster has labels baton.io/role=gpu" in (
        got.stderr
    )
    assert "baton.io/role=decode" in got.stderr  # what the nodes do have
    wrong = [sys.executable, "-m", "cluster.cli", "serve", "--address", hosts.address,
             "--http-port", "0", "--grpc-port", "0"]  # fmt: skip
    got = hosts.net.run(head, wrong, hosts.env(BATON_HOST_IFNAME="nope0"), timeout=120)
    assert got.returncode == 2 and "BATON_HOST_IFNAME: no interface 'nope0'" in got.stderr


def test_a_node_without_the_token_cannot_join(hosts: netns.RayHosts) -> None:
    """Ray's token auth (RAY_AUTH_MODE=token): a fourth host started without the token
    never joins, and Ray says why; the cluster keeps its three nodes."""
    net = hosts.net
    intruder = net.add_host(net.hosts[0].tmp.parent / "h3")
    proc = hosts.start_node(intruder, {}, 1, token=False)
    try:
        with suppress(subprocess.TimeoutExpired):
            proc.wait(90)
        log = (intruder.tmp / "ray-start.log").read_text(errors="replace")
        assert proc.poll() is not None and proc.returncode != 0, log[-2000:]
        assert re.search(r"(?i)auth|token|unauthenticated", log), log[-2000:]
        # And a driver without the token is refused by baton serve with Ray's reason.
        argv = [sys.executable, "-m", "cluster.cli", "serve", "--address", hosts.address,
                "--connect-timeout", "20"]  # fmt: skip
        got = net.run(net.hosts[0], argv, hosts.env(token=False), timeout=120)
        assert got.returncode == 69, got.stderr[-2000:]
        refused = f"error: address: the Ray cluster at {hosts.address} refused this driver's"
        assert refused in got.stderr, got.stderr[-2000:]
        hosts.wait_nodes(3, 30)
    finally:
        stop(proc, 10)
        net.kill_host(intruder)


Placed = tuple[int, int, "int | tuple[int, ...]"]


def plan_file(tmp: Path, prefill: Placed, decode: Placed) -> Path:
    """A plan (``baton plan``'s format) with one prefill and one decode instance, each
    (tp, pp, plan node, or one plan node per stage); plan node i is the i-th live Ray
    node by IP (head = 0)."""
    from cluster import cli

    out = tmp / "plan.json"
    args = ["plan", "--model", "llama-13b", "--nodes", "3", "--gpus-per-node", "8", "--gpu",
            "A100-80G", "--workload", "synthetic:in=512,out=128", "--ttft-slo", "0.25",
            "--tpot-slo", "0.1", "--attainment", "0.9", "--rate", "10",
            "--out", str(out)]  # fmt: skip
    assert cli.main(args) == 0
    plan = json.loads(out.read_text())

    def instance(role: str, tp: int, pp: int, node: int | tuple[int, ...]) -> dict[str, Any]:
        nodes = node if isinstance(node, tuple) else (node,) * pp
        stages = [{"node": nodes[s], "gpus": list(range(s * tp, (s + 1) * tp))}
                  for s in range(pp)]  # fmt: skip
        return {"role": role, "tp": tp, "pp": pp, "stages": stages}

    plan["instances"] = [instance("prefill", *prefill), instance("decode", *decode)]
    out.write_text(json.dumps(plan))
    return out


@SLOW
def test_tp3_prefill_on_one_host_tp1_decode_on_another(
    hosts: netns.RayHosts, prompts: list[list[int]], expected: list[str], tmp_path: Path
) -> None:
    """SmolLM2 has 9 query and 3 KV heads: TP2 does not divide them (engine/parallel/
    layout.py), TP3 does; the plan pins the TP3 prefill on the prefill host (node 1) and
    the TP1 decode on the decode host (node 2), and the KV moves part by part."""
    tight = plan_file(tmp_path, (3, 1, 1), (1, 1, 0))  # decode on the head: 1 CPU, labelless
    head = hosts.net.hosts[0]
    argv = [sys.executable, "-m", "cluster.cli", "serve", "--address", hosts.address,
            "--decode-nodes", "baton.io/role=decode", "--plan", str(tight)]  # fmt: skip
    got = hosts.net.run(head, argv, hosts.env(), timeout=120)
    assert got.returncode == 2, got.stderr[-2000:]
    assert "plan: instance decode-0 (decode) is planned on node 0" in got.stderr
    path = plan_file(tmp_path, (3, 1, 1), (1, 1, 2))
    with serving(hosts, "--plan", str(path)) as server:
        check_parity(server, prompts[:8], expected[:8])
        layout = {i["name"]: (i["tp"], i["pp"]) for i in server.status()}
        assert layout == {"prefill-0": (3, 1), "decode-0": (1, 1)}


def rank_nodes(hosts: netns.RayHosts) -> dict[str, list[str]]:
    """Per live instance (by name), the node IP of each rank's bundle, from Ray's
    placement group table (asked on the head host)."""
    code = (
        f"import ray, json; ray.init(address={hosts.address!r}, logging_level='ERROR');"
        "ips = {n['NodeID']: n['NodeManagerAddress'] for n in ray.nodes()};"
        "print(json.dumps({g['name'].rsplit('-', 2)[-2] + '-' + g['name'].rsplit('-', 1)[-1]:"
        " [ips[n] for _, n in sorted(g['bundles_to_node_id'].items())]"
        " for g in ray.util.placement_group_table().values() if g['state'] == 'CREATED'}))"
    )
    got = hosts.net.run(hosts.net.hosts[0], [sys.executable, "-c", code], hosts.env(), 60)
    assert got.returncode == 0, got.stderr[-2000:]
    out: dict[str, list[str]] = json.loads(got.stdout.strip().splitlines()[-1])
    return out


@SLOW
def test_pp2_prefill_stages_pinned_to_two_hosts_by_plan(
    hosts: netns.RayHosts, prompts: list[list[int]], expected: list[str], tmp_path: Path
) -> None:
    """A plan spreads the PP2 prefill instance's stages: stage 0 on the prefill host (node
    1), stage 1 on the decode host (node 2), beside the TP1 decode instance. Each stage's
    rank runs where the plan says (Ray's placement groups), and the output is exact.
    With the role labels on, the same plan is refused first, naming stage 1."""
    path = plan_file(tmp_path, (1, 2, (1, 2)), (1, 1, 2))
    head = hosts.net.hosts[0]
    argv = [sys.executable, "-m", "cluster.cli", "serve", "--address", hosts.address,
            "--prefill-nodes", "baton.io/role=prefill", "--plan", str(path)]  # fmt: skip
    got = hosts.net.run(head, argv, hosts.env(), timeout=120)
    assert got.returncode == 2, got.stderr[-2000:]
    ip = {h.index: h.ip for h in hosts.net.hosts}
    assert (
        f"plan: instance prefill-0 (prefill) stage 1 is planned on node 2 ({ip[2]}), which "
        "lacks the labels baton.io/role=prefill"
    ) in got.stderr
    with serving(hosts, "--plan", str(path), roles=False) as server:
        assert rank_nodes(hosts) == {"prefill-0": [ip[1], ip[2]], "decode-0": [ip[2]]}
        check_parity(server, prompts[:8], expected[:8])
        layout = {i["name"]: (i["tp"], i["pp"]) for i in server.status()}
        assert layout == {"prefill-0": (1, 2), "decode-0": (1, 1)}


def stream(server: Server, ids: list[int], max_tokens: int) -> dict[str, Any]:
    """One streamed completion: its chunks' text, its error (if any) and whether it ended."""
    conn = http.client.HTTPConnection("127.0.0.1", server.http_port, timeout=120)
    body = {"model": "SmolLM2-135M-Instruct", "prompt": ids, "max_tokens": max_tokens,
            "temperature": 0, "ignore_eos": True, "stream": True}  # fmt: skip
    out: dict[str, Any] = {"text": "", "error": None, "done": False, "finish": None}
    try:
        conn.request("POST", "/v1/completions", json.dumps(body),
                     {"Content-Type": "application/json"})  # fmt: skip
        reply = conn.getresponse()
        assert reply.status == 200
        while line := reply.readline():
            data = line.decode().strip().removeprefix("data: ")
            if data == "[DONE]":
                out["done"] = True
                break
            if not data:
                continue
            chunk = json.loads(data)
            if "error" in chunk:
                out["error"] = chunk["error"]
            else:
                out["text"] += chunk["choices"][0]["text"]
                out["finish"] = chunk["choices"][0]["finish_reason"] or out["finish"]
    finally:
        conn.close()
    return out


@SLOW
def test_losing_the_decode_host_ends_every_stream_with_an_error(
    hosts: netns.RayHosts, prompts: list[list[int]]
) -> None:
    """Kill every process of the decode host (raylet, workers) during streamed requests:
    each stream ends with an error event and [DONE] (no hang), and the prefill host frees
    every KV block. Runs last: the decode host stays down."""
    with serving(hosts, "--transport", "torch") as server:
        with server.pool(8) as pool:
            futures = [pool.submit(stream, server, ids, 400) for ids in prompts[:8]]
            deadline = time.monotonic() + 180
            while time.monotonic() < deadline:  # until the decode instance is busy
                decode = next(i for i in server.status() if i["name"] == "decode-0")
                if decode["num_running"] > 0:
                    break
                time.sleep(0.5)
            assert decode["num_running"] > 0
            killed = hosts.net.kill_host(hosts.net.hosts[2])
            assert killed > 0
            results = [f.result(timeout=180) for f in futures]  # bounded: no hang
        for r in results:
            assert r["done"], r
            assert r["error"] is not None and r["error"]["message"], r
        deadline = time.monotonic() + 90  # the lease TTL (30 s) and the health check
        while time.monotonic() < deadline:
            prefill = next(i for i in server.status() if i["name"] == "prefill-0")
            if prefill["free_blocks"] == prefill["total_blocks"]:
                break
            time.sleep(1.0)
        assert prefill["free_blocks"] == prefill["total_blocks"], prefill
        assert prefill["counters"]["leases"] == 0, prefill
