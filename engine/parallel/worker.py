"""One rank of a TP x PP instance, and rank 0's engine that drives them all.

A step's life:

1. Rank 0's ``LLMEngine`` schedules as it always does and calls its runner, here a
   ``ParallelRunner``, with the ``StepPlan``.
2. The runner broadcasts the plan (msgpack, ``comm.encode_plan``) on the control group.
   Every other rank is waiting in ``RankWorker.serve`` and decodes the same plan.
3. Every rank runs ``StageExecutor.run``: the same flat batch and attention metadata
   from the plan, its stage's layers over its heads (TP all-reduces inside the layers),
   activations received from the previous stage and sent on to the next.
4. The last stage sends the final hidden states of the sampled rows back to stage 0,
   whose TP ranks compute their slices of the logits and all-gather them.
5. Rank 0 samples, with the requests' own generators, and the engine goes on as in one
   process. The other ranks return to waiting for the next message.

Between steps rank 0 sends a KEEPALIVE when it has sent nothing for ``keepalive_s``, so
an idle instance's ranks never reach the process group's timeout; ``LLMEngine.close``
sends STOP, and every rank's ``serve`` returns.

The process groups are injected (``comm.build_groups``): ranks are made by whoever
launches them, so this module never imports a launcher, and never ray. On CUDA the
launcher also picks each rank's GPU (``torch.cuda.set_device``, or one visible device
per process, as Ray gives an actor); ``device="cuda"`` means that current device.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from engine import envs, native
from engine.attention import AttentionBackend, KVCache, describe, select_backend
from engine.block_manager import BlockManager
from engine.config import EngineConfig, ModelConfig
from engine.kv_blocks import DTYPE_NAMES, KVBlocks, KVLayout
from engine.kv_cache import KVShape, allocate_kv_cache, num_blocks_for
from engine.llm_engine import LLMEngine, resolve_device, resolve_dtype
from engine.loader import load_model
from engine.model_runner import FlatBatch, flat_batch
from engine.models import LlamaForCausalLM
from engine.parallel import comm
from engine.parallel.comm import ParallelGroups
from engine.parallel.layout import kv_heads, stage_layers
from engine.parallel.pipeline import PipelineStage, recv_activations, send_activations
from engine.parallel.tensor import shard_model
from engine.sampler import Sampler, SamplerOutput, SamplingRequest
from engine.scheduler import Scheduler
from engine.step import StepPlan
from engine.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

DEFAULT_KEEPALIVE_S = 10.0


@dataclass
class RankShard:
    """What one rank holds: its stage's layers over its heads, and the cache for them."""

    model_config: ModelConfig  # the whole model's shape
    tokenizer: Tokenizer
    stage: PipelineStage
    caches: list[KVCache]
    backend: AttentionBackend
    kv_shape: KVShape  # this rank's share: its stage's layers, its KV heads
    num_blocks: int  # the same on every rank: block ids are rank 0's
    block_size: int
    device: torch.device
    dtype: torch.dtype

    @property
    def kv_blocks(self) -> KVBlocks:
        layout = KVLayout(
            num_layers=self.kv_shape.num_layers,
            block_size=self.block_size,
            num_kv_heads=self.kv_shape.num_kv_heads,
            head_dim=self.kv_shape.head_dim,
            dtype=DTYPE_NAMES[self.dtype],
            order=self.backend.kv_order,
        )
        return KVBlocks(self.caches, layout)


