"""SLO targets, the judgement of each finished request, and the live windows.

A served model has targets (TTFT, TPOT, and the attainment objective: the share of
requests that must meet both). Each request the router finishes is judged once
(:func:`judge`): TTFT met when ``ttft <= target``, TPOT met when ``tpot <= target`` (or
when the request produced a single token, so it has no TPOT), joint met when both are.
Only requests that finished normally (outcome ``ok``) are judged; errors, aborts and
rejections are counted as outcomes.

:class:`SLOWindows` keeps the last hour of finished requests in memory and answers the
page's questions for any window up to that: attainment by criterion, goodput (requests
meeting both SLOs per second), error budget left, latency percentiles, a time series,
and the most recent misses. Pure Python, with an injected clock, so it is tested alone.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

CRITERIA = ("ttft", "tpot", "joint")
RESULTS = ("met", "missed")
OUTCOMES = ("ok", "error", "aborted", "rejected")
# Windows the JSON endpoint and the page offer, in seconds.
WINDOWS = {"1m": 60.0, "5m": 300.0, "60m": 3600.0}
HORIZON_S = 3600.0
MAX_ENTRIES = 200_000  # at ~55 req/s for an hour; older entries go first beyond that


@dataclass(frozen=True)
class SLOTargets:
    """One model's targets; the error names the flag (``--slo-ttft`` ...)."""

    ttft_s: float
    tpot_s: float
    objective: float = 0.9

    def __post_init__(self) -> None:
        for name, value in (("slo-ttft", self.ttft_s), ("slo-tpot", self.tpot_s)):
            if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
                raise ValueError(f"{name}: must be a positive number of seconds, got {value!r}")
        if not (isinstance(self.objective, int | float) and 0 < self.objective < 1):
            raise ValueError(f"slo-attainment: must be in (0, 1) exclusive, got {self.objective!r}")

    def to_dict(self) -> dict[str, float]:
        return {"ttft_s": self.ttft_s, "tpot_s": self.tpot_s, "objective": self.objective}


@dataclass(frozen=True)
class PlanPrediction:
    """What the running plan predicted (``baton plan``): the gauges of planner fidelity."""

    attainment: float
    rate_rps: float
    mean_prompt_tokens: float | None
    mean_output_tokens: float | None
    max_goodput_rps: float  # per-GPU goodput x the plan's GPUs
    # Simulated at the plan's rate: {"p50", "p90", "p99"} -> seconds (inf: never served);
    # None for a plan file written before the planner recorded them.
    ttft_s: dict[str, float] | None = None
    tpot_s: dict[str, float] | None = None

    def to_dict(self) -> dict[str, Any]:
        """For ``/api/v1/slo``: JSON has no infinity, so a never-served percentile is null."""

        def finite(q: dict[str, float] | None) -> dict[str, float | None] | None:
            return None if q is None else {k: v if math.isfinite(v) else None for k, v in q.items()}

        return {
            "attainment": self.attainment,
            "rate_rps": self.rate_rps,
            "mean_prompt_tokens": self.mean_prompt_tokens,
            "mean_output_tokens": self.mean_output_tokens,
            "max_goodput_rps": self.max_goodput_rps,
            "ttft_s": finite(self.ttft_s),
            "tpot_s": finite(self.tpot_s),
        }


@dataclass(frozen=True)
class Judgement:
    ttft_met: bool
    tpot_met: bool

    @property
    def joint_met(self) -> bool:
        return self.ttft_met and self.tpot_met

    def results(self) -> dict[str, str]:
        """criterion -> "met" | "missed"."""
        met = {"ttft": self.ttft_met, "tpot": self.tpot_met, "joint": self.joint_met}
        return {c: "met" if ok else "missed" for c, ok in met.items()}


def judge(ttft_s: float | None, tpot_s: float | None, targets: SLOTargets) -> Judgement:
    """A request without a first token misses TTFT; one with a single token has no
    TPOT and so cannot miss it. Exactly at the target is met."""
    ttft_met = ttft_s is not None and ttft_s <= targets.ttft_s
    tpot_met = tpot_s is None or tpot_s <= targets.tpot_s
    return Judgement(ttft_met, tpot_met)


