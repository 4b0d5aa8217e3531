"""Transfer settings: one frozen dataclass, validated on construction."""

from __future__ import annotations

from dataclasses import dataclass

BACKENDS = ("torch", "grpc", "local")


@dataclass(frozen=True)
class TLSConfig:
    """PEM files for the grpc backend. Both sides need ``ca_file`` to verify the other."""

    cert_file: str
    key_file: str
    ca_file: str


@dataclass(frozen=True)
class TransferConfig:
    backend: str = "torch"
    # Address this instance's listeners bind and advertise (the node's IP on a cluster).
    host: str = "127.0.0.1"
    # Every wait (connect, each chunk) gives up after this long.
    timeout_s: float = 30.0
    # Bytes per message: the unit of pipelining and of the grpc stream.
    chunk_bytes: int = 4 << 20
    # Debugging: send a checksum of every chunk and verify it on receipt.
    checksum: bool = False
    # Tests: the share of pulls that fail on purpose before any byte moves (0 .. 1).
    fault_injection: float = 0.0
    tls: TLSConfig | None = None

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ValueError(
                f"transport: must be one of {', '.join(BACKENDS)}, got {self.backend!r}"
            )
        if not self.timeout_s > 0:
            raise ValueError(f"timeout_s: must be > 0, got {self.timeout_s}")
        if self.chunk_bytes < 4096:
            raise ValueError(f"chunk_bytes: must be >= 4096, got {self.chunk_bytes}")
        if not 0.0 <= self.fault_injection <= 1.0:
            raise ValueError(f"fault_injection: must be in [0, 1], got {self.fault_injection}")
