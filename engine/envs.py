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


def c_compiler() -> str:
    """CC: the C compiler that builds the native kernels (default cc)."""
    return os.environ.get("CC", "cc")
