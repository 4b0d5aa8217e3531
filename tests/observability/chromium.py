"""Debian's Chromium driven by Playwright (never a browser download): launched headless
with no network side-traffic of its own, closed in ``finally``. Skips, saying why, when
the machine has no Chromium or no Playwright."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

CHROMIUM = "/usr/bin/chromium"
ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip


def artifacts_dir() -> Path:
    """Where screenshots go: $BATON_TEST_ARTIFACTS, else test-artifacts/ in the repo."""
    root = Path(__file__).resolve().parents[2]
    path = Path(os.environ.get("BATON_TEST_ARTIFACTS", root / "test-artifacts"))
    path.mkdir(parents=True, exist_ok=True)
    return path


@contextmanager
def browser() -> Iterator[Any]:
    if shutil.which(CHROMIUM) is None:
        pytest.skip(f"no Chromium at {CHROMIUM} (apt-get install -y chromium)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("playwright is not installed (pip install playwright)")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        try:
            yield b
        finally:
            b.close()
