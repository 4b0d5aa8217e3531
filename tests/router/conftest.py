"""One cluster and router for all the router tests: 1 prefill + 1 decode instance of the
default model over the torch transport, on the session's local Ray. Also an HTTP server
on it per module, with the official ``openai`` client and the cluster's vocabulary, for
the modules that use them (a module with a ``server`` of its own overrides this one)."""

from __future__ import annotations

from collections.abc import Iterator

import openai
import pytest

from cluster import Cluster
from router.service import Router
from router.vocabulary import Vocabulary
from tests.router.servers import HttpServerThread


@pytest.fixture(scope="session")
def cluster(ray_session: None) -> Iterator[Cluster]:
    with Cluster(num_kv_blocks=1024, cpus_per_instance=1) as c:
        yield c


@pytest.fixture(scope="session")
def router(cluster: Cluster) -> Router:
    return Router(cluster)


@pytest.fixture(scope="module")
def server(cluster: Cluster) -> Iterator[HttpServerThread]:
    st = HttpServerThread(Router(cluster), metrics=None)
    yield st
    st.stop()


@pytest.fixture(scope="module")
def client(server: HttpServerThread) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="x", max_retries=0)


@pytest.fixture(scope="module")
def vocab(cluster: Cluster) -> Vocabulary:
    return Vocabulary.from_spec(cluster.tokenizer_spec())
