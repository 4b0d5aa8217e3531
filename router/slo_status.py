"""The router's live SLO attainment for ``baton status`` (``StatusResponse.slo``).

The same windows as ``/api/v1/slo`` (:class:`router.slo.SLOWindows`, kept by the
router's :class:`router.metrics.RouterMetrics`), over every model the router served: for
each of 1m, 5m and 60m, how many finished requests were judged and the share that met
TTFT, TPOT and both. None when the server has no SLO targets (no ``--slo-*``, no
``--plan``), so the message stays unset and the CLI says so.
"""

from __future__ import annotations

from baton.v1 import baton_pb2 as pb
from router.service import Router
from router.slo import WINDOWS


def slo_status(router: Router) -> pb.SLOStatus | None:
    from router.metrics import RouterMetrics  # the only sink that keeps windows

    metrics = router.metrics
    if not isinstance(metrics, RouterMetrics):
        return None
    targets = metrics.targets.get(router.model_name)
    if targets is None:
        return None
    out = pb.SLOStatus(
        ttft_target_s=targets.ttft_s, tpot_target_s=targets.tpot_s, objective=targets.objective
    )
    for name, span in WINDOWS.items():
        summary = metrics.windows.summary(span)
        window = out.windows.add(window=name, judged=summary["judged"])
        for criterion, share in summary["attainment"].items():
            if share is not None:
                setattr(window, criterion, share)
    return out
