"""``baton plan``: choose prefill/decode instances and layouts for a cluster and workload.

``add_parsers(subparsers)`` adds the subcommand to the ``baton`` parser; its ``func`` takes
the parsed namespace and returns an exit code. Bad input raises ``ValueError`` naming the
field, which the main CLI prints as ``error: ...`` (exit 2). Progress goes to stderr, the
plan (a table, or JSON with ``--json``) to stdout, and with ``--out`` to a plan file.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any, TextIO

from cluster.planner.analytic import analytic_profiles
from cluster.planner.cluster_spec import (
    CUSTOM_GPU,
    DEFAULT_INTER_NODE_GBPS,
    GPU_TYPES,
    ClusterSpec,
    SLOs,
)
from cluster.planner.cpu_host import DEFAULT_BACKGROUND, is_cpu_profile, load_cpu_profiles
from cluster.planner.latency import ProfileSet, load_profiles
from cluster.planner.model_spec import PRESETS, ModelSpec, load_model
from cluster.planner.plan import Plan
from cluster.planner.search import AFFINITIES, PlanInputs, plan, tp_degrees
from cluster.planner.workload import load_workload

CUSTOM_MEMORY_GB = 80.0  # a measured profile of an unknown GPU: assume an 80 GB part
CUSTOM_NVLINK_GBPS = 300.0


def add_parsers(subparsers: Any) -> None:
    """Add ``plan`` to an ``argparse`` subparsers object."""
    p = subparsers.add_parser(
        "plan",
        help="plan prefill/decode instances and their TP/PP layouts (DistServe style)",
        description=(
            "Search prefill and decode layouts and instance counts that serve RATE req/s "
            "within the TTFT/TPOT SLOs on the fewest GPUs, with a simulator driven by a "
            "latency model (built-in GPU profiles or a measured profile file), and score "
            "a colocated deployment the same way."
        ),
    )
    p.add_argument(
        "--model",
        required=True,
        metavar="MODEL_OR_CONFIG",
        help=f"a preset ({', '.join(PRESETS)}) or an HF config.json / its directory",
    )
    _add_cluster_args(p)
    _add_workload_args(p)
    p.add_argument(
        "--affinity",
        choices=list(AFFINITIES),
        default="auto",
        help="high: KV may cross nodes; low: KV stays in a node; auto: both, "
        "keep the better (default: %(default)s)",
    )
    p.add_argument("--max-pp", type=int, default=4, help="deepest pipeline (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="same seed, same plan (default: 0)")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.add_argument("--out", metavar="PLAN.json", default=None, help="write the plan file here")
    p.add_argument(
        "--helm-values",
        metavar="VALUES.yaml",
        default=None,
        help="write the plan as values for the Helm chart (deploy/helm/baton): replicas "
        "and TP/PP layouts per role",
    )
    p.set_defaults(func=run_plan)


def _add_cluster_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--nodes", type=int, default=None, help="nodes in the cluster (not with a CPU profile)"
    )
    p.add_argument(
        "--gpus-per-node", type=int, default=None, help="GPUs per node (not with a CPU profile)"
    )
    p.add_argument(
        "--cores",
        type=int,
        default=0,
        help="with a CPU profile (`baton profile --threads 1,2`): the host's cores "
        "(default: the profile's)",
    )
    p.add_argument(
        "--host-load",
        type=float,
        default=None,
        metavar="CORES",
        help="with a CPU profile: cores the host's other work keeps busy while serving "
        "(the router, Ray, a client on the host); one-thread instances that fill the "
        "cores share them with it, and OpenMP teams that outnumber the cores slow down "
        f"sharply (default: {DEFAULT_BACKGROUND:g}, measured under `baton bench peers`)",
    )
    hw = p.add_mutually_exclusive_group(required=True)
    hw.add_argument("--gpu", choices=list(GPU_TYPES), help="GPU type (built-in profiles)")
    hw.add_argument(
        "--profile",
        metavar="FILE",
        help="measured latency profiles (ours, or DistServe's profiler JSON); a CPU profile "
        "(`baton profile --threads ...`) plans one CPU host: disaggregated or colocated, "
        "threads per instance, token budgets",
    )
    p.add_argument("--profile-model", default=None, help="the model's key in a DistServe profile")
    p.add_argument(
        "--gpu-memory-gb",
        type=float,
        default=0.0,
        help="memory per GPU (default: the GPU type's; with an unknown GPU's "
        f"profile {CUSTOM_MEMORY_GB:g})",
    )
    p.add_argument(
        "--intra-node-gbps",
        type=float,
        default=0.0,
        help="NVLink GB/s per GPU (default: the GPU type's)",
    )
    p.add_argument(
        "--inter-node-gbps",
        type=float,
        default=DEFAULT_INTER_NODE_GBPS,
        help="network GB/s per node (default: %(default)s)",
    )


def _add_workload_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--workload",
        required=True,
        metavar="SPEC",
        help="JSONL of {prompt_tokens, output_tokens}, or synthetic:in=N,out=M[,cv=X]",
    )
    p.add_argument("--ttft-slo", type=float, required=True, metavar="SECONDS")
    p.add_argument("--tpot-slo", type=float, required=True, metavar="SECONDS")
    p.add_argument(
        "--attainment",
        type=float,
        default=0.9,
        metavar="FRACTION",
        help="share of requests that must meet both SLOs (default: %(default)s)",
    )
    p.add_argument("--rate", type=float, required=True, metavar="RPS", help="offered req/s")
    p.add_argument(
        "--burstiness",
        type=float,
        default=1.0,
        metavar="CV",
        help="cv of inter-arrival gaps, 1 = Poisson (default: %(default)s)",
    )


def _profiles(args: argparse.Namespace, model: ModelSpec) -> tuple[ProfileSet, ClusterSpec, str]:
    for name in ("nodes", "gpus_per_node"):
        if getattr(args, name) is None:
            flag = name.replace("_", "-")
            raise ValueError(f"{flag}: required (unless --profile is a CPU profile)")
    if args.profile:
        profiles = load_profiles(args.profile, args.profile_model)
        known = profiles.gpu in GPU_TYPES
        cluster = ClusterSpec(
            nodes=args.nodes,
            gpus_per_node=args.gpus_per_node,
            gpu=profiles.gpu if known else CUSTOM_GPU,
            memory_gb=args.gpu_memory_gb or (0.0 if known else CUSTOM_MEMORY_GB),
            intra_node_gbps=args.intra_node_gbps or (0.0 if known else CUSTOM_NVLINK_GBPS),
            inter_node_gbps=args.inter_node_gbps,
        )
        return profiles, cluster, f"file:{args.profile}"
    cluster = ClusterSpec(
        args.nodes,
        args.gpus_per_node,
        args.gpu,
        args.gpu_memory_gb,
        args.intra_node_gbps,
        args.inter_node_gbps,
    )
    layouts = [(tp, pp) for tp in tp_degrees(model, cluster) for pp in range(1, args.max_pp + 1)]
    return analytic_profiles(model, cluster, layouts), cluster, f"analytic:{cluster.gpu}"


class _ProgressLine:
    """One line rewritten in place on a terminal; plain lines otherwise (logs, pipes)."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.tty = stream.isatty()

    def __call__(self, message: str) -> None:
        if self.tty:
            self.stream.write(f"\r\x1b[Kplanning: {message}")
        else:
            self.stream.write(f"planning: {message}\n")
        self.stream.flush()

    def close(self) -> None:
        if self.tty:
            self.stream.write("\r\x1b[K")
            self.stream.flush()


