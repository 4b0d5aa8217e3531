"""Goodput: the highest request rate a set of instances serves within the SLOs.

``Evaluator`` owns everything the search simulates with: the latency profiles, the KV
capacities, one draw of request lengths and one draw of rate-1 arrival gaps (every rate
reuses them, scaled: common random numbers keep attainment monotone in the rate, so the
bisection converges instead of chasing noise), and caches of simulations and of maximum
rates, so the two algorithms and the colocated baseline never simulate the same thing
twice.

A simulation is sized to its load: about three times the number of requests expected in
the system at once (rate x time a request stays, at the SLOs), between ``min_requests``
and ``max_requests``, and only the middle of the arrival sequence counts. Near an
instance's saturation that is not enough: its batch, and with it every step, keeps
growing for thousands of requests (one decode instance of this machine's profile at 7
req/s: mean TPOT 113 ms over 300 requests, 188 over 1500, 164 over 4000), so a simulation
whose later counted requests fare worse than its earlier ones (``settled``) is run again
with twice the requests, up to the maximum.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

from cluster.planner.cluster_spec import ClusterSpec, SLOs
from cluster.planner.latency import LatencyProfile, ProfileSet
from cluster.planner.model_spec import ModelSpec, kv_capacity_tokens
from cluster.planner.simulator import SimConfig, SimInstance, SimResult, simulate
from cluster.planner.workload import Workload, unit_rate_gaps

Layout = tuple[int, int]
RATE_TOLERANCE = 1.03  # bisection stops when hi / lo is below this
SETTLED_GROWTH = 1.1  # a later half's mean latency past this x the earlier's: still filling
MAX_PROBES = 14  # simulations per bisection, at most
ZERO_PROBES = 4  # this many failures in a row from the first guess, dividing by 4: rate 0


@dataclass(frozen=True)
class SimBudget:
    """How many requests one simulation runs (see the module text)."""

    min_requests: int = 300
    max_requests: int = 8000
    plan_max_requests: int = 12000  # whole-plan checks at the offered rate


def settled(result: SimResult) -> bool:
    """Whether a simulation's counted requests fare alike in its earlier and later half:
    the later half's mean TTFT and mean TPOT (each scored one) within ``SETTLED_GROWTH``
    of the earlier half's, and no more of them never served."""
    lo, hi = result.window
    mid = (lo + hi) // 2
    for scored, values in (
        (result.scores_ttft, result.ttft_s),
        (result.scores_tpot, result.tpot_s),
    ):
        if not scored:
            continue
        early = [v for v in values[lo:mid] if math.isfinite(v)]
        late = [v for v in values[mid:hi] if math.isfinite(v)]
        if (mid - lo) - len(early) < (hi - mid) - len(late):
            return False
        if early and late and sum(late) / len(late) > SETTLED_GROWTH * sum(early) / len(early):
            return False
    return True


