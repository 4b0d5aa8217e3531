"""``baton bench burst-replay``: the peers bench's burst on one engine in this process, on a
tiny model end to end (without a busy neighbour, with one spinning periodically and with
one spinning after each step), and its options."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from bench import burst_replay as br

pytest.importorskip("transformers")


def _neighbours() -> list[int]:
    """This process's children running the neighbour's loop."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as f:
                parent = int(f.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read()
        except OSError:
            continue
        if parent == os.getpid() and b"while time.perf_counter() - start < busy" in cmd:
            found.append(int(pid))
    return found


def test_a_tiny_burst_runs_every_request_at_most_n_at_once(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from tests.engine.helpers import make_tiny_model_dir

    path = make_tiny_model_dir(tmp_path / "m", "llama")
    out = tmp_path / "burst.json"
    argv = ["--model", str(path), "--prompts", "6", "--max-concurrency", "2", "--input-len",
            "20", "--output-len", "3", "--budget", "32", "--threads", "1"]  # fmt: skip
    assert br.main([*argv, "--neighbour", "1/5", "--json-out", str(out)]) == 0
    got = json.loads(out.read_text())
    assert got["requests"] == 6 and got["max_in_flight"] == 2
    assert got["output_tokens"] == 6 * 3
    kinds = got["kinds"]
    # Every prompt token prefilled once; a prompt's last token may fall to a chunk of its
    # own and count as a decode row (``Chunk.is_decode``), as in the chunk replay.
    prefilled = sum(k["prompt_tokens"] for k in kinds.values())
    assert 6 * 20 - 6 <= prefilled <= 6 * 20
    rows = sum(k["decode_rows"] for k in kinds.values())
    assert rows == 6 * 2 + (6 * 20 - prefilled)  # two decoded tokens each, plus the tails
    assert got["busy_s"] == pytest.approx(sum(k["seconds"] for k in kinds.values()))
    assert 0 < got["busy_s"] <= got["wall_s"]
    assert got["neighbour_cpu_s"] > 0  # it ran, and was read before it was killed
    assert _neighbours() == []  # and is gone
    report = capsys.readouterr().out
    assert "6 requests of 20 prompt tokens, 3 out, at most 2 in flight" in report
    assert "neighbour (1/5 ms busy/period) took" in report
    assert "| decode | " in report

    assert br.main(argv) == 0  # no neighbour: none started, none reported
    assert "neighbour" not in capsys.readouterr().out

    # One spinning 1 ms after each step: it ran once per step at least partly, and is gone.
    assert br.main([*argv, "--neighbour-per-step", "1", "--json-out", str(out)]) == 0
    got = json.loads(out.read_text())
    assert got["output_tokens"] == 6 * 3 and got["neighbour_cpu_s"] > 0
    assert _neighbours() == []
    assert "neighbour (1 ms after each step) took" in capsys.readouterr().out


def test_the_neighbours_duty_is_parsed_and_checked() -> None:
    assert br.neighbour_duty("2/20") == (2.0, 20.0)
    assert br.neighbour_duty("0.5/4") == (0.5, 4.0)
    for bad in ("2", "20/2", "0/10", "a/b", "1/2/3"):
        with pytest.raises(ValueError, match="neighbour"):
            br.neighbour_duty(bad)


@pytest.mark.parametrize("argv", [["--prompts", "0"], ["--max-concurrency", "0"],
                                  ["--budget", "0"], ["--neighbour", "20/2"],
                                  ["--neighbour-per-step", "0"],
                                  ["--dtype", "float16"]])  # fmt: skip
def test_bad_options_exit_with_usage_error(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exc:
        br.main(argv)
    assert exc.value.code == 2
    flag = argv[0]
    assert flag in capsys.readouterr().err
