"""A discrete-event simulator of prefill batching, KV transfer and decode batching.

It runs one arrival sequence through a set of instances (see
:mod:`cluster.planner.instances` for a request's life inside them) and gives every request
its TTFT and TPOT. Three shapes, by which roles are present:

- prefill instances only: TTFT alone is scored (DistServe's ``simu_prefill``);
- decode instances only: requests reach decode at their arrival time, TPOT alone is scored
  (``simu_decode``), their KV arriving over ``config.decode_only_link``;
- prefill and decode, or colocated instances: both are scored.

Dispatch is the router's: a new request goes to the prefill instance with the fewest
queued prompt tokens, a prefilled one to the decode instance with the fewest active
requests among those with room (free KV above ``DECODE_RESERVE_FRACTION`` of it), else to
the one with the most free KV tokens.
KV moves at NVLink speed over all the smaller side's GPUs when both instances sit on the
same node(s), else over the node network. Only requests in the middle of the arrival
sequence count (``warmup_fraction``, ``cooldown_fraction``): the first ones find an empty
system, the last ones a draining one. Everything is deterministic given its inputs.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from cluster.dispatch import decode_preference
from cluster.planner._validate import positive, positive_int, require
from cluster.planner.cluster_spec import SLOs
from cluster.planner.instances import (
    INF,
    EventQueue,
    LaneInstance,
    PrefillInstance,
    SimRequest,
    StepTimes,
)
from cluster.planner.workload import Lengths

ROLES = ("prefill", "decode", "colocated")
LINKS = ("intra", "inter")


@dataclass(frozen=True)
class SimInstance:
    """One instance to simulate: its role, latency profile, KV room and nodes."""

    role: str
    profile: StepTimes
    kv_capacity_tokens: int = 0  # decode / colocated: KV tokens after weights
    nodes: tuple[int, ...] = (0,)  # the nodes its stages sit on

    def __post_init__(self) -> None:
        require(self.role in ROLES, "role", f"must be one of {', '.join(ROLES)}, got {self.role!r}")
        if self.role != "prefill":
            positive_int(self.kv_capacity_tokens, "kv_capacity_tokens")

    @property
    def gpus(self) -> int:
        return self.profile.tp * self.profile.pp


@dataclass(frozen=True)
class SimConfig:
    """Knobs of the simulated engine and network."""

    prefill_token_budget: int = 2048  # prompt tokens per prefill batch
    prefill_chunking: bool = True  # cut a prompt to fill the budget (the engine's way)
    chunk_tokens: int = 512  # colocated: tokens per step, decodes included
    decode_step_overhead_ms: float = 0.0  # decode/colocated: host time per step, measured
    kv_bytes_per_token: int = 0  # 0: KV moves instantly
    intra_node_gbps: float = 300.0  # per GPU, NVLink
    inter_node_gbps: float = 25.0  # per node
    decode_only_link: str = "inter"  # the link KV arrives over when prefill is not simulated
    warmup_fraction: float = 0.1
    cooldown_fraction: float = 0.1

    def __post_init__(self) -> None:
        positive_int(self.prefill_token_budget, "prefill_token_budget")
        positive_int(self.chunk_tokens, "chunk_tokens")
        require(self.decode_step_overhead_ms >= 0, "decode_step_overhead_ms", "must be >= 0")
        require(self.kv_bytes_per_token >= 0, "kv_bytes_per_token", "must be >= 0")
        positive(self.intra_node_gbps, "intra_node_gbps")
        positive(self.inter_node_gbps, "inter_node_gbps")
        require(
            self.decode_only_link in LINKS,
            "decode_only_link",
            f"must be one of {', '.join(LINKS)}, got {self.decode_only_link!r}",
        )
        for name in ("warmup_fraction", "cooldown_fraction"):
            value = getattr(self, name)
            require(0 <= value < 0.5, name, f"must be in [0, 0.5), got {value!r}")


@dataclass(frozen=True)
class SimResult:
    """Per-request latencies in arrival order (inf: never served), and what is scored."""

    ttft_s: tuple[float, ...]
    tpot_s: tuple[float, ...]
    scores_ttft: bool
    scores_tpot: bool
    window: tuple[int, int]  # [lo, hi) request indices that count

    def attainment(self, slos: SLOs, ttft: bool = True, tpot: bool = True) -> float:
        """Share of the counted requests meeting every scored SLO (``ttft``/``tpot``
        False: leave that one out, to see which phase misses)."""
        lo, hi = self.window
        check_ttft, check_tpot = ttft and self.scores_ttft, tpot and self.scores_tpot
        ok = 0
        for i in range(lo, hi):
            if check_ttft and not self.ttft_s[i] <= slos.ttft_s:
                continue
            if check_tpot and not self.tpot_s[i] <= slos.tpot_s:
                continue
            ok += 1
        return ok / max(1, hi - lo)

    def mean_ttft_s(self) -> float:
        lo, hi = self.window
        return statistics.fmean(self.ttft_s[lo:hi])

    def mean_tpot_s(self) -> float:
        lo, hi = self.window
        return statistics.fmean(self.tpot_s[lo:hi])

    def percentiles(
        self, metric: str, qs: Sequence[float] = (50, 90, 99)
    ) -> tuple[float, ...] | None:
        """Nearest-rank percentiles (q in 0..100) of the counted requests' ``"ttft"`` or
        ``"tpot"`` (inf: never served); None when that metric is not scored. Nearest rank,
        as the router's live windows compute them, so p90 <= the SLO exactly when at
        least 90% of the counted requests meet it."""
        require(metric in ("ttft", "tpot"), "metric", f"must be ttft or tpot, got {metric!r}")
        if not (self.scores_ttft if metric == "ttft" else self.scores_tpot):
            return None
        lo, hi = self.window
        ordered = sorted((self.ttft_s if metric == "ttft" else self.tpot_s)[lo:hi])
        return tuple(ordered[max(1, math.ceil(q / 100 * len(ordered))) - 1] for q in qs)


def make_requests(
    lengths: Sequence[Lengths], gaps: Sequence[float], rate: float
) -> list[SimRequest]:
    """Requests whose arrivals are the rate-1 ``gaps`` scaled to ``rate`` per second."""
    positive(rate, "rate")
    require(len(gaps) >= len(lengths), "gaps", "need one gap per request")
    out, t = [], 0.0
    for i, (prompt, output) in enumerate(lengths):
        t += gaps[i] / rate
        out.append(SimRequest(i, t, prompt, output))
    return out


class _Run:
    """The wiring of one simulation: instances, dispatch, and completion bookkeeping."""

    def __init__(self, instances: Sequence[SimInstance], config: SimConfig) -> None:
        self.config = config
        self.events = EventQueue()
        self.specs = list(instances)
        for spec in self.specs:  # a model whose step times depend on the moment reads it here
            bind = getattr(spec.profile, "bind", None)
            if bind is not None:
                bind(self.events)
        self.prefill = [
            PrefillInstance(
                self.events,
                s.profile,
                config.prefill_token_budget,
                self._prefilled,
                config.prefill_chunking,
            )
            for s in self.specs
            if s.role == "prefill"
        ]
        self.prefill_specs = [s for s in self.specs if s.role == "prefill"]
        self.decode_specs = [s for s in self.specs if s.role != "prefill"]
        self.decode = [self._lane_instance(d, j) for j, d in enumerate(self.decode_specs)]
        self.colocated = any(s.role == "colocated" for s in self.specs)
        self._source: dict[int, int] = {}  # request index -> prefill instance index

    def _lane_instance(self, spec: SimInstance, j: int) -> LaneInstance:
        chunk = self.config.chunk_tokens if spec.role == "colocated" else 0
        transfer = None
        if spec.role == "decode" and self.config.kv_bytes_per_token > 0:
            transfer = self._transfer_fn(j)
        return LaneInstance(
            self.events,
            spec.profile,
            spec.kv_capacity_tokens,
            chunk,
            self._finished,
            transfer,
            self.config.decode_step_overhead_ms,
        )

    def _link_bytes_per_s(self, p: SimInstance | None, d: SimInstance) -> float:
        c = self.config
        intra = c.decode_only_link == "intra" if p is None else set(p.nodes) == set(d.nodes)
        if intra:
            return c.intra_node_gbps * 1e9 * min(d.gpus, p.gpus if p else d.gpus)
        return c.inter_node_gbps * 1e9

    def _transfer_fn(self, j: int) -> Callable[[SimRequest], float]:
        d = self.decode_specs[j]
        per_source = [self._link_bytes_per_s(p, d) for p in self.prefill_specs]
        alone = self._link_bytes_per_s(None, d)
        kv = self.config.kv_bytes_per_token

        def transfer_s(req: SimRequest) -> float:
            src = self._source.get(req.index)
            return req.prompt * kv / (alone if src is None else per_source[src])

        return transfer_s

    def arrivals(self, requests: list[SimRequest]) -> None:
        """Schedule the arrivals one at a time, each the next's: a small heap is a fast one."""
        pending = iter(requests)

        def on_arrival(now: float) -> None:
            req = current[0]
            nxt = next(pending, None)
            if nxt is not None:
                current[0] = nxt
                self.events.at(nxt.arrival_s, on_arrival)
            self._dispatch(req, now)

        current = [next(pending)]
        self.events.at(current[0].arrival_s, on_arrival)

    def _dispatch(self, req: SimRequest, now: float) -> None:
        if self.prefill:
            i = min(
                range(len(self.prefill)),
                key=lambda k: (self.prefill[k].queued_tokens, self.prefill[k].stage_free_s[0]),
            )
            self._source[req.index] = i
            self.prefill[i].submit(req, now)
        else:
            if not self.colocated:
                req.first_token_s = now  # decode only: prefill is not simulated
            self._to_decode(req, now)

    def _prefilled(self, req: SimRequest, now: float) -> None:
        if not self.decode or req.output == 1:
            req.finish_s = now
            return
        self._to_decode(req, now)

    def _to_decode(self, req: SimRequest, now: float) -> None:
        min(self.decode, key=_decode_key).submit(req, now)  # the first on a tie

    @staticmethod
    def _finished(req: SimRequest, now: float) -> None:
        req.finish_s = now


