"""CPU kernels in plain C (``csrc/``), compiled on first use and loaded with ctypes.

- ``paged_decode``: decode attention read straight from the paged KV cache.
- ``small_linear``: ``x @ W.T`` for a few rows, where MKL's sgemv is bandwidth-starved.
- ``fused_ops``: the decoder layer's elementwise work in one pass each (residual add +
  RMSNorm, rotary embedding in place, SiLU x mul); see ``engine.models.llama``.
- ``kv_write``: the step's new keys and values into the paged cache (single-threaded).
- ``bf16_ops``: the bf16 model's elementwise work and decode attention (fp32 inside,
  rounded to bf16 where torch's bf16 ops round).
- ``argmax``: greedy sampling's argmax over fp32 or bf16 logits rows, as ``torch.argmax``.
- ``fp32_gemm``: fp32 GEMMs of up to 64 rows (decode steps past the GEMV's few), from a
  weight packed once into blocks of sixteen outputs.
- ``amx_gemm``: bf16 GEMMs of up to 64 rows (decode steps) on AMX tiles, from a weight
  packed once into tile layout; built only where the compiler targets AMX, used only
  where Linux grants the tile state (``amx_available``).
- ``prefill_attention``: a prefill chunk's causal attention: bf16 on AMX tiles where
  ``amx_available``, else with AVX-512 BF16's vdpbf16ps where the build has it
  (``prefill_attention_isa``); fp32 with AVX-512F or AVX2 (``prefill_attention_takes``).
- ``decode_step``: a decode step's decoder layers in one call (``decode_layers``): the
  kernels above in the fused path's order, without Python between them.

Each wrapper below takes fp32 or bf16 tensors and calls the kernel for their dtype.

``packed_gemm`` (Python) runs MKL or oneDNN on weights packed once; it needs no compiler.

Plain C files build in about a second with the system compiler and need neither ninja
nor torch's headers.

The build lands in a cache keyed by the source, the flags and the CPU's model and
features (it is built with -march=native). No compiler, or a failed build, means
``load()`` returns None and the torch backend keeps its pure-torch decode path.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from functools import cache
from pathlib import Path
from typing import Any

import torch

from engine import envs

logger = logging.getLogger(__name__)

SOURCES = sorted((Path(__file__).parent / "csrc").glob("*.c"))
HEADERS = sorted((Path(__file__).parent / "csrc").glob("*.h"))
# Reassociation lets the compiler vectorize the dot products; no other fast-math license.
FLAGS = [
    "-O3",
    "-march=native",
    "-mprefer-vector-width=512",
    "-fPIC",
    "-shared",
    "-fopenmp",
    "-fno-math-errno",
    "-fassociative-math",
    "-fno-signed-zeros",
    "-fno-trapping-math",
]


def _cpu_identity(cpuinfo: str = "/proc/cpuinfo") -> str:
    """The CPU's model name and feature flags, which -march=native builds for: a VM's
    model name alone ("AMD EPYC") was the same on a Zen 4 with AVX-512 and a Zen 3
    without, so a cache keyed by it alone would hand one a build for the other."""
    try:
        with open(cpuinfo) as f:
            lines = [line.strip() for line in f
                     if line.startswith(("model name", "flags"))][:2]
    except OSError:
        lines = []
    return "\n".join(lines) or platform.processor()


def _build(compiler: str) -> Path:
    digest = hashlib.sha256(" ".join(FLAGS).encode() + _cpu_identity().encode())
    for source in [*SOURCES, *HEADERS]:
        digest.update(source.read_bytes())
    target = Path(envs.cache_dir()) / "kernels" / f"baton-{digest.hexdigest()[:16]}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # Build beside the target and rename: concurrent builders never load a half-written file.
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        subprocess.run(
            [compiler, *FLAGS, *map(str, SOURCES), "-o", tmp, "-lm"],
            check=True,
            capture_output=True,
            text=True,
            timeout=120,
        )
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


@cache
def load() -> ctypes.CDLL | None:
    if not envs.native_kernels():
        return None
    compiler = shutil.which(envs.c_compiler()) or shutil.which("gcc")
    if compiler is None:
        logger.info("no C compiler: the CPU kernels fall back to torch")
        return None
    try:
        lib = ctypes.CDLL(str(_build(compiler)))
    except (OSError, subprocess.SubprocessError) as err:
        detail = getattr(err, "stderr", "") or err
        logger.warning("native CPU kernels unavailable (%s); falling back to torch", detail)
        return None
    fn = lib.kv_write
    fn.restype = ctypes.c_int
    fn.argtypes = [ctypes.c_void_p] * 2 + [ctypes.c_int64] + [ctypes.c_void_p] * 3 + [
        ctypes.c_int64] * 5
    for suffix in ("", "_bf16"):
        fn = getattr(lib, "small_linear" + suffix)
        fn.restype = ctypes.c_int
        fn.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int64] * 3
        fn = getattr(lib, "paged_decode_attention" + suffix)
        fn.restype = ctypes.c_int
        fn.argtypes = [ctypes.c_void_p] * 7 + [ctypes.c_int64] * 8 + [ctypes.c_float]
        fn = getattr(lib, "add_rms_norm" + suffix)
        fn.restype = ctypes.c_int
        fn.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int64] * 2 + [ctypes.c_float]
        fn = getattr(lib, "rope_qkv" + suffix)
        fn.restype = ctypes.c_int
        fn.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int64] * 4
        fn = getattr(lib, "silu_mul" + suffix)
        fn.restype = ctypes.c_int
        fn.argtypes = [ctypes.c_void_p] * 2 + [ctypes.c_int64] * 2
    for name in ("argmax_rows", "argmax_rows_bf16"):
        getattr(lib, name).restype = ctypes.c_int
        getattr(lib, name).argtypes = [ctypes.c_void_p] * 2 + [ctypes.c_int64] * 2
    lib.amx_init.restype = ctypes.c_int
    lib.amx_init.argtypes = []
    lib.amx_pack_bf16.restype = ctypes.c_int
    lib.amx_pack_bf16.argtypes = [ctypes.c_void_p] * 2 + [ctypes.c_int64] * 2
    lib.amx_linear_bf16.restype = ctypes.c_int
    lib.amx_linear_bf16.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int64] * 3
    lib.prefill_attention_isa.restype = ctypes.c_int
    lib.prefill_attention_isa.argtypes = []
    lib.prefill_attention_bf16.restype = ctypes.c_int
    tensor, strides = [ctypes.c_void_p], [ctypes.c_int64] * 2  # a pointer; row, head strides
    lib.prefill_attention_bf16.argtypes = (
        tensor + strides[:1] + tensor + strides + tensor + strides + tensor + strides[:1]
        + [ctypes.c_int64] * 5 + [ctypes.c_float, ctypes.c_int])
    lib.prefill_attention_f32_available.restype = ctypes.c_int
    lib.prefill_attention_f32_available.argtypes = []
    lib.prefill_attention_f32.restype = ctypes.c_int
    lib.prefill_attention_f32.argtypes = lib.prefill_attention_bf16.argtypes[:-1]
    lib.amx_max_rows.restype = ctypes.c_int
    lib.amx_max_rows.argtypes = []
    lib.vnni_max_rows.restype = ctypes.c_int
    lib.vnni_max_rows.argtypes = []
    lib.fp32_tile_max_rows.restype = ctypes.c_int
    lib.fp32_tile_max_rows.argtypes = []
    lib.fp32_tile_pack.restype = ctypes.c_int
    lib.fp32_tile_pack.argtypes = [ctypes.c_void_p] * 2 + [ctypes.c_int64] * 2
    lib.fp32_tile_linear.restype = ctypes.c_int
    lib.fp32_tile_linear.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int64] * 3
    lib.vnni_linear_bf16.restype = ctypes.c_int
    lib.vnni_linear_bf16.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int64] * 3
    lib.read_buffers.restype = ctypes.c_uint64
    lib.read_buffers.argtypes = [ctypes.c_void_p] * 2 + [ctypes.c_int64]
    lib.decode_layer_pointers.restype = ctypes.c_int
    lib.decode_layer_pointers.argtypes = []
    ptr, i64, f32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float
    lib.decode_layers.restype = ctypes.c_int
    argtypes: list[Any] = [ctypes.c_int] * 2 + [ptr] * 3 + [i64, ptr] + [i64] * 6 + [f32]
    lib.decode_layers.argtypes = argtypes + [ptr] * 5 + [i64, ptr] + [i64] * 3 + [f32]
    if lib.decode_layer_pointers() != len(DECODE_LAYER_POINTERS):
        raise RuntimeError(f"native kernels: decode_step.c takes {lib.decode_layer_pointers()} "
                           f"pointers a layer, engine.native.DECODE_LAYER_POINTERS names "
                           f"{len(DECODE_LAYER_POINTERS)}")
    if lib.amx_max_rows() != AMX_MAX_ROWS:  # one number in two languages: kept in step
        raise RuntimeError(f"native kernels: amx_gemm.c takes {lib.amx_max_rows()} rows, "
                           f"engine.native.AMX_MAX_ROWS says {AMX_MAX_ROWS}")
    return lib


# The dtypes the kernels take, and each one's kernel-name suffix.
SUFFIX = {torch.float32: "", torch.bfloat16: "_bf16"}


def supports(dtype: torch.dtype) -> bool:
    """Whether the elementwise and decode-attention kernels take tensors of ``dtype``."""
    return dtype in SUFFIX


def _kernel(lib: ctypes.CDLL, name: str, dtype: torch.dtype) -> Any:
    if dtype not in SUFFIX:
        raise TypeError(f"native kernels: {name} takes float32 or bfloat16, not {dtype}")
    return getattr(lib, name + SUFFIX[dtype])


def paged_decode(
    lib: ctypes.CDLL,
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    tables: torch.Tensor,
    lens: torch.Tensor,
    scratch: torch.Tensor,
    max_len: int,
    scale: float,
) -> torch.Tensor:
    """q: [B, H, D] fp32 or bf16, as the caches [Hkv, N, bs, D]; tables [B, W] and lens [B]
    int64; scratch: fp32, ``scratch_size`` floats."""
    q = q.contiguous()
    out = torch.empty_like(q)
    b, h, d = q.shape
    hkv, n, bs, _ = k_cache.shape
    _kernel(lib, "paged_decode_attention", q.dtype)(
        q.data_ptr(),
        k_cache.data_ptr(),
        v_cache.data_ptr(),
        tables.data_ptr(),
        lens.data_ptr(),
        out.data_ptr(),
        scratch.data_ptr(),
        b,
        h,
        hkv,
        d,
        bs,
        n,
        tables.shape[1],
        max_len,
        scale,
    )
    return out


def scratch_size(batch: int, heads: int, kv_heads: int, head_dim: int, max_len: int,
                 dtype: torch.dtype) -> int:
    """The fp32 scratch ``paged_decode`` needs: scores, and for bf16 an fp32 accumulator."""
    extra = head_dim if dtype == torch.bfloat16 else 0
    return batch * heads * (max_len + extra)


def small_linear(
    lib: ctypes.CDLL, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """x: [T, I] fp32 or bf16 with few rows; weight: [O, I] contiguous, of x's dtype;
    returns [T, O]."""
    x = x.contiguous()
    out = x.new_empty(x.shape[0], weight.shape[0])
    _kernel(lib, "small_linear", x.dtype)(
        x.data_ptr(),
        weight.data_ptr(),
        None if bias is None else bias.data_ptr(),
        out.data_ptr(),
        x.shape[0],
        weight.shape[0],
        weight.shape[1],
    )
    return out


def add_rms_norm(
    lib: ctypes.CDLL,
    x: torch.Tensor,
    residual: torch.Tensor | None,
    weight: torch.Tensor,
    out: torch.Tensor,
    eps: float,
) -> None:
    """``x += residual`` (when given) in place, then ``out = weight * rms_norm(x)``.

    x, residual, out: [T, D] contiguous CPU tensors (fp32 or bf16); weight: [D]."""
    _kernel(lib, "add_rms_norm", x.dtype)(
        x.data_ptr(),
        None if residual is None else residual.data_ptr(),
        weight.data_ptr(),
        out.data_ptr(),
        x.shape[0],
        x.shape[1],
        eps,
    )


def rope_qkv(
    lib: ctypes.CDLL,
    qkv: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    positions: torch.Tensor,
    num_rotated_heads: int,
    head_dim: int,
) -> None:
    """Rotate the first ``num_rotated_heads`` heads (q's, then k's) of each qkv row in place.

    qkv: [T, W] contiguous fp32 or bf16; cos, sin: [P, Dh] fp32 tables; positions: [T]
    int64, each below P (the caller checks)."""
    _kernel(lib, "rope_qkv", qkv.dtype)(
        qkv.data_ptr(),
        cos.data_ptr(),
        sin.data_ptr(),
        positions.data_ptr(),
        qkv.shape[0],
        qkv.shape[1],
        num_rotated_heads,
        head_dim,
    )


def silu_mul(lib: ctypes.CDLL, gate_up: torch.Tensor) -> torch.Tensor:
    """gate_up: [T, 2I] contiguous fp32 or bf16 (gate, then up); returns silu(gate) * up,
    [T, I]."""
    t, width = gate_up.shape
    out = gate_up.new_empty(t, width // 2)
    _kernel(lib, "silu_mul", gate_up.dtype)(gate_up.data_ptr(), out.data_ptr(), t, width // 2)
    return out


def argmax_rows(lib: ctypes.CDLL, x: torch.Tensor) -> torch.Tensor:
    """x: [B, V] fp32 or bf16 on CPU, V > 0; ``x.argmax(dim=-1)``, the same indices (ties to
    the first, a NaN above every number)."""
    if x.dim() != 2 or x.dtype not in SUFFIX or x.device.type != "cpu" or x.shape[1] == 0:
        raise ValueError(f"argmax_rows: expected [B, V>0] fp32 or bf16 on CPU, got {x.dtype} "
                         f"{list(x.shape)} on {x.device}")
    x = x.contiguous()
    out = torch.empty(x.shape[0], dtype=torch.long)
    _kernel(lib, "argmax_rows", x.dtype)(x.data_ptr(), out.data_ptr(), x.shape[0], x.shape[1])
    return out


def read_buffers(lib: ctypes.CDLL, tensors: list[torch.Tensor]) -> int:
    """Read every byte of ``tensors`` (contiguous, on CPU) once in one native call, split
    among the OpenMP threads (csrc/memory_read.c); returns the XOR of their 8-byte words
    (little-endian; a short tail zero-padded), which proves the read."""
    for t in tensors:
        if t.device.type != "cpu" or not t.is_contiguous():
            raise ValueError(f"read_buffers: expected contiguous CPU tensors, got one "
                             f"{list(t.shape)} on {t.device}")
    ptrs = torch.tensor([t.data_ptr() for t in tensors], dtype=torch.int64)
    sizes = torch.tensor([t.numel() * t.element_size() for t in tensors], dtype=torch.int64)
    return int(lib.read_buffers(ptrs.data_ptr(), sizes.data_ptr(), len(tensors)))


def kv_write(
    lib: ctypes.CDLL,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slots: torch.Tensor,
) -> bool:
    """``cache[:, slot[t]] = k[t]`` (and v) for the caches [Hkv, N, bs, Dh] (fp32 or bf16,
    CPU, contiguous); k, v: [T, Hkv, Dh] of the caches' dtype with each head's Dh elements
    contiguous and one row stride shared; slots: [T] int64 contiguous. False (nothing
    written) when the layouts or dtypes do not fit; ValueError on a slot outside the
    cache."""
    t, hkv, dh = k.shape
    row = k.stride(0)
    if (
        t == 0
        or v.shape != k.shape
        or v.stride() != k.stride()
        or k.stride(2) != 1
        or k.stride(1) != dh
        or not (k_cache.is_contiguous() and v_cache.is_contiguous() and slots.is_contiguous())
        or slots.dtype != torch.int64
        or not (k.dtype == k_cache.dtype == v_cache.dtype)
        or k.dtype not in SUFFIX
    ):
        return False
    total = k_cache.shape[1] * k_cache.shape[2]
    err = lib.kv_write(k.data_ptr(), v.data_ptr(), row, k_cache.data_ptr(),
                       v_cache.data_ptr(), slots.data_ptr(), t, hkv, dh, total,
                       k.element_size())
    if err:
        raise ValueError(f"kv cache: a slot is outside the cache's {total} slots")
    return True


# Rows up to which ``amx_linear`` computes a bf16 product (its accumulator tiles' rows;
# ``MAX_ROWS`` in csrc/amx_gemm.c, checked on load).
AMX_MAX_ROWS = 64


@cache
def amx_available() -> bool:
    """Whether the kernels were built with AMX and this process may use its tiles (the CPU
    has them and Linux granted the tile state)."""
    lib = load()
    return lib is not None and lib.amx_init() == 0


def amx_packable(weight: torch.Tensor) -> bool:
    """Whether ``amx_pack`` takes this weight: bf16 [O, I] with O % 16 == 0, I % 32 == 0."""
    return (weight.dtype == torch.bfloat16 and weight.dim() == 2
            and weight.shape[0] % 16 == 0 and weight.shape[1] % 32 == 0)


def amx_pack(lib: ctypes.CDLL, weight: torch.Tensor) -> torch.Tensor:
    """The bf16 weight [O, I] in AMX's tile layout (``csrc/amx_gemm.c``), a flat tensor."""
    w = weight.detach().contiguous()
    out = torch.empty(w.numel(), dtype=torch.bfloat16)
    if lib.amx_pack_bf16(w.data_ptr(), out.data_ptr(), w.shape[0], w.shape[1]):
        raise ValueError(f"amx_pack: weight {tuple(w.shape)} is not [16k, 32j]")
    return out