class Evaluator:
    """Simulations and bisections over one model, cluster, workload and set of SLOs."""

    def __init__(
        self,
        model: ModelSpec,
        cluster: ClusterSpec,
        profiles: ProfileSet,
        workload: Workload,
        slos: SLOs,
        burstiness: float = 1.0,
        seed: int = 0,
        budget: SimBudget | None = None,
        base: SimConfig | None = None,
    ) -> None:
        self.model = model
        self.cluster = cluster
        self.profiles = profiles
        self.workload = workload
        self.slos = slos
        self.budget = budget or SimBudget()
        n = max(self.budget.max_requests, self.budget.plan_max_requests)
        self.lengths = workload.sample(n, seed)
        self.gaps = unit_rate_gaps(n, burstiness, seed)
        self.base = base or SimConfig(
            kv_bytes_per_token=model.kv_bytes_per_token,
            intra_node_gbps=cluster.intra_node_gbps,
            inter_node_gbps=cluster.inter_node_gbps,
        )
        self._sims: dict[tuple[object, ...], SimResult] = {}
        self._rates: dict[tuple[object, ...], float] = {}
        self.simulations = 0  # run, not served from the cache

    def profile(self, layout: Layout) -> LatencyProfile:
        return self.profiles.get(*layout)

    def kv_capacity(self, layout: Layout) -> int:
        return kv_capacity_tokens(self.model, self.cluster.memory_gb, *layout)

    def residence_s(self, scores_ttft: bool, scores_tpot: bool) -> float:
        """How long a request stays in the system when it just meets the SLOs."""
        decode = self.workload.mean_out * self.slos.tpot_s if scores_tpot else 0.0
        return (self.slos.ttft_s if scores_ttft else 0.0) + decode

    def simulate(
        self,
        key: tuple[object, ...],
        instances: Sequence[SimInstance],
        rate: float,
        link: str = "inter",
        plan_check: bool = False,
    ) -> tuple[SimResult, bool]:
        """One simulation at ``rate`` req/s, cached under ``key`` (what ``instances`` are).

        Also says whether it was truncated: fewer requests than steady state needs, so
        optimistic (the system never fills up)."""
        roles = {i.role for i in instances}
        scores_ttft = "decode" not in roles or "prefill" in roles
        scores_tpot = roles != {"prefill"}
        in_system = rate * self.residence_s(scores_ttft, scores_tpot)
        top = self.budget.plan_max_requests if plan_check else self.budget.max_requests
        wanted = max(self.budget.min_requests, math.ceil(3 * in_system))
        n = min(top, wanted)
        while True:
            edge = min(0.3, max(0.1, in_system / n))
            cache_key = (*key, round(rate, 9), n, link)
            if cache_key not in self._sims:
                config = replace(
                    self.base, decode_only_link=link, warmup_fraction=edge, cooldown_fraction=edge
                )
                self.simulations += 1
                self._sims[cache_key] = simulate(
                    instances, self.lengths[:n], self.gaps, rate, config
                )
            result = self._sims[cache_key]
            steady = settled(result)
            if steady or n >= top:
                return result, wanted > n or not steady
            n = min(top, 2 * n)

    def max_rate(
        self, key: tuple[object, ...], attains: Callable[[float], bool], guess: float
    ) -> float:
        """The highest rate (req/s) at which ``attains(rate)``, by geometric bisection from
        ``guess`` (an upper-bound estimate; it is raised if it turns out to pass)."""
        if key in self._rates:
            return self._rates[key]
        lo, hi, probes = 0.0, max(guess, 1e-6), 0
        while probes < MAX_PROBES and attains(hi):
            lo, hi, probes = hi, hi * 2, probes + 1
        fails = 0
        while probes < MAX_PROBES and (lo == 0 or hi / lo > RATE_TOLERANCE):
            mid = math.sqrt(lo * hi) if lo > 0 else hi / 4
            probes += 1
            if attains(mid):
                lo = mid
            else:
                hi, fails = mid, fails + 1
                if lo == 0 and fails >= ZERO_PROBES:
                    break
        self._rates[key] = lo
        return lo

    # -- one instance, one phase (DistServe's simu_prefill / simu_decode) -------------

    def prefill_rate(self, layout: Layout) -> float:
        """Max req/s of one prefill instance, TTFT alone scored."""
        prof = self.profile(layout)
        inst = [SimInstance("prefill", prof)]
        key = ("prefill", layout)
        bound = self._prefill_bound(prof)
        return self.max_rate(key, lambda r: self._attains(key, inst, r, bound), bound)

    def decode_rate(self, layout: Layout, link: str) -> float:
        """Max req/s of one decode instance, TPOT alone scored, KV arriving over ``link``."""
        prof = self.profile(layout)
        inst = [SimInstance("decode", prof, self.kv_capacity(layout))]
        key = ("decode", layout, link)
        bound = self._decode_bound(prof, self.kv_capacity(layout))
        return self.max_rate(key, lambda r: self._attains(key, inst, r, bound, link), bound)

    def colocated_rate(self, layout: Layout) -> float:
        """Max req/s of one colocated (chunked prefill) instance, both SLOs scored."""
        prof = self.profile(layout)
        cap = self.kv_capacity(layout)
        inst = [SimInstance("colocated", prof, cap)]
        key = ("colocated", layout)
        bound = min(self._prefill_bound(prof), self._decode_bound(prof, cap))
        return self.max_rate(key, lambda r: self._attains(key, inst, r, bound), bound)

    def group_rate(
        self, key: tuple[object, ...], instances: Sequence[SimInstance], bound: float
    ) -> float:
        """Max req/s of prefill and decode instances together, both SLOs scored;
        ``bound``: the sum of their single-phase rates' minimum."""
        return self.max_rate(key, lambda r: self._attains(key, instances, r, bound), bound)

    def _attains(
        self,
        key: tuple[object, ...],
        instances: Sequence[SimInstance],
        rate: float,
        bound: float,
        link: str = "inter",
    ) -> bool:
        """Attainment at ``rate`` meets the target. A truncated simulation is believed only
        up to ``bound``, the analytic throughput limit, because it never fills up."""
        result, truncated = self.simulate(key, instances, rate, link)
        if truncated and rate > bound:
            return False
        return result.attainment(self.slos) >= self.slos.attainment

    def _prefill_bound(self, prof: LatencyProfile) -> float:
        """Throughput of full batches of mean-length prompts through the pipeline."""
        length = self.workload.mean_in
        k = max(1, int(self.base.prefill_token_budget // length))
        stage_s = prof.prefill_ms(k * length, k * length * length) / 1000.0 / prof.pp
        return k / stage_s

    def _decode_bound(self, prof: LatencyProfile, capacity: int) -> float:
        """Throughput of the largest batch that fits the KV cache and steps within the
        TPOT SLO: above it, Little's law says requests must queue."""
        w = self.workload
        context = w.mean_in + w.mean_out / 2  # mean context over a request's decode

        def step_ms(batch: int) -> float:
            return prof.decode_ms(batch, batch * context)

        lo, hi = 1, max(1, int(capacity / (w.mean_in + w.mean_out) / prof.pp))  # per lane
        while lo < hi:  # the largest batch whose step meets TPOT (step_ms grows with it)
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if step_ms(mid) <= self.slos.tpot_s * 1000 else (lo, mid - 1)
        return prof.pp * lo / (step_ms(lo) / 1000.0) / max(1.0, w.mean_out - 1)
