from __future__ import annotations

import pytest

from cluster.planner.cluster_spec import SLOs
from cluster.planner.latency import LatencyProfile
from cluster.planner.simulator import SimConfig, SimInstance, SimResult, simulate
from cluster.planner.workload import unit_rate_gaps

BIG = 10**9  # a decode threshold no batch reaches
EVERY = SimConfig(warmup_fraction=0.0, cooldown_fraction=0.0)  # score every request


def _profile(
    prefill: tuple[float, float, float],
    decode: tuple[float, float, float] = (10, 0, 0),
    pp: int = 1,
) -> LatencyProfile:
    return LatencyProfile(1, pp, prefill, decode, decode, BIG)


def _run(
    instances: list[SimInstance],
    lengths: list[tuple[int, int]],
    rate: float = 1000.0,
    config: SimConfig = EVERY,
) -> SimResult:
    """Arrivals exactly 1/rate apart: at 1 ms, 2 ms, 3 ms, ... for the default rate."""
    return simulate(instances, lengths, [1.0] * len(lengths), rate, config)


@pytest.mark.parametrize(("load", "requests"), [(0.5, 100_000), (0.8, 200_000)])
def test_one_prefill_instance_is_an_md1_queue(load: float, requests: int) -> None:
    """Constant service D, Poisson arrivals at R: mean sojourn D + R D^2 / (2 (1 - R D))."""
    service_s = 0.1
    rate = load / service_s
    profile = _profile((service_s * 1000, 0.0, 0.0))
    result = simulate(
        [SimInstance("prefill", profile)],
        [(512, 1)] * requests,
        unit_rate_gaps(requests, cv=1.0, seed=0),
        rate,
        SimConfig(prefill_token_budget=512),  # one request per batch
    )
    expected = service_s + rate * service_s**2 / (2 * (1 - rate * service_s))
    assert result.mean_ttft_s() == pytest.approx(expected, rel=0.03)
    assert (result.scores_ttft, result.scores_tpot) == (True, False)


def test_prefill_pipeline_stages_overlap() -> None:
    # 100 ms per batch over 2 stages: a batch leaves every 50 ms, each takes 100 ms.
    pipelined = _run(
        [SimInstance("prefill", _profile((100, 0, 0), pp=2))],
        [(10, 1)] * 3,
        config=SimConfig(prefill_token_budget=10, warmup_fraction=0, cooldown_fraction=0),
    )
    assert pipelined.ttft_s == pytest.approx((0.100, 0.149, 0.198))
    serial = _run(
        [SimInstance("prefill", _profile((100, 0, 0)))],
        [(10, 1)] * 3,
        config=SimConfig(prefill_token_budget=10, warmup_fraction=0, cooldown_fraction=0),
    )
    assert serial.ttft_s == pytest.approx((0.100, 0.199, 0.298))


def test_prefill_batches_up_to_the_token_budget() -> None:
    # 100 ms + 1 ms/token; the first goes alone, the next two wait and go together.
    result = _run(
        [SimInstance("prefill", _profile((100, 1, 0)))],
        [(10, 1)] * 3,
        config=SimConfig(prefill_token_budget=20, warmup_fraction=0, cooldown_fraction=0),
    )
    assert result.ttft_s == pytest.approx((0.110, 0.229, 0.228))


def test_decode_only_tpot_includes_the_kv_transfer() -> None:
    # 10 ms steps, 5 output tokens = 4 decode steps; KV: 100 tokens x 1 MB at 25 GB/s = 4 ms.
    decode = SimInstance("decode", _profile((1, 0, 0)), kv_capacity_tokens=1000)
    instant = _run([decode], [(100, 5)])
    assert instant.tpot_s == pytest.approx((0.010,))
    config = SimConfig(
        kv_bytes_per_token=10**6, inter_node_gbps=25.0, warmup_fraction=0, cooldown_fraction=0
    )
    moved = _run([decode], [(100, 5)], config=config)
    assert moved.tpot_s == pytest.approx(((0.004 + 0.040) / 4,))
    nvlink = SimConfig(
        kv_bytes_per_token=10**6,
        intra_node_gbps=50.0,
        decode_only_link="intra",
        warmup_fraction=0,
        cooldown_fraction=0,
    )
    assert _run([decode], [(100, 5)], config=nvlink).tpot_s == pytest.approx(((0.002 + 0.04) / 4,))


