"""The native decode step (``engine.models.native_step``: a decode step's decoder layers in
one C call): the same bits as the fused path's per-kernel calls, taken only by steps whose
every GEMM runs in C, and left where it would skip something (a forward hook, a prefill)."""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import torch

from engine import LLM, SamplingParams, native
from engine.models.llama import DecoderLayer, Linear, LlamaForCausalLM, RMSNorm
from engine.models.native_step import NativeDecodeStep
from tests.engine.helpers import llama_model, make_tiny_model_dir, skip_without_native_kernels

pytest.importorskip("transformers")


@pytest.fixture(scope="module", autouse=True)
def _kernel() -> None:
    skip_without_native_kernels()


# Per fused forward: its rows, whether the step was decode tokens only, whether it ran
# natively.
Call = tuple[int, bool, bool]


@contextmanager
def _recorded(llm: LLM) -> Iterator[tuple[list[torch.Tensor], list[Call]]]:
    """Every forward's hidden states, and every call of the native step."""
    model = llama_model(llm)
    step = model.decode_step
    hidden: list[torch.Tensor] = []
    calls: list[Call] = []
    forward = model.forward

    def record(*args: object) -> torch.Tensor:
        out = forward(*args)  # type: ignore[arg-type]
        hidden.append(out.clone())
        return out

    run = step.run if step is not None else None

    def counted(model: LlamaForCausalLM, x: torch.Tensor, positions: torch.Tensor,
                backend: object, meta: Any, *rest: object) -> torch.Tensor | None:
        assert run is not None
        rows = x.shape[0]
        decode_only = meta.num_decode == rows and not meta.prefills
        out = run(model, x, positions, backend, meta, *rest)  # type: ignore[arg-type]
        calls.append((rows, decode_only, out is not None))
        return out

    model.forward = record  # type: ignore[method-assign, assignment]
    if step is not None:
        step.run = counted  # type: ignore[method-assign, assignment]
    try:
        yield hidden, calls
    finally:
        del model.forward
        if step is not None:
            del step.run


def _generate(llm: LLM, prompts: list[list[int]], native_step: bool,
              ) -> tuple[list[list[int]], list[torch.Tensor], list[Call]]:
    model = llama_model(llm)
    start = model.decode_step
    model.decode_step = start if native_step else None
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    # Each run prefills its prompts in full: a prefix-cache hit would change the steps.
    llm.engine.block_manager.reset_prefix_cache()
    try:
        with _recorded(llm) as (hidden, calls):
            out = llm.generate(prompt_token_ids=prompts, params=params)
    finally:
        model.decode_step = start
    return [o.token_ids for o in out], hidden, calls


def _ran(calls: list[Call]) -> int:
    return sum(native for _, _, native in calls)


def _tiny(tmp_path_factory: pytest.TempPathFactory, make_llm: Callable[..., LLM], arch: str,
          dtype: str) -> LLM:
    path = make_tiny_model_dir(tmp_path_factory.mktemp(f"{arch}-step"), arch)
    return make_llm(str(path), dtype=dtype, max_num_batched_tokens=64)


def _native_rows(dtype: str) -> int:
    """The most decode rows whose GEMMs all run in C by default here: the tile kernels'
    where the weights are packed (bf16 always; fp32 where a packed GEMM is taken), else
    the GEMV's."""
    from engine.models.llama import SMALL_LINEAR_MAX_ROWS
    from engine.native import packed_gemm

    packed = dtype == "bfloat16" or packed_gemm.fp32_kind() is not None
    tiles = native.tile_rows(getattr(torch, dtype)) if packed else 0
    return max(tiles, SMALL_LINEAR_MAX_ROWS)


