"""Benchmark harnesses whose numbers go in the README.

Today: ``bench.engine_throughput`` (also ``baton bench engine``), the offline engine
against transformers and against this machine's compute and memory rooflines. Serving and
planner benchmarks come with the issues that build those parts.
"""
