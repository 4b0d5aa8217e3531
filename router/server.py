"""`baton serve`: one asyncio process running the cluster's front door.

It starts (or joins) the cluster, then the gRPC API and the OpenAI-compatible HTTP API
over one :class:`~router.service.Router`, prints the endpoints once the model is loaded
everywhere, and on SIGINT or SIGTERM stops taking requests, drains the servers, and
stops the cluster; a second SIGINT or SIGTERM while it drains exits at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TextIO

from router.policies import make_policy
from router.service import Router
from router.slo import PlanPrediction, SLOTargets

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServeConfig:
    model: str | None = None
    prefill: int = 1
    decode: int = 1
    transport: str = "torch"
    mode: str = "disaggregated"
    address: str | None = None
    host: str = "127.0.0.1"
    grpc_port: int = 50051
    http_port: int = 8000
    policy: str = "load"
    api_key: str | None = None
    served_model_name: str | None = None
    cluster_options: dict[str, Any] = field(default_factory=dict)
    slo: SLOTargets | None = None  # judged per request, shown on /dashboard
    plan_prediction: PlanPrediction | None = None  # the --plan's predictions, as gauges
    # BatonAdmin takes only this key when set (a client's api key cannot drain).
    admin_key: str | None = None
    # On SIGTERM: how long requests in flight may run before they are aborted.
    shutdown_timeout_s: float = 30.0

    def __post_init__(self) -> None:
        for name in ("grpc_port", "http_port"):
            port = getattr(self, name)
            if not 0 <= port <= 65535:
                raise ValueError(f"{name.replace('_', '-')}: must be in 0..65535, got {port}")
        make_policy(self.policy)  # validates the name


@dataclass
class Endpoints:
    grpc: str
    http: str
    # The dtypes the instances run (their engines' KV cache, read back from each), for the banner.
    dtypes: str = ""


async def serve(
    config: ServeConfig,
    stop: asyncio.Event,
    on_ready: Callable[[Endpoints], None] | None = None,
    on_started: Callable[[], None] | None = None,
) -> None:
    """Run until ``stop`` is set; ``on_started`` runs once the cluster is up, ``on_ready``
    gets the bound endpoints."""
    from cluster import Cluster
    from router.grpc_server import start_grpc_server
    from router.http_server import start_http_server
    from router.metrics import RouterMetrics

    cluster = Cluster(
        config.model,
        prefill=config.prefill,
        decode=config.decode,
        transport=config.transport,
        mode=config.mode,
        address=config.address,
        policy=make_policy(config.policy),
        **config.cluster_options,
    )
    if not await start_unless_stopped(cluster, stop):
        return
    if on_started is not None:
        on_started()
    grpc_server = http_runner = None
    try:
        metrics = RouterMetrics()
        router = Router(cluster, config.served_model_name, metrics)
        metrics.serve_model(
            router.model_name, config.slo, config.plan_prediction, cluster.transport
        )
        grpc_server, grpc_port = await start_grpc_server(
            router, config.host, config.grpc_port, api_key=config.api_key,
            admin_key=config.admin_key,
        )  # fmt: skip
        http_runner, http_port = await start_http_server(
            router, config.host, config.http_port, metrics=metrics, api_key=config.api_key
        )
        if on_ready is not None:
            dtypes = ", ".join(sorted({str(i.info.get("dtype")) for i in cluster.instances}))
            on_ready(
                Endpoints(f"{config.host}:{grpc_port}", f"http://{config.host}:{http_port}", dtypes)
            )
        await stop.wait()
        await drain_requests(router, grpc_server, config.shutdown_timeout_s)
    finally:
        logger.info("shutting down")
        if grpc_server is not None:
            await grpc_server.stop(grace=5)
        if http_runner is not None:
            await http_runner.cleanup()
        try:
            await asyncio.wait_for(_in_daemon_thread(cluster.stop), STOP_TIMEOUT_S)
        except TimeoutError:  # a Ray call that never returns: the process exits anyway
            logger.warning("stopping the cluster took over %.0f s; exiting", STOP_TIMEOUT_S)


async def _in_daemon_thread(fn: Callable[[], Any]) -> Any:
    """``fn()`` on a daemon thread: unlike ``asyncio.to_thread``, a call stuck in Ray
    (a join that never completes) cannot keep the process from exiting."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[Any] = loop.create_future()

    def settle(result: Any, error: BaseException | None) -> None:
        if done.done():
            return
        if error is not None:
            done.set_exception(error)
        else:
            done.set_result(result)

    def work() -> None:
        try:
            result, error = fn(), None
        except BaseException as e:  # handed to the loop's thread
            result, error = None, e
        if not loop.is_closed():
            loop.call_soon_threadsafe(settle, result, error)
        # Stay parked: Ray starts its GCS and raylet with PR_SET_PDEATHSIG, which fires
        # when the *thread* that forked them exits, so a returning thread would SIGKILL
        # the embedded Ray right after start (the driver then exits 60 s later).
        threading.Event().wait()

    threading.Thread(target=work, name=getattr(fn, "__name__", "work"), daemon=True).start()
    return await done


