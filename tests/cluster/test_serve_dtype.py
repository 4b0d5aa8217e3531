"""`baton serve --dtype` and `baton profile --dtype`: a bad value exits 2 naming the flag;
`baton serve --dtype bfloat16` (a real subprocess, the default model, 1 prefill + 1 decode)
answers a completion, and every instance runs bfloat16, read back from the engines (the
ready banner lists the dtypes the instances' KV caches were allocated in); a real local
Ray with a TP2 prefill instance and a decode instance of a tiny model at bfloat16: every
rank's engine (rank 1 of the prefill one included) reports bfloat16 in its ``ping``;
`baton profile --dtype bfloat16` profiles an engine that runs bfloat16 and `baton plan`
reads what it wrote.
"""

from __future__ import annotations

import gc
import json
import re
import urllib.request
from pathlib import Path

import pytest
import ray

from cluster import Cluster, profiler
from cluster.actors import InstanceSpec
from cluster.cli import build_parser, main
from cluster.planner.cpu_host import load_cpu_profiles
from cluster.planner.latency import load_profiles
from engine import SamplingParams
from tests.engine.helpers import make_tiny_model_dir
from tests.serve_proc import ServeProcess


@pytest.mark.parametrize("command", ["serve", "profile"])
def test_a_bad_dtype_exits_2_naming_the_flag(
    command: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as info:
        main([command, "--dtype", "bf16"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "argument --dtype: invalid choice: 'bf16'" in err, err
    assert build_parser().parse_args([command]).dtype == "auto"
    assert build_parser().parse_args([command, "--dtype", "bfloat16"]).dtype == "bfloat16"


def test_the_cluster_and_each_spec_refuse_a_bad_dtype_before_anything_starts() -> None:
    with pytest.raises(ValueError, match="^dtype: must be one of auto, float32, bfloat16"):
        Cluster(dtype="int8")
    with pytest.raises(ValueError, match="^dtype: must be one of"):
        InstanceSpec("decode-0", "decode", dtype="fp8")
    spec = Cluster(dtype="bfloat16", mode="colocated", prefill=0, decode=2).instance_spec(
        "colocated-0", "colocated", 1
    )
    assert spec.dtype == "bfloat16"


def test_serve_dtype_bfloat16_answers_and_its_instances_run_bfloat16() -> None:
    gc.collect()
    with ServeProcess("--dtype", "bfloat16", "--num-kv-blocks", "64") as served:
        ready = re.search(r"baton serve: ready \((.*)\)", served.text)
        assert ready, served.text
        assert ready.group(1).endswith("; bfloat16"), ready.group(1)  # every instance's engine
        body = {"prompt": "The capital of France is", "max_tokens": 8, "temperature": 0}
        req = urllib.request.Request(
            f"{served.http}/v1/completions",
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(req, timeout=120) as r:
            reply = json.loads(r.read())
        assert reply["usage"]["completion_tokens"] == 8, reply
        assert reply["choices"][0]["text"].strip(), reply
        assert served.stop() == 0, served.tail()


def test_every_rank_of_a_tp2_instance_runs_the_clusters_dtype(
    ray_session: None, tmp_path: Path
) -> None:
    model = make_tiny_model_dir(tmp_path / "m", "llama", num_hidden_layers=2)
    with Cluster(
        str(model), dtype="bfloat16", num_kv_blocks=32, cpus_per_instance=1,
        start_timeout_s=180, prefill_parallel=(2, 1),
    ) as cluster:  # fmt: skip
        seen = {}
        for inst in cluster.instances:
            assert inst.info["dtype"] == "bfloat16", inst.info
            seen[inst.name] = ray.get(inst.actor.ping.remote(), timeout=30)["dtype"]
            for rank in inst.ranks:
                reply = ray.get(rank.ping.remote(), timeout=30)
                seen[f"{inst.name}.r{reply['rank']}"] = reply["dtype"]
        assert seen == dict.fromkeys(["prefill-0", "prefill-0.r1", "decode-0"], "bfloat16")
        # A prompt through both: the TP2 prefill's bfloat16 KV cache moves to the decode one.
        (out,) = cluster.generate(
            prompt_token_ids=[[5, 6, 7, 8, 9, 10]],
            params=SamplingParams(max_tokens=4, temperature=0, ignore_eos=True),
        )
        assert len(out.token_ids) == 4, out


def test_profile_dtype_bfloat16_profiles_a_bfloat16_engine(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # tests/cluster/test_profiler.py's grid: enough shapes for the fit.
    grid = profiler.ProfileGrid(
        prefill_lengths=(8, 32, 96), prefill_batches=(1, 3), decode_batches=(1, 3, 6),
        decode_contexts=(16, 80), decode_steps=2, repeats=1, max_batch_tokens=128,
    )  # fmt: skip
    monkeypatch.setattr(profiler, "QUICK_GRID", grid)
    model = make_tiny_model_dir(tmp_path / "m", "llama", num_hidden_layers=2)
    out = tmp_path / "cpu.json"
    argv = ["profile", "--model", str(model), "--quick", "--threads", "1", "--dtype",
            "bfloat16", "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    assert "dtype bfloat16; written to" in capsys.readouterr().out  # read from the engine
    assert list(load_profiles(out).profiles) == [(1, 1)]
    # A host profile (several thread counts) records the dtype, for `baton plan` to pass on.
    cpu = tmp_path / "cpu.json"
    argv = ["profile", "--model", str(model), "--quick", "--threads", "1,2", "--dtype",
            "bfloat16", "--out", str(cpu)]  # fmt: skip
    assert main(argv) == 0
    assert load_cpu_profiles(cpu).dtype == "bfloat16"
