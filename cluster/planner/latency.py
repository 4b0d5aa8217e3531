"""Batch latency per (TP, PP) layout, in DistServe's form, and how to get its coefficients.

One forward pass of an instance (all PP stages in turn, so the pipeline latency; a stage
takes ``1/pp`` of it) costs, in milliseconds:

- prefill of a batch of prompts of lengths ``l``: ``a + b*sum(l) + c*sum(l^2)`` (weights
  read once, linear GEMM work, quadratic attention);
- decode step of ``batch`` requests with context lengths ``ctx``:
  ``a + b*sum(ctx) + c*batch``, with one coefficient set below ``decode_threshold`` and
  another from it up, because small batches are bound by reading the weights and large
  ones by compute.

Prefill may have a second set too (``prefill_large``, for batches of ``prefill_threshold``
prompt tokens and more): DistServe's GPUs do not need one, but on a CPU the cost per token
rises by a fifth once a batch's activations outgrow the cache, which one set of three
coefficients cannot follow. :func:`fit_profile` splits only where that fits much better.

Coefficients come from three places: :func:`fit_profile` on measured samples (what a
``baton profile`` sweep of the engine will produce), DistServe's own profiler JSON
(:func:`from_distserve`, read as is), or :mod:`cluster.planner.analytic` (datasheet FLOPs
and bandwidths with stated efficiencies).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from cluster.planner._validate import positive, positive_int, require

Coeffs = tuple[float, float, float]  # (a ms, b ms per unit, c ms per unit)
Layout = tuple[int, int]  # (tp, pp)
SCHEMA = "baton.latency_profiles"
SCHEMA_VERSION = 1
MIN_STEP_MS = 1e-3  # fitted coefficients can go negative at the edges; time never does
DISTSERVE_DEFAULT_THRESHOLD = 95  # what DistServe's profiler uses when the key is absent


def _coeffs(value: Any, name: str) -> Coeffs:
    ok = isinstance(value, (list, tuple)) and len(value) == 3
    require(ok, name, f"must be three numbers [a, b, c], got {value!r}")
    out = tuple(float(x) for x in value)
    require(all(math.isfinite(x) for x in out), name, f"must be finite, got {value!r}")
    return (out[0], out[1], out[2])


@dataclass(frozen=True)
class LatencyProfile:
    """Coefficients of one (tp, pp) layout; all times are the whole pipeline's, in ms."""

    tp: int
    pp: int
    prefill: Coeffs  # a + b*sum(l) + c*sum(l^2)
    decode_small: Coeffs  # a + b*sum(ctx) + c*batch, for batch < decode_threshold
    decode_large: Coeffs  # the same form, for batch >= decode_threshold
    decode_threshold: int = DISTSERVE_DEFAULT_THRESHOLD
    prefill_large: Coeffs | None = None  # the prefill form for batches from the threshold up
    prefill_threshold: int | None = None  # prompt tokens in the batch

    def __post_init__(self) -> None:
        positive_int(self.tp, "tp")
        positive_int(self.pp, "pp")
        positive_int(self.decode_threshold, "decode_threshold")
        for name in ("prefill", "decode_small", "decode_large"):
            object.__setattr__(self, name, _coeffs(getattr(self, name), name))
        require(
            (self.prefill_large is None) == (self.prefill_threshold is None),
            "prefill_threshold",
            "prefill_large and prefill_threshold go together",
        )
        if self.prefill_large is not None and self.prefill_threshold is not None:
            object.__setattr__(self, "prefill_large", _coeffs(self.prefill_large, "prefill_large"))
            positive_int(self.prefill_threshold, "prefill_threshold")

    @property
    def layout(self) -> Layout:
        return (self.tp, self.pp)

    def scaled(self, prefill: float = 1.0, decode: float = 1.0) -> LatencyProfile:
        """The same shape on hardware running ``prefill`` (``decode``) times as long per
        prefill (decode) pass: every coefficient of that phase multiplied."""
        positive(prefill, "prefill")
        positive(decode, "decode")

        def times(c: Coeffs | None, f: float) -> Any:
            return None if c is None else tuple(f * x for x in c)

        return replace(
            self,
            prefill=times(self.prefill, prefill),
            prefill_large=times(self.prefill_large, prefill),
            decode_small=times(self.decode_small, decode),
            decode_large=times(self.decode_large, decode),
        )

    def prefill_coeffs(self, sum_tokens: float) -> Coeffs:
        """The prefill coefficients for a batch of ``sum_tokens`` prompt tokens."""
        large = self.prefill_large
        if large is not None and sum_tokens >= (self.prefill_threshold or 0):
            return large
        return self.prefill

    def prefill_ms(self, sum_tokens: float, sum_sq_tokens: float) -> float:
        """One prefill pass over prompts totalling ``sum_tokens`` (sum of squares given)."""
        a, b, c = self.prefill_coeffs(sum_tokens)
        return max(MIN_STEP_MS, a + b * sum_tokens + c * sum_sq_tokens)

    def decode_ms(self, batch: int, sum_context: float) -> float:
        """One decode step of ``batch`` requests whose contexts total ``sum_context`` tokens."""
        a, b, c = self.decode_small if batch < self.decode_threshold else self.decode_large
        return max(MIN_STEP_MS, a + b * sum_context + c * batch)

    def mixed_ms(self, sum_tokens: float, sum_sq: float, batch: int, sum_context: float) -> float:
        """One step of prefill chunks and decodes together (chunked prefill, colocated):
        both variable parts, and the larger fixed part once (the weights are read once)."""
        if batch == 0:
            return self.prefill_ms(sum_tokens, sum_sq)
        if sum_tokens == 0:
            return self.decode_ms(batch, sum_context)
        a_decode = (self.decode_small if batch < self.decode_threshold else self.decode_large)[0]
        shared = min(self.prefill_coeffs(sum_tokens)[0], a_decode)
        total = self.prefill_ms(sum_tokens, sum_sq) + self.decode_ms(batch, sum_context)
        return max(MIN_STEP_MS, total - shared)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "tp": self.tp,
            "pp": self.pp,
            "prefill": list(self.prefill),
            "decode_small": list(self.decode_small),
            "decode_large": list(self.decode_large),
            "decode_threshold": self.decode_threshold,
        }
        if self.prefill_large is not None:
            out["prefill_large"] = list(self.prefill_large)
            out["prefill_threshold"] = self.prefill_threshold
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LatencyProfile:
        require(isinstance(data, dict), "profiles[]", "must be a JSON object")
        missing = [
            k for k in ("tp", "pp", "prefill", "decode_small", "decode_large") if k not in data
        ]
        require(not missing, f"profiles[].{missing[0] if missing else ''}", "missing")
        return cls(
            tp=data["tp"],
            pp=data["pp"],
            prefill=data["prefill"],
            decode_small=data["decode_small"],
            decode_large=data["decode_large"],
            decode_threshold=data.get("decode_threshold", DISTSERVE_DEFAULT_THRESHOLD),
            prefill_large=data.get("prefill_large"),
            prefill_threshold=data.get("prefill_threshold"),
        )


