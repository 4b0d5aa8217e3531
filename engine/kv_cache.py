"""The KV cache tensors: one key and one value tensor per layer, carved into blocks.

Sized by a :class:`KVShape`, which is the whole model in one process and, in a TP x PP
instance, one rank's share: its stage's layers and its KV heads (``engine.parallel``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.attention import AttentionBackend, KVCache
from engine.config import CacheConfig, ModelConfig

# When neither a block count nor a memory fraction is given on CPU, use this many bytes:
# about 45k tokens of SmolLM2's KV, without claiming most of a shared machine.
DEFAULT_CPU_CACHE_BYTES = 2 << 30


@dataclass(frozen=True)
class KVShape:
    """What one process's KV cache holds per token: layers x KV heads x head_dim."""

    num_layers: int
    num_kv_heads: int
    head_dim: int

    @classmethod
    def of(cls, model: ModelConfig) -> KVShape:
        """The whole model's: a single-process engine holds every layer and head."""
        return cls(model.num_layers, model.num_kv_heads, model.head_dim)


def bytes_per_block(shape: KVShape, block_size: int, dtype: torch.dtype) -> int:
    elem = torch.empty((), dtype=dtype).element_size()
    return 2 * shape.num_layers * block_size * shape.num_kv_heads * shape.head_dim * elem


def num_blocks_for(
    shape: KVShape, cache: CacheConfig, dtype: torch.dtype, device: torch.device
) -> int:
    if cache.num_blocks is not None:
        return cache.num_blocks
    per_block = bytes_per_block(shape, cache.block_size, dtype)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return max(1, int(free * (cache.memory_fraction or 0.9)) // per_block)
    if cache.memory_fraction is None:
        return max(1, DEFAULT_CPU_CACHE_BYTES // per_block)
    return max(1, int(_available_memory() * cache.memory_fraction) // per_block)


def _available_memory() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 4 << 30


def allocate_kv_cache(
    shape: KVShape,
    num_blocks: int,
    block_size: int,
    dtype: torch.dtype,
    device: torch.device,
    backend: AttentionBackend,
) -> list[KVCache]:
    dims = backend.cache_shape(num_blocks, block_size, shape.num_kv_heads, shape.head_dim)
    return [
        KVCache(
            torch.zeros(dims, dtype=dtype, device=device),
            torch.zeros(dims, dtype=dtype, device=device),
        )
        for _ in range(shape.num_layers)
    ]
