"""Engine test fixtures: engines are built once for the engine tests and checked after
every test; they are dropped when the engine tests end (each SmolLM2 engine holds a 2 GiB
KV cache, and the cluster and serving tests after them start several more processes).

Every engine a test used must end the test with nothing running and every KV block
free again (cached prefix blocks count as free: they are evictable).
"""

from __future__ import annotations

import gc
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from engine import LLM
from tests.memory import give_back_freed_heap

_ENGINES: dict[tuple[Any, ...], LLM] = {}


# 1024 blocks of 16 tokens (750 MiB for SmolLM2) hold every engine test's requests with
# room to spare; the default (2 GiB on CPU) times the dozen engines built here came to
# over 20 GiB.
TEST_KV_BLOCKS = 1024


def get_llm(model: str | None = None, **kwargs: Any) -> LLM:
    kwargs.setdefault("num_kv_blocks", TEST_KV_BLOCKS)
    key = (model, tuple(sorted(kwargs.items())))
    if key not in _ENGINES:
        _ENGINES[key] = LLM(model, **kwargs)
    return _ENGINES[key]


@pytest.fixture(scope="package", autouse=True)
def _drop_engines() -> Iterator[None]:
    yield
    _ENGINES.clear()
    gc.collect()
    give_back_freed_heap()


@pytest.fixture
def make_llm() -> Callable[..., LLM]:
    return get_llm


@pytest.fixture(scope="package")
def smollm() -> LLM:
    return get_llm(None)


@pytest.fixture(autouse=True)
def _kv_blocks_released() -> Iterator[None]:
    yield
    for llm in _ENGINES.values():
        engine = llm.engine
        stats = engine.stats()
        leaked = (stats.num_waiting, stats.num_running, stats.total_blocks - stats.free_blocks)
        for request_id in list(engine._states):  # leave the next test a clean engine
            engine.abort(request_id)
        assert leaked == (0, 0, 0), f"(waiting, running, blocks in use) after the test: {leaked}"
