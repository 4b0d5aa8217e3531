from __future__ import annotations

import pytest

from cluster.planner import analytic
from cluster.planner.analytic import analytic_profile, analytic_profiles
from cluster.planner.cluster_spec import GPU_TYPES, ClusterSpec
from cluster.planner.model_spec import PRESETS

A100 = GPU_TYPES["A100-80G"]
NODE = ClusterSpec(1, 8, "A100-80G")
HBM = A100.hbm_gbps * 1e9 * analytic.HBM_EFFICIENCY  # bytes/s achieved
FLOPS = A100.peak_tflops * 1e12 * analytic.GEMM_EFFICIENCY


def test_tp1_coefficients_are_the_stated_roofline() -> None:
    m = PRESETS["llama-13b"]
    prof = analytic_profile(m, A100, NODE, tp=1, pp=1)
    weights_ms = m.weight_bytes / HBM * 1e3
    assert prof.prefill[0] == pytest.approx(weights_ms + analytic.STEP_OVERHEAD_MS)
    assert prof.prefill[1] == pytest.approx(m.flops_per_token / FLOPS * 1e3)
    attn = 2 * m.num_layers * m.num_heads * m.head_dim
    assert prof.prefill[2] == pytest.approx(
        attn / (A100.peak_tflops * 1e12 * analytic.ATTENTION_EFFICIENCY) * 1e3
    )
    assert prof.decode_small[1] == pytest.approx(m.kv_bytes_per_token / HBM * 1e3)
    assert prof.decode_large[2] == pytest.approx(prof.prefill[1])


def test_decode_sets_meet_at_the_threshold() -> None:
    prof = analytic_profile(PRESETS["opt-66b"], A100, NODE, tp=4, pp=1)
    t = prof.decode_threshold
    small = prof.decode_small[0] + prof.decode_small[2] * t
    large = prof.decode_large[0] + prof.decode_large[2] * t
    assert small == pytest.approx(large)


def test_tp_halves_the_work_and_adds_all_reduce() -> None:
    m = PRESETS["llama-13b"]
    tp1 = analytic_profile(m, A100, NODE, 1, 1)
    tp2 = analytic_profile(m, A100, NODE, 2, 1)
    ring_bytes = m.hidden_size * 2 * (2 * (2 - 1) / 2)  # ring all-reduce moves 2(t-1)/t of it
    link = NODE.intra_node_gbps * 1e9 * analytic.LINK_EFFICIENCY
    per_token_allreduce = 2 * m.num_layers * ring_bytes / link * 1e3  # two per layer
    assert tp2.prefill[1] == pytest.approx(tp1.prefill[1] / 2 + per_token_allreduce)
    fixed = analytic.STEP_OVERHEAD_MS + 2 * m.num_layers * analytic.ALLREDUCE_LATENCY_MS
    assert tp2.prefill[0] == pytest.approx((tp1.prefill[0] - analytic.STEP_OVERHEAD_MS) / 2 + fixed)


def test_pp_keeps_the_pipeline_latency_and_adds_hops() -> None:
    m = PRESETS["llama-13b"]  # 40 layers: pp=4 splits evenly
    pp1 = analytic_profile(m, A100, NODE, 1, 1)
    pp4 = analytic_profile(m, A100, NODE, 1, 4)
    hop = m.hidden_size * 2 / (NODE.intra_node_gbps * 1e9 * analytic.LINK_EFFICIENCY) * 1e3
    assert pp4.prefill[1] == pytest.approx(pp1.prefill[1] + 3 * hop)
    assert pp4.prefill[0] == pytest.approx(pp1.prefill[0] + 3 * analytic.HOP_LATENCY_MS[True])


def test_close_to_distserves_measured_opt_13b_on_a100() -> None:
    # DistServe's profiler-a100-80g.distserve.json, facebook/opt-13b, tp=1.
    prof = analytic_profile(PRESETS["opt-13b"], A100, NODE, 1, 1)
    measured = {
        "prefill_512": 16.457 + 0.09265 * 512 + 6.475e-6 * 512**2,
        "decode_32": 19.935 + 0.000627 * 32 * 600 + 0.0385 * 32,
        "decode_256": 7.166 + 0.00058 * 256 * 600 + 0.1583 * 256,
    }
    ours = {
        "prefill_512": prof.prefill_ms(512, 512**2),
        "decode_32": prof.decode_ms(32, 32 * 600),
        "decode_256": prof.decode_ms(256, 256 * 600),
    }
    for key, value in measured.items():
        assert 1 / 1.5 < ours[key] / value < 1.5, key


def test_profiles_for_a_custom_gpu_are_refused() -> None:
    custom = ClusterSpec(1, 8, "custom", memory_gb=24.0, intra_node_gbps=50.0)
    with pytest.raises(ValueError, match="^gpu: built-in profiles exist for A100-80G"):
        analytic_profiles(PRESETS["llama-13b"], custom, [(1, 1)])


def test_every_gpu_type_and_faster_gpus_are_faster() -> None:
    m = PRESETS["llama-65b"]
    times = []
    for gpu in ("A100-80G", "H100-80G", "H200"):
        cluster = ClusterSpec(1, 8, gpu)
        prof = analytic_profiles(m, cluster, [(8, 1)]).get(8, 1)
        times.append((prof.prefill_ms(2048, 2048**2), prof.decode_ms(64, 64 * 1024)))
    assert times[0][0] > times[1][0] >= times[2][0]
    assert times[0][1] > times[1][1] > times[2][1]
