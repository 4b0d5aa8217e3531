"""Serving across two hosts against the same instances on one host (root).

One prefill and one decode instance serve the same workload twice on a Ray cluster of
three network-namespace hosts (``bench/netns.py``: a head with the router, host
1 and host 2, on one bridge, Ray's token on):

- ``one-host``: prefill and decode both on host 1; the KV moves inside that host's
  network stack (its own IP, the kernel's local path);
- ``two-host``: prefill on host 1, decode on host 2; every KV pull crosses the veth /
  bridge link between the two.

The router (``baton serve --address``) and the client run on the head in both modes, so
the only difference is where the decode instance runs. Per mode and rate: SLO attainment
(both TTFT and TPOT met, DistServe's definition) and goodput, TTFT and TPOT, with the
workload, arrivals and client of ``bench/serving.py`` (every rate sends new token ids);
and the instances' node IPs and KV counters, so the table shows where the KV went.

Every host is a namespace on the same machine and shares its CPU cores: this measures
what the network and KV path across hosts cost, not what a second machine's compute adds.

Usage: ``python -m bench.multihost [--transports torch,grpc] [--request-rate 0.5,1]
[--num-prompts N] [--json-out FILE]`` (or ``baton bench multihost``). Everything it made
(namespaces, links, Ray and Baton processes, temp dirs) is removed at the end, also on
failure or SIGINT/SIGTERM. Without root it exits 1 saying why.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from types import FrameType
from typing import Any

MODES = ("one-host", "two-host")
HOST_LABEL = "baton.io/host"  # host 1 is h1, host 2 is h2
PLACEMENT = {"one-host": ("h1", "h1"), "two-host": ("h1", "h2")}  # (prefill, decode)
SHARED_NOTE = (
    "every host is a network namespace of one machine sharing its {cpus} CPU cores: this "
    "compares the network/KV path across hosts, not more compute"
)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="baton bench multihost", description=__doc__.split("\n")[0])
    p.add_argument("--transports", default="torch", help="KV transports, comma-separated")
    p.add_argument("--modes", default=",".join(MODES), help="in this order (one-host,two-host)")
    p.add_argument("--num-prompts", type=int, default=32, help="per rate")
    p.add_argument("--input-len", type=int, default=256, help="mean prompt tokens")
    p.add_argument("--output-len", type=int, default=32, help="mean output tokens")
    p.add_argument("--length-cv", type=float, default=0.5)
    p.add_argument("--request-rate", default="0.5,1,2", help="req/s, comma-separated")
    p.add_argument("--ttft-slo", type=float, default=2.0, help="seconds")
    p.add_argument("--tpot-slo", type=float, default=0.2, help="seconds")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ready-timeout", type=float, default=420.0, help="seconds per serve start")
    p.add_argument("--mode-timeout", type=float, default=1800.0, help="seconds per mode")
    p.add_argument("--json-out", default=None)
    # Set for the run inside the head host: one mode against the cluster at --address.
    p.add_argument("--inner", default=None, help=argparse.SUPPRESS)
    p.add_argument("--address", default=None, help=argparse.SUPPRESS)
    p.add_argument("--inner-out", default=None, help=argparse.SUPPRESS)
    return p


def _check(args: argparse.Namespace) -> tuple[list[str], list[str]]:
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    transports = [t.strip() for t in args.transports.split(",") if t.strip()]
    for mode in modes:
        if mode not in MODES:
            raise ValueError(f"modes: unknown mode {mode!r} (choose from {', '.join(MODES)})")
    for transport in transports:
        if transport not in ("torch", "grpc"):
            raise ValueError(f"transports: {transport!r} is not torch or grpc")
    if not modes or not transports:
        raise ValueError("modes and transports: at least one each")
    if args.num_prompts < 1:
        raise ValueError(f"num-prompts: must be >= 1, got {args.num_prompts}")
    for text in args.request_rate.split(","):
        try:
            rate = float(text)
        except ValueError:
            raise ValueError(f"request-rate: {text!r} is not a number") from None
        if not rate > 0:
            raise ValueError(f"request-rate: must be > 0, got {text!r}")
    return modes, transports


# -- inside the head host: one mode ---------------------------------------------------------


@contextmanager
def serve(args: argparse.Namespace, transport: str, log: Path) -> Iterator[tuple[int, int]]:
    """``baton serve`` joined to the cluster with the mode's placement; (http, grpc) ports."""
    prefill, decode = PLACEMENT[args.inner]
    argv = [sys.executable, "-m", "cluster.cli", "serve", "--address", args.address,
            "--prefill-nodes", f"{HOST_LABEL}={prefill}", "--decode-nodes",
            f"{HOST_LABEL}={decode}", "--transport", transport, "--cpus-per-rank", "1",
            "--http-port", "0", "--grpc-port", "0", "--num-kv-blocks", "512"]  # fmt: skip
    with open(log, "wb") as out:  # a log of its own: an old "ready" must not match
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + args.ready_timeout
        while True:
            text = log.read_text(errors="replace")
            if "baton serve: ready" in text:
                grpc = re.search(r"gRPC +[\d.]+:(\d+)", text)
                http = re.search(r"HTTP +http://[\d.]+:(\d+)", text)
                if grpc is None or http is None:
                    raise RuntimeError(f"baton serve printed no ports:\n{text[-2000:]}")
                break
            if proc.poll() is not None:
                raise RuntimeError(f"baton serve exited {proc.returncode}:\n{text[-3000:]}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"baton serve not ready in {args.ready_timeout:.0f}s")
            time.sleep(1.0)
        yield int(http.group(1)), int(grpc.group(1))
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)


