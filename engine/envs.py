"""The one module that reads environment variables."""

from __future__ import annotations

import os


def attention_backend() -> str:
    """BATON_ATTENTION_BACKEND: auto (default), torch or flash."""
    return os.environ.get("BATON_ATTENTION_BACKEND", "auto")


def log_level() -> str:
    """BATON_LOG_LEVEL: a logging level name, WARNING by default."""
    return os.environ.get("BATON_LOG_LEVEL", "WARNING").upper()