@dataclass(frozen=True)
class Finished:
    """One finished request as the windows keep it (times in seconds, ``t`` wall clock)."""

    t: float
    model: str
    outcome: str
    request_id: str = ""
    ttft_s: float | None = None
    tpot_s: float | None = None
    judgement: Judgement | None = None  # None unless outcome == "ok" and targets exist
    prompt_tokens: int = 0
    output_tokens: int = 0
    prefill_instance: str | None = None
    decode_instance: str | None = None
    kv_transfer_s: float | None = None
    kv_backend: str = ""
    extra: dict[str, float] = field(default_factory=dict)  # the TTFT breakdown

    def to_dict(self) -> dict[str, Any]:
        j = self.judgement
        return {
            "t": self.t,
            "model": self.model,
            "request_id": self.request_id,
            "outcome": self.outcome,
            "ttft_s": self.ttft_s,
            "tpot_s": self.tpot_s,
            "ttft_met": None if j is None else j.ttft_met,
            "tpot_met": None if j is None else j.tpot_met,
            "prompt_tokens": self.prompt_tokens,
            "output_tokens": self.output_tokens,
            "prefill_instance": self.prefill_instance,
            "decode_instance": self.decode_instance,
            "kv_transfer_s": self.kv_transfer_s,
        }


def percentile(values: Sequence[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..100) of unsorted values; None when empty."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


def _percentiles(values: Sequence[float]) -> dict[str, float | None]:
    return {f"p{q}": percentile(values, q) for q in (50, 90, 99)}


def parse_window(text: str | None) -> float:
    """``1m``, ``5m`` or ``60m`` -> seconds; ValueError naming the field otherwise."""
    if text not in WINDOWS:
        raise ValueError(f"window: must be one of {', '.join(WINDOWS)}, got {text!r}")
    return WINDOWS[text]


class SLOWindows:
    def __init__(
        self,
        objective: float | None = None,
        clock: Callable[[], float] = time.time,
        horizon_s: float = HORIZON_S,
        max_entries: int = MAX_ENTRIES,
        max_misses: int = 200,
    ):
        self.objective = objective
        self.clock = clock
        self.horizon_s = horizon_s
        self._entries: deque[Finished] = deque(maxlen=max_entries)
        self._misses: deque[Finished] = deque(maxlen=max_misses)

    def add(self, entry: Finished) -> None:
        self._entries.append(entry)
        if entry.judgement is not None and not entry.judgement.joint_met:
            self._misses.append(entry)
        self._expire()

    def _expire(self) -> None:
        cutoff = self.clock() - self.horizon_s
        while self._entries and self._entries[0].t < cutoff:
            self._entries.popleft()

    def _since(self, window_s: float, model: str | None = None) -> list[Finished]:
        self._expire()
        cutoff = self.clock() - window_s
        return [
            e
            for e in reversed(self._entries)
            if e.t >= cutoff and (model is None or e.model == model)
        ]

    def summary(self, window_s: float, model: str | None = None) -> dict[str, Any]:
        entries = self._since(window_s, model)
        outcomes = {o: sum(e.outcome == o for e in entries) for o in OUTCOMES}
        judged = [e.judgement for e in entries if e.judgement is not None]
        met = {
            "ttft": sum(j.ttft_met for j in judged),
            "tpot": sum(j.tpot_met for j in judged),
            "joint": sum(j.joint_met for j in judged),
        }
        attainment = {c: (met[c] / len(judged) if judged else None) for c in CRITERIA}
        ok = [e for e in entries if e.outcome == "ok"]
        return {
            "window_s": window_s,
            "requests": len(entries),
            "outcomes": outcomes,
            "judged": len(judged),
            "met": met,
            "attainment": attainment,
            "goodput_rps": met["joint"] / window_s,
            "throughput_rps": len(ok) / window_s,
            "error_budget_left": self.budget_left(attainment["joint"]),
            "ttft_s": _percentiles([e.ttft_s for e in ok if e.ttft_s is not None]),
            "tpot_s": _percentiles([e.tpot_s for e in ok if e.tpot_s is not None]),
        }

    def budget_left(self, joint_attainment: float | None) -> float | None:
        """1 - (missed share / allowed missed share); negative once overspent."""
        if self.objective is None or joint_attainment is None:
            return None
        return 1.0 - (1.0 - joint_attainment) / (1.0 - self.objective)

    def series(
        self, window_s: float = 600.0, step_s: float = 10.0, model: str | None = None
    ) -> list[dict[str, Any]]:
        """One point per ``step_s`` bucket of the last ``window_s`` (oldest first): the
        bucket's end time, request count, TTFT/TPOT percentiles, joint attainment and
        the mean TTFT breakdown."""
        now = self.clock()
        n = max(1, int(window_s // step_s))
        buckets: list[list[Finished]] = [[] for _ in range(n)]
        for e in self._since(window_s, model):
            i = n - 1 - int((now - e.t) // step_s)
            if 0 <= i < n:
                buckets[i].append(e)
        points = []
        for i, bucket in enumerate(buckets):
            ok = [e for e in bucket if e.outcome == "ok"]
            judged = [e.judgement for e in bucket if e.judgement is not None]
            parts: dict[str, list[float]] = {}
            for e in ok:
                for k, v in e.extra.items():
                    parts.setdefault(k, []).append(v)
            points.append(
                {
                    "t": now - (n - 1 - i) * step_s,
                    "requests": len(bucket),
                    "ttft_s": _percentiles([e.ttft_s for e in ok if e.ttft_s is not None]),
                    "tpot_s": _percentiles([e.tpot_s for e in ok if e.tpot_s is not None]),
                    "joint": (sum(j.joint_met for j in judged) / len(judged)) if judged else None,
                    "breakdown_s": {k: sum(v) / len(v) for k, v in parts.items()},
                }
            )
        return points

    def kv_transfer(self, window_s: float, model: str | None = None) -> dict[str, Any]:
        """Per backend: KV pull p50/p99 and the mean pull over the mean TTFT."""
        by: dict[str, list[Finished]] = {}
        for e in self._since(window_s, model):
            if e.kv_transfer_s is not None and e.outcome == "ok":
                by.setdefault(e.kv_backend or "unknown", []).append(e)
        out = {}
        for backend, entries in by.items():
            pulls = [e.kv_transfer_s for e in entries if e.kv_transfer_s is not None]
            ttfts = [e.ttft_s for e in entries if e.ttft_s is not None]
            mean_ttft = sum(ttfts) / len(ttfts) if ttfts else 0.0
            out[backend] = {
                "count": len(pulls),
                "p50_s": percentile(pulls, 50),
                "p99_s": percentile(pulls, 99),
                "share_of_ttft": (sum(pulls) / len(pulls)) / mean_ttft if mean_ttft else None,
            }
        return out

    def misses(self, model: str | None = None, limit: int = 20) -> list[dict[str, Any]]:
        """The most recent requests that missed an SLO, newest first."""
        found = [e for e in reversed(self._misses) if model is None or e.model == model]
        return [e.to_dict() for e in found[:limit]]


def slo_settings(
    ttft_s: float | None,
    tpot_s: float | None,
    objective: float | None,
    plan_path: str | None = None,
) -> tuple[SLOTargets | None, PlanPrediction | None]:
    """Targets from ``--slo-*`` flags, else from the plan ``--plan`` launches (a flag
    overrides the plan's value); the plan's predictions. ValueError naming the field."""
    plan = None
    if plan_path is not None:
        from pathlib import Path

        from cluster.planner.plan import Plan  # pure Python

        plan = Plan.from_json(Path(plan_path).read_text())  # "slos: missing" without SLOs
    base = plan.slos if plan is not None else None
    ttft = ttft_s if ttft_s is not None else (base.ttft_s if base else None)
    tpot = tpot_s if tpot_s is not None else (base.tpot_s if base else None)
    goal = objective if objective is not None else (base.attainment if base else 0.9)
    if ttft is None and tpot is None:
        if objective is not None:
            raise ValueError("slo-attainment: needs --slo-ttft and --slo-tpot (or --plan)")
        return None, None
    if ttft is None or tpot is None:
        missing = "slo-ttft" if ttft is None else "slo-tpot"
        raise ValueError(f"{missing}: required when the other SLO target is given")
    try:
        targets = SLOTargets(ttft, tpot, goal)
    except ValueError as e:
        raise ValueError(f"{e} (from the plan {plan_path})" if plan else str(e)) from None
    if plan is None:
        return targets, None
    return targets, PlanPrediction(
        attainment=plan.attainment,
        rate_rps=plan.rate,
        mean_prompt_tokens=_workload_means(plan.workload)[0],
        mean_output_tokens=_workload_means(plan.workload)[1],
        max_goodput_rps=plan.per_gpu_goodput * plan.num_gpus,
        ttft_s=None if plan.ttft is None else _quantiles(plan.ttft),
        tpot_s=None if plan.tpot is None else _quantiles(plan.tpot),
    )


def _quantiles(q: Any) -> dict[str, float]:
    """A plan's ``LatencyPercentiles`` as the live windows' keys."""
    return {"p50": q.p50, "p90": q.p90, "p99": q.p99}


def _workload_means(spec: str) -> tuple[float | None, float | None]:
    """The plan's assumed mean lengths; unknown when its trace file is not here."""
    from cluster.planner.workload import load_workload

    try:
        w = load_workload(spec)
    except (ValueError, OSError):
        return None, None
    return w.mean_in, w.mean_out
