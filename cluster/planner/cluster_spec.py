"""What the planner plans for: the GPUs, how they are wired, and the latency targets.

``ClusterSpec`` is homogeneous (every node has the same GPUs), as in DistServe. Bandwidths
are in GB/s (1e9 bytes/s): ``intra_node_gbps`` is one GPU's NVLink bandwidth in one
direction (shards of a KV cache move over all of an instance's GPUs at once), and
``inter_node_gbps`` is one node's network bandwidth (all of a node's transfers share it).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from cluster.planner._validate import from_fields, positive, positive_int, require


@dataclass(frozen=True)
class GpuSpec:
    """Datasheet numbers of one GPU type; the analytic latency model derates them."""

    name: str
    peak_tflops: float  # dense bf16/fp16 tensor-core TFLOP/s (1e12)
    hbm_gbps: float  # HBM bandwidth, GB/s
    memory_gb: float  # HBM capacity, GB (1e9 bytes)
    nvlink_gbps: float  # NVLink bandwidth per GPU, one direction, GB/s


# SXM parts; NVLink 3 (A100) moves 600 GB/s both ways per GPU, NVLink 4 (H100/H200) 900.
GPU_TYPES: dict[str, GpuSpec] = {
    "A100-80G": GpuSpec(
        "A100-80G", peak_tflops=312.0, hbm_gbps=2039.0, memory_gb=80.0, nvlink_gbps=300.0
    ),
    "H100-80G": GpuSpec(
        "H100-80G", peak_tflops=989.0, hbm_gbps=3350.0, memory_gb=80.0, nvlink_gbps=450.0
    ),
    "H200": GpuSpec("H200", peak_tflops=989.0, hbm_gbps=4800.0, memory_gb=141.0, nvlink_gbps=450.0),
}
CUSTOM_GPU = "custom"  # a GPU known only through a measured profile file
DEFAULT_INTER_NODE_GBPS = 25.0  # one 200 Gb/s NIC per node


def gpu_spec(name: str) -> GpuSpec:
    """The datasheet of ``name``; ValueError lists the known types."""
    require(name in GPU_TYPES, "gpu", f"must be one of {', '.join(GPU_TYPES)}, got {name!r}")
    return GPU_TYPES[name]


@dataclass(frozen=True)
class ClusterSpec:
    """Nodes x GPUs of one type. Zero bandwidth/memory fields take the GPU type's values."""

    nodes: int
    gpus_per_node: int
    gpu: str = "A100-80G"
    memory_gb: float = 0.0  # per GPU; 0: the GPU type's capacity
    intra_node_gbps: float = 0.0  # per GPU, one direction; 0: the GPU type's NVLink
    inter_node_gbps: float = DEFAULT_INTER_NODE_GBPS  # per node

    def __post_init__(self) -> None:
        positive_int(self.nodes, "nodes")
        positive_int(self.gpus_per_node, "gpus_per_node")
        known = (*GPU_TYPES, CUSTOM_GPU)
        require(self.gpu in known, "gpu", f"must be one of {', '.join(known)}, got {self.gpu!r}")
        if self.gpu == CUSTOM_GPU:
            positive(self.memory_gb, "memory_gb")
            positive(self.intra_node_gbps, "intra_node_gbps")
        else:
            spec = GPU_TYPES[self.gpu]
            require(self.memory_gb >= 0, "memory_gb", f"must be >= 0, got {self.memory_gb!r}")
            require(
                self.intra_node_gbps >= 0,
                "intra_node_gbps",
                f"must be >= 0, got {self.intra_node_gbps!r}",
            )
            if self.memory_gb == 0:
                object.__setattr__(self, "memory_gb", spec.memory_gb)
            if self.intra_node_gbps == 0:
                object.__setattr__(self, "intra_node_gbps", spec.nvlink_gbps)
        positive(self.inter_node_gbps, "inter_node_gbps")

    @property
    def total_gpus(self) -> int:
        return self.nodes * self.gpus_per_node

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ClusterSpec:
        return from_fields(cls, data, "cluster")


@dataclass(frozen=True)
class SLOs:
    """Latency targets: a request counts toward goodput only if it meets both."""

    ttft_s: float  # time to first token
    tpot_s: float  # mean time per output token after the first
    attainment: float = 0.9  # share of requests that must meet both

    def __post_init__(self) -> None:
        positive(self.ttft_s, "ttft_s")
        positive(self.tpot_s, "tpot_s")
        require(
            0 < self.attainment <= 1, "attainment", f"must be in (0, 1], got {self.attainment!r}"
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SLOs:
        return from_fields(cls, data, "slos")
