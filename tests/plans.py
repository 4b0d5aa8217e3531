"""One `baton plan` that several tests read: llama-13b on a node of eight A100s at 10 req/s.

Its search takes 35-45 s on the CI machine and the same arguments give the same plan (the
seed is fixed), so the session computes it once (``llama13b_plan`` in ``tests/conftest.py``)
and each test writes the text where it needs a file.
"""

from __future__ import annotations

PLAN_ARGS = [
    "plan", "--model", "llama-13b", "--nodes", "1", "--gpus-per-node", "8", "--gpu",
    "A100-80G", "--workload", "synthetic:in=512,out=128", "--ttft-slo", "0.25",
    "--tpot-slo", "0.1", "--attainment", "0.9", "--rate", "10",
]  # fmt: skip
