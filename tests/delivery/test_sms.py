"""SMS segment counting and E.164 numbers."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from waymark.delivery.sms import Segments, e164, segments


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", Segments("GSM-7", 0, 0)),
        ("a" * 160, Segments("GSM-7", 1, 160)),
        ("a" * 161, Segments("GSM-7", 2, 161)),
        ("a" * 306, Segments("GSM-7", 2, 306)),
        ("a" * 307, Segments("GSM-7", 3, 307)),
        ("€" * 80, Segments("GSM-7", 1, 160)),  # extension characters take two septets
        ("€" * 81, Segments("GSM-7", 2, 162)),
        ("a" * 152 + "€", Segments("GSM-7", 1, 154)),
        ("a" * 159 + "€", Segments("GSM-7", 2, 161)),  # the escape pair is not split: 152 + 9
        ("ç", Segments("UCS-2", 1, 1)),  # lowercase ç is not in the GSM alphabet
        ("x" * 70 + "ł", Segments("UCS-2", 2, 71)),
        ("é" * 160, Segments("GSM-7", 1, 160)),
        ("😀" * 35, Segments("UCS-2", 1, 70)),  # surrogate pairs
        ("😀" * 36, Segments("UCS-2", 2, 72)),
        ("a" * 66 + "😀", Segments("UCS-2", 1, 68)),
    ],
)
def test_segments(text: str, expected: Segments) -> None:
    assert segments(text) == expected


def test_a_pair_is_not_split_across_concatenated_segments() -> None:
    # past 70 units the text is cut in parts of at most 67, and a pair moves whole to the next
    assert segments("a" * 69 + "😀" + "ł") == Segments("UCS-2", 2, 72)
    assert segments("ł" * 66 + "😀" + "ł" * 60) == Segments("UCS-2", 2, 128)
    assert segments("ł" * 66 + "😀" + "ł" * 67) == Segments("UCS-2", 3, 135)


@given(st.text(alphabet="abc€[]{}~", max_size=700))
def test_gsm_parts_hold_every_character_and_no_part_overflows(text: str) -> None:
    counted = segments(text)
    assert counted.encoding == "GSM-7"
    assert counted.units == sum(2 if ch in "€[]{}~" else 1 for ch in text)
    if counted.units <= 160:
        assert counted.parts == (1 if text else 0)
    else:
        # at most 153 septets a part, so at least this many parts, and never a wasted one
        assert counted.parts >= -(-counted.units // 153)
        assert counted.parts <= -(-counted.units // 152)


def test_e164() -> None:
    assert e164("+49 151 12345678") == "+4915112345678"
    assert e164("0151 12345678", "DE") == "+4915112345678"
    with pytest.raises(ValueError, match="not a phone number"):
        e164("hello")
    with pytest.raises(ValueError, match="not a valid phone number"):
        e164("+49 30 1")
