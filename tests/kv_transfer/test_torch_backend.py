"""torch backend: pairs made and remade on demand, the push handshake."""

from __future__ import annotations

import pytest

from kv_transfer import TransferError, TransferStatus
from tests.kv_transfer.conftest import MakeLink
from tests.kv_transfer.helpers import assert_moved, descriptor


def test_a_failed_pair_is_replaced_by_a_fresh_one(make_link: MakeLink) -> None:
    link = make_link("torch", timeout_s=1.0)
    desc = descriptor(link.src, "r1", [1, 2, 3])
    link.sender.publish(desc)
    dropped: list[dict[str, str]] = []

    # The control plane loses the request: the receiver gives up after timeout_s.
    res = link.receiver.pull(desc, link.source, [4, 5, 6], lambda _rid, peer: dropped.append(peer))
    assert res.status is TransferStatus.FAILED

    res = link.pull(desc, [4, 5, 6])
    assert res.status is TransferStatus.DONE, res.error
    assert_moved(link.src, [1, 2, 3], link.dst, [4, 5, 6])
    assert dropped[0]["pair"].endswith("/1") and link.sends[0][1]["pair"].endswith("/2")
    # The healthy pair is reused.
    assert link.pull(desc, [7, 8, 9]).status is TransferStatus.DONE
    assert link.sends[1][1]["pair"] == link.sends[0][1]["pair"]


def test_request_send_errors_fail_the_pull(make_link: MakeLink) -> None:
    link = make_link("torch")
    desc = descriptor(link.src, "r1", [1, 2])
    link.sender.publish(desc)

    def broken(_rid: str, _peer: dict[str, str]) -> None:
        raise ConnectionError("actor unreachable")

    res = link.receiver.pull(desc, link.source, [3, 4], broken)
    assert res.status is TransferStatus.FAILED
    assert "request_send failed: actor unreachable" in (res.error or "")
    res = link.receiver.pull(desc, link.source, [3, 4])
    assert res.status is TransferStatus.FAILED and "needs request_send" in (res.error or "")
    assert link.pull(desc, [3, 4]).status is TransferStatus.DONE


def test_peer_info_is_plain_strings(make_link: MakeLink) -> None:
    link = make_link("torch", checksum=True)
    desc = descriptor(link.src, "r1", [1, 2])
    link.sender.publish(desc)

    assert link.pull(desc, [3, 4]).status is TransferStatus.DONE

    ((rid, peer),) = link.sends
    assert rid == "r1"
    assert set(peer) == {"store", "pair", "nbytes", "num_blocks", "checksum"}
    assert all(isinstance(v, str) for v in peer.values())
    assert link.rx_endpoint == "torch://" + peer["store"]
    assert peer["nbytes"] == str(desc.nbytes) and peer["checksum"] == "1"


def test_sender_rejects_bad_sends(make_link: MakeLink) -> None:
    link = make_link("torch")
    with pytest.raises(ValueError, match="peer: missing 'pair'"):
        link.sender.send("r1", {"store": "127.0.0.1:1"})
    link.sender.stop()
    with pytest.raises(TransferError, match="stopped"):
        link.sender.send(
            "r1", {k: "1" for k in ("store", "pair", "nbytes", "num_blocks", "checksum")}
        )
