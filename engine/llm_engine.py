"""The step-level engine that the offline API and the workers drive.

A request's path: ``add_request`` validates it and puts it in the scheduler's waiting
queue; each ``step`` asks the scheduler for a plan (prefill chunks and decode tokens
within the token budget), runs it through the model runner, appends the sampled
tokens, detokenizes them, checks stop conditions and frees the blocks of finished
requests. ``abort`` frees a request's blocks at any point.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence as Seq

import torch

from engine import envs, native, prompt_logprobs, sequence_group
from engine.attention import describe, select_backend
from engine.block_manager import BlockManager
from engine.config import CacheConfig, EngineConfig, ModelConfig
from engine.kv_blocks import DTYPE_NAMES, KVBlocks, KVLayout
from engine.kv_cache import KVShape, allocate_kv_cache, num_blocks_for
from engine.loader import load_model
from engine.logits_processors import build_processor
from engine.model_runner import ModelRunner, Runner
from engine.models import LlamaForCausalLM
from engine.output_processor import RequestState
from engine.outputs import EngineStats, RequestOutput
from engine.sampler import SamplerOutput, SamplingRequest
from engine.sampling_params import SamplingParams
from engine.scheduler import Scheduler
from engine.sequence import Sequence, SequenceStatus
from engine.step import StepPlan, StepShape
from engine.structured_output import Grammars
from engine.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        # bf16 matmuls crash some CPUs' oneDNN paths; fp32 is the CPU default.
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    return _DTYPES[name]


class LLMEngine:
    def __init__(
        self,
        model_config: ModelConfig,
        tokenizer: Tokenizer,
        runner: Runner,
        scheduler: Scheduler,
    ):
        self.model_config = model_config
        self.tokenizer = tokenizer
        self.runner = runner
        self.scheduler = scheduler
        self.max_model_len = model_config.max_position_embeddings
        self._last_plan = StepPlan()
        self._states: dict[str, RequestState] = {}
        self.grammars = Grammars(tokenizer, model_config.vocab_size)
        # Sequence groups (n > 1) whose children got their first token: forked here to
        # decode on (False), or held with their prompt's blocks for a prefill instance
        # to hand off (True; see take_held).
        self.hold_groups = False
        self._held: list[tuple[Sequence, list[int]]] = []

    @classmethod
    def from_config(cls, config: EngineConfig) -> LLMEngine:
        if config.parallel.world_size > 1:
            raise ValueError(
                f"parallel: tp={config.parallel.tp} x pp={config.parallel.pp} runs on one "
                "process per rank; start them with engine.parallel.worker.run_rank"
            )
        device = resolve_device(config.device)
        dtype = resolve_dtype(config.dtype, device)
        loaded = load_model(config.model, dtype=dtype)
        torch.manual_seed(config.seed)
        model = LlamaForCausalLM.from_weights(loaded.config, loaded.weights, device, dtype)
        if device.type == "cpu" and native.supports(dtype):
            model.use_native_kernel(native.load())
        loaded.weights.clear()
        cache: CacheConfig = config.cache
        kv_shape = KVShape.of(loaded.config)
        num_blocks = num_blocks_for(kv_shape, cache, dtype, device)
        name = config.attention_backend
        if name == "auto":
            name = envs.attention_backend()
        backend = select_backend(name, device, loaded.config.head_dim, dtype)
        caches = allocate_kv_cache(kv_shape, num_blocks, cache.block_size, dtype, device, backend)
        runner = ModelRunner(model, caches, backend, cache.block_size, device)
        blocks = BlockManager(num_blocks, cache.block_size, cache.enable_prefix_caching)
        logger.info(
            "loaded %s: %s, %d KV blocks of %d tokens, attention %s",
            loaded.source,
            dtype,
            num_blocks,
            cache.block_size,
            describe(backend),
        )
        return cls(loaded.config, loaded.tokenizer, runner, Scheduler(config.scheduler, blocks))

    @property
    def num_parameters(self) -> int:
        """Weights in the model (this rank's shard under TP/PP); a tied embedding/LM head
        counts once."""
        return sum(p.numel() for p in self.runner.model.parameters())

    @property
    def block_manager(self) -> BlockManager:
        return self.scheduler.blocks

    @property
    def kv_blocks(self) -> KVBlocks:
        """Whole-block access to this engine's KV cache (rank 0's share under TP/PP)."""
        caches = self.runner.caches
        shape = self.runner.kv_shape
        layout = KVLayout(
            num_layers=len(caches),
            block_size=self.block_manager.block_size,
            num_kv_heads=shape.num_kv_heads,
            head_dim=shape.head_dim,
            dtype=DTYPE_NAMES[caches[0].k.dtype],
            order=self.runner.backend.kv_order,
        )
        return KVBlocks(caches, layout)

    def add_request(
        self,
        request_id: str,
        prompt: str | None = None,
        params: SamplingParams | None = None,
        *,
        prompt_token_ids: Seq[int] | None = None,
        children: Seq[tuple[str, SamplingParams]] | None = None,
    ) -> None:
        """Queue a prompt. With ``children`` ((request id, params) each) it is a
        sequence group: the prompt is computed once under ``request_id`` and each child
        gets its own first token from its logits, then decodes as its own request
        sharing the prompt's blocks. ``params`` is then only the group's own."""
        params = params or SamplingParams()
        if not isinstance(params, SamplingParams):
            raise ValueError(f"params: must be SamplingParams, got {type(params).__name__}")
        ids_taken = [request_id, *(c for c, _ in children or [])]
        if len(set(ids_taken)) != len(ids_taken):
            raise ValueError(f"request_id: the ids of a group must differ, got {ids_taken}")
        for rid in ids_taken:
            if rid in self._states:
                raise ValueError(f"request_id: {rid!r} is already running")
        ids = self._prompt_ids(prompt, prompt_token_ids)
        self._check_fits(ids, params)
        self._check_prompt_logprobs(params)
        seq = Sequence(request_id, ids, params)
        kids: list[tuple[Sequence, RequestState]] = []
        for child_id, child_params in children or []:
            self._check_fits(ids, child_params)
            child = Sequence(child_id, ids, child_params, parent=seq)
            child.logits_processor = build_processor(child_params, self.tokenizer, self.grammars)
            kids.append((child, RequestState(child, self.tokenizer)))
        if children is not None:
            if not kids:
                raise ValueError("children: a sequence group needs at least one child")
            seq.children = [child for child, _ in kids]
            for child, state in kids:
                self._states[child.request_id] = state
        else:
            seq.logits_processor = build_processor(params, self.tokenizer, self.grammars)
        self._states[request_id] = RequestState(seq, self.tokenizer)
        self.scheduler.add(seq)

    def add_prefilled(
        self,
        request_id: str,
        prompt_token_ids: Seq[int],
        first_token: int,
        params: SamplingParams,
        *,
        block_table: list[int] | None = None,
        generator_state: bytes | None = None,
        first_logprobs: list[tuple[int, float]] | None = None,
    ) -> None:
        """Continue a request whose prompt another instance prefilled.

        ``first_token`` was sampled there (and already reported). With ``block_table``
        (blocks holding the prompt's KV, pulled from that instance) the request joins the
        running batch at once; without it the prompt is recomputed here first. A seeded
        request passes its generator's state so that sampling continues the same stream.
        """
        if request_id in self._states:
            raise ValueError(f"request_id: {request_id!r} is already running")
        ids = self._prompt_ids(None, prompt_token_ids)
        self._check_fits(ids, params)
        seq = Sequence(request_id, ids, params)
        if generator_state is not None and seq.generator is not None:
            seq.generator.set_state(torch.frombuffer(bytearray(generator_state), dtype=torch.uint8))
        state = RequestState(seq, self.tokenizer)
        # Replays the stop checker and detokenizer exactly as the prefill side ran them;
        # the text it releases was reported there.
        _, reason = state.process(first_token, first_logprobs)
        if reason is not None:
            raise ValueError(f"first_token: {first_token} already finishes the request")
        seq.metrics.first_token_time = time.monotonic()
        self._states[request_id] = state
        if block_table is None:
            self.scheduler.add(seq)
            return
        if len(block_table) > self.block_manager.blocks_needed(len(ids)):
            raise ValueError(
                f"block_table: {len(block_table)} blocks for {len(ids)} prompt tokens"
            )
        # A table short of the prompt (a group's child without its copy of the last
        # partial block, see share_blocks) recomputes the rest in its first step.
        seq.block_table = list(block_table)
        seq.num_computed_tokens = min(len(ids), len(block_table) * self.block_manager.block_size)
        self.scheduler.add_running(seq)

    def share_blocks(self, block_ids: list[int], num_tokens: int, n: int) -> list[list[int]]:
        """``n`` block tables over one sequence's KV (``sequence_group.share_blocks``)."""
        kv = self.kv_blocks if isinstance(self.runner, ModelRunner) else None
        return sequence_group.share_blocks(self.block_manager, kv, block_ids, num_tokens, n)

    def take_held(self) -> list[tuple[Sequence, list[int]]]:
        """With ``hold_groups``: the sequence groups whose children got their first
        token since the last call, each with its prompt's blocks, which the caller now
        owns (``free_blocks``); ``seq.children`` are the children not finished yet
        (none: the blocks are already freed and the list is empty)."""
        held, self._held = self._held, []
        return held

    def add_resumed(
        self,
        request_id: str,
        prompt_token_ids: Seq[int],
        output_token_ids: Seq[int],
        params: SamplingParams,
    ) -> None:
        """Continue a request another instance started and lost (a migration): its
        ``output_token_ids`` were generated (and reported) there. They are replayed as
        output, not prompt, through the stop checker and detokenizer, so max_tokens,
        penalties, stop strings and seeded draws go on as if nothing happened; the KV of
        prompt plus output is recomputed here before the next token is sampled."""
        if request_id in self._states:
            raise ValueError(f"request_id: {request_id!r} is already running")
        ids = self._prompt_ids(None, prompt_token_ids)
        self._check_fits(ids, params)
        outputs = self._prompt_ids(None, output_token_ids) if output_token_ids else []
        seq = Sequence(request_id, ids, params)
        state = RequestState(seq, self.tokenizer)
        for token in outputs:
            _, reason = state.process(token, None)
            if reason is not None:
                raise ValueError(f"output_token_ids: already finish the request ({reason})")
        if outputs:
            seq.metrics.first_token_time = time.monotonic()
        self._states[request_id] = state
        self.scheduler.add(seq)

    def detach(self, request_id: str) -> tuple[Sequence, list[int]]:
        """Take a running request out of this engine, keeping its KV blocks allocated.

        The caller owns the returned blocks and must :meth:`free_blocks` them."""
        state = self._states.pop(request_id, None)
        if state is None:
            raise ValueError(f"request_id: {request_id!r} is not running")
        return state.seq, self.scheduler.detach(state.seq)

    def free_blocks(self, block_ids: list[int]) -> None:
        """Release blocks a caller took with :meth:`detach` or :meth:`reserve_blocks`."""
        self.block_manager.free(list(reversed(block_ids)))

    def reserve_blocks(self, n: int) -> list[int]:
        """Allocate ``n`` blocks outside the scheduler, e.g. to pull KV into."""
        return self.block_manager.allocate(n)

    def validate_request(self, prompt_token_ids: Seq[int], params: SamplingParams) -> None:
        """Raise ValueError naming the field if the request cannot run here. Reads only
        fixed limits, so any thread may call it."""
        if not isinstance(params, SamplingParams):
            raise ValueError(f"params: must be SamplingParams, got {type(params).__name__}")
        self._check_fits(self._prompt_ids(None, prompt_token_ids), params)
        self._check_prompt_logprobs(params)
        build_processor(params, self.tokenizer, self.grammars)  # ids in vocab, grammar compiles

    def _prompt_ids(self, prompt: str | None, prompt_token_ids: Seq[int] | None) -> list[int]:
        if prompt_token_ids is not None:
            ids = list(prompt_token_ids)
            vocab = self.model_config.vocab_size
            bad = next((t for t in ids if not isinstance(t, int) or not 0 <= t < vocab), None)
            if bad is not None:
                raise ValueError(f"prompt_token_ids: {bad!r} is not a token id in [0, {vocab})")
        elif isinstance(prompt, str):
            ids = self.tokenizer.encode(prompt)
        else:
            raise ValueError(f"prompt: must be a str, got {type(prompt).__name__}")
        if not ids:
            raise ValueError("prompt: must not be empty")
        return ids

    def _check_prompt_logprobs(self, params: SamplingParams) -> None:
        # Only ModelRunner computes them; a TP/PP stage's runner returns sampled rows only.
        if params.prompt_logprobs is not None and not isinstance(self.runner, ModelRunner):
            raise ValueError(
                "prompt_logprobs: not supported on a tensor/pipeline-parallel instance"
            )

    def _check_fits(self, ids: list[int], params: SamplingParams) -> None:
        longest = len(ids) + params.max_tokens
        if longest > self.max_model_len:
            field = "prompt" if len(ids) >= self.max_model_len else "max_tokens"
            raise ValueError(
                f"{field}: prompt ({len(ids)} tokens) + max_tokens ({params.max_tokens}) "
                f"exceeds the model's context of {self.max_model_len} tokens"
            )
        blocks = self.block_manager
        if blocks.blocks_needed(longest) > blocks.num_blocks:
            raise ValueError(
                f"max_tokens: prompt ({len(ids)}) + max_tokens ({params.max_tokens}) needs "
                f"{blocks.blocks_needed(longest)} KV blocks; the cache has {blocks.num_blocks}"
            )

    def step(self) -> list[RequestOutput]:
        plan = self.scheduler.schedule()
        if plan.is_empty:
            return []
        rows = {
            c.request_id: self._sampling_row(self._states[c.request_id].seq)
            for c in plan.chunks
            if c.sample
        }
        sampled, out = self.runner.execute(plan, rows)
        self.scheduler.commit(plan)
        for rid, (start, prompt_rows) in (out.prompt_logprobs or {}).items():
            acc = self._states[rid].seq.prompt_logprobs
            if acc is not None:
                prompt_logprobs.merge(acc, start, prompt_rows)
        self._last_plan = plan
        now = time.monotonic()
        outputs = []
        for i, request_id in enumerate(sampled):
            state = self._states[request_id]
            seq = state.seq
            if seq.children is not None:
                outputs.extend(self._fan_out(seq, out.fanout[i], now))
                continue
            if seq.metrics.first_token_time is None:
                seq.metrics.first_token_time = now
            token = out.token_ids[i]
            delta, reason = state.process(token, out.logprobs[i] if out.logprobs else None)
            if reason is not None:
                self.scheduler.finish(seq, reason)
                del self._states[request_id]
            outputs.append(self._output(state, [token], delta))
        return outputs

    def _fan_out(self, group: Sequence, drawn: SamplerOutput, now: float) -> list[RequestOutput]:
        return sequence_group.fan_out(self, group, drawn, now)

    @property
    def last_step(self) -> StepShape:
        """What the latest non-empty step computed (worked out only when asked)."""
        return self._last_plan.shape()

    def _sampling_row(self, seq: Sequence) -> SamplingRequest:
        if seq.children is not None:
            fanout = [self._sampling_row(c) for c in seq.children]
            return SamplingRequest(seq.params, seq.prompt_token_ids, [], None, fanout=fanout)
        if seq.logits_processor is None and seq.params.has_logits_processing:
            # A request that reached this engine by another path (hand-off, migration):
            # a fresh processor replays its output tokens on first use.
            seq.logits_processor = build_processor(seq.params, self.tokenizer, self.grammars)
        return SamplingRequest(
            seq.params, seq.prompt_token_ids, seq.output_token_ids, seq.generator,
            seq.logits_processor,
        )  # fmt: skip

    def _output(self, state: RequestState, new: list[int], delta: str) -> RequestOutput:
        seq = state.seq
        return RequestOutput(
            request_id=seq.request_id,
            prompt_token_ids=seq.prompt_token_ids,
            token_ids=seq.output_token_ids,
            text=state.text,
            new_token_ids=new,
            delta_text=delta,
            finished=seq.is_finished,
            finish_reason=seq.finish_reason,
            logprobs=state.logprobs,
            num_cached_tokens=seq.num_cached_tokens,
            metrics=seq.metrics,
            prompt_logprobs=seq.prompt_logprobs,
        )

    def abort(self, request_id: str) -> RequestOutput | None:
        """Stop a request wherever it is and free its blocks; None if it is unknown."""
        state = self._states.pop(request_id, None)
        if state is None:
            return None
        seq = state.seq
        group = seq.parent
        if group is not None and group.children is not None:  # before its first token
            group.children.remove(seq)
            seq.status, seq.finish_reason = SequenceStatus.FINISHED, "abort"
            if not group.children:
                self.abort(group.request_id)
            return self._output(state, [], "")
        for child in seq.children or []:  # a group: its children end with it
            self._states.pop(child.request_id, None)
            child.status, child.finish_reason = SequenceStatus.FINISHED, "abort"
        self.scheduler.finish(seq, "abort")
        return self._output(state, [], "")

    def close(self) -> None:
        """Release the runner; under TP/PP this stops the instance's other ranks."""
        self.runner.close()

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    def stats(self) -> EngineStats:
        s = self.scheduler
        return EngineStats(
            num_waiting=len(s.waiting),
            num_running=len(s.running),
            free_blocks=s.blocks.num_free_blocks,
            total_blocks=s.blocks.num_blocks,
            num_preemptions=s.num_preemptions,
        )
