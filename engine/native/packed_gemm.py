"""fp32 GEMM against weights packed once for MKL (``cblas_sgemm_pack``), on CPU.

``F.linear`` hands MKL the plain ``[O, I]`` weight, and MKL copies it into its blocked
layout on every call: at this model's shapes that copy is a tenth to a fifth of a
prefill GEMM's time. ``torch.ops.mkl._mkl_reorder_linear_weight`` runs the copy once
(what inductor does for fp32 linears under ``freezing``); ``torch.ops.mkl._mkl_linear``
then computes from the packed buffer.

The product is the one MKL computes for ``F.linear`` (the same kernels): measured bit for
bit equal at every row count from ``MIN_ROWS`` to 513 for this model's q/k/v, o, gate/up
and LM head shapes (576 inputs); for down (1536 inputs) ``F.linear`` splits the sum
another way at 57..129 rows, so the two differ there in the last bit (2e-7). Greedy
parity with transformers is checked with this path on (tests/engine/test_parity.py).
Below ``MIN_ROWS``, ``F.linear`` takes another route whose rounding differs in the last
bit, so few-row inputs stay on it (or on the native GEMV, see
``engine.native.small_linear``). The packed buffer does not depend on the row count it
was packed for (packs for 5 to 1000 rows give the same products), so one pack serves
every step.

Memory: one packed copy per weight, about the weight's own size; the plain weight stays
(the few-row paths and the tied embedding read it).
"""

from __future__ import annotations

from functools import cache

import torch
import torch.nn.functional as F

# Rows from which the packed product is used (below: F.linear, whose rounding differs).
MIN_ROWS = 16
# The row count handed to the packing routine; any works (see above).
PACK_ROWS = 256


@cache
def available() -> bool:
    """Whether this torch has MKL's packed GEMM and it reproduces ``F.linear`` here."""
    if not torch.backends.mkl.is_available():
        return False
    try:
        gen = torch.Generator().manual_seed(0)
        w = torch.randn(48, 40, generator=gen)
        x = torch.randn(MIN_ROWS + 3, 40, generator=gen)
        packed = pack(w)
        return bool(torch.equal(linear(x, packed, w, None), F.linear(x, w)))
    except (AttributeError, RuntimeError):
        return False


def pack(weight: torch.Tensor) -> torch.Tensor:
    """MKL's packed copy of ``weight`` [O, I] (fp32, CPU); keep ``weight`` alive beside it."""
    return torch.ops.mkl._mkl_reorder_linear_weight(weight.detach().contiguous(), PACK_ROWS)


def linear(
    x: torch.Tensor, packed: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` for a 2-D ``x`` [T, I] from ``pack(weight)``."""
    # The last argument is the row count the pack is used for; passing T keeps torch from
    # falling back to F.linear when T differs from PACK_ROWS.
    return torch.ops.mkl._mkl_linear(x.contiguous(), packed, weight, bias, x.shape[0])
