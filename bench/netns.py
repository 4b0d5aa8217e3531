"""Hosts with their own network stacks on one machine: Linux network namespaces.

:class:`Network` makes ``n`` namespaces (the hosts) and one more (the switch) holding a
bridge; each host has one veth, ``eth0``, into that bridge, with an address in a private
/24 chosen at random per run (``10.X.Y.0/24``; names carry a random suffix too), so two
runs never collide and the machine's own network is never touched: nothing is created in
the root namespace, and traffic goes only to these addresses and loopback (each host's
default route points into the bridge, which has no way out: it only lets Ray find the
host's address without a hard-coded one).

:class:`RayHosts` runs ``ray start --head`` on host 0 and ``ray start --address=...`` on
the others, each with its own ``--temp-dir`` and node labels, and Ray's token
authentication with a token made for the run (``RAY_AUTH_TOKEN_PATH``); every process is
started through ``ip netns exec`` and found again through ``ip netns pids``, so
:meth:`Network.kill_host` kills exactly one host's processes (its raylet and workers) and
teardown kills every process in every namespace before deleting them, in ``finally``.

:func:`unavailable` says why namespaces cannot be made here (not root, no ``ip``, no
permission), for the tests to skip with that reason. Also used by
``scripts/netns-cluster.sh`` (``python -m bench.netns up|down``).
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import random
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
ROLE_LABEL = "baton.io/role"
_CLONE_NEWNET = 0x40000000
ETC_NETNS = Path("/etc/netns")  # `ip netns exec NAME` mounts ETC_NETNS/NAME/* over /etc/*


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check, timeout=30)


def unavailable() -> str | None:
    """Why network namespaces cannot be made on this machine; None when they can."""
    if shutil.which("ip") is None:
        return "the `ip` command (iproute2) is not installed"
    if os.geteuid() != 0:
        return "network namespaces need root"
    name = f"btprobe{secrets.token_hex(3)}"
    made = _ip("netns", "add", name, check=False)
    if made.returncode != 0:
        return f"`ip netns add` failed: {made.stderr.strip()}"
    _ip("netns", "del", name, check=False)
    return None


@dataclass
class Host:
    index: int
    netns: str
    ip: str
    tmp: Path  # this host's Ray --temp-dir and logs


@dataclass
class Network:
    """``n`` hosts on one bridge; :meth:`up` makes them, :meth:`down` removes everything."""

    n: int
    run_id: str = field(default_factory=lambda: secrets.token_hex(3))
    hosts: list[Host] = field(default_factory=list)
    subnet: str = ""

    @property
    def switch(self) -> str:
        return f"bt{self.run_id}sw"

    def up(self) -> Network:
        a, b = random.randrange(64, 255), random.randrange(0, 256)
        self.subnet = f"10.{a}.{b}.0/24"
        root = Path(tempfile.mkdtemp(prefix=f"bmn{self.run_id}-"))
        try:
            _ip("netns", "add", self.switch)
            _ip("-n", self.switch, "link", "add", "br0", "type", "bridge")
            _ip("-n", self.switch, "link", "set", "br0", "up")
            for i in range(self.n):
                self.add_host(root / f"h{i}", f"10.{a}.{b}.{i + 1}")
        except BaseException:
            self.down()
            raise
        return self

    def add_host(self, tmp: Path, ip: str | None = None) -> Host:
        """One more host on the bridge (a later joiner, as in the token test)."""
        i = len(self.hosts)
        if ip is None:
            ip = self.subnet.replace(".0/24", f".{i + 1}")
        host = Host(i, f"bt{self.run_id}h{i}", ip, tmp)
        self.hosts.append(host)  # before any step, so down() removes a half-made host
        tmp.mkdir(parents=True, exist_ok=True)
        outer, inner = f"bt{self.run_id}s{i}", f"bt{self.run_id}e{i}"
        _ip("netns", "add", host.netns)
        _ip("-n", self.switch, "link", "add", outer, "type", "veth", "peer", "name", inner,
            "netns", host.netns)  # fmt: skip
        _ip("-n", self.switch, "link", "set", outer, "master", "br0", "up")
        _ip("-n", host.netns, "link", "set", inner, "name", "eth0")
        _ip("-n", host.netns, "addr", "add", f"{ip}/24", "dev", "eth0")
        _ip("-n", host.netns, "link", "set", "eth0", "up")
        _ip("-n", host.netns, "link", "set", "lo", "up")
        _ip("-n", host.netns, "route", "add", "default", "dev", "eth0")
        self.write_names()
        return host

    def write_names(self) -> None:
        """Each host's own name service: a hosts file naming every host, and a resolver
        with no name server (so a lookup fails at once). Without them a process in a host
        asks the machine's DNS server, which no host can reach, and waits for its timeout:
        torch's TCPStore looks up each client's address by name when it accepts it (for a
        log line), which cost the first KV pair 6 s across hosts."""
        names = "".join(f"{h.ip} {h.netns}\n" for h in self.hosts)
        for host in self.hosts:
            etc = ETC_NETNS / host.netns
            etc.mkdir(parents=True, exist_ok=True)
            (etc / "hosts").write_text(f"127.0.0.1 localhost\n{names}")
            (etc / "resolv.conf").write_text(
                "# test network: no name service (lookups fail at once)\n"
                "nameserver 127.0.0.1\noptions timeout:1 attempts:1\n"
            )

    def pids(self, host: Host) -> list[int]:
        out = _ip("netns", "pids", host.netns, check=False).stdout.split()
        return [int(p) for p in out if p.isdigit()]

    def kill_host(self, host: Host) -> int:
        """SIGKILL every process of ``host`` (raylet, GCS, workers, ...): a host lost."""
        killed = 0
        for _ in range(10):  # a dying raylet may still fork a worker: until none is left
            pids = self.pids(host)
            if not pids:
                break
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                    killed += 1
                except ProcessLookupError:
                    pass
            time.sleep(0.2)
        return killed

    def down(self) -> None:
        """Kill every process in the hosts' namespaces, delete them and the switch."""
        for host in self.hosts:
            self.kill_host(host)
        for host in self.hosts:
            _ip("netns", "del", host.netns, check=False)
            shutil.rmtree(ETC_NETNS / host.netns, ignore_errors=True)
        with contextlib.suppress(OSError):
            ETC_NETNS.rmdir()  # only when empty: no other run's hosts left
        _ip("netns", "del", self.switch, check=False)  # its veth ends and bridge with it
        for host in self.hosts:
            shutil.rmtree(host.tmp.parent, ignore_errors=True)
        self.hosts = []

    def popen(
        self, host: Host, argv: Sequence[str], env: dict[str, str], log: str
    ) -> subprocess.Popen[bytes]:
        """Start ``argv`` on ``host`` (its own session), output to ``host.tmp/log``."""
        out = open(host.tmp / log, "ab")  # noqa: SIM115 - the child owns it
        try:
            return subprocess.Popen(
                ["ip", "netns", "exec", host.netns, *argv],
                env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip
        finally:
            out.close()

    def run(
        self, host: Host, argv: Sequence[str], env: dict[str, str], timeout: float
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["ip", "netns", "exec", host.netns, *argv],
            env=env, capture_output=True, text=True, timeout=timeout,
        )  # fmt: skip


def enter(host: Host) -> None:
    """Move the calling thread into ``host``'s network namespace (sockets it opens after
    this live there): for a client thread talking to a server on that host."""
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    fd = os.open(f"/var/run/netns/{host.netns}", os.O_RDONLY)
    try:
        if libc.setns(fd, _CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), f"setns into {host.netns}")
    finally:
        os.close(fd)


