"""The peers bench's concurrency burst on one engine in this process, with no server
(``baton bench burst-replay``): how long the engine alone takes for the requests a served
burst sends, step kind by step kind, and, with ``--neighbour``, how much of that a small
busy process beside it costs.

``--prompts`` random prompts of ``--input-len`` tokens, ``--output-len`` tokens each
(greedy, ignore_eos), at most ``--max-concurrency`` in flight: a request joins at the first
step after one finishes, as ``vllm bench serve --max-concurrency`` sends them. The engine
runs with ``--threads`` torch threads and a step budget of ``--budget`` tokens (Baton's
colocated instance on two cores by default). Set beside the same burst served
(``baton bench peers --systems baton --deployments colocated1 --rates ''``), the
difference is what serving it costs the engine.

``--neighbour BUSY/PERIOD`` (milliseconds) runs a process beside the engine that spins for
BUSY of every PERIOD (2/20: a tenth of one core), as the router, Ray and the client are
beside a served instance; its CPU seconds are printed beside the engine's time. On a host
whose every core runs one of the engine's OpenMP threads, each of its wake-ups leaves one
thread waiting at a parallel region's end for the one that lost its core.
``--neighbour-per-step MS`` instead spins MS ms after each engine step, as the router and
the client handle a step's token events while the instance starts its next step.

Usage: ``python -m bench.burst_replay --dtype float32 [--neighbour 2/20]`` (defaults: the
peers bench's burst, 64 prompts of 256 tokens, 64 out, 32 in flight).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from bench.chunk_replay import Step, recording

# The neighbour: spin for busy seconds of every period, until killed.
_NEIGHBOUR = """
import sys, time
busy, period = float(sys.argv[1]) / 1e3, float(sys.argv[2]) / 1e3
print("ready", flush=True)
while True:
    start = time.perf_counter()
    while time.perf_counter() - start < busy:
        pass
    time.sleep(max(0.0, period - busy))
"""
# The per-step neighbour: spin for busy seconds per byte read from the pipe (fd argv[2]).
_PER_STEP = """
import os, sys, time
busy, fd = float(sys.argv[1]) / 1e3, int(sys.argv[2])
print("ready", flush=True)
while os.read(fd, 1):
    start = time.perf_counter()
    while time.perf_counter() - start < busy:
        pass
"""


@dataclass
class StepKind:
    steps: int = 0
    seconds: float = 0.0
    prompt_tokens: int = 0
    decode_rows: int = 0


@dataclass
class Burst:
    requests: int
    max_in_flight: int  # the most requests the engine held at once
    wall_s: float
    output_tokens: int
    busy_s: float  # the engine's steps, summed
    kinds: dict[str, StepKind]  # "prefill", "mixed", "decode"
    neighbour_cpu_s: float | None = None

    @property
    def output_tok_s(self) -> float:
        return self.output_tokens / self.wall_s


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="baton bench burst-replay",
                                description=__doc__.split("\n\n")[0].replace("\n", " "))
    p.add_argument("--prompts", type=int, default=64)
    p.add_argument("--max-concurrency", type=int, default=32)
    p.add_argument("--input-len", type=int, default=256)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--threads", type=int, default=2, help="the engine's torch threads")
    p.add_argument("--budget", type=int, default=2048,
                   help="the step token budget (max_num_batched_tokens)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--model", default=None, help="GGUF file or HF directory (default: SmolLM2)")
    p.add_argument("--seed", type=int, default=5)
    p.add_argument("--neighbour", default=None, metavar="BUSY/PERIOD",
                   help="a process beside the engine spinning BUSY ms of every PERIOD ms")
    p.add_argument("--neighbour-per-step", type=float, default=None, metavar="MS",
                   help="a process beside the engine spinning MS ms after each step")
    p.add_argument("--json-out", type=Path, default=None)
    return p


def neighbour_duty(text: str) -> tuple[float, float]:
    """``"2/20"`` -> (2.0, 20.0): milliseconds busy of every period."""
    try:
        busy, period = (float(v) for v in text.split("/"))
    except ValueError:
        raise ValueError(
            f"neighbour: expected BUSY/PERIOD in ms, e.g. 2/20, got {text!r}"
        ) from None
    if not 0 < busy < period:
        raise ValueError(f"neighbour: need 0 < BUSY < PERIOD, got {text!r}")
    return busy, period


def _cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@contextlib.contextmanager
def neighbour(duty: tuple[float, float] | None) -> Iterator[list[float]]:
    """A spinning process for the block's length (none for None), started before the block
    runs; the yielded list gets its CPU seconds (its start included) when the block ends.
    The process is killed however the block ends."""
    if duty is None:
        yield []
        return
    with _spinner([_NEIGHBOUR, *(f"{v:g}" for v in duty)]) as taken:
        yield taken


@contextlib.contextmanager
def per_step_neighbour(engine: Any, ms: float | None) -> Iterator[list[float]]:
    """Within the block, a process spins ``ms`` ms after each of ``engine``'s steps (none for
    None); the yielded list gets its CPU seconds when the block ends."""
    if ms is None:
        yield []
        return
    read, write = os.pipe()
    try:
        with _spinner([_PER_STEP, f"{ms:g}", str(read)], pass_fds=(read,)) as taken:
            step = engine.step

            def stepped() -> Any:
                out = step()
                os.write(write, b"s")
                return out

            engine.step = stepped
            try:
                yield taken
            finally:
                del engine.step
    finally:
        os.close(read)
        os.close(write)


@contextlib.contextmanager
def _spinner(args: list[str], pass_fds: tuple[int, ...] = ()) -> Iterator[list[float]]:
    """``python -c *args``, once it says it is ready; its CPU seconds are appended to the
    yielded list when the block ends, and it is killed however the block ends."""
    taken: list[float] = []
    proc = subprocess.Popen([sys.executable, "-c", *args], stdout=subprocess.PIPE, text=True,
                            pass_fds=pass_fds)  # fmt: skip
    try:
        assert proc.stdout is not None
        if proc.stdout.readline().strip() != "ready":
            raise RuntimeError("neighbour: the spinning process did not start")
        yield taken
        taken.append(_cpu_seconds(proc.pid))
    finally:
        proc.kill()
        proc.wait()


def burst(llm: Any, prompts: list[list[int]], output_len: int,
          max_in_flight: int) -> tuple[Burst, list[Step]]:
    """Run every prompt through ``llm``'s engine, at most ``max_in_flight`` at once."""
    from engine import SamplingParams

    engine = llm.engine
    params = SamplingParams(max_tokens=output_len, temperature=0.0, ignore_eos=True)
    nxt = in_flight = most = done = tokens = 0
    with recording(engine.runner) as steps:
        start = time.perf_counter()
        while done < len(prompts):
            while in_flight < max_in_flight and nxt < len(prompts):
                engine.add_request(f"burst-{nxt}", params=params, prompt_token_ids=prompts[nxt])
                nxt, in_flight = nxt + 1, in_flight + 1
            most = max(most, in_flight)
            for out in engine.step():
                if out.finished:
                    done, in_flight, tokens = done + 1, in_flight - 1, tokens + len(out.token_ids)
        wall = time.perf_counter() - start
    kinds = {name: StepKind() for name in ("prefill", "mixed", "decode")}
    for s in steps:
        kind = kinds["mixed" if s.prefill_tokens and s.decodes
                     else "prefill" if s.prefill_tokens else "decode"]  # fmt: skip
        kind.steps += 1
        kind.seconds += s.ms / 1e3
        kind.prompt_tokens += s.prefill_tokens
        kind.decode_rows += s.decodes
    return Burst(len(prompts), most, wall, tokens, sum(s.ms for s in steps) / 1e3, kinds), steps


