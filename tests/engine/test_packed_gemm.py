"""MKL on packed weights (BATON_PACKED_GEMM, on by default for CPU fp32 where it pays:
not on AMD CPUs, ``packed_gemm.fp32_pays``) computes the same products as F.linear and the
model uses it for many-row GEMMs only; elsewhere fp32 weights take oneDNN's pack (F.linear
to rounding, at any row count); and the native KV write stores what index_copy_ stores.
Greedy parity with transformers on these paths is the job of test_parity.py and
test_fused_path.py, which run with the one the CPU takes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from engine import LLM, SamplingParams, native
from engine.models import LlamaForCausalLM
from engine.models.llama import Linear
from engine.native import packed_gemm
from tests.engine.helpers import make_tiny_model_dir

needs_mkl = pytest.mark.skipif(not packed_gemm.available(), reason="torch without MKL")


@needs_mkl
@pytest.mark.parametrize("shape", [(960, 576), (576, 576), (3072, 576), (576, 1536)])
def test_packed_product_equals_f_linear(shape: tuple[int, int]) -> None:
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(*shape, generator=gen) * 0.02
    b = torch.randn(shape[0], generator=gen)
    packed = packed_gemm.pack(w)
    for rows in (packed_gemm.MIN_ROWS, 17, 64, 255, 256, 300):
        x = torch.randn(rows, shape[1], generator=gen)
        got, want = packed_gemm.linear(x, packed, w, b), F.linear(x, w, b)
        if shape[1] == 576:  # this model's q/k/v, o, gate/up (and LM head): bit for bit
            assert torch.equal(got, want), rows
        else:  # down: MKL's F.linear sums another way at 57..129 rows (last bit)
            torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


@needs_mkl
def test_linear_packs_once_per_weight_and_only_for_many_rows() -> None:
    lin = Linear(40, 48, bias=False)
    lin.pack_weight = True
    lin(torch.randn(packed_gemm.MIN_ROWS - 1, 40))
    assert lin._packed is None  # few rows: F.linear
    x = torch.randn(32, 40)
    assert torch.equal(lin(x), F.linear(x, lin.weight))
    first = lin._packed
    assert first is not None
    lin(x)
    assert lin._packed is first  # packed once
    with torch.no_grad():
        lin.weight = torch.nn.Parameter(torch.randn(48, 40))  # a new weight (a TP shard)
    assert torch.equal(lin(x), F.linear(x, lin.weight))
    assert lin._packed is not first


@needs_mkl
def test_linear_keeps_a_pack_per_thread_count() -> None:
    # MKL lays a pack out for the thread count of the moment (a pack made on one thread
    # kept small prefills on one core at two): each count gets its own.
    lin = Linear(40, 48, bias=False)
    lin.pack_weight = True
    x = torch.randn(32, 40)
    start = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert torch.equal(lin(x), F.linear(x, lin.weight))
        one = lin.packed()
        torch.set_num_threads(2)
        torch.testing.assert_close(lin(x), F.linear(x, lin.weight), rtol=0, atol=1e-6)
        two = lin.packed()
        assert two is not one
        torch.set_num_threads(1)
        assert lin.packed() is one
    finally:
        torch.set_num_threads(start)


@needs_mkl
def test_packed_gemm_switch(
    monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory
) -> None:
    # The path itself, on any CPU: where it does not pay (AMD) the default is off, below.
    monkeypatch.setattr(packed_gemm, "fp32_pays", lambda: True)
    path = make_tiny_model_dir(tmp_path_factory.mktemp("llama-packed"), "llama")
    prompts = [list(range(10, 110)), [5, 6, 7]]
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    got = {}
    for value in (None, "0"):
        if value is None:
            monkeypatch.delenv("BATON_PACKED_GEMM", raising=False)  # the default: on
        else:
            monkeypatch.setenv("BATON_PACKED_GEMM", value)
        llm = LLM(str(path), num_kv_blocks=64)
        model = llm.engine.runner.model
        assert isinstance(model, LlamaForCausalLM)
        linears = [m for m in model.modules() if isinstance(m, Linear)]
        assert all(m.pack_weight is (value is None) for m in linears)
        layers = [m for m in model.layers.modules() if isinstance(m, Linear)]
        got[value] = [o.token_ids for o in llm.generate(prompt_token_ids=prompts,
                                                        params=params)]
        # The 100-token prefill ran the layers' GEMMs packed when on (past the tile
        # kernels' 64 rows; the LM head saw only the sampled rows: too few).
        assert all((m._packed is not None) is (value is None) for m in layers)
        del llm
    assert got[None] == got["0"]


needs_onednn_fp32 = pytest.mark.skipif(not packed_gemm.onednn_fp32_available(),
                                       reason="torch without oneDNN's fp32 pack")


@needs_onednn_fp32
@pytest.mark.parametrize("shape", [(960, 576), (576, 576), (3072, 576), (576, 1536)])
def test_onednn_fp32_product_is_f_linear_to_rounding(shape: tuple[int, int]) -> None:
    # oneDNN sums in its own order: fp32 rounding apart from F.linear, not bit for bit,
    # at every row count (it takes few rows too).
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(*shape, generator=gen) * 0.02
    b = torch.randn(shape[0], generator=gen)
    packed = packed_gemm.pack_onednn(w)
    for rows in (1, 5, packed_gemm.MIN_ROWS, 64, 300):
        x = torch.randn(rows, shape[1], generator=gen)
        got = packed_gemm.linear_onednn(x, packed, b)
        torch.testing.assert_close(got, F.linear(x, w, b), rtol=1e-5, atol=1e-5)


def _fp32_model(tmp_path_factory: pytest.TempPathFactory, name: str) -> tuple[LLM, list[Linear]]:
    path = make_tiny_model_dir(tmp_path_factory.mktemp(name), "llama")
    llm = LLM(str(path), num_kv_blocks=64)
    model = llm.engine.runner.model
    assert isinstance(model, LlamaForCausalLM)
    return llm, [m for m in model.modules() if isinstance(m, Linear)]


@needs_onednn_fp32
def test_fp32_takes_onednn_where_mkl_does_not_pay(
    monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory
) -> None:
    # On AMD MKL's pack (and F.linear, which is MKL) ran slower than oneDNN's fp32 pack.
    monkeypatch.delenv("BATON_PACKED_GEMM", raising=False)
    monkeypatch.setattr(packed_gemm, "fp32_pays", lambda: False)
    assert packed_gemm.fp32_kind() == packed_gemm.ONEDNN
    llm, linears = _fp32_model(tmp_path_factory, "llama-onednn")
    assert linears and all(m.pack_weight and m.fp32_pack == packed_gemm.ONEDNN
                           for m in linears)
    params = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
    llm.generate(prompt_token_ids=[list(range(10, 110))], params=params)
    # The 100-token prefill (past the fp32 tile kernel's 64 rows) ran the layers' GEMMs on
    # oneDNN's packs.
    layers = [m for m in linears if m is not llm.engine.runner.model.lm_head]
    assert all(m._packed is not None and m.onednn_pack() for m in layers)
    # A few rows without the native GEMV (no kernel) take the pack too: F.linear to
    # rounding.
    lin = layers[0]
    kernel, lin.kernel = lin.kernel, None
    x = torch.randn(3, lin.in_features)
    with torch.inference_mode():
        torch.testing.assert_close(lin(x), F.linear(x, lin.weight, lin.bias),
                                   rtol=1e-5, atol=1e-5)
    lin.kernel = kernel


def test_fp32_is_unpacked_where_neither_pack_applies(
    monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory
) -> None:
    monkeypatch.delenv("BATON_PACKED_GEMM", raising=False)
    monkeypatch.setattr(packed_gemm, "fp32_pays", lambda: False)
    monkeypatch.setattr(packed_gemm, "onednn_fp32_available", lambda: False)
    assert packed_gemm.fp32_kind() is None
    llm, linears = _fp32_model(tmp_path_factory, "llama-unpacked")
    assert not llm.engine.runner.model.use_packed_gemm(True)
    assert linears and not any(m.pack_weight for m in linears)
    llm.generate(prompt_token_ids=[list(range(10, 110))],
                 params=SamplingParams(max_tokens=2, temperature=0, ignore_eos=True))
    # A 100-token prefill packed nothing, and no fp32 tile copy was made (a packed copy too).
    assert all(m._packed is None and m._fp32_tiles is None for m in linears)


@pytest.mark.parametrize(("text", "vendor"), [
    ("processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: 25\n", "AuthenticAMD"),
    ("processor\t: 0\nvendor_id\t: GenuineIntel\n", "GenuineIntel"),
    ("processor\t: 0\nCPU implementer\t: 0x41\n", None),  # no vendor_id (arm64)
])
def test_cpu_vendor_reads_cpuinfo(tmp_path: Path, text: str, vendor: str | None) -> None:
    info = tmp_path / "cpuinfo"
    info.write_text(text)
    assert packed_gemm.cpu_vendor(str(info)) == vendor
    assert packed_gemm.cpu_vendor(str(tmp_path / "missing")) is None


def test_native_kv_write_equals_index_copy() -> None:
    lib = native.load()
    if lib is None:
        pytest.skip("no C compiler here: the native kernels are not built")
    hkv, dh, blocks, bs, t = 3, 8, 6, 4, 10
    gen = torch.Generator().manual_seed(0)
    qkv = torch.randn(t, (3 + 2 * hkv) * dh, generator=gen)  # q (3 heads), k, v in one row
    k = qkv[:, 3 * dh:(3 + hkv) * dh].view(t, hkv, dh)
    v = qkv[:, (3 + hkv) * dh:].view(t, hkv, dh)
    slots = torch.randperm(blocks * bs, generator=gen)[:t]
    kc, vc = torch.zeros(hkv, blocks, bs, dh), torch.zeros(hkv, blocks, bs, dh)
    assert native.kv_write(lib, k, v, kc, vc, slots)
    kr, vr = torch.zeros_like(kc), torch.zeros_like(vc)
    kr.view(hkv, -1, dh).index_copy_(1, slots, k.transpose(0, 1))
    vr.view(hkv, -1, dh).index_copy_(1, slots, v.transpose(0, 1))
    assert torch.equal(kc, kr) and torch.equal(vc, vr)
    with pytest.raises(ValueError, match="outside the cache"):
        native.kv_write(lib, k, v, kc, vc, torch.full((t,), blocks * bs))
    assert torch.equal(kc, kr)  # nothing written
    # A layout it does not take (heads not contiguous): declined, the caller uses torch.
    assert not native.kv_write(lib, k.transpose(1, 2).contiguous().transpose(1, 2), v, kc, vc,
                               slots)
