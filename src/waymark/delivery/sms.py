"""SMS text: encoding and segment count (GSM 03.38 / 3GPP TS 23.038), and E.164 numbers.

A text made only of the GSM 7-bit default alphabet and its extension table is sent as GSM-7:
160 septets in one segment, 153 per segment once concatenated (the user data header takes 7);
an extension character (``€``, ``[``, ``{`` …) takes two septets and is never split across
segments. Any other character sends the whole text as UCS-2: 70 UTF-16 code units in one
segment, 67 per concatenated segment, a surrogate pair (most emoji) never split.

Pure: no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

import phonenumbers

__all__ = ["Segments", "e164", "segments"]

_BASIC: Final = frozenset(
    "@£$¥èéùìòÇ\nØø\rÅåΔ_ΦΓΛΩΠΨΣΘΞ\x1bÆæßÉ !\"#¤%&'()*+,-./0123456789:;<=>?"
    "¡ABCDEFGHIJKLMNOPQRSTUVWXYZÄÖÑÜ§¿abcdefghijklmnopqrstuvwxyzäöñüà"
)
_EXTENSION: Final = frozenset("\f^{}\\[~]|€")


@dataclass(frozen=True)
class Segments:
    """How a text goes out: ``encoding`` ("GSM-7" or "UCS-2"), the number of ``parts``, and
    ``units`` (septets or UTF-16 code units) in all."""

    encoding: str
    parts: int
    units: int


def _pack(widths: list[int], single: int, multi: int) -> int:
    """Segments needed for characters of ``widths`` units, none split across segments."""
    total = sum(widths)
    if total <= single:
        return 1 if total else 0
    parts, used = 1, 0
    for width in widths:
        if used + width > multi:
            parts += 1
            used = 0
        used += width
    return parts


def segments(text: str) -> Segments:
    """The encoding and segment count of ``text`` (an empty text is 0 parts)."""
    if all(ch in _BASIC or ch in _EXTENSION for ch in text):
        widths = [2 if ch in _EXTENSION else 1 for ch in text]
        return Segments("GSM-7", _pack(widths, 160, 153), sum(widths))
    widths = [2 if ord(ch) > 0xFFFF else 1 for ch in text]
    return Segments("UCS-2", _pack(widths, 70, 67), sum(widths))


def e164(number: str, region: str | None = None) -> str:
    """``number`` in E.164 (``+4915112345678``); ``ValueError`` saying why it is not a valid
    phone number. Without a leading ``+``, ``region`` (ISO 3166 alpha-2) says whose national
    format it is."""
    try:
        parsed = phonenumbers.parse(number, region)
    except phonenumbers.NumberParseException as exc:
        raise ValueError(f"{number!r} is not a phone number: {exc}") from None
    if not phonenumbers.is_valid_number(parsed):
        raise ValueError(f"{number!r} is not a valid phone number")
    return phonenumbers.format_number(parsed, phonenumbers.PhoneNumberFormat.E164)
