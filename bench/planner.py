"""How long the placement planner takes: 4 nodes x 8 GPUs, both algorithms, two model sizes.

Usage: ``python -m bench.planner [--json-out FILE]``. Each row plans from a cold start (a
fresh evaluator, so no simulation is shared between rows) with the built-in A100-80G
profiles and DistServe's chatbot SLOs for each size (OPT-13B: TTFT 0.25 s, TPOT 0.1 s;
OPT-66B: 2.5 s, 0.15 s), and reports the wall time, the simulations run, and the plan.
Pure Python: no GPU, no torch.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass

from cluster.planner.analytic import analytic_profiles
from cluster.planner.cluster_spec import ClusterSpec, SLOs
from cluster.planner.goodput import Evaluator
from cluster.planner.model_spec import PRESETS
from cluster.planner.search import PlanInputs, plan, tp_degrees
from cluster.planner.workload import load_workload

WORKLOAD = "synthetic:in=512,out=128,cv=0.5"
# model preset -> (offered req/s, TTFT SLO s, TPOT SLO s)
CASES = {"llama-13b": (100.0, 0.25, 0.1), "opt-66b": (20.0, 2.5, 0.15)}


@dataclass(frozen=True)
class Row:
    model: str
    algorithm: str
    rate: float
    seconds: float
    simulations: int
    instances: str
    gpus: int
    per_gpu_goodput: float
    attainment: float
    colocated_per_gpu_goodput: float


def plan_once(model_name: str, algorithm: str, nodes: int, gpus_per_node: int, gpu: str) -> Row:
    """Plan one case from a cold start and time it."""
    rate, ttft, tpot = CASES[model_name]
    model = PRESETS[model_name]
    cluster = ClusterSpec(nodes, gpus_per_node, gpu)
    start = time.perf_counter()
    layouts = [(tp, pp) for tp in tp_degrees(model, cluster) for pp in range(1, 5)]
    inputs = PlanInputs(
        model,
        cluster,
        analytic_profiles(model, cluster, layouts),
        load_workload(WORKLOAD),
        SLOs(ttft, tpot, 0.9),
        rate,
        profile_source=f"analytic:{gpu}",
    )
    ev = Evaluator(model, cluster, inputs.profiles, inputs.workload, inputs.slos)
    result = plan(inputs, algorithm, evaluator=ev)
    seconds = time.perf_counter() - start
    kinds: dict[str, int] = {}
    for inst in result.instances:
        name = f"{inst.role} tp{inst.tp}pp{inst.pp}"
        kinds[name] = kinds.get(name, 0) + 1
    return Row(
        model_name,
        algorithm,
        rate,
        seconds,
        ev.simulations,
        ", ".join(f"{n} x {k}" for k, n in kinds.items()),
        result.num_gpus,
        result.per_gpu_goodput,
        result.attainment,
        result.colocated.per_gpu_goodput,
    )


def format_markdown(rows: list[Row]) -> str:
    out = [
        "| model | affinity | rate (req/s) | plan time (s) | simulations | instances | GPUs "
        "| per-GPU goodput | attainment | colocated per-GPU goodput |",
        "|---|---|---:|---:|---:|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        out.append(
            f"| {r.model} | {r.algorithm} | {r.rate:g} | {r.seconds:.1f} | {r.simulations} "
            f"| {r.instances} | {r.gpus} | {r.per_gpu_goodput:.2f} | {r.attainment:.1%} "
            f"| {r.colocated_per_gpu_goodput:.2f} |"
        )
    return "\n".join(out)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="bench.planner", description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", default=list(CASES), choices=list(CASES))
    p.add_argument("--algorithms", nargs="+", default=["high", "low"], choices=["high", "low"])
    p.add_argument("--nodes", type=int, default=4)
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--gpu", default="A100-80G")
    p.add_argument("--json-out", default=None, help="also write the rows as JSON here")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    rows = [
        plan_once(m, a, args.nodes, args.gpus_per_node, args.gpu)
        for m in args.models
        for a in args.algorithms
    ]
    print(
        f"Planning on {args.nodes} x {args.gpus_per_node} {args.gpu}, workload {WORKLOAD}, "
        "90% attainment\n"
    )
    print(format_markdown(rows))
    print(f"\ntotal: {sum(r.seconds for r in rows):.1f} s")
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump([r.__dict__ for r in rows], f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
