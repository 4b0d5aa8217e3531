"""KV transfer throughput of each backend beside raw loopback TCP, measured in one run.

The KV of 128-, 512- and 2048-token prompts of SmolLM2-135M (30 layers, 3 KV heads,
head_dim 64, fp32) and of a Llama-3-8B-shaped model (32 layers, 8 KV heads, head_dim 128,
fp16), synthetic tensors in head-major caches, block size 16, consecutive block ids on
both sides, is pulled by a receiver in this process from a sender in a child process
(torch/gloo, grpc; ``local`` copies within this process). The baseline is a plain socket
(``sendall``/``recv_into``) between this process and another child, moving the same byte
counts. After a warm-up per case, ``--repeats`` timed pulls alternate with as many raw
socket transfers, so both see the same load on a shared machine; each figure is a
median, and a share of raw is the raw median over the backend's. The first pull of a
fresh pair or channel is reported apart, as first-transfer latency. Targets: torch/gloo
at least 70% of raw socket throughput for transfers of 16 MiB and more, grpc at least 50%.
Every process runs torch with ``--threads`` intra-op threads (default 1: the copies are
memory-bound, and more threads than free cores stall them).

With ``--hosts`` (root; ``bench/netns.py``) the receiver and the peers run on
two hosts of their own, network namespaces joined by veths on a bridge: the bench
re-runs itself in host B's namespace with every peer (the senders and the raw socket's
far end) in host A's, each side bound to its own address, so every byte crosses the
link; the namespaces are removed afterwards, also on failure. ``local`` is left out there
(it never leaves the process), and so is the TTFT share.

Usage: ``python -m bench.kv_transfer [--quick] [--hosts] [--json-out FILE]``. Unless ``--quick``, it
then measures the transfer's share of TTFT on a real local cluster (``bench/kv_ttft.py``).
The child processes are :mod:`bench.kv_peers`.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import torch

from bench.kv_peers import BLOCK_SIZE, MODELS, Model, Peer, RawLink, descriptor, make_blocks
from kv_transfer import KVReceiver, TransferConfig, TransferStatus, create_receiver, create_sender

TARGETS = {"torch": 0.70, "grpc": 0.50}  # share of raw socket throughput, from TARGET_MIN_BYTES
TARGET_MIN_BYTES = 16 << 20


@dataclass(frozen=True)
class Row:
    backend: str  # "raw" for the socket baseline
    model: str
    tokens: int
    nbytes: int
    seconds: float  # median of the timed repeats
    gbytes_per_s: float
    # The raw socket's median over this row's backend median, both from alternating trials;
    # None for the baseline's own rows (the median of every raw trial of that case).
    share_of_raw: float | None
    target: float | None  # the share this row must reach, where one applies


@dataclass(frozen=True)
class FirstTransfer:
    backend: str
    model: str
    tokens: int
    seconds: float  # the first pull on a fresh pair/channel, connection setup included


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bench.kv_transfer",
        description="KV transfer throughput per backend beside raw loopback TCP.",
    )
    p.add_argument("--quick", action="store_true", help="128-token prompts, 2 repeats")
    p.add_argument("--backends", default="torch,grpc,local", help="comma-separated")
    p.add_argument("--models", default=",".join(MODELS), help="comma-separated")
    p.add_argument("--tokens", default="128,512,2048", help="prompt lengths, comma-separated")
    p.add_argument("--repeats", type=int, default=5, help="timed pulls per case (median)")
    p.add_argument("--chunk-bytes", type=int, default=TransferConfig().chunk_bytes)
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads in every process (copies are memory-bound, and "
        "two busy processes share the cores)",
    )
    p.add_argument(
        "--ttft-requests",
        type=int,
        default=8,
        help="512-token requests per transport for the TTFT share on a real local cluster "
        "(0 skips it; --quick skips it)",
    )
    p.add_argument("--json-out", default=None, help="also write the results as JSON here")
    p.add_argument(
        "--hosts",
        action="store_true",
        help="between two network-namespace hosts over a veth link (root) instead of loopback",
    )
    # Set by --hosts for the run inside host B: where the peers run and what each side binds.
    p.add_argument("--peer-netns", default=None, help=argparse.SUPPRESS)
    p.add_argument("--peer-host", default="127.0.0.1", help=argparse.SUPPRESS)
    p.add_argument("--host", default="127.0.0.1", help=argparse.SUPPRESS)
    return p


def _peer_prefix(args: argparse.Namespace) -> list[str]:
    return [] if args.peer_netns is None else ["ip", "netns", "exec", args.peer_netns]


def run_on_hosts(argv: list[str]) -> int:
    """Two namespace hosts; this bench again inside host B, its peers inside host A."""
    import subprocess
    import sys

    from bench.netns import REPO, Network, unavailable

    reason = unavailable()
    if reason is not None:
        print(f"kv_transfer --hosts: cannot make network namespaces: {reason}", file=sys.stderr)
        return 1
    net = Network(2)
    try:
        net.up()
        a, b = net.hosts
        cmd = [sys.executable, "-m", "bench.kv_transfer", *argv, "--ttft-requests", "0",
               "--peer-netns", a.netns, "--peer-host", a.ip, "--host", b.ip]  # fmt: skip
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        return subprocess.run(["ip", "netns", "exec", b.netns, *cmd], env=env).returncode
    finally:
        net.down()


# -- measuring ----------------------------------------------------------------------------


def _timed(fn: Callable[[int], None], arg: int) -> float:
    t0 = time.perf_counter()
    fn(arg)
    return time.perf_counter() - t0


@dataclass
class Trials:
    """Seconds per timed repeat, the backend's and the raw socket's taken in turn."""

    backend: list[float]
    raw: list[float]


def measure_backend(
    backend: str, args: argparse.Namespace, models: list[Model], tokens: list[int], raw: RawLink
) -> tuple[dict[tuple[str, int], Trials], list[FirstTransfer]]:
    """(model, tokens) -> trials, and each model's first-pull latency.

    Raw socket trials alternate with the backend's, so both see the same load on a shared
    machine."""
    config = TransferConfig(
        backend=backend, host=args.host, timeout_s=60.0, chunk_bytes=args.chunk_bytes
    )
    num_blocks = math.ceil(max(tokens) / BLOCK_SIZE)
    peer = None
    if backend != "local":
        peer = Peer(backend, args.models, args.tokens, args.chunk_bytes, args.threads,
                    args.peer_host, _peer_prefix(args))  # fmt: skip
    trials: dict[tuple[str, int], Trials] = {}
    firsts: list[FirstTransfer] = []
    try:
        for model in models:
            sender = None
            if peer is None:
                sender = create_sender(
                    f"bench-{model.name}", make_blocks(model, num_blocks, True), config
                )
                source = sender.start()
                for t in tokens:
                    sender.publish(descriptor(model, t))
            else:
                source = peer.hello["endpoints"][model.name]
            receiver = create_receiver("bench-rx", make_blocks(model, num_blocks, False), config)
            receiver.start()
            pull = _puller(backend, model, source, receiver, peer)
            firsts.append(FirstTransfer(backend, model.name, tokens[0], _timed(pull, tokens[0])))
            for t in tokens:
                n = descriptor(model, t).nbytes
                pull(t)  # warm-up
                raw.receive(n)
                trial = trials[(model.name, t)] = Trials([], [])
                for _ in range(args.repeats):
                    trial.backend.append(_timed(pull, t))
                    trial.raw.append(_timed(raw.receive, n))
            receiver.stop()
            if sender is not None:
                sender.stop()
    finally:
        if peer is not None:
            peer.close()
    return trials, firsts


def _puller(
    backend: str, model: Model, source: str, receiver: KVReceiver, peer: Peer | None
) -> Callable[[int], None]:
    """pull(tokens): one pull of that case's descriptor into the same block ids."""

    def request_send(rid: str, info: dict[str, str]) -> None:
        assert peer is not None  # only the torch backend asks, and it runs in a child
        peer.command(op="send", model=model.name, request_id=rid, peer=info)

    def pull(tokens: int) -> None:
        desc = descriptor(model, tokens)
        res = receiver.pull(desc, source, list(desc.block_ids), request_send)
        if res.status is not TransferStatus.DONE:
            raise RuntimeError(f"{backend} pull of {desc.request_id} failed: {res.error}")

    return pull


