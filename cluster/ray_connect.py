"""Starting or joining Ray, bounded in time and never by accident.

Ray's plain ``ray.init()`` joins whatever ``ray start`` cluster runs on the same machine
(``/tmp/ray/ray_current_cluster``), and ``ray.init(address=...)`` to an address where
nothing answers retries for minutes. Baton wants neither:

- no address: always an embedded local Ray (``address="local"``), whatever else runs here;
- an address: ``HOST:PORT`` of a head's GCS (``ray start --head`` prints it). The port is
  probed with plain TCP first, until ``connect_timeout_s``; then ``ray.init`` runs on a
  daemon thread and is given the rest of that time. Either failing raises
  :class:`ConnectionError` naming the address and what to check, so the caller exits
  cleanly rather than waiting on Ray's own retries.

Ray's token authentication (``RAY_AUTH_MODE=token`` with ``RAY_AUTH_TOKEN`` or
``RAY_AUTH_TOKEN_PATH``) is Ray's: it reads those variables itself, and Baton never reads,
logs or passes the token.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time

import ray

logger = logging.getLogger(__name__)

# Ray starts a pool of plain Python workers ("ray::IDLE", as many as the cores it counts)
# when the first driver registers, for tasks and actors to start fast. No instance can
# use one: an instance actor's runtime env (normal niceness, cluster/actors.py) needs a
# worker of its own. Two of them on this 2-core host held 163 MB and woke for 0.6 CPU
# seconds a minute between them, beside instances whose OpenMP teams lose a step's worth
# of time to anything that takes a core from them.
EMBEDDED_SYSTEM_CONFIG: dict[str, object] = {"prestart_worker_first_driver": False}

DEFAULT_CONNECT_TIMEOUT_S = 60.0


def parse_address(address: str) -> tuple[str, int]:
    """``HOST:PORT`` (an IPv6 host in brackets); ValueError naming ``address`` otherwise."""
    text = address.strip()
    if text.startswith("ray://"):
        raise ValueError(
            f"address: Ray Client addresses are not supported, give the GCS HOST:PORT "
            f"(got {address!r})"
        )
    host, sep, port = text.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"address: must be HOST:PORT of a Ray head, got {address!r}")
    return host, int(port)


def probe(host: str, port: int, timeout_s: float) -> None:
    """Until a TCP connection to ``host:port`` opens; ConnectionError after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    last: Exception | None = None
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            break
        try:
            with socket.create_connection((host, port), timeout=min(2.0, left)):
                return
        except OSError as e:
            last = e
            time.sleep(min(0.5, max(0.0, deadline - time.monotonic())))
    raise ConnectionError(
        f"address: nothing answers at {host}:{port} within {timeout_s:g} s ({last}); "
        "is `ray start --head` running there, and is its GCS port reachable from here?"
    )


def init_ray(
    address: str | None, num_cpus: int, connect_timeout_s: float = DEFAULT_CONNECT_TIMEOUT_S
) -> bool:
    """Start an embedded local Ray, or join ``address``; True when this call initialised
    Ray (False when this process already had it)."""
    if ray.is_initialized():
        return False
    if address is None:
        ray.init(
            address="local",  # never a `ray start` cluster found on this machine
            num_cpus=max(num_cpus, os.cpu_count() or 1),
            include_dashboard=False,
            logging_level=logging.WARNING,
            # The object store carries only control messages here; keep it small.
            object_store_memory=128 << 20,
            _system_config=EMBEDDED_SYSTEM_CONFIG,
        )
        return True
    if connect_timeout_s <= 0:
        raise ValueError(f"connect_timeout_s: must be > 0, got {connect_timeout_s!r}")
    host, port = parse_address(address)
    start = time.monotonic()
    probe(host, port, connect_timeout_s)
    _join(f"{host}:{port}", connect_timeout_s - (time.monotonic() - start), connect_timeout_s)
    return True


def _join(address: str, left_s: float, timeout_s: float) -> None:
    """``ray.init(address)`` on a daemon thread, given ``left_s``: a head that accepts TCP
    but never completes Ray's handshake (a wrong port, a firewall) cannot hold us."""
    outcome: list[BaseException | None] = []

    def run() -> None:
        try:
            _check_token(address)
            ray.init(address=address, logging_level=logging.WARNING)
            outcome.append(None)
        except BaseException as e:  # handed to the caller's thread
            outcome.append(e)

    thread = threading.Thread(target=run, name="ray-join", daemon=True)
    thread.start()
    thread.join(max(1.0, left_s))
    if not outcome:
        raise ConnectionError(
            f"address: {address} answers but Ray did not accept this driver within "
            f"{timeout_s:g} s (is it a Ray GCS port? with RAY_AUTH_MODE=token, is this "
            "process given the cluster's token?)"
        )
    error = outcome[0]
    if isinstance(error, ray.exceptions.AuthenticationError):
        raise ConnectionError(
            f"address: the Ray cluster at {address} refused this driver's token ({error}); "
            "give `baton serve` the cluster's token: RAY_AUTH_MODE=token with RAY_AUTH_TOKEN "
            "or RAY_AUTH_TOKEN_PATH"
        )
    if error is not None:
        raise ConnectionError(f"address: joining the Ray cluster at {address} failed: {error}")


def _check_token(address: str) -> None:
    """Ask the GCS once: a missing or wrong token is an ``AuthenticationError`` at once,
    where ``ray.init`` would log it and retry until our deadline."""
    try:
        from ray._raylet import GcsClient  # type: ignore[attr-defined]  # private: optional
    except ImportError:
        return
    GcsClient(address=address)
