"""Bad values never render: each fails with an error naming the key and the reason
(values.schema.json for types, ranges and misspelt keys; `fail` for combinations)."""

from __future__ import annotations

from typing import Any

import pytest

from tests.deploy import chart

GPU = {"accelerator": {"type": "nvidia"}}
LLAMA = {
    "model": {"architecture": {"numHeads": 32, "numKeyValueHeads": 8, "numLayers": 32}},
    "ray": {"cpusPerRank": 0.1},  # many ranks in the default 2-CPU pods
}

CASES: list[tuple[str, dict[str, Any], list[str]]] = [
    ("old ray with token auth", {"ray": {"version": "2.51.1"}},
     ["ray.version", "needs Ray >= 2.52", "2.51.1"]),
    ("tp does not divide the heads", {"prefill": {"parallelism": {"tensor": 2, "pipeline": 1}}},
     ["prefill.parallelism.tensor", "must divide model.architecture.numHeads=9", "got 2"]),
    ("tp does not divide the kv heads",
     {"model": {"architecture": {"numHeads": 12, "numKeyValueHeads": 8, "numLayers": 32}},
      "decode": {"parallelism": {"tensor": 3, "pipeline": 1}}},
     ["decode.parallelism.tensor", "numKeyValueHeads=8", "got 3"]),
    ("pp deeper than the model", {"decode": {"parallelism": {"tensor": 1, "pipeline": 31}}},
     ["decode.parallelism.pipeline", "numLayers=30", "got 31"]),
    ("layout larger than a node",
     {**GPU, **LLAMA, "prefill": {"parallelism": {"tensor": 4, "pipeline": 4}}},
     ["prefill.parallelism", "16 GPUs", "accelerator.gpusPerNode=8"]),
    ("cpu limit below the ranks' reservation",
     {"decode": {"parallelism": {"tensor": 3, "pipeline": 1},
                 "resources": {"requests": {"cpu": "1", "memory": "1Gi"},
                               "limits": {"cpu": "1500m", "memory": "1Gi"}}}},
     ["decode.resources.limits.cpu", "1500m", "3 ranks of ray.cpusPerRank=1"]),
    ("api key without a secret", {"auth": {"apiKey": {"enabled": True}}},
     ["auth.apiKey.existingSecret", "required when auth.apiKey.enabled"]),
    ("admin key without a secret", {"auth": {"adminKey": {"enabled": True}}},
     ["auth.adminKey.existingSecret", "required when auth.adminKey.enabled"]),
    ("pvc without a claim", {"model": {"source": "pvc", "path": "m"}},
     ["model.pvc.existingClaim", "required when model.source is pvc"]),
    ("init without a command", {"model": {"source": "init", "path": "m"}},
     ["model.init.command", "required when model.source is init"]),
    ("ingress without a host", {"router": {"ingress": {"enabled": True, "host": ""}}},
     ["router.ingress.host", "required"]),
    ("misspelt top-level key", {"prefil": {"replicas": 2}},
     ["additional properties 'prefil' not allowed"]),
    ("misspelt nested key", {"decode": {"replica": 2}},
     ["/decode", "additional properties 'replica' not allowed"]),
    ("half a GPU as parallelism", {"prefill": {"parallelism": {"tensor": 0.5, "pipeline": 1}}},
     ["/prefill/parallelism/tensor", "want integer"]),
    ("a free GPU count in resources",
     {"prefill": {"resources": {"requests": {"cpu": "1", "memory": "1Gi"},
                                "limits": {"cpu": "1", "memory": "1Gi", "nvidia.com/gpu": 0.5}}}},
     ["/prefill/resources/limits", "'nvidia.com/gpu' not allowed"]),
    ("zero replicas", {"decode": {"replicas": 0}}, ["/decode/replicas", "minimum"]),
    ("unknown transport", {"router": {"transport": "rdma"}},
     ["/router/transport", "must be one of", "torch", "grpc"]),
    ("unknown dtype", {"model": {"dtype": "fp8"}},
     ["/model/dtype", "must be one of", "bfloat16"]),
    ("unknown accelerator", {"accelerator": {"type": "tpu"}},
     ["/accelerator/type", "must be one of", "nvidia"]),
    ("a port out of range", {"router": {"httpPort": 70000}}, ["/router/httpPort", "maximum"]),
]  # fmt: skip


@pytest.mark.parametrize("values,needles", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_values_fail_naming_the_key(values: dict[str, Any], needles: list[str]) -> None:
    import helm_python as helm

    with pytest.raises((helm.HelmValuesError, helm.HelmRenderError)) as info:
        chart.render(values)
    message = str(info.value)
    for needle in needles:
        assert needle in message, f"{needle!r} not in {message!r}"


def test_good_neighbours_of_the_bad_cases_render() -> None:
    """The checks are not over-eager: what is allowed renders."""
    ok = [
        {"ray": {"version": "2.52.0"}},
        {"ray": {"version": "2.40.0", "auth": {"enabled": False, "existingSecret": ""}}},
        {**GPU, **LLAMA, "prefill": {"parallelism": {"tensor": 8, "pipeline": 1}}},
        {**LLAMA, "decode": {"parallelism": {"tensor": 16, "pipeline": 1}}},  # tp multiple of kv
        {"decode": {"parallelism": {"tensor": 3, "pipeline": 30}}, "ray": {"cpusPerRank": 0.02}},
        {"auth": {"apiKey": {"enabled": True, "existingSecret": "k"}}},
    ]
    for values in ok:
        assert "baton/templates/raycluster.yaml" in chart.render(values), values
