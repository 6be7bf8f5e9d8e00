"""SMS keywords: opt-out, opt-in and help words a recipient texts back, and the standard replies.

A text is a keyword only when the keyword is the whole message: surrounding whitespace and
trailing punctuation are ignored (``" Stop. "``, ``"STOP!"``, ``"stop ! !"``), letter case is
folded and compatibility forms are normalised (full-width ``ＳＴＯＰ``), but ``"please stop"``
or ``"stop it"`` are ordinary texts. The words are the ones carriers and the CTIA guidelines
treat as standard (:data:`WORDS`).

Pure: no I/O, no clock.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Mapping
from enum import StrEnum
from typing import Final

__all__ = ["WORDS", "Keyword", "classify", "reply_for"]


class Keyword(StrEnum):
    """What a keyword asks for."""

    STOP = "stop"  # opt out of messages from this sender
    START = "start"  # opt back in
    HELP = "help"  # who is this and how do I stop it


#: Each recognised word (case-folded) and what it means.
WORDS: Final[Mapping[str, Keyword]] = {
    **dict.fromkeys(
        ("stop", "stopall", "unsubscribe", "cancel", "end", "quit", "optout", "revoke"),
        Keyword.STOP,
    ),
    **dict.fromkeys(("start", "yes", "unstop", "optin"), Keyword.START),
    **dict.fromkeys(("help", "info"), Keyword.HELP),
}


def _strip_trailing_noise(text: str) -> str:
    """``text`` without the run of whitespace and punctuation it ends with."""
    end = len(text)
    while end and (text[end - 1].isspace() or unicodedata.category(text[end - 1])[0] == "P"):
        end -= 1
    return text[:end]


def classify(body: str) -> Keyword | None:
    """The keyword ``body`` is, or None when it is not exactly one of :data:`WORDS`."""
    word = _strip_trailing_noise(unicodedata.normalize("NFKC", body)).lstrip().casefold()
    return WORDS.get(word)


def reply_for(keyword: Keyword, *, brand: str, help_text: str | None = None) -> str:
    """The confirmation to text back for ``keyword``, naming ``brand`` (``ValueError`` when it
    is blank). ``help_text`` (e.g. "Support: help@acme.example") replaces the default middle
    of the HELP reply; the reply always ends by saying how to stop.

    Each default reply is GSM-7 and fits one segment (160 characters) for a GSM-7 brand of up
    to 30 characters; a longer help text or a brand outside GSM-7 may need more."""
    name = brand.strip()
    if not name:
        raise ValueError("a keyword reply names the brand; brand is blank")
    if keyword is Keyword.STOP:
        return (
            f"{name}: You are unsubscribed and will receive no more messages from us. "
            "Reply START to rejoin."
        )
    if keyword is Keyword.START:
        return (
            f"{name}: You are subscribed again. Msg&data rates may apply. "
            "Reply HELP for help, STOP to opt out."
        )
    middle = (help_text or "").strip() or "Msg&data rates may apply."
    return f"{name}: {middle} Reply STOP to unsubscribe, START to rejoin."