def amx_linear(lib: ctypes.CDLL, x: torch.Tensor, packed: torch.Tensor,
               bias: torch.Tensor | None, out_features: int) -> torch.Tensor:
    """``x @ W.T (+ bias)`` for bf16 ``x`` [T, I], 1 <= T <= AMX_MAX_ROWS, from
    ``amx_pack(W)``."""
    return _tile_layout_linear(lib.amx_linear_bf16, "amx_linear",
                               "AMX is not available here (see amx_available)", x, packed,
                               bias, out_features)


@cache
def vnni_max_rows() -> int:
    """The most rows ``vnni_linear`` takes: 0 where the build lacks AVX-512 BF16."""
    lib = load()
    return 0 if lib is None else int(lib.vnni_max_rows())


def vnni_linear(lib: ctypes.CDLL, x: torch.Tensor, packed: torch.Tensor,
                bias: torch.Tensor | None, out_features: int) -> torch.Tensor:
    """``amx_linear``'s product from the same ``amx_pack(W)`` without AMX, with AVX-512
    BF16's vdpbf16ps (``csrc/amx_gemm.c``), for 1 <= T <= ``vnni_max_rows()``."""
    return _tile_layout_linear(lib.vnni_linear_bf16, "vnni_linear",
                               "this build lacks AVX-512 BF16 (see vnni_max_rows)", x, packed,
                               bias, out_features)


