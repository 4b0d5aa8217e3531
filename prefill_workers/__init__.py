"""A prefill instance: computes a prompt's KV cache and first token, then holds the KV
under a lease until a decode instance has pulled it.

See :mod:`prefill_workers.worker` for a request's path through its queues. The Ray
wiring lives in ``cluster``; this package builds on ``engine`` and ``kv_transfer``.
"""
