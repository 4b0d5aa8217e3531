"""One cluster and router for all the router tests: 1 prefill + 1 decode instance of the
default model over the torch transport, on the session's local Ray."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from cluster import Cluster
from router.service import Router


@pytest.fixture(scope="session")
def cluster(ray_session: None) -> Iterator[Cluster]:
    with Cluster(num_kv_blocks=1024, cpus_per_instance=1) as c:
        yield c


@pytest.fixture(scope="session")
def router(cluster: Cluster) -> Router:
    return Router(cluster)