def load_shard(config: EngineConfig, groups: ParallelGroups) -> RankShard:
    """Load the model and keep this rank's share; every rank calls it together (the KV
    block count is agreed on collectively)."""
    parallel = config.parallel
    device = resolve_device(config.device)
    dtype = resolve_dtype(config.dtype, device)
    loaded = load_model(config.model, dtype=dtype)
    cfg = loaded.config
    parallel.check_model(cfg)
    torch.manual_seed(config.seed)
    # Built and cut on the CPU, so the device only ever holds this rank's share.
    model = LlamaForCausalLM.from_weights(cfg, loaded.weights, torch.device("cpu"), dtype)
    loaded.weights.clear()
    if device.type == "cpu" and native.supports(dtype):
        model.use_native_kernel(native.load())
    layers = stage_layers(cfg.num_layers, parallel.pp, groups.stage)
    stage = PipelineStage(model, layers, groups.is_first_stage, groups.is_last_stage)
    del model  # the other stages' layers go with it
    shard_model(stage, groups.tp_rank, parallel.tp, groups.tp)
    stage.to(device)
    kv_shape = KVShape(
        len(layers), len(kv_heads(cfg.num_kv_heads, parallel.tp, groups.tp_rank)), cfg.head_dim
    )
    name = config.attention_backend
    backend = select_backend(
        envs.attention_backend() if name == "auto" else name, device, cfg.head_dim, dtype
    )
    block_size = config.cache.block_size
    num_blocks = _agree(num_blocks_for(kv_shape, config.cache, dtype, device), groups)
    caches = allocate_kv_cache(kv_shape, num_blocks, block_size, dtype, device, backend)
    logger.info(
        "rank %d (stage %d, tp rank %d): layers %s, %d KV heads, %d blocks, attention %s",
        groups.rank,
        groups.stage,
        groups.tp_rank,
        layers,
        kv_shape.num_kv_heads,
        num_blocks,
        describe(backend),
    )
    return RankShard(
        model_config=cfg,
        tokenizer=loaded.tokenizer,
        stage=stage,
        caches=caches,
        backend=backend,
        kv_shape=kv_shape,
        num_blocks=num_blocks,
        block_size=block_size,
        device=device,
        dtype=dtype,
    )


def _agree(num_blocks: int, groups: ParallelGroups) -> int:
    """The smallest block count any rank can hold: the scheduler's ids index every cache."""
    t = torch.tensor([num_blocks], dtype=torch.long)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MIN, group=groups.control)
    return int(t.item())


class StageExecutor:
    """Runs one rank's part of a step; the same code on every rank."""

    def __init__(self, shard: RankShard, groups: ParallelGroups):
        self.shard = shard
        self.groups = groups

    @torch.inference_mode()
    def run(self, batch: FlatBatch) -> torch.Tensor | None:
        """Returns the logits [N, V] of the sampled rows on stage 0's ranks, else None."""
        s, g = self.shard, self.groups
        meta = s.backend.build_metadata(batch.chunks, s.block_size, s.device)
        pos = torch.tensor(batch.positions, dtype=torch.long, device=s.device)  # [T]
        d = s.model_config.hidden_size
        if g.is_first_stage:
            x = torch.tensor(batch.token_ids, dtype=torch.long, device=s.device)  # [T]
        else:
            shape = (len(batch.token_ids), d)
            x = recv_activations(shape, s.dtype, s.device, g.peer(g.stage - 1), g.world)
        hidden = s.stage(x, pos, s.backend, meta, s.caches)  # [T, D]
        if not g.is_last_stage:
            send_activations(hidden, g.peer(g.stage + 1), g.world)
        if not batch.sample_rows:
            return None
        if g.is_last_stage:
            last = hidden[torch.tensor(batch.sample_rows, device=s.device)]  # [N, D]
            if not g.is_first_stage:
                send_activations(last, g.peer(0), g.world)
                return None
        elif g.is_first_stage:
            shape = (len(batch.sample_rows), d)
            last = recv_activations(shape, s.dtype, s.device, g.peer(g.parallel.pp - 1), g.world)
        else:
            return None
        return s.stage.compute_logits(last)  # [N, V]


