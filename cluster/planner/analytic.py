"""Built-in latency profiles from datasheet numbers, for when nothing has been measured.

A roofline model turned into DistServe's coefficients. Per layout (TP ``t``, PP ``p``) on
one GPU type, with ``W`` weight bytes, ``F`` matmul FLOPs per token, ``KV`` KV-cache bytes
per token, ``H`` hidden size:

- prefill: ``a`` = reading ``W/t`` once from HBM + fixed step overhead; ``b`` = ``F/t`` at
  the GEMM efficiency + TP all-reduce and PP hop traffic per token; ``c`` = causal
  attention's ``2 * layers * heads * head_dim`` FLOPs per ``l^2`` at the attention
  efficiency.
- decode: ``b`` = reading ``KV/t`` per context token; per batched token the same compute
  and traffic as prefill. Below the ridge batch (where computing ``batch`` tokens takes as
  long as reading the weights) the weights dominate and only ``SMALL_BATCH_COMPUTE_SHARE``
  of the compute shows; from it up, compute does. The two sets meet at the threshold.
- TP all-reduce: two per layer, ring over NVLink at ``LINK_EFFICIENCY``; PP: ``p - 1``
  activation hops, over NVLink while an instance fits in one node, else the node network.
  Uneven layer splits pay for the largest stage.

The efficiencies are assumptions, stated here so they can be argued with: a measured
profile (``fit_profile``) replaces them all.
"""

from __future__ import annotations

import math

from cluster.planner.cluster_spec import GPU_TYPES, ClusterSpec, GpuSpec
from cluster.planner.latency import LatencyProfile, ProfileSet
from cluster.planner.model_spec import ModelSpec

GEMM_EFFICIENCY = 0.6  # of peak dense tensor FLOP/s on large prefill GEMMs
ATTENTION_EFFICIENCY = 0.4  # of peak on (flash) attention
HBM_EFFICIENCY = 0.8  # of datasheet HBM bandwidth when streaming weights and KV
LINK_EFFICIENCY = 0.7  # of NVLink / NIC bandwidth an all-reduce or hop achieves
SMALL_BATCH_COMPUTE_SHARE = 0.2  # compute not hidden under weight reads at small batch
STEP_OVERHEAD_MS = 2.0  # per forward pass: scheduling, sampling, launches
ALLREDUCE_LATENCY_MS = 0.01  # per all-reduce call, NVLink
HOP_LATENCY_MS = {True: 0.01, False: 0.05}  # per PP hop: inside a node, across nodes


def _tp_comm_ms_per_token(model: ModelSpec, link_gbps: float, tp: int) -> float:
    """Ring all-reduce of one token's activations, twice per layer."""
    if tp == 1:
        return 0.0
    nbytes = model.hidden_size * model.bytes_per_param * 2 * (tp - 1) / tp
    return 2 * model.num_layers * nbytes / (link_gbps * 1e9 * LINK_EFFICIENCY) * 1e3


def analytic_profile(
    model: ModelSpec, gpu: GpuSpec, cluster: ClusterSpec, tp: int, pp: int
) -> LatencyProfile:
    """The profile of one (tp, pp) layout of ``model`` on ``gpu``; see the module text."""
    flops = gpu.peak_tflops * 1e12
    hbm = gpu.hbm_gbps * 1e9 * HBM_EFFICIENCY
    imbalance = math.ceil(model.num_layers / pp) * pp / model.num_layers
    in_node = tp * pp <= cluster.gpus_per_node
    hop_gbps = cluster.intra_node_gbps if in_node else cluster.inter_node_gbps
    hop_bytes_per_token = model.hidden_size * model.bytes_per_param
    hop_ms_token = hop_bytes_per_token / (hop_gbps * 1e9 * LINK_EFFICIENCY) * 1e3
    comm_ms_token = (
        _tp_comm_ms_per_token(model, cluster.intra_node_gbps, tp) + (pp - 1) * hop_ms_token
    )
    fixed_ms = STEP_OVERHEAD_MS + (pp - 1) * HOP_LATENCY_MS[in_node]
    if tp > 1:
        fixed_ms += 2 * model.num_layers * ALLREDUCE_LATENCY_MS
    weights_ms = model.weight_bytes / tp / hbm * 1e3 * imbalance
    gemm_ms_token = model.flops_per_token / tp / (flops * GEMM_EFFICIENCY) * 1e3 * imbalance
    attn_flops_sq = 2 * model.num_layers * model.num_heads * model.head_dim
    attn_ms_sq = attn_flops_sq / tp / (flops * ATTENTION_EFFICIENCY) * 1e3 * imbalance
    kv_ms_token = model.kv_bytes_per_token / tp / hbm * 1e3 * imbalance

    prefill = (weights_ms + fixed_ms, gemm_ms_token + comm_ms_token, attn_ms_sq)
    threshold = max(1, math.ceil(weights_ms / gemm_ms_token))
    c_small = SMALL_BATCH_COMPUTE_SHARE * gemm_ms_token + comm_ms_token
    c_large = gemm_ms_token + comm_ms_token
    a_small = weights_ms + fixed_ms
    a_large = a_small + (c_small - c_large) * threshold  # continuous at the threshold
    return LatencyProfile(
        tp=tp,
        pp=pp,
        prefill=prefill,
        decode_small=(a_small, kv_ms_token, c_small),
        decode_large=(max(a_large, fixed_ms), kv_ms_token, c_large),
        decode_threshold=threshold,
    )


def analytic_profiles(
    model: ModelSpec, cluster: ClusterSpec, layouts: list[tuple[int, int]]
) -> ProfileSet:
    """Profiles for ``layouts`` on the cluster's GPU type (which must be a known one)."""
    if cluster.gpu not in GPU_TYPES:
        raise ValueError(
            f"gpu: built-in profiles exist for {', '.join(GPU_TYPES)}, got {cluster.gpu!r} "
            "(pass a measured profile file instead)"
        )
    gpu = GPU_TYPES[cluster.gpu]
    return ProfileSet(
        {(tp, pp): analytic_profile(model, gpu, cluster, tp, pp) for tp, pp in layouts},
        model=model.name,
        gpu=cluster.gpu,
    )
