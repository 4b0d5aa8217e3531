"""The control plane of a Baton cluster.

- :class:`cluster.Cluster` (``cluster/cluster.py``): the Python API the router and the
  tests use: start or join Ray, run prefill and decode instances, stream requests.
- ``cluster/builder.py``: all the Ray wiring (placement groups, actor options); the only
  module that applies ``ray.remote``. ``cluster/actors.py``: the instance actor, a plain
  class underneath.
- ``cluster/stream.py``: the token events' socket and the per-request streams.
- ``cluster/cli.py``: the ``baton`` command-line tool.
- ``cluster/planner``: the placement planner (pure Python; ``baton plan``).

``import cluster`` is cheap: Ray and the engine load on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from cluster.cluster import Cluster


def __getattr__(name: str) -> Any:
    if name == "Cluster":
        from cluster.cluster import Cluster

        return Cluster
    raise AttributeError(f"module 'cluster' has no attribute {name!r}")


__all__ = ["Cluster"]
