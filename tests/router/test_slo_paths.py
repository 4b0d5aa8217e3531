"""Every request is recorded exactly once, on every path: HTTP and gRPC, streamed or
not, finished, disconnected, rejected (the real cluster, servers and sockets), plus
/api/v1/slo and /dashboard's access rules. (The instance failure path, with a fake
cluster, is in test_slo.py.)"""

from __future__ import annotations

import json
import socket
import time
import urllib.parse
from collections.abc import Iterator
from typing import Any

import pytest

import baton
from cluster import Cluster
from router.metrics import BREAKDOWN, RouterMetrics
from router.service import Router
from router.slo import SLOTargets
from tests.router.servers import HttpServerThread, ServerThread, wait_cluster_idle

KEY = "slo-test-key"
# Generous targets: a loaded 2-core machine still meets them for 4-token requests.
TARGETS = SLOTargets(ttft_s=30.0, tpot_s=10.0, objective=0.9)


class Servers:
    def __init__(self, cluster: Cluster):
        self.metrics = RouterMetrics()
        self.router = Router(cluster, metrics=self.metrics)
        self.metrics.serve_model(self.router.model_name, TARGETS, None, cluster.transport)
        self.http = HttpServerThread(self.router, metrics=self.metrics, api_key=KEY)
        self.grpc = ServerThread(self.router, api_key=KEY)

    def value(self, name: str, **labels: str) -> float:
        got = self.metrics.registry.get_sample_value(
            name, {"model_name": self.router.model_name, **labels}
        )
        return got or 0.0

    def counts(self) -> dict[str, float]:
        c = {o: self.value("baton:requests_total", outcome=o) for o in
             ("ok", "error", "aborted", "rejected")}  # fmt: skip
        c["e2e"] = self.value("baton:e2e_request_latency_seconds_count")
        c["joint"] = self.value("baton:slo_requests_total", criterion="joint", result="met")
        c["joint"] += self.value("baton:slo_requests_total", criterion="joint", result="missed")
        return c


@pytest.fixture(scope="module")
def servers(cluster: Cluster) -> Iterator[Servers]:
    s = Servers(cluster)
    yield s
    s.http.stop()
    s.grpc.stop()


@pytest.fixture(autouse=True)
def _idle_after(cluster: Cluster) -> Iterator[None]:
    yield
    wait_cluster_idle(cluster)


AUTH = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}


def completion(stream: bool, **extra: Any) -> bytes:
    body = {"prompt": "Hello there", "max_tokens": 4, "temperature": 0, "ignore_eos": True,
            "stream": stream, **extra}  # fmt: skip
    return json.dumps(body).encode()


def delta(servers: Servers, action: Any) -> dict[str, float]:
    before = servers.counts()
    action()
    # The handler's finally runs as the response ends; give the loop a moment.
    deadline = time.monotonic() + 5
    while servers.counts() == before and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.2)
    after = servers.counts()
    return {k: after[k] - before[k] for k in after if after[k] != before[k]}


ONE_OK = {"ok": 1, "e2e": 1, "joint": 1}


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_http_requests_are_recorded_once(servers: Servers, stream: bool, path: str) -> None:
    extra = {"messages": [{"role": "user", "content": "Hi"}]} if "chat" in path else {}
    body = completion(stream, **extra)
    if extra:
        body = json.dumps({k: v for k, v in json.loads(body).items() if k != "prompt"}).encode()

    def send() -> None:
        status, _ = servers.http.request("POST", path, body, AUTH)
        assert status == 200

    assert delta(servers, send) == ONE_OK


@pytest.mark.parametrize("stream", [False, True])
def test_grpc_requests_are_recorded_once(servers: Servers, stream: bool) -> None:
    params = baton.SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)

    def send() -> None:
        with baton.Client(servers.grpc.target, api_key=KEY) as client:
            if stream:
                chunks = list(client.stream("Hello there", params))
                assert chunks
            else:
                assert len(client.generate("Hello there", params).token_ids) == 4

    assert delta(servers, send) == ONE_OK


@pytest.mark.parametrize(
    "body",
    [
        completion(False, model="nope"),  # refused by the router
        completion(True, temperature=-1),  # refused by the HTTP front end
        b"{not json",
    ],
)
def test_a_rejected_http_request_is_recorded_once(servers: Servers, body: bytes) -> None:
    def send() -> None:
        status, _ = servers.http.request("POST", "/v1/completions", body, AUTH)
        assert status in (400, 404)

    assert delta(servers, send) == {"rejected": 1}


def test_a_rejected_grpc_request_is_recorded_once(servers: Servers) -> None:
    def send() -> None:
        client = baton.Client(servers.grpc.target, api_key=KEY)
        with client, pytest.raises(baton.errors.InvalidArgument):
            client.generate("Hello", baton.SamplingParams(max_tokens=0))

    assert delta(servers, send) == {"rejected": 1}


