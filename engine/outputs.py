"""What the engine reports about a request after a step.

No torch here: the router side (cluster streams, the router) builds these too."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class RequestMetrics:
    arrival_time: float
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    finish_time: float | None = None
    # Durations (seconds) measured by serving instances: "queue", "prefill",
    # "kv_transfer", "decode"; "recomputed" = 1.0 after a failed KV pull.
    timings: dict[str, float] = field(default_factory=dict)
    # Where the cluster sent it (names of the instances); None when not disaggregated.
    prefill_instance: str | None = None
    decode_instance: str | None = None


@dataclass
class RequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int]  # every output token so far
    text: str  # every output character released so far
    new_token_ids: list[int] = field(default_factory=list)
    delta_text: str = ""
    finished: bool = False
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    logprobs: list[list[tuple[int, float]]] | None = None
    num_cached_tokens: int = 0
    metrics: RequestMetrics | None = None
    # prompt_logprobs: per prompt token after the first, [(token, logprob, rank), *top-N
    # (token, logprob, rank)] (engine/prompt_logprobs.py); None when not asked.
    prompt_logprobs: list[list[tuple[int, float, int]]] | None = None


@dataclass(frozen=True)
class EngineStats:
    num_waiting: int
    num_running: int
    free_blocks: int
    total_blocks: int
    num_preemptions: int


@dataclass(frozen=True)
class InstanceStats:
    """One serving instance's load, as the cluster and the router see it."""

    name: str
    role: str  # "prefill" | "decode" | "colocated"
    num_waiting: int  # in the engine's waiting queue
    num_running: int  # in the running batch
    free_blocks: int
    total_blocks: int
    num_preemptions: int
    # Role-specific gauges and counters: leases, pending transfers, recomputes, bytes...
    counters: dict[str, float] = field(default_factory=dict)
    # Where the instance runs: its rank 0's Ray node, and its layout.
    node_id: str = ""
    node_ip: str = ""
    tp: int = 1
    pp: int = 1

    def to_dict(self) -> dict[str, object]:
        return {
            "name": self.name,
            "role": self.role,
            "num_waiting": self.num_waiting,
            "num_running": self.num_running,
            "free_blocks": self.free_blocks,
            "total_blocks": self.total_blocks,
            "num_preemptions": self.num_preemptions,
            "counters": dict(self.counters),
            "node_id": self.node_id,
            "node_ip": self.node_ip,
            "tp": self.tp,
            "pp": self.pp,
        }
