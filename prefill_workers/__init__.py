"""A prefill instance (not built yet).

This package will own the prefill side of a disaggregated request: the queue of incoming
prompts, batching by token budget, chunked prefill of long prompts, the prefix cache,
sampling the first token, and holding the request's KV blocks under a lease until a decode
instance has pulled them (or the lease expires). It builds on ``engine`` and
``kv_transfer``. Nothing is implemented here yet.
"""
