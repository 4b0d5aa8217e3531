"""Results of the engine benchmark and their markdown rendering (the README's tables).

The targets are issue 2's: Baton at least 4x transformers' padded batch and 15x its
one-at-a-time loop in output tok/s, at least half the compute roofline at batch 64, and a
batch-1 decode step within 1.2x of the memory roofline and no slower than transformers'.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from bench.roofline import Roofline

TARGET_VS_PADDED = 4.0
TARGET_VS_ONE_AT_A_TIME = 15.0
TARGET_ROOFLINE_SHARE_AT_64 = 0.5
TARGET_STEP_VS_MEMORY_ROOFLINE = 1.2
TARGET_STEP_VS_TRANSFORMERS = 1.0


@dataclass(frozen=True)
class Throughput:
    label: str
    prompts_run: int  # how many of the workload's prompts were actually generated
    output_tokens: int
    seconds: float

    @property
    def tokens_per_s(self) -> float:
        return self.output_tokens / self.seconds


@dataclass(frozen=True)
class DecodeResult:
    batch: int
    steps: int
    tokens_per_s: float
    median_step_s: float


@dataclass(frozen=True)
class PathCompare:
    """One step kind timed with a switch on and off, alternating step by step in the same
    run (so the machine's load weighs on both alike)."""

    label: str  # e.g. "decode, batch 64"
    steps: int  # timed steps per setting
    on_step_s: float  # median, switch on (the default)
    off_step_s: float  # median, switch off (the old path)
    switch: str = "BATON_FUSED_OPS"  # the environment variable that turns it off


@dataclass
class Report:
    model: str
    parameters: int
    weight_bytes: int
    torch_version: str
    roof: Roofline
    num_prompts: int
    prompt_len: tuple[int, int]
    output_len: int
    seed: int
    throughput: list[Throughput] = field(default_factory=list)
    decode: list[DecodeResult] = field(default_factory=list)
    hf_decode_step_s: float | None = None
    transformers_version: str | None = None
    paths: list[PathCompare] = field(default_factory=list)
    # Read GB/s measured again right after the batch-1 decode steps: this machine's
    # bandwidth moves with its neighbours' load (31-52 GB/s on two cores within one hour).
    read_gbps_beside_batch1: float | None = None
    # The batch-1 step's own weights (the copies its kernels stream, where they lie in
    # memory) read once in one native call, best time, right after the batch-1 steps; and
    # their bytes. None without the native kernels. On this machine the read rate depends
    # on the allocation (one 1 GiB sum read 59 and 33 GB/s on alternate allocations in one
    # process), so this, not a rate read off another buffer, is the step's memory roofline.
    step_weights_read_s: float | None = None
    step_weight_bytes: int | None = None

    @property
    def compute_roofline_tokens_per_s(self) -> float:
        return self.roof.matmul_gflops * 1e9 / (2 * self.parameters)

    @property
    def memory_read_gbps(self) -> float:
        """The memory roofline's bandwidth: the higher of the run's start and the reading
        beside the batch-1 steps (the stricter judge of the step)."""
        return max(self.roof.read_gbps, self.read_gbps_beside_batch1 or 0.0)

    @property
    def bandwidth_step_s(self) -> float:
        """The weights' bytes at ``memory_read_gbps``: the roofline a rate read off another
        buffer gives."""
        return self.weight_bytes / (self.memory_read_gbps * 1e9)

    @property
    def memory_roofline_step_s(self) -> float:
        """The least time a batch-1 step can take to read its weights: the time to read
        them where they lie, where measured, else ``bandwidth_step_s``."""
        if self.step_weights_read_s is not None:
            return self.step_weights_read_s
        return self.bandwidth_step_s

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        for entry, t in zip(data["throughput"], self.throughput, strict=True):
            entry["tokens_per_s"] = t.tokens_per_s
        for entry, d in zip(data["decode"], self.decode, strict=True):
            entry["compute_roofline_share"] = d.tokens_per_s / self.compute_roofline_tokens_per_s
        data["compute_roofline_tokens_per_s"] = self.compute_roofline_tokens_per_s
        data["memory_roofline_step_s"] = self.memory_roofline_step_s
        data["bandwidth_step_s"] = self.bandwidth_step_s
        return data


def _verdict(ok: bool) -> str:
    return "met" if ok else "missed"


def _throughput_table(r: Report) -> list[str]:
    baton = r.throughput[0].tokens_per_s
    targets = {"padded": TARGET_VS_PADDED, "one at a time": TARGET_VS_ONE_AT_A_TIME}
    lines = [
        "| system | prompts run | output tok/s | Baton speed-up | target |",
        "|---|---|---:|---:|---|",
    ]
    for t in r.throughput:
        runs = f"{t.prompts_run}" if t.prompts_run == r.num_prompts else (
            f"{t.prompts_run} of {r.num_prompts} (rate extrapolated)")
        speedup = baton / t.tokens_per_s
        target = next((v for k, v in targets.items() if k in t.label), None)
        verdict = "" if target is None else f">= {target:g}x: {_verdict(speedup >= target)}"
        lines.append(f"| {t.label} | {runs} | {t.tokens_per_s:.1f} | {speedup:.1f}x | {verdict} |")
    return lines


def _decode_table(r: Report) -> list[str]:
    roof = r.compute_roofline_tokens_per_s
    lines = [
        "| decode batch | Baton tok/s | median step (ms) | compute roofline tok/s | share "
        "| target |",
        "|---:|---:|---:|---:|---:|---|",
    ]
    for d in r.decode:
        share = d.tokens_per_s / roof
        verdict = ""
        if d.batch == 64:
            ok = share >= TARGET_ROOFLINE_SHARE_AT_64
            verdict = f">= {TARGET_ROOFLINE_SHARE_AT_64:.0%}: {_verdict(ok)}"
        lines.append(f"| {d.batch} | {d.tokens_per_s:.1f} | {d.median_step_s * 1e3:.1f} | "
                     f"{roof:.0f} | {share:.1%} | {verdict} |")
    return lines


def _step_table(r: Report) -> list[str]:
    one = next((d for d in r.decode if d.batch == 1), None)
    if one is None:
        return []
    step = one.median_step_s
    mem = r.memory_roofline_step_s
    target = (f"<= {TARGET_STEP_VS_MEMORY_ROOFLINE}: "
              f"{_verdict(step / mem <= TARGET_STEP_VS_MEMORY_ROOFLINE)}")
    rate = (f"{r.weight_bytes / 1e6:.0f} MB of weights at the 1 GiB sum's "
            f"{r.memory_read_gbps:.1f} GB/s")
    lines = [
        "| batch-1 decode step | ms | Baton's step / this | target |",
        "|---|---:|---:|---|",
        f"| Baton | {step * 1e3:.1f} | 1.00 | |",
    ]
    if r.step_weights_read_s is None:
        lines.append(f"| memory roofline ({rate}) | {mem * 1e3:.1f} | {step / mem:.2f} | "
                     f"{target} |")
    else:
        read_gbps = (r.step_weight_bytes or 0) / r.step_weights_read_s / 1e9
        band = r.bandwidth_step_s
        lines += [
            f"| memory roofline: the step's {(r.step_weight_bytes or 0) / 1e6:.0f} MB of "
            f"weights read once where they lie ({read_gbps:.1f} GB/s) | {mem * 1e3:.1f} | "
            f"{step / mem:.2f} | {target} |",
            f"| for reference: {rate} (another allocation) | {band * 1e3:.1f} | "
            f"{step / band:.2f} | |",
        ]
    if r.hf_decode_step_s is not None:
        hf = r.hf_decode_step_s
        lines.append(f"| transformers (past_key_values loop) | {hf * 1e3:.1f} | {step / hf:.2f} | "
                     f"<= {TARGET_STEP_VS_TRANSFORMERS:g}: "
                     f"{_verdict(step / hf <= TARGET_STEP_VS_TRANSFORMERS)} |")
    return lines


def _paths_table(r: Report) -> list[str]:
    if not r.paths:
        return []
    lines = [
        "| step (alternating on/off) | switch | steps each | off (ms) | on (ms) | on / off |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for p in r.paths:
        lines.append(f"| {p.label} | {p.switch} | {p.steps} | {p.off_step_s * 1e3:.1f} | "
                     f"{p.on_step_s * 1e3:.1f} | {p.on_step_s / p.off_step_s:.2f} |")
    return lines


_DTYPE_NAMES = {"float32": "fp32", "bfloat16": "bf16"}


def format_report(r: Report) -> str:
    lo, hi = r.prompt_len
    header = [
        f"Model: {r.model} ({r.parameters / 1e6:.1f} M parameters, "
        f"{r.weight_bytes / 1e6:.0f} MB as {_DTYPE_NAMES.get(r.roof.dtype, r.roof.dtype)}).",
        f"Machine: {_DTYPE_NAMES.get(r.roof.dtype, r.roof.dtype)} matmul "
        f"{r.roof.matmul_gflops:.1f} GFLOP/s "
        f"({r.roof.matmul_size}^3, best of 5), memory read {r.roof.read_gbps:.1f} GB/s "
        f"(sum of {r.roof.read_bytes / 2**30:.2g} GiB, best of 5"
        + ("" if r.read_gbps_beside_batch1 is None else
           f"; {r.read_gbps_beside_batch1:.1f} right after the batch-1 steps")
        + f"); torch {r.torch_version}, "
        f"{r.roof.threads} threads"
        + (f"; transformers {r.transformers_version}." if r.transformers_version else "."),
        f"Workload: {r.num_prompts} prompts of {lo}..{hi} random tokens (seed {r.seed}), "
        f"{r.output_len} output tokens each, greedy, ignore_eos.",
    ]
    sections = [header, _throughput_table(r), _decode_table(r), _step_table(r), _paths_table(r)]
    return "\n\n".join("\n".join(s) for s in sections if s)
