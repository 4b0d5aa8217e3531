"""Sequence groups (n > 1): one prompt computed once, its blocks shared by the children."""

from __future__ import annotations

from dataclasses import replace

from engine import LLM, SamplingParams
from engine.llm_engine import LLMEngine
from engine.outputs import RequestOutput

PROMPT = (  # 17 to 31 tokens: one full block shared, a partial one copied
    "The three most useful tools in a small home kitchen, according to chefs who cook "
    "every single day, are"
)


def _run(engine: LLMEngine) -> dict[str, RequestOutput]:
    last: dict[str, RequestOutput] = {}
    while engine.has_unfinished():
        for out in engine.step():
            last[out.request_id] = out
    return last


def _children(params: SamplingParams, n: int) -> list[tuple[str, SamplingParams]]:
    return [
        (f"g-{i}", params if params.seed is None else replace(params, seed=params.seed + i))
        for i in range(n)
    ]


def test_greedy_children_equal_the_single_request_and_share_the_prompt_blocks(
    smollm: LLM,
) -> None:
    engine = smollm.engine
    engine.block_manager.reset_prefix_cache()
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    [single] = smollm.generate([PROMPT], params)
    engine.block_manager.reset_prefix_cache()
    ids = engine.tokenizer.encode(PROMPT)
    bs = engine.block_manager.block_size
    assert len(ids) % bs != 0 and len(ids) > bs  # a full block shared, a partial one copied
    engine.add_request("g", params=params, prompt_token_ids=ids, children=_children(params, 3))
    free = engine.stats().free_blocks
    firsts = engine.step()  # the prompt, once: three first tokens
    assert sorted(o.request_id for o in firsts) == ["g-0", "g-1", "g-2"]
    # Exactly: the prompt's blocks once, plus one copy of the partial last block for
    # each child but the first; the full blocks are referenced by all three.
    prompt_blocks = engine.block_manager.blocks_needed(len(ids))
    assert free - engine.stats().free_blocks == prompt_blocks + 2
    tables = [s.block_table for s in engine.scheduler.running]
    assert len(tables) == 3
    full = len(ids) // bs
    assert tables[0][:full] == tables[1][:full] == tables[2][:full]
    assert len({t[full] for t in tables}) == 3
    assert all(engine.block_manager.ref_count(b) == 3 for b in tables[0][:full])
    last = _run(engine)
    assert [last[f"g-{i}"].token_ids for i in range(3)] == [single.token_ids] * 3
    assert all(last[f"g-{i}"].text == single.text for i in range(3))


def test_seeded_children_are_each_the_request_with_seed_plus_i(smollm: LLM) -> None:
    engine = smollm.engine
    params = SamplingParams(max_tokens=10, temperature=1.0, seed=77)
    alone = [smollm.generate([PROMPT], p)[0].token_ids for _, p in _children(params, 3)]
    ids = engine.tokenizer.encode(PROMPT)
    engine.add_request("g", params=params, prompt_token_ids=ids, children=_children(params, 3))
    last = _run(engine)
    assert [last[f"g-{i}"].token_ids for i in range(3)] == alone
    assert len({tuple(t) for t in alone}) > 1  # the sequences differ


def test_aborting_children_before_and_after_their_first_token_frees_every_block(
    smollm: LLM,
) -> None:
    engine = smollm.engine
    params = SamplingParams(max_tokens=30, temperature=0, ignore_eos=True)
    ids = engine.tokenizer.encode(PROMPT)
    engine.add_request("g", params=params, prompt_token_ids=ids, children=_children(params, 3))
    assert engine.abort("g-1") is not None  # before the prompt ran: the group goes on
    outs = engine.step()
    assert sorted(o.request_id for o in outs) == ["g-0", "g-2"]
    engine.step()
    assert engine.abort("g-0") is not None
    engine.step()
    assert engine.abort("g-2") is not None
    assert not engine.has_unfinished()
    # the conftest checks that every block is free; a whole group aborted up front too:
    engine.add_request("h", params=params, prompt_token_ids=ids, children=_children(params, 2))
    engine.abort("g-0")  # not running any more: nothing happens
    assert engine.abort("h") is not None and engine.abort("g-1") is None


def test_held_groups_hand_over_the_prompt_blocks(smollm: LLM) -> None:
    engine = smollm.engine
    params = SamplingParams(max_tokens=1, temperature=0)
    ids = engine.tokenizer.encode(PROMPT)
    engine.hold_groups = True
    try:
        engine.add_request("g", params=params, prompt_token_ids=ids, children=_children(params, 2))
        outs = engine.step()
        assert all(o.finished for o in outs)  # max_tokens=1: done at the first token
        [(group, blocks)] = engine.take_held()
        assert group.children == [] and blocks == []
        engine.add_request(
            "g", params=params, prompt_token_ids=ids,
            children=_children(replace(params, max_tokens=5), 2),
        )  # fmt: skip
        engine.step()
        [(group, blocks)] = engine.take_held()
        assert [c.request_id for c in group.children] == ["g-0", "g-1"]
        assert len(blocks) == engine.block_manager.blocks_needed(len(ids))
        assert not engine.has_unfinished()
        engine.free_blocks(blocks)
    finally:
        engine.hold_groups = False