def test_decode_joins_at_the_next_step_boundary() -> None:
    decode = SimInstance("decode", _profile((1, 0, 0)), kv_capacity_tokens=1000)
    result = _run([decode], [(100, 5), (100, 5)])
    # first: steps at 1..41 ms; second arrives at 2 ms, joins at 11 ms, done at 51 ms
    assert result.tpot_s == pytest.approx((0.010, (0.051 - 0.002) / 4))


def test_a_busy_decode_instance_starts_a_pull_only_between_steps() -> None:
    # 10 ms steps; a pull takes 4 ms (100 tokens x 1 MB at 25 GB/s). Arrivals at 1, 2, 7 ms:
    # 1: pulled 1-5 ms, steps from 5 ms, done at 45 ms.
    # 2: the instance is idle at 2 ms, so its pull starts at once; it joins at 15 ms.
    # 3: at 7 ms a step is under way, so its pull waits for it: 15-19 ms; it joins at 25 ms.
    decode = SimInstance("decode", _profile((1, 0, 0)), kv_capacity_tokens=1000)
    config = SimConfig(
        kv_bytes_per_token=10**6, inter_node_gbps=25.0, warmup_fraction=0, cooldown_fraction=0
    )
    gaps = [1.0, 1.0, 5.0]  # arrivals at 1, 2 and 7 ms
    result = simulate([decode], [(100, 5)] * 3, gaps, 1000.0, config)
    assert result.tpot_s == pytest.approx(
        ((0.045 - 0.001) / 4, (0.055 - 0.002) / 4, (0.065 - 0.007) / 4)
    )

def test_decode_admission_waits_for_kv_room() -> None:
    decode = SimInstance("decode", _profile((1, 0, 0)), kv_capacity_tokens=110)
    result = _run([decode], [(100, 5), (100, 5)])
    # each reserves 105 tokens: the second waits for the first to finish at 41 ms
    assert result.tpot_s == pytest.approx((0.010, (0.081 - 0.002) / 4))


def test_a_request_larger_than_the_kv_cache_is_never_served() -> None:
    decode = SimInstance("decode", _profile((1, 0, 0)), kv_capacity_tokens=50)
    result = _run([decode], [(100, 5), (10, 5)])
    assert result.tpot_s == (float("inf"), pytest.approx(0.010))
    assert result.attainment(SLOs(1.0, 1.0, 0.9)) == 0.5


def test_decode_step_time_follows_batch_and_context() -> None:
    # a + b*sum(ctx) + c*batch = 1 + 0.01*ctx + 0 : context 101, 102, 103, 104 over 4 steps
    decode = SimInstance("decode", _profile((1, 0, 0), decode=(1, 0.01, 0)), 1000)
    result = _run([decode], [(100, 5)])
    steps_ms = [1 + 0.01 * ctx for ctx in (101, 102, 103, 104)]
    assert result.tpot_s == pytest.approx((sum(steps_ms) / 4 / 1000,))


def test_a_decode_step_pays_the_worker_loop_overhead() -> None:
    decode = SimInstance("decode", _profile((1, 0, 0), decode=(8, 0, 0)), 1000)
    config = SimConfig(decode_step_overhead_ms=2.0, warmup_fraction=0, cooldown_fraction=0)
    assert _run([decode], [(100, 5)], config=config).tpot_s == pytest.approx((0.010,))
    with pytest.raises(ValueError, match="^decode_step_overhead_ms: must be >= 0"):
        SimConfig(decode_step_overhead_ms=-1.0)


