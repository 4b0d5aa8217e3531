"""``baton bench chunk-replay``: one engine fed Poisson arrivals offline per chunk. Its
parts (arrivals, pricing, options) and a replay of a tiny model end to end."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from bench import chunk_replay as cr
from tests.bench.test_peers_sim import write_profile

pytest.importorskip("transformers")


def test_arrivals_are_poisson_times_from_the_seed() -> None:
    times = cr.arrivals(10.0, 20.0, seed=1)
    assert times == cr.arrivals(10.0, 20.0, seed=1) != cr.arrivals(10.0, 20.0, seed=2)
    assert times == sorted(times) and times[0] > 0 and times[-1] < 20.0
    assert 150 < len(times) < 250  # 200 expected
    assert len(cr.arrivals(0.001, 1.0, seed=1)) == 1  # at least one request


def test_price_sends_each_step_kind_to_its_profile_method() -> None:
    profile = SimpleNamespace(
        prefill_ms=lambda tok, sq: 1000.0 * tok,
        decode_ms=lambda batch, ctx: 10.0 * batch,
        mixed_ms=lambda tok, sq, batch, ctx: 1000.0 * tok + 100.0 * batch,
    )
    steps = [cr.Step(2, 4, 0, 0, 1.0), cr.Step(0, 0, 3, 90, 1.0), cr.Step(1, 1, 2, 50, 1.0)]
    assert cr.price(steps, profile) == pytest.approx(2.0 + 0.03 + 1.2)


@pytest.mark.parametrize("argv", [["--budgets", "0"], ["--budgets", "x"], ["--budgets", ""],
                                  ["--rate", "0"], ["--seconds", "-1"], ["--threads", "0"],
                                  ["--profile", "/nonexistent/cpu.json"]])
def test_bad_options_exit_with_usage_error(argv: list[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        cr.main(argv)
    assert exc.value.code == 2


def test_replay_serves_every_request_within_the_budget(tmp_path: Path) -> None:
    from engine import LLM
    from tests.engine.helpers import make_tiny_model_dir

    path = make_tiny_model_dir(tmp_path / "m", "llama")
    llm = LLM(str(path), dtype="float32", max_num_batched_tokens=32, num_kv_blocks=256)
    times = cr.arrivals(40.0, 0.5, seed=3)
    prompts = [[5 + (i + j) % 200 for j in range(40)] for i in range(len(times))]
    result, steps = cr.replay(llm, prompts, times, 6, ttft_slo_s=60.0, tpot_slo_s=60.0)
    assert result.budget == 32 and result.requests == len(times)
    assert result.met == 1.0  # a minute's SLOs: every request
    # Each 40-token prompt prefilled once, in chunks: no step over the budget. A prompt
    # whose last token was left to a chunk of its own is computed as a decode row and
    # counted as one (``Chunk.is_decode``); where the chunks fall depends on when requests
    # arrive between steps, so that happens to some prompts in some runs and not others.
    tails = 40 * len(times) - sum(s.prefill_tokens for s in steps)
    assert 0 <= tails <= len(times)
    assert all(0 < s.prefill_tokens + s.decodes <= 32 for s in steps)
    # Six tokens each: one from the prefill, five decoded; plus the prompts' tails.
    assert sum(s.decodes for s in steps) == 5 * len(times) + tails
    assert result.busy_s == pytest.approx(sum(s.ms for s in steps) / 1e3)
    assert not llm.engine.has_unfinished()


def test_chunk_replay_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from tests.engine.helpers import make_tiny_model_dir

    path = make_tiny_model_dir(tmp_path / "m", "llama")
    out = tmp_path / "replay.json"
    code = cr.main(["--model", str(path), "--dtype", "float32", "--budgets", "16,64",
                    "--rate", "20", "--seconds", "0.3", "--input-len", "24", "--output-len", "4",
                    "--threads", "1", "--profile", str(write_profile(tmp_path)),
                    "--json-out", str(out)])
    assert code == 0
    rows = json.loads(out.read_text())
    assert [r["budget"] for r in rows] == [16, 64]
    assert rows[0]["requests"] == rows[1]["requests"] == len(cr.arrivals(20, 0.3, 11))
    assert all(r["predicted_busy_s"] > 0 and 0 <= r["simulated_met"] <= 1 for r in rows)
    table = capsys.readouterr().out
    assert "| chunk (max_num_batched_tokens) |" in table and "\n| 64 | " in table
