"""A CPU host's latency model: profiles per torch thread count, and instances sharing cores.

``baton profile --threads 1,2`` times the engine once per thread count and writes a
``baton.cpu_profiles`` file: the host's cores and, per thread count, the planner's latency
profile (DistServe's form, ``cluster.planner.latency``) fitted at it.

Instances on one host share its cores with each other and with the host's other work: the
router, Ray's processes, a client on the same host (``background`` cores, kept busy all the
time). An instance given ``t`` threads steps at the profile of ``t`` threads while the
threads that are in a step and the background fit the cores. Past that the host is
contended, and an instance's effective thread count is:

- one thread, or a team while the busy threads fit the cores: its fair share,
  ``t * cores / demand`` (``demand``: every busy thread plus the background); Linux moves
  a lone thread to wherever there is room, and a team's threads each lose the
  background's share of their core;
- a team of ``t`` > 1 OpenMP threads, when the busy threads outnumber the cores:
  ``t * TEAM_EFFICIENCY / max_load``, where ``max_load`` is the runnable threads on the
  most loaded core (the busy instances' threads spread evenly, the background on one of the
  least loaded cores). Every parallel region ends at a barrier, so the team runs at the
  pace of its slowest thread, and the others spin and then sleep there;
  ``TEAM_EFFICIENCY`` is what that waiting costs besides.

A step's time at a fractional thread count interpolates the measured speeds (1 / step time)
linearly between the two nearest measured counts; below the smallest it is time-sliced
(half a thread: twice the one-thread time), above the largest it is the largest's. A step's
share is fixed when it starts (processor sharing, approximated per step).

Calibrated on this machine (bf16 SmolLM2, ``baton bench peers`` with vLLM's client on the
same two cores; router, Ray and client used about 0.5 core between them, in bursts), 160
requests per Poisson rate of 2-4 req/s, compared with ``baton bench peers-sim``:

- two one-thread colocated instances tracked their profiles with ``background`` 0.25:
  SLO attainment 98 / 98 / 60% measured at 2 / 3 / 3.5 req/s against 100 / 100 / 50%
  simulated, mean TTFT within 20%; without the background the simulation said 84% at 3.5
  and 27% at 4 (measured 31%);
- one instance of two threads ran at its two-thread profile: 100 / 96% at 2 / 3 req/s
  against 100 / 93% simulated, mean TTFT 271 / 395 ms against 246 / 391, mean TPOT 25 / 69
  ms against 23 / 68. Charged the background as a contended team (1.28 effective threads)
  it simulated at 92 / 0%. Before the engine ran a decode step's layers in one native call
  (``engine/native/csrc/decode_step.c``), every kernel of a step went back to Python, and
  such an instance decoded at about its one-thread speed (TPOT 44 ms at 2 req/s where its
  profile said 24): a team that leaves its parallel regions between kernels loses its
  pace to whatever else runs; one that goes from region to region in C does not.
- ``TEAM_EFFICIENCY`` 0.8 fits the oversubscribed runs of that earlier engine: one prefill
  plus one decode instance of two threads each fell to 25% SLO attainment at 4 req/s where
  the pair with one thread each held 100% up to 6.

Refitted after the next engine (fp32 prefill attention and decode GEMMs in C, faster bf16
decode attention; a fresh quick profile whose two-thread decode step is 8.05 ms + 0.59 a
request), 120 requests per rate of 2-5 req/s: the lone two-thread instance at its profile
simulated 100 / 89% at 3 / 4 req/s against 98 / 19% measured (mean TPOT 31 / 89 ms
against 70 / 233): its served speed had not followed its profile's. Charged its fair
share beside the background (1.78 threads of 2) it simulates 98 / 41% (TPOT 45 / 256 ms);
charged as a contended team (1.28) 20% at 3 req/s. So a team that fits the cores now
takes its fair share too; whether the first calibration's run (another engine, another
profile) still fits was not rechecked. The two one-thread instances were unchanged (56%
simulated, 62% measured at 4 req/s).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cluster.planner._validate import positive_int, require
from cluster.planner.instances import EventQueue
from cluster.planner.latency import LatencyProfile

CPU_SCHEMA = "baton.cpu_profiles"
# The dtypes an engine resolves ``auto`` to (what a profile records).
DTYPES = ("float32", "bfloat16", "float16")
CPU_SCHEMA_VERSION = 1
STEP_KINDS = ("prefill_ms", "decode_ms", "mixed_ms")


@dataclass(frozen=True)
class CpuProfiles:
    """Per torch thread count, the (TP=1, PP=1) latency profile of this engine here."""

    cores: int
    by_threads: dict[int, LatencyProfile]
    model: str = ""
    # The dtype the profiled engine ran (``auto`` resolved, e.g. "bfloat16"); "" in files
    # from before it was recorded. A plan made from this profile serves at it.
    dtype: str = ""

    def __post_init__(self) -> None:
        positive_int(self.cores, "cores")
        require(bool(self.by_threads), "threads", "needs a profile for at least one count")
        for t, prof in self.by_threads.items():
            positive_int(t, "threads")
            require(prof.layout == (1, 1), "threads", f"{t}: must be a tp=1 pp=1 profile")

    @property
    def thread_counts(self) -> list[int]:
        return sorted(self.by_threads)

    def step_ms(self, kind: str, threads: float, *shape: float) -> float:
        """One step of ``kind`` (a ``LatencyProfile`` method) at ``threads`` effective
        threads, interpolated as the module text says."""
        require(kind in STEP_KINDS, "kind", f"must be one of {', '.join(STEP_KINDS)}")
        require(threads > 0, "threads", f"must be > 0, got {threads}")
        counts = self.thread_counts

        def at(t: int) -> float:
            return float(getattr(self.by_threads[t], kind)(*shape))

        if threads <= counts[0]:
            return at(counts[0]) * counts[0] / threads
        if threads >= counts[-1]:
            return at(counts[-1])
        hi = next(t for t in counts if t >= threads)
        lo = max(t for t in counts if t < threads)
        w = (threads - lo) / (hi - lo)
        speed = (1 - w) / at(lo) + w / at(hi)
        return 1.0 / speed

    def to_json(self) -> str:
        return json.dumps(
            {
                "schema": CPU_SCHEMA,
                "version": CPU_SCHEMA_VERSION,
                "model": self.model,
                **({"dtype": self.dtype} if self.dtype else {}),
                "cores": self.cores,
                "threads": [
                    {"threads": t, "profile": self.by_threads[t].to_dict()}
                    for t in self.thread_counts
                ],
            },
            indent=2,
        )

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CpuProfiles:
        require(data.get("schema") == CPU_SCHEMA, "schema", f"must be {CPU_SCHEMA!r}")
        require(
            data.get("version") == CPU_SCHEMA_VERSION,
            "version",
            f"must be {CPU_SCHEMA_VERSION}, got {data.get('version')!r}",
        )
        try:
            entries = {
                int(e["threads"]): LatencyProfile.from_dict(e["profile"]) for e in data["threads"]
            }
            dtype = data.get("dtype", "")
            require(dtype in ("", *DTYPES), "dtype", f"must be one of {', '.join(DTYPES)}, "
                    f"got {dtype!r}")  # fmt: skip
            return cls(int(data["cores"]), entries, str(data.get("model", "")), dtype)
        except KeyError as exc:
            raise ValueError(f"{exc.args[0]}: missing from the CPU profile") from None
        except (TypeError, AttributeError) as exc:
            raise ValueError(f"profile: malformed CPU profile ({exc})") from None


def is_cpu_profile(path: str | Path) -> bool:
    """Whether ``path`` holds a ``baton.cpu_profiles`` file (not a plain latency profile)."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return isinstance(data, dict) and data.get("schema") == CPU_SCHEMA


