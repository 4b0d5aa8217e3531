"""bench.packed_gemm on a tiny shape: one table row per shape and row count."""

from __future__ import annotations

import pytest

from bench import packed_gemm as bench
from engine.native import packed_gemm


@pytest.mark.skipif(not (packed_gemm.available() and packed_gemm.onednn_fp32_available()),
                    reason="torch without MKL or without oneDNN's fp32 pack")
def test_tiny_run_prints_a_row_per_shape_and_rows(capsys: pytest.CaptureFixture[str]) -> None:
    assert bench.main(["--shapes", "a=48x40,b=16x32", "--rows", "16,20", "--repeats", "2"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert any("MKL (us)" in line and "oneDNN (us)" in line for line in out)
    rows = [line.split("|")[1:-1] for line in out
            if line.startswith("| a |") or line.startswith("| b |")]
    assert [r[:2] for r in rows] == [
        [" a ", " 16 "], [" a ", " 20 "], [" b ", " 16 "], [" b ", " 20 "]]
    for r in rows:
        assert len(r) == 3 + 2 * 3  # F.linear, then time, ratio, difference per pack
        assert float(r[5]) == 0.0  # MKL's pack: F.linear's products here
        assert float(r[8]) < 1e-5  # oneDNN's: to rounding


def test_bad_shapes_exit_with_usage_error() -> None:
    with pytest.raises(SystemExit) as exc:
        bench.main(["--shapes", "a=48by40"])
    assert exc.value.code == 2