# qwen2 has a qkv bias (the driver adds it); llama has none.
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_native_step_equals_per_kernel_path(
    arch: str, dtype: str, tmp_path_factory: pytest.TempPathFactory,
    make_llm: Callable[..., LLM],
) -> None:
    llm = _tiny(tmp_path_factory, make_llm, arch, dtype)
    assert llama_model(llm).decode_step is not None  # on by default
    rng = random.Random(3)
    vocab = llm.engine.model_config.vocab_size
    most = _native_rows(dtype)
    rows_seen: set[int] = set()
    for batch in (1, 3, 6):
        prompts = [[rng.randrange(vocab) for _ in range(n)] for n in (5, 17, 40, 2, 9, 30)[:batch]]
        tokens, hidden, calls = _generate(llm, prompts, native_step=True)
        ref_tokens, ref_hidden, _ = _generate(llm, prompts, native_step=False)
        assert tokens == ref_tokens
        assert len(hidden) == len(ref_hidden)
        # Bit for bit, every step: the native step runs the same kernels in the same order.
        assert all(torch.equal(a, b) for a, b in zip(hidden, ref_hidden, strict=True))
        # Natively exactly the decode-only steps whose GEMMs all run in C.
        assert [native for _, _, native in calls] == [
            decode_only and rows <= most for rows, decode_only, _ in calls], calls
        rows_seen.update(rows for rows, decode_only, _ in calls if decode_only)
    assert 6 in rows_seen and 1 in rows_seen  # both sides of the fp32 GEMV's 4 rows


def test_native_step_leaves_hooked_layers_to_python(
    tmp_path_factory: pytest.TempPathFactory, make_llm: Callable[..., LLM]
) -> None:
    # A forward hook (tensor parallelism's all-reduce) must run: the C call would skip it.
    llm = _tiny(tmp_path_factory, make_llm, "llama", "float32")
    model = llama_model(llm)
    seen: list[int] = []
    layer = model.layers[1]
    assert isinstance(layer, DecoderLayer)
    handle = layer.mlp.down_proj.register_forward_hook(
        lambda _m, _i, out: seen.append(out.shape[0]))
    model.routes_changed()
    try:
        tokens, _, calls = _generate(llm, [[4, 5, 6, 7]], native_step=True)
        assert _ran(calls) == 0
        assert len(seen) == 12  # the prefill and eleven decode steps, each through the hook
    finally:
        handle.remove()
        model.routes_changed()
    again, _, calls = _generate(llm, [[4, 5, 6, 7]], native_step=True)
    assert _ran(calls) == 11 and again == tokens


def test_native_step_follows_packed_gemm_switch(
    tmp_path_factory: pytest.TempPathFactory, make_llm: Callable[..., LLM]
) -> None:
    # bf16 without packing: decode GEMMs of up to 4 rows go to the GEMV, so steps of 6
    # rows leave C and steps of 2 stay; the tables follow the switch.
    llm = _tiny(tmp_path_factory, make_llm, "llama", "bfloat16")
    model = llama_model(llm)
    prompts = [[3 + i, 8, 9 + i] for i in range(6)]
    packed_at_start = model.use_packed_gemm(False)
    try:
        tokens, hidden, calls = _generate(llm, prompts, native_step=True)
        assert _ran(calls) == 0
        tokens2, _, calls = _generate(llm, prompts[:2], native_step=True)
        assert _ran(calls) == 11
        ref_tokens, ref_hidden, _ = _generate(llm, prompts, native_step=False)
        assert tokens == ref_tokens
        assert all(torch.equal(a, b) for a, b in zip(hidden, ref_hidden, strict=True))
    finally:
        model.use_packed_gemm(packed_at_start)
    assert tokens2 == tokens[:2]


