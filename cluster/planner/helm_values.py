"""A plan as values for Baton's Helm chart (``baton plan --helm-values out.yaml``).

The chart runs one Baton instance per worker pod, so a plan maps onto it role by role:
the number of prefill (decode) instances becomes ``prefill.replicas`` (``decode``), the
role's TP x PP layout ``prefill.parallelism`` (each pod then asks for tensor x pipeline
GPUs), and the plan's node size ``accelerator.gpusPerNode``. The model's shape goes in
``model.architecture`` so that the chart refuses a layout that cannot divide it. Where the
weights live (``model.source``/``model.path``) is the operator's to add:

    baton plan ... --helm-values plan-values.yaml
    helm install baton deploy/helm/baton -f plan-values.yaml -f my-model.yaml

Placement inside a pod is Kubernetes' business, not the plan's: the plan's node and GPU
indices are not carried over. Colocated plans have no chart form (the chart deploys
prefill and decode groups) and are refused with a ValueError naming the plan's roles.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from cluster.planner.model_spec import ModelSpec
from cluster.planner.plan import Plan

ROLES = ("prefill", "decode")
# A starting point for a GPU pod's host share, per GPU: one CPU per rank (the chart's
# ray.cpusPerRank default) plus one for the raylet and loading, and host memory for
# loading weights. Adjust in a values file layered after this one.
CPUS_PER_GPU = 2
MEMORY_GIB_PER_GPU = 32


def helm_values(plan: Plan, model: ModelSpec) -> dict[str, Any]:
    """The chart values that deploy ``plan``'s instances (replicas and layouts per role)."""
    layouts: dict[str, set[tuple[int, int]]] = {}
    for inst in plan.instances:
        layouts.setdefault(inst.role, set()).add((inst.tp, inst.pp))
    if set(layouts) != set(ROLES):
        roles = ", ".join(sorted(layouts)) or "none"
        raise ValueError(
            f"plan: the Helm chart deploys prefill and decode instances; this plan has {roles}"
        )
    values: dict[str, Any] = {
        "accelerator": {"type": "nvidia", "gpusPerNode": plan.cluster.gpus_per_node},
        "model": {
            "architecture": {
                "numHeads": model.num_heads,
                "numKeyValueHeads": model.num_kv_heads,
                "numLayers": model.num_layers,
            }
        },
    }
    for role in ROLES:
        if len(layouts[role]) > 1:
            shown = ", ".join(f"tp{tp}pp{pp}" for tp, pp in sorted(layouts[role]))
            raise ValueError(f"plan: {role} instances must share one layout, got {shown}")
        ((tp, pp),) = layouts[role]
        cpus, memory = tp * pp * CPUS_PER_GPU, f"{tp * pp * MEMORY_GIB_PER_GPU}Gi"
        values[role] = {
            "replicas": plan.count(role),
            "parallelism": {"tensor": tp, "pipeline": pp},
            "resources": {
                "requests": {"cpu": str(cpus), "memory": memory},
                "limits": {"cpu": str(cpus), "memory": memory},
            },
        }
    return values


def to_yaml(values: dict[str, Any], indent: int = 0) -> str:
    """Block YAML of nested dicts of str/int/float/bool (strings JSON-quoted: valid YAML)."""
    lines = []
    pad = "  " * indent
    for key, value in values.items():
        if isinstance(value, dict):
            lines.append(f"{pad}{key}:")
            lines.append(to_yaml(value, indent + 1))
        elif isinstance(value, bool):
            lines.append(f"{pad}{key}: {'true' if value else 'false'}")
        elif isinstance(value, (int, float)):
            lines.append(f"{pad}{key}: {value}")
        else:
            lines.append(f"{pad}{key}: {json.dumps(str(value))}")
    return "\n".join(lines)


def write_helm_values(path: str, plan: Plan, model: ModelSpec) -> None:
    values = helm_values(plan, model)
    header = [
        f"# Baton Helm chart values from `baton plan` ({plan.model} on {plan.cluster.nodes} x "
        f"{plan.cluster.gpus_per_node} {plan.cluster.gpu}, {plan.rate:g} req/s,",
        f"# predicted attainment {plan.attainment:.1%}). Add model.source and model.path for",
        "# the weights, then: helm install baton deploy/helm/baton -f THIS_FILE -f ...",
    ]
    Path(path).write_text("\n".join(header) + "\n" + to_yaml(values) + "\n")