@cache
def tile_linear_max_rows() -> int:
    """The most rows of a bf16 product ``tile_linear`` computes here from ``amx_pack``'s
    layout: ``AMX_MAX_ROWS`` with AMX, else ``vnni_max_rows()`` (0: neither)."""
    return AMX_MAX_ROWS if amx_available() else vnni_max_rows()


# The products ``decode_layers`` can run a step's GEMMs on (``LINEAR_*`` in
# csrc/decode_step.c): ``small_linear``'s GEMV on the plain weight, ``vnni_linear`` /
# ``amx_linear`` on the ``amx_pack`` copy (bf16), or ``fp32_tile_linear`` on the
# ``fp32_tile_pack`` copy (fp32).
LINEAR_GEMV, LINEAR_VNNI, LINEAR_AMX, LINEAR_FP32_TILE = 0, 1, 2, 3


def tile_linear_kind() -> int:
    """``LINEAR_AMX`` or ``LINEAR_VNNI``: the kernel ``tile_linear`` calls here."""
    return LINEAR_AMX if amx_available() else LINEAR_VNNI


def tile_linear(lib: ctypes.CDLL, x: torch.Tensor, packed: torch.Tensor,
                bias: torch.Tensor | None, out_features: int) -> torch.Tensor:
    """``amx_linear`` where the CPU has AMX, else ``vnni_linear``; for 1 <= T <=
    ``tile_linear_max_rows()``."""
    linear = amx_linear if amx_available() else vnni_linear
    return linear(lib, x, packed, bias, out_features)


