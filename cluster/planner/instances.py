"""The simulated instances and the event queue they share.

A request's life in the simulator, disaggregated:

1. It arrives and joins a prefill instance's ``queue``. When the instance's first PP stage
   is free, it takes a batch from the head of the queue, up to ``token_budget`` prompt
   tokens. With ``chunking`` (the engine's chunked prefill) the last prompt taken may be
   cut to fill the budget and goes on in the next batch; without it, whole prompts only
   (always at least one). The batch walks the stages; each stage takes ``1/pp`` of the
   profile's pipeline latency and starts as soon as it is free, so up to ``pp`` batches
   are in flight. When the last stage is done with a prompt's last chunk, its first token
   exists: TTFT.
2. The decode instance puts it in ``waiting`` and admits it, first come first served, when
   its KV cache has room for prompt + output tokens (reserved whole, so nothing is ever
   preempted). A busy instance looks at its hand-offs only between steps, as the worker
   loop does, so admission waits for the step under way to end. Its KV cache then moves
   over the link (``transfer_s``).
3. It joins a ``Lane``'s running batch at the next step boundary. A lane steps
   continuously while it has work; an instance has ``pp`` lanes (micro-batches in the
   pipeline), each step costing the whole pipeline latency. After ``output - 1`` steps it
   finishes, frees its KV, and TPOT = (finish - first token) / (output - 1). A step
   costs the profile's time plus the instance's ``step_overhead_ms``: what its worker
   loop does around each forward pass (emitting tokens, admitting, control calls).

Colocated instances admit new requests straight into a lane's ``prefilling`` queue; each
step runs the lane's decodes plus prompt chunks that fill the rest of ``chunk_tokens``
(vLLM/Sarathi chunked prefill), so prefill and decode share, and slow, every step.
"""

from __future__ import annotations

import heapq
from collections import deque
from collections.abc import Callable
from typing import Protocol


class StepTimes(Protocol):
    """What an instance asks of its latency model: a ``LatencyProfile``, or a model whose
    step times depend on the moment (``cluster.planner.cpu_host``: instances sharing a
    host's cores)."""

    @property
    def tp(self) -> int: ...

    @property
    def pp(self) -> int: ...

    def prefill_ms(self, sum_tokens: float, sum_sq_tokens: float) -> float: ...

    def decode_ms(self, batch: int, sum_context: float) -> float: ...

    def mixed_ms(
        self, sum_tokens: float, sum_sq: float, batch: int, sum_context: float
    ) -> float: ...


INF = float("inf")


class SimRequest:
    """One request's lengths and the times the simulation gives it (seconds)."""

    __slots__ = ("index", "arrival_s", "prompt", "output", "first_token_s", "finish_s", "need")

    def __init__(self, index: int, arrival_s: float, prompt: int, output: int) -> None:
        self.index = index
        self.arrival_s = arrival_s
        self.prompt = prompt
        self.output = output
        self.first_token_s = INF
        self.finish_s = INF
        self.need = prompt + output  # KV tokens reserved on admission


Callback = Callable[[float], None]


class EventQueue:
    """A heap of (time, sequence, callback): the sequence number breaks ties in insertion
    order, which makes every run with the same inputs identical."""

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, Callback]] = []
        self._seq = 0
        self.now = 0.0  # the time of the event being run

    def at(self, time_s: float, callback: Callback) -> None:
        self._seq += 1
        heapq.heappush(self._heap, (time_s, self._seq, callback))

    def run(self) -> None:
        heap = self._heap
        while heap:
            time_s, _, callback = heapq.heappop(heap)
            self.now = time_s
            callback(time_s)


Done = Callable[[SimRequest, float], None]


class _Chunking:
    """A prompt part-way through chunked prefill."""

    __slots__ = ("req", "done")

    def __init__(self, req: SimRequest) -> None:
        self.req = req
        self.done = 0  # prompt tokens prefilled so far


