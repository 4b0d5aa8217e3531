"""The token events instances stream to the router side, and their wire format.

An event carries the tokens a request gained at one instance: the prefill instance
sends the first token, the decode instance the rest (or everything, when it had to
recompute the prompt, or in colocated mode). ``index`` is the position of the first new
token in the request's output, so the receiving side can order events that arrive over
different sockets. Frames are msgpack maps of plain values; nothing is pickled.

This module imports no torch, so the router can decode events.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import msgpack

FINISH_REASONS = ("stop", "length", "abort", "error")


@dataclass
class TokenEvent:
    request_id: str
    index: int
    token_ids: list[int]
    text: str = ""
    finish_reason: str | None = None
    source: str = ""  # the instance that produced the tokens
    logprobs: list[list[tuple[int, float]]] | None = None
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0
    # Durations in seconds, measured where they happen (clocks differ across nodes):
    # "queue", "prefill", "kv_transfer", "decode"; "recomputed" = 1.0 after a failed pull.
    timings: dict[str, float] = field(default_factory=dict)
    error: str | None = None
    # With the first token, when asked: [(token, logprob, rank), *top-N] per prompt token
    # after the first (engine/prompt_logprobs.py).
    prompt_logprobs: list[list[tuple[int, float, int]]] | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


def encode(event: TokenEvent) -> bytes:
    frame: dict[str, Any] = {
        "r": event.request_id,
        "i": event.index,
        "t": event.token_ids,
        "x": event.text,
        "s": event.source,
        "p": event.num_prompt_tokens,
        "c": event.num_cached_tokens,
        "m": event.timings,
    }
    if event.finish_reason is not None:
        frame["f"] = event.finish_reason
    if event.logprobs is not None:
        frame["l"] = [[[tok, lp] for tok, lp in row] for row in event.logprobs]
    if event.error is not None:
        frame["e"] = event.error
    if event.prompt_logprobs is not None:
        frame["q"] = [[[t, lp, r] for t, lp, r in row] for row in event.prompt_logprobs]
    return msgpack.packb(frame, use_bin_type=True)


def decode(frame: bytes) -> TokenEvent:
    """Parse one frame; ValueError for anything that is not a well-formed event."""
    try:
        d = msgpack.unpackb(frame, raw=False, strict_map_key=True)
        logprobs = d.get("l")
        prompt = d.get("q")
        return TokenEvent(
            request_id=str(d["r"]),
            index=int(d["i"]),
            token_ids=[int(t) for t in d["t"]],
            text=str(d["x"]),
            finish_reason=d.get("f"),
            source=str(d["s"]),
            logprobs=None
            if logprobs is None
            else [[(int(tok), float(lp)) for tok, lp in row] for row in logprobs],
            num_prompt_tokens=int(d["p"]),
            num_cached_tokens=int(d["c"]),
            timings={str(k): float(v) for k, v in d["m"].items()},
            error=d.get("e"),
            prompt_logprobs=None
            if prompt is None
            else [[(int(t), float(lp), int(r)) for t, lp, r in row] for row in prompt],
        )
    except (ValueError, TypeError, KeyError, AttributeError, msgpack.ExtraData) as e:
        raise ValueError(f"token event: malformed frame ({e})") from e


class EventSink:
    """Where an instance's events go. The base keeps them in a list, for tests."""

    def __init__(self) -> None:
        self.events: list[TokenEvent] = []

    def send(self, event: TokenEvent) -> None:
        self.events.append(event)

    def close(self) -> None:
        pass


class ZmqEventSink(EventSink):
    """Pushes encoded events to the router side's PULL socket at ``address``.

    Use from one thread only (ZeroMQ sockets are not thread-safe): the instance loop.
    """

    def __init__(self, address: str, linger_ms: int = 2000):
        super().__init__()
        import zmq

        self._context: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
        self._socket = self._context.socket(zmq.PUSH)
        # Events wait in memory rather than being dropped while the router is slow.
        self._socket.setsockopt(zmq.SNDHWM, 0)
        self._socket.setsockopt(zmq.LINGER, linger_ms)
        self._socket.connect(address)

    def send(self, event: TokenEvent) -> None:
        self._socket.send(encode(event))

    def close(self) -> None:
        self._socket.close()