@cache
def fp32_tile_max_rows() -> int:
    """The most rows ``fp32_tile_linear`` takes: 0 where the build has neither AVX-512 nor
    AVX2 with FMA."""
    lib = load()
    return 0 if lib is None else int(lib.fp32_tile_max_rows())


def tile_rows(dtype: torch.dtype) -> int:
    """The most rows of a ``dtype`` product the tile-layout kernels compute here (bf16:
    ``tile_linear_max_rows``, fp32: ``fp32_tile_max_rows``; 0: none)."""
    if dtype == torch.bfloat16:
        return tile_linear_max_rows()
    return fp32_tile_max_rows() if dtype == torch.float32 else 0


def fp32_tile_packable(weight: torch.Tensor) -> bool:
    """Whether ``fp32_tile_pack`` takes this weight: fp32 [O, I] with O % 16 == 0."""
    return (weight.dtype == torch.float32 and weight.dim() == 2
            and weight.shape[0] % 16 == 0 and weight.shape[1] > 0)


def fp32_tile_pack(lib: ctypes.CDLL, weight: torch.Tensor) -> torch.Tensor:
    """The fp32 weight [O, I] in blocks of sixteen outputs (``csrc/fp32_gemm.c``), flat."""
    w = weight.detach().contiguous()
    if not fp32_tile_packable(w):
        raise ValueError(f"fp32_tile_pack: weight {tuple(w.shape)} {w.dtype} is not fp32 "
                         "[16k, I]")
    out = torch.empty(w.numel(), dtype=torch.float32)
    lib.fp32_tile_pack(w.data_ptr(), out.data_ptr(), w.shape[0], w.shape[1])
    return out


