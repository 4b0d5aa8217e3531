"""One real `baton serve` (launched from a plan file, so with its SLOs and predictions,
and with an API key) shared by the Prometheus and browser tests, traffic already
through it."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from cluster import cli
from tests.observability import served as served_mod


@pytest.fixture(scope="session")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[served_mod.Served]:
    plan = tmp_path_factory.mktemp("plan") / "plan.json"
    assert cli.main([*served_mod.PLAN_ARGS, "--out", str(plan)]) == 0
    s = served_mod.Served(plan)
    try:
        for i in range(6):
            assert s.complete(i, stream=i % 2 == 0) == 200
        yield s
    finally:
        s.stop()
