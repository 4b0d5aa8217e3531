"""Scheduler: token budget, chunked prefill, admission by free blocks, preemption."""

from __future__ import annotations

from engine.block_manager import BlockManager
from engine.config import SchedulerConfig
from engine.sampling_params import SamplingParams
from engine.scheduler import Scheduler
from engine.sequence import Sequence, SequenceStatus
from engine.step import StepPlan, StepShape

BS = 4


def make(
    num_blocks: int = 16, budget: int = 64, max_seqs: int = 8, chunked: bool = True
) -> Scheduler:
    config = SchedulerConfig(
        max_num_seqs=max_seqs, max_num_batched_tokens=budget, enable_chunked_prefill=chunked
    )
    return Scheduler(config, BlockManager(num_blocks, BS))


def seq(rid: str, n: int, start: int = 0) -> Sequence:
    return Sequence(rid, list(range(start, start + n)), SamplingParams(max_tokens=100))


def run_step(s: Scheduler, sampled: int = 7) -> StepPlan:
    """Schedule, mark computed, and append a token to each request that samples."""
    plan = s.schedule()
    s.commit(plan)
    by_id = {q.request_id: q for q in s.running}
    for c in plan.chunks:
        if c.sample and c.request_id in by_id:
            by_id[c.request_id].token_ids.append(sampled)
    return plan


def shape(plan: StepPlan) -> list[tuple[str, int, int]]:
    return [(c.request_id, c.start_pos, c.num_tokens) for c in plan.chunks]


def test_prefill_then_decode_one_token_per_step() -> None:
    s = make()
    s.add(seq("a", 6))
    plan = run_step(s)
    assert shape(plan) == [("a", 0, 6)] and plan.chunks[0].sample
    assert plan.chunks[0].block_table == [0, 1]
    plan = run_step(s)
    assert shape(plan) == [("a", 6, 1)]
    plan = run_step(s)  # position 7 fills block 1; position 8 needs block 2
    plan = run_step(s)
    assert shape(plan) == [("a", 8, 1)] and plan.chunks[0].block_table == [0, 1, 2]


def test_long_prompt_is_chunked_by_the_token_budget() -> None:
    s = make(budget=5)
    s.add(seq("a", 12))
    plans = [run_step(s) for _ in range(3)]
    assert [shape(p) for p in plans] == [[("a", 0, 5)], [("a", 5, 5)], [("a", 10, 2)]]
    assert [p.chunks[0].sample for p in plans] == [False, False, True]


def test_without_chunked_prefill_a_prompt_over_budget_waits() -> None:
    s = make(budget=5, chunked=False)
    s.add(seq("a", 12))
    assert s.schedule().is_empty


def test_running_requests_go_first_and_budget_is_shared() -> None:
    s = make(budget=8)
    s.add(seq("a", 4))
    run_step(s)
    s.add(seq("b", 10, start=50))
    plan = run_step(s)
    assert shape(plan) == [("a", 4, 1), ("b", 0, 7)]


def test_max_num_seqs_limits_admission() -> None:
    s = make(max_seqs=2)
    for rid in "abc":
        s.add(seq(rid, 3, start=ord(rid) * 10))
    plan = run_step(s)
    assert [c.request_id for c in plan.chunks] == ["a", "b"]
    assert [q.request_id for q in s.waiting] == ["c"]


def test_admission_waits_for_free_blocks() -> None:
    s = make(num_blocks=3)
    s.add(seq("a", 8))  # two blocks
    s.add(seq("b", 8, start=100))  # two more: only one left
    plan = run_step(s)
    assert [c.request_id for c in plan.chunks] == ["a"]
    assert s.blocks.num_free_blocks == 1


def test_prefix_hit_skips_cached_blocks_but_computes_the_last_token() -> None:
    s = make()
    s.add(seq("a", 9))
    run_step(s)
    s.finish(s.running[0], "stop")
    s.add(seq("b", 9))  # same 9 tokens: two full blocks cached
    plan = run_step(s)
    assert shape(plan) == [("b", 8, 1)]
    assert s.running[0].num_cached_tokens == 8
    s.finish(s.running[0], "stop")
    s.add(seq("c", 8))  # exactly two blocks: the second must still be computed
    assert shape(run_step(s)) == [("c", 4, 4)]


def test_newest_request_is_preempted_and_recomputed_with_its_output() -> None:
    s = make(num_blocks=4)
    s.add(seq("a", 4))
    s.add(seq("b", 4, start=100))
    run_step(s)  # a: block 0, b: block 1
    run_step(s)  # each decodes at position 4: blocks 2 and 3
    assert s.blocks.num_free_blocks == 0
    for _ in range(3):
        run_step(s)  # positions 5..7 fit in the current blocks
    plan = run_step(s)  # a needs a third block at position 8: b, the newest, goes
    assert plan.preempted == ["b"]
    assert shape(plan) == [("a", 8, 1)]
    b = s.waiting[0]
    assert b.status is SequenceStatus.WAITING and b.num_computed_tokens == 0
    assert b.num_tokens == 9 and b.num_preemptions == 1  # prompt + 5 sampled tokens
    s.finish(s.running[0], "stop")
    # b's full prompt block is still cached, so only the rest is recomputed.
    assert shape(run_step(s)) == [("b", 4, 5)]


def test_a_request_preempts_itself_when_only_scheduled_requests_are_older() -> None:
    s = make(num_blocks=3)
    s.add(seq("a", 4))
    s.add(seq("b", 4, start=100))
    run_step(s)  # a: block 0, b: block 1
    plan = run_step(s)  # a takes block 2 for position 4; b has nobody newer to evict
    assert plan.preempted == ["b"]
    assert shape(plan) == [("a", 4, 1)]
    assert [q.request_id for q in s.waiting] == ["b"]
    assert s.blocks.num_free_blocks == 1  # b's block is free (and still cached)


def test_finish_and_abort_free_every_block() -> None:
    s = make()
    s.add(seq("a", 9))
    s.add(seq("b", 5, start=40))
    run_step(s)
    s.add(seq("c", 3, start=80))
    for q in list(s.running):
        s.finish(q, "abort")
    s.finish(s.waiting[0], "abort")
    assert s.blocks.num_free_blocks == 16
    assert not s.has_unfinished()


def test_a_step_shape_counts_prompt_chunks_and_decodes_as_the_planner_does() -> None:
    s = make(budget=10)
    s.add(seq("a", 6))
    assert run_step(s).shape() == StepShape(prefill_tokens=6, prefill_sq=36)
    s.add(seq("b", 12, start=50))
    # a decodes (context 7); b's first chunk takes the other 9 tokens of the budget
    assert run_step(s).shape() == StepShape(9, 81, decode_batch=1, decode_context=7)
    # b's last 3 tokens attend over the 9 before them: 12^2 - 9^2
    assert run_step(s).shape() == StepShape(3, 144 - 81, decode_batch=1, decode_context=8)
