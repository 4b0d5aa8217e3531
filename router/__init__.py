"""The front door of a Baton cluster.

- :mod:`router.service`: the ``Router`` core both APIs share: model check, the request
  into the cluster, output snapshots out, per-request latencies to the metrics.
- :mod:`router.grpc_server` (+ :mod:`router.grpc_wire`): the ``baton.v1`` gRPC API, with
  health checking, reflection and an optional API key.
- :mod:`router.http_server` (+ :mod:`router.openai_protocol`): the OpenAI-compatible HTTP
  API.
- :mod:`router.policies`: which prefill and decode instance a request goes to.
- :mod:`router.metrics`: Prometheus metrics; :mod:`router.errors`: the one error table.
- :mod:`router.server`: ``baton serve``.

It imports ``baton`` and handles from ``cluster``, and never torch.
"""
