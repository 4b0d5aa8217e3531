"""The one module that reads environment variables."""

from __future__ import annotations

import os


def attention_backend() -> str:
    """BATON_ATTENTION_BACKEND: auto (default), torch or flash."""
    return os.environ.get("BATON_ATTENTION_BACKEND", "auto")


def log_level() -> str:
    """BATON_LOG_LEVEL: a logging level name, WARNING by default."""
    return os.environ.get("BATON_LOG_LEVEL", "WARNING").upper()


def cache_dir() -> str:
    """BATON_CACHE_DIR: where compiled kernels are kept (default ~/.cache/baton)."""
    default = os.path.join(os.path.expanduser("~"), ".cache", "baton")
    return os.environ.get("BATON_CACHE_DIR", default)


def native_kernels() -> bool:
    """BATON_NATIVE_KERNELS=0 turns the compiled CPU decode kernel off."""
    return os.environ.get("BATON_NATIVE_KERNELS", "1") not in ("0", "false", "no")


def fused_ops() -> bool:
    """BATON_FUSED_OPS=0 runs the decoder layer's elementwise work (residual add + RMSNorm,
    rotary, SiLU x mul) as plain torch ops, and decode attention below 4 requests through
    the gather path, instead of the native kernels (CPU fp32; on by default)."""
    return os.environ.get("BATON_FUSED_OPS", "1") not in ("0", "false", "no")


def native_step() -> bool:
    """BATON_NATIVE_STEP=0 keeps decode steps on the fused path's per-kernel Python calls
    instead of one native call for the whole layer stack (CPU, where every GEMM of the step
    runs in the native kernels; on by default; the same bits)."""
    return os.environ.get("BATON_NATIVE_STEP", "1") not in ("0", "false", "no")


def packed_gemm() -> bool:
    """BATON_PACKED_GEMM=0 runs the GEMMs through F.linear instead of on weights packed
    once (CPU; on by default): MKL's pack for fp32 ones of 16 rows or more where MKL pays
    (the same products), oneDNN's for other fp32 ones and for bf16 (``packed_gemm``)."""
    return os.environ.get("BATON_PACKED_GEMM", "1") not in ("0", "false", "no")


def c_compiler() -> str:
    """CC: the C compiler that builds the native kernels (default cc)."""
    return os.environ.get("CC", "cc")


def host_ip() -> str | None:
    """BATON_HOST_IP: the address this host's Baton listeners bind and advertise, instead
    of the Ray node IP (like vLLM's VLLM_HOST_IP)."""
    return os.environ.get("BATON_HOST_IP") or None


def host_ifname() -> str | None:
    """BATON_HOST_IFNAME: the network interface whose IPv4 address is this host's (where a
    host has several); BATON_HOST_IP wins when both are set."""
    return os.environ.get("BATON_HOST_IFNAME") or None


def socket_ifname(name: str) -> str | None:
    """GLOO_SOCKET_IFNAME / NCCL_SOCKET_IFNAME as the user set them, if at all."""
    return os.environ.get(name) or None


def set_socket_ifname(name: str, ifname: str) -> None:
    """Set GLOO_SOCKET_IFNAME / NCCL_SOCKET_IFNAME for this process (gloo and NCCL read
    them when a group is made)."""
    os.environ[name] = ifname
