"""The bf16 CPU path: the native bf16 kernels against torch's bf16 ops, oneDNN on packed
weights against F.linear, and the whole model (fused path, packed GEMMs) against the plain
torch bf16 path and against transformers in bf16.

bf16 rounds at every op, so two correct implementations that sum in another order part
ways after some tokens: the model-level checks compare greedy tokens over a prefix and
logits within bf16's resolution, not bit for bit (the fp32 tests do that).
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from engine import LLM, SamplingParams, native
from engine.models import LlamaForCausalLM
from engine.models.llama import Linear, RMSNorm, apply_rope
from engine.native import packed_gemm
from tests.engine.test_attention import BS, HKV, MIXED, D, dense_reference, run_step
from tests.engine.test_parity import hf_greedy, natural_prompts

BF16 = torch.bfloat16


@pytest.fixture(scope="module")
def kernel() -> ctypes.CDLL:
    lib = native.load()
    if lib is None:
        pytest.skip("no C compiler here: the native kernels are not built")
    return lib


@pytest.mark.parametrize("rows", [1, 5, 80])  # 80 x 576 takes the threaded branch
@pytest.mark.parametrize("add", [False, True])
def test_add_rms_norm_bf16_equals_torch(kernel: ctypes.CDLL, rows: int, add: bool) -> None:
    gen = torch.Generator().manual_seed(rows)
    norm = RMSNorm(576, 1e-5).to(BF16)
    with torch.no_grad():
        norm.weight.copy_(1.0 + 0.1 * torch.randn(576, generator=gen))
    x = torch.randn(rows, 576, generator=gen).to(BF16)
    r = torch.randn(rows, 576, generator=gen).to(BF16) if add else None
    summed = x + r if r is not None else x.clone()
    expected = norm(summed)
    out = torch.empty_like(x)
    native.add_rms_norm(kernel, x, r, norm.weight, out, norm.eps)
    assert torch.equal(x, summed)  # the residual add rounds once, as torch's
    # The sum of squares in another order: at most one bf16 step apart.
    torch.testing.assert_close(out, expected, rtol=8e-3, atol=1e-5)
    assert (out != expected).float().mean() < 0.02


@pytest.mark.parametrize("rows", [1, 3, 70])
def test_rope_qkv_bf16_equals_torch(kernel: ctypes.CDLL, rows: int) -> None:
    heads, kv_heads, dh = 9, 3, 64
    gen = torch.Generator().manual_seed(rows)
    cos, sin = torch.randn(300, dh, generator=gen), torch.randn(300, dh, generator=gen)
    qkv = torch.randn(rows, (heads + 2 * kv_heads) * dh, generator=gen).to(BF16)
    positions = torch.randint(0, 300, (rows,), generator=gen)
    q, k, v = qkv.view(rows, -1, dh).split([heads, kv_heads, kv_heads], dim=1)
    c, s = cos[positions].unsqueeze(1).to(BF16), sin[positions].unsqueeze(1).to(BF16)
    eq, ek = apply_rope(q, k, c, s)
    v_before = v.clone()
    native.rope_qkv(kernel, qkv, cos, sin, positions, heads + kv_heads, dh)
    # The same products and sums, each rounded to bf16 as torch's: bit for bit.
    assert torch.equal(q, eq) and torch.equal(k, ek)
    assert torch.equal(v, v_before)


@pytest.mark.parametrize("rows", [1, 4, 64])
def test_silu_mul_bf16_equals_torch(kernel: ctypes.CDLL, rows: int) -> None:
    gen = torch.Generator().manual_seed(rows)
    gate_up = (4 * torch.randn(rows, 2 * 1536, generator=gen)).to(BF16)
    gate, up = gate_up.split(1536, dim=-1)
    got, expected = native.silu_mul(kernel, gate_up), F.silu(gate) * up
    assert got.dtype == BF16
    # silu's exp is libm's, torch's its own: the silu may round to the next bf16.
    torch.testing.assert_close(got, expected, rtol=8e-3, atol=1e-5)


def test_kernels_refuse_other_dtypes(kernel: ctypes.CDLL) -> None:
    with pytest.raises(TypeError, match="float32 or bfloat16"):
        native.silu_mul(kernel, torch.zeros(2, 8, dtype=torch.float16))


@pytest.mark.parametrize(("lengths", "new"), [([5, 9, 16, 17, 30, 3], [1] * 6), ([40], [1])])
def test_paged_decode_bf16_equals_dense(
    kernel: ctypes.CDLL, lengths: list[int], new: list[int]
) -> None:
    from engine.attention.torch_paged import TorchPagedAttention

    out, ref, meta = run_step(TorchPagedAttention(D, kernel), lengths, new, dtype=BF16)
    assert meta.native_tables is not None and out.dtype == BF16
    # Keys, values and queries are bf16; the kernel sums in fp32 and rounds once.
    torch.testing.assert_close(out.float(), ref.float(), rtol=1e-2, atol=1e-2)


def test_native_kv_write_bf16(kernel: ctypes.CDLL) -> None:
    t, blocks = 5, 8
    kc = torch.zeros(HKV, blocks, BS, D, dtype=BF16)
    vc = torch.zeros_like(kc)
    k = torch.randn(t, HKV, D).to(BF16)
    v = torch.randn(t, HKV, D).to(BF16)
    slots = torch.tensor([3, 0, 17, 31, 8])
    assert native.kv_write(kernel, k, v, kc, vc, slots)
    ek, ev = torch.zeros_like(kc), torch.zeros_like(vc)
    ek.view(HKV, -1, D).index_copy_(1, slots, k.transpose(0, 1))
    ev.view(HKV, -1, D).index_copy_(1, slots, v.transpose(0, 1))
    assert torch.equal(kc, ek) and torch.equal(vc, ev)
    # A cache of another dtype than the rows: not written here (the caller falls back).
    assert not native.kv_write(kernel, k.float(), v.float(), kc, vc, slots)


@pytest.mark.parametrize("rows", [1, 3, 16, 64, 300])
def test_packed_bf16_linear_matches_f_linear(rows: int) -> None:
    if not packed_gemm.bf16_available():
        pytest.skip("this torch has no oneDNN bf16 packing")
    gen = torch.Generator().manual_seed(rows)
    layer = Linear(576, 960, bias=True).to(BF16)
    with torch.no_grad():
        layer.weight.copy_(0.05 * torch.randn(960, 576, generator=gen))
        layer.bias.copy_(torch.randn(960, generator=gen))
    x = torch.randn(rows, 576, generator=gen).to(BF16)
    expected = F.linear(x, layer.weight, layer.bias)
    layer.pack_weight = True
    with torch.inference_mode():
        got = layer(x)
    assert got.dtype == BF16
    torch.testing.assert_close(got.float(), expected.float(), rtol=1.6e-2, atol=1e-2)


# The whole model.


@pytest.fixture(scope="module")
def smollm_bf16() -> LLM:
    from tests.engine.conftest import get_llm

    return get_llm(None, dtype="bfloat16")


def test_smollm2_bf16_takes_the_fast_path(smollm_bf16: LLM) -> None:
    model = smollm_bf16.engine.runner.model
    assert isinstance(model, LlamaForCausalLM)
    assert next(model.parameters()).dtype == BF16
    if native.load() is not None:
        assert model.fused is not None
        assert smollm_bf16.engine.runner.backend.native is not None
    if packed_gemm.bf16_available():
        assert model.layers[0].mlp.gate_up_proj.pack_weight


def _greedy(llm: LLM, prompts: list[list[int]], n: int) -> list[list[int]]:
    params = SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)
    return [o.token_ids for o in llm.generate(prompt_token_ids=prompts, params=params)]


def _agree(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y), len(a))


def test_smollm2_bf16_fast_path_tracks_torch_path_and_transformers(smollm_bf16: LLM) -> None:
    llm = smollm_bf16
    prompts = natural_prompts(
        lambda t: llm.tokenizer.encode(t, add_special_tokens=False), [12, 40, 150, 260]
    )
    fast = _greedy(llm, prompts, 16)
    model = llm.engine.runner.model
    assert isinstance(model, LlamaForCausalLM)
    start = model.fused
    model.fused = None
    model.use_packed_gemm(False)
    try:
        plain = _greedy(llm, prompts, 16)
    finally:
        model.fused = start
        model.use_packed_gemm(True)
    transformers = pytest.importorskip("transformers")
    from engine.loader.default import default_model_path

    path = Path(default_model_path())
    ref_model = transformers.AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=BF16
    )
    ref = hf_greedy(ref_model.eval(), prompts, 16)
    # bf16 is one rounding step coarser than the differences in summation order: the
    # three agree on the first tokens of every prompt and on most tokens overall.
    for f, p, r in zip(fast, plain, ref, strict=True):
        assert _agree(f, r) >= 4 and _agree(p, r) >= 4, (f, p, r)
    same = sum(_agree(f, r) for f, r in zip(fast, ref, strict=True))
    assert same >= 0.75 * 16 * len(prompts), (fast, ref)


@pytest.mark.parametrize("rows", [1, 2, 4])
@pytest.mark.parametrize("bias", [False, True])
def test_small_linear_bf16_equals_torch(kernel: ctypes.CDLL, rows: int, bias: bool) -> None:
    gen = torch.Generator().manual_seed(rows)
    layer = Linear(77, 130, bias=bias).to(BF16)  # 77: a tail past the 32-wide vectors
    with torch.no_grad():
        layer.weight.copy_(torch.randn(130, 77, generator=gen))
        if bias:
            layer.bias.copy_(torch.randn(130, generator=gen))
    x = torch.randn(rows, 77, generator=gen).to(BF16)
    expected = F.linear(x.float(), layer.weight.float(),
                        None if layer.bias is None else layer.bias.float())
    layer.kernel = kernel
    with torch.inference_mode():
        got = layer(x)
    assert got.dtype == BF16
    # Exact products summed in fp32, rounded once to bf16: within half a bf16 step.
    torch.testing.assert_close(got.float(), expected, rtol=4e-3, atol=1e-3)


# AMX: decode steps' GEMMs (up to 64 rows) on weights packed into tile layout.


@pytest.fixture(scope="module")
def amx(kernel: ctypes.CDLL) -> ctypes.CDLL:
    if not native.amx_available():
        pytest.skip("no AMX here (CPU, kernel or compiler)")
    return kernel


@pytest.mark.parametrize("rows", [1, 15, 16, 17, 32, 33, 64])
@pytest.mark.parametrize("bias", [False, True])
def test_amx_linear_equals_fp32_product(amx: ctypes.CDLL, rows: int, bias: bool) -> None:
    gen = torch.Generator().manual_seed(rows)
    out_features, in_features = 96, 1536  # 6 output blocks; 48 input blocks (even count)
    w = torch.randn(out_features, in_features, generator=gen).to(BF16)
    b = torch.randn(out_features, generator=gen).to(BF16) if bias else None
    x = torch.randn(rows, in_features, generator=gen).to(BF16)
    got = native.amx_linear(amx, x, native.amx_pack(amx, w), b, out_features)
    expected = F.linear(x.float(), w.float(), None if b is None else b.float())
    assert got.dtype == BF16 and got.shape == (rows, out_features)
    # Exact products summed in fp32 (in AMX's order), rounded once: within a bf16 step.
    torch.testing.assert_close(got.float(), expected, rtol=8e-3, atol=0.05)


@pytest.mark.parametrize("rows", [5, 40])
@pytest.mark.parametrize("out_features", [48, 80])
def test_amx_linear_odd_blocks(amx: ctypes.CDLL, rows: int, out_features: int) -> None:
    # 3 output blocks (a pair, then one alone) or 5 (up to 16 rows: four together, then
    # one alone), 3 input blocks; 40 rows: two row halves.
    gen = torch.Generator().manual_seed(7)
    w = torch.randn(out_features, 96, generator=gen).to(BF16)
    b = torch.randn(out_features, generator=gen).to(BF16)
    x = torch.randn(rows, 96, generator=gen).to(BF16)
    got = native.amx_linear(amx, x, native.amx_pack(amx, w), b, out_features)
    expected = F.linear(x.float(), w.float(), b.float())
    torch.testing.assert_close(got.float(), expected, rtol=8e-3, atol=0.02)


def test_amx_refuses_shapes_it_does_not_take(amx: ctypes.CDLL) -> None:
    assert not native.amx_packable(torch.zeros(130, 64, dtype=BF16))  # 130 outputs
    assert not native.amx_packable(torch.zeros(64, 77, dtype=BF16))  # 77 inputs
    assert not native.amx_packable(torch.zeros(64, 64))  # fp32
    with pytest.raises(ValueError, match="amx_pack"):
        native.amx_pack(amx, torch.zeros(130, 64, dtype=BF16))
    packed = native.amx_pack(amx, torch.zeros(64, 64, dtype=BF16))
    with pytest.raises(ValueError, match="amx_linear"):
        native.amx_linear(amx, torch.zeros(65, 64, dtype=BF16), packed, None, 64)


# AVX-512 BF16 without AMX: decode steps' GEMMs (up to 16 rows) on the same packed weights.


@pytest.fixture(scope="module")
def vnni(kernel: ctypes.CDLL) -> ctypes.CDLL:
    if native.vnni_max_rows() == 0:
        pytest.skip("this build lacks AVX-512 BF16")
    return kernel


@pytest.mark.parametrize("rows", [1, 3, 4, 5, 13, 16, 37, 64])
@pytest.mark.parametrize(("out_features", "bias"), [(96, False), (208, True), (48, True)])
def test_vnni_linear_equals_fp32_product(
    vnni: ctypes.CDLL, rows: int, out_features: int, bias: bool
) -> None:
    # Four rows per pass (5 to 64: more passes, 13 and 37 a partial last one); output
    # blocks by sixes (96: one group; 208: two and one block alone; 48: three, a partial
    # group).
    gen = torch.Generator().manual_seed(rows * out_features)
    w = torch.randn(out_features, 1536, generator=gen).to(BF16)
    b = torch.randn(out_features, generator=gen).to(BF16) if bias else None
    x = torch.randn(rows, 1536, generator=gen).to(BF16)
    got = native.vnni_linear(vnni, x, native.amx_pack(vnni, w), b, out_features)
    expected = F.linear(x.float(), w.float(), None if b is None else b.float())
    assert got.dtype == BF16 and got.shape == (rows, out_features)
    torch.testing.assert_close(got.float(), expected, rtol=8e-3, atol=0.05)


def test_vnni_linear_refuses_rows_it_does_not_take(vnni: ctypes.CDLL) -> None:
    packed = native.amx_pack(vnni, torch.zeros(64, 64, dtype=BF16))
    with pytest.raises(ValueError, match="vnni_linear"):
        native.vnni_linear(vnni, torch.zeros(native.vnni_max_rows() + 1, 64, dtype=BF16),
                           packed, None, 64)  # fmt: skip


def test_linear_without_amx_sends_decode_rows_to_vnni(vnni: ctypes.CDLL) -> None:
    if native.amx_available():
        pytest.skip("AMX here: its kernel takes these rows")
    check_linear_routes_rows(vnni, native.vnni_max_rows())


# bf16 prefill chunks' causal attention: on AMX tiles, or with AVX-512 BF16's vdpbf16ps.


@pytest.fixture(params=["amx", "avx512_bf16"])
def prefill_backend(request: pytest.FixtureRequest, kernel: ctypes.CDLL) -> bool:
    """Whether the call may use AMX: each back-end this build and CPU have (on a CPU with
    AMX the vector one is asked for with allow_amx=False)."""
    isa = native.prefill_attention_isa()
    if request.param == "amx" and isa != "amx":
        pytest.skip("no AMX here (CPU, kernel or compiler)")
    if isa is None:
        pytest.skip("this build has neither AMX nor AVX-512 BF16")
    return bool(request.param == "amx")


@pytest.mark.parametrize(
    ("queries", "keys", "heads", "kv_heads", "head_dim"),
    [(1, 1, 9, 3, 64), (17, 17, 9, 3, 64), (256, 256, 9, 3, 64), (100, 300, 9, 3, 64),
     (33, 70, 4, 2, 32), (5, 5, 4, 4, 64), (90, 90, 9, 3, 64)],
)
def test_prefill_attention_equals_fp32_attention(
    kernel: ctypes.CDLL, prefill_backend: bool, queries: int, keys: int, heads: int,
    kv_heads: int, head_dim: int
) -> None:
    # Partial tiles of queries and keys, a chunk after earlier context, 1 to 3 query heads
    # per kv head, both head sizes, key blocks past the vector kernel's groups of four;
    # q, k and v strided inside one fused qkv row, as the model hands them over.
    gen = torch.Generator().manual_seed(queries * keys)
    qkv = torch.randn(keys, (heads + 2 * kv_heads) * head_dim, generator=gen).to(BF16)
    q, k, v = qkv.view(keys, -1, head_dim).split([heads, kv_heads, kv_heads], dim=1)
    q = q[keys - queries:]
    if heads == kv_heads:
        v = v.contiguous()  # its own strides, unlike k's
    out = torch.full((queries, heads, head_dim), float("nan"), dtype=BF16)
    native.prefill_attention(kernel, q, k, v, out, head_dim**-0.5, allow_amx=prefill_backend)
    ref = dense_reference(q.float(), k.float(), v.float())
    # Probabilities rounded to bf16 for the value product (as torch's flash kernel), sums
    # in fp32, one rounding at the end: within a few bf16 steps of the fp32 result.
    torch.testing.assert_close(out.float(), ref, rtol=2e-2, atol=2e-2)


def test_prefill_attention_refuses_what_it_does_not_take(
    kernel: ctypes.CDLL, prefill_backend: bool
) -> None:
    q, k = torch.zeros(4, 2, 128, dtype=BF16), torch.zeros(4, 1, 128, dtype=BF16)
    with pytest.raises(ValueError, match="cannot take 4 queries of 2 heads x 128"):
        native.prefill_attention(kernel, q, k, k, torch.empty_like(q), 0.1, prefill_backend)
    q, k = torch.zeros(4, 2, 64, dtype=torch.float16), torch.zeros(4, 1, 64, dtype=torch.float16)
    with pytest.raises(ValueError, match="expected bf16 or fp32"):
        native.prefill_attention(kernel, q, k, k, torch.empty_like(q), 0.1, prefill_backend)


def test_paged_prefill_bf16_natively_equals_dense(kernel: ctypes.CDLL) -> None:
    from engine.attention.torch_paged import TorchPagedAttention

    if native.prefill_attention_isa() is None:
        pytest.skip("this build has neither AMX nor AVX-512 BF16")
    backend = TorchPagedAttention(64, kernel)
    assert BF16 in backend.native_prefill
    # Two decodes, a fresh prefill and a later chunk that reads its context from the cache.
    out, ref, _ = run_step(backend, *MIXED, dtype=BF16, head_dim=64)
    torch.testing.assert_close(out.float(), ref.float(), rtol=2e-2, atol=2e-2)


def check_linear_routes_rows(kernel: ctypes.CDLL, limit: int) -> None:
    """Up to ``limit`` rows a bf16 Linear computes from its tile-layout copy (made on first
    use); past that from oneDNN's pack."""
    if not packed_gemm.bf16_available():
        pytest.skip("this torch has no oneDNN bf16 packing")
    gen = torch.Generator().manual_seed(3)
    layer = Linear(576, 960, bias=False).to(BF16)
    with torch.no_grad():
        layer.weight.copy_(0.05 * torch.randn(960, 576, generator=gen))
    layer.kernel, layer.pack_weight = kernel, True
    with torch.inference_mode():
        for rows in (1, limit, limit + 1):
            x = torch.randn(rows, 576, generator=gen).to(BF16)
            torch.testing.assert_close(layer(x).float(), F.linear(x, layer.weight).float(),
                                       rtol=1.6e-2, atol=1e-2)
            assert layer._amx is not None and layer._amx[1] is not None
            assert (layer._packed is not None) == (rows > limit)
    layer.pack_weight = False  # BATON_PACKED_GEMM=0: plain F.linear, no tile-layout copy
    x = torch.randn(8, 576, generator=gen).to(BF16)
    with torch.inference_mode():
        assert torch.equal(layer(x), F.linear(x, layer.weight))