def take_chunks(
    queue: deque[_Chunking], budget: int, whole: bool = False
) -> tuple[list[SimRequest], int, int]:
    """Prompt chunks from the head of ``queue``, first come first served, up to ``budget``
    tokens: (the prompts they complete, which leave the queue; tokens; sum of squares, as
    attention over each prompt so far). A prompt cut to the budget stays at the head.
    ``whole``: no prompt is cut; the first one is taken whole even past the budget."""
    completed: list[SimRequest] = []
    tokens = sum_sq = 0
    while queue and budget > 0:
        entry = queue[0]
        left = entry.req.prompt - entry.done
        if whole and left > budget and tokens:
            break
        chunk = left if whole else min(left, budget)
        tokens += chunk
        sum_sq += (entry.done + chunk) ** 2 - entry.done**2
        entry.done += chunk
        budget -= chunk
        if entry.done < entry.req.prompt:
            break
        completed.append(queue.popleft().req)
    return completed, tokens, sum_sq


class PrefillInstance:
    """Batches prompts under a token budget and pipelines them through ``pp`` stages."""

    def __init__(
        self,
        events: EventQueue,
        profile: StepTimes,
        token_budget: int,
        on_prefilled: Done,
        chunking: bool = True,
    ) -> None:
        self.events = events
        self.profile = profile
        self.token_budget = token_budget
        self.on_prefilled = on_prefilled
        self.chunking = chunking
        self.queue: deque[_Chunking] = deque()
        self.queued_tokens = 0
        self.stage_free_s = [0.0] * profile.pp
        self._wake_pending = False

    def submit(self, req: SimRequest, now: float) -> None:
        self.queue.append(_Chunking(req))
        self.queued_tokens += req.prompt
        if not self._wake_pending:
            self._start(now)

    def _wake(self, now: float) -> None:
        self._wake_pending = False
        self._start(now)

    def _start(self, now: float) -> None:
        if not self.queue:
            return
        if self.stage_free_s[0] > now:
            self._wake_pending = True
            self.events.at(self.stage_free_s[0], self._wake)
            return
        batch, tokens, sum_sq = take_chunks(self.queue, self.token_budget, whole=not self.chunking)
        self.queued_tokens -= tokens
        stage_s = self.profile.prefill_ms(tokens, sum_sq) / 1000.0 / self.profile.pp
        t = now
        for s, free_s in enumerate(self.stage_free_s):
            t = max(t, free_s) + stage_s
            self.stage_free_s[s] = t
        self.events.at(t, lambda done_s: self._finish(batch, done_s))
        self._wake_pending = True
        self.events.at(self.stage_free_s[0], self._wake)

    def _finish(self, batch: list[SimRequest], now: float) -> None:
        for req in batch:
            req.first_token_s = now
            self.on_prefilled(req, now)


class Lane:
    """One micro-batch of an instance: continuous batching of decodes (and, colocated,
    chunks of prompts), one step after another while there is work."""

    def __init__(self, owner: LaneInstance) -> None:
        self.owner = owner
        self.batch = 0  # running decodes
        self.sum_context = 0  # their context tokens
        self.step = 0  # steps completed
        self.finishing: list[tuple[int, int, SimRequest]] = []  # (finish step, index, req)
        self.joining: list[SimRequest] = []  # ready to decode from the next step
        self.prefilling: deque[_Chunking] = deque()
        self.completed: list[SimRequest] = []  # prompts whose last chunk is in this step
        self.busy = False
        self.step_end_s = 0.0  # when the step under way ends (while busy)

    @property
    def load(self) -> int:
        return self.batch + len(self.joining) + len(self.prefilling)

    def kick(self, now: float) -> None:
        if not self.busy:
            self._step(now)

    def _step(self, now: float) -> None:
        owner = self.owner
        if self.joining:
            for req in self.joining:
                self.batch += 1
                self.sum_context += req.prompt + 1
                heapq.heappush(self.finishing, (self.step + req.output - 1, req.index, req))
            self.joining = []
        tokens = sum_sq = 0
        if self.prefilling:
            self.completed, tokens, sum_sq = take_chunks(
                self.prefilling, owner.chunk_tokens - self.batch
            )
        if self.batch == 0 and tokens == 0:
            self.busy = False
            return
        self.busy = True
        if tokens:
            ms = owner.profile.mixed_ms(tokens, sum_sq, self.batch, self.sum_context)
        else:
            ms = owner.profile.decode_ms(self.batch, self.sum_context)
        self.step_end_s = now + (ms + owner.step_overhead_ms) / 1000.0
        owner.events.at(self.step_end_s, self._end)

    def _end(self, now: float) -> None:
        owner = self.owner
        self.step += 1
        self.sum_context += self.batch
        freed = False
        finishing = self.finishing
        while finishing and finishing[0][0] <= self.step:
            req = heapq.heappop(finishing)[2]
            self.batch -= 1
            self.sum_context -= req.prompt + req.output
            owner.finish(req, now)
            freed = True
        if self.completed:
            for req in self.completed:
                req.first_token_s = now
                if req.output == 1:
                    owner.finish(req, now)
                    freed = True
                else:
                    self.joining.append(req)
            self.completed = []
        if freed and owner.waiting:
            owner.admit(now)
        self._step(now)


