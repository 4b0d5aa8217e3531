"""Fixtures shared across test packages: one local Ray for the whole session."""

from __future__ import annotations

from collections.abc import Iterator

import pytest


@pytest.fixture(scope="session")
def ray_session() -> Iterator[None]:
    """An embedded local Ray with more logical CPUs than cores, so that clusters of up to
    four instances fit (they share the machine's cores). ``address="local"``: never a
    ``ray start`` cluster that happens to run on this machine."""
    import ray

    ray.init(address="local", num_cpus=8, include_dashboard=False, object_store_memory=128 << 20)
    yield
    ray.shutdown()
