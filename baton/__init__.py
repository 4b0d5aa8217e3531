"""Baton's public client SDK (not built yet).

This package will own what a program needs to talk to a Baton cluster: ``Client``,
``AsyncClient`` and ``AdminClient``, the request and response types, the errors, and the
generated stubs of the public gRPC API (``baton.v1``). It may import only protobuf and
grpc, never torch, so that a client installs and imports quickly. Today it holds only the
version; the serving issue builds the rest.
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__"]