def _instances(grpc_port: int) -> dict[str, dict[str, Any]]:
    import baton

    with baton.AdminClient(f"127.0.0.1:{grpc_port}") as admin:
        status = admin.status(timeout=30)
    return {
        i.name: {"role": i.role, "node_ip": i.node_ip, "counters": dict(i.counters)}
        for i in status.instances
    }


def _kv_delta(before: dict[str, Any], after: dict[str, Any]) -> dict[str, float]:
    """Pulls, KV bytes and hand-offs over the timed rates (all instances summed)."""
    out: dict[str, float] = {}
    for key in ("handoffs", "pulls", "kv_bytes", "recomputes"):
        total = 0.0
        for name, inst in after.items():
            prior = before.get(name, {}).get("counters", {}).get(key, 0.0)
            total += inst["counters"].get(key, 0.0) - prior
        out[key] = total
    return out


async def _serve_rates(sargs: argparse.Namespace, grpc_port: int) -> dict[str, Any]:
    """bench/serving.py's run (untimed warm-up, then each rate), with the instances'
    counters read after the warm-up and at the end."""
    from bench import serving

    model = await asyncio.to_thread(serving.server_model, sargs.base_url)
    requests = serving.make_requests(sargs)
    # Untimed: the first connections, the first KV pair between the two instances.
    await serving.run_rate(sargs, serving.warmup_prompts(requests, sargs.seed), math.inf, model)
    before = await asyncio.to_thread(_instances, grpc_port)
    runs = []
    for i, text in enumerate(sargs.request_rate.split(",")):
        sent = serving.prompts_for_rate(requests, i, sargs.seed)
        results, duration = await serving.run_rate(sargs, sent, float(text), model)
        summary = serving.summarize(results, duration, sargs.ttft_slo, sargs.tpot_slo)
        runs.append({"rate": float(text), **summary})
    after = await asyncio.to_thread(_instances, grpc_port)
    return {
        "instances": {n: {"role": i["role"], "node_ip": i["node_ip"]} for n, i in after.items()},
        "kv": _kv_delta(before, after),
        "runs": runs,
    }


def run_inner(args: argparse.Namespace, transport: str) -> dict[str, Any]:
    from bench import serving

    log = Path(args.inner_out).with_suffix(".serve.log")
    with serve(args, transport, log) as (http_port, grpc_port):
        sargs = serving.build_parser().parse_args([
            "--base-url", f"http://127.0.0.1:{http_port}", "--grpc-target",
            f"127.0.0.1:{grpc_port}", "--num-prompts", str(args.num_prompts),
            "--input-len", str(args.input_len), "--output-len", str(args.output_len),
            "--length-cv", str(args.length_cv), "--request-rate", args.request_rate,
            "--ttft-slo", str(args.ttft_slo), "--tpot-slo", str(args.tpot_slo),
            "--seed", str(args.seed), "--no-progress",
        ])  # fmt: skip
        out = asyncio.run(_serve_rates(sargs, grpc_port))
    return {"mode": args.inner, "transport": transport, **out}


