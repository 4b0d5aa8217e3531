"""The planner's output: which instances to run, with which layout, on which GPUs.

A plan file is what ``baton serve --plan`` will launch. Each instance names its role, its
TP x PP layout and, stage by stage, the node and the GPU indices on it (a stage's TP group
never leaves a node). Beside it sit the predictions: per-GPU goodput (DistServe's metric:
the request rate each GPU sustains within the SLOs, with the phases in their ideal ratio)
and the attainment simulated at the offered rate, for the plan and for the best colocated
deployment of the same GPUs, and the plan's simulated TTFT and TPOT percentiles (p50, p90,
p99, nearest rank over the same simulation's counted requests; absent from files written
before they were recorded, and null for a request never served). The JSON carries
``schema`` and ``version`` so that a later reader can refuse a file it does not understand
instead of misreading it.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from typing import Any

from cluster.planner._validate import from_fields, positive_int, require
from cluster.planner.cluster_spec import ClusterSpec, SLOs

PLAN_SCHEMA = "baton.plan"
PLAN_SCHEMA_VERSION = 1
PLAN_ROLES = ("prefill", "decode", "colocated")
ALGORITHMS = ("high", "low", "cpu")  # cpu: one CPU host (cluster.planner.cpu_search)


@dataclass(frozen=True)
class Stage:
    """One pipeline stage: ``tp`` GPUs of one node."""

    node: int
    gpus: tuple[int, ...]

    def __post_init__(self) -> None:
        require(self.node >= 0, "stage.node", f"must be >= 0, got {self.node}")
        object.__setattr__(self, "gpus", tuple(self.gpus))
        require(
            bool(self.gpus) and all(g >= 0 for g in self.gpus),
            "stage.gpus",
            f"must be a non-empty list of GPU indices, got {list(self.gpus)}",
        )


@dataclass(frozen=True)
class InstancePlan:
    role: str
    tp: int
    pp: int
    stages: tuple[Stage, ...]
    # CPU plans: torch threads per rank and the engine's step token budget
    # (max_num_batched_tokens); None: `baton serve`'s defaults.
    threads: int | None = None
    token_budget: int | None = None

    def __post_init__(self) -> None:
        require(
            self.role in PLAN_ROLES,
            "instance.role",
            f"must be one of {', '.join(PLAN_ROLES)}, got {self.role!r}",
        )
        positive_int(self.tp, "instance.tp")
        positive_int(self.pp, "instance.pp")
        object.__setattr__(self, "stages", tuple(self.stages))
        for name in ("threads", "token_budget"):
            if getattr(self, name) is not None:
                positive_int(getattr(self, name), f"instance.{name}")
        require(
            len(self.stages) == self.pp,
            "instance.stages",
            f"must hold pp={self.pp} stages, got {len(self.stages)}",
        )
        for stage in self.stages:
            require(
                len(stage.gpus) == self.tp,
                "instance.stages",
                f"each stage must hold tp={self.tp} GPUs, got {list(stage.gpus)}",
            )

    @property
    def nodes(self) -> tuple[int, ...]:
        return tuple(sorted({s.node for s in self.stages}))

    @property
    def num_gpus(self) -> int:
        return self.tp * self.pp

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "role": self.role,
            "tp": self.tp,
            "pp": self.pp,
            "stages": [{"node": s.node, "gpus": list(s.gpus)} for s in self.stages],
        }
        for name in ("threads", "token_budget"):
            if getattr(self, name) is not None:
                out[name] = getattr(self, name)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> InstancePlan:
        stages = tuple(
            Stage(int(s["node"]), tuple(int(g) for g in s["gpus"])) for s in data["stages"]
        )
        extra = {k: int(data[k]) for k in ("threads", "token_budget") if data.get(k) is not None}
        return cls(str(data["role"]), int(data["tp"]), int(data["pp"]), stages, **extra)


@dataclass(frozen=True)
class ColocatedBaseline:
    """The best colocated (chunked-prefill) deployment, scored in the same simulator."""

    tp: int
    pp: int
    instances: int
    per_gpu_goodput: float  # req/s per GPU within the SLOs
    attainment: float  # simulated at the offered rate with ``instances`` instances

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class LatencyPercentiles:
    """Simulated latency percentiles in seconds (inf: some request was never served)."""

    p50: float
    p90: float
    p99: float

    def to_dict(self) -> dict[str, float | None]:
        # JSON has no infinity; null reads back as inf.
        return {k: (v if math.isfinite(v) else None) for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, data: Any, name: str) -> LatencyPercentiles:
        require(isinstance(data, dict), name, "must be a JSON object")
        require(set(data) == {"p50", "p90", "p99"}, name, "must hold p50, p90 and p99")
        values = {k: math.inf if v is None else float(v) for k, v in data.items()}
        require(all(v >= 0 for v in values.values()), name, "percentiles must be >= 0")
        return cls(**values)


@dataclass(frozen=True)
class Plan:
    algorithm: str  # "high" or "low" node affinity
    model: str
    cluster: ClusterSpec
    slos: SLOs
    workload: str
    rate: float  # offered requests/s
    burstiness: float  # cv of inter-arrival gaps (1: Poisson)
    seed: int
    profile_source: str
    instances: tuple[InstancePlan, ...]
    per_gpu_goodput: float  # req/s per GPU within the SLOs
    attainment: float  # simulated at ``rate`` with these instances
    colocated: ColocatedBaseline
    ttft: LatencyPercentiles | None = None  # simulated at ``rate``; None in older files
    tpot: LatencyPercentiles | None = None
    # CPU plans: every deployment scored, best first (cluster.planner.cpu_search.Score)
    candidates: tuple[dict[str, Any], ...] = ()
    # CPU plans: the dtype of the profile they were made from, which `baton serve --plan`
    # serves at unless --dtype says otherwise ("": not recorded; the serve default)
    dtype: str = ""

    def __post_init__(self) -> None:
        require(
            self.algorithm in ALGORITHMS,
            "algorithm",
            f"must be one of {', '.join(ALGORITHMS)}, got {self.algorithm!r}",
        )
        object.__setattr__(self, "instances", tuple(self.instances))
        object.__setattr__(self, "candidates", tuple(self.candidates))
        used = [(s.node, g) for inst in self.instances for s in inst.stages for g in s.gpus]
        # A CPU plan's "GPUs" are cores, which its instances may share (oversubscription).
        shared_ok = self.algorithm == "cpu"
        require(shared_ok or len(used) == len(set(used)), "instances", "two instances share a GPU")
        for node, gpu in used:
            require(
                node < self.cluster.nodes and gpu < self.cluster.gpus_per_node,
                "instances",
                f"GPU {gpu} of node {node} is outside the cluster",
            )

    @property
    def num_gpus(self) -> int:
        return sum(i.num_gpus for i in self.instances)

    def count(self, role: str) -> int:
        return sum(1 for i in self.instances if i.role == role)

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": PLAN_SCHEMA,
            "version": PLAN_SCHEMA_VERSION,
            "algorithm": self.algorithm,
            "model": self.model,
            "cluster": self.cluster.to_dict(),
            "slos": self.slos.to_dict(),
            "workload": self.workload,
            "rate": self.rate,
            "burstiness": self.burstiness,
            "seed": self.seed,
            "profile_source": self.profile_source,
            "instances": [i.to_dict() for i in self.instances],
            "predicted": self._predicted(),
            "colocated": self.colocated.to_dict(),
            **({"candidates": list(self.candidates)} if self.candidates else {}),
            **({"dtype": self.dtype} if self.dtype else {}),
        }

    def _predicted(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "per_gpu_goodput": self.per_gpu_goodput,
            "attainment": self.attainment,
        }
        if self.ttft is not None:
            out["ttft_s"] = self.ttft.to_dict()
        if self.tpot is not None:
            out["tpot_s"] = self.tpot.to_dict()
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_json(cls, text: str) -> Plan:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"plan: not valid JSON ({exc.msg})") from None
        require(
            isinstance(data, dict) and data.get("schema") == PLAN_SCHEMA,
            "schema",
            f"must be {PLAN_SCHEMA!r}",
        )
        require(
            data.get("version") == PLAN_SCHEMA_VERSION,
            "version",
            f"must be {PLAN_SCHEMA_VERSION}, got {data.get('version')!r}",
        )
        try:
            predicted = data["predicted"]
            latency = {
                key: LatencyPercentiles.from_dict(predicted[key], f"predicted.{key}")
                if predicted.get(key) is not None
                else None
                for key in ("ttft_s", "tpot_s")
            }
            return cls(
                algorithm=data["algorithm"],
                model=data["model"],
                cluster=ClusterSpec.from_dict(data["cluster"]),
                slos=SLOs.from_dict(data["slos"]),
                workload=data["workload"],
                rate=float(data["rate"]),
                burstiness=float(data["burstiness"]),
                seed=int(data["seed"]),
                profile_source=data["profile_source"],
                instances=tuple(InstancePlan.from_dict(i) for i in data["instances"]),
                per_gpu_goodput=float(data["predicted"]["per_gpu_goodput"]),
                attainment=float(data["predicted"]["attainment"]),
                colocated=from_fields(ColocatedBaseline, data["colocated"], "colocated"),
                ttft=latency["ttft_s"],
                tpot=latency["tpot_s"],
                candidates=tuple(data.get("candidates", ())),
                dtype=str(data.get("dtype", "")),
            )
        except KeyError as exc:
            raise ValueError(f"{exc.args[0]}: missing from the plan") from None
        except (TypeError, AttributeError) as exc:  # a list where an object belongs, ...
            raise ValueError(f"plan: malformed ({exc})") from None
