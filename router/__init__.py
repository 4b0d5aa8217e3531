"""The front door of a Baton cluster (not built yet).

This package will own the gRPC API server and the OpenAI-compatible HTTP server, the
dispatch policies that pick a prefill and a decode instance for each request, the fan-in
of token streams coming back from the decode instances, SLO tracking (TTFT and TPOT),
metrics and the SLO dashboard. It may import ``baton`` and handles from ``cluster``, and
never torch. Nothing is implemented here yet.
"""