def test_linear_sends_decode_rows_to_amx_and_prefill_rows_to_onednn(amx: ctypes.CDLL) -> None:
    check_linear_routes_rows(amx, native.AMX_MAX_ROWS)


def test_linear_decides_amx_once_per_weight(amx: ctypes.CDLL) -> None:
    if not packed_gemm.bf16_available():
        pytest.skip("this torch has no oneDNN bf16 packing")
    gen = torch.Generator().manual_seed(4)
    layer = Linear(96, 130, bias=True).to(BF16)  # 130 outputs: not whole 16-row tiles
    layer.kernel, layer.pack_weight = amx, True
    x = torch.randn(16, 96, generator=gen).to(BF16)
    with torch.inference_mode():
        torch.testing.assert_close(layer(x).float(),
                                   F.linear(x, layer.weight, layer.bias).float(),
                                   rtol=1.6e-2, atol=1e-2)  # fmt: skip
    assert layer._amx is not None and layer._amx[1] is None  # no AMX copy: oneDNN's
    assert layer._packed is not None
    # A new weight tensor (a shard, a cast) is decided again: 128 outputs take AMX.
    layer.weight = torch.nn.Parameter(torch.randn(128, 96, generator=gen).to(BF16),
                                      requires_grad=False)  # fmt: skip
    layer.bias = torch.nn.Parameter(torch.randn(128, generator=gen).to(BF16),
                                    requires_grad=False)  # fmt: skip
    layer.out_features = 128
    with torch.inference_mode():
        torch.testing.assert_close(layer(x).float(),
                                   F.linear(x.float(), layer.weight.float(), layer.bias.float()),
                                   rtol=8e-3, atol=0.05)  # fmt: skip
    assert layer._amx is not None and layer._amx[1] is not None