def run_plan(args: argparse.Namespace) -> int:
    """The ``plan`` subcommand. A plan that misses the target (a full cluster) is still a
    plan: it is printed with a warning and the exit code is 0."""
    model = load_model(args.model)
    if args.profile and is_cpu_profile(args.profile):
        return _run_cpu_plan(args, model)
    if args.host_load is not None:
        raise ValueError("host-load: only with a CPU profile (`baton profile --threads ...`)")
    profiles, cluster, source = _profiles(args, model)
    inputs = PlanInputs(
        model=model,
        cluster=cluster,
        profiles=profiles,
        workload=load_workload(args.workload),
        slos=SLOs(args.ttft_slo, args.tpot_slo, args.attainment),
        rate=args.rate,
        burstiness=args.burstiness,
        seed=args.seed,
        profile_source=source,
        max_pp=args.max_pp,
    )
    progress = _ProgressLine(sys.stderr)
    try:
        result = plan(inputs, args.affinity, progress)
    finally:
        progress.close()
    if args.out:
        with open(args.out, "w") as f:
            f.write(result.to_json() + "\n")
    if args.helm_values:
        from cluster.planner.helm_values import write_helm_values

        write_helm_values(args.helm_values, result, model)
    print(result.to_json() if args.json else format_plan(result))
    return 0


def _run_cpu_plan(args: argparse.Namespace, model: ModelSpec) -> int:
    """``baton plan`` with a CPU profile: this host's best deployment (cpu_search)."""
    from cluster.planner.cpu_search import CPU_MEMORY_GB, CpuPlanInputs, plan_cpu

    if args.nodes not in (None, 1):
        raise ValueError("nodes: a CPU profile plans one host (leave --nodes out)")
    if args.helm_values:
        raise ValueError("helm-values: not for a CPU profile's plan")
    inputs = CpuPlanInputs(
        model=model,
        profiles=load_cpu_profiles(args.profile),
        workload=load_workload(args.workload),
        slos=SLOs(args.ttft_slo, args.tpot_slo, args.attainment),
        rate=args.rate,
        burstiness=args.burstiness,
        seed=args.seed,
        cores=args.cores,
        background=DEFAULT_BACKGROUND if args.host_load is None else args.host_load,
        memory_gb=args.gpu_memory_gb or CPU_MEMORY_GB,
        profile_source=f"cpu:{args.profile}",
    )
    progress = _ProgressLine(sys.stderr)
    try:
        result, _ = plan_cpu(inputs, progress)
    finally:
        progress.close()
    if args.out:
        with open(args.out, "w") as f:
            f.write(result.to_json() + "\n")
    print(result.to_json() if args.json else format_cpu_plan(result))
    return 0


