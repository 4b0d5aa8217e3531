"""One helper for the planner's frozen dataclasses: fail on construction, naming the field."""

from __future__ import annotations

import dataclasses
from typing import Any, TypeVar

T = TypeVar("T")


def require(ok: bool, name: str, message: str) -> None:
    """Raise ``ValueError("name: message")`` unless ``ok``.

    Every config error in the planner reads the same way, so the CLI can print it as is and
    a user knows which flag or JSON field to fix.
    """
    if not ok:
        raise ValueError(f"{name}: {message}")


def positive(value: float, name: str) -> None:
    require(value > 0, name, f"must be > 0, got {value!r}")


def positive_int(value: int, name: str) -> None:
    require(
        isinstance(value, int) and not isinstance(value, bool) and value >= 1,
        name,
        f"must be an integer >= 1, got {value!r}",
    )


def from_fields(cls: type[T], data: Any, name: str) -> T:
    """``cls(**data)`` for a dataclass, with a JSON object's mistakes named: not an object,
    an unknown key, a missing one."""
    require(isinstance(data, dict), name, "must be a JSON object")
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - set(fields))
    require(
        not unknown,
        name,
        f"unknown field {unknown[0] if unknown else ''!r} (allowed: {', '.join(fields)})",
    )
    missing = [
        k
        for k, f in fields.items()
        if k not in data
        and f.default is dataclasses.MISSING
        and f.default_factory is dataclasses.MISSING
    ]
    require(not missing, f"{name}.{missing[0] if missing else ''}", "missing")
    return cls(**data)
