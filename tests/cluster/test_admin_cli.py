"""`baton status|cordon|uncordon|drain|scale|requests|abort|apply` against a real
`baton serve` (its own embedded Ray, free ports, an admin key), including the error
cases; scaling up and draining under a steady stream of requests, whose outputs must
equal the offline engine's; and a graceful SIGTERM on both front doors."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import baton
from engine import LLM
from engine import SamplingParams as EngineParams
from tests.serve_proc import EXE, ServeProcess

KEY = "admin-secret"
# Generous targets: a loaded 2-core machine still meets them for a few tokens.
SLO_FLAGS = ["--slo-ttft", "30", "--slo-tpot", "10", "--slo-attainment", "0.95"]


class Server(ServeProcess):
    """`baton serve` with an admin key and SLO targets, and the admin CLI run against it."""

    def __init__(self) -> None:
        super().__init__(
            "--admin-key", KEY, "--shutdown-timeout", "60", "--num-kv-blocks", "512", *SLO_FLAGS
        )

    def cli(self, *argv: str, key: str | None = KEY) -> subprocess.CompletedProcess[str]:
        env = {k: v for k, v in os.environ.items() if k not in ("BATON_ADMIN_KEY",)}
        env["BATON_SERVER"] = self.grpc
        if key is not None:
            env["BATON_ADMIN_KEY"] = key
        return subprocess.run([EXE, *argv], capture_output=True, text=True, env=env, timeout=600)

    def status(self) -> dict[str, Any]:
        done = self.cli("status", "--json")
        assert done.returncode == 0, done.stderr
        data: dict[str, Any] = json.loads(done.stdout)
        return data

    def instances(self) -> dict[str, dict[str, Any]]:
        return {i["name"]: i for p in self.status()["pools"] for i in p["instances"]}

    def wait_for(self, check: Any, what: str, timeout_s: float = 300) -> dict[str, Any]:
        deadline = time.monotonic() + timeout_s
        while True:
            instances = self.instances()
            if check(instances):
                return instances
            assert time.monotonic() < deadline, f"{what}: {instances}"
            time.sleep(0.5)


@pytest.fixture(scope="module")
def server() -> Iterator[Server]:
    s = Server()
    yield s
    if s.proc.poll() is None:
        s.kill()


def _idle(s: Server) -> dict[str, Any]:
    return s.wait_for(
        lambda insts: all(
            i["num_running"] == 0 and i["free_blocks"] == i["total_blocks"] for i in insts.values()
        ),
        "KV blocks still in use",
        30,
    )


def test_status_shows_every_instance_with_its_process(server: Server) -> None:
    table = server.cli("status")
    assert table.returncode == 0, table.stderr
    assert "prefill-0" in table.stdout and "decode-0" in table.stdout and "ready" in table.stdout
    insts = server.instances()
    assert {n: i["state"] for n, i in insts.items()} == {"prefill-0": "ready", "decode-0": "ready"}
    (node_ip,) = {inst["node_ip"] for inst in insts.values()}  # one embedded node
    assert node_ip
    for inst in insts.values():
        assert (inst["tp"], inst["pp"]) == (1, 1)
        row = next(line for line in table.stdout.splitlines() if line.startswith(inst["name"]))
        assert node_ip in row.split() and "tp1pp1" in row.split()
        # The dtype the engine runs (`auto` resolved: float32 on CPU).
        assert inst["dtype"] == "float32" and "float32" in row.split()
    for name, inst in insts.items():
        ps = subprocess.run(["ps", "-o", "args=", "-p", str(inst["pid"])], capture_output=True,
                            text=True)  # fmt: skip
        role = inst["role"].capitalize()
        assert f"{role}Instance_{name.replace('-', '_')}" in ps.stdout, ps.stdout


def test_status_shows_the_routers_live_slo_attainment(server: Server) -> None:
    def slo() -> dict[str, Any]:
        data: dict[str, Any] = server.status()["slo"]
        return data

    before = {w["window"]: w["judged"] for w in slo()["windows"]}
    params = baton.SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)
    with baton.Client(server.grpc, api_key=KEY) as client:  # the admin key opens it too
        for _ in range(2):
            assert len(client.generate("Hello there", params).token_ids) == 3
    got = slo()
    assert (got["ttft_target_s"], got["tpot_target_s"], got["objective"]) == (30, 10, 0.95)
    assert [w["window"] for w in got["windows"]] == ["1m", "5m", "60m"]
    for w in got["windows"]:
        assert w["judged"] == before[w["window"]] + 2
        assert (w["joint"], w["ttft"], w["tpot"]) == (1.0, 1.0, 1.0)  # generous targets
    with baton.AdminClient(server.grpc, api_key=KEY) as admin:
        typed = admin.status(timeout=30).slo
    assert typed is not None and typed.windows[0].judged == got["windows"][0]["judged"]
    table = server.cli("status")
    assert table.returncode == 0, table.stderr
    n = got["windows"][2]["judged"]
    line = table.stdout.splitlines()[-1]
    assert line.startswith(f"SLO attainment (joint): 1m 100% ({got['windows'][0]['judged']} req)")
    assert f"60m 100% ({n} req); objective 95% (TTFT <= 30 s, TPOT <= 10 s)" in line


@pytest.mark.parametrize(
    ("argv", "key", "code", "message"),
    [
        (["status"], None, 1, "admin-key: it needs an admin key"),
        (["status"], "client-key", 1, "admin-key: the admin key given was refused"),
        (["cordon", "decode-9"], KEY, 1, "no instance named 'decode-9'"),
        (["drain", "nope"], KEY, 1, "no instance named 'nope'"),
        (["drain", "prefill-0"], KEY, 1, "last prefill instance"),
        (["drain", "decode-0", "--timeout", "-1"], KEY, 2, "--timeout: must be >= 0"),
        (["scale", "--decode", "0"], KEY, 2, "--decode: must be at least 1"),
        (["scale", "--prefill", "two"], KEY, 2, "--prefill: must be a whole number"),
        (["scale"], KEY, 2, "give --prefill N and/or --decode M"),
        (["abort", "no-such-request"], KEY, 1, "no request 'no-such-request'"),
        (["apply", "/nonexistent/plan.json"], KEY, 2, "plan: no such file"),
        (["status", "--server", "127.0.0.1:1"], KEY, 1, "no server answers at 127.0.0.1:1"),
    ],
)
def test_errors_exit_non_zero_naming_the_fault(
    server: Server, argv: list[str], key: str | None, code: int, message: str
) -> None:
    done = server.cli(*argv, key=key)
    assert done.returncode == code, (done.stdout, done.stderr)
    assert message in done.stderr
    assert "Traceback" not in done.stderr


def test_cordon_and_uncordon(server: Server) -> None:
    assert server.cli("cordon", "decode-0").returncode == 0
    assert server.instances()["decode-0"]["state"] == "cordoned"
    assert server.cli("uncordon", "decode-0").stdout.strip() == "decode-0 uncordoned"
    assert server.instances()["decode-0"]["state"] == "ready"


def test_requests_lists_and_abort_ends_a_request(server: Server) -> None:
    params = baton.SamplingParams(max_tokens=400, temperature=0, ignore_eos=True)
    chunks: list[Any] = []
    with baton.Client(server.grpc, api_key=KEY) as client:
        stream = client.stream("Count slowly:", params, request_id="long-one")
        chunks.append(next(stream))
        rows = json.loads(server.cli("requests", "--json").stdout)
        assert [r["request_id"] for r in rows] == ["long-one"]
        assert rows[0]["instances"] and rows[0]["tokens"] >= 1
        done = server.cli("abort", "long-one")
        assert done.returncode == 0 and "long-one aborted" in done.stdout
        chunks.extend(stream)
    assert chunks[-1].finish_reason == "abort"
    assert sum(len(c.token_ids) for c in chunks) < 400
    _idle(server)


def _plan(tmp_path: Path, text: str, tp1: bool) -> tuple[Path, list[str]]:
    """A plan from ``baton plan`` (the session's ``llama13b_plan``: its prefill instance is
    TP 2, the running one TP 1); ``tp1``: every instance rewritten to one GPU, as this
    cluster runs, plus a decode instance."""
    plan = tmp_path / "plan.json"
    plan.write_text(text)
    data = json.loads(text)
    assert {(i["role"], i["tp"]) for i in data["instances"]} == {("prefill", 2), ("decode", 1)}
    if tp1:
        data["instances"].append(dict(data["instances"][-1]))
        for k, inst in enumerate(data["instances"]):
            inst.update(tp=1, pp=1, stages=[{"node": 0, "gpus": [k]}])
        plan.write_text(json.dumps(data))
    return plan, [i["role"] for i in data["instances"]]


def test_apply_dry_run_shows_the_difference(
    server: Server, tmp_path: Path, llama13b_plan: str
) -> None:
    plan, roles = _plan(tmp_path, llama13b_plan, tp1=True)
    done = server.cli("apply", str(plan), "--dry-run")
    assert done.returncode == 0, done.stderr
    assert f"prefill: 1 -> {roles.count('prefill')} (no change)" in done.stdout
    assert f"decode: 1 -> {roles.count('decode')} (+1)" in done.stdout
    assert "dry run: nothing changed" in done.stdout
    assert set(server.instances()) == {"prefill-0", "decode-0"}


@pytest.mark.parametrize("dry_run", [True, False])
def test_apply_refuses_a_layout_change_naming_the_instance(
    server: Server, tmp_path: Path, llama13b_plan: str, dry_run: bool
) -> None:
    plan, _ = _plan(tmp_path, llama13b_plan, tp1=False)
    done = server.cli("apply", str(plan), *(["--dry-run"] if dry_run else []))
    assert done.returncode == 1, (done.stdout, done.stderr)
    assert "instance prefill-0: runs tp1pp1 but the plan wants tp2pp1 for prefill" in done.stderr
    assert "cannot change on a live cluster" in done.stderr and "Traceback" not in done.stderr
    assert done.stdout == ""
    assert set(server.instances()) == {"prefill-0", "decode-0"}


def test_status_watch_refreshes_until_sigint(server: Server) -> None:
    env = {**os.environ, "BATON_SERVER": server.grpc, "BATON_ADMIN_KEY": KEY}
    proc = subprocess.Popen(
        [EXE, "status", "--watch", "--interval", "0.5"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        seen: list[str] = []
        deadline = time.monotonic() + 120
        # Two refreshes: each clears the screen and prints the whole table again.
        while sum(line.startswith("INSTANCE") for line in seen) < 2:
            assert time.monotonic() < deadline and proc.poll() is None, seen
            seen.append(proc.stdout.readline())
        proc.send_signal(signal.SIGINT)
        proc.wait(30)
        # Read through the text wrappers: communicate() would skip what they buffered.
        out, err = proc.stdout.read(), proc.stderr.read() if proc.stderr else ""
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
    assert proc.returncode == 0, err
    assert "Traceback" not in err and err == ""
    text = "".join(seen) + out
    assert text.count("\033[2J\033[H") >= 2
    assert text.count("prefill-0") >= 2 and text.count("decode-0") >= 2
    assert "SLO attainment (joint)" in text


def test_scale_up_then_drain_under_a_steady_stream(server: Server, offline: LLM) -> None:
    """Requests keep streaming while a decode instance is added and the first one is
    drained: none fails, every output equals the offline engine's, the new instance
    takes traffic, and every KV block is free afterwards."""
    stop = threading.Event()
    results: list[tuple[int, list[int], str | None]] = []
    errors: list[BaseException] = []

    def prompt(i: int) -> tuple[str, baton.SamplingParams]:
        return f"Story number {i}: once upon a time", baton.SamplingParams(
            max_tokens=6 + i % 11, temperature=0, ignore_eos=True
        )

    def load() -> None:
        i = 0
        with baton.Client(server.grpc, api_key=KEY) as client:
            while not stop.is_set():
                text, params = prompt(i)
                try:
                    ids: list[int] = []
                    last = None
                    for chunk in client.stream(text, params):
                        ids.extend(chunk.token_ids)
                        last = chunk.finish_reason
                    results.append((i, ids, last))
                except BaseException as e:  # recorded: the assertion below names it
                    errors.append(e)
                i += 1

    threads = [threading.Thread(target=load, daemon=True) for _ in range(2)]
    for t in threads:
        t.start()
    try:
        done = server.cli("scale", "--decode", "2")
        assert done.returncode == 0 and "decode: 1 -> 2 (+1)" in done.stdout, done.stdout
        server.wait_for(
            lambda insts: insts.get("decode-1", {}).get("state") == "ready", "decode-1 not ready"
        )
        server.wait_for(
            lambda insts: insts["decode-1"]["counters"].get("pulls", 0)
            + insts["decode-1"]["counters"].get("recomputes", 0) > 0,
            "decode-1 got no traffic", 60,
        )  # fmt: skip
        drained = server.cli("drain", "decode-0", "--timeout", "2")
        assert drained.returncode == 0, drained.stderr
        assert "decode-0 drained" in drained.stdout
        time.sleep(2)  # more requests, on the survivor
    finally:
        stop.set()
        for t in threads:
            t.join(120)
    assert not errors, errors[:3]
    assert len(results) >= 4
    expected = {}
    for i in sorted({i for i, _, _ in results}):
        text, params = prompt(i)
        [out] = offline.generate(
            [text], EngineParams(max_tokens=params.max_tokens, temperature=0, ignore_eos=True)
        )
        expected[i] = out.token_ids
    assert [(i, ids) for i, ids, _ in results] == [(i, expected[i]) for i, _, _ in results]
    assert {reason for _, _, reason in results} == {"length"}
    insts = _idle(server)
    assert set(insts) == {"prefill-0", "decode-1"}


IN_FLIGHT_TOKENS = 256


def test_sigterm_finishes_in_flight_requests_and_refuses_new_ones(
    server: Server, offline: LLM
) -> None:
    """Both front doors alike: not ready at once, new requests refused, the ones in
    flight run to their end, exit 0. (Last: it stops the module's server.)"""
    # Long enough to be still running through the probes below after the signal (48 tokens
    # finished before the last probe on a faster CPU, and the server had exited).
    params = baton.SamplingParams(max_tokens=IN_FLIGHT_TOKENS, temperature=0, ignore_eos=True)
    got: dict[str, list[int]] = {}

    def grpc_stream() -> None:
        with baton.Client(server.grpc, api_key=KEY) as client:
            ids = [t for c in client.stream("The history of tea", params) for t in c.token_ids]
            got["grpc"] = ids

    def http_stream() -> None:
        fields = {"prompt": "The history of tea", "max_tokens": IN_FLIGHT_TOKENS, "temperature": 0,
                  "ignore_eos": True, "stream": True}  # fmt: skip
        body = json.dumps(fields).encode()
        request = urllib.request.Request(
            f"{server.http}/v1/completions", body,
            {"Content-Type": "application/json", "Authorization": f"Bearer {KEY}"},
        )  # fmt: skip
        lines = urllib.request.urlopen(request, timeout=300).read().decode().splitlines()
        events = [line[len("data: ") :] for line in lines if line.startswith("data: ")]
        assert events[-1] == "[DONE]"
        chunks = [json.loads(e)["choices"][0] for e in events[:-1]]
        got["http_text"] = ["".join(c["text"] for c in chunks)]
        got["http_finish"] = [c["finish_reason"] for c in chunks if c.get("finish_reason")]

    threads = [threading.Thread(target=f) for f in (grpc_stream, http_stream)]
    for t in threads:
        t.start()
    time.sleep(1.0)  # both under way
    server.proc.send_signal(signal.SIGTERM)
    time.sleep(0.5)
    with pytest.raises(urllib.error.HTTPError) as health:
        urllib.request.urlopen(f"{server.http}/health", timeout=10)
    assert health.value.code == 503
    with baton.Client(server.grpc, api_key=KEY) as client, pytest.raises(baton.errors.Unavailable):
        client.generate("new", baton.SamplingParams(max_tokens=2), timeout=10)
    new = urllib.request.Request(
        f"{server.http}/v1/completions", json.dumps({"prompt": "x", "max_tokens": 2}).encode(),
        {"Content-Type": "application/json", "Authorization": f"Bearer {KEY}"},
    )  # fmt: skip
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(new, timeout=10)
    assert refused.value.code == 503
    for t in threads:
        t.join(300)
    assert server.proc.wait(120) == 0
    [expected] = offline.generate(
        ["The history of tea"],
        EngineParams(max_tokens=IN_FLIGHT_TOKENS, temperature=0, ignore_eos=True),
    )
    assert got["grpc"] == expected.token_ids
    assert got["http_text"] == [expected.text]
    assert got["http_finish"] == ["length"]
