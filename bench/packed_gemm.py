"""F.linear against MKL on a weight packed once (engine.native.packed_gemm), at the model's
own GEMM shapes, the variants alternating call by call so a loaded machine weighs on both
alike. Prints the median time of each and the ratio, and the largest difference between
the two products.

Usage: ``python -m bench.packed_gemm [--rows 16,32,256,512] [--repeats 40]``; the default
shapes are SmolLM2-135M's (hidden 576, 9 + 2 x 3 heads of 64, intermediate 1536, vocab
49152); ``--shapes name=OUTxIN,...`` for another model.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from engine.native import packed_gemm

SMOLLM2 = "qkv=960x576,o=576x576,gate_up=3072x576,down=576x1536,lm_head=49152x576"


def parse_shapes(text: str) -> list[tuple[str, int, int]]:
    out = []
    for item in text.split(","):
        name, _, dims = item.partition("=")
        o, _, i = dims.partition("x")
        out.append((name.strip(), int(o), int(i)))
    return out


def shapes_and_rows(p: argparse.ArgumentParser,
                    args: argparse.Namespace) -> tuple[list[tuple[str, int, int]], list[int]]:
    """``--shapes`` and ``--rows`` parsed, or ``p``'s usage error (exit 2)."""
    try:
        return parse_shapes(args.shapes), [int(r) for r in args.rows.split(",")]
    except ValueError:
        p.error("--shapes/--rows: expected name=OUTxIN,... and comma-separated ints")


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.packed_gemm", description=__doc__)
    p.add_argument("--shapes", default=SMOLLM2, help="name=OUTxIN,... (default: SmolLM2)")
    p.add_argument("--rows", default="16,32,256,512", help="comma-separated row counts")
    p.add_argument("--repeats", type=int, default=40, help="timed calls of each variant")
    args = p.parse_args(argv)
    shapes, rows = shapes_and_rows(p, args)
    if not packed_gemm.available():
        print("packed GEMM unavailable here (torch without MKL)", file=sys.stderr)
        return 1
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print("| GEMM | rows | F.linear (us) | packed (us) | packed / F.linear | max abs diff |")
    print("|---|---:|---:|---:|---:|---:|")
    gen = torch.Generator().manual_seed(0)
    for name, o, i in shapes:
        w = torch.randn(o, i, generator=gen) * 0.02
        packed = packed_gemm.pack(w)
        for m in rows:
            x = torch.randn(m, i, generator=gen)
            diff = (packed_gemm.linear(x, packed, w, None) - F.linear(x, w)).abs().max()
            times: dict[str, list[float]] = {"plain": [], "packed": []}
            for _ in range(args.repeats):
                start = time.perf_counter()
                F.linear(x, w)
                times["plain"].append(time.perf_counter() - start)
                start = time.perf_counter()
                packed_gemm.linear(x, packed, w, None)
                times["packed"].append(time.perf_counter() - start)
            a, b = statistics.median(times["plain"]), statistics.median(times["packed"])
            print(f"| {name} | {m} | {a * 1e6:.0f} | {b * 1e6:.0f} | {b / a:.2f} | "
                  f"{float(diff):.1e} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
