"""The router side of the token path: one PULL socket that every instance pushes token
events to, and per-request streams that put the events back in order.

A request's events come from two instances over two connections (the first token from
the prefill instance, the rest from the decode instance), so arrival order is not
output order; each event says where its tokens go (``index``) and a stream holds back
anything that arrives early. A stream turns events into the engine's ``RequestOutput``
snapshots, which both a blocking reader and an asyncio reader can wait on.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from dataclasses import dataclass, field

import zmq

from engine.events import TokenEvent, decode
from engine.outputs import RequestMetrics, RequestOutput

logger = logging.getLogger(__name__)


@dataclass
class RequestTrace:
    """What the cluster saw of one request: where it went and when tokens arrived."""

    prefill: str | None
    decode: str | None
    arrival: float
    token_times: list[float] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)


class RequestStream:
    def __init__(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        trace: RequestTrace,
        num_prompt_tokens: int | None = None,
    ):
        """``num_prompt_tokens``: an estimate for load accounting until the instance has
        tokenized a text prompt (see :meth:`set_prompt`)."""
        self.request_id = request_id
        self.trace = trace
        self._out = RequestOutput(request_id, list(prompt_token_ids), [], "")
        self._num_prompt_tokens = (
            len(prompt_token_ids) if num_prompt_tokens is None else num_prompt_tokens
        )
        self._out.metrics = RequestMetrics(
            trace.arrival, prefill_instance=trace.prefill, decode_instance=trace.decode
        )
        self._early: dict[int, TokenEvent] = {}
        self._sync: queue.SimpleQueue[RequestOutput] = queue.SimpleQueue()
        self._async: tuple[asyncio.AbstractEventLoop, asyncio.Queue[RequestOutput]] | None = None
        self.finished = False
        self._lock = threading.Lock()  # the event thread pushes, an abort finishes
        # What a migration re-submits (cluster.migration): the request as first sent.
        self.resubmit: dict[str, object] = {}
        self.migrations = 0
        self._ignored: set[str] = set()  # instances it was migrated away from

    @property
    def prompt_token_ids(self) -> list[int]:
        return list(self._out.prompt_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return self._num_prompt_tokens

    def set_prompt(self, prompt_token_ids: list[int]) -> None:
        with self._lock:
            self._out.prompt_token_ids = list(prompt_token_ids)
            self._num_prompt_tokens = len(prompt_token_ids)

    def attach_loop(self, loop: asyncio.AbstractEventLoop) -> asyncio.Queue[RequestOutput]:
        """Deliver outputs to an asyncio queue (instead of the blocking one)."""
        aqueue: asyncio.Queue[RequestOutput] = asyncio.Queue()
        with self._lock:
            while not self._sync.empty():  # anything delivered before the loop attached
                aqueue.put_nowait(self._sync.get())
            self._async = (loop, aqueue)
        return aqueue

    def push(self, event: TokenEvent) -> None:
        """Take one event (any thread); releases every output that is now in order."""
        with self._lock:
            if self.finished or event.source in self._ignored:
                return
            self._push(event)

    def begin_migration(self, away_from: set[str], to: str) -> list[int] | None:
        """Stop listening to ``away_from`` and count a migration to ``to``; returns the
        tokens streamed so far (None once finished). Tokens held back out of order are
        dropped: the new instance generates them again, identically."""
        with self._lock:
            if self.finished:
                return None
            # An instance it comes back to (restarted since) is listened to again.
            self._ignored = (self._ignored | away_from) - {to}
            self._early.clear()
            self.migrations += 1
            self.trace.prefill, self.trace.decode = None, to
            return list(self._out.token_ids)

    def begin_redispatch(self, away_from: set[str], prefill: str, decode: str) -> str:
        """Stop listening to ``away_from`` and count a re-dispatch of a request that has
        no token yet to ``prefill`` (handing off to ``decode``). Returns "ok"; "started"
        if a token came in meanwhile (it must resume on decode instead); "moved" if it
        is no longer on a prefill instance in ``away_from`` (someone else moved it, or it
        finished): nothing to do."""
        with self._lock:
            if self.finished or self.trace.prefill not in away_from:
                return "moved"
            if self._out.token_ids:
                return "started"
            self._ignored = (self._ignored | away_from) - {prefill, decode}
            self._early.clear()
            self.migrations += 1
            self.trace.prefill, self.trace.decode = prefill, decode
            return "ok"

    def _push(self, event: TokenEvent) -> None:
        if event.finish_reason == "error" or event.index <= len(self._out.token_ids):
            self._apply(event)
            while not self.finished and len(self._out.token_ids) in self._early:
                self._apply(self._early.pop(len(self._out.token_ids)))
        else:
            self._early[event.index] = event

    def finish(self, reason: str, error: str | None = None) -> None:
        with self._lock:
            if not self.finished:
                index = len(self._out.token_ids)
                self._apply(
                    TokenEvent(self.request_id, index, [], finish_reason=reason, error=error)
                )

    def _apply(self, event: TokenEvent) -> None:
        out = self._out
        now = time.monotonic()
        seen = len(out.token_ids) - event.index  # of the event's tokens, already streamed
        new = event.token_ids[max(0, seen) :]
        if seen > 0 and not new and event.finish_reason is None:
            # Tokens streamed already (sent again around a migration): their text too.
            return
        if seen > 0 and new:
            # The event's text covers its repeated tokens as well and cannot be split.
            logger.warning("request %s: an event repeats %d streamed tokens; its text is "
                           "kept whole", self.request_id, seen)
        text = event.text if new or seen <= 0 else ""
        out.token_ids = out.token_ids + new
        out.new_token_ids = new
        out.text += text
        out.delta_text = text
        out.num_cached_tokens = max(out.num_cached_tokens, event.num_cached_tokens)
        if event.logprobs is not None and new:
            out.logprobs = (out.logprobs or []) + event.logprobs[-len(new) :]
        if event.prompt_logprobs is not None:
            out.prompt_logprobs = event.prompt_logprobs
        self.trace.timings.update(event.timings)
        if out.metrics:
            out.metrics.timings.update(event.timings)
        if new:
            self.trace.token_times.extend([now] * len(new))
            if out.metrics and out.metrics.first_token_time is None:
                out.metrics.first_token_time = now
        if event.finish_reason is not None:
            out.finished = True
            out.finish_reason = event.finish_reason
            if out.metrics:
                out.metrics.finish_time = now
            if event.error:
                self.trace.timings["error"] = 1.0
                logger.warning("request %s failed: %s", self.request_id, event.error)
            self.finished = True
        self._deliver(RequestOutput(**{**out.__dict__, "token_ids": list(out.token_ids)}))

    def _deliver(self, snapshot: RequestOutput) -> None:
        if self._async is not None:
            loop, aqueue = self._async
            loop.call_soon_threadsafe(aqueue.put_nowait, snapshot)
        else:
            self._sync.put(snapshot)

    def get(self, timeout: float | None = None) -> RequestOutput:
        """The next output snapshot (blocking reader)."""
        return self._sync.get(timeout=timeout)


class EventReceiver:
    """Binds the PULL socket and feeds each event to its request's stream."""

    def __init__(self, host: str = "127.0.0.1"):
        self._context: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
        self._socket = self._context.socket(zmq.PULL)
        self._socket.setsockopt(zmq.RCVHWM, 0)
        self._socket.setsockopt(zmq.LINGER, 0)
        self._socket.bind(f"tcp://{host}:*")
        self.address: str = self._socket.getsockopt_string(zmq.LAST_ENDPOINT)
        self._streams: dict[str, RequestStream] = {}
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="baton-events", daemon=True)
        self.num_malformed = 0

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        self._thread.join(5)
        self._socket.close()

    def register(self, stream: RequestStream) -> None:
        with self._lock:
            self._streams[stream.request_id] = stream

    def unregister(self, request_id: str) -> RequestStream | None:
        with self._lock:
            return self._streams.pop(request_id, None)

    def get(self, request_id: str) -> RequestStream | None:
        with self._lock:
            return self._streams.get(request_id)

    def streams(self) -> dict[str, RequestStream]:
        """A snapshot of the requests in flight."""
        with self._lock:
            return dict(self._streams)

    def _run(self) -> None:
        poller = zmq.Poller()
        poller.register(self._socket, zmq.POLLIN)
        while not self._stopping.is_set():
            if not poller.poll(100):
                continue
            while True:
                try:
                    frame = self._socket.recv(zmq.NOBLOCK)
                except zmq.Again:
                    break
                self._dispatch(frame)

    def _dispatch(self, frame: bytes) -> None:
        try:
            event = decode(frame)
        except ValueError as e:
            self.num_malformed += 1
            logger.warning("dropped a token event: %s", e)
            return
        stream = self.get(event.request_id)
        if stream is None:
            return  # aborted or unknown: nobody is listening
        stream.push(event)
        if stream.finished:
            self.unregister(event.request_id)