def measure_throughput(args: argparse.Namespace) -> tuple[list[Row], list[FirstTransfer]]:
    """Every backend's rows beside the raw socket rows for the same byte counts."""
    models = [MODELS[m] for m in args.models.split(",")]
    tokens = [int(t) for t in args.tokens.split(",")]
    largest = max(descriptor(m, t).nbytes for m in models for t in tokens)
    raw = RawLink(largest, args.peer_host, _peer_prefix(args))
    rows: list[Row] = []
    raw_times: dict[tuple[str, int], list[float]] = {
        (m.name, t): [] for m in models for t in tokens
    }
    firsts: list[FirstTransfer] = []
    try:
        for backend in args.backends.split(","):
            trials, first = measure_backend(backend, args, models, tokens, raw)
            firsts += first
            for m in models:
                for t in tokens:
                    n, trial = descriptor(m, t).nbytes, trials[(m.name, t)]
                    s, s_raw = statistics.median(trial.backend), statistics.median(trial.raw)
                    raw_times[(m.name, t)] += trial.raw
                    target = TARGETS.get(backend) if n >= TARGET_MIN_BYTES else None
                    rows.append(Row(backend, m.name, t, n, s, n / s / 1e9, s_raw / s, target))
    finally:
        raw.close()
    raw_rows = []
    for (name, t), times in raw_times.items():
        n, s = descriptor(MODELS[name], t).nbytes, statistics.median(times)
        raw_rows.append(Row("raw", name, t, n, s, n / s / 1e9, None, None))
    return raw_rows + rows, firsts


