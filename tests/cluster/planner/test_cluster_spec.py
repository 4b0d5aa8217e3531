from __future__ import annotations

import pytest

from cluster.planner.cluster_spec import GPU_TYPES, ClusterSpec, SLOs, gpu_spec


def test_gpu_type_fills_memory_and_nvlink() -> None:
    spec = ClusterSpec(nodes=4, gpus_per_node=8, gpu="H200")
    assert spec.memory_gb == 141.0
    assert spec.intra_node_gbps == 450.0
    assert spec.inter_node_gbps == 25.0
    assert spec.total_gpus == 32


def test_explicit_values_win_over_the_gpu_type() -> None:
    spec = ClusterSpec(1, 8, "A100-80G", memory_gb=40.0, intra_node_gbps=100.0)
    assert (spec.memory_gb, spec.intra_node_gbps) == (40.0, 100.0)


def test_round_trip_through_dict() -> None:
    spec = ClusterSpec(2, 4, "H100-80G", inter_node_gbps=50.0)
    assert ClusterSpec.from_dict(spec.to_dict()) == spec


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"nodes": 0, "gpus_per_node": 8}, "nodes"),
        ({"nodes": 1, "gpus_per_node": 0}, "gpus_per_node"),
        ({"nodes": 1, "gpus_per_node": 8, "gpu": "V100"}, "gpu"),
        ({"nodes": 1, "gpus_per_node": 8, "gpu": "custom"}, "memory_gb"),
        ({"nodes": 1, "gpus_per_node": 8, "gpu": "custom", "memory_gb": 80.0}, "intra_node_gbps"),
        ({"nodes": 1, "gpus_per_node": 8, "inter_node_gbps": 0.0}, "inter_node_gbps"),
    ],
)
def test_bad_cluster_names_the_field(kwargs: dict[str, object], field: str) -> None:
    with pytest.raises(ValueError, match=f"^{field}: "):
        ClusterSpec(**kwargs)  # type: ignore[arg-type]


def test_bad_gpu_lists_the_allowed_types() -> None:
    with pytest.raises(ValueError, match="A100-80G, H100-80G, H200"):
        gpu_spec("T4")
    assert gpu_spec("A100-80G") is GPU_TYPES["A100-80G"]


@pytest.mark.parametrize(
    ("args", "field"),
    [((0.0, 0.1, 0.9), "ttft_s"), ((1.0, -1.0, 0.9), "tpot_s"), ((1.0, 0.1, 1.5), "attainment")],
)
def test_bad_slos_name_the_field(args: tuple[float, float, float], field: str) -> None:
    with pytest.raises(ValueError, match=f"^{field}: "):
        SLOs(*args)