@dataclass(frozen=True)
class ProfileSet:
    """Profiles keyed by (tp, pp). A layout without its own entry borrows ``(tp, 1)``'s
    coefficients, DistServe's assumption: PP keeps the pipeline latency and splits it into
    ``pp`` equal stages."""

    profiles: dict[Layout, LatencyProfile] = field(default_factory=dict)
    model: str = ""
    gpu: str = ""  # the GPU type measured, if known (a ClusterSpec.gpu name)

    def __post_init__(self) -> None:
        for key, prof in self.profiles.items():
            require(key == prof.layout, "profiles", f"key {key} holds layout {prof.layout}")

    def has(self, tp: int, pp: int) -> bool:
        return (tp, pp) in self.profiles or (tp, 1) in self.profiles

    def get(self, tp: int, pp: int) -> LatencyProfile:
        if (tp, pp) in self.profiles:
            return self.profiles[(tp, pp)]
        base = self.profiles.get((tp, 1))
        known = ", ".join(f"tp={t} pp={p}" for t, p in sorted(self.profiles)) or "none"
        require(base is not None, "layout", f"no profile for tp={tp} pp={pp} (have {known})")
        assert base is not None
        return replace(base, tp=tp, pp=pp)

    def layouts(self) -> list[Layout]:
        return sorted(self.profiles)

    def to_json(self) -> str:
        body = {
            "schema": SCHEMA,
            "version": SCHEMA_VERSION,
            "model": self.model,
            "gpu": self.gpu,
            "profiles": [self.profiles[k].to_dict() for k in sorted(self.profiles)],
        }
        return json.dumps(body, indent=2)

    @classmethod
    def from_json(cls, text: str, model: str | None = None) -> ProfileSet:
        """Our own schema, or DistServe's profiler output (``model`` picks its entry)."""
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"profile: not valid JSON ({exc})") from exc
        require(isinstance(data, dict), "profile", "must be a JSON object")
        if data.get("schema") != SCHEMA:
            return from_distserve(data, model)
        require(
            data.get("version") == SCHEMA_VERSION,
            "version",
            f"must be {SCHEMA_VERSION}, got {data.get('version')!r}",
        )
        profiles = [LatencyProfile.from_dict(p) for p in data.get("profiles", [])]
        return cls(
            {p.layout: p for p in profiles}, str(data.get("model", "")), str(data.get("gpu", ""))
        )


def save_profiles(profiles: ProfileSet, path: str | Path) -> None:
    Path(path).write_text(profiles.to_json() + "\n")