def format_markdown(rows: Sequence[Row], firsts: Sequence[FirstTransfer]) -> str:
    lines = [
        "| backend | model (KV dtype) | tokens | MiB | median ms | GB/s | share of raw | target |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for r in rows:
        share = "" if r.share_of_raw is None else f"{r.share_of_raw:.0%}"
        target = ""
        if r.target is not None:
            met = r.share_of_raw is not None and r.share_of_raw >= r.target
            target = f">= {r.target:.0%} {'met' if met else 'MISSED'}"
        lines.append(
            f"| {r.backend} | {r.model} ({MODELS[r.model].dtype}) | {r.tokens} | "
            f"{r.nbytes / 2**20:.1f} | {r.seconds * 1e3:.2f} | {r.gbytes_per_s:.2f} | "
            f"{share} | {target} |"
        )
    lines += [
        "",
        "| backend | model | first pull (tokens) | ms, connection setup included |",
        "| --- | --- | ---: | ---: |",
    ]
    lines += [f"| {f.backend} | {f.model} | {f.tokens} | {f.seconds * 1e3:.1f} |" for f in firsts]
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.quick:
        args.tokens, args.repeats = "128", 2
    if args.hosts and args.backends == parser.get_default("backends"):
        args.backends = "torch,grpc"  # local never leaves the process
    if args.repeats < 1 or args.threads < 1:
        parser.error("--repeats and --threads: must be >= 1")
    for flag, given, known in (
        ("--models", args.models, MODELS),
        ("--backends", args.backends, ("torch", "grpc", "local")),
    ):
        unknown = set(given.split(",")) - set(known)
        if unknown:
            parser.error(
                f"{flag}: unknown {', '.join(sorted(unknown))} (known: {', '.join(known)})"
            )
    if not all(t.isdigit() and int(t) > 0 for t in args.tokens.split(",")):
        parser.error(f"--tokens: comma-separated positive integers, got {args.tokens!r}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.hosts and args.peer_netns is None:
        import sys

        return run_on_hosts(list(sys.argv[1:] if argv is None else argv))
    torch.set_num_threads(args.threads)
    rows, firsts = measure_throughput(args)
    shares = []
    if args.ttft_requests > 0 and not args.quick:
        from bench.kv_ttft import format_markdown as format_ttft
        from bench.kv_ttft import measure_ttft_share

        shares = measure_ttft_share(["torch", "grpc"], 512, args.ttft_requests)
    print(
        f"KV transfer throughput, torch {torch.__version__}, "
        f"{'two namespace hosts over a veth/bridge link' if args.peer_netns else 'loopback'}, "
        f"chunk_bytes={args.chunk_bytes}, {args.threads} torch thread(s) per process, "
        f"median of {args.repeats}\n"
    )
    print(format_markdown(rows, firsts))
    if shares:
        print("\nThe transfer's share of TTFT (1 prefill + 1 decode instance, 1 CPU each):\n")
        print(format_ttft(shares))
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(
                {
                    "chunk_bytes": args.chunk_bytes,
                    "repeats": args.repeats,
                    "threads": args.threads,
                    "cpu_count": os.cpu_count(),
                    "rows": [asdict(r) for r in rows],
                    "first_transfer": [asdict(f) for f in firsts],
                    "ttft_share": [x.as_dict() for x in shares],
                },
                f,
                indent=2,
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
