"""A decode step's GEMMs, kernel by kernel: the plain GEMV (``native.small_linear``),
oneDNN on a weight packed once (``packed_gemm.linear_onednn``) and the tile-layout kernel
this CPU has (bf16: ``native.tile_linear``, AMX, else AVX-512 BF16's ``vnni_linear``;
fp32, ``--dtype float32``: ``native.fp32_tile_linear``, AVX-512 or AVX2), each over every layer's
own weights and the LM head, so nothing stays in the caches from one layer to the next (a
decode step reads them all once). The variants alternate step by step so a loaded machine
weighs on all alike.

Prints, per row count, each kernel's median time for the whole step's GEMMs, the weight
bytes per second and GFLOP/s that makes, its time over the plain GEMV's, and its largest
difference from the fp32 product (relative to that product's largest magnitude).

Usage: ``python -m bench.decode_gemm [--dtype bfloat16|float32] [--rows 1,4,8,16]
[--layers 30] [--repeats 9] [--threads N]``; the default shapes are SmolLM2-135M's
(``bench.packed_gemm.SMOLLM2``).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from bench.packed_gemm import SMOLLM2, shapes_and_rows
from engine import native
from engine.native import packed_gemm

DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}
Kernel = Callable[[torch.Tensor, int], torch.Tensor]  # (x, weight index) -> y


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.decode_gemm", description=__doc__)
    p.add_argument("--shapes", default=SMOLLM2,
                   help="name=OUTxIN,... per layer; one named lm_head runs once (default: "
                        "SmolLM2)")  # fmt: skip
    p.add_argument("--rows", default="1,4,8,16", help="comma-separated row counts")
    p.add_argument("--layers", type=int, default=30, help="distinct copies of the layer")
    p.add_argument("--repeats", type=int, default=9, help="timed steps of each kernel")
    p.add_argument("--threads", type=int, default=None, help="torch/OpenMP threads")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16",
                   help="the weights' and inputs' dtype (default: bfloat16)")
    args = p.parse_args(argv)
    dtype = DTYPES[args.dtype]
    shapes, rows = shapes_and_rows(p, args)
    if args.layers < 1 or args.repeats < 1 or min(rows) < 1:
        p.error("--layers, --repeats and every --rows value must be >= 1")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    lib = native.load()
    onednn = (packed_gemm.bf16_available() if dtype == torch.bfloat16
              else packed_gemm.onednn_fp32_available())
    if lib is None or not native.supports(dtype) or not onednn:
        print(f"needs the native {args.dtype} kernels and oneDNN's packed {args.dtype} GEMM",
              file=sys.stderr)
        return 1

    gen = torch.Generator().manual_seed(0)
    layer = [s for s in shapes if s[0] != "lm_head"]
    per_step = layer * args.layers + [s for s in shapes if s[0] == "lm_head"]
    weights = [(torch.randn(o, i, generator=gen) * 0.05).to(dtype) for _, o, i in per_step]
    packed = [packed_gemm.pack_onednn(w) for w in weights]
    nbytes = sum(w.numel() * w.element_size() for w in weights)

    kernels: dict[str, tuple[Kernel, int]] = {  # name -> (kernel, most rows it takes)
        "GEMV": (lambda x, k: native.small_linear(lib, x, weights[k], None), 1 << 30),
        "oneDNN": (lambda x, k: packed_gemm.linear_onednn(x, packed[k], None), 1 << 30),
    }
    tiles: list[torch.Tensor] = []
    if dtype == torch.bfloat16:
        if native.tile_linear_max_rows() and all(native.amx_packable(w) for w in weights):
            tiles = [native.amx_pack(lib, w) for w in weights]
            kernels["AMX" if native.amx_available() else "vnni"] = (
                lambda x, k: native.tile_linear(lib, x, tiles[k], None, weights[k].shape[0]),
                native.tile_linear_max_rows())
    elif native.fp32_tile_max_rows() and all(native.fp32_tile_packable(w) for w in weights):
        tiles = [native.fp32_tile_pack(lib, w) for w in weights]
        kernels["fp32 tile"] = (
            lambda x, k: native.fp32_tile_linear(lib, x, tiles[k], None, weights[k].shape[0]),
            native.fp32_tile_max_rows())

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"{len(weights)} weights, {nbytes / 1e6:.0f} MB of {args.dtype} per step")
    print("| rows | kernel | step (ms) | weight GB/s | GFLOP/s | / GEMV | max rel. diff |")
    print("|---:|---|---:|---:|---:|---:|---:|")
    for m in rows:
        inputs = {i: torch.randn(m, i, generator=gen).to(dtype) for _, _, i in per_step}
        run = {name: fn for name, (fn, most) in kernels.items() if m <= most}
        diffs = {name: _max_rel_diff(fn, inputs, weights[: len(layer)])
                 for name, fn in run.items()}
        times: dict[str, list[float]] = {name: [] for name in run}
        for _ in range(args.repeats):
            for name, fn in run.items():
                start = time.perf_counter()
                for k, w in enumerate(weights):
                    fn(inputs[w.shape[1]], k)
                times[name].append(time.perf_counter() - start)
        base = statistics.median(times["GEMV"])
        for name in run:
            t = statistics.median(times[name])
            flops = 2 * m * nbytes / dtype.itemsize  # two per weight per row
            print(f"| {m} | {name} | {t * 1e3:.2f} | {nbytes / t / 1e9:.1f} | "
                  f"{flops / t / 1e9:.0f} | {t / base:.2f} | {diffs[name]:.1e} |", flush=True)
    return 0


def _max_rel_diff(fn: Kernel, inputs: dict[int, torch.Tensor],
                  weights: list[torch.Tensor]) -> float:
    """The largest difference from the fp32 product over ``weights`` (the first layer's,
    the kernel's weight index k being each one's place), over that product's largest
    magnitude."""
    worst = 0.0
    for k, w in enumerate(weights):
        x = inputs[w.shape[1]]
        ref = F.linear(x.float(), w.float())
        worst = max(worst, float((fn(x, k).float() - ref).abs().max() / ref.abs().max()))
    return worst

if __name__ == "__main__":
    sys.exit(main())
