"""The CPU planner's prediction for each Baton deployment of a ``baton bench peers`` run,
beside what that run measured (``baton bench peers-sim RUN.json --profile cpu.json``).

For each Baton system of the run (``--json-out`` of ``baton bench peers``), the
deployment it served (``bench.peers.DEPLOYMENTS``'s ``baton serve`` arguments, and for
``plan`` the plan's instances, recorded in the run or read from ``--plan``) is scored the
way ``baton plan`` scores candidates (``cluster.planner.cpu_search``): simulated on the
``baton profile`` file at each Poisson phase's rate, with the phase's prompt and output
lengths, the run's SLOs and ``--host-load``. One row per phase: the share of requests
within both SLOs, TTFT and TPOT mean and p90, measured and simulated (the simulation
counts its steady state, past its warm-up; a phase of a few hundred requests is mostly
ramp), then per system the highest rate that kept the run's attainment target, measured
(the highest passing phase) and simulated (bisection, as the planner ranks deployments).

It tells whether the planner's ranking can be trusted on this host: where the simulated
and measured columns part, the plan's choice between those deployments is a guess.
Takes seconds; no server runs.
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
from pathlib import Path
from typing import Any

from bench.peers import DEPLOYMENTS, attainment, label, max_rate_meeting
from cluster import cli
from cluster.actors import default_threads
from cluster.planner.cluster_spec import SLOs
from cluster.planner.cpu_host import DEFAULT_BACKGROUND, load_cpu_profiles
from cluster.planner.cpu_search import (
    DEFAULT_BUDGET,
    CpuDeployment,
    CpuPlanInputs,
    CpuPlanner,
)
from cluster.planner.model_spec import PRESETS, load_model
from cluster.planner.workload import load_workload


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="baton bench peers-sim", description=__doc__.split("\n")[0])
    p.add_argument("run", type=Path, metavar="RUN.json", help="a `baton bench peers "
                   "--json-out` file")  # fmt: skip
    p.add_argument("--profile", type=Path, required=True,
                   help="a `baton profile` of this host (a baton.cpu_profiles file)")  # fmt: skip
    p.add_argument("--model", default="smollm2-135m", metavar="MODEL_OR_CONFIG",
                   help=f"a preset ({', '.join(PRESETS)}) or an HF config.json "
                   "(default: %(default)s, the run's model)")  # fmt: skip
    p.add_argument("--host-load", type=float, default=DEFAULT_BACKGROUND, metavar="CORES",
                   help="as `baton plan --host-load` (default: %(default)s)")  # fmt: skip
    p.add_argument("--plan", type=Path, default=Path("plan.json"),
                   help="the plan the run's `plan` deployment served, for runs that did not "
                   "record it (default: %(default)s)")  # fmt: skip
    return p


def plan_deployment(instances: list[dict[str, Any]]) -> CpuDeployment:
    """The deployment a CPU plan's ``instances`` describe (``cpu_search._instance_plans``
    backwards)."""
    roles = [i.get("role") for i in instances]
    if not instances or any(r not in ("prefill", "decode", "colocated") for r in roles):
        raise ValueError(f"plan: instances must be prefill, decode or colocated, got {roles}")

    def first(role: str, key: str, default: int) -> int:
        value = next((i.get(key) for i in instances if i["role"] == role), None)
        return default if value is None else int(value)

    if "colocated" in roles:
        if len(set(roles)) > 1:
            raise ValueError("plan: colocated instances beside prefill/decode ones")
        return CpuDeployment("colocated", 0, len(roles), 0, first("colocated", "threads", 1),
                             first("colocated", "token_budget", DEFAULT_BUDGET))  # fmt: skip
    return CpuDeployment(
        "disaggregated", roles.count("prefill"), roles.count("decode"),
        first("prefill", "threads", 1), first("decode", "threads", 1),
        first("prefill", "token_budget", DEFAULT_BUDGET),
    )  # fmt: skip


def deployment(record: dict[str, Any], cores: int, plan_file: Path) -> CpuDeployment:
    """What a run's Baton system served, as the planner's candidate."""
    name = record["system"].removeprefix("baton-")
    if "serve_args" in record:
        serve_args = list(record["serve_args"])
    elif name in DEPLOYMENTS:
        serve_args = DEPLOYMENTS[name]
    else:
        raise ValueError(f"{record['system']}: not a deployment of bench.peers")
    o = cli.build_parser().parse_args(["serve", *serve_args])  # serve's own defaults
    if o.plan is not None:
        instances = record.get("plan_instances")
        if instances is None:
            if not plan_file.is_file():
                raise ValueError(
                    f"plan: {record['system']} served a plan the run did not record; "
                    f"give it with --plan (no such file: {plan_file})"
                )
            instances = json.loads(plan_file.read_text()).get("instances", [])
        return plan_deployment(instances)
    if o.mode == "colocated":
        threads = o.threads_per_rank or default_threads("colocated", 1, cores, o.decode)
        return CpuDeployment("colocated", 0, o.decode, 0, threads, DEFAULT_BUDGET)
    n = o.prefill + o.decode
    tp = o.threads_per_rank or default_threads("prefill", 1, cores, n)
    td = o.threads_per_rank or default_threads("decode", 1, cores, n)
    return CpuDeployment("disaggregated", o.prefill, o.decode, tp, td, DEFAULT_BUDGET)


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None or not math.isfinite(seconds) else f"{1e3 * seconds:.0f}"


def compare(run: dict[str, Any], args: argparse.Namespace) -> tuple[list[str], list[str]]:
    """The table's rows and the per-system rate lines."""
    profiles = load_cpu_profiles(args.profile)
    slo, target = run["slo"], float(run["config"].get("attainment", 0.9))
    slos = SLOs(slo["ttft_ms"] / 1e3, slo["tpot_ms"] / 1e3, target)
    model = load_model(args.model)
    rows, rates = [], []
    for record in run["systems"]:
        if not record["system"].startswith("baton-") or not record.get("phases"):
            continue
        poisson = [p for p in record["phases"] if math.isfinite(p["rate"])]
        if not poisson:
            continue
        dep = deployment(record, profiles.cores, args.plan)
        first = poisson[0]
        workload = load_workload(f"synthetic:in={first['input_len']},out={first['output_len']}")
        planner = CpuPlanner(CpuPlanInputs(model, profiles, workload, slos, first["rate"],
                                           background=args.host_load))  # fmt: skip
        ev, key, sims = planner.evaluator(dep.budget), ("cpu", dep), planner.sim_instances(dep)
        for p in poisson:
            res, _ = ev.simulate(key, sims, p["rate"], plan_check=True)
            ttft, tpot = res.percentiles("ttft"), res.percentiles("tpot")
            rows.append(
                f"| {label(record)} | {dep.name} | {p['rate']:g} | "
                f"{attainment(p):.0%} / {res.attainment(slos):.0%} | "
                f"{p['mean_ttft_ms']:.0f} / {_ms(res.mean_ttft_s())} | "
                f"{p['p90_ttft_ms']:.0f} / {_ms(ttft[1] if ttft else None)} | "
                f"{p['mean_tpot_ms']:.0f} / {_ms(res.mean_tpot_s())} | "
                f"{p['p90_tpot_ms']:.0f} / {_ms(tpot[1] if tpot else None)} |"
            )
        measured = max_rate_meeting(record, target)
        simulated = ev.group_rate(key, sims, planner.rate_bound())
        shown = f"{measured:g}" if measured is not None else f"below {poisson[0]['rate']:g}"
        rates.append(
            f"{label(record)} ({dep.name}): highest rate with >= {target:.0%} within "
            f"the SLO: measured {shown} req/s, simulated {simulated:.2f} req/s"
        )
    return rows, rates


HEADER = [
    "| system | as planned | rate (req/s) | SLO met: measured / sim | TTFT mean ms | "
    "TTFT p90 ms | TPOT mean ms | TPOT p90 ms |",
    "|---|---|---:|---:|---:|---:|---:|---:|",
]


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.host_load < 0:
            raise ValueError(f"host-load: must be >= 0 cores, got {args.host_load}")
        try:
            run = json.loads(args.run.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"run: cannot read {str(args.run)!r} ({e})") from None
        if not isinstance(run, dict) or "systems" not in run or "slo" not in run:
            raise ValueError(f"run: {str(args.run)!r} is not a `baton bench peers` JSON")
        rows, rates = compare(run, args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not rows:
        print(f"error: run: no Baton system with a Poisson phase in {str(args.run)!r}",
              file=sys.stderr)  # fmt: skip
        return 2
    print(f"simulated on {args.profile} at --host-load {args.host_load:g} "
          f"(each cell: measured / simulated)")  # fmt: skip
    print("\n".join(HEADER + rows))
    print("\n".join(["", *rates]))
    print(f"\nmeasured: {shlex.quote(str(args.run))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