def load_cpu_profiles(path: str | Path) -> CpuProfiles:
    p = Path(path)
    require(p.is_file(), "profile", f"no such file: {str(path)!r}")
    try:
        data = json.loads(p.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"profile: not valid JSON ({exc})") from None
    require(isinstance(data, dict), "profile", "must be a JSON object")
    return CpuProfiles.from_dict(data)


def save_cpu_profiles(profiles: CpuProfiles, path: str | Path) -> None:
    Path(path).write_text(profiles.to_json() + "\n")


# What a contended OpenMP team keeps of its slowest thread's share (the module text).
TEAM_EFFICIENCY = 0.8
# Cores the host's other work keeps busy while it serves (the module text), by default.
DEFAULT_BACKGROUND = 0.25


def effective_threads(threads: int, others: list[int], cores: int, background: float) -> float:
    """The effective thread count of an instance of ``threads`` while instances of
    ``others`` threads are in a step too, on ``cores`` with ``background`` cores busy."""
    whole = threads + sum(others)
    demand = whole + background
    if threads == 1 or whole <= cores:  # a lone thread, or a team that fits: its fair share
        return float(threads) if demand <= cores else threads * cores / demand
    base, extra = divmod(whole, cores)  # ``extra`` cores run base + 1 threads, one runs base
    max_load = max(base + (1 if extra else 0), base + background)  # the background there
    return threads * TEAM_EFFICIENCY / max_load


