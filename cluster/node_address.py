"""The address this process's listeners bind and advertise to other hosts.

Every socket another host dials (the TP/PP rank store, the KV transfer's stores, gloo or
NCCL pairs and gRPC servers, the router's token-event socket) binds to this host's IP and
advertises the same: never 0.0.0.0, and loopback only when the whole cluster is one node
(an embedded Ray). In order:

1. ``BATON_HOST_IP`` (like vLLM's ``VLLM_HOST_IP``);
2. ``BATON_HOST_IFNAME``: the IPv4 address of that interface (a name that does not exist,
   or has no IPv4 address, is a ``ValueError`` naming it);
3. the IP Ray reports for the node this process runs on (``ray.util.get_node_ip_address``,
   which is what ``ray start --node-ip-address`` set or Ray detected).

Gloo and NCCL pick their own interface (by hostname) unless told, which on a host with
several addresses may not be the one above; :func:`resolve_host` sets
``GLOO_SOCKET_IFNAME`` / ``NCCL_SOCKET_IFNAME`` to the interface that holds the chosen IP,
unless the user set them. Environment variables are read in ``engine.envs`` only.
"""

from __future__ import annotations

import fcntl
import socket
import struct

from engine import envs

_SIOCGIFADDR = 0x8915  # Linux ioctl: an interface's IPv4 address


def interface_ip(ifname: str) -> str | None:
    """The IPv4 address of interface ``ifname``; None when it has none."""
    packed = struct.pack("256s", ifname.encode()[:15])
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            reply = fcntl.ioctl(s.fileno(), _SIOCGIFADDR, packed)
        except OSError:
            return None
    return socket.inet_ntoa(reply[20:24])


def interfaces() -> list[str]:
    return [name for _, name in socket.if_nameindex()]


def interface_of(ip: str) -> str | None:
    """The interface holding IPv4 address ``ip`` (loopback for any 127.x), if any."""
    if ip.startswith("127."):
        return "lo"
    for name in interfaces():
        if interface_ip(name) == ip:
            return name
    return None


def node_ip() -> str:
    """The IP Ray reports for this process's node (Ray must be initialised here: a Ray
    worker always is; a driver after ``ray.init``)."""
    import ray

    return str(ray.util.get_node_ip_address())


def host_ip(default: str = "") -> str:
    """This host's address: BATON_HOST_IP, else BATON_HOST_IFNAME's address, else
    ``default`` when given (loopback on a one-node cluster), else the Ray node IP."""
    override = envs.host_ip()
    if override:
        return override
    ifname = envs.host_ifname()
    if ifname:
        if ifname not in interfaces():
            raise ValueError(
                f"BATON_HOST_IFNAME: no interface {ifname!r} on this host "
                f"(it has {', '.join(interfaces())})"
            )
        ip = interface_ip(ifname)
        if ip is None:
            raise ValueError(f"BATON_HOST_IFNAME: interface {ifname!r} has no IPv4 address")
        return ip
    return default or node_ip()


def resolve_host(default: str = "") -> str:
    """:func:`host_ip`, and gloo / NCCL pointed at the interface that holds it (unless the
    user chose theirs). Call it in the process that opens the listeners."""
    ip = host_ip(default)
    ifname = interface_of(ip)
    if ifname is not None:
        for var in ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME"):
            if envs.socket_ifname(var) is None:
                envs.set_socket_ifname(var, ifname)
    return ip