def test_a_client_that_leaves_mid_stream_is_an_abort(servers: Servers) -> None:
    def send() -> None:
        body = completion(True, max_tokens=2000)
        head = (f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
                f"Content-Length: {len(body)}\r\n\r\n")  # fmt: skip
        with socket.create_connection(("127.0.0.1", servers.http.port), timeout=30) as sock:
            sock.sendall(head.encode() + body)
            received = b""
            while received.count(b"data: ") < 3:
                received += sock.recv(65536)

    got = delta(servers, send)
    assert got == {"aborted": 1, "e2e": 1}


def test_the_ttft_breakdown_has_every_component(servers: Servers) -> None:
    """Each component is measured, none derived from another (but router_queue, which is
    TTFT less what the prefill instance measured)."""
    before = {c: servers.value("baton:ttft_breakdown_seconds_count", component=c)
              for c in BREAKDOWN}  # fmt: skip
    status, _ = servers.http.request("POST", "/v1/completions", completion(False), AUTH)
    assert status == 200
    for c in BREAKDOWN:
        assert servers.value("baton:ttft_breakdown_seconds_count", component=c) == before[c] + 1
        assert servers.value("baton:ttft_breakdown_seconds_sum", component=c) > 0, c


# -- /api/v1/slo and /dashboard ----------------------------------------------------------


def test_slo_json_windows_and_bad_window(servers: Servers) -> None:
    servers.http.request("POST", "/v1/completions", completion(False), AUTH)
    status, body = servers.http.request("GET", "/api/v1/slo?window=5m", headers=AUTH)
    assert status == 200
    five = body["windows"]["5m"]
    assert list(body["windows"]) == ["5m"] and five["judged"] >= 1
    assert five["attainment"]["joint"] is not None
    assert body["targets"] == TARGETS.to_dict()
    assert {i["role"] for i in body["instances"]} == {"prefill", "decode"}
    status, body = servers.http.request("GET", "/api/v1/slo", headers=AUTH)
    assert list(body["windows"]) == ["1m", "5m", "60m"]
    status, body = servers.http.request("GET", "/api/v1/slo?window=2h", headers=AUTH)
    assert status == 400 and body["error"]["param"] == "window"


def test_admin_status_carries_the_live_attainment(servers: Servers) -> None:
    """AdminClient.status() reads the same windows as /api/v1/slo."""
    params = baton.SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    with baton.Client(servers.grpc.target, api_key=KEY) as client:
        client.generate("Hello there", params)
    with baton.AdminClient(servers.grpc.target, api_key=KEY) as admin:
        slo = admin.status(timeout=30).slo
    _, body = servers.http.request("GET", "/api/v1/slo", headers=AUTH)
    assert slo is not None
    assert (slo.ttft_target_s, slo.tpot_target_s, slo.objective) == (30.0, 10.0, 0.9)
    assert [w.window for w in slo.windows] == ["1m", "5m", "60m"]
    for w in slo.windows:
        page = body["windows"][w.window]
        assert w.judged == page["judged"] >= 1
        assert (w.joint, w.ttft, w.tpot) == tuple(page["attainment"][c] for c in
                                                  ("joint", "ttft", "tpot"))  # fmt: skip


def test_the_page_needs_the_key(servers: Servers) -> None:
    status, text = servers.http.request("GET", "/api/v1/slo")
    assert status == 401 and "windows" not in json.dumps(text)
    status, text = servers.http.request("GET", "/dashboard")
    assert status == 401 and 'name="key"' in text and "/api/v1" not in text
    # A wrong key is refused; the right one gets a session cookie, never a URL.
    form = {"Content-Type": "application/x-www-form-urlencoded"}
    status, _ = servers.http.request(
        "POST", "/dashboard/login", urllib.parse.urlencode({"key": "bad"}).encode(), form
    )
    assert status == 401
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", servers.http.port, timeout=10)
    conn.request("POST", "/dashboard/login", urllib.parse.urlencode({"key": KEY}), form)
    r = conn.getresponse()
    r.read()
    assert r.status == 303 and r.getheader("Location") == "/dashboard"
    cookie = r.getheader("Set-Cookie", "")
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and KEY not in cookie
    session = {"Cookie": cookie.split(";")[0]}
    status, text = servers.http.request("GET", "/dashboard", headers=session)
    assert status == 200 and "app.js" in text
    status, body = servers.http.request("GET", "/api/v1/slo?window=1m", headers=session)
    assert status == 200 and "1m" in body["windows"]
    conn.request("GET", "/dashboard", headers=session)
    r = conn.getresponse()
    r.read()
    csp = r.getheader("Content-Security-Policy", "")
    assert "default-src 'none'" in csp and "script-src 'self'" in csp
    conn.close()
