from __future__ import annotations

import subprocess
import sys

MODULES = [
    "analytic",
    "cli",
    "cluster_spec",
    "goodput",
    "instances",
    "latency",
    "model_spec",
    "placement",
    "plan",
    "search",
    "simulator",
    "workload",
]


def test_the_planner_loads_neither_torch_nor_ray() -> None:
    """import-linter checks torch statically; this checks both at run time, through
    ``cluster/__init__.py`` and every planner module, in a fresh interpreter."""
    code = (
        "import sys\n"
        + "".join(f"import cluster.planner.{m}\n" for m in MODULES)
        + "import bench.planner\n"
        + "print(sorted(m for m in ('torch', 'ray') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
