"""The operations half of ``baton.v1.BatonAdmin``: cordon, uncordon, drain, scale, the
requests in flight and abort, over the cluster facade (whose ``cluster.control`` holds
the desired state). Every call runs the cluster's blocking work on a thread; a failure
is a ``RouterError``: an unknown instance or request NOT_FOUND, a bad number
INVALID_ARGUMENT naming the field, a cluster that is shutting down UNAVAILABLE.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any, TypeVar

import grpc

from baton.v1 import baton_pb2 as pb
from router.errors import ErrorKind, RouterError
from router.grpc_server import BatonAdminServicer, _answer
from router.service import Router

logger = logging.getLogger(__name__)
_T = TypeVar("_T")


async def _call(fn: Callable[..., _T], *args: Any) -> _T:
    """``fn(*args)`` on a thread, its exceptions as the RouterError they mean."""
    try:
        return await asyncio.to_thread(fn, *args)
    except KeyError as e:
        raise RouterError(ErrorKind.NOT_FOUND, str(e.args[0]) if e.args else str(e)) from e
    except ValueError as e:
        raise RouterError.invalid(str(e)) from e
    except TimeoutError as e:
        raise RouterError(ErrorKind.DEADLINE_EXCEEDED, str(e)) from e
    except RuntimeError as e:
        raise RouterError(ErrorKind.UNAVAILABLE, str(e)) from e


def _scale_counts(cluster: Any, request: pb.ScaleRequest) -> dict[str, int]:
    counts: dict[str, int] = {}
    decode_pool = "decode" if cluster.mode == "disaggregated" else "colocated"
    for field, pool in (("prefill", "prefill"), ("decode", decode_pool)):
        if request.HasField(field):
            counts[pool] = getattr(request, field)
    if not counts:
        raise RouterError.invalid("prefill: give --prefill and/or --decode", "prefill")
    for pool, n in counts.items():
        if n < 1:
            field = "decode" if pool == decode_pool else pool
            raise RouterError.invalid(f"{field}: must be at least 1, got {n}", field)
    return counts


class AdminServicer(BatonAdminServicer):
    def __init__(self, router: Router):
        super().__init__(router)
        self.cluster = router.cluster

    async def Cordon(  # noqa: N802 (grpc's method names)
        self, request: pb.InstanceRequest, context: grpc.aio.ServicerContext
    ) -> pb.OperationResponse:
        async def run() -> pb.OperationResponse:
            await _call(self.cluster.cordon, request.instance)
            return pb.OperationResponse(message=f"{request.instance} cordoned")

        return await _answer(context, run())

    async def Uncordon(  # noqa: N802
        self, request: pb.InstanceRequest, context: grpc.aio.ServicerContext
    ) -> pb.OperationResponse:
        async def run() -> pb.OperationResponse:
            await _call(self.cluster.uncordon, request.instance)
            return pb.OperationResponse(message=f"{request.instance} uncordoned")

        return await _answer(context, run())

    async def Drain(  # noqa: N802
        self, request: pb.DrainRequest, context: grpc.aio.ServicerContext
    ) -> pb.OperationResponse:
        async def run() -> pb.OperationResponse:
            timeout = request.timeout_s if request.HasField("timeout_s") else 30.0
            if not timeout >= 0:
                raise RouterError.invalid(f"timeout: must be >= 0, got {timeout}", "timeout")
            migrated = await _call(self.cluster.drain, request.instance, timeout)
            return pb.OperationResponse(
                message=f"{request.instance} drained ({migrated} requests migrated)",
                migrated=migrated,
            )

        return await _answer(context, run())

    async def Scale(  # noqa: N802
        self, request: pb.ScaleRequest, context: grpc.aio.ServicerContext
    ) -> pb.ScaleResponse:
        async def run() -> pb.ScaleResponse:
            counts = _scale_counts(self.cluster, request)
            running: dict[str, int] = {}
            for inst in list(self.cluster.instances):
                running[inst.spec.role] = running.get(inst.spec.role, 0) + 1
            changes = [
                pb.PoolChange(role=role, running=running.get(role, 0), desired=n)
                for role, n in sorted(counts.items())
            ]
            if not request.dry_run:
                timeout = request.drain_timeout_s if request.HasField("drain_timeout_s") else None
                await _call(self.cluster.scale, counts, timeout)
            return pb.ScaleResponse(changes=changes, applied=not request.dry_run)

        return await _answer(context, run())

    async def ListRequests(  # noqa: N802
        self, request: pb.ListRequestsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListRequestsResponse:
        async def run() -> pb.ListRequestsResponse:
            rows = await _call(self.cluster.requests)
            return pb.ListRequestsResponse(requests=[pb.RequestInfo(**r) for r in rows])

        return await _answer(context, run())

    async def Abort(  # noqa: N802
        self, request: pb.AbortRequest, context: grpc.aio.ServicerContext
    ) -> pb.OperationResponse:
        async def run() -> pb.OperationResponse:
            if not await _call(self.cluster.abort, request.request_id):
                raise RouterError(
                    ErrorKind.NOT_FOUND,
                    f"request_id: no request {request.request_id!r} is in flight",
                    "request_id",
                )
            return pb.OperationResponse(message=f"{request.request_id} aborted")

        return await _answer(context, run())
