"""The compiled CPU kernels against torch."""

from __future__ import annotations

import ctypes
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from engine import native
from engine.models.llama import SMALL_LINEAR_MAX_ROWS, Linear, RMSNorm, apply_rope


@pytest.fixture(scope="module")
def kernel() -> ctypes.CDLL:
    lib = native.load()
    if lib is None:
        pytest.skip("no C compiler here: the native kernels are not built")
    return lib


@pytest.mark.parametrize("rows", [1, 2, 3, SMALL_LINEAR_MAX_ROWS])
@pytest.mark.parametrize("bias", [False, True])
def test_small_linear_equals_torch(kernel: ctypes.CDLL, rows: int, bias: bool) -> None:
    gen = torch.Generator().manual_seed(rows)
    layer = Linear(77, 130, bias=bias)  # sizes that are not multiples of the vector width
    with torch.no_grad():
        layer.weight.copy_(torch.randn(130, 77, generator=gen))
        if bias:
            layer.bias.copy_(torch.randn(130, generator=gen))
    x = torch.randn(rows, 77, generator=gen)
    expected = F.linear(x, layer.weight, layer.bias)
    layer.kernel = kernel
    with torch.inference_mode():
        got = layer(x)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-4)


def test_linear_uses_torch_above_the_row_limit(kernel: ctypes.CDLL) -> None:
    # Unpacked (pack_weight off): past the GEMV's rows torch computes, bit for bit.
    layer = Linear(8, 8, bias=False)
    layer.kernel = kernel
    x = torch.randn(SMALL_LINEAR_MAX_ROWS + 1, 8)
    with torch.inference_mode():
        assert torch.equal(layer(x), F.linear(x, layer.weight))


needs_fp32_tiles = pytest.mark.skipif(native.fp32_tile_max_rows() == 0,
                                      reason="the build has neither AVX-512 nor AVX2 with FMA "
                                             "(fp32 tile kernel)")


@needs_fp32_tiles
@pytest.mark.parametrize("rows", [1, 3, 4, 5, 6, 7, 13, 17, 64])
@pytest.mark.parametrize(("out_features", "in_features"), [(48, 40), (112, 77), (576, 1536)])
@pytest.mark.parametrize("bias", [False, True])
def test_fp32_tile_linear_equals_f_linear(kernel: ctypes.CDLL, rows: int, out_features: int,
                                          in_features: int, bias: bool) -> None:
    # 48: three blocks (a partial group of six); 112: seven (a whole group and one more);
    # rows not a multiple of the pass's four (AVX-512) or six (AVX2); odd input counts.
    gen = torch.Generator().manual_seed(rows * out_features)
    w = torch.randn(out_features, in_features, generator=gen)
    b = torch.randn(out_features, generator=gen) if bias else None
    x = torch.randn(rows, in_features, generator=gen)
    packed = native.fp32_tile_pack(kernel, w)
    got = native.fp32_tile_linear(kernel, x, packed, b, out_features)
    torch.testing.assert_close(got, F.linear(x, w, b), rtol=1e-5, atol=1e-4)


@needs_fp32_tiles
def test_fp32_tile_kernel_refuses_what_it_does_not_take(kernel: ctypes.CDLL) -> None:
    with pytest.raises(ValueError, match="fp32_tile_pack"):
        native.fp32_tile_pack(kernel, torch.randn(40, 8))  # 40 outputs: not blocks of 16
    with pytest.raises(ValueError, match="fp32_tile_pack"):
        native.fp32_tile_pack(kernel, torch.randn(48, 8).bfloat16())
    packed = native.fp32_tile_pack(kernel, torch.randn(48, 8))
    with pytest.raises(TypeError, match="float32"):
        native.fp32_tile_linear(kernel, torch.randn(3, 8).bfloat16(), packed, None, 48)
    for rows in (0, native.fp32_tile_max_rows() + 1):
        with pytest.raises(ValueError, match="fp32_tile_linear"):
            native.fp32_tile_linear(kernel, torch.randn(rows, 8), packed, None, 48)


