"""Fixtures shared across test packages: one local Ray for the whole session, and one
`baton plan` (``tests/plans.py``)."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest

from tests.memory import give_back_freed_heap
from tests.plans import PLAN_ARGS


@pytest.fixture(scope="session")
def ray_session() -> Iterator[None]:
    """An embedded local Ray with more logical CPUs than cores, so that clusters of up to
    four instances fit (they share the machine's cores). ``address="local"``: never a
    ``ray start`` cluster that happens to run on this machine."""
    import ray

    from cluster.ray_connect import EMBEDDED_SYSTEM_CONFIG

    ray.init(address="local", num_cpus=8, include_dashboard=False, object_store_memory=128 << 20,
             _system_config=EMBEDDED_SYSTEM_CONFIG)
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def llama13b_plan(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The text of the plan file `baton plan` writes for ``PLAN_ARGS`` (tests/plans.py)."""
    from cluster import cli

    out = tmp_path_factory.mktemp("plan") / "plan.json"
    assert cli.main([*PLAN_ARGS, "--out", str(out)]) == 0
    return out.read_text()


@pytest.fixture(scope="module", autouse=True)
def _free_heap_after_module() -> Iterator[None]:
    """After each module: collect what it dropped and give the freed heap back
    (``give_back_freed_heap``), so no module's leftovers weigh on the next."""
    yield
    gc.collect()
    give_back_freed_heap()
