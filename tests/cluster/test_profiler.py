"""``baton profile`` on a tiny random-weight Llama: every shape is timed as the step it
claims to be, the fit is a usable planner profile, and ``baton plan`` reads the file."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from cluster import cli
from cluster.planner.latency import fit_profile, load_profiles
from cluster.profiler import EngineProfiler, ProfileGrid, build_engine, profile_engine
from tests.engine.helpers import make_tiny_model_dir

GRID = ProfileGrid(
    prefill_lengths=(8, 32, 96),
    prefill_batches=(1, 3),
    decode_batches=(1, 3, 6),
    decode_contexts=(16, 80),
    decode_steps=2,
    repeats=1,
    max_batch_tokens=128,  # 3 x 96 is skipped; 6 x 80 decodes prefill in chunks
)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model_dir(tmp_path_factory.mktemp("tiny"), "llama")


@pytest.fixture(scope="module")
def engine(tiny: Path) -> Any:
    return build_engine(str(tiny), GRID, dtype="float32")


def test_samples_have_the_shapes_of_the_grid(engine: Any) -> None:
    prefill, decode = EngineProfiler(engine).run(GRID)
    assert [list(ls) for ls, _ in prefill] == [
        [8], [8, 8, 8], [32], [32, 32, 32], [96],
    ]  # fmt: skip
    assert [len(ctx) for ctx, _ in decode] == [1, 3, 6, 1, 3, 6]
    # Contexts are the requests' real lengths during the timed step: at least the prompt
    # and the first token, more for requests that decoded while the batch was prefilling.
    for (ctx, _), (_, context) in zip(decode, GRID.decode_shapes(), strict=True):
        assert min(ctx) >= context + 1
    assert all(ms > 0 for _, ms in [*prefill, *decode])
    blocks = engine.block_manager
    assert blocks.num_free_blocks == blocks.num_blocks and not engine.has_unfinished()


def test_the_fit_predicts_positive_latencies(engine: Any) -> None:
    profile = profile_engine(engine, GRID)
    assert (profile.tp, profile.pp) == (1, 1)
    for coeffs in (profile.prefill, profile.decode_small, profile.decode_large):
        assert all(math.isfinite(c) for c in coeffs)
    assert profile.prefill_ms(96, 96 * 96) > 0 and profile.decode_ms(6, 6 * 80) > 0


def test_bad_grid_names_the_field() -> None:
    with pytest.raises(ValueError, match="^decode_batches: "):
        ProfileGrid(decode_batches=(0,))


def test_the_cli_writes_a_profile_that_plan_reads(
    tiny: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import cluster.profiler as profiler

    monkeypatch.setattr(profiler, "QUICK_GRID", GRID)
    out = tmp_path / "profile.json"
    argv = ["profile", "--model", str(tiny), "--quick", "--out", str(out), "--threads", "1"]
    assert cli.main(argv) == 0
    assert "written to" in capsys.readouterr().out
    profiles = load_profiles(out)
    assert list(profiles.profiles) == [(1, 1)] and profiles.gpu == "cpu"

    plan = [
        "plan", "--model", "smollm2-135m", "--nodes", "1", "--gpus-per-node", "2",
        "--profile", str(out), "--workload", "synthetic:in=32,out=8", "--ttft-slo", "5",
        "--tpot-slo", "1", "--attainment", "0.9", "--rate", "0.5", "--json",
    ]  # fmt: skip
    assert cli.main(plan) == 0
    assert json.loads(capsys.readouterr().out)["instances"]


class BurstyTimes(EngineProfiler):
    """Step times of a linear model (no engine); a shape in ``burst`` is slowed by its
    factors, one per timing, the first times it is timed: a burst of the machine's other
    work."""

    def __init__(self, burst: dict[tuple[str, int, int], list[float]]):
        super().__init__(SimpleNamespace(model_config=SimpleNamespace(vocab_size=100)))
        self.burst = burst
        self.timed: list[tuple[str, int, int]] = []

    def _factor(self, shape: tuple[str, int, int]) -> float:
        self.timed.append(shape)
        factors = self.burst.get(shape, [])
        n = self.timed.count(shape)
        return factors[n - 1] if n <= len(factors) else 1.0

    def prefill_ms(self, batch: int, length: int) -> float:
        return (10 + 0.5 * batch * length) * self._factor(("prefill", batch, length))

    def decode_ms(self, batch: int, context: int, steps: int) -> list[tuple[list[int], float]]:
        ms = (5 + 0.01 * batch * context + batch) * self._factor(("decode", batch, context))
        return [([context + 1 + s] * batch, ms) for s in range(steps)]


def test_a_second_look_retimes_the_shapes_a_burst_of_load_slowed() -> None:
    burst = {("prefill", 3, 32): [4.0], ("decode", 6, 16): [3.0]}
    profiler = BurstyTimes(burst)
    prefill, decode = profiler.run(GRID)
    # Each slowed shape was timed once more, and no other shape was (the first prefill
    # of 1 x 16 is the warm-up).
    again = [s for s in profiler.timed[1:] if profiler.timed.count(s) > 1]
    assert sorted(again) == sorted([*burst, *burst])
    assert [ms for _, ms in prefill] == [10 + 0.5 * b * n for b, n in GRID.prefill_shapes()]
    assert decode[GRID.decode_shapes().index((6, 16))][1] == 5 + 0.01 * 6 * 16 + 6
    assert fit_profile(prefill, decode).prefill == pytest.approx((10, 0.5, 0), abs=1e-6)


def test_a_shape_slow_both_times_keeps_the_lower_time() -> None:
    for factors, kept in (([4.0, 3.0], 3.0), ([3.0, 4.0], 3.0)):
        prefill, _ = BurstyTimes({("prefill", 3, 32): factors}).run(GRID)
        assert prefill[GRID.prefill_shapes().index((3, 32))][1] == (10 + 0.5 * 96) * kept
