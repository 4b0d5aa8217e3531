"""The health monitor's reading of one round of pings, alone (``ray.get`` replaced by
the answers each ping gave, as Ray raises them); the real monitor runs in
tests/cluster/test_chaos.py."""

from __future__ import annotations

from typing import Any

import pytest
import ray.exceptions

from cluster import health


def _verdict(monkeypatch: pytest.MonkeyPatch, *answers: Any) -> str:
    def get(ref: Any, timeout: float | None = None) -> Any:
        if isinstance(ref, BaseException):
            raise ref
        return ref

    monkeypatch.setattr(health.ray, "get", get)
    return health._verdict(list(answers))


def test_a_ping_killed_by_rays_memory_monitor_means_the_process_is_gone(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    oom = ray.exceptions.OutOfMemoryError("1 worker(s) were killed")
    assert _verdict(monkeypatch, {"started": True}, oom) == "gone"
    assert _verdict(monkeypatch, oom, ray.exceptions.RayActorError()) == "dead"


def test_the_other_answers(monkeypatch: pytest.MonkeyPatch) -> None:
    assert _verdict(monkeypatch, {"started": True}, {"started": True}) == "started"
    assert _verdict(monkeypatch, {"started": True}, {"started": False}) == "fresh"
    assert _verdict(monkeypatch, ray.exceptions.GetTimeoutError(), {"started": True}) == "miss"


def test_a_live_process_whose_worker_loop_died_is_broken(monkeypatch: pytest.MonkeyPatch) -> None:
    dead_loop = {"started": True, "loop": False}
    assert _verdict(monkeypatch, dead_loop) == "broken"
    assert _verdict(monkeypatch, {"started": True}, dead_loop) == "broken"
    assert _verdict(monkeypatch, dead_loop, ray.exceptions.GetTimeoutError()) == "miss"
    assert _verdict(monkeypatch, dead_loop, ray.exceptions.RayActorError()) == "dead"
    # Not started yet: nothing to judge the loop by.
    assert _verdict(monkeypatch, {"started": False, "loop": True}) == "fresh"
