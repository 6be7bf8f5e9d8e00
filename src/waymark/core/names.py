"""Names of stored objects (audiences, templates, fragments): shown to people, part of URLs."""

from __future__ import annotations

from typing import Final

from waymark.core.errors import InvalidInput, Issue

__all__ = ["NAME_MAX", "check_name"]

#: Longest name a stored object may have.
NAME_MAX: Final = 100


def check_name(name: object, field: str = "name") -> str:
    """``name`` when it is a usable object name, else :class:`InvalidInput` on ``field``: 1 to
    :data:`NAME_MAX` characters, no spaces at either end, no control characters, ``/``, ``\\``
    or ``"`` (names are parts of URLs and file names)."""
    if not isinstance(name, str) or not name.strip() or len(name) > NAME_MAX:
        raise InvalidInput([Issue(field, f"must be a string of 1 to {NAME_MAX} characters")])
    if name != name.strip() or any(ord(c) < 32 or c in '/\\"' for c in name):
        raise InvalidInput(
            [
                Issue(
                    field,
                    "must not start or end with spaces, nor hold control characters, '/', "
                    "'\\' or '\"' (it is part of URLs and file names)",
                )
            ]
        )
    return name
