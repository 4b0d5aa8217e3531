"""SLO targets from `baton serve` flags or from the plan file: validated at start, with a
one-line error naming the flag (no cluster is started for a bad one)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from cluster import cli
from router.slo import SLOTargets, slo_settings


@pytest.fixture
def plan_file(llama13b_plan: str, tmp_path: Any) -> Any:
    """The session's `baton plan` file (tests/plans.py), written to ``tmp_path``."""
    out = tmp_path / "plan.json"
    out.write_text(llama13b_plan)
    return out


def test_no_flags_no_targets() -> None:
    assert slo_settings(None, None, None) == (None, None)


def test_flags_give_targets() -> None:
    targets, plan = slo_settings(0.5, 0.05, 0.95)
    assert targets == SLOTargets(0.5, 0.05, 0.95) and plan is None
    assert slo_settings(0.5, 0.05, None)[0] == SLOTargets(0.5, 0.05, 0.9)


def test_the_plan_gives_targets_and_predictions(plan_file: Any) -> None:
    data = json.loads(plan_file.read_text())
    targets, prediction = slo_settings(None, None, None, str(plan_file))
    assert targets == SLOTargets(0.25, 0.1, 0.9)
    assert prediction is not None
    assert prediction.attainment == data["predicted"]["attainment"]
    assert prediction.rate_rps == 10
    assert (prediction.mean_prompt_tokens, prediction.mean_output_tokens) == (512, 128)
    gpus = sum(i["tp"] * i["pp"] for i in data["instances"])
    assert prediction.max_goodput_rps == pytest.approx(data["predicted"]["per_gpu_goodput"] * gpus)
    # The simulated percentiles, as the live windows name them.
    for key in ("ttft_s", "tpot_s"):
        assert getattr(prediction, key) == data["predicted"][key]
        assert set(data["predicted"][key]) == {"p50", "p90", "p99"}
    # A plan file from before the percentiles: no latency predictions, the rest as before.
    for key in ("ttft_s", "tpot_s"):
        del data["predicted"][key]
    plan_file.write_text(json.dumps(data))
    older = slo_settings(None, None, None, str(plan_file))[1]
    assert older is not None and (older.ttft_s, older.tpot_s) == (None, None)
    assert older.attainment == prediction.attainment
    # A flag overrides the plan's value.
    assert slo_settings(1.0, None, None, str(plan_file))[0] == SLOTargets(1.0, 0.1, 0.9)


def test_a_plan_without_slos_is_refused(plan_file: Any) -> None:
    data = json.loads(plan_file.read_text())
    del data["slos"]
    plan_file.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="^slos: missing from the plan"):
        slo_settings(None, None, None, str(plan_file))


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--slo-ttft", "0", "--slo-tpot", "0.1"], "error: slo-ttft: must be a positive"),
        (["--slo-ttft", "1", "--slo-tpot", "-2"], "error: slo-tpot: must be a positive"),
        (["--slo-ttft", "1", "--slo-tpot", "0.1", "--slo-attainment", "1"],
         "error: slo-attainment: must be in (0, 1)"),
        (["--slo-ttft", "1", "--slo-tpot", "0.1", "--slo-attainment", "0"],
         "error: slo-attainment: must be in (0, 1)"),
        (["--slo-ttft", "1"], "error: slo-tpot: required"),
        (["--slo-attainment", "0.9"], "error: slo-attainment: needs --slo-ttft"),
    ],
)  # fmt: skip
def test_bad_flags_are_one_line_errors(
    flags: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["serve", *flags]) == cli.EXIT_USAGE
    err = capsys.readouterr().err
    assert err.startswith(message) and "Traceback" not in err