def fp32_tile_linear(lib: ctypes.CDLL, x: torch.Tensor, packed: torch.Tensor,
                     bias: torch.Tensor | None, out_features: int) -> torch.Tensor:
    """``x @ W.T (+ bias)`` for fp32 ``x`` [T, I], 1 <= T <= ``fp32_tile_max_rows()``,
    from ``fp32_tile_pack(W)``: each output's sum over the inputs in order."""
    if x.dtype != torch.float32 or packed.dtype != torch.float32:
        raise TypeError(f"fp32_tile_linear: takes float32 x and weights, not {x.dtype} and "
                        f"{packed.dtype}")
    return _tile_layout_linear(lib.fp32_tile_linear, "fp32_tile_linear",
                               "this build has no fp32 tile pass (see fp32_tile_max_rows)",
                               x, packed, bias, out_features)


# Each decoder layer's row of the ``decode_layers`` table: these tensors' addresses, in this
# order (``P_*`` in csrc/decode_step.c, checked on load); a missing bias is 0.
DECODE_LAYER_POINTERS = ("input_norm", "post_attention_norm", "qkv", "qkv_bias", "o_proj",
                         "gate_up", "down", "k_cache", "v_cache")


def decode_layers(lib: ctypes.CDLL, linear_kind: int, x: torch.Tensor, layers: torch.Tensor,
                  final_norm: torch.Tensor, dims: tuple[int, int, int, int, int], eps: float,
                  cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor,
                  slots: torch.Tensor, tables: torch.Tensor, lens: torch.Tensor,
                  max_len: int, cache_blocks: tuple[int, int], scale: float) -> torch.Tensor:
    """A decode step's decoder layers in one call (``csrc/decode_step.c``): ``x`` [T, D]
    (fp32 or bf16, contiguous) is the embedded tokens, updated in place into the residual
    stream; returns the final norm of the last layer's output, [T, D].

    layers: [L, len(DECODE_LAYER_POINTERS)] int64 addresses; the weights are each
    ``linear_kind``'s (the plain [O, I] weight for ``LINEAR_GEMV``, ``amx_pack``'s copy
    otherwise); dims: (heads, kv heads, head size, intermediate size, D); cos, sin: [P, Dh]
    fp32; positions, slots: [T] int64; tables: [T, W] int64 block ids; lens: [T] int64
    context lengths, ``max_len`` their largest; cache_blocks: (blocks N, block size)."""
    heads, kv_heads, head_dim, inter, hidden = dims
    t = x.shape[0]
    if x.dtype not in SUFFIX or x.shape != (t, hidden) or not x.is_contiguous():
        raise ValueError(f"decode_layers: x must be contiguous fp32 or bf16 [T, {hidden}], "
                         f"got {x.dtype} {tuple(x.shape)}")
    h = torch.empty_like(x)
    err = lib.decode_layers(
        int(x.dtype == torch.bfloat16), linear_kind, x.data_ptr(), h.data_ptr(),
        layers.data_ptr(), layers.shape[0], final_norm.data_ptr(), t, hidden, heads, kv_heads,
        head_dim, inter, eps, cos.data_ptr(), sin.data_ptr(), positions.data_ptr(),
        slots.data_ptr(), tables.data_ptr(), tables.shape[1], lens.data_ptr(), max_len,
        cache_blocks[1], cache_blocks[0], scale)
    if err == -2:
        raise RuntimeError("decode_layers: the linear kernel asked for is not available here")
    if err == -3:
        raise MemoryError("decode_layers: out of memory for the step's activations")
    if err == -4:
        raise ValueError("kv cache: a slot is outside the cache")
    if err:
        raise ValueError(f"decode_layers: the linear kernel cannot take {t} rows of these "
                         "weights")
    return h