def load_profiles(path: str | Path, model: str | None = None) -> ProfileSet:
    p = Path(path)
    require(p.is_file(), "profile", f"no such file: {str(path)!r}")
    return ProfileSet.from_json(p.read_text(), model)


def _pick(entry: dict[str, Any], names: Sequence[str], where: str) -> Any:
    for name in names:
        if name in entry:
            return entry[name]
    raise ValueError(f"{where}.{names[0]}: missing")


def from_distserve(data: dict[str, Any], model: str | None = None) -> ProfileSet:
    """DistServe's ``profiler-*.json``: ``{model: {tp: {"prefill": [a, b, c],
    "decoding_smallbs": [...], "decoding_largebs": [...],
    "decoding_large_small_bs_threshold": N}}}``, PP = 1. The published files spell the
    decode keys ``decoding_smallbs``/``decoding_largebs``; ``decoding_small``/``_large`` are
    accepted too."""
    names = sorted(data)
    require(bool(names), "profile", "has no models")
    if model is None:
        require(
            len(names) == 1,
            "model",
            f"the profile holds several models, pick one of {', '.join(names)}",
        )
        model = names[0]
    require(model in data, "model", f"must be one of {', '.join(names)}, got {model!r}")
    profiles: dict[Layout, LatencyProfile] = {}
    for tp_key, entry in data[model].items():
        where = f"{model}.{tp_key}"
        require(str(tp_key).isdigit(), where, "tensor-parallel keys must be integers")
        require(isinstance(entry, dict), where, "must be a JSON object")
        tp = int(tp_key)
        profiles[(tp, 1)] = LatencyProfile(
            tp=tp,
            pp=1,
            prefill=_pick(entry, ["prefill"], where),
            decode_small=_pick(entry, ["decoding_smallbs", "decoding_small"], where),
            decode_large=_pick(entry, ["decoding_largebs", "decoding_large"], where),
            decode_threshold=int(
                entry.get("decoding_large_small_bs_threshold", DISTSERVE_DEFAULT_THRESHOLD)
            ),
        )
    return ProfileSet(profiles, model=model)


def solve3(m: list[list[float]], v: list[float]) -> list[float]:
    """``m x = v`` for a 3x3 system, Gaussian elimination with partial pivoting."""
    a = [row[:] + [rhs] for row, rhs in zip(m, v, strict=True)]
    n = 3
    for col in range(n):
        pivot = max(range(col, n), key=lambda r: abs(a[r][col]))
        if abs(a[pivot][col]) < 1e-12:
            raise ValueError("samples: the features are collinear (vary the batch shapes)")
        a[col], a[pivot] = a[pivot], a[col]
        for r in range(col + 1, n):
            f = a[r][col] / a[col][col]
            for k in range(col, n + 1):
                a[r][k] -= f * a[col][k]
    x = [0.0] * n
    for r in range(n - 1, -1, -1):
        x[r] = (a[r][n] - sum(a[r][k] * x[k] for k in range(r + 1, n))) / a[r][r]
    return x


def fit_relative(rows: Sequence[Coeffs], ys: Sequence[float], name: str) -> Coeffs:
    """Least squares on relative error: weights ``1/y^2``, so a 2 ms step counts as much
    as a 200 ms one. Columns are scaled to unit weighted RMS first, because ``sum(l^2)``
    is ~1e8 times the intercept and the raw normal equations would lose all precision."""
    require(len(rows) == len(ys) and len(ys) >= 3, name, f"need >= 3 samples, got {len(ys)}")
    require(all(y > 0 and math.isfinite(y) for y in ys), name, "latencies must be > 0 ms")
    w = [1.0 / (y * y) for y in ys]
    scale = []
    for j in range(3):
        ms = sum(wi * r[j] * r[j] for wi, r in zip(w, rows, strict=True)) / sum(w)
        scale.append(math.sqrt(ms) if ms > 0 else 1.0)
    xs = [[r[j] / scale[j] for j in range(3)] for r in rows]
    ata = [
        [sum(wi * x[i] * x[j] for wi, x in zip(w, xs, strict=True)) for j in range(3)]
        for i in range(3)
    ]
    aty = [sum(wi * x[i] * y for wi, x, y in zip(w, xs, ys, strict=True)) for i in range(3)]
    try:
        beta = solve3(ata, aty)
    except ValueError as exc:
        raise ValueError(f"{name}: {str(exc).split(': ', 1)[1]}") from None
    return (beta[0] / scale[0], beta[1] / scale[1], beta[2] / scale[2])


PrefillSample = tuple[Sequence[int], float]  # (prompt lengths in the batch, ms)
DecodeSample = tuple[Sequence[int], float]  # (context lengths of the batch's requests, ms)


