"""Moving KV-cache blocks between instances (not built yet).

This package will own one small transfer interface with backends registered by name and
imported lazily (``torch``: torch.distributed with NCCL on CUDA and gloo on CPU; ``grpc``;
``local`` for one process), re-sharding when the prefill and decode sides use different
tensor/pipeline-parallel layouts, leases and timeouts. It may import only the types of
``engine``. Nothing is implemented here yet.
"""
