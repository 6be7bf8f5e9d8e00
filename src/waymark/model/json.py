"""Converting values to and from the JSON stored for attributes and events."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import date, datetime
from typing import Any


def to_jsonable(value: Any) -> Any:
    """Return ``value`` with datetimes and dates as ISO-8601 strings, recursively."""
    if isinstance(value, datetime | date):
        return value.isoformat()
    if isinstance(value, Mapping):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [to_jsonable(v) for v in value]
    return value


_INT64 = (-(2**63), 2**63 - 1)


def unstorable(value: Any, path: str) -> tuple[str, str] | None:
    """The first part of ``value`` no store can keep, as ``(path, reason)``, or ``None``.

    NUL characters (PostgreSQL refuses them in text and JSON) and integers outside 64 bits
    (JSON stores and columnar logs cannot hold them) are refused everywhere, so that every
    backend accepts exactly the same input.
    """
    if isinstance(value, str):
        if "\x00" in value:
            return path, "contains a NUL character (\\u0000), which cannot be stored"
        return None
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        if not _INT64[0] <= value <= _INT64[1]:
            return path, "is an integer beyond 64 bits, which cannot be stored"
        return None
    if isinstance(value, Mapping):
        for key, item in value.items():
            sub = f"{path}.{key}" if path else str(key)
            if "\x00" in str(key):
                return sub, "the name contains a NUL character (\\u0000)"
            found = unstorable(item, sub)
            if found:
                return found
        return None
    if isinstance(value, list | tuple):
        for index, item in enumerate(value):
            found = unstorable(item, f"{path}[{index}]")
            if found:
                return found
    return None