def format_cpu_plan(p: Plan) -> str:
    """A CPU plan: the chosen deployment, then every candidate the simulator scored."""
    s = p.slos
    lines = [
        f"plan: {p.model} on one host of {p.cluster.gpus_per_node} cores ({p.profile_source}), "
        f"seed {p.seed}",
        f"workload: {p.workload} at {p.rate:g} req/s (burstiness {p.burstiness:g}); "
        f"SLOs: TTFT {s.ttft_s:g} s, TPOT {s.tpot_s:g} s, {s.attainment:.0%} attainment",
        f"dtype: {p.dtype} (the profile's; `baton serve --plan` serves at it)"
        if p.dtype else "dtype: not in the profile (profiled before it was recorded)",
        "",
        f"{'role':<10} {'threads':>7} {'token budget':>12}",
    ]
    for inst in p.instances:
        budget = "default" if inst.token_budget is None else str(inst.token_budget)
        lines.append(f"{inst.role:<10} {inst.threads or 0:>7} {budget:>12}")
    lines += ["", f"{'candidate':<30} {'attainment':>10} {'max req/s':>10}"]
    for c in p.candidates:
        lines.append(f"{c['name']:<30} {c['attainment']:>10.1%} {c['max_rate']:>10.3g}")
    for name, q in (("TTFT", p.ttft), ("TPOT", p.tpot)):
        if q is not None:
            shown = " / ".join(_secs(v) for v in (q.p50, q.p90, q.p99))
            lines.append(f"chosen {name} p50/p90/p99: {shown}")
    if p.attainment < s.attainment:
        lines.append(
            f"warning: no deployment meets the {s.attainment:.0%} target at {p.rate:g} req/s"
        )
    return "\n".join(lines)


def _placement(stages: Any) -> str:
    return " | ".join(
        f"n{s.node}:{s.gpus[0]}" + (f"-{s.gpus[-1]}" if len(s.gpus) > 1 else "") for s in stages
    )


def _secs(v: float) -> str:
    return "never" if v == float("inf") else f"{v * 1000:.0f} ms" if v < 1 else f"{v:.2f} s"


def format_plan(p: Plan) -> str:
    """The plan as a readable table, predictions beside the colocated baseline's."""
    c, s = p.cluster, p.slos
    lines = [
        f"plan: {p.model} on {c.nodes} x {c.gpus_per_node} {c.gpu} ({p.profile_source}), "
        f"{p.algorithm} node affinity, seed {p.seed}",
        f"workload: {p.workload} at {p.rate:g} req/s (burstiness {p.burstiness:g}); "
        f"SLOs: TTFT {s.ttft_s:g} s, TPOT {s.tpot_s:g} s, {s.attainment:.0%} attainment",
        "",
        f"{'role':<9} {'tp':>3} {'pp':>3} {'gpus':>5}  placement (node:gpus per stage)",
    ]
    for inst in p.instances:
        lines.append(
            f"{inst.role:<9} {inst.tp:>3} {inst.pp:>3} {inst.num_gpus:>5}  "
            f"{_placement(inst.stages)}"
        )
    b = p.colocated
    disagg = f"{p.count('prefill')} prefill + {p.count('decode')} decode"
    rows = [
        ("", "disaggregated", "colocated"),
        ("instances", disagg, f"{b.instances} x tp{b.tp} pp{b.pp}"),
        ("GPUs", str(p.num_gpus), str(b.instances * b.tp * b.pp)),
        ("per-GPU goodput", f"{p.per_gpu_goodput:.3g} req/s", f"{b.per_gpu_goodput:.3g} req/s"),
        (f"attainment @ {p.rate:g}", f"{p.attainment:.1%}", f"{b.attainment:.1%}"),
    ]
    for name, q in (("TTFT", p.ttft), ("TPOT", p.tpot)):
        if q is not None:
            shown = " / ".join(_secs(v) for v in (q.p50, q.p90, q.p99))
            rows.append((f"{name} p50/p90/p99", shown, ""))
    lines.append("")
    lines.extend(f"{a:<18} {x:<24} {y}" for a, x, y in rows)
    if p.attainment < s.attainment:
        lines.append(
            f"warning: the plan misses the {s.attainment:.0%} target at {p.rate:g} req/s"
            " (the cluster is full)"
        )
    return "\n".join(lines)
