from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from cluster.planner.cli import add_parsers
from cluster.planner.plan import Plan

BASE = [
    "plan",
    "--model",
    "llama-13b",
    "--nodes",
    "1",
    "--gpus-per-node",
    "4",
    "--workload",
    "synthetic:in=512,out=128,cv=0.5",
    "--ttft-slo",
    "0.25",
    "--tpot-slo",
    "0.1",
    "--rate",
    "10",
    "--max-pp",
    "1",
]


def _run(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="baton")
    add_parsers(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return int(args.func(args))


def test_plan_prints_a_table_and_progress(capsys: pytest.CaptureFixture[str]) -> None:
    assert _run([*BASE, "--gpu", "A100-80G"]) == 0
    out, err = capsys.readouterr()
    assert out.startswith("plan: llama-13b on 1 x 4 A100-80G (analytic:A100-80G)")
    assert "role       tp  pp  gpus  placement" in out
    assert "\nprefill " in out and "\ndecode " in out
    assert "per-GPU goodput" in out and "colocated" in out
    assert "planning: done:" in err


def test_plan_json_and_plan_file_agree(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out_file = tmp_path / "plan.json"
    assert _run([*BASE, "--gpu", "A100-80G", "--json", "--seed", "4", "--out", str(out_file)]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["schema"] == "baton.plan" and printed["seed"] == 4
    assert printed["slos"] == {"ttft_s": 0.25, "tpot_s": 0.1, "attainment": 0.9}
    assert {i["role"] for i in printed["instances"]} == {"prefill", "decode"}
    assert Plan.from_json(out_file.read_text()).to_dict() == printed


def test_plan_from_a_distserve_profile_and_a_config_dir(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    entry = {
        "decoding_large_small_bs_threshold": 95,
        "prefill": [16.46, 0.0926, 6.47e-06],
        "decoding_smallbs": [19.93, 0.000627, 0.0385],
        "decoding_largebs": [7.17, 0.00058, 0.158],
    }
    profile = tmp_path / "profiler.json"
    profile.write_text(json.dumps({"facebook/opt-13b": {"1": entry, "2": entry}}))
    model_dir = tmp_path / "opt-13b"
    model_dir.mkdir()
    config = {
        "model_type": "opt",
        "hidden_size": 5120,
        "ffn_dim": 20480,
        "num_attention_heads": 40,
        "num_hidden_layers": 40,
        "vocab_size": 50272,
    }
    (model_dir / "config.json").write_text(json.dumps(config))
    argv = [*BASE, "--profile", str(profile), "--json"]
    argv[argv.index("llama-13b")] = str(model_dir)
    assert _run(argv) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["model"] == "opt-13b"
    assert data["cluster"]["gpu"] == "custom" and data["cluster"]["memory_gb"] == 80.0
    assert data["profile_source"] == f"file:{profile}"
    assert {i["tp"] for i in data["instances"]} <= {1, 2}


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (("--rate", "0"), "^rate: must be > 0"),
        (("--attainment", "2"), "^attainment: must be in"),
        (("--workload", "synthetic:in=5"), "^workload.out: missing"),
        (("--model", "gpt-9"), "^model: must be a preset"),
        (("--nodes", "0"), "^nodes: must be an integer >= 1"),
    ],
)
def test_bad_input_raises_value_error_naming_the_field(
    change: tuple[str, str], message: str
) -> None:
    argv = [*BASE, "--gpu", "A100-80G", *change]  # the last occurrence of a flag wins
    with pytest.raises(ValueError, match=message):
        _run(argv)


def test_gpu_and_profile_are_exclusive(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        _run([*BASE, "--gpu", "A100-80G", "--profile", "x.json"])
    assert "not allowed with argument" in capsys.readouterr().err
