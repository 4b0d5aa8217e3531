"""Serving instances run at normal priority, not at Ray's worker niceness (15).

A real local Ray and a real cluster (a tiny random-weight Llama; a TP2 prefill instance,
so that a rank other than rank 0 is checked too, and a decode instance): every rank's
process, and every thread in it, is at niceness 0, read from the kernel with the pids
the cluster reports. A plain Ray actor in the same Ray is the control: it runs at 15,
which is what the instances would run at without their runtime env.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import ray

from cluster import Cluster
from tests.engine.helpers import make_tiny_model_dir

pytest.importorskip("transformers")


def thread_niceness(pid: int) -> dict[int, int]:
    """Per thread of ``pid``, its niceness (field 19 of /proc/PID/task/TID/stat)."""
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            stat = Path(f"/proc/{pid}/task/{tid}/stat").read_text()
        except FileNotFoundError:  # the thread ended meanwhile
            continue
        out[int(tid)] = int(stat.rsplit(")", 1)[1].split()[16])
    return out


@ray.remote
class _PlainActor:
    def pid(self) -> int:
        return os.getpid()


def test_every_rank_of_every_instance_runs_at_normal_priority(
    ray_session: None, tmp_path: Path
) -> None:
    control = _PlainActor.remote()  # type: ignore[attr-defined]
    control_pid = ray.get(control.pid.remote(), timeout=60)
    assert os.getpriority(os.PRIO_PROCESS, control_pid) == 15, "Ray's default changed?"
    ray.kill(control)

    model = make_tiny_model_dir(tmp_path / "m", "llama", num_hidden_layers=2)
    with Cluster(
        str(model), num_kv_blocks=32, cpus_per_instance=1, start_timeout_s=180,
        prefill_parallel=(2, 1),
    ) as cluster:  # fmt: skip
        pids = cluster.pids()  # rank 0 of each instance
        assert set(pids) == {"prefill-0", "decode-0"} and all(pids.values())
        for inst in cluster.instances:
            for rank in inst.ranks:
                reply = ray.get(rank.ping.remote(), timeout=30)
                pids[f"{inst.name}.r{reply['rank']}"] = reply["pid"]
        assert len(set(pids.values())) == 3, pids
        for name, pid in pids.items():
            assert os.getpriority(os.PRIO_PROCESS, pid) == 0, name
            threads = thread_niceness(pid)
            assert len(threads) > 1 and set(threads.values()) == {0}, (name, threads)


def test_threads_per_rank_defaults_per_deployment() -> None:
    """Instances sharing one host get all its cores (they oversubscribe it): colocated ones,
    and prefill/decode ones while there are no more instances than cores; ranks of a
    joined cluster or with cpus_per_instance one thread per Ray CPU; a given
    threads_per_rank or cpus_per_instance wins."""
    cores = os.cpu_count() or 1

    def threads(role: str, cpus: float = 1, **kwargs: object) -> int:
        return Cluster(**kwargs).instance_spec(f"{role}-0", role, cpus).num_threads  # type: ignore[arg-type]

    colocated = dict(mode="colocated", prefill=0, decode=2)
    assert threads("colocated", **colocated) == cores
    assert threads("colocated", cpus_per_instance=1, **colocated) == 1
    assert threads("colocated", address="10.0.0.1:6379", **colocated) == 1
    assert threads("colocated", threads_per_rank=3, **colocated) == 3
    assert (threads("prefill"), threads("decode")) == (cores, cores)  # 1 + 1 on one host
    more = dict(prefill=2, decode=2)  # more instances than cores: one thread per CPU
    assert threads("decode", **more) == (cores if cores >= 4 else 1)
    assert threads("prefill", address="10.0.0.1:6379") == 1
    assert threads("decode", cpus=2, cpus_per_instance=2) == 2
    assert threads("decode", threads_per_rank=3) == 3
