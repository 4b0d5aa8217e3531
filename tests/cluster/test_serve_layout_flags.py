"""`baton serve --prefill-parallel/--decode-parallel TPxPP` and `--cpus-per-rank N`: the
flags the Helm chart's head command passes (no plan file in a pod)."""

from __future__ import annotations

import argparse

import pytest

from cluster.cli import build_parser, main, parse_layout


@pytest.mark.parametrize("text,want", [("1x1", (1, 1)), ("2x1", (2, 1)), ("1X4", (1, 4))])
def test_layouts_parse(text: str, want: tuple[int, int]) -> None:
    assert parse_layout(text) == want


@pytest.mark.parametrize("text", ["2", "2x", "x2", "0x1", "2x0", "-1x2", "2y1", "1.5x1"])
def test_bad_layouts_are_refused(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError, match="must be TPxPP"):
        parse_layout(text)


def test_serve_takes_the_flags() -> None:
    args = build_parser().parse_args(
        ["serve", "--prefill-parallel", "2x1", "--decode-parallel", "1x2", "--cpus-per-rank", "1.5"]
    )
    assert (args.prefill_parallel, args.decode_parallel, args.cpus_per_rank) == (
        (2, 1),
        (1, 2),
        1.5,
    )
    args = build_parser().parse_args(["serve"])
    assert (args.prefill_parallel, args.decode_parallel, args.cpus_per_rank) == (None, None, None)


def test_bad_flags_exit_2_naming_the_flag(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["serve", "--decode-parallel", "2by1"])
    assert info.value.code == 2
    assert "--decode-parallel: must be TPxPP" in capsys.readouterr().err
    assert main(["serve", "--cpus-per-rank", "0"]) == 2
    assert "cpus-per-rank: must be > 0, got 0.0" in capsys.readouterr().err
