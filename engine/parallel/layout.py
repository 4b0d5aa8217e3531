"""Who holds what in a TP x PP instance: layers per stage, heads per rank, KV re-sharding.

Pure Python (no torch), so the model sharding, the KV cache sizing and the KV transfer
between instances of different layouts all read one definition, tested exactly.

Ranks are stage-major: ``rank = stage * tp + tp_rank``. A stage holds a contiguous run
of layers; when ``pp`` does not divide the layer count the *last* stages take one layer
more, because stage 0 also runs the embedding and the LM head. Query heads split evenly
over the TP ranks. KV heads split evenly too while ``tp <= num_kv_heads``; past that
each rank holds the one KV head its query heads read, so ``tp / num_kv_heads`` ranks
hold a copy of each (Megatron's and vLLM's replication).
"""

from __future__ import annotations

from dataclasses import dataclass

from engine.config import ParallelConfig


def rank_of(parallel: ParallelConfig, stage: int, tp_rank: int) -> int:
    return stage * parallel.tp + tp_rank


def coords(parallel: ParallelConfig, rank: int) -> tuple[int, int]:
    """(stage, tp_rank) of ``rank``."""
    if not 0 <= rank < parallel.world_size:
        raise ValueError(f"rank: must be in [0, {parallel.world_size}), got {rank}")
    return divmod(rank, parallel.tp)


def stage_layers(num_layers: int, pp: int, stage: int) -> range:
    """The global layer indices pipeline stage ``stage`` of ``pp`` runs."""
    if not 0 < pp <= num_layers:
        raise ValueError(f"pp: must be in [1, num_layers={num_layers}], got {pp}")
    base, extra = divmod(num_layers, pp)
    first_long = pp - extra  # stages from here on hold base + 1 layers
    start = stage * base + max(0, stage - first_long)
    return range(start, start + base + (1 if stage >= first_long else 0))


def q_heads(num_heads: int, tp: int, tp_rank: int) -> range:
    """The query heads TP rank ``tp_rank`` of ``tp`` computes."""
    if num_heads % tp:
        raise ValueError(f"tp: must divide num_heads={num_heads}, got {tp}")
    per = num_heads // tp
    return range(tp_rank * per, (tp_rank + 1) * per)


def kv_heads(num_kv_heads: int, tp: int, tp_rank: int) -> range:
    """The KV heads TP rank ``tp_rank`` of ``tp`` holds (one, replicated, when tp > kv)."""
    if num_kv_heads % tp == 0:
        per = num_kv_heads // tp
        return range(tp_rank * per, (tp_rank + 1) * per)
    if tp % num_kv_heads == 0:
        head = tp_rank // (tp // num_kv_heads)
        return range(head, head + 1)
    raise ValueError(
        f"tp: must divide num_kv_heads={num_kv_heads} or be a multiple of it, got {tp}"
    )


def vocab_shard(vocab_size: int, tp: int, tp_rank: int) -> tuple[range, int]:
    """The vocabulary rows of TP rank ``tp_rank``'s LM head, and the padded shard size.

    Every shard has ``ceil(V / tp)`` rows so that one all-gather of equal pieces
    rebuilds the logits; the last shard pads with zero rows, cut off after the gather.
    """
    per = -(-vocab_size // tp)
    start = min(tp_rank * per, vocab_size)
    return range(start, min(start + per, vocab_size)), per


@dataclass(frozen=True)
class KVPull:
    """One piece of a destination rank's KV cache: some layers and KV heads of every
    block, read from one source rank. Ranges are global model indices, and the same
    layers and heads as indexed in the source's and the destination's own caches."""

    src_rank: int
    layers: range
    kv_heads: range
    src_layers: range
    src_kv_heads: range
    dst_layers: range
    dst_kv_heads: range


def kv_transfer_plan(
    src: ParallelConfig, dst: ParallelConfig, num_layers: int, num_kv_heads: int
) -> list[list[KVPull]]:
    """For each destination rank (stage-major), the pulls that fill its KV cache.

    Each destination rank's pulls cover exactly its layers x its KV heads, once each,
    ordered by source stage then head. When the source replicates a KV head (``tp >
    num_kv_heads``) any copy would do; destination TP rank ``t`` reads copy
    ``t % copies``, so neighbouring destination ranks spread over the source's copies.
    """
    for name, layout in (("src", src), ("dst", dst)):
        try:
            stage_layers(num_layers, layout.pp, 0)
            kv_heads(num_kv_heads, layout.tp, 0)
        except ValueError as err:
            raise ValueError(f"{name}.{err}") from None
    plan: list[list[KVPull]] = []
    for rank in range(dst.world_size):
        d_stage, d_tp = coords(dst, rank)
        d_layers = stage_layers(num_layers, dst.pp, d_stage)
        d_heads = kv_heads(num_kv_heads, dst.tp, d_tp)
        pulls: list[KVPull] = []
        for s_stage in range(src.pp):
            s_layers = stage_layers(num_layers, src.pp, s_stage)
            layers = range(max(d_layers.start, s_layers.start), min(d_layers.stop, s_layers.stop))
            if not layers:
                continue
            for s_tp, heads in _head_sources(num_kv_heads, src.tp, d_heads, d_tp):
                s_heads = kv_heads(num_kv_heads, src.tp, s_tp)
                pulls.append(
                    KVPull(
                        src_rank=rank_of(src, s_stage, s_tp),
                        layers=layers,
                        kv_heads=heads,
                        src_layers=_shift(layers, s_layers.start),
                        src_kv_heads=_shift(heads, s_heads.start),
                        dst_layers=_shift(layers, d_layers.start),
                        dst_kv_heads=_shift(heads, d_heads.start),
                    )
                )
        plan.append(pulls)
    return plan


def _head_sources(
    num_kv_heads: int, src_tp: int, heads: range, dst_tp_rank: int
) -> list[tuple[int, range]]:
    """Split ``heads`` into runs held by one source TP rank: [(src tp_rank, heads)]."""
    runs: list[tuple[int, range]] = []
    for h in heads:
        owner = _owner(num_kv_heads, src_tp, h, dst_tp_rank)
        if runs and runs[-1][0] == owner:
            runs[-1] = (owner, range(runs[-1][1].start, h + 1))
        else:
            runs.append((owner, range(h, h + 1)))
    return runs


def _owner(num_kv_heads: int, src_tp: int, head: int, dst_tp_rank: int) -> int:
    """The source TP rank a destination TP rank reads KV head ``head`` from."""
    if num_kv_heads % src_tp == 0:
        return head // (num_kv_heads // src_tp)
    copies = src_tp // num_kv_heads
    return head * copies + dst_tp_rank % copies


def _shift(r: range, offset: int) -> range:
    return range(r.start - offset, r.stop - offset)
