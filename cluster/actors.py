"""The serving instance as Ray actors: plain classes that build and drive one worker.

The builder (``cluster.builder``) wraps :class:`InstanceActor` and
:class:`cluster.ranks.RankActor` with ``ray.remote`` and calls them; nothing here knows
about placement groups. An instance of TP x PP ranks is one :class:`InstanceActor`
(rank 0: the engine's scheduler, the worker, the handle everyone else calls) and a
``RankActor`` per other rank. Starting one: rank 0's ``rendezvous`` opens the instance's
store on a free port; every rank's ``start`` joins the instance's process group with
that address and loads its share of the model; rank 0's ``attach`` then gets the other
ranks' handles and transfer endpoints (``kv_transfer.sharded``). The constructor only
stores its spec, so a restarted actor is cheap and ``start()`` does the real work
(loading the model, opening the transfer and the event socket). Control methods return
errors as values (``{"error": message}``) rather than raising across the process
boundary.

Heavy imports (torch, the engine) happen in ``start()``, so importing this module (and
``cluster``) costs nothing.
"""

from __future__ import annotations

import logging
import os
from dataclasses import asdict, dataclass, replace
from typing import TYPE_CHECKING, Any

from cluster.planner.latency import LatencyProfile

if TYPE_CHECKING:
    from engine.step import StepCost, StepShape

logger = logging.getLogger(__name__)

ROLES = ("prefill", "decode", "colocated")
# The engine's (EngineConfig.dtype); auto: float32 on CPU, bfloat16 or float16 on a GPU.
DTYPES = ("auto", "float32", "bfloat16", "float16")

# Ray starts its worker processes at niceness 15 (its ``worker_niceness`` setting), so on a
# shared host the router, a client or anything else runs before the instances and starves
# them. Every instance actor (each rank) is created with this runtime env: Ray then leaves
# the process at the niceness it was started with. Raising niceness back needs no
# privilege, but lowering it afterwards does (CAP_SYS_NICE), so resetting it inside the
# actor (``normal_priority``) only works as root; this works for any user.
INSTANCE_RUNTIME_ENV: dict[str, Any] = {"env_vars": {"RAY_worker_niceness": "0"}}


