"""The import rules at run time, where import-linter only reads the source: the router's
process (which holds a Cluster) never loads torch, and the SDK loads neither torch, Ray
nor the engine."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest


def _loaded_after(imports: str) -> set[str]:
    code = f"import sys, json\n{imports}\nprint(json.dumps(sorted(sys.modules)))"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    return {name.split(".")[0] for name in json.loads(out.stdout)}


@pytest.mark.parametrize(
    "imports",
    [
        "import router.server, router.grpc_server, router.http_server, router.metrics",
        "from cluster.cluster import Cluster",
    ],
)
def test_the_router_process_never_loads_torch(imports: str) -> None:
    loaded = _loaded_after(imports)
    assert "torch" not in loaded
    assert "router" in loaded or "cluster" in loaded  # the imports really ran


def test_the_sdk_loads_only_grpc_and_protobuf() -> None:
    loaded = _loaded_after("import baton")
    assert {"baton", "grpc", "google"} <= loaded
    assert not loaded & {"torch", "ray", "engine", "cluster", "router", "numpy"}
