"""Tensor parallelism applied to a built, loaded model (gpt-fast / Megatron style).

The model is a plain ``nn.Module`` that knows nothing of distribution; ``shard_model``
cuts its weights in place afterwards, so the single-process model runs unchanged:

- ``qkv_proj`` and ``gate_up_proj`` are column-parallel: each rank keeps the rows of its
  query heads, its KV heads (see ``layout.kv_heads``: replicated past the KV head count)
  and its slice of the MLP's intermediate dimension. Attention is per head, so it runs
  locally on a rank's heads and its share of the KV cache.
- ``o_proj`` and ``down_proj`` are row-parallel: each rank keeps the matching input
  columns, so its output is a partial sum, completed by an all-reduce (a forward hook,
  the only communication inside a layer: two all-reduces of ``[T, D]`` per layer).
- The LM head is sharded over the vocabulary and its logits all-gathered. It is a fifth
  of SmolLM2's FLOPs and its weights are read in full every decode step; sharding divides
  both by ``tp``, for one gather of ``[N, V]`` (N = sampled rows, not tokens).
- The embedding is replicated: a lookup costs nothing, where a vocabulary-parallel
  embedding would add an all-reduce of ``[T, D]`` per step. With tied embeddings the
  LM head shard is a view of it, so it costs no memory either (while the model stays
  on the device it was cut on: the worker cuts on the CPU, and moving it to a GPU
  copies the V / tp rows).

Layers without bias on the row-parallel side are assumed (Llama, Mistral, Qwen2 all are).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed import ProcessGroup

from engine.models.llama import MLP, Attention, Linear
from engine.parallel.layout import kv_heads, q_heads, vocab_shard


@torch.no_grad()
def shard_model(model: nn.Module, rank: int, world: int, group: ProcessGroup | None) -> nn.Module:
    """Keep TP rank ``rank`` of ``world``'s share of ``model``'s weights, in place.

    ``group`` is the TP process group (a ``torch.distributed`` ``ProcessGroup``). With
    ``world == 1`` nothing changes at all: no hook, no extra op. Returns ``model``.
    """
    if world == 1:
        return model
    for module in list(model.modules()):
        if isinstance(module, Attention):
            _shard_attention(module, rank, world, group)
        elif isinstance(module, MLP):
            _shard_mlp(module, rank, world, group)
    head = getattr(model, "lm_head", None)
    if isinstance(head, Linear):
        embed = getattr(model, "embed_tokens", None)
        tied = isinstance(embed, nn.Embedding) and embed.weight is head.weight
        _shard_lm_head(head, rank, world, group, tied)
    return model


def _shard_attention(attn: Attention, rank: int, world: int, group: ProcessGroup | None) -> None:
    dh = attn.head_dim
    q, kv = q_heads(attn.num_heads, world, rank), kv_heads(attn.num_kv_heads, world, rank)
    # qkv_proj rows: [q heads | k heads | v heads], each head dh rows.
    k_start, v_start = attn.q_size, attn.q_size + attn.kv_size
    rows = torch.cat(
        [
            torch.arange(q.start * dh, q.stop * dh),
            torch.arange(k_start + kv.start * dh, k_start + kv.stop * dh),
            torch.arange(v_start + kv.start * dh, v_start + kv.stop * dh),
        ]
    )
    _keep_rows(attn.qkv_proj, rows)
    _keep_columns(attn.o_proj, range(q.start * dh, q.stop * dh))
    attn.o_proj.register_forward_hook(_all_reduce_hook(group))
    attn.num_heads, attn.num_kv_heads = len(q), len(kv)
    attn.q_size, attn.kv_size = len(q) * dh, len(kv) * dh


def _shard_mlp(mlp: MLP, rank: int, world: int, group: ProcessGroup | None) -> None:
    size = mlp.intermediate_size
    if size % world:
        raise ValueError(f"tp: must divide intermediate_size={size}, got {world}")
    per = size // world
    cols = range(rank * per, (rank + 1) * per)
    # gate_up_proj rows: [gate | up], each `size` rows.
    gate = torch.arange(cols.start, cols.stop)
    rows = torch.cat([gate, gate + size])
    _keep_rows(mlp.gate_up_proj, rows)
    _keep_columns(mlp.down_proj, cols)
    mlp.down_proj.register_forward_hook(_all_reduce_hook(group))
    mlp.intermediate_size = per


def _shard_lm_head(
    head: Linear, rank: int, world: int, group: ProcessGroup | None, tied: bool
) -> None:
    vocab = head.out_features
    rows, per = vocab_shard(vocab, world, rank)
    weight = head.weight.narrow(0, rows.start, len(rows))  # [V / tp, D]
    if len(rows) < per:
        weight = torch.cat([weight, weight.new_zeros(per - len(rows), weight.shape[1])])
    elif not tied:
        weight = weight.clone()  # a view would keep the whole untied head alive
    head.weight = nn.Parameter(weight, requires_grad=False)
    head.out_features = per
    head.register_forward_hook(_gather_vocab_hook(group, world, vocab))


def _keep_rows(linear: Linear, rows: torch.Tensor) -> None:
    linear.weight = nn.Parameter(linear.weight.index_select(0, rows), requires_grad=False)
    if linear.bias is not None:
        linear.bias = nn.Parameter(linear.bias.index_select(0, rows), requires_grad=False)
    linear.out_features = len(rows)


def _keep_columns(linear: Linear, cols: range) -> None:
    weight = linear.weight.narrow(1, cols.start, len(cols)).contiguous()
    linear.weight = nn.Parameter(weight, requires_grad=False)
    linear.in_features = len(cols)


# A forward hook: (module, args, output) -> the output to use instead.
HookFn = Callable[[nn.Module, tuple[torch.Tensor, ...], torch.Tensor], torch.Tensor]


def _all_reduce_hook(group: ProcessGroup | None) -> HookFn:
    def hook(module: nn.Module, args: tuple[torch.Tensor, ...], out: torch.Tensor) -> torch.Tensor:
        # out: [T, D], this rank's partial sum over its heads or intermediate columns
        dist.all_reduce(out, group=group)
        return out

    return hook


def _gather_vocab_hook(group: ProcessGroup | None, world: int, vocab: int) -> HookFn:
    def hook(module: nn.Module, args: tuple[torch.Tensor, ...], out: torch.Tensor) -> torch.Tensor:
        # out: [N, V / tp] -> [N, V], every rank's shard side by side, padding cut off
        parts = [torch.empty_like(out) for _ in range(world)]
        dist.all_gather(parts, out.contiguous(), group=group)
        logits = torch.cat(parts, dim=1)
        return logits if logits.shape[1] == vocab else logits[:, :vocab].contiguous()

    return hook