@dataclass
class RayHosts:
    """A Ray cluster over a :class:`Network`: head on host 0, workers with labels."""

    net: Network
    labels: list[dict[str, str]]  # per host (host 0 included)
    cpus: list[int]
    port: int = 0
    token_path: Path | None = None

    def env(self, token: bool = True, **extra: str) -> dict[str, str]:
        """The environment of every process on the hosts: this checkout's code, Ray's
        token (when ``token``), no usage reporting."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "BATON_HOST"))}
        env.update(PYTHONPATH=str(REPO), RAY_USAGE_STATS_ENABLED="0", PATH=f"{BIN}:{env['PATH']}")
        # A shared, busy machine: Ray's memory monitor would kill model-loading workers.
        env["RAY_memory_monitor_refresh_ms"] = "0"
        for var in ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME"):
            env.pop(var, None)
        if token and self.token_path is not None:
            env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(self.token_path))
        else:
            env["RAY_AUTH_MODE"] = "disabled"
        env.update(extra)
        return env

    @property
    def address(self) -> str:
        return f"{self.net.hosts[0].ip}:{self.port}"

    def start(self, timeout_s: float = 120.0) -> RayHosts:
        self.port = random.randrange(20000, 30000)  # the head's own namespace: all free
        self.token_path = self.net.hosts[0].tmp.parent / "token"
        self.token_path.write_text(secrets.token_hex(32))
        for host in self.net.hosts:
            self.start_node(host, self.labels[host.index], self.cpus[host.index])
        self.wait_nodes(len(self.net.hosts), timeout_s)
        return self

    def start_node(
        self, host: Host, labels: dict[str, str], cpus: int, token: bool = True
    ) -> subprocess.Popen[bytes]:
        argv = [str(BIN / "ray"), "start", "--block", f"--node-ip-address={host.ip}",
                f"--temp-dir={host.tmp}/ray", f"--num-cpus={cpus}",
                "--object-store-memory=80000000", "--disable-usage-stats"]  # fmt: skip
        if labels:
            argv.append("--labels=" + ",".join(f"{k}={v}" for k, v in labels.items()))
        if host.index == 0:
            argv += ["--head", f"--port={self.port}", "--include-dashboard=false"]
        else:
            argv.append(f"--address={self.address}")
        return self.net.popen(host, argv, self.env(token), "ray-start.log")

    def wait_nodes(self, n: int, timeout_s: float) -> None:
        """Until ``n`` nodes are alive, asked from the head's namespace."""
        code = (
            f"import ray, json; ray.init(address={self.address!r}, logging_level='ERROR');"
            "print(json.dumps(sum(1 for x in ray.nodes() if x['Alive'])))"
        )
        deadline = time.monotonic() + timeout_s
        last = ""
        while time.monotonic() < deadline:
            try:
                got = self.net.run(self.net.hosts[0], [sys.executable, "-c", code],
                                   self.env(), timeout=60)  # fmt: skip
            except subprocess.TimeoutExpired:
                continue
            last = got.stderr[-400:]
            lines = got.stdout.strip().splitlines()
            if got.returncode == 0 and lines and int(lines[-1]) >= n:
                return
            time.sleep(2.0)
        raise TimeoutError(f"{n} Ray nodes not up within {timeout_s:.0f}s: {last}")