class SharedHost:
    """The cores instances of one simulation share; each asks it for its step times."""

    def __init__(
        self, profiles: CpuProfiles, cores: int | None = None, background: float = 0.0
    ) -> None:
        require(background >= 0, "host-load", f"must be >= 0 cores, got {background}")
        self.profiles = profiles
        self.cores = cores or profiles.cores
        self.background = background
        self.threads: list[int] = []
        self._busy_until: list[float] = []
        self._events: EventQueue | None = None

    def instance(self, threads: int) -> HostInstanceTimes:
        positive_int(threads, "threads")
        self.threads.append(threads)
        self._busy_until.append(-math.inf)
        return HostInstanceTimes(self, len(self.threads) - 1)

    def bind(self, events: EventQueue) -> None:
        """A new simulation: its clock, and every instance idle."""
        if events is not self._events:
            self._events = events
            self._busy_until = [-math.inf] * len(self.threads)

    def effective_threads(self, index: int, now: float) -> float:
        others = [
            t
            for j, (t, until) in enumerate(zip(self.threads, self._busy_until, strict=True))
            if j != index and until > now
        ]
        return effective_threads(self.threads[index], others, self.cores, self.background)

    def step(self, index: int, kind: str, *shape: float) -> float:
        now = self._events.now if self._events is not None else 0.0
        ms = self.profiles.step_ms(kind, self.effective_threads(index, now), *shape)
        self._busy_until[index] = now + ms / 1000.0
        return ms


class HostInstanceTimes:
    """One instance's step times on a ``SharedHost`` (a ``StepTimes``; TP = PP = 1)."""

    tp = 1
    pp = 1

    def __init__(self, host: SharedHost, index: int) -> None:
        self.host = host
        self.index = index

    def bind(self, events: EventQueue) -> None:
        self.host.bind(events)

    def prefill_ms(self, sum_tokens: float, sum_sq_tokens: float) -> float:
        return self.host.step(self.index, "prefill_ms", sum_tokens, sum_sq_tokens)

    def decode_ms(self, batch: int, sum_context: float) -> float:
        return self.host.step(self.index, "decode_ms", batch, sum_context)

    def mixed_ms(self, sum_tokens: float, sum_sq: float, batch: int, sum_context: float) -> float:
        return self.host.step(self.index, "mixed_ms", sum_tokens, sum_sq, batch, sum_context)
