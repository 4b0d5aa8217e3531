"""The KV transfer benchmark end to end, in its quick mode (child processes included)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench import kv_transfer as bench


def test_quick_run_writes_sane_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "kv.json"

    assert bench.main(["--quick", "--json-out", str(out)]) == 0

    report = json.loads(out.read_text())
    rows = report["rows"]
    assert {r["backend"] for r in rows} == {"raw", "torch", "grpc", "local"}
    assert {(r["model"], r["tokens"]) for r in rows} == {
        ("smollm2-135m", 128),
        ("llama3-8b", 128),
    }
    for r in rows:
        assert r["nbytes"] > 0 and r["seconds"] > 0 and r["gbytes_per_s"] > 0
        assert (r["share_of_raw"] is None) == (r["backend"] == "raw")
        if r["share_of_raw"] is not None:
            assert r["share_of_raw"] > 0
    llama = next(r for r in rows if r["model"] == "llama3-8b")
    assert (
        llama["nbytes"] == 128 * 32 * 2 * 8 * 128 * 2
    )  # tokens * layers * kv * heads * dim * fp16
    assert len(report["first_transfer"]) == 6
    assert all(f["seconds"] > 0 for f in report["first_transfer"])
    assert "| torch | llama3-8b (float16) | 128 |" in capsys.readouterr().out


def test_bad_options_exit_with_usage_error() -> None:
    with pytest.raises(SystemExit) as exc:
        bench.main(["--models", "gpt-5"])
    assert exc.value.code == 2
    with pytest.raises(SystemExit):
        bench.main(["--repeats", "0"])