def test_colocated_chunked_prefill_then_decode() -> None:
    # chunks of 8: a 10-token prompt takes a step of 8 (18 ms) and one of 2 (12 ms); then
    # 2 decode steps of 10 + 1 ms.
    prof = _profile((10, 1, 0), decode=(10, 0, 1))
    inst = SimInstance("colocated", prof, kv_capacity_tokens=100)
    result = _run(
        [inst], [(10, 3)], config=SimConfig(chunk_tokens=8, warmup_fraction=0, cooldown_fraction=0)
    )
    assert result.ttft_s == pytest.approx((0.030,))
    assert result.tpot_s == pytest.approx((0.011,))
    assert (result.scores_ttft, result.scores_tpot) == (True, True)


def test_colocated_decodes_share_steps_with_prefill_chunks() -> None:
    prof = _profile((10, 1, 0), decode=(10, 0, 1))
    inst = SimInstance("colocated", prof, kv_capacity_tokens=100)
    config = SimConfig(chunk_tokens=8, warmup_fraction=0, cooldown_fraction=0)
    # the second prompt's chunks ride along with the first request's decodes: slower TPOT
    result = _run([inst], [(10, 3), (10, 3)], rate=1000 / 30, config=config)
    assert result.tpot_s[0] > 0.011
    assert result.ttft_s[0] == pytest.approx(0.030)


def test_disaggregated_prefill_then_decode_on_one_node() -> None:
    prefill = SimInstance("prefill", _profile((20, 0, 0)), nodes=(0,))
    decode = SimInstance("decode", _profile((1, 0, 0)), kv_capacity_tokens=1000, nodes=(0,))
    config = SimConfig(
        kv_bytes_per_token=10**6, intra_node_gbps=100.0, warmup_fraction=0, cooldown_fraction=0
    )
    result = _run([prefill, decode], [(100, 5)], config=config)
    assert result.ttft_s == pytest.approx((0.020,))
    assert result.tpot_s == pytest.approx(((0.001 + 0.040) / 4,))  # 100 MB at 100 GB/s
    far = SimInstance("decode", _profile((1, 0, 0)), kv_capacity_tokens=1000, nodes=(1,))
    across = _run([prefill, far], [(100, 5)], config=config)
    assert across.tpot_s == pytest.approx(((0.004 + 0.040) / 4,))  # 25 GB/s between nodes


def test_single_token_outputs_skip_decode() -> None:
    prefill = SimInstance("prefill", _profile((20, 0, 0)))
    decode = SimInstance("decode", _profile((1, 0, 0)), kv_capacity_tokens=1000)
    result = _run([prefill, decode], [(100, 1)])
    assert (result.ttft_s, result.tpot_s) == (pytest.approx((0.020,)), (0.0,))


def test_attainment_counts_only_the_window_and_scored_slos() -> None:
    result = SimResult(
        ttft_s=(9.0, 0.1, 0.1, 0.5, 9.0),
        tpot_s=(0.0, 0.01, 0.5, 0.01, 0.0),
        scores_ttft=True,
        scores_tpot=True,
        window=(1, 4),
    )
    slos = SLOs(ttft_s=0.2, tpot_s=0.1)
    assert result.attainment(slos) == pytest.approx(1 / 3)
    assert result.attainment(slos, tpot=False) == pytest.approx(2 / 3)
    assert result.attainment(slos, ttft=False) == pytest.approx(2 / 3)


def test_same_inputs_same_result() -> None:
    prefill = SimInstance("prefill", _profile((20, 0.05, 0)))
    decode = SimInstance("decode", _profile((1, 0, 0), decode=(5, 0.001, 0.2)), 5000)
    lengths = [(50 + 7 * i % 300, 2 + i % 20) for i in range(300)]
    gaps = unit_rate_gaps(300, 2.0, seed=3)
    first = simulate([prefill, decode], lengths, gaps, 20.0)
    assert simulate([prefill, decode], lengths, gaps, 20.0) == first


