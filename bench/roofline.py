"""This machine's ceilings, measured in the same run as the benchmark they judge.

Two numbers: matmul throughput in the model's dtype, fp32 or bf16 (the compute roofline: a
decode step of B tokens cannot beat ``B * 2 * params`` FLOPs at this rate) and memory read
bandwidth (the memory roofline: a batch-1 decode step cannot beat reading every weight
once). Both use torch with its thread count as set, because that is what the engine runs
with.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass(frozen=True)
class Roofline:
    matmul_gflops: float  # in ``dtype``, best trial
    read_gbps: float  # GB/s (1e9 bytes), best trial
    threads: int
    matmul_size: int
    read_bytes: int
    dtype: str = "float32"


def measure_matmul_gflops(
    n: int = 2048, repeats: int = 3, trials: int = 5, dtype: torch.dtype = torch.float32
) -> float:
    """Best-of-``trials`` GFLOP/s of ``repeats`` back-to-back [n, n] @ [n, n] products."""
    a = torch.randn(n, n).to(dtype)
    b = torch.randn(n, n).to(dtype)
    c = torch.empty(n, n, dtype=dtype)
    torch.mm(a, b, out=c)  # warm-up: thread pool start, oneDNN/MKL kernel selection
    best = float("inf")
    for _ in range(trials):
        start = time.perf_counter()
        for _ in range(repeats):
            torch.mm(a, b, out=c)
        best = min(best, time.perf_counter() - start)
    return 2.0 * n**3 * repeats / best / 1e9


def measure_read_gbps(nbytes: int = 1 << 30, trials: int = 5) -> float:
    """Best-of-``trials`` GB/s of summing an fp32 tensor of ``nbytes`` (far larger than cache)."""
    x = torch.empty(nbytes // 4, dtype=torch.float32)
    x.fill_(1.0)  # touch every page so the first trial does not time page faults
    x.sum()
    best = float("inf")
    for _ in range(trials):
        start = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - start)
    return x.numel() * 4 / best / 1e9


def measure(
    matmul_size: int = 2048, read_bytes: int = 1 << 30, dtype: str = "float32"
) -> Roofline:
    return Roofline(
        matmul_gflops=measure_matmul_gflops(matmul_size, dtype=getattr(torch, dtype)),
        read_gbps=measure_read_gbps(read_bytes),
        threads=torch.get_num_threads(),
        matmul_size=matmul_size,
        read_bytes=read_bytes,
        dtype=dtype,
    )


@dataclass(frozen=True)
class CpuTimes:
    """All CPUs' time since boot, in clock ticks, from ``/proc/stat``'s ``cpu`` line."""

    steal: int  # ticks the hypervisor ran something else while this VM's CPU was ready
    total: int  # user, nice, system, idle, iowait, irq, softirq and steal


def read_cpu_times(stat: Path = Path("/proc/stat")) -> CpuTimes | None:
    """The ``cpu`` line of ``stat``; None where there is none (not Linux) or it is short."""
    try:
        text = stat.read_text()
    except OSError:
        return None
    for line in text.splitlines():
        fields = line.split()
        if fields and fields[0] == "cpu" and len(fields) >= 9:
            ticks = [int(f) for f in fields[1:9]]
            return CpuTimes(steal=ticks[7], total=sum(ticks))
    return None


def steal_share(before: CpuTimes | None, after: CpuTimes | None) -> float | None:
    """The share of CPU time stolen by the hypervisor between two readings (a shared
    machine slowing under a benchmark), or None when either is missing or no time passed."""
    if before is None or after is None or after.total <= before.total:
        return None
    return (after.steal - before.steal) / (after.total - before.total)
