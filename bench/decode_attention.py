"""The native paged decode attention of a whole decode step against a plain read of the
same KV caches: its memory roofline, since a step's contexts times its layers are far
past the CPU's caches and every key and value row is read once.

Per dtype and batch: ``--layers`` layers' caches (``[Hkv, N, bs, D]`` each, as the torch
backend lays them out), every request's blocks scattered over the cache as a long-running
server leaves them, each request ``--context`` tokens long; one timed step is
``native.paged_decode`` over every layer, one timed read is ``native.read_buffers`` over
the same caches (every byte once, on the same threads). The two alternate step by step
so a loaded machine weighs on both alike; best of ``--repeats`` (a step's time with the
memory at its quietest). Prints each one's milliseconds, the attention's GB/s of cache and
its time over the read's.

Usage: ``python -m bench.decode_attention [--dtypes float32,bfloat16] [--batches 1,16,64]
[--context 330] [--layers 30] [--repeats 10] [--threads N]``; the default heads are
SmolLM2-135M's (9 query heads, 3 kv heads, 64 each; ``--heads``, ``--kv-heads``,
``--head-dim`` for another model).
"""

from __future__ import annotations

import argparse
import ctypes
import sys
import time
from collections.abc import Sequence

import torch

from bench.attention_args import add_common, check_common, int_list
from engine import native


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.decode_attention", description=__doc__)
    p.add_argument("--batches", default="1,16,64", help="comma-separated decode batch sizes")
    p.add_argument("--context", type=int, default=330, help="tokens in each request's cache")
    p.add_argument("--layers", type=int, default=30, help="layers' caches per step")
    p.add_argument("--block-size", type=int, default=16)
    add_common(p, repeats_help="timed steps of each (best kept)")
    return p


def parse(p: argparse.ArgumentParser,
          argv: Sequence[str] | None) -> tuple[argparse.Namespace, list[torch.dtype], list[int]]:
    """The arguments, the dtypes and the batches, or ``p``'s usage error (exit 2)."""
    args = p.parse_args(argv)
    batches = int_list(p, "--batches", args.batches)
    dtypes = check_common(p, args, {"--context": args.context, "--layers": args.layers,
                                    "--block-size": args.block_size})
    return args, dtypes, batches


def main(argv: Sequence[str] | None = None) -> int:
    args, dtypes, batches = parse(build_parser(), argv)
    lib = native.load()
    if lib is None or not all(native.supports(d) for d in dtypes):
        print("needs the native decode attention kernels (engine/native)", file=sys.stderr)
        return 1
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; {args.layers} "
          f"layers, {args.heads} heads ({args.kv_heads} kv) of {args.head_dim}, "
          f"{args.context}-token contexts, blocks of {args.block_size}")
    print("| dtype | batch | cache (MB) | attention (ms) | read (ms) | attention GB/s | "
          "/ read |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for dtype in dtypes:
        for batch in batches:
            attend, read, nbytes = time_step(lib, dtype, batch, args)
            name = str(dtype).removeprefix("torch.")
            print(f"| {name} | {batch} | {nbytes / 1e6:.1f} | {attend * 1e3:.3f} | "
                  f"{read * 1e3:.3f} | {nbytes / attend / 1e9:.1f} | {attend / read:.2f} |",
                  flush=True)
    return 0


def time_step(lib: ctypes.CDLL, dtype: torch.dtype, batch: int,
              args: argparse.Namespace) -> tuple[float, float, int]:
    """Best seconds of one step's attention and of one read of its caches, and the caches'
    bytes."""
    gen = torch.Generator().manual_seed(batch)
    bs, d, hkv = args.block_size, args.head_dim, args.kv_heads
    width = -(-args.context // bs)  # blocks per request
    blocks = batch * width
    caches = [(torch.randn(hkv, blocks, bs, d, generator=gen).to(dtype),
               torch.randn(hkv, blocks, bs, d, generator=gen).to(dtype))
              for _ in range(args.layers)]
    tables = torch.randperm(blocks, generator=gen).view(batch, width).contiguous()
    lens = torch.full((batch,), args.context, dtype=torch.int64)
    queries = [torch.randn(batch, args.heads, d, generator=gen).to(dtype)
               for _ in range(args.layers)]
    scratch = torch.empty(native.scratch_size(batch, args.heads, hkv, d, args.context, dtype))
    scale = d ** -0.5
    flat = [t for kv in caches for t in kv]
    nbytes = sum(t.numel() * t.element_size() for t in flat)

    def step() -> None:
        for q, (kc, vc) in zip(queries, caches, strict=True):
            native.paged_decode(lib, q, kc, vc, tables, lens, scratch, args.context, scale)

    step()  # first touch of the scratch and the caches' pages
    attend, read = [], []
    for _ in range(args.repeats):
        start = time.perf_counter()
        step()
        attend.append(time.perf_counter() - start)
        start = time.perf_counter()
        native.read_buffers(lib, flat)
        read.append(time.perf_counter() - start)
    return min(attend), min(read), nbytes


if __name__ == "__main__":
    sys.exit(main())
