"""The placement planner: which prefill and decode instances to run, and how.

DistServe style, pure Python (it never imports torch or ray; an import-linter contract
checks torch). The pieces, in the order a plan is made:

- ``model_spec`` / ``cluster_spec`` / ``workload``: the inputs (a model's shape from a
  preset or an HF config.json; nodes, GPUs and links; SLOs; request lengths and arrivals).
- ``latency``: per-(TP, PP) batch latency in DistServe's form, fitted from measured
  samples (``fit_profile``), read from DistServe's profiler JSON, or built by ``analytic``
  from datasheet FLOPs and bandwidths.
- ``simulator`` (with ``instances``): a discrete-event simulation of prefill batching, KV
  transfer and decode batching (or colocated chunked prefill) giving each request's TTFT
  and TPOT.
- ``goodput``: binary search of the highest rate meeting the attainment target, cached.
- ``search`` (with ``placement``): the high- and low-node-affinity algorithms and the
  colocated baseline, producing a ``plan.Plan`` (JSON plan file for ``baton serve --plan``).
- ``cli``: ``baton plan``.
"""