def simulate(
    instances: Sequence[SimInstance],
    lengths: Sequence[Lengths],
    gaps: Sequence[float],
    rate: float,
    config: SimConfig | None = None,
) -> SimResult:
    """Run ``len(lengths)`` requests arriving at ``rate``/s (gaps of a rate-1 process)."""
    config = config or SimConfig()
    require(bool(instances), "instances", "must not be empty")
    require(bool(lengths), "lengths", "must not be empty")
    run = _Run(instances, config)
    colocated = run.colocated
    require(
        not colocated or all(s.role == "colocated" for s in instances),
        "instances",
        "colocated instances cannot be mixed with prefill/decode ones",
    )
    requests = make_requests(lengths, gaps, rate)
    run.arrivals(requests)
    run.events.run()
    ttft = tuple(r.first_token_s - r.arrival_s for r in requests)
    tpot = tuple(_tpot(r) for r in requests)
    n = len(requests)
    lo = math.floor(n * config.warmup_fraction)
    hi = max(lo + 1, n - math.floor(n * config.cooldown_fraction))
    return SimResult(
        ttft_s=ttft,
        tpot_s=tpot,
        scores_ttft=bool(run.prefill) or colocated,
        scores_tpot=bool(run.decode),
        window=(lo, hi),
    )


def _decode_key(inst: LaneInstance) -> tuple[int, float, float]:
    """The router's decode order, on the simulator's exact figures."""
    return decode_preference(inst.free_tokens, inst.kv_capacity, inst.active)


def _tpot(req: SimRequest) -> float:
    if req.finish_s == INF or req.first_token_s == INF:
        return INF
    if req.output == 1:
        return 0.0
    return (req.finish_s - req.first_token_s) / (req.output - 1)
