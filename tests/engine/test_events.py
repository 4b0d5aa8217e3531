"""Token event frames: msgpack round trip, and malformed frames refused by name."""

from __future__ import annotations

import msgpack
import pytest

from engine.events import TokenEvent, decode, encode


def test_an_event_survives_the_round_trip() -> None:
    event = TokenEvent(
        "r1",
        3,
        [5, 6],
        "ab",
        "stop",
        "decode-0",
        [[(5, -0.5)], [(6, -1.25)]],
        10,
        4,
        {"kv_transfer": 0.01},
        None,
    )
    assert decode(encode(event)) == event
    bare = TokenEvent("r2", 0, [1])
    assert decode(encode(bare)) == bare


@pytest.mark.parametrize(
    "frame",
    [
        b"\xc1",
        msgpack.packb({"r": "x"}),
        msgpack.packb([1, 2]),
        msgpack.packb({"r": "x", "i": "no", "t": [], "x": "", "s": "", "p": 0, "c": 0, "m": {}}),
    ],
)
def test_malformed_frames_raise_value_error(frame: bytes) -> None:
    with pytest.raises(ValueError, match="token event"):
        decode(frame)


def test_frames_are_msgpack_not_pickle() -> None:
    frame = encode(TokenEvent("r", 0, [1]))
    assert isinstance(msgpack.unpackb(frame), dict)
