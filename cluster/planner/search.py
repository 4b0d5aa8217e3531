"""DistServe's placement search, and the colocated baseline scored the same way.

High node affinity (fast network between nodes: KV can go anywhere). Prefill and decode
are independent: for every (TP, PP) layout that fits, binary-search the highest rate one
instance serves within its own SLO (TTFT for prefill, TPOT for decode, KV over the node
network), and replicate each phase to the offered rate. DistServe keeps each phase's
layout with the highest rate per GPU; this keeps the (prefill, decode) pair that needs
the fewest GPUs at the offered rate (ties: the higher per-GPU goodput), which is the same
choice at high rates and the better one at low rates, where whole instances round up.

Low node affinity (slow network: KV must stay inside a node). The model is cut into
``inter_op`` node-stages; a unit holds prefill and decode instances whose segments with
the same layers share a node. Every intra-node configuration that fits a node's GPUs
(segment layouts and instance counts) is estimated from the per-instance rates (KV over
NVLink), the ``LOW_AFFINITY_FINALISTS`` best (fewest GPUs at the offered rate, then rate
per GPU) are simulated whole and binary-searched, and the best is replicated.

Then, for both, the whole plan is simulated at the offered rate; while it misses the
attainment target (each phase alone may meet it while requests miss one or the other) and
GPUs are free, the phase that misses more gets one more instance (low: one more unit).

The colocated baseline: instances that run both phases with chunked prefill, every
layout binary-searched the same way, the one needing the fewest GPUs at the offered rate
replicated to it (as far as the cluster holds), and simulated at that rate.

Only TP degrees that split the heads and stay inside a node, and PP depths up to
``max_pp``, are tried; a layout must hold one mean request in its KV cache.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, TypedDict

from cluster.planner._validate import positive, positive_int, require
from cluster.planner.cluster_spec import ClusterSpec, SLOs
from cluster.planner.goodput import Evaluator, SimBudget
from cluster.planner.latency import ProfileSet
from cluster.planner.model_spec import ModelSpec
from cluster.planner.placement import Allocator, Unit, place_units, units_capacity
from cluster.planner.plan import ColocatedBaseline, InstancePlan, LatencyPercentiles, Plan
from cluster.planner.simulator import SimInstance
from cluster.planner.workload import Workload

if TYPE_CHECKING:  # cpu_search builds its plans with asked(), so imports this module
    from cluster.planner.cpu_search import CpuPlanInputs

Layout = tuple[int, int]
Progress = Callable[[str], None]
AFFINITIES = ("high", "low", "auto")
LOW_AFFINITY_FINALISTS = 3
MAX_TOP_UPS = 4


@dataclass(frozen=True)
class PlanInputs:
    """Everything a plan depends on; the same inputs always give the same plan."""

    model: ModelSpec
    cluster: ClusterSpec
    profiles: ProfileSet
    workload: Workload
    slos: SLOs
    rate: float  # offered requests/s
    burstiness: float = 1.0  # cv of inter-arrival gaps (1: Poisson)
    seed: int = 0
    profile_source: str = "analytic"
    max_pp: int = 4  # deepest pipeline tried
    budget: SimBudget = field(default_factory=SimBudget)

    def __post_init__(self) -> None:
        positive(self.rate, "rate")
        positive(self.burstiness, "burstiness")
        positive_int(self.max_pp, "max_pp")


def tp_degrees(model: ModelSpec, cluster: ClusterSpec) -> list[int]:
    """Powers of two that split the heads evenly and stay inside a node."""
    out, tp = [], 1
    while tp <= cluster.gpus_per_node:
        kv = model.num_kv_heads
        if model.num_heads % tp == 0 and (kv % tp == 0 or tp % kv == 0):
            out.append(tp)
        tp *= 2
    return out


def candidate_layouts(ev: Evaluator, max_pp: int) -> list[Layout]:
    """Layouts with a profile whose KV cache holds at least one mean request."""
    need = ev.workload.mean_in + ev.workload.mean_out
    return [
        (tp, pp)
        for tp in tp_degrees(ev.model, ev.cluster)
        for pp in range(1, min(max_pp, ev.model.num_layers) + 1)
        if tp * pp <= ev.cluster.total_gpus
        and ev.profiles.has(tp, pp)
        and ev.kv_capacity((tp, pp)) >= need
    ]


def _gpus(layout: Layout) -> int:
    return layout[0] * layout[1]


def _cheapest(rates: dict[Layout, float], rate: float, total_gpus: int) -> Layout:
    """The layout whose copies serve ``rate`` on the fewest GPUs (more than the cluster
    has counts as too many); ties: higher rate per GPU, then fewer GPUs, then lower TP."""

    def cost(lay: Layout) -> tuple[float, float, int, int]:
        if rates[lay] == 0:
            return (math.inf, 0.0, _gpus(lay), lay[0])
        need = math.ceil(rate / rates[lay]) * _gpus(lay)
        return (
            need if need <= total_gpus else math.inf,
            -rates[lay] / _gpus(lay),
            _gpus(lay),
            lay[0],
        )

    return min(rates, key=cost)


def _sim_instances(ev: Evaluator, instances: list[InstancePlan]) -> list[SimInstance]:
    return [
        SimInstance(
            i.role,
            ev.profile((i.tp, i.pp)),
            0 if i.role == "prefill" else ev.kv_capacity((i.tp, i.pp)),
            i.nodes,
        )
        for i in instances
    ]


def _signature(instances: list[InstancePlan]) -> tuple[object, ...]:
    return ("plan", *((i.role, i.tp, i.pp, i.nodes) for i in instances))


def check_plan(
    ev: Evaluator, instances: list[InstancePlan], rate: float
) -> tuple[float, float, float]:
    """Simulated attainment at ``rate``: (both SLOs, TTFT alone, TPOT alone)."""
    result, _ = ev.simulate(
        _signature(instances), _sim_instances(ev, instances), rate, plan_check=True
    )
    s = ev.slos
    return result.attainment(s), result.attainment(s, tpot=False), result.attainment(s, ttft=False)


def plan_latency(
    ev: Evaluator, instances: list[InstancePlan], rate: float
) -> tuple[LatencyPercentiles | None, LatencyPercentiles | None]:
    """TTFT and TPOT p50/p90/p99 at ``rate``, from the simulation ``check_plan`` ran."""
    result, _ = ev.simulate(
        _signature(instances), _sim_instances(ev, instances), rate, plan_check=True
    )
    ttft, tpot = result.percentiles("ttft"), result.percentiles("tpot")
    return (
        None if ttft is None else LatencyPercentiles(*ttft),
        None if tpot is None else LatencyPercentiles(*tpot),
    )


def _phase_rates(
    ev: Evaluator, layouts: list[Layout], link: str, progress: Progress
) -> tuple[dict[Layout, float], dict[Layout, float]]:
    prefill, decode = {}, {}
    for k, lay in enumerate(layouts, start=1):
        progress(f"{link}-link layouts: tp={lay[0]} pp={lay[1]} ({k}/{len(layouts)})")
        prefill[lay] = ev.prefill_rate(lay)
        decode[lay] = ev.decode_rate(lay, link)
    return prefill, decode


def _no_layout(what: str) -> ValueError:
    return ValueError(f"slos: no layout meets the {what} SLO at any rate (relax --{what}-slo)")


def _pairs(
    prefill: dict[Layout, float], decode: dict[Layout, float], rate: float
) -> list[tuple[int, float, Layout, Layout, int, int]]:
    """Every (prefill, decode) layout pair replicated to ``rate``, fewest GPUs first, then
    highest per-GPU goodput: (GPUs, per-GPU goodput, layouts, instance counts)."""
    out = []
    for lp, gp in prefill.items():
        for ld, gd in decode.items():
            if gp > 0 and gd > 0:
                n_p, n_d = math.ceil(rate / gp), math.ceil(rate / gd)
                per_gpu = 1.0 / (_gpus(lp) / gp + _gpus(ld) / gd)
                out.append((n_p * _gpus(lp) + n_d * _gpus(ld), per_gpu, lp, ld, n_p, n_d))
    out.sort(key=lambda o: (o[0], -o[1], _gpus(o[2]) + _gpus(o[3]), o[2], o[3]))
    return out


def _pack(
    ev: Evaluator, plan: list[tuple[str, Layout]]
) -> tuple[Allocator, list[InstancePlan]] | None:
    alloc = Allocator(ev.cluster.nodes, ev.cluster.gpus_per_node)
    placed = []
    for role, lay in sorted(plan, key=lambda p: -_gpus(p[1])):
        inst = alloc.place(role, *lay)
        if inst is None:
            return None
        placed.append(inst)
    return alloc, placed


def plan_high(
    ev: Evaluator, inputs: PlanInputs, progress: Progress
) -> tuple[list[InstancePlan], float]:
    """High node affinity: each phase's layout on its own, replicated to the offered rate
    (the pair needing the fewest GPUs); returns (instances, per-GPU goodput)."""
    layouts = candidate_layouts(ev, inputs.max_pp)
    require(bool(layouts), "model", "no (tp, pp) layout fits its weights in this cluster")
    prefill, decode = _phase_rates(ev, layouts, "inter", progress)
    if not any(prefill.values()):
        raise _no_layout("ttft")
    if not any(decode.values()):
        raise _no_layout("tpot")
    pairs = _pairs(prefill, decode, inputs.rate)
    chosen = None
    for gpus, per_gpu, lay_p, lay_d, n_p, n_d in pairs:
        if gpus > ev.cluster.total_gpus:
            break
        packed = _pack(ev, [("prefill", lay_p)] * n_p + [("decode", lay_d)] * n_d)
        if packed is not None:
            chosen = (per_gpu, lay_p, lay_d, packed)
            break
    if chosen is None:
        top = max(p[1] for p in pairs)
        raise ValueError(
            f"rate: {inputs.rate:g} req/s needs at least {pairs[0][0]} GPUs; the cluster has "
            f"{ev.cluster.total_gpus} (it serves about {top * ev.cluster.total_gpus:.3g} req/s)"
        )
    per_gpu, best_p, best_d, (alloc, placed) = chosen
    progress("checking the plan at the offered rate")
    for _ in range(MAX_TOP_UPS):
        both, ttft_ok, tpot_ok = check_plan(ev, placed, inputs.rate)
        if both >= ev.slos.attainment:
            break
        role = "prefill" if ttft_ok < tpot_ok else "decode"
        extra = alloc.place(role, *(best_p if role == "prefill" else best_d))
        if extra is None:
            break
        placed.append(extra)
    return placed, per_gpu


def _units(ev: Evaluator, inter_op: int, feasible: set[Layout]) -> list[Unit]:
    m = ev.cluster.gpus_per_node
    segments = [(tp, p) for tp in tp_degrees(ev.model, ev.cluster) for p in range(1, m // tp + 1)]
    out = []
    for seg_p in segments:
        for seg_d in segments:
            if (seg_p[0], seg_p[1] * inter_op) not in feasible:
                continue
            if (seg_d[0], seg_d[1] * inter_op) not in feasible:
                continue
            g_p, g_d = seg_p[0] * seg_p[1], seg_d[0] * seg_d[1]
            for n_p in range(1, (m - g_d) // g_p + 1):
                for n_d in range(1, (m - n_p * g_p) // g_d + 1):
                    out.append(Unit(inter_op, seg_p, seg_d, n_p, n_d))
    return out


def _estimate_units(
    ev: Evaluator,
    feasible: set[Layout],
    prefill: dict[Layout, float],
    decode: dict[Layout, float],
    rate: float,
) -> list[tuple[int, float, Unit]]:
    """Every unit that fits a node, estimated from per-instance rates: (GPUs at ``rate``,
    or a huge number when the cluster cannot hold enough copies; per-GPU rate; unit),
    best first."""
    out = []
    for inter_op in range(1, ev.cluster.nodes + 1):
        for unit in _units(ev, inter_op, feasible):
            unit_rate = min(
                unit.n_prefill * prefill[unit.prefill_layout],
                unit.n_decode * decode[unit.decode_layout],
            )
            if unit_rate > 0:
                out.append((_unit_gpus(ev, unit, unit_rate, rate), unit_rate / unit.num_gpus, unit))
    out.sort(key=lambda e: (e[0], -e[1], e[2].num_gpus))
    return out


def _unit_gpus(ev: Evaluator, unit: Unit, unit_rate: float, rate: float) -> int:
    """GPUs that copies of ``unit`` serving ``rate`` take (1 << 30: more than fit)."""
    need = math.ceil(rate / unit_rate)
    room = units_capacity(unit, ev.cluster.nodes, ev.cluster.gpus_per_node)
    return need * unit.num_gpus if need <= room else 1 << 30


def plan_low(
    ev: Evaluator, inputs: PlanInputs, progress: Progress
) -> tuple[list[InstancePlan], float]:
    """Low node affinity: the best unit whose KV stays in its nodes, replicated."""
    feasible = set(candidate_layouts(ev, inputs.max_pp))
    require(bool(feasible), "model", "no (tp, pp) layout fits its weights in this cluster")
    prefill, decode = _phase_rates(ev, sorted(feasible), "intra", progress)
    estimates = _estimate_units(ev, feasible, prefill, decode, inputs.rate)
    if not estimates:
        raise _no_layout("ttft" if not any(prefill.values()) else "tpot")
    best: tuple[int, float, float, Unit] | None = None  # (GPUs, -per GPU, rate, unit)
    finalists = estimates[:LOW_AFFINITY_FINALISTS]
    for k, (_, per_gpu, unit) in enumerate(finalists, start=1):
        progress(f"simulating unit {k}/{len(finalists)}")
        sims = _sim_instances(ev, place_units(unit, 1, unit.inter_op, ev.cluster.gpus_per_node))
        unit_rate = ev.group_rate(("unit", unit), sims, per_gpu * unit.num_gpus)
        if unit_rate > 0:
            option = (_unit_gpus(ev, unit, unit_rate, inputs.rate), -unit_rate / unit.num_gpus)
            if best is None or option < best[:2]:
                best = (*option, unit_rate, unit)
    if best is None:
        raise _no_layout("ttft")
    _, _, unit_rate, unit = best
    count = math.ceil(inputs.rate / unit_rate)
    room = units_capacity(unit, ev.cluster.nodes, ev.cluster.gpus_per_node)
    require(
        count <= room,
        "rate",
        f"{inputs.rate:g} req/s needs {count} units of {unit.num_gpus} GPUs, the cluster "
        f"holds {room} (it serves about {unit_rate * room:.3g} req/s)",
    )
    progress("checking the plan at the offered rate")
    instances = place_units(unit, count, ev.cluster.nodes, ev.cluster.gpus_per_node)
    for _ in range(MAX_TOP_UPS):
        if check_plan(ev, instances, inputs.rate)[0] >= ev.slos.attainment or count == room:
            break
        count += 1
        instances = place_units(unit, count, ev.cluster.nodes, ev.cluster.gpus_per_node)
    return instances, unit_rate / unit.num_gpus


def colocated_baseline(ev: Evaluator, inputs: PlanInputs, progress: Progress) -> ColocatedBaseline:
    """The best colocated layout, replicated to the offered rate as far as GPUs allow."""
    layouts = candidate_layouts(ev, inputs.max_pp)
    require(bool(layouts), "model", "no (tp, pp) layout fits its weights in this cluster")
    rates = {}
    for k, lay in enumerate(layouts, start=1):
        progress(f"colocated baseline: tp={lay[0]} pp={lay[1]} ({k}/{len(layouts)})")
        rates[lay] = ev.colocated_rate(lay)
    best = _cheapest(rates, inputs.rate, ev.cluster.total_gpus)
    room = ev.cluster.total_gpus // _gpus(best)
    count = room if rates[best] == 0 else min(room, math.ceil(inputs.rate / rates[best]))
    alloc = Allocator(ev.cluster.nodes, ev.cluster.gpus_per_node)
    instances = [alloc.place("colocated", *best) for _ in range(count)]
    both = check_plan(ev, [i for i in instances if i is not None], inputs.rate)[0]
    return ColocatedBaseline(best[0], best[1], count, rates[best] / _gpus(best), both)


def _run_algorithms(
    ev: Evaluator, inputs: PlanInputs, affinity: str, say: Progress
) -> tuple[str, list[InstancePlan], float, float]:
    """Run the asked algorithm(s); keep, in this order, the one that meets the attainment
    target, uses fewer GPUs, has the higher per-GPU goodput (high on a tie: its instances
    pack anywhere). Returns (algorithm, instances, per-GPU goodput, attainment)."""
    results: dict[str, tuple[list[InstancePlan], float]] = {}
    errors: dict[str, ValueError] = {}
    for algo in ("high", "low") if affinity == "auto" else (affinity,):
        try:
            results[algo] = (plan_high if algo == "high" else plan_low)(ev, inputs, say)
        except ValueError as exc:
            errors[algo] = exc
    if not results:
        raise next(iter(errors.values()))
    attained = {a: check_plan(ev, r[0], inputs.rate)[0] for a, r in results.items()}  # cached

    def rank(a: str) -> tuple[bool, int, float, bool]:
        gpus = sum(i.num_gpus for i in results[a][0])
        return (attained[a] >= inputs.slos.attainment, -gpus, results[a][1], a == "high")

    best = max(results, key=rank)
    return best, results[best][0], results[best][1], attained[best]


class Asked(TypedDict):
    """What a plan records of the question it answers (the fields of :class:`Plan` that
    both planners take from their inputs as given)."""

    model: str
    slos: SLOs
    workload: str
    rate: float
    burstiness: float
    seed: int
    profile_source: str


def asked(inputs: PlanInputs | CpuPlanInputs) -> Asked:
    return Asked(
        model=inputs.model.name,
        slos=inputs.slos,
        workload=inputs.workload.spec,
        rate=inputs.rate,
        burstiness=inputs.burstiness,
        seed=inputs.seed,
        profile_source=inputs.profile_source,
    )


def plan(
    inputs: PlanInputs,
    affinity: str = "auto",
    progress: Progress | None = None,
    evaluator: Evaluator | None = None,
) -> Plan:
    """The plan for ``inputs``; ``auto`` runs both algorithms and keeps the better plan."""
    require(
        affinity in AFFINITIES,
        "affinity",
        f"must be one of {', '.join(AFFINITIES)}, got {affinity!r}",
    )
    say = progress or (lambda message: None)
    ev = evaluator or Evaluator(
        inputs.model,
        inputs.cluster,
        inputs.profiles,
        inputs.workload,
        inputs.slos,
        inputs.burstiness,
        inputs.seed,
        inputs.budget,
    )
    algo, instances, per_gpu, attainment = _run_algorithms(ev, inputs, affinity, say)
    ttft, tpot = plan_latency(ev, instances, inputs.rate)  # the same (cached) simulation
    baseline = colocated_baseline(ev, inputs, say)
    say(f"done: {ev.simulations} simulations")
    return Plan(
        algorithm=algo,
        cluster=inputs.cluster,
        **asked(inputs),
        instances=tuple(instances),
        per_gpu_goodput=per_gpu,
        attainment=attainment,
        colocated=baseline,
        ttft=ttft,
        tpot=tpot,
    )
