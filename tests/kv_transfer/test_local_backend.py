"""local backend: the in-process registry of senders."""

from __future__ import annotations

import pytest

from kv_transfer import TransferConfig, TransferError, TransferStatus, create_sender
from tests.kv_transfer.conftest import MakeLink
from tests.kv_transfer.helpers import descriptor, make_blocks


def test_endpoint_is_the_name_and_taken_once(make_link: MakeLink) -> None:
    link = make_link("local")
    assert link.source == "local://tx0"
    twin = create_sender("tx0", make_blocks(), TransferConfig("local"))
    with pytest.raises(TransferError, match="another local sender"):
        twin.start()
    assert link.sender.start() == "local://tx0"  # starting twice is harmless


def test_stopped_or_unknown_sender_fails_the_pull(make_link: MakeLink) -> None:
    link = make_link("local")
    desc = descriptor(link.src, "r1", [1, 2])
    link.sender.publish(desc)
    link.sender.stop()

    res = link.pull(desc, [3, 4])
    other = link.receiver.pull(desc, "local://nobody", [3, 4])

    assert res.status is TransferStatus.FAILED and "no local sender" in (res.error or "")
    assert other.status is TransferStatus.FAILED
