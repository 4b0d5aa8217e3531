"""``baton status|cordon|uncordon|drain|scale|requests|abort|apply``: a thin client over
the admin API (``baton.v1.BatonAdmin``) of a running ``baton serve``; the logic lives in
the server (``cluster.control``, ``router.admin``).

As kubectl and the ray CLI do: verbs on nouns, a human table by default and ``--json``
for scripts, ``--watch`` to refresh, the server from ``--server`` or ``BATON_SERVER``
and the admin key from ``--admin-key`` or ``BATON_ADMIN_KEY``. Exit 0 only on success;
errors go to stderr naming the thing at fault: 1 for what the server refused or could
not do (an unknown instance, a missing key, no server answering), 2 for bad arguments.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

DEFAULT_SERVER = "127.0.0.1:50051"
EXIT_FAILED = 1
EXIT_USAGE = 2


def _positive_int(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number, got {text!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {n}")
    return n


def _seconds(text: str) -> float:
    try:
        s = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number of seconds, got {text!r}") from None
    if not s >= 0:
        raise argparse.ArgumentTypeError(f"must be >= 0 seconds, got {text}")
    return s


def add_parsers(sub: Any) -> None:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--server",
        default=os.environ.get("BATON_SERVER", DEFAULT_SERVER),
        help="the server's gRPC address (default: env BATON_SERVER, else %(default)s)",
    )
    common.add_argument(
        "--admin-key",
        default=os.environ.get("BATON_ADMIN_KEY"),
        help="the server's admin key, if it has one (default: env BATON_ADMIN_KEY)",
    )
    common.add_argument("--json", action="store_true", help="machine-readable output")

    def verb(name: str, help: str, func: Callable[[argparse.Namespace], int]) -> Any:
        p = sub.add_parser(name, help=help, description=help, parents=[common])
        p.set_defaults(func=lambda args: _run(func, args), verb=name)
        return p

    p = verb("status", "pools and instances of a running cluster", _status)
    p.add_argument(
        "--watch",
        action="store_true",
        help="refresh every --interval seconds until Ctrl-C (then exit 0)",
    )
    p.add_argument("--interval", type=_seconds, default=2.0, help="default: %(default)s")
    for name, text in (("cordon", "route no new work to"), ("uncordon", "route work again to")):
        p = verb(name, f"{text} INSTANCE", _cordon)
        p.add_argument("instance", metavar="INSTANCE")
    p = verb("drain", "cordon INSTANCE, let its requests finish, migrate the rest, remove it",
             _drain)  # fmt: skip
    p.add_argument("instance", metavar="INSTANCE")
    p.add_argument(
        "--timeout", type=_seconds, default=30.0, metavar="S",
        help="how long requests may finish before they migrate (default: 30)",
    )  # fmt: skip
    p = verb("scale", "set the number of prefill / decode instances", _scale)
    p.add_argument("--prefill", type=_positive_int, metavar="N")
    p.add_argument("--decode", type=_positive_int, metavar="M")
    p.add_argument("--drain-timeout", type=_seconds, default=None, metavar="S")
    p.add_argument("--dry-run", action="store_true", help="show the change only")
    verb("requests", "requests in flight", _requests)
    p = verb("abort", "abort a request in flight", _abort)
    p.add_argument("request_id", metavar="REQUEST_ID")
    p = verb(
        "apply",
        "scale the running cluster to a plan (baton plan --out); a plan "
        "whose layouts (TP x PP) differ from the running instances' is refused",
        _apply,
    )
    p.add_argument("plan", metavar="PLAN.json")
    p.add_argument("--dry-run", action="store_true", help="show the difference only")


def _run(func: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
    from baton import errors

    try:
        return func(args)
    except errors.Unavailable as e:
        _err(f"server: no server answers at {args.server} ({e})")
    except errors.Unauthenticated:
        given = "the admin key given was refused" if args.admin_key else "it needs an admin key"
        _err(f"admin-key: {given} (--admin-key or BATON_ADMIN_KEY)")
    except errors.BatonError as e:
        _err(str(e))
    return EXIT_FAILED


def _err(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)


def _client(args: argparse.Namespace) -> Any:
    import baton

    return baton.AdminClient(args.server, api_key=args.admin_key)


# A watch's status call waits at most this long, so that Ctrl-C ends it within that.
WATCH_CALL_TIMEOUT_S = 10.0


def _status(args: argparse.Namespace) -> int:
    if not args.watch:
        return _show_status(args, None)
    # Ctrl-C is how a watch ends. It sets a flag rather than raising KeyboardInterrupt:
    # an exception thrown into a blocking gRPC call sometimes left the process hanging
    # (seen in the full test run; the call is let finish instead, within its timeout).
    from baton import errors

    stop = threading.Event()
    previous = signal.signal(signal.SIGINT, lambda *_: stop.set())
    try:
        return _show_status(args, stop)
    except errors.BatonError:
        if stop.is_set():  # the last call failed after Ctrl-C: the watch still ends well
            return 0
        raise
    finally:
        signal.signal(signal.SIGINT, previous)


def _show_status(args: argparse.Namespace, stop: threading.Event | None) -> int:
    with _client(args) as admin:
        while True:
            timeout = 30.0 if stop is None else WATCH_CALL_TIMEOUT_S
            status = admin.status(timeout=timeout)
            if args.json:
                print(json.dumps(asdict(status), default=list))
            else:
                if stop is not None:
                    print("\033[2J\033[H", end="")  # clear the screen, as watch(1) does
                print(status_table(status))
            if stop is None:
                return 0
            sys.stdout.flush()
            if stop.wait(args.interval):
                return 0


def status_table(status: Any) -> str:
    head = ("INSTANCE", "ROLE", "STATE", "NODE", "PID", "LAYOUT", "DTYPE", "QUEUE", "RUNNING",
            "KV", "LEASES", "STEP")  # fmt: skip
    rows = [head]
    for i in status.instances:
        leases = i.counters.get("leases")
        rows.append((
            i.name, i.role, i.state or i.health, i.node_ip or "-", str(i.pid or "-"),
            f"tp{i.tp}pp{i.pp}", i.dtype or "-",
            str(i.num_waiting + int(i.counters.get("pending", 0))), str(i.num_running),
            f"{100 * i.kv_usage:.0f}%", "-" if leases is None else str(int(leases)),
            f"{i.step_time_ms:.1f}ms" if i.step_time_ms else "-",
        ))  # fmt: skip
    widths = [max(len(r[k]) for r in rows) for k in range(len(head))]
    lines = [f"{status.model}  {status.mode} over {status.transport}"]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    moved = {k: int(v) for k, v in status.counters.items() if v}
    if moved:
        lines.append("counters: " + ", ".join(f"{k}={v}" for k, v in sorted(moved.items())))
    lines.append(slo_line(getattr(status, "slo", None)))
    return "\n".join(lines)


def _pct(share: float) -> str:
    """98%, 97.5%: one decimal at most, and 100% only when (nearly) all met."""
    return f"{100 * share:.1f}".removesuffix(".0") + "%"


def slo_line(slo: Any) -> str:
    """``SLO attainment (joint): 1m 100% (12 req) · 5m 98% (60 req) · 60m --; objective
    90%`` (``--`` for a window with nothing judged), or that no SLO is set."""
    if slo is None:
        return "SLO attainment: no SLO targets set (baton serve --slo-ttft/--slo-tpot or --plan)"
    shown = [
        f"{w.window} --" if w.joint is None else f"{w.window} {_pct(w.joint)} ({w.judged} req)"
        for w in slo.windows
    ]
    return (
        f"SLO attainment (joint): {' · '.join(shown)}; objective {_pct(slo.objective)} "
        f"(TTFT <= {slo.ttft_target_s:g} s, TPOT <= {slo.tpot_target_s:g} s)"
    )


def _cordon(args: argparse.Namespace) -> int:
    with _client(args) as admin:
        verb = admin.cordon if args.verb == "cordon" else admin.uncordon
        _say(args, verb(args.instance, timeout=30))
    return 0


def _drain(args: argparse.Namespace) -> int:
    with _client(args) as admin:
        _say(args, admin.drain(args.instance, args.timeout, timeout=args.timeout + 660))
    return 0


def _scale_to(args: argparse.Namespace, prefill: int | None, decode: int | None) -> int:
    if prefill is None and decode is None:
        _err("scale: give --prefill N and/or --decode M")
        return EXIT_USAGE
    with _client(args) as admin:
        changes = admin.scale(
            prefill, decode, dry_run=args.dry_run, drain_timeout_s=args.drain_timeout, timeout=30
        )
    if args.json:
        print(json.dumps({"applied": not args.dry_run, "changes": changes}))
        return 0
    for c in changes:
        sign = int(c["desired"]) - int(c["running"])
        what = "no change" if sign == 0 else f"{'+' if sign > 0 else ''}{sign}"
        print(f"{c['role']}: {c['running']} -> {c['desired']} ({what})")
    print("dry run: nothing changed" if args.dry_run else "scaling (see `baton status`)")
    return 0


def _scale(args: argparse.Namespace) -> int:
    return _scale_to(args, args.prefill, args.decode)


def _apply(args: argparse.Namespace) -> int:
    from cluster.cli import plan_deployment

    try:
        deployment = plan_deployment(args.plan)
    except (ValueError, OSError) as e:
        _err(str(e))
        return EXIT_USAGE
    args.drain_timeout = None
    with _client(args) as admin:
        refusal = layout_refusal(deployment, admin.status(timeout=30))
    if refusal is not None:
        _err(refusal)
        return EXIT_FAILED
    if deployment["mode"] == "colocated":
        return _scale_to(args, None, deployment["decode"])
    return _scale_to(args, deployment["prefill"], deployment["decode"])


def layout_refusal(deployment: dict[str, Any], status: Any) -> str | None:
    """Why the plan (``cluster.cli.plan_deployment``) cannot be applied to the running
    cluster (``status``), or None. Only counts change live: an instance's layout (TP x PP)
    and the mode are fixed when ``baton serve`` starts (a new instance takes its role's
    layout), so a plan that differs there is refused, naming the first instance at odds."""
    if deployment["mode"] != status.mode:
        return (
            f"plan: it is {deployment['mode']} but the cluster runs {status.mode}; the mode "
            "cannot change on a live cluster (restart: baton serve --plan PLAN.json)"
        )
    wanted = {"colocated": deployment.get("decode_parallel")}
    if deployment["mode"] == "disaggregated":
        wanted = {r: deployment[f"{r}_parallel"] for r in ("prefill", "decode")}
    seen = set()
    for inst in status.instances:
        if not inst.tp:  # not serving: it reports no layout
            continue
        seen.add(inst.role)
        want = tuple(wanted.get(inst.role) or (inst.tp, inst.pp))
        if (inst.tp, inst.pp) != want:
            return (
                f"instance {inst.name}: runs tp{inst.tp}pp{inst.pp} but the plan wants "
                f"tp{want[0]}pp{want[1]} for {inst.role}; a layout cannot change on a live "
                "cluster (restart: baton serve --plan PLAN.json)"
            )
    unknown = sorted(set(wanted) - seen)
    if unknown:
        return f"{unknown[0]}: no instance is serving to compare the plan's layout with; retry"
    return None


def _requests(args: argparse.Namespace) -> int:
    with _client(args) as admin:
        rows = admin.requests(timeout=30)
    if args.json:
        print(json.dumps(rows))
        return 0
    print(f"{'REQUEST':34} {'STATE':8} {'TOKENS':>6} {'AGE':>7} {'MOVED':>5}  INSTANCES")
    for r in rows:
        print(
            f"{r['request_id']:34} {r['state']:8} {r['tokens']:>6} {r['age_s']:>6.1f}s "
            f"{r['migrations']:>5}  {','.join(r['instances'])}"
        )
    return 0


def _abort(args: argparse.Namespace) -> int:
    with _client(args) as admin:
        _say(args, admin.abort(args.request_id, timeout=30))
    return 0


def _say(args: argparse.Namespace, message: str) -> None:
    print(json.dumps({"message": message}) if args.json else message)
