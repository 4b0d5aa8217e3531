"""This host's address: overrides, interfaces, gloo's interface; and bounded joins."""

from __future__ import annotations

import socket
import subprocess
import sys
import time

import pytest

from cluster import node_address, ray_connect


def test_interfaces_and_loopback() -> None:
    assert "lo" in node_address.interfaces()
    assert node_address.interface_ip("lo") == "127.0.0.1"
    assert node_address.interface_of("127.0.0.1") == "lo"
    assert node_address.interface_ip("no-such-if0") is None


def test_override_ip_and_ifname(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("BATON_HOST_IP", raising=False)
    monkeypatch.setenv("BATON_HOST_IFNAME", "lo")
    monkeypatch.delenv("GLOO_SOCKET_IFNAME", raising=False)
    monkeypatch.setenv("NCCL_SOCKET_IFNAME", "eth9")  # the user's choice is kept
    assert node_address.resolve_host("10.1.2.3") == "127.0.0.1"
    import os

    assert os.environ["GLOO_SOCKET_IFNAME"] == "lo"
    assert os.environ["NCCL_SOCKET_IFNAME"] == "eth9"
    monkeypatch.setenv("BATON_HOST_IFNAME", "nonexistent0")
    with pytest.raises(ValueError, match="^BATON_HOST_IFNAME: no interface 'nonexistent0'"):
        node_address.host_ip()
    monkeypatch.setenv("BATON_HOST_IP", "10.9.8.7")
    assert node_address.host_ip("127.0.0.1") == "10.9.8.7"


def test_parse_address() -> None:
    assert ray_connect.parse_address("10.0.0.1:6379") == ("10.0.0.1", 6379)
    assert ray_connect.parse_address("[::1]:6379") == ("::1", 6379)
    for bad in ("10.0.0.1", ":6379", "h:0", "h:99999", "h:x", "ray://h:10001"):
        with pytest.raises(ValueError, match="^address: "):
            ray_connect.parse_address(bad)


def test_join_nothing_listening_is_bounded() -> None:
    # A port held bound but not listening: connections are refused, and nothing else on
    # the machine can take it while the test runs. init_ray runs in a fresh process: in
    # this one an earlier test's session Ray may be up, and then it returns at once.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        code = (
            "from cluster import ray_connect\n"
            f"ray_connect.init_ray('127.0.0.1:{port}', 1, connect_timeout_s=1.0)"
        )
        start = time.monotonic()
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                              timeout=60)  # fmt: skip
        elapsed = time.monotonic() - start
    assert done.returncode != 0
    expected = f"ConnectionError: address: nothing answers at 127.0.0.1:{port} within 1 s"
    assert expected in done.stderr, done.stderr
    assert elapsed < 20.0  # bounded (generous: a loaded machine, and Python importing Ray)