@dataclass(frozen=True)
class InstanceSpec:
    """Everything an instance needs to build itself; plain values only."""

    name: str
    role: str
    model: str | None = None
    dtype: str = "auto"
    device: str = "auto"
    num_kv_blocks: int | None = None
    max_num_batched_tokens: int = 2048
    max_num_seqs: int = 256
    enable_prefix_caching: bool = True
    num_threads: int = 1
    transport: str = "torch"
    host: str = "127.0.0.1"
    transfer_timeout_s: float = 30.0
    fault_injection: float = 0.0
    checksum: bool = False
    lease_ttl_s: float = 30.0
    seed: int = 0
    tp: int = 1
    pp: int = 1
    # Every wait on the instance's own process group (rank 0 keeps idle ranks within it).
    group_timeout_s: float = 60.0
    # The latency profile of this instance's layout (LatencyProfile.to_dict()), if the
    # deployment has one: the instance then reports its steps' profiled time.
    profile: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ValueError(f"role: must be one of {', '.join(ROLES)}, got {self.role!r}")
        check_dtype(self.dtype)
        if self.num_threads < 1:
            raise ValueError(f"num_threads: must be >= 1, got {self.num_threads}")
        for name in ("tp", "pp"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be >= 1, got {getattr(self, name)}")

    @property
    def world_size(self) -> int:
        return self.tp * self.pp

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def check_dtype(dtype: object) -> str:
    """An instance's ``dtype``; ValueError naming the field and the allowed values."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype: must be one of {', '.join(DTYPES)}, got {dtype!r}")
    return str(dtype)


def check_messages(messages: object) -> list[dict[str, str]]:
    """A chat: a non-empty list of {"role": str, "content": str}; ValueError naming the
    offending field otherwise."""
    if not isinstance(messages, list) or not messages:
        raise ValueError("messages: must be a non-empty list")
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise ValueError(f"messages[{i}]: must be an object with role and content")
        for key in ("role", "content"):
            if not isinstance(m.get(key), str):
                raise ValueError(f"messages[{i}].{key}: must be a string")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


class RayPeers:
    """Fire-and-forget control calls to other instances through their actor handles."""

    def __init__(self, handles: dict[str, Any]):
        self._handles = handles

    def add(self, handles: dict[str, Any]) -> None:
        self._handles.update(handles)

    def _handle(self, instance: str) -> Any:
        handle = self._handles.get(instance)
        if handle is None:
            raise KeyError(f"instance: unknown instance {instance!r}")
        return handle

    def renew(self, instance: str, request_ids: list[str]) -> None:
        self._handle(instance).renew.remote(request_ids)

    def release(self, instance: str, request_id: str, attempt: int = 0) -> None:
        self._handle(instance).release.remote(request_id, attempt)

    def request_send(self, instance: str, request_id: str, peer: dict[str, str]) -> None:
        self._handle(instance).send_kv.remote(request_id, peer)

    def hand_off(self, instance: str, handoff: dict[str, Any]) -> None:
        self._handle(instance).add_handoff.remote(handoff)


def engine_config(s: InstanceSpec) -> Any:
    """The engine's configuration for an instance (every rank builds the same)."""
    from engine.config import CacheConfig, EngineConfig, ParallelConfig, SchedulerConfig

    return EngineConfig(
        model=s.model,
        dtype=s.dtype,
        device=s.device,
        cache=CacheConfig(
            num_blocks=s.num_kv_blocks, enable_prefix_caching=s.enable_prefix_caching
        ),
        scheduler=SchedulerConfig(
            max_num_seqs=s.max_num_seqs, max_num_batched_tokens=s.max_num_batched_tokens
        ),
        parallel=ParallelConfig(tp=s.tp, pp=s.pp),
        seed=s.seed,
    )


def step_cost(profile: LatencyProfile) -> StepCost:
    """The profile as the engine's ``StepCost``: its time (ms) for a step's shape, a
    prefill pass, a decode step or the two mixed."""

    def cost(shape: StepShape) -> float:
        return profile.mixed_ms(
            shape.prefill_tokens, shape.prefill_sq, shape.decode_batch, shape.decode_context
        )

    return cost


def transfer_config(s: InstanceSpec) -> Any:
    from kv_transfer import TransferConfig

    return TransferConfig(
        backend=s.transport,
        host=s.host,
        timeout_s=s.transfer_timeout_s,
        fault_injection=s.fault_injection,
        checksum=s.checksum,
    )


def join_group(s: InstanceSpec, rank: int, address: str, store: Any = None) -> Any:
    """This rank's membership of its instance's process group (see engine.parallel.launch)."""
    from engine.llm_engine import resolve_device
    from engine.parallel.launch import join

    config = engine_config(s)
    return join(address, rank, config.parallel, resolve_device(s.device), s.group_timeout_s, store)


def default_threads(role: str, cpus: float, host_cores: int | None, instances: int = 1) -> int:
    """Torch threads per rank when the deployment does not say (``threads_per_rank``).

    One per Ray CPU the rank reserves, except instances sharing this one host
    (``host_cores`` given: an embedded Ray, no ``cpus_per_instance``): colocated ones, and
    prefill and decode ones while the deployment has no more ``instances`` than cores, get
    every core: an instance whose requests are all waiting on the other leaves its cores
    to it. Measured with ``baton bench peers`` (README, "Against vLLM's CPU build"):
    colocated x2 at 2 threads each served 1.15x the tokens of 1 thread each at concurrency
    32 (one run, loaded 2-core machine); 1 prefill + 1 decode at 2 threads each beat 1
    thread each in every phase of a quiet run (1.11x the tokens at concurrency 32, goodput
    0.75 against 0.28 req/s at 1 req/s within TTFT 1.5 s / TPOT 150 ms). More prefill and
    decode instances than cores were not measured oversubscribed and keep one per CPU."""
    if host_cores is not None and (role == "colocated" or instances <= host_cores):
        return max(1, host_cores)
    return max(1, int(cpus))


def normal_priority(name: str) -> int:
    """Put every thread of this process at niceness 0 if it is above and the process may
    (root); returns the niceness it then has, with a warning when it is still above 0.
    (On Linux a niceness is per thread: each of ``/proc/self/task`` is set.)"""
    nice = os.getpriority(os.PRIO_PROCESS, 0)
    if nice <= 0:
        return nice
    try:
        for tid in os.listdir("/proc/self/task"):
            os.setpriority(os.PRIO_PROCESS, int(tid), 0)
    except (OSError, ValueError) as e:
        logger.warning("%s runs at niceness %d and cannot lower it: %s", name, nice, e)
        return nice
    return os.getpriority(os.PRIO_PROCESS, 0)


class InstanceActor:
    def __init__(self, spec: dict[str, Any]):
        self.spec = InstanceSpec(**spec)
        self.worker: Any = None  # PrefillWorker | DecodeWorker once started
        self.info: dict[str, Any] = {}
        # TP x PP only: the instance's store (rank 0 hosts it), groups, sharded transfer.
        self._store: Any = None
        self._store_address = ""
        self._groups: Any = None
        self._transfer: Any = None  # ShardedSender | ShardedReceiver
        self._peers: RayPeers | None = None
        # Peers announced before start() (an instance added while this one restarts).
        self._early_peers: dict[str, Any] = {}

    def ping(self) -> dict[str, Any]:
        """``loop``: whether the worker loop still runs (False: it died inside this live
        process, and the instance serves nothing though it answers; ``cluster.health``)."""
        started = self.worker is not None
        loop = getattr(self.worker, "loop", None)
        reply = {"name": self.spec.name, "started": started, "pid": os.getpid(),
                 "nice": os.getpriority(os.PRIO_PROCESS, 0),
                 "loop": loop is None or not started or loop.alive}  # fmt: skip
        if started:  # what the engine runs with, read from it (a plan's threads and budget)
            import torch

            reply["threads"] = torch.get_num_threads()
            engine = getattr(self.worker, "engine", None)
            if engine is not None:
                reply["token_budget"] = engine.scheduler.config.max_num_batched_tokens
                reply["dtype"] = engine.kv_blocks.layout.dtype
        return reply

    def crash_loop(self) -> bool:
        """Chaos: end the worker loop with an error, as a bug in a step would, leaving the
        process alive (tests and ``baton bench chaos`` use it). False when not serving."""
        from engine.worker_loop import crash

        loop = getattr(self.worker, "loop", None)
        if loop is None:
            return False
        crash(loop)
        return True

    def add_peers(self, handles: dict[str, Any]) -> None:
        """Instances added since this one started (``baton scale``)."""
        if self._peers is not None:
            self._peers.add(handles)
        else:
            self._early_peers.update(handles)

    def _resolve_host(self) -> None:
        """Bind and advertise this node's address (``cluster.node_address``), resolved here
        in the actor's process: the node it runs on is known only now."""
        from cluster.node_address import resolve_host

        self.spec = replace(self.spec, host=resolve_host(self.spec.host))

    def rendezvous(self) -> str:
        """A TP x PP instance's store, on a free port; its address goes to the other ranks."""
        self._resolve_host()
        if self._store is None:
            from engine.parallel.launch import host_store

            self._store, self._store_address = host_store(self.spec.host, self.spec.group_timeout_s)
        return self._store_address

    def start(self, events_address: str, peers: dict[str, Any]) -> dict[str, Any]:
        """Load the model and start serving; returns what the cluster needs to know.

        Under TP/PP the other ranks' ``start`` must run at the same time (loading is
        collective) and ``attach`` follows before any request arrives."""
        if self.worker is not None:
            return self.info
        self._resolve_host()
        normal_priority(self.spec.name)
        import ray
        import torch

        from engine.events import ZmqEventSink
        from engine.llm_engine import LLMEngine

        torch.set_num_threads(self.spec.num_threads)
        if self.spec.world_size == 1:
            engine = LLMEngine.from_config(engine_config(self.spec))
        else:
            self._groups = join_group(self.spec, 0, self.rendezvous(), self._store)
            from engine.parallel.worker import create_driver

            engine = create_driver(engine_config(self.spec), self._groups)
        events = ZmqEventSink(events_address)
        self._peers = RayPeers(dict(peers))
        self._peers.add(self._early_peers)
        self.worker = self._build_worker(engine, events, self._peers)
        endpoint = self.worker.start()
        self.info = {
            "name": self.spec.name,
            "role": self.spec.role,
            "endpoint": endpoint,
            "total_blocks": engine.block_manager.num_blocks,
            "max_model_len": engine.max_model_len,
            "world_size": self.spec.world_size,
            "node_id": ray.get_runtime_context().get_node_id(),
            "node_ip": ray.util.get_node_ip_address(),
            "host": self.spec.host,
            "layout": f"tp{self.spec.tp} pp{self.spec.pp}",
            # What the engine allocated its KV cache in: the model's dtype ("auto" resolved).
            "dtype": engine.kv_blocks.layout.dtype,
            "pid": os.getpid(),
            "nice": os.getpriority(os.PRIO_PROCESS, 0),
        }
        logger.info("instance %s (%s) started: %s", self.spec.name, self.spec.role, self.info)
        return self.info

    def attach(self, ranks: list[Any], endpoints: list[str]) -> None:
        """TP x PP: the other ranks' handles and transfer endpoints (rank 1 first)."""
        from cluster.ranks import RayRanks

        calls = RayRanks(ranks, self.spec.transfer_timeout_s)
        if self.spec.role == "prefill":
            self._transfer.attach(calls, [self.info["endpoint"], *endpoints])
        elif self.spec.role == "decode":
            self._transfer.attach(calls)

    def relay_send(self, request_id: str, peer: dict[str, str]) -> None:
        """Another rank's request to the prefill side, for a pull this rank runs."""
        if self.spec.role == "decode" and self._transfer is not None:
            self._transfer.relay(request_id, peer)

    def _build_worker(self, engine: Any, events: Any, peers: RayPeers) -> Any:
        from decode_workers.worker import DecodeConfig, DecodeWorker
        from engine.config import ParallelConfig
        from kv_transfer import ShardedReceiver, ShardedSender, create_receiver, create_sender
        from prefill_workers.worker import PrefillWorker

        s = self.spec
        transfer = transfer_config(s)
        parallel = ParallelConfig(tp=s.tp, pp=s.pp)
        cost = None if s.profile is None else step_cost(LatencyProfile.from_dict(s.profile))
        if s.role == "prefill":
            sender = create_sender(s.name, engine.kv_blocks, transfer)
            if s.world_size > 1:
                cfg, lay = engine.model_config, engine.kv_blocks.layout
                whole = replace(lay, num_layers=cfg.num_layers, num_kv_heads=cfg.num_kv_heads)
                sender = self._transfer = ShardedSender(sender, parallel, whole)
            return PrefillWorker(
                s.name, engine, sender, events, peers.hand_off, s.lease_ttl_s,
                step_cost=cost,
            )  # fmt: skip
        if s.role == "decode":
            # Wrapped at any layout: a one-rank instance may pull from a TP x PP one.
            receiver = ShardedReceiver(
                create_receiver(s.name, engine.kv_blocks, transfer), parallel
            )
            self._transfer = receiver
            config = DecodeConfig(lease_ttl_s=s.lease_ttl_s)
            return DecodeWorker(s.name, engine, receiver, events, peers, config, step_cost=cost)
        return DecodeWorker(s.name, engine, None, events, None, role="colocated", step_cost=cost)

    # -- control calls: forwarded to the worker, errors returned as values -------------

    def add_request(
        self,
        request_id: str,
        prompt: str | None,
        prompt_token_ids: list[int] | None,
        params: dict[str, Any],
        decode_instance: str | None = None,
        messages: list[dict[str, str]] | None = None,
        children: list[tuple[str, dict[str, Any]]] | None = None,
        attempt: int = 0,
    ) -> dict[str, Any]:
        """Tokenize (a text prompt, or chat ``messages`` through the model's chat template),
        validate and queue; returns the prompt's token ids or an error. ``children``:
        a sequence group's (request id, params) for n > 1 (``LLMEngine.add_request``);
        ``attempt``: the router's count of the request's migrations (a re-dispatch may
        bring it back here after an abort, see ``engine.worker_loop.Tombstones``)."""
        from engine.sampling_params import SamplingParams

        if self.worker is None:
            message = f"instance {self.spec.name} is not serving (restarting?)"
            return {"error": message, "retry": True}
        try:
            sampling = SamplingParams.from_dict(params)
            engine = self.worker.engine
            if messages is not None:
                prompt_token_ids = engine.tokenizer.encode_chat(check_messages(messages))
            elif prompt_token_ids is None:
                if not isinstance(prompt, str):
                    raise ValueError(f"prompt: must be a str, got {type(prompt).__name__}")
                prompt_token_ids = engine.tokenizer.encode(prompt)
            group = None
            if children is not None:
                group = [(str(c), SamplingParams.from_dict(p)) for c, p in children]
            if self.spec.role == "prefill":
                self.worker.add_request(
                    request_id, prompt_token_ids, sampling, decode_instance, group, attempt
                )
            else:
                self.worker.add_request(request_id, prompt_token_ids, sampling, group, attempt)
        except ValueError as e:
            return {"error": str(e)}
        return {"prompt_token_ids": list(prompt_token_ids)}

    def resume_request(
        self,
        request_id: str,
        prompt: str | None,
        prompt_token_ids: list[int] | None,
        output_token_ids: list[int],
        params: dict[str, Any],
        messages: list[dict[str, str]] | None = None,
        attempt: int = 0,
    ) -> dict[str, Any]:
        """Take over a request migrated from another instance (decode or colocated): the
        prompt as given to ``add_request`` plus the tokens already streamed; ``attempt``
        as for ``add_request``."""
        from engine.sampling_params import SamplingParams

        if self.worker is None or self.spec.role == "prefill":
            return {"error": f"instance {self.spec.name} cannot resume requests", "retry": True}
        try:
            sampling = SamplingParams.from_dict(params)
            engine = self.worker.engine
            if prompt_token_ids is None:
                if messages is not None:
                    prompt_token_ids = engine.tokenizer.encode_chat(check_messages(messages))
                elif isinstance(prompt, str):
                    prompt_token_ids = engine.tokenizer.encode(prompt)
                else:
                    raise ValueError("prompt: give prompt, prompt_token_ids or messages")
            self.worker.resume(request_id, prompt_token_ids, output_token_ids, sampling, attempt)
        except ValueError as e:
            return {"error": str(e)}
        return {"prompt_token_ids": list(prompt_token_ids)}

    # A restarted actor has no worker until the cluster starts it again; calls meant for
    # the old one are dropped (its KV and requests died with it).

    def add_handoff(self, handoff: dict[str, Any]) -> None:
        if self.worker is not None:
            self.worker.add_handoff(handoff)

    def abort(self, request_id: str, attempt: int = 0) -> None:
        """``attempt``: the newest copy of the request this ends (``add_request``)."""
        if self.worker is not None:
            self.worker.abort(request_id, attempt)

    def renew(self, request_ids: list[str]) -> None:
        if self.worker is not None:
            self.worker.renew(request_ids)

    def release(self, request_id: str, attempt: int = 0) -> None:
        if self.worker is not None:
            self.worker.release(request_id, attempt)

    def send_kv(self, request_id: str, peer: dict[str, str]) -> None:
        if self.worker is not None:
            self.worker.send_kv(request_id, peer)

    def tokenizer_spec(self) -> dict[str, Any] | None:
        """The engine's tokenizer as plain data (Tokenizer.to_spec); None while not serving."""
        if self.worker is None:
            return None
        spec: dict[str, Any] = self.worker.engine.tokenizer.to_spec()
        return spec

    def stats(self, timeout_s: float = 30.0) -> dict[str, Any] | None:
        """None while not serving, or while the worker loop is mid-step for longer than
        ``timeout_s``: the caller has given up by then, and a call still waiting would
        hold one of the actor's threads (a poll every health round would take them all)."""
        if self.worker is None:
            return None
        try:
            reply = self.worker.stats(timeout_s)
        except TimeoutError:
            return None
        stats: dict[str, Any] = reply.to_dict()
        stats.update(node_id=self.info.get("node_id", ""), node_ip=self.info.get("node_ip", ""),
                     tp=self.spec.tp, pp=self.spec.pp)  # fmt: skip
        return stats

    def stop(self) -> None:
        if self.worker is not None:
            self.worker.stop()
            if self._groups is not None:
                from cluster.ranks import close_parallel

                close_parallel(self.worker.engine, self._groups)
                self._groups = None
            self.worker = None
