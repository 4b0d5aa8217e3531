"""Continuous batching under a per-step token budget.

Every request is a list of tokens of which ``num_computed_tokens`` are in the KV cache.
Each step gives each running request the tokens it still needs (one for a request in
decode, a chunk of the prompt for one in prefill) until the token budget is spent, then
admits waiting requests, first reusing any cached prefix blocks. When blocks run out, the
newest running request is preempted: its blocks are freed and it goes back to the front
of the waiting queue to be recomputed later (prompt and output so far).
"""

from __future__ import annotations

import time
from collections import deque

from engine.block_manager import BlockManager, hash_block
from engine.config import SchedulerConfig
from engine.sequence import Sequence, SequenceStatus
from engine.step import ScheduledChunk, StepPlan


class Scheduler:
    def __init__(self, config: SchedulerConfig, block_manager: BlockManager):
        self.config = config
        self.blocks = block_manager
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def add_running(self, seq: Sequence) -> None:
        """Join a request whose KV is already in its block table (pulled from a prefill
        instance) straight to the running batch; the caller checked capacity."""
        seq.status = SequenceStatus.RUNNING
        if seq.metrics.first_scheduled_time is None:
            seq.metrics.first_scheduled_time = time.monotonic()
        self.running.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> StepPlan:
        budget = self.config.max_num_batched_tokens
        chunks: list[ScheduledChunk] = []
        preempted: list[str] = []
        scheduled: set[str] = set()

        for seq in list(self.running):
            if budget == 0:
                break
            if seq.status is not SequenceStatus.RUNNING:
                continue  # preempted earlier in this loop
            num_new = min(seq.num_tokens - seq.num_computed_tokens, budget)
            if not self._make_room(seq, num_new, preempted, scheduled):
                continue
            chunks.append(self._chunk(seq, num_new))
            scheduled.add(seq.request_id)
            budget -= num_new

        # Admitting while preempting would only swap one request for another.
        while not preempted and self.waiting and budget > 0:
            if len(self.running) >= self.config.max_num_seqs:
                break
            seq = self.waiting[0]
            num_new = self._admit(seq, budget)
            if num_new == 0:
                break
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            if seq.metrics.first_scheduled_time is None:
                seq.metrics.first_scheduled_time = time.monotonic()
            self.running.append(seq)
            chunks.append(self._chunk(seq, num_new))
            budget -= num_new
        return StepPlan(chunks=chunks, preempted=preempted)

    def _chunk(self, seq: Sequence, num_new: int) -> ScheduledChunk:
        start = seq.num_computed_tokens
        end = start + num_new
        # Prompt logprobs while the prompt is computed the first time (not after output).
        top = seq.params.prompt_logprobs if seq.num_output_tokens == 0 else None
        return ScheduledChunk(
            request_id=seq.request_id,
            token_ids=seq.token_ids[start:end],
            start_pos=start,
            block_table=list(seq.block_table),
            sample=end == seq.num_tokens,
            prompt_logprobs=top,
            next_token=seq.token_ids[end] if top is not None and end < seq.num_tokens else None,
        )

    def _make_room(
        self, seq: Sequence, num_new: int, preempted: list[str], scheduled: set[str]
    ) -> bool:
        """Allocate blocks for ``seq``'s next ``num_new`` tokens, preempting the newest
        unscheduled requests as needed. False when ``seq`` itself had to go."""
        need = self.blocks.blocks_needed(seq.num_computed_tokens + num_new) - len(seq.block_table)
        while need > self.blocks.num_free_blocks:
            victim = next(
                (s for s in reversed(self.running) if s.request_id not in scheduled), None
            )
            if victim is None:
                raise RuntimeError("KV cache too small for one scheduled request")
            self._preempt(victim)
            preempted.append(victim.request_id)
            if victim is seq:
                return False
        if need > 0:
            seq.block_table.extend(self.blocks.allocate(need))
        return True

    def _admit(self, seq: Sequence, budget: int) -> int:
        """Reserve blocks for a waiting request's first chunk; 0 if it must keep waiting."""
        cached: list[int] = []
        # prompt_logprobs needs logits at every prompt position: no prefix cache (as vLLM).
        asks = seq.params.prompt_logprobs is not None and seq.num_output_tokens == 0
        if seq.num_computed_tokens == 0 and not asks:
            # Leave at least one token to compute: its logits give the next token.
            max_blocks = (seq.num_tokens - 1) // self.blocks.block_size
            cached = self.blocks.find_cached_prefix(seq.token_ids, max_blocks)
        num_cached = len(cached) * self.blocks.block_size
        num_new = min(seq.num_tokens - num_cached, budget)
        if num_new < seq.num_tokens - num_cached and not self.config.enable_chunked_prefill:
            return 0
        need = self.blocks.blocks_needed(num_cached + num_new) - len(cached)
        if need > self.blocks.num_free_after_acquiring(cached):
            return 0
        self.blocks.acquire(cached)
        seq.block_table = cached + self.blocks.allocate(need)
        seq.num_computed_tokens = num_cached
        seq.num_cached_tokens = max(seq.num_cached_tokens, num_cached)
        return num_new

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self._release(seq)
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)

    def _release(self, seq: Sequence) -> None:
        self.blocks.free(list(reversed(seq.block_table)))
        seq.block_table = []
        seq.num_computed_tokens = 0

    def commit(self, plan: StepPlan) -> None:
        """Mark the plan's tokens computed and publish newly full blocks to the prefix cache."""
        by_id = {s.request_id: s for s in self.running}
        bs = self.blocks.block_size
        for chunk in plan.chunks:
            seq = by_id.get(chunk.request_id)
            if seq is None:
                continue
            seq.num_computed_tokens = chunk.context_len
            if not self.blocks.enable_prefix_caching:
                continue
            # Hashes depend on tokens only, so they survive preemption; registration
            # is per block and idempotent, so blocks filled by this chunk are published.
            for i in range(chunk.start_pos // bs, chunk.context_len // bs):
                while len(seq.block_hashes) <= i:
                    j = len(seq.block_hashes)
                    parent = seq.block_hashes[-1] if seq.block_hashes else None
                    seq.block_hashes.append(
                        hash_block(parent, seq.token_ids[j * bs : (j + 1) * bs])
                    )
                self.blocks.register(seq.block_table[i], seq.block_hashes[i])

    def detach(self, seq: Sequence) -> list[int]:
        """Take a running request out of the batch *keeping* its blocks, whose ownership
        passes to the caller (a prefill instance holding them for a transfer)."""
        self.running.remove(seq)
        blocks, seq.block_table = seq.block_table, []
        seq.status = SequenceStatus.FINISHED
        seq.metrics.finish_time = time.monotonic()
        return blocks

    def finish(self, seq: Sequence, reason: str) -> None:
        """Retire a request (finished or aborted) and free its blocks."""
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
        elif seq.status is SequenceStatus.WAITING:
            self.waiting.remove(seq)
        self._release(seq)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
        seq.metrics.finish_time = time.monotonic()