def test_a_slot_outside_the_cache_writes_nothing(
    tmp_path_factory: pytest.TempPathFactory, make_llm: Callable[..., LLM],
) -> None:
    """The driver checks the step's slots at the first layer's KV write: a bad one raises
    before any write to the residual stream or a cache, and the step can run again."""
    llm = _tiny(tmp_path_factory, make_llm, "llama", "float32")
    step = llama_model(llm).decode_step
    assert step is not None
    run = step.run
    checked: list[bool] = []

    def bad_slot_first(model: LlamaForCausalLM, x: torch.Tensor, positions: torch.Tensor,
                       backend: Any, meta: Any, caches: list[Any],
                       lib: Any) -> torch.Tensor | None:
        if not checked and meta.num_decode == x.shape[0] and not meta.prefills:
            good = meta.slot_mapping
            blocks, block_size = caches[0].k.shape[1], caches[0].k.shape[2]
            meta.slot_mapping = good.clone()
            meta.slot_mapping[-1] = blocks * block_size  # one past the last slot
            state = [x, *(c.k for c in caches), *(c.v for c in caches)]
            before = [t.clone() for t in state]
            with pytest.raises(ValueError, match="kv cache: a slot is outside the cache"):
                run(model, x, positions, backend, meta, caches, lib)
            checked.append(all(torch.equal(a, b) for a, b in zip(before, state, strict=True)))
            meta.slot_mapping = good
        return run(model, x, positions, backend, meta, caches, lib)

    prompts = [[5, 6, 7], [8, 9]]
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)  # as _generate's
    llm.engine.block_manager.reset_prefix_cache()
    step.run = bad_slot_first  # type: ignore[method-assign]
    try:
        out = llm.generate(prompt_token_ids=prompts, params=params)
    finally:
        del step.run
    assert checked == [True]
    assert [o.token_ids for o in out] == _generate(llm, prompts, native_step=True)[0]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_decode_weights_are_the_tensors_a_decode_step_reads(
    dtype: str, tmp_path_factory: pytest.TempPathFactory, make_llm: Callable[..., LLM],
) -> None:
    # The engine benchmark's memory roofline reads these: every weight of the step once,
    # the copies its kernels stream (the native step's table points at them), not the
    # embedding (a tied LM head is counted once).
    llm = _tiny(tmp_path_factory, make_llm, "llama", dtype)
    model = llama_model(llm)
    step = model.decode_step
    assert step is not None
    _generate(llm, [[4, 5, 6, 7]], native_step=True)
    tables = [entry.table for _, entry in step._tables.values() if entry is not None]
    assert len(tables) == 1
    weights = model.decode_weights(1, getattr(torch, dtype))
    ptrs = [w.data_ptr() for w in weights]
    assert len(set(ptrs)) == len(ptrs)
    names = native.DECODE_LAYER_POINTERS
    read = {name: tables[0][:, names.index(name)].tolist()
            for name in ("input_norm", "post_attention_norm", "qkv", "o_proj", "gate_up", "down")}
    assert all(p in ptrs for column in read.values() for p in column)
    linears = [m for m in model.modules() if isinstance(m, Linear)]
    norms = [m for m in model.modules() if isinstance(m, RMSNorm)]
    size = torch.finfo(getattr(torch, dtype)).bits // 8
    assert sum(w.numel() * w.element_size() for w in weights) == size * (
        sum(lin.weight.numel() for lin in linears) + sum(n.weight.numel() for n in norms))
    for lin in linears:  # a tile-layout copy where the kernel takes the weight's shape
        tiles = (dtype == "bfloat16" and native.tile_linear_max_rows() > 0
                 and native.amx_packable(lin.weight))
        copy = lin.decode_weight(1, getattr(torch, dtype))
        assert copy.data_ptr() in ptrs
        assert (copy.data_ptr() != lin.weight.data_ptr()) == tiles


def test_native_step_switch(
    monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory
) -> None:
    path = make_tiny_model_dir(tmp_path_factory.mktemp("llama-native-step"), "llama")
    monkeypatch.setenv("BATON_NATIVE_STEP", "0")
    llm = LLM(str(path), num_kv_blocks=64)
    assert llama_model(llm).decode_step is None
    assert llama_model(llm).fused is not None  # the per-kernel fused path stays
    monkeypatch.delenv("BATON_NATIVE_STEP")
    llm = LLM(str(path), num_kv_blocks=64)
    assert isinstance(llama_model(llm).decode_step, NativeDecodeStep)


def test_decode_layers_rejects_a_wrong_shape() -> None:
    lib = native.load()
    assert lib is not None
    with pytest.raises(ValueError, match="decode_layers: x must be"):
        native.decode_layers(
            lib, native.LINEAR_GEMV, torch.zeros(2, 8), torch.zeros(1, 9, dtype=torch.long),
            torch.ones(16), (2, 1, 8, 32, 16), 1e-5, torch.zeros(4, 8), torch.zeros(4, 8),
            torch.zeros(2, dtype=torch.long), torch.zeros(2, dtype=torch.long),
            torch.zeros(2, 1, dtype=torch.long), torch.ones(2, dtype=torch.long), 1, (1, 16),
            0.25)