STOP_TIMEOUT_S = 60.0  # cluster.stop bounds each of its own Ray calls; this bounds them all
STOP_WHILE_STARTING_S = 30.0  # to tear down what a start interrupted by a signal made


async def start_unless_stopped(cluster: Any, stop: asyncio.Event) -> bool:
    """Start the cluster unless ``stop`` is set first (SIGINT/SIGTERM while Ray starts or
    joins, or the model loads): then stop what was made, within a bound, and say False."""
    starting = asyncio.ensure_future(_in_daemon_thread(cluster.start))
    stopping = asyncio.ensure_future(stop.wait())
    await asyncio.wait([starting, stopping], return_when=asyncio.FIRST_COMPLETED)
    if starting.done():
        stopping.cancel()
        starting.result()  # raises what start raised
        return True
    starting.add_done_callback(lambda f: f.cancelled() or f.exception())  # not logged
    logger.info("stopping while the cluster starts")
    try:
        await asyncio.wait_for(_in_daemon_thread(cluster.stop), STOP_WHILE_STARTING_S)
    except Exception as e:  # a stuck Ray call: the process exits anyway
        logger.warning("stopping the cluster while it started: %s", e)
    return False


async def drain_requests(router: Router, grpc_server: Any, timeout_s: float) -> None:
    """Graceful shutdown, the same on both front doors: not-ready at once (gRPC health
    NOT_SERVING, HTTP /health 503), new requests refused (UNAVAILABLE / 503), the ones
    in flight finish for up to ``timeout_s``, then the rest end with finish reason
    "abort" (their streams close normally)."""
    router.shutting_down = True
    await grpc_server.health.enter_graceful_shutdown()
    cluster = router.cluster
    deadline = asyncio.get_running_loop().time() + timeout_s
    while cluster.requests() and asyncio.get_running_loop().time() < deadline:
        await asyncio.sleep(0.1)
    left = [r["request_id"] for r in cluster.requests()]
    if left:
        logger.warning("shutdown: aborting %d requests still running", len(left))
    for request_id in left:
        cluster.abort(request_id, reason="abort")
    await asyncio.sleep(0.2)  # let the handlers write the final messages


def kill_descendants() -> None:
    """SIGKILL every process below this one (read from /proc; Linux only, else nothing)."""
    children: dict[int, list[int]] = {}
    try:
        entries = os.listdir("/proc")
    except OSError:
        return
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                # "pid (comm) state ppid ...": comm may hold spaces and parentheses.
                ppid = int(f.read().rpartition(")")[2].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    below, todo = [], [os.getpid()]
    while todo:
        for child in children.get(todo.pop(), []):
            below.append(child)
            todo.append(child)
    for pid in below:
        with contextlib.suppress(OSError):  # gone already
            os.kill(pid, signal.SIGKILL)


def run(config: ServeConfig, out: TextIO = sys.stdout) -> int:
    """The blocking entry point of `baton serve`."""

    def ready(endpoints: Endpoints) -> None:
        def layout(role: str) -> str:
            tp, pp = config.cluster_options.get(f"{role}_parallel", (1, 1))
            return "" if (tp, pp) == (1, 1) else f" (tp{tp} pp{pp})"

        mode = (
            f"{config.prefill} prefill{layout('prefill')} + {config.decode} decode"
            f"{layout('decode')} over {config.transport}"
            if config.mode == "disaggregated"
            else f"{config.prefill + config.decode} colocated{layout('decode')}"
        )
        print(
            f"baton serve: ready ({mode}; {endpoints.dtypes})\n"
            f"  gRPC    {endpoints.grpc}   (baton.v1.Baton)\n"
            f"  HTTP    {endpoints.http}/v1   (OpenAI-compatible)\n"
            f"  metrics {endpoints.http}/metrics\n"
            f"  SLOs    {endpoints.http}/dashboard\n"
            "Ctrl-C stops.",
            file=out,
            flush=True,
        )

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()

        def on_signal(signum: int) -> None:
            if not stop.is_set():
                stop.set()
                return
            # A second signal while draining: leave now, as uvicorn and vLLM do, taking
            # the embedded Ray's processes along (its agents outlive a killed raylet).
            name = signal.Signals(signum).name
            print(f"baton serve: {name} again, exiting without draining", file=sys.stderr,
                  flush=True)  # fmt: skip
            kill_descendants()
            os._exit(128 + signum)

        def handle_signals() -> None:
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, on_signal, sig)

        handle_signals()
        # Again once Ray is up: its core worker installs a C-level handler that prints a
        # stack trace on SIGTERM, which a clean shutdown should not show.
        await serve(config, stop, ready, on_started=handle_signals)

    asyncio.run(main())
    print("baton serve: stopped", file=out, flush=True)
    return 0
