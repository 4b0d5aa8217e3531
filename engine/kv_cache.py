"""The KV cache tensors: one key and one value tensor per layer, carved into blocks."""

from __future__ import annotations

import torch

from engine.attention import AttentionBackend, KVCache
from engine.config import CacheConfig, ModelConfig

# When neither a block count nor a memory fraction is given on CPU, use this many bytes:
# about 45k tokens of SmolLM2's KV, without claiming most of a shared machine.
DEFAULT_CPU_CACHE_BYTES = 2 << 30


def bytes_per_block(model: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
    elem = torch.empty((), dtype=dtype).element_size()
    return 2 * model.num_layers * block_size * model.num_kv_heads * model.head_dim * elem


def num_blocks_for(
    model: ModelConfig, cache: CacheConfig, dtype: torch.dtype, device: torch.device
) -> int:
    if cache.num_blocks is not None:
        return cache.num_blocks
    per_block = bytes_per_block(model, cache.block_size, dtype)
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
    model: ModelConfig,
    num_blocks: int,
    block_size: int,
    dtype: torch.dtype,
    device: torch.device,
    backend: AttentionBackend,
) -> list[KVCache]:
    shape = backend.cache_shape(num_blocks, block_size, model.num_kv_heads, model.head_dim)
    return [
        KVCache(
            torch.zeros(shape, dtype=dtype, device=device),
            torch.zeros(shape, dtype=dtype, device=device),
        )
        for _ in range(model.num_layers)
    ]
