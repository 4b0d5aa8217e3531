"""A decode instance (not built yet).

This package will own the decode side of a disaggregated request: admitting a request when
KV blocks are free for it, pulling its KV blocks from the prefill instance (recomputing the
prompt when the pull fails), continuous batching, sampling, stop conditions, and streaming
tokens back to the router. It builds on ``engine`` and ``kv_transfer``. Nothing is
implemented here yet.
"""
