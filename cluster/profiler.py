"""``baton profile``: this engine's batch latencies on this machine, fitted into the
planner's latency model.

The planner (``cluster/planner``) predicts with DistServe's form: a prefill batch of
prompt lengths ``l`` takes ``a + b*sum(l) + c*sum(l^2)`` ms, a decode step over contexts
``ctx`` takes ``a + b*sum(ctx) + c*batch`` ms. This module measures both on a real
``LLMEngine`` in this process, one ``step()`` at a time:

- prefill: batches of ``batch`` prompts of ``length`` random tokens, each asking for one
  token, so that the timed step is exactly the batch's prefill (the budget is set to hold
  the whole batch, the prefix cache is off);
- decode: ``batch`` requests of ``context`` prompt tokens are prefilled untimed, then
  ``decode_steps`` steps that advance every one of them are timed.

Each shape is repeated and its median kept; ``fit_profile`` then fits the coefficients by
least squares on relative error. A shape the fit finds more than ``RETIME_OVER`` slower
than it predicts is timed once more after the sweep and the lower median kept
(``second_look``): a burst of the machine's other work only adds time, and a burst longer
than a shape's repeats otherwise pulls the whole fit. The result is a profile file for
``baton plan --profile``. One process is one (TP=1, PP=1) layout; other layouts borrow
its coefficients in the planner (DistServe's assumption) until they are measured.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TextIO

from cluster.planner.latency import (
    DecodeSample,
    LatencyProfile,
    PrefillSample,
    ProfileSet,
    fit_profile,
    save_profiles,
)

Progress = Callable[[str], None]


@dataclass(frozen=True)
class ProfileGrid:
    """The shapes to time (a prefill batch holds ``batch`` prompts of ``length``)."""

    prefill_lengths: tuple[int, ...] = (16, 64, 128, 256, 512, 1024)
    prefill_batches: tuple[int, ...] = (1, 2, 4)
    decode_batches: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64)
    decode_contexts: tuple[int, ...] = (64, 256, 1024)
    decode_steps: int = 4
    repeats: int = 3
    max_batch_tokens: int = 4096  # prefill shapes above this are skipped

    def __post_init__(self) -> None:
        for name in ("prefill_lengths", "prefill_batches", "decode_batches", "decode_contexts"):
            values = getattr(self, name)
            if not values or any(not isinstance(v, int) or v < 1 for v in values):
                raise ValueError(f"{name}: must be positive integers, got {values!r}")
        for name in ("decode_steps", "repeats", "max_batch_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be >= 1, got {getattr(self, name)}")

    def prefill_shapes(self) -> list[tuple[int, int]]:
        return [
            (batch, length)
            for length in self.prefill_lengths
            for batch in self.prefill_batches
            if batch * length <= self.max_batch_tokens
        ]

    def decode_shapes(self) -> list[tuple[int, int]]:
        return [(b, c) for c in self.decode_contexts for b in self.decode_batches]


QUICK_GRID = ProfileGrid(
    prefill_lengths=(16, 128, 512),
    prefill_batches=(1, 2),
    decode_batches=(1, 4, 16),
    decode_contexts=(64, 512),
    decode_steps=2,
    repeats=1,
)


# A shape whose time is more than this (relative) over the first fit's is timed again.
# Measured on a shared 2-core host: a burst of load of about two minutes made four prefill
# shapes 1.5-5x slow at both thread counts (their medians of three), which pulled the
# two-thread fit's cost per prompt token from 0.64 to 0.76 ms; every shape outside the
# burst was within 20% of the fit.
RETIME_OVER = 0.25


def decode_max_tokens(batch: int, context: int, steps: int, budget: int) -> int:
    """Output tokens a timed decode request asks for: a batch whose prompts span several
    steps (``budget`` tokens each) is prefilled in chunks, and the requests done first
    decode meanwhile, so each must outlast that and then the ``steps`` timed steps."""
    prefill_steps = -(-batch * context // budget)
    return steps + prefill_steps + 2


class EngineProfiler:
    """Times prefill batches and decode steps on one engine (any ``LLMEngine``)."""

    def __init__(self, engine: Any, seed: int = 0):
        self.engine = engine
        self._rng = random.Random(seed)
        self._n = 0
        vocab = engine.model_config.vocab_size
        self._vocab = (min(1000, vocab - 1), vocab - 1)  # ordinary tokens, no specials

    def _ids(self, n: int) -> list[int]:
        return [self._rng.randint(*self._vocab) for _ in range(n)]

    def _add(self, length: int, max_tokens: int) -> str:
        from engine.sampling_params import SamplingParams

        self._n += 1
        request_id = f"profile-{self._n}"
        params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
        self.engine.add_request(request_id, params=params, prompt_token_ids=self._ids(length))
        return request_id

    def prefill_ms(self, batch: int, length: int) -> float:
        """One step that prefills ``batch`` prompts of ``length`` tokens and finishes them."""
        ids = [self._add(length, max_tokens=1) for _ in range(batch)]
        started = time.perf_counter()
        outputs = self.engine.step()
        elapsed = time.perf_counter() - started
        finished = {o.request_id for o in outputs if o.finished}
        if finished != set(ids):  # a step budget too small for the batch: not one step
            for request_id in ids:
                self.engine.abort(request_id)
            raise RuntimeError(f"prefill of {batch} x {length} tokens did not fit one step")
        return 1e3 * elapsed

    def decode_ms(self, batch: int, context: int, steps: int) -> list[DecodeSample]:
        """``steps`` timed decode steps over ``batch`` requests of ``context`` tokens."""
        budget = self.engine.scheduler.config.max_num_batched_tokens
        max_tokens = decode_max_tokens(batch, context, steps, budget)
        ids = [self._add(context, max_tokens=max_tokens) for _ in range(batch)]
        started: set[str] = set()
        while len(started) < batch:  # prefill, untimed
            started.update(o.request_id for o in self.engine.step() if o.new_token_ids)
        samples: list[DecodeSample] = []
        for _ in range(steps):
            t0 = time.perf_counter()
            outputs = self.engine.step()
            elapsed = time.perf_counter() - t0
            if len(outputs) != batch:
                raise RuntimeError(f"a decode step advanced {len(outputs)} of {batch} requests")
            contexts = [len(o.prompt_token_ids) + len(o.token_ids) for o in outputs]
            samples.append((contexts, 1e3 * elapsed))
        for request_id in ids:
            self.engine.abort(request_id)
        return samples

    def time_prefill(self, batch: int, length: int, grid: ProfileGrid) -> PrefillSample:
        """The median of ``grid.repeats`` prefills of ``batch`` x ``length``."""
        ms = statistics.median(self.prefill_ms(batch, length) for _ in range(grid.repeats))
        return [length] * batch, ms

    def time_decode(self, batch: int, context: int, grid: ProfileGrid) -> DecodeSample:
        """The median step of ``grid.repeats`` runs of decode steps, with its contexts."""
        runs = [self.decode_ms(batch, context, grid.decode_steps) for _ in range(grid.repeats)]
        steps = sorted((s for run in runs for s in run), key=lambda s: s[1])
        return steps[len(steps) // 2]

    def run(
        self, grid: ProfileGrid, progress: Progress | None = None
    ) -> tuple[list[PrefillSample], list[DecodeSample]]:
        say = progress or (lambda _: None)
        self.prefill_ms(1, 16)  # warm-up: first-use kernel builds, allocator
        prefill: list[PrefillSample] = []
        for batch, length in grid.prefill_shapes():
            prefill.append(self.time_prefill(batch, length, grid))
            say(f"prefill {batch} x {length} tokens: {prefill[-1][1]:.1f} ms")
        decode: list[DecodeSample] = []
        for batch, context in grid.decode_shapes():
            decode.append(self.time_decode(batch, context, grid))
            say(f"decode {batch} x {context} context: {decode[-1][1]:.1f} ms")
        return self.second_look(grid, prefill, decode, say)

    def second_look(
        self,
        grid: ProfileGrid,
        prefill: list[PrefillSample],
        decode: list[DecodeSample],
        say: Progress,
    ) -> tuple[list[PrefillSample], list[DecodeSample]]:
        """``prefill`` and ``decode`` (``grid``'s shapes in order), each shape more than
        ``RETIME_OVER`` slower than their fit predicts timed once more, the lower kept."""
        fit = fit_profile(prefill, decode, tp=1, pp=1)
        prefill, decode = list(prefill), list(decode)
        for i, (batch, length) in enumerate(grid.prefill_shapes()):
            lengths, ms = prefill[i]
            want = fit.prefill_ms(sum(lengths), sum(n * n for n in lengths))
            if ms > (1 + RETIME_OVER) * want:
                again = self.time_prefill(batch, length, grid)
                say(f"prefill {batch} x {length} tokens: {ms:.1f} ms was {ms / want:.2f}x the "
                    f"fit; again: {again[1]:.1f} ms")  # fmt: skip
                prefill[i] = min(prefill[i], again, key=lambda s: s[1])
        for i, (batch, context) in enumerate(grid.decode_shapes()):
            contexts, ms = decode[i]
            want = fit.decode_ms(len(contexts), sum(contexts))
            if ms > (1 + RETIME_OVER) * want:
                retimed = self.time_decode(batch, context, grid)
                say(f"decode {batch} x {context} context: {ms:.1f} ms was {ms / want:.2f}x the "
                    f"fit; again: {retimed[1]:.1f} ms")  # fmt: skip
                decode[i] = min(decode[i], retimed, key=lambda s: s[1])
        return prefill, decode


def profile_threads(
    profiler: EngineProfiler,
    grid: ProfileGrid,
    threads: list[int],
    set_threads: Callable[[int], None],
    progress: Progress | None = None,
) -> dict[int, tuple[list[PrefillSample], list[DecodeSample]]]:
    """Every shape of ``grid`` at each thread count in turn, shape by shape (not one count's
    sweep after another's), so that a machine whose load drifts loads them alike."""
    say = progress or (lambda _: None)
    out: dict[int, tuple[list[PrefillSample], list[DecodeSample]]] = {
        t: ([], []) for t in sorted(threads)
    }
    for t in out:
        set_threads(t)
        # Warm-up at each count: the thread pool is rebuilt, and the model's GEMMs pack
        # their weights for this count (engine.models.llama.Linear.packed).
        profiler.prefill_ms(1, 16)
    for batch, length in grid.prefill_shapes():
        for t, (prefill, _) in out.items():
            set_threads(t)
            prefill.append(profiler.time_prefill(batch, length, grid))
            say(f"threads {t}: prefill {batch} x {length} tokens: {prefill[-1][1]:.1f} ms")
    for batch, context in grid.decode_shapes():
        for t, (_, decode) in out.items():
            set_threads(t)
            decode.append(profiler.time_decode(batch, context, grid))
            say(f"threads {t}: decode {batch} x {context} context: {decode[-1][1]:.1f} ms")
    for t in out:  # minutes after the sweep, past a burst of load that slowed some shapes
        set_threads(t)
        out[t] = profiler.second_look(grid, *out[t], _prefixed(say, f"threads {t}: "))
    return out


def _prefixed(say: Progress, prefix: str) -> Progress:
    return lambda line: say(prefix + line)


def profile_engine(
    engine: Any, grid: ProfileGrid, seed: int = 0, progress: Progress | None = None
) -> LatencyProfile:
    prefill, decode = EngineProfiler(engine, seed).run(grid, progress)
    return fit_profile(prefill, decode, tp=1, pp=1)


def build_engine(model: str | None, grid: ProfileGrid, dtype: str = "auto") -> Any:
    """An engine whose step budget holds the largest prefill batch and whose cache holds
    the largest decode batch."""
    from engine.config import CacheConfig, EngineConfig, SchedulerConfig
    from engine.llm_engine import LLMEngine

    block = 16
    budget = max(grid.max_batch_tokens, max(grid.decode_batches))
    blocks = max(  # per request: its prompt and every token it may decode, in whole blocks
        b * -(-(c + decode_max_tokens(b, c, grid.decode_steps, budget)) // block)
        for b, c in grid.decode_shapes()
    )
    config = EngineConfig(
        model=model,
        dtype=dtype,
        cache=CacheConfig(num_blocks=blocks + 16, enable_prefix_caching=False),
        scheduler=SchedulerConfig(max_num_batched_tokens=budget, max_num_seqs=512),
    )  # fmt: skip
    return LLMEngine.from_config(config)


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "profile",
        help="measure this engine's prefill/decode latency here; write a planner profile",
        description=(
            "Time prefill batches and decode steps of the engine on this machine (TP=1, "
            "PP=1), fit the planner's latency model (DistServe's form) by least squares on "
            "relative error, and write a profile file for `baton plan --profile`."
        ),
    )
    p.add_argument("--model", default=None, help="HF directory or .gguf (default: SmolLM2)")
    p.add_argument("--out", default="profile.json", help="default: %(default)s")
    p.add_argument(
        "--gpu", default=None, help="the name stored in the profile (default: the device)"
    )
    p.add_argument("--quick", action="store_true", help="a small grid, one repeat (a minute)")
    p.add_argument(
        "--threads",
        type=_thread_counts,
        default=None,
        metavar="N[,N...]",
        help="torch threads (default: torch's); several counts (e.g. 1,2) profile each and "
        "write a CPU profile (baton.cpu_profiles) for `baton plan` to choose threads and "
        "deployments on this host",
    )
    from cluster.cli import add_dtype_flag

    add_dtype_flag(p, "the engine's weights and KV cache (profile at the dtype you serve at)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=run_profile)


def _thread_counts(text: str) -> list[int]:
    """``N[,N...]`` as distinct positive thread counts, in the order given."""
    try:
        counts = [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"must be N[,N...] positive integers, got {text!r}"
        ) from None
    if not counts or any(c < 1 for c in counts) or len(set(counts)) != len(counts):
        raise argparse.ArgumentTypeError(f"must be distinct integers >= 1, got {text!r}")
    return counts


def run_profile(args: argparse.Namespace, out: TextIO | None = None) -> int:
    import torch

    out = out or sys.stdout
    threads = args.threads
    if isinstance(threads, int):  # a caller's namespace with one count
        threads = [threads]
    if threads is not None and any(t < 1 for t in threads):
        raise ValueError(f"threads: must be >= 1, got {threads}")
    grid = QUICK_GRID if args.quick else ProfileGrid()
    if threads is not None and len(threads) > 1:
        return _run_cpu_profile(args, threads, grid, out)
    if threads is not None:
        torch.set_num_threads(threads[0])
    engine = build_engine(args.model, grid, _dtype(args))
    device = engine.runner.caches[0].k.device
    gpu = args.gpu or (torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu")
    profile = profile_engine(
        engine, grid, args.seed, lambda line: print(f"profile: {line}", file=sys.stderr)
    )
    name = args.model or "SmolLM2-135M-Instruct"
    save_profiles(ProfileSet({(1, 1): profile}, model=name, gpu=gpu), args.out)
    a, b, c = profile.prefill
    print(f"prefill ms = {a:.3g} + {b:.3g}*sum(l) + {c:.3g}*sum(l^2)", file=out)
    for label, (a, b, c) in (("small", profile.decode_small), ("large", profile.decode_large)):
        print(f"decode ({label} batch) ms = {a:.3g} + {b:.3g}*sum(ctx) + {c:.3g}*batch", file=out)
    print(f"decode batch threshold: {profile.decode_threshold}; {_dtype_line(engine)}; "
          f"written to {args.out}", file=out)  # fmt: skip
    return 0


def _dtype(args: argparse.Namespace) -> str:
    """``--dtype``, validated here too for callers that build their own namespace."""
    from cluster.actors import check_dtype

    return check_dtype(getattr(args, "dtype", "auto"))


def _dtype_line(engine: Any) -> str:
    """The dtype the engine really runs (``auto`` resolved): serve at the same one."""
    return f"dtype {engine.kv_blocks.layout.dtype}"


def _run_cpu_profile(
    args: argparse.Namespace, threads: list[int], grid: ProfileGrid, out: TextIO
) -> int:
    """One engine profiled at each thread count in turn: a ``baton.cpu_profiles`` file."""
    import os

    import torch

    from cluster.planner.cpu_host import CpuProfiles, save_cpu_profiles

    engine = build_engine(args.model, grid, _dtype(args))
    samples = profile_threads(
        EngineProfiler(engine, args.seed),
        grid,
        threads,
        torch.set_num_threads,
        lambda line: print(f"profile: {line}", file=sys.stderr),
    )
    by_threads = {t: fit_profile(*samples[t], tp=1, pp=1) for t in samples}
    for t, prof in by_threads.items():
        (a, b, c), d = prof.prefill, prof.decode_small
        line = f"threads {t}: prefill ms = {a:.3g} + {b:.3g}*sum(l) + {c:.3g}*sum(l^2); "
        line += f"decode ms = {d[0]:.3g} + {d[1]:.3g}*sum(ctx) + {d[2]:.3g}*batch"
        print(line, file=out)
    cores = os.cpu_count() or 1
    name = args.model or "SmolLM2-135M-Instruct"
    dtype = str(engine.kv_blocks.layout.dtype)
    save_cpu_profiles(CpuProfiles(cores, by_threads, name, dtype), args.out)
    print(
        f"CPU profile of {cores} cores, threads {sorted(threads)}, {_dtype_line(engine)}: "
        f"written to {args.out}",
        file=out,
    )
    return 0
