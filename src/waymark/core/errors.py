"""The error tree. Errors shown to users carry a code and, for bad input, the field path.

Adapters map these to their medium (HTTP status, CLI exit code); vendor errors are mapped to these
at the edge so that callers only ever catch :class:`WaymarkError`.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Issue:
    """One problem with one piece of input: ``path`` locates it, ``reason`` says what is wrong."""

    path: str
    reason: str
    code: str = "invalid"

    def __str__(self) -> str:
        return f"{self.path or '<root>'}: {self.reason}"


def join_path(base: str, part: str | int) -> str:
    """Join a field path the way users read it: ``a.b[2].c``."""
    if isinstance(part, int):
        return f"{base}[{part}]"
    return f"{base}.{part}" if base else part


class WaymarkError(Exception):
    """Base of every error Waymark raises on purpose."""

    code = "error"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidInput(WaymarkError):
    """Input failed validation; ``issues`` names each field and reason."""

    code = "invalid_input"

    def __init__(self, issues: Iterable[Issue], message: str | None = None) -> None:
        self.issues: Sequence[Issue] = tuple(issues)
        super().__init__(message or "; ".join(str(i) for i in self.issues) or "invalid input")


class NotFound(WaymarkError):
    """The named object does not exist (in this workspace)."""

    code = "not_found"


class Conflict(WaymarkError):
    """The request conflicts with the current state (e.g. a name already taken)."""

    code = "conflict"


class Unauthenticated(WaymarkError):
    """No valid credentials were presented."""

    code = "unauthenticated"


class Forbidden(WaymarkError):
    """The credentials are valid but lack the scope or role for this action."""

    code = "forbidden"


class LimitExceeded(WaymarkError):
    """A size or rate limit was exceeded."""

    code = "limit_exceeded"


class StoreBusy(WaymarkError):
    """A store is held by another process (e.g. the embedded event log by a running server)."""

    code = "store_busy"