# -- outside: the hosts, each mode in the head host, the table -----------------------------


def _terminate(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt  # so every `finally` runs: the namespaces come down


def run_modes(args: argparse.Namespace, argv: Sequence[str]) -> list[dict[str, Any]]:
    from bench.netns import ROLE_LABEL, Network, RayHosts

    modes, transports = _check(args)
    net = Network(3)
    results = []
    try:
        net.up()
        labels = [{}, {ROLE_LABEL: "prefill", HOST_LABEL: "h1"},
                  {ROLE_LABEL: "decode", HOST_LABEL: "h2"}]  # fmt: skip
        hosts = RayHosts(net, labels, [1, 2, 2]).start()
        head = net.hosts[0]
        ips = {"h1": net.hosts[1].ip, "h2": net.hosts[2].ip}
        for transport in transports:
            for k, mode in enumerate(modes):  # a mode may repeat (one,two,two,one)
                out = head.tmp / f"{transport}-{k}-{mode}.json"
                cmd = [sys.executable, "-m", "bench.multihost", *argv, "--inner", mode,
                       "--transports", transport, "--address", hosts.address,
                       "--inner-out", str(out)]  # fmt: skip
                print(f"multihost: {mode} over {transport} ...", file=sys.stderr, flush=True)
                got = net.run(head, cmd, hosts.env(), timeout=args.mode_timeout)
                if got.returncode != 0 or not out.exists():
                    log = out.with_suffix(".serve.log")
                    tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
                    raise RuntimeError(
                        f"multihost: {mode} over {transport} failed ({got.returncode}):\n"
                        f"{got.stderr[-3000:]}\n{tail}"
                    )
                result = json.loads(out.read_text())
                where = {i["role"]: i["node_ip"] for i in result["instances"].values()}
                prefill_host, decode_host = PLACEMENT[mode]
                want = {"prefill": ips[prefill_host], "decode": ips[decode_host]}
                if where != want:  # the comparison means nothing if placement was not kept
                    raise RuntimeError(f"multihost: {mode}: instances on {where}, not {want}")
                results.append(result)
    finally:
        net.down()
    return results


def format_markdown(results: Sequence[dict[str, Any]]) -> str:
    lines = [
        "| transport | mode | prefill / decode host | rate (req/s) | done | TTFT mean / p90 (s) "
        "| TPOT mean / p90 (s) | attainment | goodput (req/s) | KV pulls | KV MiB |",
        "| --- | --- | --- | ---: | ---: | --- | --- | ---: | ---: | ---: | ---: |",
    ]
    for res in results:
        where = {i["role"]: i["node_ip"] for i in res["instances"].values()}
        kv = res["kv"]
        for r in res["runs"]:
            t, p = r["ttft_s"], r["tpot_s"]
            lines.append(
                f"| {res['transport']} | {res['mode']} | {where['prefill']} / "
                f"{where['decode']} | {r['rate']:g} | {r['completed']}/"
                f"{r['completed'] + r['failed']} | {t['mean']:.2f} / {t['p90']:.2f} | "
                f"{p['mean']:.3f} / {p['p90']:.3f} | {100 * r['slo_attainment']:.0f}% | "
                f"{r['goodput']:.2f} | {kv['pulls']:.0f} | {kv['kv_bytes'] / 2**20:.1f} |"
            )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    try:
        _check(args)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.inner is not None:
        result = run_inner(args, args.transports)
        Path(args.inner_out).write_text(json.dumps(result, indent=1, default=str))
        return 0
    from bench.netns import unavailable

    reason = unavailable()
    if reason is not None:
        print(f"multihost: cannot make network namespaces: {reason}", file=sys.stderr)
        return 1
    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        results = run_modes(args, argv)
    except (RuntimeError, TimeoutError, subprocess.TimeoutExpired) as exc:
        print(f"error: {exc}", file=sys.stderr)  # the hosts are already down
        return 1
    finally:
        signal.signal(signal.SIGTERM, previous)
    note = SHARED_NOTE.format(cpus=os.cpu_count())
    print(f"Serving on one host against two hosts ({note}).")
    print(format_markdown(results))
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump({"note": note, "config": vars(args), "results": results}, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
