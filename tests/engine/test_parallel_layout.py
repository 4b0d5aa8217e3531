"""Layout arithmetic, ParallelConfig validation, the KV transfer plan and the step codec.

All pure: exact expectations, no processes.
"""

from __future__ import annotations

import itertools

import pytest

from engine.config import EngineConfig, ModelConfig, ParallelConfig
from engine.llm_engine import LLMEngine
from engine.parallel import comm
from engine.parallel.layout import (
    KVPull,
    coords,
    kv_heads,
    kv_transfer_plan,
    q_heads,
    rank_of,
    stage_layers,
    vocab_shard,
)
from engine.step import ScheduledChunk, StepPlan


def _model(**overrides: object) -> ModelConfig:
    base: dict[str, object] = dict(  # SmolLM2-135M's shape
        architecture="llama",
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_layers=30,
        num_heads=9,
        num_kv_heads=3,
        head_dim=64,
        max_position_embeddings=8192,
        rms_norm_eps=1e-5,
        rope_theta=100000.0,
    )
    base.update(overrides)
    return ModelConfig(**base)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("num_layers", "pp", "expected"),
    [
        (4, 1, [(0, 4)]),
        (4, 2, [(0, 2), (2, 4)]),
        (3, 2, [(0, 1), (1, 3)]),  # the extra layer goes last: stage 0 runs the LM head
        (5, 3, [(0, 1), (1, 3), (3, 5)]),
        (30, 4, [(0, 7), (7, 14), (14, 22), (22, 30)]),
        (2, 2, [(0, 1), (1, 2)]),
    ],
)
def test_stage_layers_are_contiguous_and_cover_every_layer(
    num_layers: int, pp: int, expected: list[tuple[int, int]]
) -> None:
    assert [stage_layers(num_layers, pp, s) for s in range(pp)] == [range(*e) for e in expected]


def test_stage_layers_rejects_more_stages_than_layers() -> None:
    with pytest.raises(ValueError, match="^pp: "):
        stage_layers(2, 3, 0)


def test_heads_split_evenly_and_kv_heads_replicate_past_their_count() -> None:
    assert [q_heads(8, 4, r) for r in range(4)] == [
        range(0, 2),
        range(2, 4),
        range(4, 6),
        range(6, 8),
    ]
    assert [kv_heads(4, 2, r) for r in range(2)] == [range(0, 2), range(2, 4)]
    assert [kv_heads(2, 4, r) for r in range(4)] == [
        range(0, 1),
        range(0, 1),
        range(1, 2),
        range(1, 2),
    ]
    assert [kv_heads(1, 2, r) for r in range(2)] == [range(0, 1), range(0, 1)]
    with pytest.raises(ValueError, match="^tp: "):
        kv_heads(2, 3, 0)
    with pytest.raises(ValueError, match="^tp: "):
        q_heads(9, 2, 0)


def test_vocab_shards_have_equal_padded_sizes() -> None:
    assert [vocab_shard(515, 2, r) for r in range(2)] == [
        (range(0, 258), 258),
        (range(258, 515), 258),
    ]
    assert [vocab_shard(8, 4, r)[0] for r in range(4)] == [
        range(0, 2),
        range(2, 4),
        range(4, 6),
        range(6, 8),
    ]
    # more ranks than rows would leave the last ones empty, still padded to size
    assert vocab_shard(5, 4, 3) == (range(5, 5), 2)


