"""The command-line arguments the attention benchmarks share: the dtypes, the model's
heads, the repeats and the threads, and their checks (a usage error naming the flag)."""

from __future__ import annotations

import argparse

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def add_common(p: argparse.ArgumentParser, *, repeats_help: str) -> None:
    """``--dtypes``, the heads (SmolLM2-135M's by default), ``--repeats``, ``--threads``."""
    p.add_argument("--dtypes", default="float32,bfloat16",
                   help="comma-separated, of " + ", ".join(DTYPES))
    p.add_argument("--heads", type=int, default=9)
    p.add_argument("--kv-heads", type=int, default=3)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--repeats", type=int, default=10, help=repeats_help)
    p.add_argument("--threads", type=int, default=None, help="torch/OpenMP threads")


def int_list(p: argparse.ArgumentParser, flag: str, text: str) -> list[int]:
    """``text`` as comma-separated ints, each at least 1, or ``p``'s usage error."""
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        p.error(f"{flag}: expected comma-separated ints")
    if min(values) < 1:
        p.error(f"{flag}: must be >= 1 (got {min(values)})")
    return values


def check_common(p: argparse.ArgumentParser, args: argparse.Namespace,
                 sizes: dict[str, int] | None = None) -> list[torch.dtype]:
    """The dtypes ``--dtypes`` names, after checking the shared flags and ``sizes`` (each
    at least 1); any bad value is ``p``'s usage error (exit 2) naming its flag. Sets
    torch's threads when ``--threads`` is given."""
    names = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    bad = [d for d in names if d not in DTYPES]
    if bad or not names:
        p.error(f"--dtypes: {', '.join(bad) or 'none given'}: expected any of "
                + ", ".join(DTYPES))
    checked = {"--heads": args.heads, "--kv-heads": args.kv_heads,
               "--head-dim": args.head_dim, "--repeats": args.repeats, **(sizes or {})}
    for flag, value in checked.items():
        if value < 1:
            p.error(f"{flag}: must be >= 1 (got {value})")
    if args.threads is not None and args.threads < 1:
        p.error(f"--threads: must be >= 1 (got {args.threads})")
    if args.heads % args.kv_heads:
        p.error(f"--heads: {args.heads} is not a multiple of --kv-heads {args.kv_heads}")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    return [DTYPES[d] for d in names]