def format_report(b: Burst, args: argparse.Namespace) -> str:
    lines = [
        f"{b.requests} requests of {args.input_len} prompt tokens, {args.output_len} out, at "
        f"most {b.max_in_flight} in flight ({args.dtype}, threads {args.threads}, budget "
        f"{args.budget}): {b.wall_s:.1f} s, {b.output_tok_s:.1f} output tok/s; steps "
        f"{b.busy_s:.1f} s",
    ]
    if b.neighbour_cpu_s is not None:
        what = [f"{args.neighbour} ms busy/period"] if args.neighbour else []
        if args.neighbour_per_step is not None:
            what.append(f"{args.neighbour_per_step:g} ms after each step")
        lines.append(f"neighbour ({'; '.join(what)}) took {b.neighbour_cpu_s:.1f} CPU-s")
    lines += ["", "| steps | count | seconds | prompt tokens | decode rows | ms per step |",
              "|---|---:|---:|---:|---:|---:|"]  # fmt: skip
    for name, k in b.kinds.items():
        per = f"{1e3 * k.seconds / k.steps:.0f}" if k.steps else "-"
        lines.append(f"| {name} | {k.steps} | {k.seconds:.1f} | {k.prompt_tokens} | "
                     f"{k.decode_rows} | {per} |")  # fmt: skip
    return "\n".join(lines)


def run(args: argparse.Namespace, duty: tuple[float, float] | None = None) -> Burst:
    """The burst of ``args``, beside the periodic neighbour ``duty`` (``neighbour_duty``'s
    reading of ``--neighbour``; None: none) and ``--neighbour-per-step``'s."""
    from bench.chunk_replay import _ordinary
    from bench.engine_throughput import make_prompts, resolve_model_path
    from engine import LLM, SamplingParams

    torch.set_num_threads(args.threads)
    llm = LLM(model=resolve_model_path(args.model), dtype=args.dtype,
              max_num_batched_tokens=args.budget)  # fmt: skip
    prompts = make_prompts(args.prompts, args.input_len, args.input_len,
                           llm.tokenizer.vocab_size, args.seed,
                           functools.partial(_ordinary, llm.tokenizer))  # fmt: skip
    llm.generate(prompt_token_ids=[prompts[0][:16]],  # warm-up: kernels, packed weights
                 params=SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True))
    llm.engine.block_manager.reset_prefix_cache()  # prompt 0 prefills whole
    with (neighbour(duty) as taken,
          per_step_neighbour(llm.engine, args.neighbour_per_step) as taken_per_step):
        result, _ = burst(llm, prompts, args.output_len, args.max_concurrency)
    if taken or taken_per_step:
        result.neighbour_cpu_s = sum(taken + taken_per_step)
    return result


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    for name in ("prompts", "max_concurrency", "input_len", "output_len", "threads", "budget"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')}: must be >= 1")
    if args.neighbour_per_step is not None and not args.neighbour_per_step > 0:
        parser.error("--neighbour-per-step: must be > 0 ms")
    duty = None
    if args.neighbour is not None:
        try:
            duty = neighbour_duty(args.neighbour)
        except ValueError as e:
            parser.error(f"--{e}")
    result = run(args, duty)
    print(format_report(result, args))
    if args.json_out is not None:
        out = {**asdict(result), "output_tok_s": result.output_tok_s,
               "config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}}
        args.json_out.write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
