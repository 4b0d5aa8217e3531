"""A sender in a process of its own, driven by JSON lines: the tests' prefill instance.

``python -m tests.kv_transfer.sender_proc BACKEND SEED`` prints ``{"endpoint": ...}``, then
reads one command per line and answers ``{"ok": true}`` once done, except ``send``, which
only queues the push (as the control plane's call must return at once):

- ``{"op": "publish", "request_id": ..., "block_ids": [...]}``
- ``{"op": "send", "request_id": ..., "peer": {...}}``
- ``{"op": "retract", "request_id": ...}``
- ``{"op": "stop"}``

Its blocks are ``helpers.make_blocks(seed=SEED)``, so the test can rebuild them.
"""

from __future__ import annotations

import json
import sys

from kv_transfer import TransferConfig, create_sender
from tests.kv_transfer.helpers import descriptor, make_blocks


def main(argv: list[str]) -> int:
    backend, seed = argv[0], int(argv[1])
    blocks = make_blocks(seed=seed)
    sender = create_sender("proc", blocks, TransferConfig(backend=backend, timeout_s=10.0))
    print(json.dumps({"endpoint": sender.start()}), flush=True)
    for line in sys.stdin:
        cmd = json.loads(line)
        op = cmd["op"]
        if op == "publish":
            sender.publish(descriptor(blocks, cmd["request_id"], cmd["block_ids"]))
        elif op == "send":
            sender.send(cmd["request_id"], cmd["peer"])
            continue
        elif op == "retract":
            sender.retract(cmd["request_id"])
        elif op == "stop":
            break
        print(json.dumps({"ok": True}), flush=True)
    sender.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