def _tile_layout_linear(fn: Any, name: str, unavailable: str, x: torch.Tensor,
                        packed: torch.Tensor, bias: torch.Tensor | None,
                        out_features: int) -> torch.Tensor:
    """Calls one of the C products from a packed copy (``amx_pack``'s or
    ``fp32_tile_pack``'s layout; ``fn``: -2 where the build or CPU lacks it, -1 for a
    shape it does not take) into a new [T, out_features]."""
    x = x.contiguous()
    t, i = x.shape
    out = x.new_empty(t, out_features)
    err = fn(x.data_ptr(), packed.data_ptr(), None if bias is None else bias.data_ptr(),
             out.data_ptr(), t, out_features, i)
    if err == -2:
        raise RuntimeError(f"{name}: {unavailable}")
    if err:
        raise ValueError(f"{name}: cannot take x {tuple(x.shape)} against "
                         f"{out_features} outputs")
    return out


# Head sizes ``prefill_attention`` takes in bf16 (one or two 32-wide tiles of a query).
PREFILL_ATTENTION_HEAD_DIMS = (32, 64)
# fp32: multiples of 16 up to this.
PREFILL_ATTENTION_F32_MAX_HEAD_DIM = 256


def prefill_attention_takes(dtype: torch.dtype, head_dim: int) -> bool:
    """Whether ``prefill_attention`` attends ``dtype`` chunks of heads of ``head_dim`` here:
    bf16 ones of ``PREFILL_ATTENTION_HEAD_DIMS`` on ``prefill_attention_isa()``'s back-end,
    fp32 ones of a multiple of 16 up to ``PREFILL_ATTENTION_F32_MAX_HEAD_DIM`` where the
    build has AVX-512F or AVX2 with FMA."""
    if dtype == torch.bfloat16:
        return head_dim in PREFILL_ATTENTION_HEAD_DIMS and prefill_attention_isa() is not None
    if dtype == torch.float32:
        lib = load()
        return (lib is not None and bool(lib.prefill_attention_f32_available())
                and 0 < head_dim <= PREFILL_ATTENTION_F32_MAX_HEAD_DIM and head_dim % 16 == 0)
    return False


