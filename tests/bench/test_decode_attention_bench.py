"""bench.decode_attention on a tiny setting: one row per dtype and batch, each with an
attention time, a read time and the cache size the arguments imply."""

from __future__ import annotations

import pytest

from bench import decode_attention as bench
from engine import native


@pytest.mark.skipif(native.load() is None, reason="no native kernels here")
def test_tiny_run_prints_a_row_per_dtype_and_batch(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["--batches", "1,8", "--context", "200", "--layers", "2", "--heads", "4",
            "--kv-heads", "2", "--head-dim", "64", "--block-size", "16", "--repeats", "2"]
    assert bench.main(argv) == 0
    out = capsys.readouterr().out
    rows = [[c.strip() for c in line.split("|")[1:-1]] for line in out.splitlines()
            if line.startswith("| float32 |") or line.startswith("| bfloat16 |")]
    assert [(r[0], r[1]) for r in rows] == [
        (d, b) for d in ("float32", "bfloat16") for b in ("1", "8")]
    for r in rows:
        dtype_bytes = 4 if r[0] == "float32" else 2
        blocks = int(r[1]) * 13  # 200 tokens in blocks of 16
        cache = 2 * 2 * 2 * blocks * 16 * 64 * dtype_bytes  # layers x (K, V) x [Hkv, N, bs, D]
        assert r[2] == f"{cache / 1e6:.1f}"
        assert float(r[3]) > 0 and float(r[4]) > 0 and float(r[6]) > 0  # both were timed


@pytest.mark.parametrize("argv, field", [
    (["--dtypes", "float16"], "--dtypes"),
    (["--batches", "0,4"], "--batches"),
    (["--heads", "9", "--kv-heads", "2"], "--heads"),
    (["--context", "0"], "--context"),
    (["--threads", "0"], "--threads"),
])
def test_bad_arguments_exit_with_a_usage_error_naming_the_flag(
        argv: list[str], field: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        bench.main(argv)
    assert exc.value.code == 2
    assert field in capsys.readouterr().err
