"""bench.packed_gemm on a tiny shape: one table row per shape and row count."""

from __future__ import annotations

import pytest

from bench import packed_gemm as bench
from engine.native import packed_gemm


@pytest.mark.skipif(not packed_gemm.available(), reason="torch without MKL")
def test_tiny_run_prints_a_row_per_shape_and_rows(capsys: pytest.CaptureFixture[str]) -> None:
    assert bench.main(["--shapes", "a=48x40,b=16x32", "--rows", "16,20", "--repeats", "2"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| a |")
            or line.startswith("| b |")]
    assert [r.split("|")[1:3] for r in rows] == [
        [" a ", " 16 "], [" a ", " 20 "], [" b ", " 16 "], [" b ", " 20 "]]
    assert all(r.rstrip().endswith("0.0e+00 |") for r in rows)  # the same products here


def test_bad_shapes_exit_with_usage_error() -> None:
    with pytest.raises(SystemExit) as exc:
        bench.main(["--shapes", "a=48by40"])
    assert exc.value.code == 2
