"""The cluster as the router and the tests use it: ``from cluster import Cluster``.

``Cluster(prefill=1, decode=1).start()`` starts (or joins) Ray, creates the instances,
loads the model in each, and binds the socket their token events arrive on. A request
goes to the prefill instance with the fewest queued prompt tokens, with the decode
instance serving the fewest requests named as its destination; in colocated mode it
goes to the least busy instance, which does both. Outputs are the engine's
``RequestOutput``, streamed (``stream``) or collected (``generate``).

``prefill_parallel`` and ``decode_parallel`` give each pool's instances a (tp, pp)
layout: an instance is then tp * pp ranks (Ray actors in one placement group) that the
rest of the system sees as one, and the KV moves between the two layouts part by part
(``kv_transfer.sharded``).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from typing import Any

import ray

from cluster import builder, placement
from cluster.actors import InstanceSpec, check_dtype, default_threads
from cluster.admission import (
    DEFAULT_ADMISSION_TIMEOUT_S,
    NoInstanceServing,
    check_timeout,
    when_serving,
    when_serving_sync,
)
from cluster.control import DEFAULT_DRAIN_TIMEOUT_S, Controller, requests_in_flight
from cluster.dispatch import InstanceLoad, RoutePolicy, RouteRequest, default_policy
from cluster.health import HealthMonitor
from cluster.membership import Membership
from cluster.migration import Migrator, Target, pick_decode, pick_prefill
from cluster.node_address import host_ip
from cluster.planner.latency import ProfileSet
from cluster.ray_connect import DEFAULT_CONNECT_TIMEOUT_S
from cluster.stream import EventReceiver, RequestStream, RequestTrace
from engine.outputs import InstanceStats, RequestOutput
from engine.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

PREFIX_CHARS = 64  # of a text prompt, for the cache-affinity key
PREFIX_TOKENS = 16  # of a token prompt: one KV block


def prefix_key(ids: list[int] | None, text: str | None) -> int | None:
    """A key for the start of a prompt: requests sharing it likely share cached blocks."""
    if ids is not None:
        return hash(tuple(ids[:PREFIX_TOKENS])) if len(ids) >= PREFIX_TOKENS else None
    if text is not None and len(text) >= PREFIX_CHARS:
        return hash(text[:PREFIX_CHARS])
    return None


MODES = ("disaggregated", "colocated")
SCALE_HEADROOM_RANKS = 8
TRANSPORTS = ("torch", "grpc", "local")


def check_parallel(field: str, value: object) -> tuple[int, int]:
    """A (tp, pp) layout as given to :class:`Cluster`; ValueError naming ``field``."""
    if (
        not isinstance(value, (tuple, list))
        or len(value) != 2
        or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value)
    ):
        raise ValueError(f"{field}: must be (tp, pp), two positive ints, got {value!r}")
    return int(value[0]), int(value[1])


def check_role_overrides(value: dict[str, dict[str, int]]) -> dict[str, dict[str, int]]:
    """``Cluster``'s ``role_overrides``: ValueError naming the field."""
    allowed = ("num_threads", "max_num_batched_tokens")
    for role, settings in value.items():
        if role not in ("prefill", "decode", "colocated") or not isinstance(settings, dict):
            raise ValueError(f"role_overrides: unknown role {role!r}")
        for key, v in settings.items():
            if key not in allowed or not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"role_overrides.{role}.{key}: must be one of {allowed}, >= 1")
    return {role: dict(settings) for role, settings in value.items()}


