"""Sequence groups (``n`` > 1): one prompt computed once, its KV shared by n sequences.

``LLMEngine.add_request(..., children=...)`` queues the prompt as one ``Sequence`` with
the children attached. When its last prompt chunk is sampled, the sampler draws one
first token per child from the same logits (``SamplingRequest.fanout``), and
:func:`fan_out` turns the group into its children: each child's first token goes
through its own detokenizer and stop checks, then the prompt's blocks are either held
for a hand-off (a prefill instance, ``LLMEngine.hold_groups``) or forked here with
:func:`share_blocks` (a colocated engine; a decode instance forks a pulled group the
same way).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from engine.block_manager import BlockManager
from engine.kv_blocks import KVBlocks
from engine.outputs import RequestOutput
from engine.sampler import SamplerOutput
from engine.sequence import Sequence, SequenceStatus

if TYPE_CHECKING:
    from engine.llm_engine import LLMEngine


def share_blocks(
    blocks: BlockManager, kv: KVBlocks | None, block_ids: list[int], num_tokens: int, n: int
) -> list[list[int]]:
    """``n`` block tables over the KV of ``num_tokens`` tokens held in ``block_ids``
    (whose reference the first table keeps): the full blocks are shared (one more
    reference each), and the last, partial block, which each sequence's next token
    writes into, is copied for every other table (copy on write, done now since that
    write is the next step). Without ``kv`` (an engine whose KV is spread over TP/PP
    ranks) or with no block free, a table stops at the full blocks and its sequence
    recomputes the tail (under one block of tokens)."""
    full = min(num_tokens // blocks.block_size, len(block_ids))
    shared, tail = block_ids[:full], block_ids[full:]
    tables = [list(block_ids)]
    for _ in range(n - 1):
        blocks.acquire(shared)
        copies: list[int] = []
        if tail and kv is not None and blocks.num_free_blocks >= len(tail):
            copies = blocks.allocate(len(tail))
            layers = range(kv.layout.num_layers)
            buf = kv.read(layers, tail, kv.empty(len(layers), len(tail)))
            kv.write(layers, copies, buf)
        tables.append(list(shared) + copies)
    return tables


def fan_out(
    engine: LLMEngine, group: Sequence, drawn: SamplerOutput, now: float
) -> list[RequestOutput]:
    """A group's prompt is done: each child takes its first token; then the group's
    blocks go to the children still running (forked here) or are held."""
    states = engine._states
    outputs, live = [], []
    for j, child in enumerate(group.children or []):
        state = states[child.request_id]
        child.parent = None
        child.num_cached_tokens = group.num_cached_tokens
        child.metrics.first_scheduled_time = group.metrics.first_scheduled_time
        child.metrics.first_token_time = now
        token = drawn.token_ids[j]
        delta, reason = state.process(token, drawn.logprobs[j])
        if reason is None:
            live.append(child)
        else:
            child.status = SequenceStatus.FINISHED
            child.finish_reason = reason
            child.metrics.finish_time = now
            del states[child.request_id]
        child.prompt_logprobs = group.prompt_logprobs  # computed once, for the group
        outputs.append(engine._output(state, [token], delta))
    del states[group.request_id]
    block_ids = engine.scheduler.detach(group)
    group.children = live
    if not live:
        engine.free_blocks(block_ids)
        block_ids = []
    if engine.hold_groups:  # the children leave this engine with the blocks
        for child in live:
            del states[child.request_id]
            child.status = SequenceStatus.FINISHED
        engine._held.append((group, block_ids))
    elif live:
        tables = engine.share_blocks(block_ids, group.num_prompt_tokens, len(live))
        bs = engine.block_manager.block_size
        for child, table in zip(live, tables, strict=True):
            child.block_table = table
            child.num_computed_tokens = min(group.num_prompt_tokens, len(table) * bs)
            engine.scheduler.add_running(child)
    return outputs
