"""What requests look like: prompt and output lengths, and when they arrive.

A spec is either a JSONL file of ``{"prompt_tokens": N, "output_tokens": M}`` lines (a
trace; the simulator samples it with replacement) or ``synthetic:in=MEAN,out=MEAN[,cv=X]``
(gamma-distributed lengths with that mean and coefficient of variation, rounded and
clipped to >= 1; ``cv=0``, the default, makes every request exactly the mean).

``output_tokens`` counts every generated token, the first (made by prefill) included.
Arrivals are a gamma renewal process: ``cv=1`` is Poisson, larger is burstier.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from cluster.planner._validate import positive, require

SYNTHETIC_PREFIX = "synthetic:"
SYNTHETIC_FIELDS = ("in", "out", "cv")
Lengths = tuple[int, int]  # (prompt_tokens, output_tokens)


def gamma_draw(rng: random.Random, mean: float, cv: float) -> float:
    """A gamma draw with this mean and coefficient of variation (cv=0: the mean itself)."""
    if cv == 0:
        return mean
    shape = 1.0 / (cv * cv)
    return rng.gammavariate(shape, mean / shape)


@dataclass(frozen=True)
class Workload:
    """Length distribution of requests: a trace (``trace``) or synthetic means and cv."""

    spec: str
    mean_in: float = 0.0
    mean_out: float = 0.0
    cv: float = 0.0
    trace: tuple[Lengths, ...] = ()

    def __post_init__(self) -> None:
        if self.trace:
            n = len(self.trace)
            object.__setattr__(self, "mean_in", sum(p for p, _ in self.trace) / n)
            object.__setattr__(self, "mean_out", sum(o for _, o in self.trace) / n)
        positive(self.mean_in, "workload.in")
        positive(self.mean_out, "workload.out")
        require(self.cv >= 0, "workload.cv", f"must be >= 0, got {self.cv!r}")

    def sample(self, n: int, seed: int) -> list[Lengths]:
        """``n`` (prompt, output) pairs, the same for the same seed."""
        rng = random.Random(f"lengths:{seed}")
        if self.trace:
            return [self.trace[rng.randrange(len(self.trace))] for _ in range(n)]
        return [
            (
                max(1, round(gamma_draw(rng, self.mean_in, self.cv))),
                max(1, round(gamma_draw(rng, self.mean_out, self.cv))),
            )
            for _ in range(n)
        ]

    def describe(self) -> str:
        return f"{self.spec} (mean in {self.mean_in:.0f}, out {self.mean_out:.0f} tokens)"


def _parse_synthetic(spec: str) -> Workload:
    values: dict[str, float] = {}
    for part in spec[len(SYNTHETIC_PREFIX) :].split(","):
        key, sep, raw = part.partition("=")
        key = key.strip()
        require(bool(sep), "workload", f"expected KEY=VALUE, got {part!r} in {spec!r}")
        require(
            key in SYNTHETIC_FIELDS,
            "workload",
            f"unknown field {key!r} (allowed: {', '.join(SYNTHETIC_FIELDS)})",
        )
        try:
            values[key] = float(raw)
        except ValueError:
            raise ValueError(f"workload.{key}: must be a number, got {raw!r}") from None
    for key in ("in", "out"):
        require(key in values, f"workload.{key}", f"missing in {spec!r}")
    return Workload(spec, mean_in=values["in"], mean_out=values["out"], cv=values.get("cv", 0.0))


def _parse_line(line: str, lineno: int) -> Lengths:
    where = f"workload line {lineno}"
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{where}: not valid JSON ({exc.msg})") from None
    require(isinstance(obj, dict), where, "must be a JSON object")
    out = []
    for key in ("prompt_tokens", "output_tokens"):
        v = obj.get(key)
        ok = isinstance(v, int) and not isinstance(v, bool) and v >= 1
        require(ok, f"{where}: {key}", f"must be an integer >= 1, got {v!r}")
        out.append(int(v))
    return (out[0], out[1])


def load_workload(spec: str) -> Workload:
    """Parse ``synthetic:...`` or read a JSONL trace file."""
    require(isinstance(spec, str) and bool(spec.strip()), "workload", "must not be empty")
    if spec.startswith(SYNTHETIC_PREFIX):
        return _parse_synthetic(spec)
    path = Path(spec)
    require(
        path.is_file(),
        "workload",
        f"must be a JSONL file or synthetic:in=N,out=M[,cv=X], got {spec!r}",
    )
    trace = tuple(
        _parse_line(line, i)
        for i, line in enumerate(path.read_text().splitlines(), start=1)
        if line.strip()
    )
    require(bool(trace), "workload", f"{spec} has no requests")
    return Workload(spec, trace=trace)


def unit_rate_gaps(n: int, cv: float, seed: int) -> list[float]:
    """Inter-arrival gaps of a rate-1 gamma renewal process (cv=1: Poisson).

    The search scales one draw by ``1/rate`` for every rate it tries (common random
    numbers), so attainment moves with the rate, not with the noise.
    """
    require(cv > 0, "burstiness", f"must be > 0, got {cv!r}")
    rng = random.Random(f"arrivals:{seed}")
    return [gamma_draw(rng, 1.0, cv) for _ in range(n)]
