"""Benchmark harnesses whose numbers go in the README (each also ``baton bench NAME``).

- ``bench.engine_throughput`` (``engine``): the offline engine against transformers and
  against this machine's compute and memory rooflines.
- ``bench.kv_transfer`` (``kv-transfer``): each KV transfer backend beside raw loopback
  TCP, and the transfer's share of TTFT on a real local cluster (``bench.kv_ttft``).
- ``bench.serving`` (``serve``): a client in the style of vLLM's ``bench serve`` against a
  running ``baton serve``: latencies, SLO attainment, goodput, the router's overhead.
- ``bench.structured_mask``: the per-step cost of the structured-output token mask.
- ``bench.planner`` (``planner``): planning time of ``baton plan``.
- ``bench.planner_validation`` (``planner-validation``): the planner's simulator against
  the real local cluster, disaggregated against colocated.
- ``bench.multihost`` (``multihost``): 1 prefill + 1 decode serving on one network-namespace
  host against the same pair across two (root).
"""
