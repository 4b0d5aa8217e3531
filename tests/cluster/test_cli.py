"""The `baton` command line: argument handling, fast help, errors without tracebacks."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest

from cluster import cli
from tests.plans import PLAN_ARGS


def test_help_does_not_import_torch() -> None:
    # `baton --help` must stay fast: the engine is imported inside the subcommands only.
    code = "import sys, cluster.cli; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_help_exits_zero(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        cli.main(["--help"])
    assert exc.value.code == 0
    assert "generate" in capsys.readouterr().out


def test_generate_help_says_offline(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        cli.main(["generate", "--help"])
    assert "offline" in capsys.readouterr().out


def test_bench_forwards_its_options() -> None:
    args = cli.build_parser().parse_args(
        ["bench", "engine", "--num-prompts", "3", "--json-out", "x.json"]
    )
    assert args.target == "engine"
    assert args.args == ["--num-prompts", "3", "--json-out", "x.json"]


@pytest.mark.parametrize(
    ("flags", "field"),
    [
        (["--temperature", "-1"], "temperature"),
        (["--max-tokens", "0"], "max_tokens"),
        (["--top-p", "1.5"], "top_p"),
    ],
)
def test_bad_sampling_flag_is_one_line_error(
    flags: list[str], field: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["generate", "--offline", "hello", *flags]) == cli.EXIT_USAGE
    err = capsys.readouterr().err
    assert err.startswith(f"error: {field}")
    assert "Traceback" not in err


def test_missing_model_is_one_line_error(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["generate", "--offline", "hello", "--model", "/nonexistent/model.gguf"]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: model") and "/nonexistent/model.gguf" in err


def test_generate_without_a_server_says_how_to_start_one(
    capsys: pytest.CaptureFixture[str],
) -> None:
    # Port 9 (discard) on loopback: nothing listens there.
    assert cli.main(["generate", "hello", "--target", "127.0.0.1:9"]) == cli.EXIT_USAGE
    err = capsys.readouterr().err
    assert err.startswith("error: no server answers at 127.0.0.1:9")
    assert "baton serve" in err and "Traceback" not in err


@pytest.fixture(scope="module")
def shared_llm() -> Any:
    from engine import LLM

    return LLM()  # loading is the slow part: every CLI call in this module reuses this one


@pytest.fixture
def real_engine(shared_llm: Any, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    import engine.llm

    monkeypatch.setattr(engine.llm, "LLM", lambda model=None: shared_llm)
    yield shared_llm
    stats = shared_llm.engine.stats()
    assert (stats.num_waiting, stats.num_running) == (0, 0)
    assert stats.free_blocks == stats.total_blocks  # the CLI left nothing allocated


@pytest.mark.slow
def test_generate_and_stream_print_the_same_greedy_text(
    real_engine: Any,
    capsys: pytest.CaptureFixture[str],
) -> None:
    argv = ["generate", "--offline", "The capital of France is", "--temperature", "0"]
    argv += ["--max-tokens", "8"]
    assert cli.main(argv) == 0
    plain = capsys.readouterr().out
    assert cli.main([*argv, "--stream"]) == 0
    streamed = capsys.readouterr().out
    assert plain.strip()
    assert streamed == plain


@pytest.mark.slow
def test_chat_same_seed_same_text_streamed_or_not(
    real_engine: Any,
    capsys: pytest.CaptureFixture[str],
) -> None:
    argv = ["generate", "--offline", "--chat", "Say hello.", "--max-tokens", "6", "--seed", "1"]
    assert cli.main(argv) == 0
    plain = capsys.readouterr().out
    assert plain.strip()
    assert cli.main([*argv, "--stream"]) == 0
    assert capsys.readouterr().out == plain




def test_plan_is_wired_in_and_prints_json(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main([*PLAN_ARGS, "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    roles = {i["role"] for i in plan["instances"]}
    assert roles <= {"prefill", "decode"} and roles


def test_plan_bad_slo_is_one_line_error(capsys: pytest.CaptureFixture[str]) -> None:
    argv = [("-1" if a == "0.25" else a) for a in PLAN_ARGS]
    assert cli.main(argv) == cli.EXIT_USAGE
    err = capsys.readouterr().err
    assert err.startswith("error: ttft") and "Traceback" not in err


def _plan_file(tmp_path: Any, text: str) -> tuple[Any, dict[str, Any]]:
    """The session's `baton plan` file (``llama13b_plan``), written to ``tmp_path``."""
    out = tmp_path / "plan.json"
    out.write_text(text)
    return out, json.loads(text)


def test_serve_plan_takes_counts_and_layouts_from_the_plan(
    tmp_path: Any, llama13b_plan: str
) -> None:
    path, plan = _plan_file(tmp_path, llama13b_plan)
    got = cli.plan_deployment(str(path))
    roles = [i["role"] for i in plan["instances"]]
    assert got["mode"] == "disaggregated"
    assert (got["prefill"], got["decode"]) == (roles.count("prefill"), roles.count("decode"))
    first = {i["role"]: (i["tp"], i["pp"]) for i in plan["instances"]}
    assert (got["prefill_parallel"], got["decode_parallel"]) == (first["prefill"], first["decode"])


def test_serve_plan_refuses_two_layouts_in_one_role(
    tmp_path: Any, llama13b_plan: str, capsys: pytest.CaptureFixture[str]
) -> None:
    path, plan = _plan_file(tmp_path, llama13b_plan)
    decode = next(i for i in plan["instances"] if i["role"] == "decode")
    other = 2 if decode["tp"] == 1 else 1
    gpus = list(range(8 - other, 8))  # the node's last GPUs, free in this small plan
    plan["instances"].append(
        {**decode, "tp": other, "pp": 1, "stages": [{"node": 0, "gpus": gpus}]}
    )
    path.write_text(json.dumps(plan))
    with pytest.raises(ValueError, match="^plan: decode instances must share one layout"):
        cli.plan_deployment(str(path))
    assert cli.main(["serve", "--plan", str(tmp_path / "nope.json")]) == cli.EXIT_USAGE
    assert capsys.readouterr().err.startswith("error: plan: no such file")


def test_serve_bad_profile_is_one_line_error(
    tmp_path: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["serve", "--profile", str(tmp_path / "none.json")]) == cli.EXIT_USAGE
    err = capsys.readouterr().err
    assert err.startswith("error: profile: no such file") and "Traceback" not in err
    (tmp_path / "bad.json").write_text('{"schema": "baton.latency_profiles", "version": 9}')
    assert cli.main(["serve", "--profile", str(tmp_path / "bad.json")]) == cli.EXIT_USAGE
    assert capsys.readouterr().err.startswith("error: version: must be 1")
