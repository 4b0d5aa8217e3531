"""grpc backend: TLS, the chunk codec against the generated classes, fresh stubs."""

from __future__ import annotations

import datetime
import filecmp
import ipaddress
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from kv_transfer import TLSConfig, TransferStatus
from kv_transfer.grpc_backend import Chunk, decode_chunk, encode_chunk
from kv_transfer.proto import kv_transfer_pb2 as pb
from tests.kv_transfer.conftest import MakeLink
from tests.kv_transfer.helpers import assert_moved, descriptor

# grpc hands over immutable bytes, which the receiver reads in place (torch warns, once).
pytestmark = pytest.mark.filterwarnings("ignore:The given buffer is not writable")

REPO = Path(__file__).resolve().parents[2]
PROTO_DIR = REPO / "kv_transfer" / "proto"


class ThrowawayCA:
    """A throwaway CA in ``tmp`` that issues certificates for 127.0.0.1 (server and client)."""

    def __init__(self, tmp: Path):
        pytest.importorskip("cryptography", reason="the cryptography package makes the certs")
        from cryptography.hazmat.primitives.asymmetric import ec

        self.tmp = tmp
        self.key = ec.generate_private_key(ec.SECP256R1())
        self.cert = self._sign("test-ca", self.key.public_key(), ca=True)
        (tmp / "ca.pem").write_bytes(self._pem(self.cert))

    def issue(self, name: str) -> TLSConfig:
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ec

        key = ec.generate_private_key(ec.SECP256R1())
        (self.tmp / f"{name}.pem").write_bytes(self._pem(self._sign(name, key.public_key())))
        (self.tmp / f"{name}.key").write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        return TLSConfig(
            str(self.tmp / f"{name}.pem"), str(self.tmp / f"{name}.key"), str(self.tmp / "ca.pem")
        )

    def _sign(self, subject: str, public_key: Any, ca: bool = False) -> Any:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes
        from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

        def name(cn: str) -> x509.Name:
            return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

        now = datetime.datetime.now(datetime.timezone.utc)
        builder = (
            x509.CertificateBuilder()
            .subject_name(name(subject))
            .issuer_name(name("test-ca"))
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        )
        if not ca:
            ip = x509.IPAddress(ipaddress.ip_address("127.0.0.1"))
            usage = [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            builder = builder.add_extension(
                x509.SubjectAlternativeName([ip]), critical=False
            ).add_extension(x509.ExtendedKeyUsage(usage), critical=False)
        return builder.sign(self.key, hashes.SHA256())

    @staticmethod
    def _pem(cert: Any) -> bytes:
        from cryptography.hazmat.primitives import serialization

        data: bytes = cert.public_bytes(serialization.Encoding.PEM)
        return data


def test_pull_over_mutual_tls(make_link: MakeLink, tmp_path: Path) -> None:
    ca = ThrowawayCA(tmp_path)
    link = make_link("grpc", tls=ca.issue("prefill"), rx_config={"tls": ca.issue("decode")})
    desc = descriptor(link.src, "r1", [4, 2, 9])
    link.sender.publish(desc)

    res = link.pull(desc, [0, 1, 2])

    assert res.status is TransferStatus.DONE, res.error
    assert_moved(link.src, [4, 2, 9], link.dst, [0, 1, 2])


def test_plaintext_receiver_cannot_pull_from_a_tls_sender(
    make_link: MakeLink, tmp_path: Path
) -> None:
    link = make_link("grpc", tls=ThrowawayCA(tmp_path).issue("prefill"), rx_config={"tls": None})
    desc = descriptor(link.src, "r1", [4, 2, 9])
    link.sender.publish(desc)

    res = link.pull(desc, [0, 1, 2])

    assert res.status is TransferStatus.FAILED
    assert "UNAVAILABLE" in (res.error or "")


def test_nothing_listening_fails_fast(make_link: MakeLink) -> None:
    link = make_link("grpc", timeout_s=20.0)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    desc = descriptor(link.src, "r1", [1])

    t0 = time.perf_counter()
    res = link.receiver.pull(desc, f"grpc://127.0.0.1:{port}", [2])
    bad = link.receiver.pull(desc, "torch://127.0.0.1:1", [2])

    assert res.status is TransferStatus.FAILED and "UNAVAILABLE" in (res.error or "")
    assert time.perf_counter() - t0 < 5
    assert bad.status is TransferStatus.FAILED and "not a grpc:// endpoint" in (bad.error or "")


def test_chunk_codec_matches_the_generated_classes() -> None:
    fields: dict[str, Any] = dict(
        index=3,
        num_chunks=9,
        layer_start=2,
        layer_end=4,
        offset=1 << 33,
        total_bytes=123456789,
        has_checksum=True,
        checksum=-(1 << 40),
    )
    data = bytes(range(256)) * 3

    ours = encode_chunk(pb.KVChunk(**fields), memoryview(data))
    theirs = pb.KVChunk(**fields, data=data).SerializeToString()

    assert ours == theirs
    assert pb.KVChunk.FromString(ours) == pb.KVChunk(**fields, data=data)
    decoded = decode_chunk(theirs)
    assert bytes(decoded.data) == data
    assert {k: getattr(decoded, k) for k in fields} == {**fields, "has_checksum": 1}
    assert [f.name for f in pb.KVChunk.DESCRIPTOR.fields] == list(Chunk.__dataclass_fields__)
    # Fields in another order (as another encoder may write them) decode the same.
    reordered = pb.KVChunk(data=data).SerializeToString() + pb.KVChunk(**fields).SerializeToString()
    assert decode_chunk(reordered) == decoded
    with pytest.raises(ValueError, match="truncated"):
        decode_chunk(ours[:-1])


def test_committed_stubs_are_fresh(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHON": sys.executable}
    subprocess.run(
        ["bash", str(REPO / "scripts" / "gen_protos.sh"), str(tmp_path)],
        check=True,
        env=env,
        timeout=60,
    )
    generated = sorted(p.name for p in tmp_path.iterdir())
    assert generated == ["kv_transfer_pb2.py", "kv_transfer_pb2.pyi", "kv_transfer_pb2_grpc.py"]
    match, mismatch, errors = filecmp.cmpfiles(tmp_path, PROTO_DIR, generated, shallow=False)
    assert (mismatch, errors) == ([], []), "run scripts/gen_protos.sh and commit the stubs"
