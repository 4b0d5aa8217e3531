"""Fixtures the cluster tests share: the offline engine whose greedy outputs a cluster
must reproduce, and the small 1 prefill + 1 decode cluster the fault tests stop, crash
and restart instances of (each module its own: a module's faults stay in it)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from cluster import Cluster
from engine import LLM


@pytest.fixture(scope="module")
def offline() -> LLM:
    return LLM(None)


@pytest.fixture(scope="module")
def one_each(ray_session: None) -> Iterator[Cluster]:
    """1 prefill + 1 decode instance, 256 KV blocks each, health checked every 0.5 s."""
    with Cluster(
        prefill=1, decode=1, num_kv_blocks=256, cpus_per_instance=1, health_interval_s=0.5
    ) as c:
        yield c
