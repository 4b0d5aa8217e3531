"""A decode instance: admits prefilled requests when KV blocks are free, pulls their KV
(recomputing the prompt when a pull fails), decodes them in a continuous batch, and
streams token events to the router side. Also the colocated instance, which prefills too.

See :mod:`decode_workers.worker` for a request's path through its queues. The Ray
wiring lives in ``cluster``; this package builds on ``engine`` and ``kv_transfer``.
"""