def free_port(host: Host) -> int:
    """A port free on ``host`` (its namespace is fresh, so any is, but ask anyway)."""
    out: list[int] = []

    def probe() -> None:
        enter(host)
        with socket.socket() as s:
            s.bind((host.ip, 0))
            out.append(s.getsockname()[1])

    import threading

    t = threading.Thread(target=probe)
    t.start()
    t.join()
    return out[0]


@contextmanager
def three_hosts(cpus: Sequence[int] = (1, 3, 2)) -> Iterator[RayHosts]:
    """Head (no role), a prefill host and a decode host, Ray up on all three."""
    net = Network(3)
    try:
        net.up()
        labels = [{}, {ROLE_LABEL: "prefill"}, {ROLE_LABEL: "decode"}]
        yield RayHosts(net, labels, list(cpus)).start()
    finally:
        net.down()


def main(argv: Sequence[str]) -> int:
    """``up``: bring three hosts up and print how to use them (state in a JSON file);
    ``down STATE.json``: tear them down."""
    if argv[:1] == ["up"]:
        reason = unavailable()
        if reason:
            print(f"netns-cluster: cannot make namespaces: {reason}", file=sys.stderr)
            return 1
        net = Network(3).up()
        try:
            ray_hosts = RayHosts(net, [{}, {ROLE_LABEL: "prefill"}, {ROLE_LABEL: "decode"}],
                                 [1, 2, 2]).start()  # fmt: skip
        except BaseException:
            net.down()
            raise
        state = net.hosts[0].tmp.parent / "state.json"
        state.write_text(json.dumps({
            "run_id": net.run_id, "subnet": net.subnet, "address": ray_hosts.address,
            "token_path": str(ray_hosts.token_path),
            "hosts": [{"netns": h.netns, "ip": h.ip, "tmp": str(h.tmp)} for h in net.hosts],
        }, indent=1))  # fmt: skip
        print(state)
        return 0
    if argv[:1] == ["down"] and len(argv) == 2:
        data = json.loads(Path(argv[1]).read_text())
        net = Network(len(data["hosts"]), run_id=data["run_id"])
        net.hosts = [Host(i, h["netns"], h["ip"], Path(h["tmp"]))
                     for i, h in enumerate(data["hosts"])]  # fmt: skip
        net.down()
        return 0
    print("usage: netns.py up | down STATE.json", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