class Cluster:
    def __init__(
        self,
        model: str | None = None,
        prefill: int = 1,
        decode: int = 1,
        transport: str = "torch",
        mode: str = "disaggregated",
        *,
        address: str | None = None,
        num_kv_blocks: int | None = None,
        cpus_per_instance: float | None = None,
        threads_per_rank: int | None = None,
        max_num_batched_tokens: int = 2048,
        dtype: str = "auto",
        lease_ttl_s: float = 30.0,
        transfer_timeout_s: float = 30.0,
        fault_injection: float = 0.0,
        checksum: bool = False,
        start_timeout_s: float = 600.0,
        health_interval_s: float = 1.0,
        policy: RoutePolicy | None = None,
        max_migrations: int = 3,
        prefill_parallel: tuple[int, int] = (1, 1),
        decode_parallel: tuple[int, int] = (1, 1),
        profiles: ProfileSet | None = None,
        connect_timeout_s: float = DEFAULT_CONNECT_TIMEOUT_S,
        prefill_nodes: dict[str, str] | None = None,
        decode_nodes: dict[str, str] | None = None,
        plan_instances: Sequence[placement.PlannedInstance] | None = None,
        plan_nodes: int = 0,
        admission_timeout_s: float = DEFAULT_ADMISSION_TIMEOUT_S,
        role_overrides: dict[str, dict[str, int]] | None = None,
    ):
        """``policy`` chooses instances per request (see ``cluster.dispatch``); the
        default sends prompts to the fewest queued prompt tokens and decodes to the
        fewest active requests. ``prefill_parallel`` / ``decode_parallel``: each pool's
        (tp, pp); colocated instances take ``decode_parallel``. ``cpus_per_instance`` is
        per rank. ``profiles``: the planner's latency profiles for this model and hardware;
        each instance then reports its steps' profiled time (``profiled_seconds``).
        ``address``: join that Ray cluster (``HOST:PORT``) within ``connect_timeout_s``;
        None starts an embedded local Ray. ``prefill_nodes`` / ``decode_nodes``: Ray node
        labels a node must have to host that role (``cluster.placement``); colocated
        instances take ``decode_nodes``. ``plan_instances`` (named as the cluster names its
        instances: prefill-0, decode-0, ...) pins each to plan node i = the i-th live Ray
        node by IP, of ``plan_nodes``; checked before anything starts.
        ``admission_timeout_s``: how long a request (or a migrating one) waits for an
        instance of a role that has none serving (``cluster.admission``).
        ``role_overrides``: per role, ``num_threads`` and/or ``max_num_batched_tokens`` for
        its instances (a CPU plan's, ``cluster.planner.cpu_search``); an explicit
        ``threads_per_rank`` still wins over ``num_threads``."""
        if mode not in MODES:
            raise ValueError(f"mode: must be one of {', '.join(MODES)}, got {mode!r}")
        if transport not in TRANSPORTS or (transport == "local" and mode != "colocated"):
            raise ValueError(
                f"transport: must be torch or grpc between instances, got {transport!r}"
            )
        for field, value in (("prefill", prefill), ("decode", decode)):
            if not isinstance(value, int) or value < (1 if mode == "disaggregated" else 0):
                raise ValueError(f"{field}: must be a positive number of instances, got {value!r}")
        self.parallel = {
            "prefill": check_parallel("prefill_parallel", prefill_parallel),
            "decode": check_parallel("decode_parallel", decode_parallel),
        }
        if mode == "colocated" and self.parallel["prefill"] != (1, 1):
            raise ValueError("prefill_parallel: colocated instances take decode_parallel")
        self.parallel["colocated"] = self.parallel["decode"]
        check_dtype(dtype)  # before Ray starts, not in each actor
        self.model = model
        self.mode = mode
        self.transport = transport
        self.address = address
        self.num_prefill = prefill if mode == "disaggregated" else 0
        # Colocated instances do both jobs; the total count is kept.
        self.num_decode = decode if mode == "disaggregated" else prefill + decode
        self.cpus_per_instance = cpus_per_instance
        # Torch threads per rank; None: one per Ray CPU it reserves (see `bench.peers`).
        self.threads_per_rank = threads_per_rank
        self.role_overrides = check_role_overrides(role_overrides or {})
        self.start_timeout_s = start_timeout_s
        self.health_interval_s = health_interval_s
        self.policy: RoutePolicy = policy or default_policy
        # Per role, its layout's profile, if given (ProfileSet.get borrows or names what is
        # missing, so a wrong file fails here rather than in an actor).
        self.role_profiles: dict[str, dict[str, Any]] = {
            role: profiles.get(*layout).to_dict() for role, layout in self.parallel.items()
        } if profiles is not None else {}  # fmt: skip
        self._polled: dict[str, InstanceStats] = {}
        self._spec: dict[str, Any] = dict(
            model=model,
            dtype=dtype,
            num_kv_blocks=num_kv_blocks,
            max_num_batched_tokens=max_num_batched_tokens,
            transport=transport,
            transfer_timeout_s=transfer_timeout_s,
            fault_injection=fault_injection,
            checksum=checksum,
            lease_ttl_s=lease_ttl_s,
        )
        self.instances: list[builder.Instance] = []
        # Tells this cluster's placement groups from another's sharing the same Ray.
        self.id = uuid.uuid4().hex[:8]
        self._receiver: EventReceiver | None = None
        self._health: HealthMonitor | None = None
        self._started_ray = False
        self.connect_timeout_s = connect_timeout_s
        self.selectors = placement.role_selectors(prefill_nodes, decode_nodes)
        self.plan_instances = None if plan_instances is None else list(plan_instances)
        self.plan_nodes = plan_nodes
        self._stopped = False  # stop() during start(): start gives up at its next step
        self.max_migrations = max_migrations
        self.admission_timeout_s = check_timeout(admission_timeout_s)
        self.migrator: Migrator | None = None
        self.control: Controller | None = None

    # -- lifecycle -------------------------------------------------------------------

    def start(self) -> Cluster:
        roles = ["prefill"] * self.num_prefill
        roles += ["decode" if self.mode == "disaggregated" else "colocated"] * self.num_decode
        n = sum(self.parallel[r][0] * self.parallel[r][1] for r in roles)  # ranks
        self._stopped = False
        # An embedded Ray gets logical CPUs for instances added later (`baton scale`).
        headroom = 0 if self.address is not None else SCALE_HEADROOM_RANKS
        self._started_ray = builder.init_ray(self.address, n + headroom, self.connect_timeout_s)
        gpus = 1 if builder.has_gpus() else 0
        cpus = self.cpus_per_instance or max(1, (os.cpu_count() or 1) // n)
        counts: dict[str, int] = {}
        try:
            pinned = self._placement(roles, gpus, cpus)
            for role in roles:
                name = f"{role}-{counts.setdefault(role, 0)}"
                counts[role] += 1
                spec = self.instance_spec(name, role, cpus)
                if self._stopped:
                    raise RuntimeError("cluster: stopped while starting")
                selector = self.role_selector(role, spec.world_size, pinned.get(name))
                self.instances.append(
                    builder.create(spec, cpus, gpus, self.start_timeout_s, self.id, selector)
                )
            self._receiver = EventReceiver(host_ip(self._host))
            self._receiver.start()
            self.migrator = Migrator(
                self._receiver.streams, self._migration_target, self._abort_on,
                lambda rid, msg: self.abort(rid, reason="error", error=msg),
                limit=self.max_migrations, pick_prefill=self._prefill_target,
                wait_s=self.admission_timeout_s,
            )  # fmt: skip
            builder.start_all(self.instances, self._receiver.address, self.start_timeout_s)
            self._health = HealthMonitor(
                self.instances, self._restart, self._lost, self.health_interval_s, self._poll
            )
            self._health.start()
            desired = {r: roles.count(r) for r in dict.fromkeys(roles)}
            self.control = Controller(Membership(self), desired)
            self.control.start()
        except BaseException:
            self.stop()
            raise
        logger.info("cluster started: %s", [i.name for i in self.instances])
        return self

    @property
    def _host(self) -> str:
        """Embedded Ray is one node: loopback. Joined: "", each process resolves its own
        node's address (``cluster.node_address``), the driver for the event socket."""
        return "127.0.0.1" if self.address is None else ""

    def instance_spec(self, name: str, role: str, cpus: float) -> InstanceSpec:
        """An instance of ``role`` as this cluster makes them (at start and by scaling)."""
        tp, pp = self.parallel[role]
        tuned = dict(self.role_overrides.get(role, {}))
        threads = tuned.pop("num_threads", None)
        return InstanceSpec(
            name=name,
            role=role,
            num_threads=self.threads_per_rank
            or threads
            or default_threads(role, cpus, self._host_cores, self.num_prefill + self.num_decode),
            host=self._host,
            tp=tp,
            pp=pp,
            profile=self.role_profiles.get(role),
            **{**self._spec, **tuned},
        )

    @property
    def _host_cores(self) -> int | None:
        """This host's cores when every instance shares them (see ``default_threads``)."""
        alone = self.address is None and self.cpus_per_instance is None
        return (os.cpu_count() or 1) if alone else None

    def role_selector(
        self, role: str, world_size: int, stages: Sequence[placement.Node] | None = None
    ) -> list[dict[str, str]] | None:
        """Per rank, the node labels an instance of ``role`` needs (each PP stage pinned
        to its node in ``stages``)."""
        return placement.bundle_selectors(self.selectors[role], world_size, stages)

    def _placement(
        self, roles: list[str], gpus: int, cpus: float
    ) -> dict[str, tuple[placement.Node, ...]]:
        """Checked before anything starts (Ray would leave an impossible group pending):
        every role's labels exist on a live node; the plan's instances' nodes, if any."""
        nodes = placement.alive_nodes()
        placement.check_roles(self.selectors, roles, nodes)
        if self.plan_instances is None:
            return {}
        bundle = {"GPU": 1.0} if gpus else {"CPU": float(cpus)}
        return placement.pin_plan(
            self.plan_instances, self.plan_nodes, nodes, bundle, self.selectors
        )

    def stop(self) -> None:
        self._stopped = True
        if self.control is not None:
            self.control.stop()
            self.control = None
        if self._health is not None:
            self._health.stop()
            self._health = None
        if self._receiver is not None:
            for request_id in list(self._receiver.streams()):
                self.abort(request_id)
        if self.instances:
            builder.destroy(self.instances)
            self.instances = []
        if self._receiver is not None:
            self._receiver.stop()
            self._receiver = None
        if self._started_ray:
            ray.shutdown()
            self._started_ray = False

    def __enter__(self) -> Cluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _restart(self, instance: builder.Instance) -> None:
        handles = {i.name: i.actor for i in self.instances}
        address = self._require_started().address
        builder.restart(instance, address, handles, self.start_timeout_s)
        # An instance added while this one restarted: its handle reached the old process
        # (or none), so send the whole table again.
        instance.actor.add_peers.remote({i.name: i.actor for i in self.instances})

    def _lost(self, instance: builder.Instance, cause: str) -> None:
        """An instance lost its requests (or stopped answering): migrate them."""
        if self.migrator is not None:
            self.migrator.lost(instance.name, cause)

    def _migration_target(self, exclude: set[str]) -> Target | None:
        name = pick_decode(self._loads(), exclude)
        by_name = {i.name: i for i in self.instances}
        return None if name is None else Target(name, by_name[name].actor)

    def _prefill_target(self, exclude: set[str]) -> Target | None:
        name = pick_prefill(self._loads(), exclude)
        by_name = {i.name: i for i in self.instances}
        return None if name is None else Target(name, by_name[name].actor)

    def _abort_on(self, instance: str, request_id: str, attempt: int) -> None:
        for i in self.instances:
            if i.name == instance:
                i.actor.abort.remote(request_id, attempt)

    def health(self) -> dict[str, str]:
        """Each instance's state: serving, restarting or dead."""
        if self._health is None:
            return {}
        return {name: h.value for name, h in self._health.state.items()}

    # -- operations: cluster.control holds the desired state and moves towards it ------

    def _control(self) -> Controller:
        if self.control is None:
            raise RuntimeError("cluster: call start() first")
        return self.control

    def states(self) -> dict[str, str]:
        """Each instance as an operator sees it: starting, ready, cordoned, draining,
        restarting, unresponsive or dead."""
        control, health = self._control(), self.health()
        return control.states(health)

    def cordon(self, name: str) -> None:
        """Route no new work to ``name``; KeyError naming the instance if unknown."""
        self._control().cordon(name)

    def uncordon(self, name: str) -> None:
        self._control().uncordon(name)

    def drain(
        self, name: str, timeout_s: float = DEFAULT_DRAIN_TIMEOUT_S, wait: bool = True
    ) -> int:
        """Cordon ``name``, let its requests finish (migrating what is left after
        ``timeout_s``), then remove it; returns how many requests migrated."""
        d = self._control().drain(name, timeout_s)
        if wait and not d.done.wait(timeout_s + self.start_timeout_s):
            raise TimeoutError(f"instance: {name} did not drain")
        return d.migrated

    def scale(self, counts: dict[str, int], drain_timeout_s: float | None = None) -> None:
        """Set the number of instances per role (``{"prefill": 2, "decode": 3}``); new
        ones start and removed ones drain in the background (see :meth:`states`)."""
        allowed = {"prefill", "decode"} if self.mode == "disaggregated" else {"colocated"}
        bad = set(counts) - allowed
        if bad:
            raise ValueError(f"{sorted(bad)[0]}: no such pool in {self.mode} mode")
        self._control().scale(counts, drain_timeout_s)

    def pids(self) -> dict[str, int]:
        """Rank 0's process id per instance, as of its last ping."""
        started = {i.name: int(i.info.get("pid", 0)) for i in self.instances}
        return started | ({} if self._health is None else self._health.pids)

    def dtypes(self) -> dict[str, str]:
        """The dtype each instance's engine runs (``auto`` resolved), from its start."""
        return {i.name: str(i.info.get("dtype", "")) for i in self.instances}

    def counters(self) -> dict[str, int]:
        """The cluster's own counters: migrations by cause, migration failures."""
        return {} if self.migrator is None else dict(self.migrator.counters)

    def requests(self) -> list[dict[str, Any]]:
        """The requests in flight: id, instances, tokens so far, age, migrations."""
        return requests_in_flight(self._require_started().streams())

    @property
    def max_model_len(self) -> int:
        return min(i.info["max_model_len"] for i in self.instances)

    # -- requests ------------------------------------------------------------------

    def _loads(self) -> list[InstanceLoad]:
        """Each serving instance's load: the cluster's in-flight count plus polled stats."""
        receiver = self._require_started()
        serving = self._health.serving() if self._health is not None else None
        control = self.control
        live = [
            i for i in self.instances
            if (serving is None or i.name in serving)
            and (control is None or control.routable(i.name))
        ]  # fmt: skip
        queued = dict.fromkeys((i.name for i in live), 0)
        active = dict.fromkeys((i.name for i in live), 0)
        for stream in receiver.streams().values():
            t = stream.trace
            if t.prefill in queued and not t.token_times:
                queued[t.prefill] += stream.num_prompt_tokens
            for name in {t.prefill, t.decode}:
                if name in active:
                    active[name] += 1
        loads = []
        for i in live:
            polled = self._polled.get(i.name)
            loads.append(
                InstanceLoad(
                    name=i.name,
                    role=i.spec.role,
                    queued_prompt_tokens=queued[i.name],
                    active=active[i.name],
                    free_blocks=polled.free_blocks if polled else i.info.get("total_blocks", 0),
                    total_blocks=i.info.get("total_blocks", 0),
                    running=polled.num_running if polled else 0,
                )
            )
        return loads

    def _route(self, request: RouteRequest) -> tuple[builder.Instance, builder.Instance | None]:
        """(the instance that gets the prompt, the decode destination or None)."""
        loads = self._loads()
        roles = {x.role for x in loads}
        if not roles - {"prefill"} or (self.mode == "disaggregated" and "prefill" not in roles):
            raise NoInstanceServing("cluster: no instance is serving right now")
        first, dest = self.policy(request, loads)
        by_name = {i.name: i for i in self.instances}
        return by_name[first], None if dest is None else by_name[dest]

    def _poll(self) -> None:
        """Refresh the polled part of every instance's load (the health thread calls it);
        and move the requests that wait for a decode instance to migrate to."""
        if self.migrator is not None:
            self.migrator.retry()
        only = None if self._health is None else self._health.answering()
        self._polled = {s.name: s for s in self.stats(self.health_interval_s, only)}

    def _send(
        self,
        prompt: str | None,
        prompt_token_ids: Sequence[int] | None,
        params: SamplingParams | None,
        request_id: str | None,
        messages: list[dict[str, str]] | None = None,
    ) -> tuple[RequestStream, Any]:
        """Route and send a request; returns its stream and the reference to the
        instance's reply. The stream is registered first, so the load it adds counts
        for the next request routed even before the reply arrives."""
        arrival = time.monotonic()
        params = params or SamplingParams()
        if not isinstance(params, SamplingParams):
            raise ValueError(f"params: must be SamplingParams, got {type(params).__name__}")
        request_id = request_id or uuid.uuid4().hex
        receiver = self._require_started()
        if receiver.get(request_id) is not None:
            raise ValueError(f"request_id: {request_id!r} is already running")
        ids = None if prompt_token_ids is None else list(prompt_token_ids)
        # About four characters a token, until the instance says how many there are.
        text = prompt if messages is None else "".join(str(m) for m in messages)
        estimate = len(ids) if ids is not None else len(text or "") // 4
        first, dest = self._route(RouteRequest(request_id, estimate, prefix_key(ids, text)))
        trace = RequestTrace(first.name if dest else None, (dest or first).name, arrival)
        stream = RequestStream(request_id, ids or [], trace, estimate)
        stream.resubmit = dict(
            prompt=prompt, prompt_token_ids=ids, messages=messages, params=params.to_dict()
        )
        receiver.register(stream)
        ref = first.actor.add_request.remote(
            request_id,
            prompt,
            ids,
            params.to_dict(),
            None if dest is None else dest.name,
            messages,
        )
        return stream, ref

    def _accepted(self, stream: RequestStream, reply: Any) -> RequestStream:
        """The first instance's answer (or the error its call raised). One that could not
        take the request (it died or restarts) is not the client's fault: the request
        migrates: to another prefill instance (or, with none live, to a decode instance,
        which computes the prompt itself)."""
        if isinstance(reply, ray.exceptions.RayError) or reply.get("retry"):
            assert self.migrator is not None
            if stream.migrations == 0:  # else the health monitor moved it already
                first = stream.trace.prefill or stream.trace.decode
                away = {first} if first else set()
                if stream.trace.prefill:
                    self.migrator.redispatch(stream, "unavailable", away)
                else:
                    self.migrator.migrate(stream, "unavailable", away)
            return stream
        if "error" in reply:
            self._require_started().unregister(stream.request_id)
            raise ValueError(reply["error"])
        stream.set_prompt(reply["prompt_token_ids"])
        return stream

    def _require_started(self) -> EventReceiver:
        if self._receiver is None:
            raise RuntimeError("cluster: call start() first")
        return self._receiver

    def submit(
        self,
        prompt: str | None = None,
        params: SamplingParams | None = None,
        *,
        prompt_token_ids: Sequence[int] | None = None,
        messages: list[dict[str, str]] | None = None,
        request_id: str | None = None,
    ) -> RequestStream:
        """Send one request; read its outputs with ``stream.get()``. ValueError (naming
        the field) when the request cannot run; while no instance serves, it waits up to
        ``admission_timeout_s`` (``cluster.admission``)."""
        stream, ref = when_serving_sync(
            lambda: self._send(prompt, prompt_token_ids, params, request_id, messages),
            self.admission_timeout_s,
        )
        try:
            reply = ray.get(ref)
        except ray.exceptions.RayError as e:
            reply = e
        return self._accepted(stream, reply)

    async def stream(
        self,
        prompt: str | None = None,
        params: SamplingParams | None = None,
        *,
        prompt_token_ids: Sequence[int] | None = None,
        messages: list[dict[str, str]] | None = None,
        request_id: str | None = None,
    ) -> AsyncIterator[RequestOutput]:
        """Yield a snapshot of the request's output as tokens arrive; leaving the loop
        early (or cancelling the task) aborts the request everywhere. While no instance
        serves, it waits (asynchronously) up to ``admission_timeout_s``."""
        stream, ref = await when_serving(
            lambda: self._send(prompt, prompt_token_ids, params, request_id, messages),
            self.admission_timeout_s,
        )
        outputs = stream.attach_loop(asyncio.get_running_loop())
        try:
            try:
                reply = await ref
            except ray.exceptions.RayError as e:
                reply = e
            self._accepted(stream, reply)
            while True:
                out = await outputs.get()
                yield out
                if out.finished:
                    return
        finally:
            if not stream.finished:
                self.abort(stream.request_id)

    async def stream_n(
        self,
        prompt: str | None,
        params: SamplingParams | None,
        n: int,
        *,
        prompt_token_ids: Sequence[int] | None = None,
        messages: list[dict[str, str]] | None = None,
        request_id: str | None = None,
    ) -> list[AsyncIterator[RequestOutput]]:
        """``n`` sequences for one prompt, computed once and sharing its KV
        (``cluster.groups``): one output stream per sequence, each aborted when closed
        (``aclose``) before its end."""
        from cluster.groups import stream_group

        return list(
            await stream_group(
                self, prompt, params, n,
                prompt_token_ids=prompt_token_ids, messages=messages, request_id=request_id,
            )  # fmt: skip
        )

    def generate(
        self,
        prompts: Sequence[str] | None = None,
        params: SamplingParams | Sequence[SamplingParams] | None = None,
        *,
        prompt_token_ids: Sequence[Sequence[int]] | None = None,
        timeout_s: float | None = 600.0,
    ) -> list[RequestOutput]:
        """Run a batch of requests to completion; outputs in the order of the inputs."""
        inputs: list[tuple[str | None, Sequence[int] | None]]
        if prompt_token_ids is not None:
            inputs = [(None, ids) for ids in prompt_token_ids]
        elif prompts is not None:
            inputs = [(p, None) for p in prompts]
        else:
            raise ValueError("prompts: give prompts or prompt_token_ids")
        if params is None or isinstance(params, SamplingParams):
            per_request = [params] * len(inputs)
        else:
            per_request = list(params)
            if len(per_request) != len(inputs):
                raise ValueError(f"params: {len(per_request)} given for {len(inputs)} prompts")
        streams: list[RequestStream] = []
        try:
            for (prompt, ids), p in zip(inputs, per_request, strict=True):
                streams.append(self.submit(prompt, p, prompt_token_ids=ids))
            return [self._final(s, timeout_s) for s in streams]
        except BaseException:
            for s in streams:
                if not s.finished:
                    self.abort(s.request_id)
            raise

    @staticmethod
    def _final(stream: RequestStream, timeout_s: float | None) -> RequestOutput:
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            out = stream.get(timeout=left)
            if out.finished:
                return out

    def abort(self, request_id: str, reason: str = "abort", error: str | None = None) -> bool:
        """Stop a request on every instance it touched; False if it is not running."""
        if self._receiver is None:
            return False
        stream = self._receiver.unregister(request_id)
        if stream is None:
            return False
        by_name = {i.name: i for i in self.instances}
        for name in {stream.trace.prefill, stream.trace.decode}:
            if name in by_name:
                by_name[name].actor.abort.remote(request_id, stream.migrations)
        stream.finish(reason, error)
        return True

    def tokenizer_spec(self, timeout_s: float = 30.0) -> dict[str, Any]:
        """The model's tokenizer as plain data (engine.tokenizer.Tokenizer.from_spec
        rebuilds it), from the first serving instance."""
        for instance in self.instances:
            try:
                spec = ray.get(instance.actor.tokenizer_spec.remote(), timeout=timeout_s)
            except ray.exceptions.RayActorError:
                continue
            if spec is not None:
                return dict(spec)
        raise RuntimeError("no serving instance to read the tokenizer from")

    def stats(self, timeout_s: float = 30.0, only: set[str] | None = None) -> list[InstanceStats]:
        """Per serving instance (of ``only``, if given): queues, running batch, free and
        total KV blocks, counters.

        Instances that are restarting or dead are left out (see :meth:`health`), and so
        are those mid-step for all of ``timeout_s`` (each waits no longer than that)."""
        asked = [i for i in list(self.instances) if only is None or i.name in only]
        refs = [i.actor.stats.remote(timeout_s) for i in asked]
        if refs:  # all at once: a hung instance costs one timeout, not one each
            ray.wait(refs, num_returns=len(refs), timeout=timeout_s)
        out = []
        for ref in refs:
            try:
                reply = ray.get(ref, timeout=0)
            except ray.exceptions.RayError:
                # Restarting, dead, not answering, or the call itself was lost (Ray's
                # memory monitor kills a task's worker with an OutOfMemoryError).
                continue
            if reply is not None:
                out.append(InstanceStats(**reply))
        return out
