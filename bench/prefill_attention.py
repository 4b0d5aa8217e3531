"""A prefill chunk's causal attention: the native kernel (``native.prefill_attention``,
what the torch backend calls where ``native.prefill_attention_takes``) against torch's SDPA
(what it calls otherwise), per dtype and chunk length, the two alternating call by call so
a loaded machine weighs on both alike. Prints each one's median milliseconds and GFLOP/s
(the causal work: 2 x S x S x D multiply-adds a head, half of the full square for Q x K^T
and for P x V), the native kernel's time over SDPA's, and its largest difference from
SDPA's result.

q, k and v are strided inside one fused qkv row, as the model hands them over.

Usage: ``python -m bench.prefill_attention [--dtypes float32,bfloat16]
[--lengths 256,512,1024,2048] [--repeats 10] [--threads N]``; the default heads are
SmolLM2-135M's (9 query heads, 3 kv heads, 64 each).
"""

from __future__ import annotations

import argparse
import ctypes
import statistics
import sys
import time
from collections.abc import Sequence

import torch

from bench.attention_args import add_common, check_common, int_list
from engine import native
from engine.attention.torch_paged import TorchPagedAttention


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.prefill_attention", description=__doc__)
    p.add_argument("--lengths", default="256,512,1024,2048",
                   help="comma-separated chunk lengths (tokens; no earlier context)")
    add_common(p, repeats_help="timed calls of each (median kept)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    lengths = int_list(p, "--lengths", args.lengths)
    dtypes = check_common(p, args)
    lib = native.load()
    missing = [str(d) for d in dtypes
               if lib is None or not native.prefill_attention_takes(d, args.head_dim)]
    if lib is None or missing:
        print(f"no native prefill attention here for {', '.join(missing)} at head size "
              f"{args.head_dim}", file=sys.stderr)
        return 1
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; {args.heads} heads "
          f"({args.kv_heads} kv) of {args.head_dim}")
    print("| dtype | tokens | SDPA (ms) | native (ms) | SDPA GFLOP/s | native GFLOP/s | "
          "native / SDPA | max abs diff |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    backend = TorchPagedAttention(args.head_dim)  # no kernel: SDPA
    for dtype in dtypes:
        for n in lengths:
            t_sdpa, t_native, diff = time_chunk(lib, backend, dtype, n, args)
            flops = 2 * args.heads * n * n * args.head_dim  # causal: half of 4 S^2 D a head
            name = str(dtype).removeprefix("torch.")
            print(f"| {name} | {n} | {t_sdpa * 1e3:.3f} | {t_native * 1e3:.3f} | "
                  f"{flops / t_sdpa / 1e9:.0f} | {flops / t_native / 1e9:.0f} | "
                  f"{t_native / t_sdpa:.2f} | {diff:.1e} |", flush=True)
    return 0


def time_chunk(lib: ctypes.CDLL, backend: TorchPagedAttention, dtype: torch.dtype, n: int,
               args: argparse.Namespace) -> tuple[float, float, float]:
    """Median seconds of SDPA and of the kernel on an ``n``-token chunk, and the largest
    difference between their results."""
    h, hkv, d = args.heads, args.kv_heads, args.head_dim
    gen = torch.Generator().manual_seed(n)
    qkv = torch.randn(n, (h + 2 * hkv) * d, generator=gen).to(dtype)
    q, k, v = qkv.view(n, -1, d).split([h, hkv, hkv], dim=1)
    out = torch.empty(n, h, d, dtype=dtype)

    def sdpa() -> torch.Tensor:  # the torch backend's own call
        return backend._sdpa(q.transpose(0, 1).unsqueeze(0), k.transpose(0, 1).unsqueeze(0),
                             v.transpose(0, 1).unsqueeze(0), None, causal=True)[0].transpose(0, 1)

    def kernel() -> torch.Tensor:
        native.prefill_attention(lib, q, k, v, out, backend.scale)
        return out

    diff = float((kernel().float() - sdpa().float()).abs().max())  # also the warm-up
    times: dict[str, list[float]] = {"sdpa": [], "native": []}
    for _ in range(args.repeats):
        for name, fn in (("sdpa", sdpa), ("native", kernel)):
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return statistics.median(times["sdpa"]), statistics.median(times["native"]), diff


if __name__ == "__main__":
    sys.exit(main())