@pytest.mark.parametrize(
    ("build", "field"),
    [
        (lambda: SimInstance("router", _profile((1, 0, 0))), "role"),
        (lambda: SimInstance("decode", _profile((1, 0, 0)), 0), "kv_capacity_tokens"),
        (lambda: SimConfig(prefill_token_budget=0), "prefill_token_budget"),
        (lambda: SimConfig(decode_only_link="pcie"), "decode_only_link"),
        (lambda: SimConfig(warmup_fraction=0.6), "warmup_fraction"),
        (lambda: _run([SimInstance("prefill", _profile((1, 0, 0)))], [(1, 1)], rate=0), "rate"),
    ],
)
def test_bad_inputs_name_the_field(build: object, field: str) -> None:
    with pytest.raises(ValueError, match=f"^{field}: "):
        build()  # type: ignore[operator]


def test_colocated_and_disaggregated_do_not_mix() -> None:
    colo = SimInstance("colocated", _profile((1, 0, 0)), 100)
    decode = SimInstance("decode", _profile((1, 0, 0)), 100)
    with pytest.raises(ValueError, match="^instances: colocated"):
        _run([colo, decode], [(10, 2)])


def test_prefill_chunking_fills_the_budget_like_the_engine() -> None:
    # 1 ms per token, budget 100. A 10-token prompt at 1 ms runs alone until 11 ms; the
    # 80-token A and B (at 2 and 3 ms) wait. The engine's chunked prefill then runs A and
    # 20 of B's tokens (100 ms), then B's last 60; whole prompts run A, then B.
    prof = _profile((0, 1, 0))
    lengths = [(10, 1), (80, 1), (80, 1)]
    chunked = _run(
        [SimInstance("prefill", prof)],
        lengths,
        config=SimConfig(prefill_token_budget=100, warmup_fraction=0, cooldown_fraction=0),
    )
    assert chunked.ttft_s == pytest.approx((0.010, 0.109, 0.168))
    whole = _run(
        [SimInstance("prefill", prof)],
        lengths,
        config=SimConfig(
            prefill_token_budget=100, prefill_chunking=False, warmup_fraction=0,
            cooldown_fraction=0,
        ),
    )  # fmt: skip
    assert whole.ttft_s == pytest.approx((0.010, 0.089, 0.168))


def test_a_prefill_chunk_pays_attention_over_the_prompt_so_far() -> None:
    # c = 1e-3 ms per token^2: one 100-token prompt in chunks of 60 and 40 costs
    # 60^2 and then 100^2 - 60^2 of it, as the whole prompt in one step would.
    prof = _profile((0, 0, 1e-3))
    one = _run([SimInstance("prefill", prof)], [(100, 1)], config=EVERY)
    chunked = _run(
        [SimInstance("prefill", prof)],
        [(100, 1)],
        config=SimConfig(prefill_token_budget=60, warmup_fraction=0, cooldown_fraction=0),
    )
    assert one.ttft_s == pytest.approx((0.010,))
    assert chunked.ttft_s == pytest.approx(one.ttft_s)


def test_decode_dispatch_follows_the_router_fewest_active_then_most_free() -> None:
    # Instance x has far more free KV, but it already runs one request: the second goes
    # to y, as router.policies.pick_decode sends it (the live count first).
    x = SimInstance("colocated", _profile((10, 0, 0)), kv_capacity_tokens=10_000)
    y = SimInstance("colocated", _profile((10, 0, 0)), kv_capacity_tokens=1_000)
    shared = _run([x, y], [(100, 50), (100, 50)], config=EVERY)
    alone = _run([x], [(100, 50)], config=EVERY)
    assert shared.tpot_s == pytest.approx((alone.tpot_s[0],) * 2)
