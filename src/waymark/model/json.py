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
