"""TP x PP instances on a real local Ray: prefill and decode of different layouts.

A tiny random-weight Llama (4 query heads over 2 KV heads, 4 layers) is saved as
safetensors; each test starts a cluster whose prefill and decode instances have the
layouts named, runs several requests at once, and compares their greedy outputs with
the offline single-process engine's, token for token. Every KV pull must then have
crossed the layouts (no recompute), and every instance ends with all its blocks free.
The machine has two cores, so each cluster is one prefill and one decode instance.
"""

from __future__ import annotations

import random
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import ray

from cluster import Cluster
from engine import LLM, SamplingParams
from tests.cluster.test_cluster import stream_concurrently, wait_all_blocks_free
from tests.engine.helpers import make_tiny_model_dir

pytest.importorskip("transformers")

NUM_REQUESTS = 6
# (prefill (tp, pp), decode (tp, pp), transport)
LAYOUTS = [
    ((1, 1), (2, 1), "torch"),
    ((2, 1), (1, 1), "torch"),
    ((1, 2), (1, 1), "torch"),
    ((2, 1), (1, 2), "grpc"),
]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("parallel-instances")
    return make_tiny_model_dir(root / "gqa", "llama", num_hidden_layers=4, num_key_value_heads=2)


@pytest.fixture(scope="module")
def workload(model_dir: Path) -> tuple[list[list[int]], list[SamplingParams], list[list[int]]]:
    rng = random.Random(0)
    # Up to 40 tokens: a request's KV spans several blocks, some only partly full.
    ids = [[rng.randrange(3, 469) for _ in range(rng.randrange(5, 40))] for _ in range(6)]
    params = [SamplingParams(max_tokens=8, temperature=0, ignore_eos=True) for _ in ids]
    offline = LLM(str(model_dir), device="cpu", num_kv_blocks=64)
    expected = [o.token_ids for o in offline.generate(prompt_token_ids=ids, params=params)]
    return ids, params, expected


def _cluster(model_dir: Path, **kwargs: Any) -> Cluster:
    return Cluster(
        str(model_dir),
        num_kv_blocks=64,
        cpus_per_instance=1,
        start_timeout_s=180,
        transfer_timeout_s=20,
        **kwargs,
    )


@pytest.fixture
def started(request: pytest.FixtureRequest, ray_session: None) -> Iterator[Cluster]:
    with _cluster(request.getfixturevalue("model_dir"), **request.param) as c:
        yield c
        wait_all_blocks_free(c)


@pytest.mark.parametrize(
    "started",
    [dict(prefill_parallel=p, decode_parallel=d, transport=t) for p, d, t in LAYOUTS],
    ids=[f"{p[0]}x{p[1]}-to-{d[0]}x{d[1]}-{t}" for p, d, t in LAYOUTS],
    indirect=True,
)
def test_kv_crosses_layouts_and_outputs_equal_the_offline_engine(
    started: Cluster, workload: Any
) -> None:
    ids, params, expected = workload
    got = stream_concurrently(started, ids, params)
    assert [o.token_ids for o in got] == expected
    stats = {s.name: s for s in started.stats()}
    assert set(stats) == {"prefill-0", "decode-0"}  # one entry per instance, from rank 0
    assert stats["decode-0"].counters["pulls"] == len(ids)
    assert stats["decode-0"].counters["recomputes"] == 0


@pytest.mark.parametrize(
    "started", [dict(mode="colocated", prefill=0, decode=1, decode_parallel=(2, 1))], indirect=True
)
def test_a_colocated_tp2_instance_equals_the_offline_engine(
    started: Cluster, workload: Any
) -> None:
    ids, params, expected = workload
    got = stream_concurrently(started, ids, params)
    assert [o.token_ids for o in got] == expected


@pytest.mark.parametrize(
    "started",
    [dict(prefill_parallel=(2, 1), decode_parallel=(1, 2), fault_injection=1.0)],
    indirect=True,
)
def test_a_failed_cross_layout_pull_recomputes_with_identical_output(
    started: Cluster, workload: Any
) -> None:
    ids, params, expected = workload
    got = started.generate(prompt_token_ids=ids, params=params)
    assert [o.token_ids for o in got] == expected
    stats = {s.name: s for s in started.stats()}
    assert stats["decode-0"].counters["recomputes"] == len(ids)
    assert stats["decode-0"].counters["pulls"] == 0


def test_a_dead_rank_restarts_its_instance_and_its_requests_fail_cleanly(
    ray_session: None, model_dir: Path, workload: Any
) -> None:
    ids, params, expected = workload
    with _cluster(model_dir, decode_parallel=(2, 1), health_interval_s=0.5) as c:
        decode = next(i for i in c.instances if i.spec.role == "decode")
        long = SamplingParams(max_tokens=400, temperature=0, ignore_eos=True)
        stream = c.submit(prompt_token_ids=ids[0], params=long)
        while not (out := stream.get(timeout=60)).token_ids[1:]:  # decoding has begun
            assert not out.finished
        ray.kill(decode.ranks[0], no_restart=False)  # rank 1 dies; Ray starts a new process
        while not (out := stream.get(timeout=90)).finished:
            pass
        assert out.finish_reason == "error"
        deadline = time.monotonic() + 120
        while c.health().get("decode-0") != "serving" or not _fresh(c):
            assert time.monotonic() < deadline, f"not serving again: {c.health()}"
            time.sleep(0.2)
        got = c.generate(prompt_token_ids=ids, params=params)
        assert [o.token_ids for o in got] == expected
        wait_all_blocks_free(c)


def _fresh(cluster: Cluster) -> bool:
    """decode-0 has been restarted: the old rank 0 had stepped, a new one has not."""
    stats = {s.name: s for s in cluster.stats()}
    return "decode-0" in stats and stats["decode-0"].counters["steps"] == 0


def test_layouts_are_validated_by_name() -> None:
    with pytest.raises(ValueError, match="prefill_parallel"):
        Cluster(prefill_parallel=(0, 1))
    with pytest.raises(ValueError, match="decode_parallel"):
        Cluster(decode_parallel=(2,))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="prefill_parallel"):
        Cluster(mode="colocated", prefill_parallel=(2, 1))
