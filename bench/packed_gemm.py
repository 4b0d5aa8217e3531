"""F.linear against fp32 GEMMs on a weight packed once (engine.native.packed_gemm): MKL's
pack and oneDNN's, whichever this torch has, at the model's own GEMM shapes, the variants
alternating call by call so a loaded machine weighs on all alike. Prints the median time
of each, each pack's ratio to F.linear and the largest difference between its product and
F.linear's. ``packed_gemm.fp32_kind`` chose between the two packs from such runs.

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
    packs = {}
    if packed_gemm.available():
        packs["MKL"] = (packed_gemm.pack,
                        lambda x, pk, w: packed_gemm.linear(x, pk, w, None))
    if packed_gemm.onednn_fp32_available():
        packs["oneDNN"] = (packed_gemm.pack_onednn,
                           lambda x, pk, w: packed_gemm.linear_onednn(x, pk, None))
    if not packs:
        print("no packed fp32 GEMM here (torch without MKL or oneDNN)", file=sys.stderr)
        return 1
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    names = list(packs)
    print("| GEMM | rows | F.linear (us) | "
          + " | ".join(f"{n} (us) | {n} / F.linear | {n} max abs diff" for n in names) + " |")
    print("|---|---:|---:|" + "---:|---:|---:|" * len(names))
    gen = torch.Generator().manual_seed(0)
    for name, o, i in shapes:
        w = torch.randn(o, i, generator=gen) * 0.02
        packed = {n: pack(w) for n, (pack, _) in packs.items()}
        for m in rows:
            x = torch.randn(m, i, generator=gen)
            want = F.linear(x, w)
            diff = {n: float((run(x, packed[n], w) - want).abs().max())
                    for n, (_, run) in packs.items()}
            times: dict[str, list[float]] = {n: [] for n in ["F.linear", *names]}
            for _ in range(args.repeats):
                start = time.perf_counter()
                F.linear(x, w)
                times["F.linear"].append(time.perf_counter() - start)
                for n, (_, run) in packs.items():
                    start = time.perf_counter()
                    run(x, packed[n], w)
                    times[n].append(time.perf_counter() - start)
            med = {n: statistics.median(t) for n, t in times.items()}
            cells = [f"{med[n] * 1e6:.0f} | {med[n] / med['F.linear']:.2f} | {diff[n]:.1e}"
                     for n in names]
            print(f"| {name} | {m} | {med['F.linear'] * 1e6:.0f} | " + " | ".join(cells) + " |",
                  flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