def test_ranks_are_stage_major() -> None:
    p = ParallelConfig(tp=2, pp=3)
    assert [coords(p, r) for r in range(6)] == [(0, 0), (0, 1), (1, 0), (1, 1), (2, 0), (2, 1)]
    assert all(rank_of(p, *coords(p, r)) == r for r in range(6))
    with pytest.raises(ValueError, match="^rank: "):
        coords(p, 6)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [({"tp": 0}, "tp"), ({"pp": -1}, "pp"), ({"tp": True}, "tp"), ({"pp": 1.5}, "pp")],
)
def test_parallel_config_rejects_bad_values(kwargs: dict[str, object], field: str) -> None:
    with pytest.raises(ValueError, match=f"^{field}: must be a positive int"):
        ParallelConfig(**kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("parallel", "model", "message"),
    [
        (ParallelConfig(tp=2), _model(), "tp: must divide the model's num_heads=9, got 2"),
        (
            ParallelConfig(tp=3),
            _model(num_heads=6, num_kv_heads=2),
            "tp: must divide the model's num_kv_heads=2",
        ),
        (
            ParallelConfig(tp=3),
            _model(intermediate_size=1000),
            "tp: must divide the model's intermediate_size=1000",
        ),
        (ParallelConfig(pp=31), _model(), "pp: must not exceed the model's num_layers=30, got 31"),
    ],
)
def test_parallel_config_names_the_field_a_model_cannot_split(
    parallel: ParallelConfig, model: ModelConfig, message: str
) -> None:
    with pytest.raises(ValueError, match="^" + message.replace("(", r"\(")):
        parallel.check_model(model)


def test_parallel_config_accepts_what_fits() -> None:
    for tp, pp in [(1, 1), (3, 1), (3, 30), (1, 4)]:
        ParallelConfig(tp=tp, pp=pp).check_model(_model())
    ParallelConfig(tp=4).check_model(_model(num_heads=8, num_kv_heads=2))  # KV heads 2x each


def test_one_process_engine_refuses_a_parallel_layout() -> None:
    with pytest.raises(ValueError, match="^parallel: tp=2 x pp=1 runs on one process per rank"):
        LLMEngine.from_config(EngineConfig(parallel=ParallelConfig(tp=2)))


def _pull(
    src: int,
    layers: tuple[int, int],
    heads: tuple[int, int],
    src_off: tuple[int, int],
    dst_off: tuple[int, int],
) -> KVPull:
    lay, hd = range(*layers), range(*heads)
    return KVPull(
        src_rank=src,
        layers=lay,
        kv_heads=hd,
        src_layers=range(lay.start - src_off[0], lay.stop - src_off[0]),
        src_kv_heads=range(hd.start - src_off[1], hd.stop - src_off[1]),
        dst_layers=range(lay.start - dst_off[0], lay.stop - dst_off[0]),
        dst_kv_heads=range(hd.start - dst_off[1], hd.stop - dst_off[1]),
    )


def test_kv_plan_between_equal_layouts_pulls_each_rank_from_its_twin() -> None:
    plan = kv_transfer_plan(ParallelConfig(tp=2), ParallelConfig(tp=2), 4, 2)
    assert plan == [
        [_pull(0, (0, 4), (0, 1), (0, 0), (0, 0))],
        [_pull(1, (0, 4), (1, 2), (0, 1), (0, 1))],
    ]


def test_kv_plan_from_pipeline_to_tensor_parallel() -> None:
    # prefill PP2 (layers 0-1 | 2-3, all 2 heads) -> decode TP2 (all layers, one head each)
    plan = kv_transfer_plan(ParallelConfig(pp=2), ParallelConfig(tp=2), 4, 2)
    assert plan == [
        [_pull(0, (0, 2), (0, 1), (0, 0), (0, 0)), _pull(1, (2, 4), (0, 1), (2, 0), (0, 0))],
        [_pull(0, (0, 2), (1, 2), (0, 0), (0, 1)), _pull(1, (2, 4), (1, 2), (2, 0), (0, 1))],
    ]


def test_kv_plan_from_tensor_parallel_to_one_rank_gathers_heads() -> None:
    plan = kv_transfer_plan(ParallelConfig(tp=2), ParallelConfig(), 3, 4)
    assert plan == [
        [_pull(0, (0, 3), (0, 2), (0, 0), (0, 0)), _pull(1, (0, 3), (2, 4), (0, 2), (0, 0))]
    ]


