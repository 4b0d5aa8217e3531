"""A decode instance: pulls a prefilled request's KV and generates the rest.

A request's path, through the queues named as the classes below:

1. ``add_handoff`` (from the prefill instance) puts the request in the
   :class:`PendingQueue`: it waits for KV blocks here, and every heartbeat renews its
   lease on the prefill side so the KV is still there when blocks free up.
2. Admission, oldest first: when the free blocks cover the prompt's KV plus a reserve
   kept for the running batch to grow into, and the batch has room, the instance
   reserves the blocks and the request moves to the :class:`TransferQueue`, where a
   transfer thread pulls the KV into them.
3. When the pull is done the request joins the engine's running batch with its KV in
   place (continuous batching; the engine's scheduler, sampler and stop checks). A pull
   that fails or times out frees the reserved blocks and the request joins the batch
   to recompute its prompt here instead; that fallback is counted. Either way the
   prefill instance is told to release its copy.
4. Each step's new tokens go to the router as token events.
5. Finishing or aborting frees the blocks; the engine preempts (and later recomputes)
   the newest requests when blocks run out, as it does offline.

A sequence group's hand-off (``n`` > 1) is pulled once; then its children fork off the
pulled block table, sharing the prompt's full blocks and each with its own copy of the
last, partial one (``LLMEngine.share_blocks``), and decode as requests of their own.
Aborting one child leaves the others running; aborting all of them before the pull
releases the group.

In colocated mode ``add_request`` hands a fresh prompt straight to the engine, which
prefills and decodes it here with no transfer.

Everything that touches the engine runs on the instance's :class:`WorkerLoop` thread;
transfers run on their own threads and post their results back to it.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol

from engine.events import EventSink, TokenEvent
from engine.llm_engine import LLMEngine
from engine.outputs import InstanceStats, RequestOutput
from engine.sampling_params import SamplingParams
from engine.step import StepCost
from engine.worker_loop import Tombstones, WorkerLoop
from kv_transfer.base import KVReceiver, TransferResult, TransferStatus
from kv_transfer.handoff import HandOff

logger = logging.getLogger(__name__)


class PrefillPeers(Protocol):
    """Control calls to prefill instances, by name; all return at once."""

    def renew(self, instance: str, request_ids: list[str]) -> None: ...

    def release(self, instance: str, request_id: str, attempt: int = 0) -> None: ...

    def request_send(self, instance: str, request_id: str, peer: dict[str, str]) -> None: ...


@dataclass(frozen=True)
class DecodeConfig:
    lease_ttl_s: float = 30.0  # the prefill side's; heartbeats go out at a third of it
    # Blocks kept free for the running batch to grow into when admitting a pull.
    reserve_blocks: int = 4
    max_concurrent_pulls: int = 4

    def __post_init__(self) -> None:
        if not self.lease_ttl_s > 0:
            raise ValueError(f"lease_ttl_s: must be > 0, got {self.lease_ttl_s}")
        if self.reserve_blocks < 0:
            raise ValueError(f"reserve_blocks: must be >= 0, got {self.reserve_blocks}")
        if self.max_concurrent_pulls < 1:
            raise ValueError(f"max_concurrent_pulls: must be >= 1, got {self.max_concurrent_pulls}")


class PendingQueue:
    """Hand-offs waiting for blocks, oldest first."""

    def __init__(self) -> None:
        self._items: OrderedDict[str, HandOff] = OrderedDict()

    def __len__(self) -> int:
        return len(self._items)

    def add(self, handoff: HandOff) -> None:
        self._items[handoff.request_id] = handoff

    def peek(self) -> HandOff | None:
        return next(iter(self._items.values()), None)

    def get(self, request_id: str) -> HandOff | None:
        return self._items.get(request_id)

    def pop(self, request_id: str) -> HandOff | None:
        return self._items.pop(request_id, None)

    def values(self) -> list[HandOff]:
        return list(self._items.values())


@dataclass
class Pull:
    handoff: HandOff
    block_ids: list[int]
    aborted: bool = False


class TransferQueue:
    """Hand-offs whose KV is being pulled into reserved blocks."""

    def __init__(self) -> None:
        self._items: dict[str, Pull] = {}

    def __len__(self) -> int:
        return len(self._items)

    def add(self, pull: Pull) -> None:
        self._items[pull.handoff.request_id] = pull

    def get(self, request_id: str) -> Pull | None:
        return self._items.get(request_id)

    def pop(self, request_id: str) -> Pull | None:
        return self._items.pop(request_id, None)

    def values(self) -> list[Pull]:
        return list(self._items.values())


class DecodeWorker:
    def __init__(
        self,
        name: str,
        engine: LLMEngine,
        receiver: KVReceiver | None,
        events: EventSink,
        peers: PrefillPeers | None,
        config: DecodeConfig | None = None,
        clock: Callable[[], float] = time.monotonic,
        role: str = "decode",
        step_cost: StepCost | None = None,
    ):
        """``receiver`` and ``peers`` may be None for a colocated instance; ``step_cost``
        is the deployment's latency profile, for ``profiled_seconds``."""
        self.name = name
        self.step_cost = step_cost
        self.role = role
        self.engine = engine
        self.receiver = receiver
        self.events = events
        self.peers = peers
        self.config = config or DecodeConfig()
        self.pending = PendingQueue()
        self.transfers = TransferQueue()
        self.loop = WorkerLoop(name, self._tick)
        self.endpoint = ""
        self._clock = clock
        self._aborted = Tombstones()
        # Children of sequence groups still pending or pulling: their group's id, and
        # per group the children dropped meanwhile.
        self._group_of: dict[str, str] = {}
        self._dropped: dict[str, set[str]] = {}
        self._pool: ThreadPoolExecutor | None = None
        self._next_heartbeat = 0.0
        # Per running request: when the instance took it on and the attempt it came as
        # (``_abort``); and the transfer's time.
        self._started: dict[str, tuple[float, int]] = {}
        self._first_timings: dict[str, dict[str, float]] = {}
        self._counters: dict[str, float] = {
            "pulls": 0,
            "recomputes": 0,
            "resumes": 0,  # migrated requests taken over (their KV recomputed here)
            "forked": 0,  # sequences of n > 1 groups started off one pulled prompt
            "kv_bytes": 0,
            "kv_seconds": 0.0,
            "steps": 0,
            "step_seconds": 0.0,
            # Each step's time once per request it advanced: over token_steps, the step
            # time the average output token waited for, however the batch size varied.
            "token_steps": 0,
            "token_step_seconds": 0.0,
            # From the start of a tick that stepped to the start of the next: the step and
            # what the loop does around it (emitting tokens, admitting, posted calls).
            "loop_seconds": 0.0,
        }
        if step_cost is not None:
            # The profile's time for the same steps: step_seconds over it is how much
            # slower than its profile the instance runs (the planner's inputs, checked).
            self._counters["profiled_seconds"] = 0.0
        self._stepped_at: float | None = None  # when the last tick that stepped began

    # -- lifecycle -------------------------------------------------------------------

    def start(self) -> str:
        if self.receiver is not None:
            self.endpoint = self.receiver.start()
            self._pool = ThreadPoolExecutor(
                self.config.max_concurrent_pulls, thread_name_prefix=f"{self.name}-pull"
            )
        self.loop.start()
        return self.endpoint

    def stop(self) -> None:
        self.loop.stop()
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
        if self.receiver is not None:
            self.receiver.stop()
        self.events.close()

    # -- control calls (any thread) ---------------------------------------------------

    def add_handoff(self, handoff: dict[str, Any]) -> None:
        self.loop.post(self._add_handoff, HandOff.from_dict(handoff))

    def add_request(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        children: list[tuple[str, SamplingParams]] | None = None,
        attempt: int = 0,
    ) -> None:
        """Colocated mode: prefill and decode a prompt here (a sequence group with
        ``children``: the prompt once, the children sharing its blocks). ``attempt``:
        which copy of the request this is (``Tombstones``)."""
        self.engine.validate_request(prompt_token_ids, params)
        for _, child_params in children or []:
            self.engine.validate_request(prompt_token_ids, child_params)
        ids = list(prompt_token_ids)
        self.loop.post(self._add_request, request_id, ids, params, children, attempt)

    def resume(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        output_token_ids: list[int],
        params: SamplingParams,
        attempt: int = 0,
    ) -> None:
        """A request migrated here: recompute prompt plus the tokens already streamed
        (replayed as output) and generate the rest (``LLMEngine.add_resumed``). The
        prompt's logprobs went out with its first token, so they are not asked again
        (a TP/PP instance, which cannot compute them, takes the request too).
        ``attempt``: which copy of the request this is; it may have been here before."""
        params = dataclasses.replace(params, prompt_logprobs=None)
        self.engine.validate_request(prompt_token_ids, params)
        ids, outputs = list(prompt_token_ids), list(output_token_ids)
        self.loop.post(self._resume, request_id, ids, outputs, params, attempt)

    def abort(self, request_id: str, attempt: int = 0) -> None:
        """Drop the request here; a late call for a copy up to ``attempt`` is dropped too."""
        self.loop.post(self._abort, request_id, attempt)

    def stats(self, timeout_s: float = 30.0) -> InstanceStats:
        """Read between steps; TimeoutError when a step outlasts ``timeout_s``."""
        return self.loop.call(self._stats, timeout=timeout_s)

    # -- the loop thread ----------------------------------------------------------------

    def _add_request(
        self,
        request_id: str,
        ids: list[int],
        params: SamplingParams,
        children: list[tuple[str, SamplingParams]] | None = None,
        attempt: int = 0,
    ) -> None:
        if children is not None:
            children = [c for c in children if not self._aborted.covers(c[0], attempt)]
            if not children:
                return
        elif self._aborted.covers(request_id, attempt):
            return
        rids = [c for c, _ in children] if children is not None else [request_id]
        try:
            self.engine.add_request(
                request_id, params=params, prompt_token_ids=ids, children=children
            )
        except ValueError as e:
            for rid in rids:
                self._send_error(rid, str(e))
            return
        for rid in rids:
            self._started[rid] = (self._clock(), attempt)

    def _resume(
        self,
        request_id: str,
        ids: list[int],
        outputs: list[int],
        params: SamplingParams,
        attempt: int = 0,
    ) -> None:
        if self._aborted.covers(request_id, attempt):
            return
        if self._newer_held(request_id, attempt):
            return
        # An older copy of the request may still be here (its prefill instance died mid
        # hand-off): the resumed one replaces it.
        self._drop(request_id)
        try:
            self.engine.add_resumed(request_id, ids, outputs, params)
        except ValueError as e:
            self._send_error(request_id, str(e))
            return
        self._counters["resumes"] += 1
        self._started[request_id] = (self._clock(), attempt)
        self._first_timings[request_id] = {"recomputed": 1.0}

    def _add_handoff(self, handoff: HandOff) -> None:
        # Aborted, already resumed here by a migration (a late hand-off of a dead
        # prefill instance), or being pulled already: the KV is not wanted.
        rid = handoff.request_id
        aborted = self._aborted.covers
        if handoff.children is not None:
            gone = {
                c for c in handoff.request_ids
                if aborted(c, handoff.attempt) or c in self._started
            }  # fmt: skip
            if len(gone) == len(handoff.children) or self.transfers.get(rid) is not None:
                self._release(handoff)
                return
            self._dropped[rid] = gone
            self._group_of.update((c, rid) for c in handoff.request_ids)
        elif (
            aborted(rid, handoff.attempt)
            or rid in self._started
            or self.transfers.get(rid) is not None
        ):
            self._release(handoff)
            return
        # A second hand-off of one request: its prefill instance was lost (hung) and it
        # was re-dispatched to another, then the first woke up. Either copy of the KV is
        # the same; keep the newer copy's (the higher attempt: Ray does not order calls;
        # of two alike, the later), release the other's lease.
        earlier = self.pending.get(rid)
        if earlier is not None and earlier.attempt > handoff.attempt:
            self._release(handoff)
            return
        if earlier is not None:
            self.pending.pop(rid)
            self._release(earlier)
        self.pending.add(handoff)

    def _tick(self) -> bool:
        tick = time.perf_counter()
        if self._stepped_at is not None:
            self._counters["loop_seconds"] += tick - self._stepped_at
            self._stepped_at = None
        self._heartbeat()
        self._admit()
        if not self.engine.has_unfinished():
            return False
        self._stepped_at = tick
        started = time.perf_counter()
        try:
            outputs = self.engine.step()
        except Exception as e:
            logger.exception("%s: step failed", self.name)
            for request_id in list(self._started):
                self.engine.abort(request_id)
                self._started.pop(request_id)
                self._send_error(request_id, f"decode step failed: {e}")
            return True
        # The engine's own step time, beside which the router's overhead is measured.
        elapsed = time.perf_counter() - started
        self._counters["steps"] += 1
        self._counters["step_seconds"] += elapsed
        self._counters["token_steps"] += len(outputs)
        self._counters["token_step_seconds"] += elapsed * len(outputs)
        if self.step_cost is not None:
            self._counters["profiled_seconds"] += self.step_cost(self.engine.last_step) / 1e3
        for out in outputs:
            self._emit(out)
        return True

    def _heartbeat(self) -> None:
        now = self._clock()
        if self.peers is None or now < self._next_heartbeat:
            return
        self._next_heartbeat = now + self.config.lease_ttl_s / 3
        by_source: dict[str, list[str]] = {}
        for h in self.pending.values() + [p.handoff for p in self.transfers.values()]:
            by_source.setdefault(h.source, []).append(h.request_id)
        for source, ids in by_source.items():
            self.peers.renew(source, ids)

    def _admit(self) -> None:
        blocks = self.engine.block_manager
        while (handoff := self.pending.peek()) is not None:
            running = len(self.engine.scheduler.running) + len(self.transfers)
            if running + len(handoff.request_ids) - 1 >= self.engine.scheduler.config.max_num_seqs:
                return
            # A group's children but the first each copy the prompt's partial block.
            need = handoff.kv.num_blocks
            if len(handoff.prompt_token_ids) % blocks.block_size:
                need += len(handoff.request_ids) - 1
            if blocks.num_free_blocks < need + self.config.reserve_blocks:
                return
            self.pending.pop(handoff.request_id)
            pull = Pull(handoff, self.engine.reserve_blocks(handoff.kv.num_blocks))
            self.transfers.add(pull)
            assert self._pool is not None
            self._pool.submit(self._pull, pull)

    def _pull(self, pull: Pull) -> None:
        """On a transfer thread: move the KV, then hand the result to the loop."""
        h = pull.handoff
        assert self.receiver is not None and self.peers is not None
        peers = self.peers

        def request_send(request_id: str, peer: dict[str, str]) -> None:
            peers.request_send(h.source, request_id, peer)

        try:
            result = self.receiver.pull(h.kv, h.source_endpoint, pull.block_ids, request_send)
        except Exception as e:  # a backend bug must not strand the request
            logger.exception("%s: pull of %s raised", self.name, h.request_id)
            result = TransferResult(h.request_id, TransferStatus.FAILED, error=repr(e))
        self.loop.post(self._on_pulled, pull, result)

    def _on_pulled(self, pull: Pull, result: TransferResult) -> None:
        h = pull.handoff
        self.transfers.pop(h.request_id)
        self._release(h)
        if pull.aborted:
            self.engine.free_blocks(pull.block_ids)
            if h.children is not None:
                self._forget_group(h)
            return
        timings = {"kv_transfer": result.seconds}
        block_table: list[int] | None = pull.block_ids
        if result.status is TransferStatus.DONE:
            self._counters["pulls"] += 1
            self._counters["kv_bytes"] += result.nbytes
            self._counters["kv_seconds"] += result.seconds
        else:
            logger.warning(
                "%s: pull of %s failed (%s); recomputing", self.name, h.request_id, result.error
            )
            self._counters["recomputes"] += 1
            self.engine.free_blocks(pull.block_ids)
            block_table = None
            timings["recomputed"] = 1.0
        if h.children is not None:
            self._add_children(h, block_table, timings)
            return
        try:
            self.engine.add_prefilled(
                h.request_id,
                h.prompt_token_ids,
                h.first_token,
                h.params,
                block_table=block_table,
                generator_state=h.generator_state,
                first_logprobs=h.first_logprobs,
            )
        except ValueError as e:
            if block_table is not None:
                self.engine.free_blocks(block_table)
            self._send_error(h.request_id, str(e))
            return
        self._started[h.request_id] = (self._clock(), h.attempt)
        self._first_timings[h.request_id] = timings

    def _add_children(
        self, h: HandOff, block_table: list[int] | None, timings: dict[str, float]
    ) -> None:
        """A group's KV is here (or failed to come): fork its children off it."""
        dropped = self._forget_group(h)
        live = [c for c in h.children or [] if c.request_id not in dropped]
        if not live:
            if block_table is not None:
                self.engine.free_blocks(block_table)
            return
        tables: list[list[int] | None] = [None] * len(live)
        if block_table is not None:
            shared = self.engine.share_blocks(block_table, len(h.prompt_token_ids), len(live))
            tables = list(shared)
        self._counters["forked"] += len(live)
        for child, table in zip(live, tables, strict=True):
            try:
                self.engine.add_prefilled(
                    child.request_id,
                    h.prompt_token_ids,
                    child.first_token,
                    child.params,
                    block_table=table,
                    generator_state=child.generator_state,
                    first_logprobs=child.first_logprobs,
                )
            except ValueError as e:
                if table is not None:
                    self.engine.free_blocks(table)
                self._send_error(child.request_id, str(e))
                continue
            self._started[child.request_id] = (self._clock(), h.attempt)
            self._first_timings[child.request_id] = dict(timings)

    def _forget_group(self, h: HandOff) -> set[str]:
        """Stop tracking a group's children here; returns those dropped meanwhile."""
        for rid in h.request_ids:
            self._group_of.pop(rid, None)
        return self._dropped.pop(h.request_id, set())

    def _emit(self, out: RequestOutput) -> None:
        new = list(out.new_token_ids)
        timings = self._first_timings.pop(out.request_id, None)
        if timings is None:
            timings = {}
        elif out.request_id in self._started:  # the request's first decode step
            timings["first_decode_step"] = self._clock() - self._started[out.request_id][0]
        if out.finished:
            started = self._started.pop(out.request_id, None)
            if started is not None:
                timings["decode"] = self._clock() - started[0]
        self.events.send(
            TokenEvent(
                request_id=out.request_id,
                index=len(out.token_ids) - len(new),
                token_ids=new,
                text=out.delta_text,
                finish_reason=out.finish_reason,
                source=self.name,
                logprobs=None if out.logprobs is None else out.logprobs[-len(new) :],
                num_prompt_tokens=len(out.prompt_token_ids),
                num_cached_tokens=out.num_cached_tokens,
                timings=timings,
                # Colocated: the prompt's logprobs go with the first token.
                prompt_logprobs=out.prompt_logprobs if len(out.token_ids) == len(new) else None,
            )
        )

    def _abort(self, request_id: str, attempt: int = 0) -> None:
        self._aborted.add(request_id, attempt)
        if not self._newer_held(request_id, attempt):
            self._drop(request_id)

    def _newer_held(self, request_id: str, attempt: int) -> bool:
        """Whether a copy of ``request_id`` newer than ``attempt`` is held here: Ray does
        not order calls, so a call for an older copy may come after a newer one (migrated
        back here) started, which goes on."""
        held = self._held_attempt(request_id)
        return held is not None and held > attempt

    def _held_attempt(self, request_id: str) -> int | None:
        """The attempt of the copy of ``request_id`` held here (a child's is its group's
        until it is forked off), None if there is none."""
        handoff = self._handoff(self._group_of.get(request_id, request_id))
        if handoff is not None:
            return handoff.attempt
        started = self._started.get(request_id)
        return None if started is None else started[1]

    def _handoff(self, request_id: str) -> HandOff | None:
        """A request's (or group's) hand-off while it waits for blocks or is pulled."""
        pull = self.transfers.get(request_id)
        return self.pending.get(request_id) or (pull.handoff if pull else None)

    def _drop(self, request_id: str) -> None:
        """Forget a request wherever it is here, freeing what it holds."""
        group = self._group_of.get(request_id)
        if group is not None:  # a child whose group is pending or pulling
            dropped = self._dropped.setdefault(group, set())
            dropped.add(request_id)
            pending = self.pending.get(group)
            whole = self._handoff(group)
            if whole is None or len(dropped) < len(whole.request_ids):
                return
            request_id = group  # every child dropped: the group goes
            if pending is not None:
                self._forget_group(pending)
        handoff = self.pending.pop(request_id)
        if handoff is not None:
            self._release(handoff)
            return
        pull = self.transfers.get(request_id)
        if pull is not None:
            pull.aborted = True  # _on_pulled frees its blocks
            return
        if self._started.pop(request_id, None) is not None:
            self._first_timings.pop(request_id, None)
            self.engine.abort(request_id)

    def _release(self, handoff: HandOff) -> None:
        if self.peers is not None:
            self.peers.release(handoff.source, handoff.request_id, handoff.attempt)

    def _send_error(self, request_id: str, message: str) -> None:
        self.events.send(
            TokenEvent(request_id, 0, [], finish_reason="error", source=self.name, error=message)
        )

    def _stats(self) -> InstanceStats:
        s = self.engine.stats()
        counters = dict(self._counters)
        counters["pending"] = len(self.pending)
        counters["transferring"] = len(self.transfers)
        return InstanceStats(
            name=self.name,
            role=self.role,
            num_waiting=s.num_waiting,
            num_running=s.num_running,
            free_blocks=s.free_blocks,
            total_blocks=s.total_blocks,
            num_preemptions=s.num_preemptions,
            counters=counters,
        )
