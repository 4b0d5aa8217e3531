"""A prefill and a decode worker in one process, wired the way the cluster wires them
(hand-off, heartbeats, release, token events), with the in-process ``local`` transport.

The cluster tests run the same workers as Ray actors over real transports; this pair
keeps the worker logic testable in seconds.
"""

from __future__ import annotations

import time
from typing import Any

from cluster.stream import RequestStream, RequestTrace
from decode_workers.worker import DecodeConfig, DecodeWorker
from engine.config import CacheConfig, EngineConfig
from engine.events import EventSink, TokenEvent
from engine.llm_engine import LLMEngine
from engine.outputs import RequestOutput
from engine.sampling_params import SamplingParams
from engine.step import StepCost
from kv_transfer import TransferConfig, create_receiver, create_sender
from prefill_workers.worker import PrefillWorker


class StreamSink(EventSink):
    """Feeds events to per-request streams, as the cluster's event socket does."""

    def __init__(self) -> None:
        super().__init__()
        self.streams: dict[str, RequestStream] = {}

    def send(self, event: TokenEvent) -> None:
        super().send(event)
        stream = self.streams.get(event.request_id)
        if stream is not None:
            stream.push(event)


class LocalPeers:
    """Decode -> prefill control calls, made directly."""

    def __init__(self, prefill: dict[str, PrefillWorker]):
        self.prefill = prefill
        self.releases: list[str] = []

    def renew(self, instance: str, request_ids: list[str]) -> None:
        self.prefill[instance].renew(request_ids)

    def release(self, instance: str, request_id: str, attempt: int = 0) -> None:
        self.releases.append(request_id)
        self.prefill[instance].release(request_id, attempt)

    def request_send(self, instance: str, request_id: str, peer: dict[str, str]) -> None:
        self.prefill[instance].send_kv(request_id, peer)


def make_engine(num_blocks: int = 256) -> LLMEngine:
    return LLMEngine.from_config(EngineConfig(cache=CacheConfig(num_blocks=num_blocks)))


class Pair:
    def __init__(
        self,
        prefill_engine: LLMEngine,
        decode_engine: LLMEngine,
        transfer: TransferConfig | None = None,
        lease_ttl_s: float = 30.0,
        hand_off: Any = None,
        step_cost: StepCost | None = None,
    ):
        transfer = transfer or TransferConfig(backend="local")
        self.sink = StreamSink()
        self.prefill = PrefillWorker(
            "prefill-0",
            prefill_engine,
            create_sender("prefill-0", prefill_engine.kv_blocks, transfer),
            self.sink,
            hand_off or self._hand_off,
            lease_ttl_s=lease_ttl_s,
            step_cost=step_cost,
        )
        self.peers = LocalPeers({"prefill-0": self.prefill})
        self.decode = DecodeWorker(
            "decode-0",
            decode_engine,
            create_receiver("decode-0", decode_engine.kv_blocks, transfer),
            self.sink,
            self.peers,
            DecodeConfig(lease_ttl_s=lease_ttl_s),
            step_cost=step_cost,
        )

    def _hand_off(self, instance: str, handoff: dict[str, Any]) -> None:
        assert instance == "decode-0"
        self.decode.add_handoff(handoff)

    def __enter__(self) -> Pair:
        self.prefill.start()
        self.decode.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.decode.stop()
        self.prefill.stop()

    def submit(self, request_id: str, ids: list[int], params: SamplingParams) -> RequestStream:
        stream = RequestStream(request_id, ids, RequestTrace("prefill-0", "decode-0", 0.0))
        self.sink.streams[request_id] = stream
        self.prefill.add_request(request_id, ids, params, "decode-0")
        return stream

    def run(
        self, prompts: list[list[int]], params: list[SamplingParams], timeout_s: float = 120
    ) -> list[RequestOutput]:
        streams = [
            self.submit(f"r{i}", ids, p)
            for i, (ids, p) in enumerate(zip(prompts, params, strict=True))
        ]
        return [final(s, timeout_s) for s in streams]


def final(stream: RequestStream, timeout_s: float = 120) -> RequestOutput:
    deadline = time.monotonic() + timeout_s
    while True:
        out = stream.get(timeout=max(0.0, deadline - time.monotonic()))
        if out.finished:
            return out


def wait_until(predicate: Any, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.02)
