"""GEMMs against weights packed once, on CPU: fp32 with MKL (``cblas_sgemm_pack``) where
it pays, else with oneDNN; bf16 with oneDNN (AMX or AVX-512 BF16, whichever the CPU has).

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

fp32 on AMD: MKL's packed path does not pay there (``fp32_pays``), and oneDNN's own fp32
pack (``torch.ops.mkldnn._reorder_linear_weight`` on an fp32 weight, the same op as
bf16's below) ran SmolLM2's shapes in 0.69-0.98x ``F.linear``'s time on the layers and
0.40-0.89x on the LM head, at 5 to 2048 rows (AMD EPYC, Zen 4, two threads, 2026-12-07,
``python -m bench.packed_gemm``, which times both packs). Its products sum in another
order than MKL's, so they match ``F.linear`` to fp32 rounding (2e-6 at these shapes), not
bit for bit; greedy parity with transformers holds on it (tests/engine/test_parity.py
runs it on such a CPU). ``fp32_kind`` chooses between the two.

bf16: ``F.linear`` on bf16 CPU tensors reorders the weight into oneDNN's blocked layout on
every call too, which at a decode step's few rows costs more than the product (a GEMV
streams the weight at half the machine's bandwidth, packed at all of it: measured 2.2 ms
against 4.4 ms for the 49152 x 576 LM head at one row). ``torch.ops.mkldnn.
_reorder_linear_weight`` packs once (inductor's bf16 freezing path) and
``_linear_pointwise`` computes from the pack, at every row count. The products are
oneDNN's own; they equal ``F.linear``'s up to 16 rows and differ in the last bf16 bit at
some larger ones (another blocking of the sum), which a bf16 model does not promise
anyway: bf16 is checked against transformers in bf16 with a tolerance, not bit for bit.
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


MKL, ONEDNN = "mkl", "onednn"


def fp32_kind() -> str | None:
    """The packed GEMM fp32 weights take here: ``MKL`` where it pays and reproduces
    ``F.linear`` (``fp32_pays``, ``available``), else ``ONEDNN`` where oneDNN packs fp32
    weights and computes in fp32 (``onednn_fp32_available``), else None (``F.linear``)."""
    if fp32_pays() and available():
        return MKL
    return ONEDNN if onednn_fp32_available() else None


@cache
def fp32_pays() -> bool:
    """Whether fp32 GEMMs should take MKL's packed path on this CPU. On an Intel Xeon
    (2026-12-05) it ran 0.64-0.93x ``F.linear``'s time at 64-256 rows of the model's
    shapes. On an AMD EPYC (Zen 4, 2026-12-06) it ran 1.00-1.26x at 16-512 rows (gate/up
    at 16 rows the worst), the LM head alone gaining (0.96-0.99x), and in two engine runs
    steps with it on took 1.16-1.17x the time with it off at decode batch 16, 1.02-1.10x
    at 64, 0.98-1.09x for a 512-token prefill. MKL is Intel's library; other AMD CPUs are
    taken to be alike (not measured), and any other vendor keeps the packed path. ``python
    -m bench.packed_gemm`` measures a CPU."""
    return cpu_vendor() != "AuthenticAMD"


def cpu_vendor(cpuinfo: str = "/proc/cpuinfo") -> str | None:
    """The CPU's vendor string ("GenuineIntel", "AuthenticAMD"), None where unknown."""
    try:
        with open(cpuinfo, encoding="utf-8", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "vendor_id":
                    return value.strip() or None
    except OSError:
        return None
    return None


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


def _onednn_matches(dtype: torch.dtype, tol: float) -> bool:
    """Whether this torch packs ``dtype`` weights for oneDNN and computes from the pack
    within ``tol`` of ``F.linear``."""
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        gen = torch.Generator().manual_seed(0)
        w = torch.randn(48, 40, generator=gen).to(dtype)
        x = torch.randn(3, 40, generator=gen).to(dtype)
        out = linear_onednn(x, pack_onednn(w), None)
        return bool(torch.allclose(out.float(), F.linear(x, w).float(), rtol=tol, atol=tol))
    except (AttributeError, RuntimeError):
        return False


@cache
def bf16_available() -> bool:
    """Whether this torch packs bf16 weights for oneDNN and computes from the pack."""
    return _onednn_matches(torch.bfloat16, 2e-2)


@cache
def onednn_fp32_available() -> bool:
    """Whether this torch packs fp32 weights for oneDNN and computes from the pack in fp32
    (to within 1e-5 of ``F.linear``: a reduced-precision math mode, TF32 or bf16, misses)."""
    return _onednn_matches(torch.float32, 1e-5)


def pack_onednn(weight: torch.Tensor) -> torch.Tensor:
    """oneDNN's packed copy of the fp32 or bf16 ``weight`` [O, I] (CPU)."""
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous(), 1)


def linear_onednn(x: torch.Tensor, packed: torch.Tensor,
                  bias: torch.Tensor | None) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` for a 2-D ``x`` [T, I] of the weight's dtype from
    ``pack_onednn(weight)``."""
    return torch.ops.mkldnn._linear_pointwise(x.contiguous(), packed, bias, "none", [], "")
