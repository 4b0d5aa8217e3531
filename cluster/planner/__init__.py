"""The placement planner (not built yet).

This package will choose how many prefill and decode instances to run and with which
tensor/pipeline-parallel layout, DistServe style: a latency model per layout fitted from
profiling the engine (or built-in GPU profiles), a discrete-event simulator of prefill
batching, KV transfer and decode batching, and a search over layouts that maximises the
request rate per GPU meeting the TTFT/TPOT attainment target. Its output is a plan file for
``baton serve --plan``. It is pure Python and never imports torch (an import-linter
contract checks this). Nothing is implemented here yet.
"""