def test_kv_plan_spreads_reads_over_replicated_source_heads() -> None:
    # TP4 over 2 KV heads: ranks 0, 1 hold head 0 and ranks 2, 3 head 1.
    plan = kv_transfer_plan(ParallelConfig(tp=4), ParallelConfig(tp=2), 2, 2)
    assert [[p.src_rank for p in pulls] for pulls in plan] == [[0], [3]]
    # TP2 over 1 KV head -> TP2: each destination reads its own copy
    plan = kv_transfer_plan(ParallelConfig(tp=2), ParallelConfig(tp=2), 2, 1)
    assert [[p.src_rank for p in pulls] for pulls in plan] == [[0], [1]]
    # one rank -> TP2 over 1 KV head: both replicas come from the one source
    plan = kv_transfer_plan(ParallelConfig(), ParallelConfig(tp=2, pp=2), 4, 1)
    assert plan == [
        [_pull(0, (0, 2), (0, 1), (0, 0), (0, 0))],
        [_pull(0, (0, 2), (0, 1), (0, 0), (0, 0))],
        [_pull(0, (2, 4), (0, 1), (0, 0), (2, 0))],
        [_pull(0, (2, 4), (0, 1), (0, 0), (2, 0))],
    ]


def test_kv_plan_names_the_layout_that_cannot_split_the_model() -> None:
    with pytest.raises(ValueError, match="^src.tp: "):
        kv_transfer_plan(ParallelConfig(tp=3), ParallelConfig(), 4, 2)
    with pytest.raises(ValueError, match="^dst.pp: "):
        kv_transfer_plan(ParallelConfig(), ParallelConfig(pp=5), 4, 2)


_SIZES = [(1, 1), (2, 1), (4, 1), (1, 2), (1, 3), (2, 2), (4, 2), (8, 1), (2, 3)]
_MODELS = [(6, 4), (6, 2), (6, 1), (5, 8), (3, 2)]  # (layers, KV heads)


@pytest.mark.parametrize(("num_layers", "num_kv"), _MODELS)
def test_kv_plan_tiles_every_destination_exactly_from_ranks_that_hold_it(
    num_layers: int, num_kv: int
) -> None:
    def fits(tp: int, pp: int) -> bool:
        return pp <= num_layers and (num_kv % tp == 0 or tp % num_kv == 0)

    layouts = [ParallelConfig(tp=tp, pp=pp) for tp, pp in _SIZES if fits(tp, pp)]
    for src, dst in itertools.product(layouts, layouts):
        plan = kv_transfer_plan(src, dst, num_layers, num_kv)
        assert len(plan) == dst.world_size
        for rank, pulls in enumerate(plan):
            d_stage, d_tp = coords(dst, rank)
            d_layers = stage_layers(num_layers, dst.pp, d_stage)
            d_heads = kv_heads(num_kv, dst.tp, d_tp)
            covered = [(lay, h) for p in pulls for lay in p.layers for h in p.kv_heads]
            assert sorted(covered) == [(lay, h) for lay in d_layers for h in d_heads]
            for p in pulls:
                s_stage, s_tp = coords(src, p.src_rank)
                s_layers = stage_layers(num_layers, src.pp, s_stage)
                s_heads = kv_heads(num_kv, src.tp, s_tp)
                assert [s_layers[i] for i in p.src_layers] == list(p.layers)
                assert [s_heads[i] for i in p.src_kv_heads] == list(p.kv_heads)
                assert [d_layers[i] for i in p.dst_layers] == list(p.layers)
                assert [d_heads[i] for i in p.dst_kv_heads] == list(p.kv_heads)


def test_step_plan_round_trips_through_msgpack() -> None:
    plan = StepPlan(
        chunks=[
            ScheduledChunk("a", [5], 40, [3, 1, 4], True),
            ScheduledChunk("b-\u00fc", list(range(300)), 0, list(range(19)), False),
        ],
        preempted=["c"],
    )
    kind, body = comm.decode(comm.encode_plan(plan))
    assert kind == comm.STEP and comm.decode_plan(body) == plan
    assert comm.decode(comm.encode(comm.STOP)) == (comm.STOP, None)