def _decode_rows(samples: Iterable[DecodeSample]) -> tuple[list[Coeffs], list[float]]:
    rows = [(1.0, float(sum(ctx)), float(len(ctx))) for ctx, _ in samples]
    return rows, [float(ms) for _, ms in samples]


def _relative_sse(coeffs: Coeffs, rows: Sequence[Coeffs], ys: Sequence[float]) -> float:
    return sum(
        ((sum(c * x for c, x in zip(coeffs, r, strict=True)) - y) / y) ** 2
        for r, y in zip(rows, ys, strict=True)
    )


def _best_threshold(samples: Sequence[DecodeSample]) -> int | None:
    """The batch size split with the least total relative error, or None if no split has
    three distinct batch shapes on each side."""
    best: tuple[float, int] | None = None
    for t in sorted({len(ctx) for ctx, _ in samples}):
        lo = [s for s in samples if len(s[0]) < t]
        hi = [s for s in samples if len(s[0]) >= t]
        if len(lo) < 3 or len(hi) < 3:
            continue
        try:
            err = sum(
                _relative_sse(fit_relative(*_decode_rows(part), "decode"), *_decode_rows(part))
                for part in (lo, hi)
            )
        except ValueError:
            continue
        if best is None or err < best[0]:
            best = (err, t)
    return None if best is None else best[1]


# A prefill split is kept only where one set misses by more than this RMS relative error
# and two sets at least halve the squared error, each fitted to this many batches or more.
PREFILL_SPLIT_MIN_RMS = 0.03
PREFILL_SPLIT_GAIN = 0.5
PREFILL_SPLIT_MIN_SAMPLES = 4


def _prefill_rows(samples: Iterable[PrefillSample]) -> tuple[list[Coeffs], list[float]]:
    rows = [(1.0, float(sum(ls)), float(sum(x * x for x in ls))) for ls, _ in samples]
    return rows, [float(ms) for _, ms in samples]


def _fit_prefill(samples: Sequence[PrefillSample]) -> tuple[Coeffs, Coeffs | None, int | None]:
    """(coefficients, large-batch coefficients, threshold in batch tokens): one set, or the
    split by total prompt tokens with the least error where it beats one set clearly."""
    rows, ys = _prefill_rows(samples)
    single = fit_relative(rows, ys, "prefill_samples")
    single_sse = _relative_sse(single, rows, ys)
    if math.sqrt(single_sse / len(ys)) <= PREFILL_SPLIT_MIN_RMS:
        return single, None, None
    best: tuple[float, Coeffs, Coeffs, int] | None = None
    for t in sorted({sum(ls) for ls, _ in samples}):
        parts = ([x for x in samples if sum(x[0]) < t], [x for x in samples if sum(x[0]) >= t])
        if min(len(p) for p in parts) < PREFILL_SPLIT_MIN_SAMPLES:
            continue
        try:
            lo, hi = (fit_relative(*_prefill_rows(p), "prefill_samples") for p in parts)
        except ValueError:  # one side's shapes are collinear
            continue
        sse = _relative_sse(lo, *_prefill_rows(parts[0])) + _relative_sse(
            hi, *_prefill_rows(parts[1])
        )
        if sse <= PREFILL_SPLIT_GAIN * single_sse and (best is None or sse < best[0]):
            best = (sse, lo, hi, t)
    if best is None:
        return single, None, None
    return best[1], best[2], best[3]


def fit_profile(
    prefill_samples: Sequence[PrefillSample],
    decode_samples: Sequence[DecodeSample],
    tp: int = 1,
    pp: int = 1,
    decode_threshold: int | None = None,
) -> LatencyProfile:
    """A profile from measured batches (what ``baton profile`` will call).

    ``decode_threshold=None`` picks the split batch size that fits best; with too few batch
    shapes to split, both decode sets are the same single fit. Prefill gets a second set
    only where one misses clearly (see ``PREFILL_SPLIT_*``).
    """
    prefill, prefill_large, prefill_threshold = _fit_prefill(prefill_samples)
    threshold = (
        decode_threshold if decode_threshold is not None else _best_threshold(decode_samples)
    )
    if threshold is None:
        single = fit_relative(*_decode_rows(decode_samples), "decode_samples")
        top = max((len(ctx) for ctx, _ in decode_samples), default=1)
        return LatencyProfile(
            tp, pp, prefill, single, single, top + 1, prefill_large, prefill_threshold
        )
    lo = [s for s in decode_samples if len(s[0]) < threshold]
    hi = [s for s in decode_samples if len(s[0]) >= threshold]
    small = fit_relative(*_decode_rows(lo), "decode_samples (batch < threshold)")
    large = fit_relative(*_decode_rows(hi), "decode_samples (batch >= threshold)")
    return LatencyProfile(
        tp, pp, prefill, small, large, threshold, prefill_large, prefill_threshold
    )
