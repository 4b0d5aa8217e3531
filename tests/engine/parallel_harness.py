"""Runs a TP x PP instance as spawned processes on 127.0.0.1, for the parallel tests.

The parent hosts the ``TCPStore`` (on a free port it picks itself) and spawns one process
per rank; each joins a gloo process group, runs every job in turn (a job: one layout,
one model, one batch of prompts), and writes what it saw as JSON into a folder the
parent reads: rank 0 the generated token ids, every rank its step counts. Each wait has
a timeout, and the processes are joined, or killed, before ``run_instance`` returns.
"""

from __future__ import annotations

import json
import os
import time
import traceback
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from engine.config import CacheConfig, EngineConfig, ParallelConfig, SchedulerConfig
from engine.llm_engine import LLMEngine
from engine.sampling_params import SamplingParams

GROUP_TIMEOUT = timedelta(seconds=60)
DEFAULT_FRAME_BYTES = 8192

Job = dict[str, Any]


def engine_config(job: Job, parallel: ParallelConfig | None = None) -> EngineConfig:
    return EngineConfig(
        model=job["model"],
        device="cpu",
        cache=CacheConfig(num_blocks=job["num_blocks"]),
        scheduler=SchedulerConfig(max_num_batched_tokens=job["max_num_batched_tokens"]),
        parallel=parallel or ParallelConfig(),
    )


def generate(engine: LLMEngine, job: Job) -> list[list[int]]:
    """Every prompt of ``job`` to completion, all at once; token ids in prompt order."""
    done: dict[str, list[int]] = {}
    ids = [f"r{i}" for i in range(len(job["prompts"]))]
    for request_id, prompt, params in zip(ids, job["prompts"], job["params"], strict=True):
        engine.add_request(request_id, params=SamplingParams(**params), prompt_token_ids=prompt)
    while engine.has_unfinished():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = list(out.token_ids)
    return [done[i] for i in ids]


def _run_job(job: Job, out: Path) -> None:
    from engine.parallel import comm
    from engine.parallel.worker import create_driver, create_worker

    # A small frame makes every prefill step take the two-broadcast path.
    comm.FRAME_BYTES = job.get("frame_bytes", DEFAULT_FRAME_BYTES)
    config = engine_config(job, ParallelConfig(tp=job["tp"], pp=job["pp"]))
    groups = comm.build_groups(config.parallel, timeout=GROUP_TIMEOUT)
    try:
        if groups.rank == 0:
            engine = create_driver(config, groups, keepalive_s=job.get("keepalive_s", 10.0))
            try:
                time.sleep(job.get("idle_s", 0.0))  # the other ranks live on keepalives
                result: dict[str, Any] = {"token_ids": generate(engine, job)}
                stats = engine.stats()
                result["blocks_in_use"] = stats.total_blocks - stats.free_blocks
                layout = engine.kv_blocks.layout
            finally:
                engine.close()
        else:
            worker = create_worker(config, groups)
            worker.serve()
            result = {"steps": worker.steps, "keepalives": worker.keepalives}
            layout = worker.kv_blocks.layout
        result["kv_cache"] = [layout.num_layers, layout.num_kv_heads]
        out.write_text(json.dumps(result))
    finally:
        comm.destroy_groups(groups)


def _rank_main(rank: int, world: int, port: int, jobs: list[Job], folder: str) -> None:
    torch.set_num_threads(1)  # the machine's few cores are shared by every rank
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"  # loopback only
    try:
        store = dist.TCPStore("127.0.0.1", port, None, False, GROUP_TIMEOUT)
        dist.init_process_group(
            "gloo", store=store, rank=rank, world_size=world, timeout=GROUP_TIMEOUT
        )
        for i, job in enumerate(jobs):
            _run_job(job, Path(folder) / f"job{i}-rank{rank}.json")
        dist.destroy_process_group()
    except BaseException:
        (Path(folder) / f"error-rank{rank}.txt").write_text(traceback.format_exc())
        raise SystemExit(1) from None


def run_instance(
    world: int, jobs: list[Job], folder: Path, timeout_s: float = 300.0
) -> list[list[dict[str, Any]]]:
    """Run ``jobs`` on ``world`` spawned ranks; per job, what each rank reported."""
    folder.mkdir(parents=True, exist_ok=True)
    store = dist.TCPStore("127.0.0.1", 0, None, True, GROUP_TIMEOUT, wait_for_workers=False)
    ctx = mp.get_context("spawn")
    procs = [
        ctx.Process(target=_rank_main, args=(r, world, store.port, jobs, str(folder)), daemon=True)
        for r in range(world)
    ]
    try:
        with pytest.MonkeyPatch.context() as env:
            env.setenv("OMP_NUM_THREADS", "1")  # for the native kernels' OpenMP too
            for p in procs:
                p.start()
        deadline = time.monotonic() + timeout_s
        for p in procs:
            p.join(max(0.0, deadline - time.monotonic()))
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(10)
    errors = sorted(folder.glob("error-rank*.txt"))
    if errors:
        raise AssertionError("\n".join(f"{e.name}:\n{e.read_text()}" for e in errors))
    codes = [p.exitcode for p in procs]
    assert codes == [0] * world, f"rank exit codes {codes} (None: killed at the timeout)"
    return [
        [json.loads((folder / f"job{i}-rank{r}.json").read_text()) for r in range(world)]
        for i in range(len(jobs))
    ]
