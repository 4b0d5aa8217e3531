"""`baton serve --plan` runs a CPU plan's threads and token budgets, and a 1 prefill +
1 decode deployment on one host with no plan gives each instance every core: read back
from the real instances (a real local Ray, a tiny random-weight Llama), not from specs.

Each instance answers ``ping`` with ``torch.get_num_threads()`` in its own process and its
engine scheduler's ``max_num_batched_tokens``.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import ray

from cluster import Cluster
from cluster.cli import plan_deployment
from cluster.planner.cluster_spec import CUSTOM_GPU, ClusterSpec, SLOs
from cluster.planner.plan import ColocatedBaseline, InstancePlan, Plan, Stage
from tests.engine.helpers import make_tiny_model_dir

pytest.importorskip("transformers")


def instance_settings(cluster: Cluster) -> dict[str, tuple[int, int]]:
    out = {}
    for inst in cluster.instances:
        reply = ray.get(inst.actor.ping.remote(), timeout=30)
        out[inst.name] = (reply["threads"], reply["token_budget"])
    return out


def cpu_plan(instances: list[InstancePlan]) -> Plan:
    return Plan(
        algorithm="cpu", model="tiny", slos=SLOs(1.5, 0.15, 0.9),
        cluster=ClusterSpec(1, 2, CUSTOM_GPU, 16.0, 5.0, 5.0), workload="synthetic:in=16,out=4",
        rate=1.0, burstiness=1.0, seed=0, profile_source="test", instances=tuple(instances),
        per_gpu_goodput=1.0, attainment=1.0, colocated=ColocatedBaseline(1, 1, 1, 0.5, 1.0),
    )  # fmt: skip


def test_serve_plan_runs_its_threads_and_budgets_and_1p1d_defaults_to_all_cores(
    ray_session: None, tmp_path: Path
) -> None:
    model = make_tiny_model_dir(tmp_path / "m", "llama", num_hidden_layers=2)
    host = (Stage(0, (0,)),)
    plan = cpu_plan([
        InstancePlan("prefill", 1, 1, host, threads=1, token_budget=256),
        InstancePlan("decode", 1, 1, host, threads=2),
    ])  # fmt: skip
    path = tmp_path / "plan.json"
    path.write_text(plan.to_json())
    options = plan_deployment(str(path))  # what `baton serve --plan` gives the cluster
    assert (options.pop("mode"), options.pop("prefill"), options.pop("decode")) == (
        "disaggregated",
        1,
        1,
    )
    with Cluster(str(model), num_kv_blocks=32, start_timeout_s=180, **options) as cluster:
        assert instance_settings(cluster) == {"prefill-0": (1, 256), "decode-0": (2, 2048)}

    cores = os.cpu_count() or 1
    with Cluster(str(model), num_kv_blocks=32, start_timeout_s=180) as cluster:  # no plan
        assert instance_settings(cluster) == {"prefill-0": (cores, 2048), "decode-0": (cores, 2048)}


def test_role_overrides_per_role_and_an_explicit_threads_per_rank_wins() -> None:
    tuned = {"colocated": {"num_threads": 1, "max_num_batched_tokens": 512}}
    colocated = Cluster(mode="colocated", prefill=0, decode=2, role_overrides=tuned)
    spec = colocated.instance_spec("colocated-0", "colocated", 1)
    assert (spec.num_threads, spec.max_num_batched_tokens) == (1, 512)
    explicit = Cluster(
        mode="colocated", prefill=0, decode=2, role_overrides=tuned, threads_per_rank=3
    )
    spec = explicit.instance_spec("colocated-0", "colocated", 1)
    assert (spec.num_threads, spec.max_num_batched_tokens) == (3, 512)
    with pytest.raises(ValueError, match=r"^role_overrides\.decode\.num_threads"):
        Cluster(role_overrides={"decode": {"num_threads": 0}})
    with pytest.raises(ValueError, match="^role_overrides: unknown role 'router'"):
        Cluster(role_overrides={"router": {"num_threads": 1}})
