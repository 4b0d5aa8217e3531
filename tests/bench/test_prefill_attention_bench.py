"""bench.prefill_attention on a tiny setting: one row per dtype and length, both timed,
the kernel's result equal to SDPA's to the dtype's rounding."""

from __future__ import annotations

import pytest

from bench import prefill_attention as bench
from bench.attention_args import DTYPES
from engine import native

HERE = [name for name, dtype in DTYPES.items()
        if native.load() is not None and native.prefill_attention_takes(dtype, 64)]


@pytest.mark.skipif(not HERE, reason="no native prefill attention here")
def test_tiny_run_prints_a_row_per_dtype_and_length(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["--dtypes", ",".join(HERE), "--lengths", "20,33", "--heads", "4", "--kv-heads",
            "2", "--repeats", "2"]
    assert bench.main(argv) == 0
    out = capsys.readouterr().out
    rows = [[c.strip() for c in line.split("|")[1:-1]] for line in out.splitlines()
            if any(line.startswith(f"| {d} |") for d in HERE)]
    assert [(r[0], r[1]) for r in rows] == [(d, n) for d in HERE for n in ("20", "33")]
    for r in rows:
        assert float(r[2]) > 0 and float(r[3]) > 0  # both timed
        tol = 1e-5 if r[0] == "float32" else 3e-2  # bf16: probabilities rounded as torch's
        assert float(r[7]) < tol


def test_a_dtype_without_the_kernel_exits_1(monkeypatch: pytest.MonkeyPatch,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(native, "prefill_attention_takes", lambda dtype, head_dim: False)
    assert bench.main(["--dtypes", "float32", "--lengths", "16"]) == 1
    assert "no native prefill attention here for torch.float32" in capsys.readouterr().err


@pytest.mark.parametrize("argv, flag", [
    (["--dtypes", "float16"], "--dtypes"),
    (["--lengths", "0"], "--lengths"),
    (["--lengths", "a"], "--lengths"),
    (["--heads", "9", "--kv-heads", "2"], "--heads"),
    (["--threads", "0"], "--threads"),
])
def test_bad_arguments_exit_2_naming_the_flag(argv: list[str], flag: str,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        bench.main(argv)
    assert exc.value.code == 2
    assert flag in capsys.readouterr().err