@cache
def prefill_attention_isa() -> str | None:
    """The back-end ``prefill_attention`` runs here: "amx" (tiles; ``amx_available``),
    "avx512_bf16" (vdpbf16ps), or None where the build has neither."""
    lib = load()
    isa = 0 if lib is None else lib.prefill_attention_isa()
    return {2: "amx", 1: "avx512_bf16"}.get(isa)


def prefill_attention(lib: ctypes.CDLL, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                      out: torch.Tensor, scale: float, allow_amx: bool = True) -> None:
    """Causal attention of a prefill chunk, written into ``out``: q, out [S, H, D] and k, v
    [L, Hkv, D] of one dtype, bf16 or fp32 (L >= S: the chunk's queries are the last S
    positions), each head's D elements contiguous; query t sees keys 0 .. L - S + t.
    ``csrc/prefill_attention.c``; needs ``prefill_attention_takes(dtype, D)``;
    ``allow_amx=False`` keeps bf16 to the vector back-end."""
    tensors = (q, k, v, out)
    if (q.dtype not in (torch.bfloat16, torch.float32)
            or any(t.dtype != q.dtype or t.dim() != 3 or t.stride(2) != 1 for t in tensors)
            or q.stride(1) != q.shape[2] or out.stride(1) != out.shape[2]
            or out.shape != q.shape or k.shape != v.shape or k.shape[2] != q.shape[2]):
        raise ValueError(
            "prefill_attention: expected bf16 or fp32 q, out [S, H, D] and k, v [L, Hkv, D] "
            "of one dtype with contiguous heads, got "
            f"{[(tuple(t.shape), t.stride(), t.dtype) for t in tensors]}")
    s, h, d = q.shape
    length, hkv = k.shape[0], k.shape[1]
    args = (q.data_ptr(), q.stride(0), k.data_ptr(), k.stride(0), k.stride(1), v.data_ptr(),
            v.stride(0), v.stride(1), out.data_ptr(), out.stride(0), s, length, h, hkv, d,
            scale)
    if q.dtype == torch.float32:
        err = lib.prefill_attention_f32(*args)
    else:
        err = lib.prefill_attention_bf16(*args, int(allow_amx))
    if err == -2:
        need = "AVX-512F" if q.dtype == torch.float32 else "AMX or AVX-512 BF16"
        raise RuntimeError(f"prefill_attention: this build lacks {need} for {q.dtype} "
                           "(see prefill_attention_takes)")
    if err == -3:
        raise MemoryError("prefill_attention: out of memory for its packed keys and values")
    if err:
        raise ValueError(f"prefill_attention: cannot take {s} queries of {h} heads x {d} "
                         f"against {length} keys of {hkv} heads")
