"""A prefill instance: computes a prompt's KV cache and first token, then holds the KV
until a decode instance has pulled it.

A request's path, through the queues named as the classes below:

1. ``add_request`` (from the router side) validates the request and puts it in the
   :class:`PrefillQueue`, which hands it to the engine's waiting queue. The engine's
   scheduler batches prompts up to its token budget, chunks long ones across steps, and
   skips blocks the prefix cache already holds.
2. When the engine samples the first token, the instance sends a first-token event to
   the router (this is the request's TTFT). If that token already finishes the request
   (a stop token, ``max_tokens=1``) the engine frees the blocks and the request is done.
3. Otherwise the engine *detaches* the request, keeping its blocks; they go under a
   lease in the :class:`~kv_transfer.lease.LeaseTable`, the transfer sender publishes
   them, and a :class:`~kv_transfer.handoff.HandOff` goes to the chosen decode instance.
   A sequence group (``n`` > 1, ``children``) is computed once: the engine samples each
   child's first token from the prompt's logits (one event per child), holds the
   prompt's blocks, and one hand-off carries them with every child still running.
4. The decode instance renews the lease while the request waits for blocks there,
   pulls the KV, and calls ``release``. The lease also ends when nobody renews it in
   time or the request is aborted. Whichever comes first retracts the blocks from the
   sender and frees them.

Everything that touches the engine runs on the instance's :class:`WorkerLoop` thread;
the public methods only validate and post work to it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from engine.events import EventSink, TokenEvent
from engine.llm_engine import LLMEngine
from engine.outputs import InstanceStats, RequestOutput
from engine.sampling_params import SamplingParams
from engine.step import StepCost
from engine.worker_loop import Tombstones, WorkerLoop
from kv_transfer.base import KVSender
from kv_transfer.handoff import ChildHandOff, HandOff
from kv_transfer.lease import Lease, LeaseTable

logger = logging.getLogger(__name__)

# (decode instance name, HandOff.to_dict()) -> None; the cluster makes it an actor call.
HandOffFn = Callable[[str, dict[str, Any]], None]


@dataclass
class QueuedPrefill:
    request_id: str
    num_prompt_tokens: int
    decode_instance: str
    arrival: float
    timings: dict[str, float] = field(default_factory=dict)
    attempt: int = 0  # the router's, for the hand-off (see ``Tombstones``)


class PrefillQueue:
    """Requests in the engine that have not produced their first token yet."""

    def __init__(self) -> None:
        self._items: dict[str, QueuedPrefill] = {}

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, request_id: str) -> bool:
        return request_id in self._items

    def add(self, item: QueuedPrefill) -> None:
        self._items[item.request_id] = item

    def pop(self, request_id: str) -> QueuedPrefill | None:
        return self._items.pop(request_id, None)

    def get(self, request_id: str) -> QueuedPrefill | None:
        return self._items.get(request_id)

    def ids(self) -> list[str]:
        return list(self._items)

    @property
    def num_prompt_tokens(self) -> int:
        """The dispatch signal: prompt tokens still ahead of a newly queued request."""
        return sum(item.num_prompt_tokens for item in self._items.values())


class PrefillWorker:
    def __init__(
        self,
        name: str,
        engine: LLMEngine,
        sender: KVSender,
        events: EventSink,
        hand_off: HandOffFn,
        lease_ttl_s: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
        step_cost: StepCost | None = None,
    ):
        """``step_cost``: the deployment's latency profile, for ``profiled_seconds``."""
        self.name = name
        self.step_cost = step_cost
        self.engine = engine
        self.sender = sender
        self.events = events
        self.hand_off = hand_off
        self.queue = PrefillQueue()
        self.leases = LeaseTable(lease_ttl_s, clock)
        self.loop = WorkerLoop(name, self._tick)
        self.endpoint = ""
        self._clock = clock
        self._aborted = Tombstones()
        engine.hold_groups = True  # a group's blocks wait for its hand-off (take_held)
        # Sequence groups by id: their children still wanted; and each child's group.
        self._groups: dict[str, set[str]] = {}
        self._group_of: dict[str, str] = {}
        self._firsts: dict[str, dict[str, RequestOutput]] = {}  # this step's first tokens
        self._counters: dict[str, float] = {
            "handoffs": 0,
            "finished_at_prefill": 0,
            "expired_leases": 0,
            "steps": 0,
            "step_seconds": 0.0,
        }
        if step_cost is not None:
            # The profile's time for the same steps: step_seconds over it is how much
            # slower than its profile the instance runs (the planner's inputs, checked).
            self._counters["profiled_seconds"] = 0.0

    # -- lifecycle -------------------------------------------------------------------

    def start(self) -> str:
        """Open the transfer sender and start the loop; returns the sender's endpoint."""
        self.endpoint = self.sender.start()
        self.loop.start()
        return self.endpoint

    def stop(self) -> None:
        self.loop.stop()
        self.sender.stop()
        self.events.close()

    # -- control calls (any thread) ---------------------------------------------------

    def add_request(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        decode_instance: str,
        children: list[tuple[str, SamplingParams]] | None = None,
        attempt: int = 0,
    ) -> None:
        """Queue a prompt; ValueError naming the field if it cannot run. ``children``:
        a sequence group's (request id, params), see ``LLMEngine.add_request``;
        ``attempt``: which copy of the request this is (``Tombstones``)."""
        self.engine.validate_request(prompt_token_ids, params)
        for _, child_params in children or []:
            self.engine.validate_request(prompt_token_ids, child_params)
        ids = list(prompt_token_ids)
        self.loop.post(self._add, request_id, ids, params, decode_instance, children, attempt)

    def abort(self, request_id: str, attempt: int = 0) -> None:
        """Drop the request here; a late call for a copy up to ``attempt`` is dropped too."""
        self.loop.post(self._abort, request_id, attempt)

    def renew(self, request_ids: list[str]) -> None:
        """The decode side's heartbeat for requests it has not pulled yet."""
        self.loop.post(self.leases.renew, list(request_ids))

    def release(self, request_id: str, attempt: int = 0) -> None:
        """The decode side is done with the KV of the copy sent as ``attempt`` (pulled, or
        gave up); a newer copy's lease under the same id stays."""
        self.loop.post(self._release, request_id, attempt)

    def send_kv(self, request_id: str, peer: dict[str, str]) -> None:
        """Push-style transports: the receiver asks for the KV to be sent to ``peer``."""
        self.sender.send(request_id, peer)

    def stats(self, timeout_s: float = 30.0) -> InstanceStats:
        """Read between steps; TimeoutError when a step outlasts ``timeout_s``."""
        return self.loop.call(self._stats, timeout=timeout_s)

    # -- the loop thread ----------------------------------------------------------------

    def _add(
        self,
        request_id: str,
        ids: list[int],
        params: SamplingParams,
        decode_instance: str,
        children: list[tuple[str, SamplingParams]] | None = None,
        attempt: int = 0,
    ) -> None:
        if children is not None:
            children = [c for c in children if not self._aborted.covers(c[0], attempt)]
            if not children:
                return
        elif self._aborted.covers(request_id, attempt):
            return
        if self._newer_held(request_id, attempt):
            return
        try:
            self.engine.add_request(
                request_id, params=params, prompt_token_ids=ids, children=children
            )
        except ValueError as e:  # e.g. a duplicate id; validation ran before
            for rid in [c for c, _ in children] if children else [request_id]:
                self._send_error(rid, str(e))
            return
        if children is not None:
            self._groups[request_id] = {c for c, _ in children}
            self._group_of.update((c, request_id) for c, _ in children)
        self.queue.add(
            QueuedPrefill(request_id, len(ids), decode_instance, self._clock(), attempt=attempt)
        )

    def _tick(self) -> bool:
        for lease in self.leases.expire():
            logger.warning("%s: lease of %s expired unpulled", self.name, lease.request_id)
            self._counters["expired_leases"] += 1
            self._forget_group(lease.request_id)
            self._free(lease)
        if not self.engine.has_unfinished():
            return False
        started = time.perf_counter()
        try:
            outputs = self.engine.step()
        except Exception as e:
            logger.exception("%s: step failed", self.name)
            for request_id in self.queue.ids():
                self.engine.abort(request_id)
                self.queue.pop(request_id)
                for rid in self._groups.get(request_id) or [request_id]:
                    self._send_error(rid, f"prefill step failed: {e}")
                self._forget_group(request_id)
            return True
        self._counters["steps"] += 1
        self._counters["step_seconds"] += time.perf_counter() - started
        if self.step_cost is not None:
            self._counters["profiled_seconds"] += self.step_cost(self.engine.last_step) / 1e3
        for out in outputs:
            self._on_first_token(out)
        for group, blocks in self.engine.take_held():
            self._hand_off_group(group, blocks)
        return True

    def _on_first_token(self, out: RequestOutput) -> None:
        group = self._group_of.get(out.request_id)
        # A child: its event now, the group's hand-off once all have their first token.
        item = self.queue.get(group) if group is not None else self.queue.pop(out.request_id)
        if item is None:
            return
        now = self._clock()
        metrics = out.metrics
        started = metrics.first_scheduled_time if metrics else None
        timings = {
            "queue": (started or now) - item.arrival,
            "prefill": now - (started or now),
        }
        event = TokenEvent(
            request_id=out.request_id,
            index=0,
            token_ids=list(out.new_token_ids),
            text=out.delta_text,
            finish_reason=out.finish_reason,
            source=self.name,
            logprobs=out.logprobs,
            num_prompt_tokens=len(out.prompt_token_ids),
            num_cached_tokens=out.num_cached_tokens,
            timings=timings,
            prompt_logprobs=out.prompt_logprobs,
        )
        if group is not None:
            self._firsts.setdefault(group, {})[out.request_id] = out
        if out.finished:
            self._counters["finished_at_prefill"] += 1
            self.events.send(event)
            return
        if group is not None:
            self.events.send(event)
            return
        seq, blocks = self.engine.detach(out.request_id)
        # The sender describes the blocks: under TP/PP, every rank's share and endpoint.
        desc = self.sender.describe(out.request_id, seq.num_prompt_tokens, blocks)
        self._end_older_lease(out.request_id, item.attempt)
        self.leases.grant(out.request_id, blocks, item.attempt)
        self.sender.publish(desc)
        self.events.send(event)
        state = None if seq.generator is None else bytes(seq.generator.get_state().tolist())
        handoff = HandOff(
            request_id=out.request_id,
            prompt_token_ids=seq.prompt_token_ids,
            first_token=out.new_token_ids[0],
            params=seq.params,
            kv=desc,
            source=self.name,
            source_endpoint=self.endpoint,
            generator_state=state,
            first_logprobs=out.logprobs[0] if out.logprobs else None,
            num_cached_tokens=out.num_cached_tokens,
            timings=timings,
            attempt=item.attempt,
        )
        self._counters["handoffs"] += 1
        self._send_handoff(item.decode_instance, handoff, [out.request_id])

    def _hand_off_group(self, group: Any, blocks: list[int]) -> None:
        """A group's children have their first tokens (sent): hand the prompt's KV and
        the children still running to the decode instance, in one hand-off."""
        gid = group.request_id
        item = self.queue.pop(gid)
        firsts = self._firsts.pop(gid, {})
        wanted = self._groups.get(gid, set())
        live = [c for c in group.children or [] if c.request_id in wanted]
        if item is None or not live:
            if blocks:
                self.engine.free_blocks(blocks)
            self._forget_group(gid)
            return
        children = []
        for c in live:
            first = firsts.get(c.request_id)
            state = None if c.generator is None else bytes(c.generator.get_state().tolist())
            children.append(
                ChildHandOff(
                    request_id=c.request_id,
                    first_token=c.output_token_ids[0],
                    params=c.params,
                    generator_state=state,
                    first_logprobs=first.logprobs[0] if first and first.logprobs else None,
                )
            )
        self._groups[gid] = {c.request_id for c in children}
        desc = self.sender.describe(gid, group.num_prompt_tokens, blocks)
        self._end_older_lease(gid, item.attempt)
        self.leases.grant(gid, blocks, item.attempt)
        self.sender.publish(desc)
        now = self._clock()
        started = group.metrics.first_scheduled_time
        handoff = HandOff(
            request_id=gid,
            prompt_token_ids=group.prompt_token_ids,
            first_token=children[0].first_token,
            params=group.params,
            kv=desc,
            source=self.name,
            source_endpoint=self.endpoint,
            num_cached_tokens=group.num_cached_tokens,
            timings={"queue": (started or now) - item.arrival, "prefill": now - (started or now)},
            children=children,
            attempt=item.attempt,
        )
        self._counters["handoffs"] += 1
        self._send_handoff(item.decode_instance, handoff, [c.request_id for c in children])

    def _send_handoff(self, decode: str, handoff: HandOff, request_ids: list[str]) -> None:
        try:
            self.hand_off(decode, handoff.to_dict())
        except KeyError as e:  # a decode instance not known here: fail these requests only
            logger.error("%s: hand-off of %s: %s", self.name, handoff.request_id, e)
            self._end_lease(handoff.request_id)
            for request_id in request_ids:
                self._send_error(request_id, f"hand-off: {e}")

    def _forget_group(self, group: str) -> None:
        for child in self._groups.pop(group, set()):
            self._group_of.pop(child, None)
        self._firsts.pop(group, None)

    def _abort(self, request_id: str, attempt: int = 0) -> None:
        self._aborted.add(request_id, attempt)
        if self._newer_held(request_id, attempt):
            # A newer copy is queued or leased; the copy this abort ends may hold a lease.
            self._end_older_lease(self._group_of.get(request_id, request_id), attempt)
            return
        group = self._group_of.pop(request_id, None)
        if group is not None:  # one child: the group goes on while others want it
            wanted = self._groups.get(group, set())
            wanted.discard(request_id)
            if group in self.queue:
                self.engine.abort(request_id)  # the engine drops the group with its last
                if not wanted:
                    self.queue.pop(group)
                    self._forget_group(group)
            elif not wanted:
                self._forget_group(group)
                self._end_lease(group)
            return
        if self.queue.pop(request_id) is not None:
            self.engine.abort(request_id)
        else:
            self._end_lease(request_id)

    def _newer_held(self, request_id: str, attempt: int) -> bool:
        """Whether a copy of ``request_id`` newer than ``attempt`` is queued or leased
        here: Ray does not order calls, so a call for an older copy may come after a newer
        one (re-dispatched back here) started, which goes on."""
        held = self._held_attempt(request_id)
        return held is not None and held > attempt

    def _held_attempt(self, request_id: str) -> int | None:
        """The attempt of the copy of ``request_id`` (a child's: of its group) held here,
        queued or leased; None if there is none."""
        held = self._group_of.get(request_id, request_id)
        item = self.queue.get(held)
        if item is not None:
            return item.attempt
        lease = self.leases.get(held)
        return None if lease is None else lease.attempt

    def _end_older_lease(self, request_id: str, attempt: int) -> None:
        """End the lease of ``request_id``'s (or a group's) copy up to ``attempt`` as its
        abort would, beside a newer copy here: at that abort, or when the newer copy is
        prefilled and leases the id if the abort is later still (Ray does not order
        calls). The group's children stay tracked: they are the newer copy's."""
        lease = self.leases.get(request_id)
        if lease is None or lease.attempt > attempt:
            return
        self.leases.end(request_id)
        self._free(lease)

    def _release(self, request_id: str, attempt: int) -> None:
        # Ray does not order calls: the release of an older copy's hand-off may come after
        # a newer copy leased the id here.
        lease = self.leases.get(request_id)
        if lease is not None and lease.attempt > attempt:
            return
        self._end_lease(request_id)

    def _end_lease(self, request_id: str) -> None:
        self._forget_group(request_id)
        lease = self.leases.end(request_id)
        if lease is not None:
            self._free(lease)

    def _free(self, lease: Lease) -> None:
        self.sender.retract(lease.request_id)  # waits out a send still reading the blocks
        self.engine.free_blocks(lease.block_ids)

    def _send_error(self, request_id: str, message: str) -> None:
        self.events.send(
            TokenEvent(request_id, 0, [], finish_reason="error", source=self.name, error=message)
        )

    def _stats(self) -> InstanceStats:
        s = self.engine.stats()
        counters: dict[str, float] = dict(self._counters)
        counters["leases"] = len(self.leases)
        counters["leased_blocks"] = self.leases.num_blocks
        counters["queued_prompt_tokens"] = self.queue.num_prompt_tokens
        return InstanceStats(
            name=self.name,
            role="prefill",
            num_waiting=s.num_waiting,
            num_running=s.num_running,
            free_blocks=s.free_blocks,
            total_blocks=s.total_blocks,
            num_preemptions=s.num_preemptions,
            counters=counters,
        )