@needs_fp32_tiles
def test_packed_linear_sends_fp32_decode_rows_to_the_tile_kernel(kernel: ctypes.CDLL) -> None:
    layer = Linear(40, 48, bias=True)
    layer.kernel = kernel
    layer.pack_weight = True
    gemv, tiles, beyond = (SMALL_LINEAR_MAX_ROWS, SMALL_LINEAR_MAX_ROWS + 1,
                           native.fp32_tile_max_rows() + 1)
    assert layer.native_route(gemv, torch.float32) == (native.LINEAR_GEMV, layer.weight)
    route = layer.native_route(tiles, torch.float32)
    assert route is not None and route[0] == native.LINEAR_FP32_TILE
    assert route[1] is layer.fp32_tiled(kernel)  # made once, kept
    assert layer.native_route(beyond, torch.float32) is None
    x = torch.randn(tiles, 40)
    with torch.inference_mode():
        torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias),
                                   rtol=1e-5, atol=1e-4)
    with torch.no_grad():  # a new weight (a TP shard): a new copy
        layer.weight = torch.nn.Parameter(torch.randn(48, 40))
    assert layer.fp32_tiled(kernel) is not route[1]
    layer.pack_weight = False  # BATON_PACKED_GEMM=0: torch past the GEMV
    assert layer.native_route(tiles, torch.float32) is None


def test_the_build_is_cached(kernel: ctypes.CDLL) -> None:
    assert native.load() is kernel


def test_the_build_cache_tells_cpus_of_one_name_apart(tmp_path: Path) -> None:
    # A VM shows "AMD EPYC" for a Zen 4 with AVX-512 and a Zen 3 without: -march=native
    # builds differ, so the cache key must too.
    def identity(flags: str) -> str:
        info = tmp_path / f"cpuinfo-{len(flags)}"
        info.write_text(f"processor\t: 0\nmodel name\t: AMD EPYC\nflags\t\t: {flags}\n"
                        f"processor\t: 1\nmodel name\t: AMD EPYC\nflags\t\t: {flags}\n")
        return native._cpu_identity(str(info))

    zen4, zen3 = identity("fpu avx2 avx512f avx512_bf16"), identity("fpu avx2")
    assert zen4 != zen3 and "AMD EPYC" in zen3 and zen3.endswith("fpu avx2")


# The fused elementwise kernels against the torch ops they replace (engine/models/llama.py).


@pytest.mark.parametrize("rows", [1, 5, 80])  # 80 x 576 takes the threaded branch
@pytest.mark.parametrize("add", [False, True])
def test_add_rms_norm_equals_torch(kernel: ctypes.CDLL, rows: int, add: bool) -> None:
    gen = torch.Generator().manual_seed(rows)
    norm = RMSNorm(576, 1e-5)
    with torch.no_grad():
        norm.weight.copy_(1.0 + 0.1 * torch.randn(576, generator=gen))
    x = torch.randn(rows, 576, generator=gen)
    r = torch.randn(rows, 576, generator=gen) if add else None
    summed = x + r if r is not None else x.clone()
    expected = norm(summed)
    out = torch.empty_like(x)
    native.add_rms_norm(kernel, x, r, norm.weight, out, norm.eps)
    assert torch.equal(x, summed)  # the residual add is one rounding, as torch's
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("rows", [1, 3, 70])
def test_rope_qkv_equals_torch(kernel: ctypes.CDLL, rows: int) -> None:
    heads, kv_heads, dh = 9, 3, 64
    gen = torch.Generator().manual_seed(rows)
    cos, sin = torch.randn(300, dh, generator=gen), torch.randn(300, dh, generator=gen)
    qkv = torch.randn(rows, (heads + 2 * kv_heads) * dh, generator=gen)
    positions = torch.randint(0, 300, (rows,), generator=gen)
    q, k, v = qkv.view(rows, -1, dh).split([heads, kv_heads, kv_heads], dim=1)
    eq, ek = apply_rope(q, k, cos[positions].unsqueeze(1), sin[positions].unsqueeze(1))
    v_before = v.clone()
    native.rope_qkv(kernel, qkv, cos, sin, positions, heads + kv_heads, dh)
    # The same products and sums in the same order: bit for bit.
    assert torch.equal(q, eq) and torch.equal(k, ek)
    assert torch.equal(v, v_before)


