"""LeaseTable with an injected clock: exact expiry, renewal and ending."""

from __future__ import annotations

import pytest

from kv_transfer.lease import LeaseTable


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_leases_expire_after_their_ttl_unless_renewed() -> None:
    clock = Clock()
    table = LeaseTable(ttl_s=10, clock=clock)
    table.grant("a", [1, 2])
    table.grant("b", [3])
    clock.now = 105
    assert table.renew(["b", "unknown"]) == 1
    clock.now = 110
    expired = table.expire()
    assert [(x.request_id, x.block_ids) for x in expired] == [("a", [1, 2])]
    assert "a" not in table and "b" in table and table.num_expired == 1
    clock.now = 114.9
    assert table.expire() == []
    clock.now = 115
    assert [x.request_id for x in table.expire()] == ["b"]
    assert len(table) == 0


def test_ending_a_lease_returns_its_blocks_once() -> None:
    table = LeaseTable(ttl_s=1, clock=Clock())
    table.grant("a", [4, 5])
    assert table.num_blocks == 2
    lease = table.end("a")
    assert lease is not None and lease.block_ids == [4, 5]
    assert table.end("a") is None and table.num_blocks == 0


def test_bad_arguments_name_the_field() -> None:
    with pytest.raises(ValueError, match="lease_ttl_s"):
        LeaseTable(ttl_s=0)
    table = LeaseTable()
    table.grant("a", [1])
    with pytest.raises(ValueError, match="request_id"):
        table.grant("a", [2])
