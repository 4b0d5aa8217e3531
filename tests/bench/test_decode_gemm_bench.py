"""bench.decode_gemm on tiny shapes: one row per kernel and row count, each product close
to fp32's."""

from __future__ import annotations

import pytest

from bench import decode_gemm as bench
from engine import native
from engine.native import packed_gemm

needs_kernels = pytest.mark.skipif(
    native.load() is None or not packed_gemm.bf16_available(),
    reason="no native bf16 kernels or oneDNN packed bf16 GEMM here")


@needs_kernels
def test_tiny_run_prints_every_kernel_per_row_count(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["--shapes", "a=32x64,lm_head=48x64", "--layers", "2", "--rows", "1,3",
            "--repeats", "1"]  # fmt: skip
    assert bench.main(argv) == 0
    out = capsys.readouterr().out
    assert "3 weights" in out  # a layer of one weight twice, then the LM head once
    rows = [[c.strip() for c in line.split("|")[1:-1]] for line in out.splitlines()
            if line.startswith("| 1 |") or line.startswith("| 3 |")]  # fmt: skip
    tile = ["AMX" if native.amx_available() else "vnni"] if native.tile_linear_max_rows() else []
    assert [(r[0], r[1]) for r in rows] == [
        (m, k) for m in ("1", "3") for k in ["GEMV", "oneDNN", *tile]]
    for r in rows:
        assert float(r[2]) > 0 and float(r[6]) < 1e-2  # a time; bf16-close to fp32
    assert all(r[5] == "1.00" for r in rows if r[1] == "GEMV")


@pytest.mark.skipif(native.load() is None or not packed_gemm.onednn_fp32_available(),
                    reason="no native kernels or oneDNN packed fp32 GEMM here")
def test_fp32_run_adds_the_fp32_tile_kernel(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["--dtype", "float32", "--shapes", "a=32x64,lm_head=48x64", "--layers", "2",
            "--rows", "1,5", "--repeats", "1"]  # fmt: skip
    assert bench.main(argv) == 0
    out = capsys.readouterr().out
    assert "MB of float32 per step" in out
    rows = [[c.strip() for c in line.split("|")[1:-1]] for line in out.splitlines()
            if line.startswith("| 1 |") or line.startswith("| 5 |")]  # fmt: skip
    tile = ["fp32 tile"] if native.fp32_tile_max_rows() else []
    assert [(r[0], r[1]) for r in rows] == [
        (m, k) for m in ("1", "5") for k in ["GEMV", "oneDNN", *tile]]
    for r in rows:
        assert float(r[2]) > 0 and float(r[6]) < 1e-5  # a time; fp32's product to rounding


def test_bad_rows_exit_with_usage_error() -> None:
    with pytest.raises(SystemExit) as exc:
        bench.main(["--rows", "0,4"])
    assert exc.value.code == 2
