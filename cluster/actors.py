"""The serving instance as a Ray actor: a plain class that builds and drives one worker.

The builder (``cluster.builder``) wraps :class:`InstanceActor` with ``ray.remote`` and
calls it; nothing here knows about placement groups. The constructor only stores its
spec, so a restarted actor is cheap and ``start()`` does the real work (loading the
model, opening the transfer and the event socket). Control methods return errors as
values (``{"error": message}``) rather than raising across the process boundary.

Heavy imports (torch, the engine) happen in ``start()``, so importing this module (and
``cluster``) costs nothing.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from typing import Any

logger = logging.getLogger(__name__)

ROLES = ("prefill", "decode", "colocated")


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

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ValueError(f"role: must be one of {', '.join(ROLES)}, got {self.role!r}")
        if self.num_threads < 1:
            raise ValueError(f"num_threads: must be >= 1, got {self.num_threads}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


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

    def _handle(self, instance: str) -> Any:
        handle = self._handles.get(instance)
        if handle is None:
            raise KeyError(f"instance: unknown instance {instance!r}")
        return handle

    def renew(self, instance: str, request_ids: list[str]) -> None:
        self._handle(instance).renew.remote(request_ids)

    def release(self, instance: str, request_id: str) -> None:
        self._handle(instance).release.remote(request_id)

    def request_send(self, instance: str, request_id: str, peer: dict[str, str]) -> None:
        self._handle(instance).send_kv.remote(request_id, peer)

    def hand_off(self, instance: str, handoff: dict[str, Any]) -> None:
        self._handle(instance).add_handoff.remote(handoff)


class InstanceActor:
    def __init__(self, spec: dict[str, Any]):
        self.spec = InstanceSpec(**spec)
        self.worker: Any = None  # PrefillWorker | DecodeWorker once started
        self.info: dict[str, Any] = {}

    def ping(self) -> dict[str, Any]:
        return {"name": self.spec.name, "started": self.worker is not None}

    def start(self, events_address: str, peers: dict[str, Any]) -> dict[str, Any]:
        """Load the model and start serving; returns what the cluster needs to know."""
        if self.worker is not None:
            return self.info
        import torch

        from engine.events import ZmqEventSink
        from engine.llm_engine import LLMEngine

        torch.set_num_threads(self.spec.num_threads)
        engine = LLMEngine.from_config(self._engine_config())
        events = ZmqEventSink(events_address)
        self.worker = self._build_worker(engine, events, RayPeers(peers))
        endpoint = self.worker.start()
        self.info = {
            "name": self.spec.name,
            "role": self.spec.role,
            "endpoint": endpoint,
            "total_blocks": engine.block_manager.num_blocks,
            "max_model_len": engine.max_model_len,
        }
        logger.info("instance %s (%s) started: %s", self.spec.name, self.spec.role, self.info)
        return self.info

    def _engine_config(self):  # type: ignore[no-untyped-def]
        from engine.config import CacheConfig, EngineConfig, SchedulerConfig

        s = self.spec
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
            seed=s.seed,
        )

    def _build_worker(self, engine: Any, events: Any, peers: RayPeers) -> Any:
        from decode_workers.worker import DecodeConfig, DecodeWorker
        from kv_transfer import TransferConfig, create_receiver, create_sender
        from prefill_workers.worker import PrefillWorker

        s = self.spec
        transfer = TransferConfig(
            backend=s.transport,
            host=s.host,
            timeout_s=s.transfer_timeout_s,
            fault_injection=s.fault_injection,
            checksum=s.checksum,
        )
        if s.role == "prefill":
            sender = create_sender(s.name, engine.kv_blocks, transfer)
            return PrefillWorker(s.name, engine, sender, events, peers.hand_off, s.lease_ttl_s)
        if s.role == "decode":
            receiver = create_receiver(s.name, engine.kv_blocks, transfer)
            config = DecodeConfig(lease_ttl_s=s.lease_ttl_s)
            return DecodeWorker(s.name, engine, receiver, events, peers, config)
        return DecodeWorker(s.name, engine, None, events, None, role="colocated")

    # -- control calls: forwarded to the worker, errors returned as values -------------

    def add_request(
        self,
        request_id: str,
        prompt: str | None,
        prompt_token_ids: list[int] | None,
        params: dict[str, Any],
        decode_instance: str | None = None,
        messages: list[dict[str, str]] | None = None,
    ) -> dict[str, Any]:
        """Tokenize (a text prompt, or chat ``messages`` through the model's chat template),
        validate and queue; returns the prompt's token ids or an error."""
        from engine.sampling_params import SamplingParams

        if self.worker is None:
            return {"error": f"instance {self.spec.name} is not serving (restarting?)"}
        try:
            sampling = SamplingParams.from_dict(params)
            engine = self.worker.engine
            if messages is not None:
                prompt_token_ids = engine.tokenizer.encode_chat(check_messages(messages))
            elif prompt_token_ids is None:
                if not isinstance(prompt, str):
                    raise ValueError(f"prompt: must be a str, got {type(prompt).__name__}")
                prompt_token_ids = engine.tokenizer.encode(prompt)
            if self.spec.role == "prefill":
                self.worker.add_request(request_id, prompt_token_ids, sampling, decode_instance)
            else:
                self.worker.add_request(request_id, prompt_token_ids, sampling)
        except ValueError as e:
            return {"error": str(e)}
        return {"prompt_token_ids": list(prompt_token_ids)}

    # A restarted actor has no worker until the cluster starts it again; calls meant for
    # the old one are dropped (its KV and requests died with it).

    def add_handoff(self, handoff: dict[str, Any]) -> None:
        if self.worker is not None:
            self.worker.add_handoff(handoff)

    def abort(self, request_id: str) -> None:
        if self.worker is not None:
            self.worker.abort(request_id)

    def renew(self, request_ids: list[str]) -> None:
        if self.worker is not None:
            self.worker.renew(request_ids)

    def release(self, request_id: str) -> None:
        if self.worker is not None:
            self.worker.release(request_id)

    def send_kv(self, request_id: str, peer: dict[str, str]) -> None:
        if self.worker is not None:
            self.worker.send_kv(request_id, peer)

    def stats(self) -> dict[str, Any] | None:
        """None while not serving."""
        if self.worker is None:
            return None
        stats: dict[str, Any] = self.worker.stats().to_dict()
        return stats

    def stop(self) -> None:
        if self.worker is not None:
            self.worker.stop()
            self.worker = None