class ParallelRunner:
    """Rank 0's runner: hands each step to every rank, runs its own share, samples."""

    def __init__(
        self,
        executor: StageExecutor,
        sampler: Sampler | None = None,
        keepalive_s: float = DEFAULT_KEEPALIVE_S,
    ):
        if executor.groups.rank != 0:
            raise ValueError(f"rank: only rank 0 drives an instance, got {executor.groups.rank}")
        self._executor = executor
        self._groups = executor.groups
        self.sampler = sampler or Sampler()
        self._keepalive_s = keepalive_s
        # Steps run on the engine's thread, keepalives on this runner's: one at a time.
        self._lock = threading.Lock()
        self._last_sent = time.monotonic()
        self._closed = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def model(self) -> PipelineStage:
        return self._executor.shard.stage

    @property
    def caches(self) -> list[KVCache]:
        return self._executor.shard.caches

    @property
    def backend(self) -> AttentionBackend:
        return self._executor.shard.backend

    @property
    def kv_shape(self) -> KVShape:
        return self._executor.shard.kv_shape

    def start(self) -> None:
        """Start the keepalive thread; the other ranks are already waiting."""
        self._thread = threading.Thread(target=self._keepalive, name="baton-tp-keepalive")
        self._thread.daemon = True
        self._thread.start()

    def execute(
        self, plan: StepPlan, sampling: Mapping[str, SamplingRequest]
    ) -> tuple[list[str], SamplerOutput]:
        batch = flat_batch(plan)
        with self._lock:
            if self._closed:
                raise RuntimeError("runner: closed; the instance's ranks have stopped")
            self._send(comm.encode_plan(plan))
            logits = self._executor.run(batch)
        if logits is None:
            return [], SamplerOutput(token_ids=[], logprobs=[])
        return batch.sampled, self.sampler(logits, [sampling[r] for r in batch.sampled])

    def close(self) -> None:
        """Tell every other rank to stop; safe to call twice."""
        with self._lock:
            if not self._closed:
                self._closed = True
                self._send(comm.encode(comm.STOP))
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5.0)

    def _send(self, payload: bytes) -> None:
        comm.broadcast_message(payload, self._groups)
        self._last_sent = time.monotonic()

    def _keepalive(self) -> None:
        while not self._stop.wait(self._keepalive_s / 2):
            with self._lock:
                idle = time.monotonic() - self._last_sent
                if not self._closed and idle >= self._keepalive_s / 2:
                    self._send(comm.encode(comm.KEEPALIVE))


class RankWorker:
    """Any rank but 0: runs the steps rank 0 broadcasts until it sends STOP."""

    def __init__(self, executor: StageExecutor):
        self._executor = executor
        self.steps = 0
        self.keepalives = 0

    @property
    def kv_blocks(self) -> KVBlocks:
        """Whole-block access to this rank's share of the KV cache, for transfers."""
        return self._executor.shard.kv_blocks

    def serve(self) -> None:
        """Blocks; each wait is bounded by the control group's timeout, which rank 0's
        keepalives keep an idle instance within."""
        groups = self._executor.groups
        while True:
            kind, body = comm.decode(comm.receive_message(groups))
            if kind == comm.STOP:
                return
            if kind == comm.STEP:
                self._executor.run(flat_batch(comm.decode_plan(body)))
                self.steps += 1
            else:
                self.keepalives += 1


def create_driver(
    config: EngineConfig, groups: ParallelGroups, keepalive_s: float = DEFAULT_KEEPALIVE_S
) -> LLMEngine:
    """Rank 0: an LLMEngine whose steps run on the whole instance. ``close()`` it to stop
    the other ranks. They must call :func:`create_worker` at the same time."""
    if groups.rank != 0:
        raise ValueError(f"rank: only rank 0 drives an instance, got {groups.rank}")
    shard = load_shard(config, groups)
    runner = ParallelRunner(StageExecutor(shard, groups), keepalive_s=keepalive_s)
    blocks = BlockManager(shard.num_blocks, shard.block_size, config.cache.enable_prefix_caching)
    engine = LLMEngine(
        shard.model_config, shard.tokenizer, runner, Scheduler(config.scheduler, blocks)
    )
    runner.start()
    return engine


def create_worker(config: EngineConfig, groups: ParallelGroups) -> RankWorker:
    """Any other rank: load this rank's share; then :meth:`RankWorker.serve`."""
    if groups.rank == 0:
        raise ValueError("rank: rank 0 drives the instance; use create_driver")
    return RankWorker(StageExecutor(load_shard(config, groups), groups))


def run_rank(
    config: EngineConfig, groups: ParallelGroups, keepalive_s: float = DEFAULT_KEEPALIVE_S
) -> LLMEngine | None:
    """The one call every rank makes: rank 0 gets its engine back at once; any other rank
    serves rank 0's steps until rank 0's engine is closed, then returns None."""
    if groups.rank == 0:
        return create_driver(config, groups, keepalive_s)
    create_worker(config, groups).serve()
    return None