def _load(lane: Lane) -> int:
    return lane.load


class LaneInstance:
    """A decode instance (``chunk_tokens = 0``: requests arrive prefilled) or a colocated
    one (``chunk_tokens > 0``: it prefills them itself). KV is reserved at admission."""

    def __init__(
        self,
        events: EventQueue,
        profile: StepTimes,
        kv_capacity: int,
        chunk_tokens: int,
        on_finished: Done,
        transfer_s: Callable[[SimRequest], float] | None = None,
        step_overhead_ms: float = 0.0,
    ) -> None:
        self.events = events
        self.profile = profile
        self.kv_capacity = kv_capacity
        self.chunk_tokens = chunk_tokens
        self.on_finished = on_finished
        self.transfer_s = transfer_s
        self.step_overhead_ms = step_overhead_ms  # host time per step beside the forward
        self.lanes = [Lane(self) for _ in range(profile.pp)]
        self.waiting: deque[SimRequest] = deque()
        self.waiting_tokens = 0
        self.reserved = 0
        self.active = 0  # submitted, not finished: the router's live count

    @property
    def free_tokens(self) -> int:
        return self.kv_capacity - self.reserved - self.waiting_tokens

    def submit(self, req: SimRequest, now: float) -> None:
        if req.need > self.kv_capacity:  # can never fit: it fails its SLOs, as in life
            self.on_finished(req, INF)
            return
        self.active += 1
        self.waiting.append(req)
        self.waiting_tokens += req.need
        boundary = self._next_boundary(now)
        if boundary > now:
            self.events.at(boundary, self.admit)
        else:
            self.admit(now)

    def _next_boundary(self, now: float) -> float:
        """When a hand-off arriving ``now`` is looked at: at once when a lane is idle,
        else when the first step under way ends. Only a disaggregated decode instance
        waits (its pulls start at admission); a colocated or decode-only one's arrivals
        join at the next step anyway."""
        if self.transfer_s is None or not all(lane.busy for lane in self.lanes):
            return now
        return min(lane.step_end_s for lane in self.lanes)

    def admit(self, now: float) -> None:
        while self.waiting and self.reserved + self.waiting[0].need <= self.kv_capacity:
            req = self.waiting.popleft()
            self.waiting_tokens -= req.need
            self.reserved += req.need
            lane = self.lanes[0] if len(self.lanes) == 1 else min(self.lanes, key=_load)
            if self.chunk_tokens > 0:
                lane.prefilling.append(_Chunking(req))
                lane.kick(now)
            elif self.transfer_s is None:
                lane.joining.append(req)
                lane.kick(now)
            else:
                self.events.at(now + self.transfer_s(req), self._joiner(lane, req))

    @staticmethod
    def _joiner(lane: Lane, req: SimRequest) -> Callback:
        def join(now: float) -> None:
            lane.joining.append(req)
            lane.kick(now)

        return join

    def finish(self, req: SimRequest, now: float) -> None:
        self.reserved -= req.need
        self.active -= 1
        self.on_finished(req, now)
