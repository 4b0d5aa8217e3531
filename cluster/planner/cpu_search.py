"""The planner on one CPU host: which deployment, how many threads per instance, which
prefill step budget, scored by the simulator from a ``baton.cpu_profiles`` file.

The candidates (``candidates``): disaggregated, ``p`` prefill + ``d`` decode instances,
and colocated, ``n`` instances, up to ``MAX_INSTANCES`` in all and no more instances than
cores (or two); every instance of a role runs the same number of torch threads, any of the
measured counts up to the cores, and the cores themselves (so prefill and decode may each
get every core: the host is oversubscribed and the model shares it, see
``cluster.planner.cpu_host``). Token budgets (the engine's ``max_num_batched_tokens``):

- a prefill instance: the smallest of ``BUDGETS`` whose prefill throughput (mean-length
  prompts, at its threads, by the profile) is within ``SATURATION`` of the best of them: a
  larger budget buys no throughput and makes every prompt in a step wait for the step;
- a colocated instance: each of ``CHUNKS`` longer than the mean prompt, so that a prompt
  and the running decodes share one step (``colocated_chunks``), is simulated (a step's
  decodes share it with prompt chunks, so the chunk trades TTFT against TPOT) and scored
  like a deployment;
- a decode instance keeps the engine's default (it does not prefill).

Every candidate is simulated on the workload: its attainment at the offered rate (both
SLOs, per request) and, by bisection, the highest rate at which it meets the attainment
target. The plan is the candidate that meets the target at the offered rate with the
highest such rate, rates within the bisection's tolerance (3%) counting as a tie that the
higher attainment at the offered rate breaks, then the more room under the SLOs there
(p90 TTFT and TPOT over their targets); when none meets it, the one with the highest
attainment at the offered rate. Further ties: fewer threads, fewer instances, the name.
The plan file lists every candidate's scores, best first, so the choice can be checked.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from cluster.planner._validate import positive, positive_int, require
from cluster.planner.cluster_spec import CUSTOM_GPU, ClusterSpec, SLOs
from cluster.planner.cpu_host import DEFAULT_BACKGROUND, CpuProfiles, SharedHost
from cluster.planner.goodput import RATE_TOLERANCE, Evaluator, SimBudget
from cluster.planner.latency import ProfileSet
from cluster.planner.model_spec import ModelSpec
from cluster.planner.plan import ColocatedBaseline, InstancePlan, LatencyPercentiles, Plan, Stage
from cluster.planner.search import asked
from cluster.planner.simulator import SimConfig, SimInstance
from cluster.planner.workload import Workload

Progress = Callable[[str], None]
MAX_INSTANCES = 4
BUDGETS = (256, 512, 1024, 2048, 4096)
CHUNKS = (128, 256, 512, 1024, 2048)
SATURATION = 0.95
DEFAULT_BUDGET = 2048  # the engine's max_num_batched_tokens default (cluster.Cluster)
CPU_MEMORY_GB = 16.0  # KV room per instance when not given
HOST_LINK_GBPS = 5.0  # KV between two processes of one host (loopback sockets)


@dataclass(frozen=True)
class CpuDeployment:
    mode: str  # "disaggregated" or "colocated"
    prefill: int  # colocated: 0
    decode: int  # colocated: the instances
    prefill_threads: int  # colocated: 0
    decode_threads: int  # colocated: each instance's
    budget: int  # prefill instances' token budget; colocated: the chunk (step budget)

    @property
    def name(self) -> str:
        if self.mode == "colocated":
            return f"colocated{self.decode}-t{self.decode_threads}-c{self.budget}"
        return (
            f"{self.prefill}p{self.decode}d-t{self.prefill_threads}/{self.decode_threads}"
            f"-b{self.budget}"
        )

    @property
    def instances(self) -> int:
        return self.prefill + self.decode

    @property
    def threads(self) -> int:
        return self.prefill * self.prefill_threads + self.decode * self.decode_threads


@dataclass(frozen=True)
class Score:
    deployment: CpuDeployment
    attainment: float  # at the offered rate, both SLOs
    max_rate: float  # req/s within the attainment target
    ttft: LatencyPercentiles | None
    tpot: LatencyPercentiles | None

    def to_dict(self) -> dict[str, object]:
        d = self.deployment
        return {
            "name": d.name,
            "mode": d.mode,
            "prefill": d.prefill,
            "decode": d.decode,
            "prefill_threads": d.prefill_threads,
            "decode_threads": d.decode_threads,
            "token_budget": d.budget,
            "attainment": self.attainment,
            "max_rate": self.max_rate,
        }


@dataclass(frozen=True)
class CpuPlanInputs:
    model: ModelSpec
    profiles: CpuProfiles
    workload: Workload
    slos: SLOs
    rate: float
    burstiness: float = 1.0
    seed: int = 0
    cores: int = 0  # 0: the profile's
    # Cores the host's other work (router, Ray, a client) keeps busy (cpu_host's text).
    background: float = DEFAULT_BACKGROUND
    memory_gb: float = CPU_MEMORY_GB
    profile_source: str = "cpu"
    budget: SimBudget = SimBudget()

    def __post_init__(self) -> None:
        positive(self.rate, "rate")
        positive(self.burstiness, "burstiness")
        positive(self.memory_gb, "memory_gb")
        require(self.background >= 0, "host-load", f"must be >= 0 cores, got {self.background}")
        if self.cores:
            positive_int(self.cores, "cores")

    @property
    def host_cores(self) -> int:
        return self.cores or self.profiles.cores


def thread_choices(profiles: CpuProfiles, cores: int) -> list[int]:
    return sorted({t for t in profiles.thread_counts if t <= cores} | {cores})


def prefill_budget(profiles: CpuProfiles, threads: int, prompt: float) -> int:
    """The smallest of ``BUDGETS`` within ``SATURATION`` of the best prefill throughput
    (tokens/s of steps full of ``prompt``-token prompts, or one chunk of a longer one)."""

    def tokens_per_ms(budget: int) -> float:
        sum_sq = budget * prompt if budget >= prompt else budget * budget
        return budget / profiles.step_ms("prefill_ms", threads, budget, sum_sq)

    speeds = {b: tokens_per_ms(b) for b in BUDGETS}
    best = max(speeds.values())
    return min(b for b, s in speeds.items() if s >= SATURATION * best)


def colocated_chunks(prompt: float) -> list[int]:
    """The colocated chunks to try for mean prompts of ``prompt`` tokens: those of
    ``CHUNKS`` longer than the prompt, or the longest. A smaller chunk splits most prompts
    over several steps, each piece paying a step's fixed cost and running its GEMMs at
    fewer rows, and the profile (whole prompts) prices those steps low. Measured offline
    with ``baton bench chunk-replay`` (one bf16 engine of two threads, 256-token prompts,
    64 out; the README has the runs): chunk 128 was the busiest in every run, 2-10% over
    chunk 2048 for the same requests; within TTFT 1.5 s and TPOT 150 ms it held 23% at 3
    req/s on one arrival sequence (2048: 95%) and 88% at 3.3 on another (2048: 99%), where
    the simulator ranked chunk 128 first each time."""
    longer = [c for c in CHUNKS if c > prompt]
    return longer or [CHUNKS[-1]]


def candidates(profiles: CpuProfiles, cores: int, prompt: float) -> list[CpuDeployment]:
    threads = thread_choices(profiles, cores)
    most = min(MAX_INSTANCES, max(2, cores))
    out = []
    for p in range(1, most):
        for d in range(1, most - p + 1):
            for tp in threads:
                for td in threads:
                    budget = prefill_budget(profiles, tp, prompt)
                    out.append(CpuDeployment("disaggregated", p, d, tp, td, budget))
    for n in range(1, min(MAX_INSTANCES, max(1, cores)) + 1):
        for t in threads:
            out.extend(CpuDeployment("colocated", 0, n, 0, t, c) for c in colocated_chunks(prompt))
    return out


class CpuPlanner:
    """Scores CPU deployments in the simulator (one ``Evaluator`` per token budget)."""

    def __init__(self, inputs: CpuPlanInputs) -> None:
        self.inputs = inputs
        self.cores = inputs.host_cores
        top = inputs.profiles.by_threads[inputs.profiles.thread_counts[-1]]
        self.profile_set = ProfileSet({(1, 1): top}, model=inputs.model.name)
        self.cluster = ClusterSpec(
            nodes=1,
            gpus_per_node=self.cores,
            gpu=CUSTOM_GPU,
            memory_gb=inputs.memory_gb,
            intra_node_gbps=HOST_LINK_GBPS,
            inter_node_gbps=HOST_LINK_GBPS,
        )
        self._evaluators: dict[int, Evaluator] = {}
        need = inputs.workload.mean_in + inputs.workload.mean_out
        require(
            self.evaluator(DEFAULT_BUDGET).kv_capacity((1, 1)) >= need,
            "gpu-memory-gb",
            f"{inputs.memory_gb:g} GB per instance holds no {need:g}-token request of "
            f"{inputs.model.name} beside its weights",
        )

    def evaluator(self, budget: int) -> Evaluator:
        if budget not in self._evaluators:
            i = self.inputs
            base = SimConfig(
                prefill_token_budget=budget,
                chunk_tokens=budget,
                kv_bytes_per_token=i.model.kv_bytes_per_token,
                intra_node_gbps=HOST_LINK_GBPS,
                inter_node_gbps=HOST_LINK_GBPS,
            )
            self._evaluators[budget] = Evaluator(
                i.model, self.cluster, self.profile_set, i.workload, i.slos,
                i.burstiness, i.seed, i.budget, base,
            )  # fmt: skip
        return self._evaluators[budget]

    def sim_instances(self, dep: CpuDeployment) -> list[SimInstance]:
        host = SharedHost(self.inputs.profiles, self.cores, self.inputs.background)
        ev = self.evaluator(dep.budget)
        kv = ev.kv_capacity((1, 1))
        out = [
            SimInstance("prefill", host.instance(dep.prefill_threads)) for _ in range(dep.prefill)
        ]
        role = "colocated" if dep.mode == "colocated" else "decode"
        out += [SimInstance(role, host.instance(dep.decode_threads), kv) for _ in range(dep.decode)]
        return out

    def rate_bound(self) -> float:
        """Requests/s no deployment exceeds: mean prompts prefilled on every core."""
        prompt = self.inputs.workload.mean_in
        p = self.inputs.profiles
        best = max(self.cores / p.step_ms("prefill_ms", 1, prompt, prompt * prompt),
                   1 / p.step_ms("prefill_ms", self.cores, prompt, prompt * prompt))  # fmt: skip
        return 1000.0 * best

    def score(self, dep: CpuDeployment) -> Score:
        ev = self.evaluator(dep.budget)
        key = ("cpu", dep)
        sims = self.sim_instances(dep)
        result, _ = ev.simulate(key, sims, self.inputs.rate, plan_check=True)
        max_rate = ev.group_rate(key, sims, self.rate_bound())
        ttft, tpot = result.percentiles("ttft"), result.percentiles("tpot")
        return Score(
            dep,
            result.attainment(self.inputs.slos),
            max_rate,
            None if ttft is None else LatencyPercentiles(*ttft),
            None if tpot is None else LatencyPercentiles(*tpot),
        )

    def slack(self, s: Score) -> float:
        """p90 TTFT and TPOT at the offered rate, each over its SLO, summed (lower: more
        room under the SLOs)."""
        slo = self.inputs.slos
        ttft = s.ttft.p90 / slo.ttft_s if s.ttft is not None else 0.0
        tpot = s.tpot.p90 / slo.tpot_s if s.tpot is not None else 0.0
        return ttft + tpot

    def rank(self, scores: list[Score]) -> list[Score]:
        """Best first, as the module text says: among the candidates that meet the target
        at the offered rate, those whose highest rate is within the bisection's tolerance
        of the best are tied on it, and the tie goes to the higher attainment, then the
        lower ``slack``, fewer threads, fewer instances, the name; the rest follow by
        (meets, highest rate or attainment)."""
        target = self.inputs.slos.attainment

        def tiebreak(s: Score) -> tuple[float, float, int, int, str]:
            d = s.deployment
            return (-s.attainment, self.slack(s), d.threads, d.instances, d.name)

        meeting = [s for s in scores if s.attainment >= target]
        if meeting:
            top = max(s.max_rate for s in meeting)
            tied = sorted((s for s in meeting if s.max_rate * RATE_TOLERANCE >= top), key=tiebreak)
        else:
            tied = sorted(scores, key=tiebreak)[:1]
        rest = [s for s in scores if s not in tied]
        rest.sort(key=lambda s: (s.attainment >= target, s.max_rate if s.attainment >= target
                                 else s.attainment), reverse=True)  # fmt: skip
        return tied + rest


def _instance_plans(dep: CpuDeployment) -> list[InstancePlan]:
    def one(role: str, threads: int, budget: int | None) -> InstancePlan:
        host = (Stage(0, (0,)),)  # one host; its threads, not a GPU index, say its cores
        return InstancePlan(role, 1, 1, host, threads=threads, token_budget=budget)

    if dep.mode == "colocated":
        return [one("colocated", dep.decode_threads, dep.budget) for _ in range(dep.decode)]
    return [one("prefill", dep.prefill_threads, dep.budget) for _ in range(dep.prefill)] + [
        one("decode", dep.decode_threads, None) for _ in range(dep.decode)
    ]


def plan_cpu(inputs: CpuPlanInputs, progress: Progress | None = None) -> tuple[Plan, list[Score]]:
    """The best deployment of this host for the workload, and every candidate's score
    (best first)."""
    say = progress or (lambda message: None)
    planner = CpuPlanner(inputs)
    cands = candidates(inputs.profiles, planner.cores, inputs.workload.mean_in)
    require(bool(cands), "profile", "no deployment to try")
    scores = []
    for k, dep in enumerate(cands, start=1):
        say(f"{dep.name} ({k}/{len(cands)})")
        scores.append(planner.score(dep))
    scores = planner.rank(scores)
    best = scores[0]
    colocated = next(s for s in scores if s.deployment.mode == "colocated")
    per_core = planner.cores
    plan = Plan(
        algorithm="cpu",
        cluster=planner.cluster,
        **asked(inputs),
        instances=tuple(_instance_plans(best.deployment)),
        per_gpu_goodput=best.max_rate / per_core,
        attainment=best.attainment,
        colocated=ColocatedBaseline(
            1, 1, colocated.deployment.decode, colocated.max_rate / per_core, colocated.attainment
        ),
        ttft=best.ttft,
        tpot=best.tpot,
        candidates=tuple(s.to_dict() for s in scores),
        dtype=inputs.profiles.dtype,
    )
    say(f"done: {sum(e.simulations for e in planner._evaluators.values())} simulations")
    return plan, scores
