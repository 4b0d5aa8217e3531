"""The controller's steps (cluster.control) against a fake cluster: scale up and down,
cordon, drain (wait, migrate at the timeout, remove), and the refusals. The real cluster
is exercised by tests/cluster/test_admin_cli.py and test_chaos.py."""

from __future__ import annotations

import time

import pytest

from cluster.control import Controller
from router.metrics import RouterMetrics


class FakeOps:
    def __init__(self, roles: dict[str, str]):
        self.roles = dict(roles)
        self.busy: dict[str, int] = {}
        self.migrated: list[tuple[str, str]] = []
        self.added: list[str] = []

    def running(self) -> dict[str, str]:
        return dict(self.roles)

    def in_flight(self, name: str) -> int:
        return self.busy.get(name, 0)

    def add_instance(self, role: str) -> str:
        name = f"{role}-{len(self.roles)}"
        self.roles[name] = role
        self.added.append(name)
        return name

    def migrate_all(self, name: str, cause: str) -> int:
        self.migrated.append((name, cause))
        n, self.busy[name] = self.busy.get(name, 0), 0
        return n

    def remove_instance(self, name: str) -> None:
        self.roles.pop(name, None)


def _settle(c: Controller, steps: int = 10) -> None:
    for _ in range(steps):
        if not c.reconcile():
            return


def test_scale_up_adds_one_instance_per_step() -> None:
    ops = FakeOps({"prefill-0": "prefill", "decode-0": "decode"})
    c = Controller(ops, {"prefill": 1, "decode": 1})
    c.scale({"decode": 3})
    assert c.reconcile() and len(ops.added) == 1
    _settle(c)
    assert sorted(r for r in ops.roles.values()) == ["decode"] * 3 + ["prefill"]
    assert c.states({n: "serving" for n in ops.roles}) == dict.fromkeys(ops.roles, "ready")


def test_scale_down_drains_the_cordoned_one_first() -> None:
    ops = FakeOps({"prefill-0": "prefill", "decode-0": "decode", "decode-1": "decode"})
    c = Controller(ops, {"prefill": 1, "decode": 2})
    c.cordon("decode-1")
    c.scale({"decode": 1}, drain_timeout_s=0)
    _settle(c)
    assert set(ops.roles) == {"prefill-0", "decode-0"}
    assert c.cordoned == set()


def test_drain_waits_for_requests_then_migrates_at_the_timeout() -> None:
    ops = FakeOps({"prefill-0": "prefill", "decode-0": "decode", "decode-1": "decode"})
    c = Controller(ops, {"prefill": 1, "decode": 2})
    ops.busy["decode-0"] = 2
    d = c.drain("decode-0", timeout_s=0.3)
    assert not c.routable("decode-0")
    assert c.states({n: "serving" for n in ops.roles})["decode-0"] == "draining"
    assert not c.reconcile()  # waiting: requests in flight, deadline not reached
    assert "decode-0" in ops.roles and not ops.migrated
    time.sleep(0.35)
    assert c.reconcile()
    assert ops.migrated == [("decode-0", "drained")] and d.migrated == 2
    assert d.done.is_set() and "decode-0" not in ops.roles
    assert c.desired["decode"] == 1  # it is not replaced
    _settle(c)
    assert set(ops.roles) == {"prefill-0", "decode-1"}


def test_a_drain_with_nothing_in_flight_removes_at_once() -> None:
    ops = FakeOps({"prefill-0": "prefill", "decode-0": "decode", "decode-1": "decode"})
    c = Controller(ops, {"prefill": 1, "decode": 2})
    d = c.drain("decode-1", timeout_s=30)
    assert c.reconcile() and d.done.is_set() and not ops.migrated


def test_refusals_name_the_fault() -> None:
    ops = FakeOps({"prefill-0": "prefill", "decode-0": "decode"})
    c = Controller(ops, {"prefill": 1, "decode": 1})
    with pytest.raises(KeyError, match="no instance named 'decode-7'"):
        c.cordon("decode-7")
    with pytest.raises(ValueError, match="last decode instance"):
        c.drain("decode-0")
    with pytest.raises(ValueError, match="timeout"):
        c.drain("decode-0", timeout_s=-1)
    with pytest.raises(ValueError, match="decode: must be a positive number"):
        c.scale({"decode": 0})
    ops.roles["decode-1"] = "decode"
    c.drain("decode-1", timeout_s=60)
    ops.busy["decode-1"] = 1
    with pytest.raises(ValueError, match="draining"):
        c.uncordon("decode-1")


def test_migration_counters_are_exported() -> None:
    m = RouterMetrics()
    m.migrations.model = "m"
    m.migrations.counters = {"migrations_dead": 3.0, "migrations_hung": 0.0,
                             "migration_failures": 1.0, "to_prefill": 2.0, "to_decode": 1.0,
                             "prefill_fallbacks": 1.0}  # fmt: skip
    text = m.render().decode()
    assert 'baton:request_migration_targets_total{model_name="m",target="prefill"} 2.0' in text
    assert 'baton:request_migration_targets_total{model_name="m",target="decode"} 1.0' in text
    assert 'baton:prefill_recompute_fallbacks_total{model_name="m"} 1.0' in text
    assert 'baton:request_migrations_total{cause="dead",model_name="m"} 3.0' in text
    assert 'baton:request_migration_failures_total{model_name="m"} 1.0' in text
