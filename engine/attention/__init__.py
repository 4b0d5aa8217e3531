"""Attention backends over the paged KV cache, chosen once at start.

A backend turns the step's chunks into its own metadata (built once per step, shared by
every layer) and computes attention for a flat batch of tokens, writing the new keys
and values into the cache first.
"""

from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from engine.step import ScheduledChunk

logger = logging.getLogger(__name__)


@dataclass
class KVCache:
    """One layer's cache; the backend chooses the layout (see its ``cache_shape``)."""

    k: torch.Tensor
    v: torch.Tensor


class AttentionMetadata(Protocol):
    slot_mapping: torch.Tensor  # [T] flat cache slot of each token


class AttentionBackend(Protocol):
    name: str
    kv_order: str  # where the block index sits in a cache tensor; see engine.kv_blocks

    @staticmethod
    def cache_shape(
        num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int
    ) -> tuple[int, ...]: ...

    def build_metadata(
        self, chunks: list[ScheduledChunk], block_size: int, device: torch.device
    ) -> AttentionMetadata: ...

    # Each backend takes the metadata type its own build_metadata returned.
    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        cache: KVCache,
        meta: Any,
    ) -> torch.Tensor: ...


def flash_available() -> bool:
    return importlib.util.find_spec("vllm_flash_attn") is not None


def select_backend(
    name: str, device: torch.device, head_dim: int, dtype: torch.dtype = torch.float32
) -> AttentionBackend:
    """``auto``: vllm-flash-attn's paged kernels on CUDA when importable, else torch
    (with the compiled C decode kernel for fp32 and bf16 on CPU when a compiler is at
    hand)."""
    from engine import native
    from engine.attention.torch_paged import TorchPagedAttention

    if name == "auto":
        name = "flash" if device.type == "cuda" and flash_available() else "torch"
    if name == "flash":
        if device.type != "cuda" or not flash_available():
            raise ValueError(
                "attention_backend: 'flash' needs CUDA and the vllm-flash-attn package"
            )
        from engine.attention.flash import FlashAttention

        backend: AttentionBackend = FlashAttention(head_dim)
    else:
        use_native = device.type == "cpu" and native.supports(dtype)
        backend = TorchPagedAttention(head_dim, native.load() if use_native else None)
    logger.info("attention backend: %s on %s", describe(backend), device)
    return backend


def describe(backend: AttentionBackend) -> str:
    """The backend's name, with '+native' when the C decode kernel is in use."""
    return backend.name + ("+native" if getattr(backend, "native", None) is not None else "")


def slot_mapping(chunks: list[ScheduledChunk], block_size: int) -> list[int]:
    """The flat cache slot of every token in the step, in batch order."""
    slots: list[int] = []
    for c in chunks:
        for pos in range(c.start_pos, c.context_len):
            slots.append(c.block_table[pos // block_size] * block_size + pos % block_size)
    return slots


__all__ = [
    "AttentionBackend",
    "AttentionMetadata",
    "KVCache",
    "describe",
    "select_backend",
    "slot_mapping",
]