@pytest.mark.parametrize("rows", [1, 4, 64])
def test_silu_mul_equals_torch(kernel: ctypes.CDLL, rows: int) -> None:
    gen = torch.Generator().manual_seed(rows)
    gate_up = 4 * torch.randn(rows, 2 * 1536, generator=gen)
    gate, up = gate_up.split(1536, dim=-1)
    torch.testing.assert_close(
        native.silu_mul(kernel, gate_up), F.silu(gate) * up, rtol=1e-6, atol=1e-6
    )


@pytest.mark.parametrize("width", [1, 15, 16, 17, 63, 64, 65, 130, 49152])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_argmax_rows_equals_torch(kernel: ctypes.CDLL, width: int, dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(width)
    for _ in range(20):
        # Few distinct values, so most rows tie for their maximum: the first index wins.
        x = torch.randint(-3, 3, (5, width), generator=gen).to(dtype)
        assert torch.equal(native.argmax_rows(kernel, x), x.argmax(dim=-1))
    x = torch.randn(5, width, generator=gen).to(dtype)
    x[1] = float("-inf")  # every entry masked: index 0, as torch
    x[2, -1] = float("inf")
    x[3] = 0.0
    x[3, ::2] = -0.0  # -0.0 equals +0.0: the first zero wins
    x[4, width // 2] = float("nan")  # a NaN is above every number
    if width > 1:
        x[4, -1] = float("nan")  # and the first NaN wins
        x[0, 0] = float("inf")
    assert torch.equal(native.argmax_rows(kernel, x), x.argmax(dim=-1))


def test_argmax_rows_takes_strided_rows_and_refuses_other_input(kernel: ctypes.CDLL) -> None:
    x = torch.randn(70, 4, generator=torch.Generator().manual_seed(0)).t()  # [4, 70], strided
    assert torch.equal(native.argmax_rows(kernel, x), x.argmax(dim=-1))
    for bad in (torch.zeros(3, 0), torch.zeros(3, 4, dtype=torch.float16), torch.zeros(4)):
        with pytest.raises(ValueError, match="argmax_rows: expected"):
            native.argmax_rows(kernel, bad)


def _xor_of_words(tensors: list[torch.Tensor]) -> int:
    """What read_buffers returns, in Python: the XOR of each buffer's little-endian 8-byte
    words, a short tail zero-padded."""
    out = 0
    for t in tensors:
        data = t.view(torch.uint8).numpy().tobytes()
        data += bytes(-len(data) % 8)
        for i in range(0, len(data), 8):
            out ^= int.from_bytes(data[i:i + 8], "little")
    return out


def test_read_buffers_reads_every_byte(kernel: ctypes.CDLL) -> None:
    gen = torch.Generator().manual_seed(0)
    sizes = (1, 7, 8, 13, 64, 1000, 4099)
    tensors = [torch.randint(0, 256, (n,), dtype=torch.uint8, generator=gen) for n in sizes]
    tensors.append(torch.randn(33, 5, generator=gen).to(torch.bfloat16))
    expected = _xor_of_words(tensors)
    assert expected != 0
    assert native.read_buffers(kernel, tensors) == expected
    for t, at in ((tensors[0], 0), (tensors[3], 12), (tensors[6], 4098)):  # a tail byte too
        t[at] ^= 0x10
        assert native.read_buffers(kernel, tensors) == _xor_of_words(tensors) != expected
        t[at] ^= 0x10
    assert native.read_buffers(kernel, []) == 0
    with pytest.raises(ValueError, match="read_buffers: expected contiguous CPU tensors"):
        native.read_buffers(kernel, [torch.zeros(4, 4).t()])
