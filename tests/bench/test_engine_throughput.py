"""The engine benchmark's own parts: prompts, subsets, rooflines, report."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from bench import engine_throughput as et
from bench import roofline
from bench.report import DecodeResult, PathCompare, Report, Throughput, format_report


def test_prompts_are_deterministic_and_in_range() -> None:
    a = et.make_prompts(20, 50, 500, 1000, seed=3, allowed=lambda i: i >= 10)
    assert a == et.make_prompts(20, 50, 500, 1000, seed=3, allowed=lambda i: i >= 10)
    assert a != et.make_prompts(20, 50, 500, 1000, seed=4, allowed=lambda i: i >= 10)
    assert all(50 <= len(p) <= 500 for p in a)
    assert all(10 <= t < 1000 for p in a for t in p)


def test_spread_subset_spans_the_lengths() -> None:
    prompts = [[0] * n for n in range(1, 101)]
    subset = et.spread_subset(prompts, 4)
    assert [len(p) for p in subset] == [13, 38, 63, 88]
    assert et.spread_subset(prompts[:3], 5) == prompts[:3]


def test_bad_options_exit_with_usage_error() -> None:
    with pytest.raises(SystemExit) as exc:
        et.main(["--num-prompts", "0"])
    assert exc.value.code == 2
    with pytest.raises(SystemExit):
        et.main(["--decode-batches", "1,x"])


def test_roofline_measurements_are_positive() -> None:
    assert roofline.measure_matmul_gflops(n=64, repeats=1, trials=2) > 0
    assert roofline.measure_read_gbps(nbytes=1 << 20, trials=2) > 0


def _report(transformers: bool) -> Report:
    roof = roofline.Roofline(
        matmul_gflops=200.0, read_gbps=20.0, threads=2, matmul_size=2048, read_bytes=1 << 30
    )
    r = Report(
        model="m.gguf",
        parameters=100_000_000,
        weight_bytes=400_000_000,
        torch_version="2.13.0",
        roof=roof,
        num_prompts=64,
        prompt_len=(50, 500),
        output_len=128,
        seed=0,
    )
    r.throughput.append(Throughput("Baton", 64, 8192, 10.0))  # 819.2 tok/s
    r.decode.append(DecodeResult(batch=1, steps=8, tokens_per_s=40.0, median_step_s=0.025))
    r.decode.append(DecodeResult(batch=64, steps=8, tokens_per_s=600.0, median_step_s=0.1))
    if transformers:
        r.throughput.append(Throughput("transformers, one at a time", 4, 512, 10.0))
        r.throughput.append(Throughput("transformers, padded batches of 32", 64, 8192, 100.0))
        r.hf_decode_step_s = 0.030
    return r


def test_report_judges_the_targets() -> None:
    text = format_report(_report(transformers=True))
    # roofline: 200e9 / 2e8 = 1000 tok/s; batch 64 at 600 tok/s is 60%.
    assert "| 64 | 600.0 | 100.0 | 1000 | 60.0% | >= 50%: met |" in text
    assert "4 of 64 (rate extrapolated) | 51.2 | 16.0x | >= 15x: met |" in text
    assert "| 64 | 81.9 | 10.0x | >= 4x: met |" in text
    # memory roofline: 400 MB / 20 GB/s = 20 ms; 25 ms is 1.25x: missed.
    assert "| 20.0 | 1.25 | <= 1.2: missed |" in text
    assert "| 30.0 | 0.83 | <= 1: met |" in text


def test_memory_roofline_takes_the_higher_reading() -> None:
    # 20 GB/s at the start, 25 right after the batch-1 steps: the roofline is 400 MB / 25
    # GB/s = 16 ms, and the 25 ms step is 1.56x it; a lower later reading changes nothing.
    r = _report(transformers=False)
    r.read_gbps_beside_batch1 = 25.0
    text = format_report(r)
    assert ("| memory roofline (400 MB of weights at the 1 GiB sum's 25.0 GB/s) | 16.0 | 1.56 "
            "| <= 1.2: missed |") in text
    assert "best of 5; 25.0 right after the batch-1 steps)" in text
    assert r.to_json()["memory_roofline_step_s"] == pytest.approx(0.016)
    r.read_gbps_beside_batch1 = 15.0
    assert r.memory_roofline_step_s == pytest.approx(0.02)


def test_memory_roofline_is_the_step_weights_read_where_measured() -> None:
    # The step's own 380 MB read in 20 ms (19 GB/s): the 25 ms step is 1.25x that, missed;
    # the 1 GiB sum's 25 GB/s (400 MB in 16 ms) stays beside it, unjudged.
    r = _report(transformers=False)
    r.read_gbps_beside_batch1 = 25.0
    r.step_weights_read_s, r.step_weight_bytes = 0.020, 380_000_000
    text = format_report(r)
    assert ("| memory roofline: the step's 380 MB of weights read once where they lie "
            "(19.0 GB/s) | 20.0 | 1.25 | <= 1.2: missed |") in text
    assert ("| for reference: 400 MB of weights at the 1 GiB sum's 25.0 GB/s (another "
            "allocation) | 16.0 | 1.56 | |") in text
    data = r.to_json()
    assert data["memory_roofline_step_s"] == pytest.approx(0.020)
    assert data["bandwidth_step_s"] == pytest.approx(0.016)
    assert data["step_weight_bytes"] == 380_000_000
    r.step_weights_read_s = 0.022  # 25 / 22 = 1.14: met
    assert "| 22.0 | 1.14 | <= 1.2: met |" in format_report(r)


def test_report_without_transformers_and_its_json() -> None:
    r = _report(transformers=False)
    assert "transformers" not in format_report(r)
    data = r.to_json()
    assert data["throughput"][0]["tokens_per_s"] == pytest.approx(819.2)
    assert data["decode"][1]["compute_roofline_share"] == pytest.approx(0.6)
    assert data["memory_roofline_step_s"] == pytest.approx(0.02)


def test_report_compares_the_paths() -> None:
    r = _report(transformers=False)
    assert "on / off" not in format_report(r)
    r.paths.append(PathCompare("decode, batch 64", 32, on_step_s=0.150, off_step_s=0.200))
    r.paths.append(PathCompare("prefill, 512 tokens", 8, on_step_s=0.9, off_step_s=1.0,
                               switch="BATON_PACKED_GEMM"))
    text = format_report(r)
    assert "| decode, batch 64 | BATON_FUSED_OPS | 32 | 200.0 | 150.0 | 0.75 |" in text
    assert "| prefill, 512 tokens | BATON_PACKED_GEMM | 8 | 1000.0 | 900.0 | 0.90 |" in text
    assert r.to_json()["paths"][0]["on_step_s"] == pytest.approx(0.150)


def test_bf16_roofline_and_report_name_the_dtype() -> None:
    assert roofline.measure_matmul_gflops(n=64, repeats=1, trials=2, dtype=torch.bfloat16) > 0
    r = _report(transformers=False)
    r.roof = dataclasses.replace(r.roof, dtype="bfloat16")
    r.weight_bytes = 200_000_000
    text = format_report(r)
    assert "200 MB as bf16" in text and "bf16 matmul 200.0 GFLOP/s" in text
    with pytest.raises(SystemExit) as exc:
        et.main(["--dtype", "float16"])
    assert exc.value.code == 2


def test_native_step_switch_times_both_sides(tmp_path: object) -> None:
    # The switch flips the model's native decode step and puts it back; each side's
    # decode steps are timed (a tiny model: the timing itself is not judged).
    from engine import LLM, native
    from tests.engine.helpers import make_tiny_model_dir

    if native.load() is None:
        pytest.skip("no C compiler here: the native kernels are not built")
    llm = LLM(str(make_tiny_model_dir(tmp_path, "llama")), num_kv_blocks=64)  # type: ignore[arg-type]
    model = llm.engine.runner.model
    start = model.decode_step
    switch = et.NativeStepSwitch(llm.engine)
    assert switch.available and switch.decode_only and start is not None
    ran: list[bool] = []
    run = start.run

    def counted(*args: object) -> object:
        out = run(*args)  # type: ignore[arg-type]
        ran.append(out is not None)
        return out

    start.run = counted  # type: ignore[method-assign, assignment]
    result = et.compare_decode_paths(llm.engine, [[5, 6, 7], [8, 9]], 3, switch, warmup=1)
    del start.run
    assert (result.switch, result.steps) == ("BATON_NATIVE_STEP", 3)
    assert result.on_step_s > 0 and result.off_step_s > 0
    assert model.decode_step is start  # restored
    # The warm-up step and the three timed "on" steps ran natively; the "off" ones and
    # the prefill did not.
    assert sum(ran) == 1 + 3
    switch.use(False)
    assert model.decode_step is None
    switch.use(None)
    assert model.decode_step is start


def test_step_weights_read_times_the_decode_weights(tmp_path: object) -> None:
    from engine import LLM, native
    from tests.engine.helpers import make_tiny_model_dir

    if native.load() is None:
        pytest.skip("no C compiler here: the native kernels are not built")
    llm = LLM(str(make_tiny_model_dir(tmp_path, "llama")), num_kv_blocks=64)  # type: ignore[arg-type]
    measured = et.step_weights_read(llm.engine, torch.float32, trials=2)
    assert measured is not None
    seconds, nbytes = measured
    weights = llm.engine.runner.model.decode_weights(1, torch.float32)
    assert nbytes == sum(w.numel() * 4 for w in weights) > 0
    assert seconds > 0


def test_decode_timing_survives_a_prefill_of_several_steps(tmp_path: object) -> None:
    # At this token budget the batch's prefill takes several steps, so the first requests
    # to get a token are steps ahead of the last; every timed step still decodes the whole
    # batch (it used to give each request only the timed steps' tokens plus two, and the
    # early ones finished inside the window), and nothing is left running afterwards.
    from engine import LLM
    from tests.engine.helpers import make_tiny_model_dir

    llm = LLM(str(make_tiny_model_dir(tmp_path, "llama")), num_kv_blocks=64,  # type: ignore[arg-type]
              max_num_batched_tokens=32)
    prompts = [[(7 * i + j) % 200 + 3 for j in range(20)] for i in range(6)]
    result = et.run_baton_decode(llm.engine, prompts, steps=5, warmup=1)
    assert (result.batch, result.steps) == (6, 5)
    assert result.tokens_per_s > 0
    assert not llm.engine.has_unfinished()
