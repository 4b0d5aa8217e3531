"""A started sender and receiver of one backend, stopped after the test."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import pytest

from engine.kv_blocks import KVBlocks
from kv_transfer import (
    KVDescriptor,
    KVReceiver,
    KVSender,
    TransferConfig,
    TransferResult,
    create_receiver,
    create_sender,
)
from tests.kv_transfer.helpers import make_blocks


@dataclass
class Link:
    """One sender and one receiver, wired as the control plane would wire them."""

    sender: KVSender
    receiver: KVReceiver
    source: str  # the sender's endpoint
    rx_endpoint: str = ""  # what the receiver's start() returned
    sends: list[tuple[str, dict[str, str]]] = field(default_factory=list)

    @property
    def src(self) -> KVBlocks:
        return self.sender.blocks

    @property
    def dst(self) -> KVBlocks:
        return self.receiver.blocks

    def request_send(self, request_id: str, peer: dict[str, str]) -> None:
        self.sends.append((request_id, peer))
        self.sender.send(request_id, peer)

    def pull(self, desc: KVDescriptor, dst_block_ids: Sequence[int]) -> TransferResult:
        return self.receiver.pull(desc, self.source, dst_block_ids, self.request_send)


MakeLink = Callable[..., Link]


@pytest.fixture
def make_link() -> Iterator[MakeLink]:
    started: list[Link] = []

    def make(
        backend: str,
        src: KVBlocks | None = None,
        dst: KVBlocks | None = None,
        rx_config: dict[str, Any] | None = None,
        **config: Any,
    ) -> Link:
        """``config`` for both sides, ``rx_config`` on top of it for the receiver."""
        both = {"backend": backend, "timeout_s": 10.0, **config}
        tx_cfg = TransferConfig(**both)
        rx_cfg = TransferConfig(**{**both, **(rx_config or {})})
        sender = create_sender(f"tx{len(started)}", src or make_blocks(seed=1), tx_cfg)
        receiver = create_receiver(f"rx{len(started)}", dst or make_blocks(seed=None), rx_cfg)
        link = Link(sender, receiver, sender.start())
        started.append(link)
        link.rx_endpoint = receiver.start()
        return link

    yield make
    for link in started:
        link.receiver.stop()
        link.sender.stop()
