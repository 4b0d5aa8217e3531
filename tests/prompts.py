"""Natural-text prompts of mixed lengths, shared by the serving tests."""

from __future__ import annotations

import random
from typing import Any

_TOPICS = [
    "the sea",
    "a lighthouse keeper",
    "prime numbers",
    "bread baking",
    "a lost key",
    "the moon landing",
    "honey bees",
    "a chess match",
    "winter in Oslo",
    "volcanoes",
]
_PASSAGE = (
    "The history of computing is a story of people building tools to think faster. "
    "Early machines filled rooms and used vacuum tubes that failed every few hours. "
    "Transistors replaced the tubes, and integrated circuits packed thousands of them "
    "onto a single chip. Each generation made computers smaller, cheaper and faster. "
    "Programming languages grew alongside the hardware, from machine code to assembly "
    "to languages that read almost like English. Networks then linked the machines, "
    "and the web turned them into a library, a market and a meeting place at once. "
)


def text_prompts(tokenizer: Any, n: int, seed: int = 0) -> list[list[int]]:
    """Natural-text prompts of mixed lengths (about 10 to 600 tokens), as token ids; the
    shared passage gives prefix-cache hits."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        context = _PASSAGE * rng.choice([0, 0, 1, 2, 3])
        task = f"Write a few sentences about {_TOPICS[(i + seed) % len(_TOPICS)]}."
        out.append(tokenizer.encode(f"{context}{task}"))
    return out
