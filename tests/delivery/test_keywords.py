"""SMS keywords: which texts are STOP/START/HELP, and the replies that fit one segment."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from waymark.delivery.keywords import WORDS, Keyword, classify, reply_for
from waymark.delivery.sms import segments

OPT_OUT = ["STOP", "STOPALL", "UNSUBSCRIBE", "CANCEL", "END", "QUIT", "OPTOUT", "REVOKE"]
OPT_IN = ["START", "YES", "UNSTOP", "OPTIN"]
HELP = ["HELP", "INFO"]


@pytest.mark.parametrize(
    ("words", "keyword"), [(OPT_OUT, Keyword.STOP), (OPT_IN, Keyword.START), (HELP, Keyword.HELP)]
)
def test_the_standard_words(words: list[str], keyword: Keyword) -> None:
    for word in words:
        assert classify(word) is keyword
        assert classify(word.lower()) is keyword
        assert classify(word.capitalize()) is keyword
    assert sorted(w for w, k in WORDS.items() if k is keyword) == sorted(w.lower() for w in words)


@pytest.mark.parametrize(
    "body",
    [
        "Stop.",
        "STOP!",
        "stop!!!",
        "  stop  ",
        "\nStop\n",
        "stop?",
        "Stop. ",
        " STOP ! ",
        "ＳＴＯＰ",
    ],
)
def test_whitespace_trailing_punctuation_and_width_are_ignored(body: str) -> None:
    assert classify(body) is Keyword.STOP


@pytest.mark.parametrize(
    "body",
    [
        "",
        "   ",
        "!",
        "stop it",
        "please stop",
        "STOP STOP",
        "st op",
        "stopp",
        "don't stop",
        "yes please",
        "help me",
        "stop, I mean start",
        "unsubscribe me",
    ],
)
def test_a_keyword_must_be_the_whole_message(body: str) -> None:
    assert classify(body) is None


@given(
    word=st.sampled_from(sorted(WORDS)),
    flips=st.lists(st.booleans(), min_size=11, max_size=11),
    before=st.text(" \t\n", max_size=3),
    after=st.text(" \t\n.!?", max_size=4),
)
def test_any_casing_and_trailing_noise(
    word: str, flips: list[bool], before: str, after: str
) -> None:
    cased = "".join(ch.upper() if flip else ch for ch, flip in zip(word, flips, strict=False))
    assert classify(before + cased + after) is WORDS[word]


@pytest.mark.parametrize("brand", ["Acme", "Acme Coffee Roasters", "B" * 30])
def test_each_reply_names_the_brand_and_fits_one_gsm7_segment(brand: str) -> None:
    for keyword in Keyword:
        reply = reply_for(keyword, brand=brand)
        assert reply.startswith(f"{brand}: ")
        parts = segments(reply)
        assert (parts.encoding, parts.parts) == ("GSM-7", 1), (keyword, reply)


def test_what_each_reply_says() -> None:
    stop = reply_for(Keyword.STOP, brand="Acme")
    assert "no more messages" in stop and "START" in stop
    start = reply_for(Keyword.START, brand="Acme")
    assert "subscribed" in start and "STOP" in start and "HELP" in start
    help_ = reply_for(Keyword.HELP, brand="Acme")
    assert "STOP" in help_
    # each reply is itself no keyword (an echo cannot loop)
    assert all(classify(reply_for(k, brand="Acme")) is None for k in Keyword)


def test_help_text_replaces_the_default_but_keeps_how_to_stop() -> None:
    reply = reply_for(Keyword.HELP, brand=" Acme ", help_text=" Support: help@acme.example ")
    assert reply == "Acme: Support: help@acme.example Reply STOP to unsubscribe, START to rejoin."
    assert segments(reply).parts == 1
    assert reply_for(Keyword.HELP, brand="Acme", help_text="  ") == reply_for(
        Keyword.HELP, brand="Acme"
    )


def test_a_blank_brand_is_refused() -> None:
    with pytest.raises(ValueError, match="brand"):
        reply_for(Keyword.STOP, brand="  ")
