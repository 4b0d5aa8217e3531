"""The KV transfer benchmark's cases and its child processes (the far end of each link).

``python -m bench.kv_peers BACKEND MODELS TOKENS CHUNK_BYTES THREADS [HOST]`` runs a sender of
BACKEND for every model, with every case published, prints ``{"endpoints": {...}}`` and
then takes ``{"op": "send", ...}`` or ``{"op": "stop"}`` lines on stdin; BACKEND ``raw``
instead serves byte counts asked for on a plain socket (``{"port": ...}``). Only plain
JSON values cross the process boundary. HOST (default loopback) is the address its
listeners bind: another network namespace's, with ``kv_transfer --hosts``.
"""

from __future__ import annotations

import json
import math
import queue
import socket
import subprocess
import sys
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import IO, Any

import torch

from engine.attention import KVCache
from engine.kv_blocks import HEAD_MAJOR, KVBlocks, KVLayout
from kv_transfer import KVDescriptor, TransferConfig, create_sender

BLOCK_SIZE = 16
PEER_TIMEOUT_S = 120.0


@dataclass(frozen=True)
class Model:
    name: str
    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: str

    def layout(self) -> KVLayout:
        return KVLayout(
            self.num_layers, BLOCK_SIZE, self.num_kv_heads, self.head_dim, self.dtype, HEAD_MAJOR
        )


MODELS = {
    "smollm2-135m": Model("smollm2-135m", 30, 3, 64, "float32"),
    "llama3-8b": Model("llama3-8b", 32, 8, 128, "float16"),
}


def make_blocks(model: Model, num_blocks: int, fill: bool) -> KVBlocks:
    layout = model.layout()
    shape = layout.block_shape(num_blocks)

    def tensor() -> torch.Tensor:
        if fill:
            return torch.randn(shape).to(layout.torch_dtype)
        return torch.zeros(shape, dtype=layout.torch_dtype)

    return KVBlocks([KVCache(tensor(), tensor()) for _ in range(model.num_layers)], layout)


def descriptor(model: Model, tokens: int) -> KVDescriptor:
    num_blocks = math.ceil(tokens / BLOCK_SIZE)
    return KVDescriptor(f"{model.name}-{tokens}", tokens, tuple(range(num_blocks)), model.layout())


def run_peer(
    backend: str, models: list[Model], tokens: list[int], chunk_bytes: int, host: str
) -> int:
    """Senders of every model with every case published: endpoints out, JSON commands in."""
    config = TransferConfig(backend=backend, host=host, timeout_s=60.0, chunk_bytes=chunk_bytes)
    num_blocks = math.ceil(max(tokens) / BLOCK_SIZE)
    senders, endpoints = {}, {}
    for model in models:
        sender = create_sender(f"bench-{model.name}", make_blocks(model, num_blocks, True), config)
        endpoints[model.name] = sender.start()
        for t in tokens:
            sender.publish(descriptor(model, t))
        senders[model.name] = sender
    print(json.dumps({"endpoints": endpoints}), flush=True)
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd["op"] == "stop":
            break
        senders[cmd["model"]].send(cmd["request_id"], cmd["peer"])
    for sender in senders.values():
        sender.stop()
    return 0


def _raw_peer(max_bytes: int, host: str) -> int:
    payload = memoryview(bytearray(torch.randn(max_bytes // 4 + 1).numpy().tobytes()))
    with socket.create_server((host, 0)) as server:
        print(json.dumps({"port": server.getsockname()[1]}), flush=True)
        server.settimeout(PEER_TIMEOUT_S)
        conn, _ = server.accept()
        with conn:
            ask = memoryview(bytearray(8))
            while recv_into(conn, ask, 8) and (n := int.from_bytes(ask, "little")) > 0:
                conn.sendall(payload[:n])
    return 0


def recv_into(conn: socket.socket, buf: memoryview, n: int) -> int:
    """Fills ``buf[:n]`` from ``conn``; returns n."""
    got = 0
    while got < n:
        k = conn.recv_into(buf[got:n])
        if k == 0:
            raise ConnectionError(f"peer closed after {got} of {n} bytes")
        got += k
    return n


class Peer:
    """A child process running ``run_peer``; commands are JSON lines on its stdin."""

    def __init__(
        self,
        backend: str,
        models: str,
        tokens: str,
        chunk_bytes: int,
        threads: int,
        host: str = "127.0.0.1",
        prefix: Sequence[str] = (),
    ):
        """``prefix``: the command that runs it elsewhere (``ip netns exec NS``);
        ``host``: the address its listeners bind there."""
        argv = [backend, models, tokens, str(chunk_bytes), str(threads), host]
        cmd = [*prefix, sys.executable, "-m", "bench.kv_peers", *argv]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self._lines: queue.Queue[str] = queue.Queue()
        self._lock = threading.Lock()
        assert self.proc.stdout is not None
        threading.Thread(target=_pump, args=(self.proc.stdout, self._lines), daemon=True).start()
        self.hello: dict[str, Any] = json.loads(self._lines.get(timeout=PEER_TIMEOUT_S))

    def command(self, **cmd: Any) -> None:
        assert self.proc.stdin is not None
        with self._lock:
            self.proc.stdin.write(json.dumps(cmd) + "\n")
            self.proc.stdin.flush()

    def close(self) -> None:
        if self.proc.poll() is None and "endpoints" in self.hello:
            self.command(op="stop")
        try:
            self.proc.wait(timeout=PEER_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)


def _pump(stream: IO[str], lines: queue.Queue[str]) -> None:
    for line in stream:
        lines.put(line)


class RawLink:
    """The baseline: this process asks a child for n bytes on a plain loopback socket."""

    def __init__(self, max_bytes: int, host: str = "127.0.0.1", prefix: Sequence[str] = ()):
        self.peer = Peer("raw", "", str(max_bytes), 0, 1, host, prefix)
        address = (host, self.peer.hello["port"])
        self.conn = socket.create_connection(address, PEER_TIMEOUT_S)
        self.buf = memoryview(bytearray(max_bytes))

    def receive(self, nbytes: int) -> None:
        self.conn.sendall(nbytes.to_bytes(8, "little"))
        recv_into(self.conn, self.buf, nbytes)

    def close(self) -> None:
        self.conn.sendall((0).to_bytes(8, "little"))
        self.conn.close()
        self.peer.close()


def main(argv: list[str]) -> int:
    backend, models, tokens, chunk_bytes, threads = argv[:5]
    host = argv[5] if len(argv) > 5 else "127.0.0.1"
    torch.set_num_threads(int(threads))
    if backend == "raw":  # tokens: the largest byte count asked for
        return _raw_peer(int(tokens), host)
    return run_peer(
        backend,
        [MODELS[m] for m in models.split(",")],
        [int(t) for t in tokens.split(",")],
        int(chunk_bytes),
        host,
    )


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
