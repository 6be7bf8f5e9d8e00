"""Link tracking: signed tokens, click/open/unsubscribe/preferences URLs, HTML and text."""

from __future__ import annotations

import base64
import dataclasses
import re
from datetime import UTC, datetime, timedelta
from typing import Any

import lxml.html
import pytest
from hypothesis import given, provisional
from hypothesis import strategies as st
from lxml import etree

from waymark.core.errors import InvalidInput
from waymark.delivery.templates import Channel, Rendered
from waymark.delivery.tracking import (
    PIXEL_GIF,
    BadToken,
    BadTokenReason,
    Click,
    Link,
    Open,
    Preferences,
    TrackingKeys,
    Unsubscribe,
    click_url,
    open_pixel_url,
    preferences_url,
    read_click,
    read_open,
    read_preferences,
    read_token,
    read_unsubscribe,
    sign_token,
    track_email,
    track_html,
    track_text,
    unsubscribe_url,
)

OLD = b"o" * 32
NEW = b"n" * 32
KEYS = TrackingKeys.of(NEW)
BASE = "https://t.example.com"
MID = "0192f1c4-7a8b-7c3d-9e0f-123456789abc"
NOW = datetime(2026, 6, 10, 12, 0, tzinfo=UTC)
TOKEN_IN_URL = re.compile(r"/[coup]/([A-Za-z0-9_-]+)")


def reason(call: Any) -> BadTokenReason:
    with pytest.raises(BadToken) as caught:
        call()
    return caught.value.reason


def token_of(url: str) -> str:
    found = TOKEN_IN_URL.search(url)
    assert found is not None, url
    return found.group(1)


def click(url: str, link_id: int, message_id: str = MID) -> str:
    return click_url(BASE, KEYS, message_id=message_id, url=url, link_id=link_id)


def pixel(message_id: str = MID) -> str:
    return (
        f'<img src="{open_pixel_url(BASE, KEYS, message_id)}" width="1" height="1" alt="" '
        'style="display:block;width:1px;height:1px;border:0;margin:0;padding:0">'
    )


def track(html: str, **options: Any) -> Any:
    return track_html(html, base_url=BASE, keys=KEYS, message_id=MID, **options)


def shape(html: str) -> list[tuple[str, ...]]:
    """Every node of a parsed document: tag (or comment text), attributes, text and tail."""
    parser = lxml.html.HTMLParser(encoding="utf-8", default_doctype=False)
    root = lxml.html.document_fromstring(html.encode(), parser=parser)
    tree = root.getroottree()
    out: list[tuple[str, ...]] = [("doctype", tree.docinfo.doctype)]
    for node in root.iter():
        if isinstance(node, etree._Comment):
            out.append(("comment", node.text or "", node.tail or ""))
        else:
            attrs = sorted((k, v) for k, v in node.items() if k != "href")
            out.append((node.tag, repr(attrs), node.text or "", node.tail or ""))
    return out


# -- tokens ---------------------------------------------------------------------------------------


def test_a_token_round_trips_its_payload() -> None:
    payload = {"m": MID, "n": 3, "text": "Grüße 😀", "nested": {"a": [1, None, True]}}
    token = sign_token(KEYS, payload, purpose="survey")
    assert re.fullmatch(r"[A-Za-z0-9_-]+", token)
    assert read_token(KEYS, token, purpose="survey") == payload


def test_the_same_payload_gives_the_same_token() -> None:
    assert sign_token(KEYS, {"a": 1}, purpose="x") == sign_token(KEYS, {"a": 1}, purpose="x")


def test_flipping_any_character_breaks_the_token() -> None:
    token = sign_token(KEYS, {"m": MID, "u": "https://example.com/"}, purpose="click")
    for index, char in enumerate(token):
        flipped = token[:index] + ("A" if char != "A" else "B") + token[index + 1 :]
        with pytest.raises(BadToken):
            read_token(KEYS, flipped, purpose="click")
    # in the middle (tag, purpose or payload), any change is a bad signature
    middle = len(token) // 2
    flipped = token[:middle] + ("A" if token[middle] != "A" else "B") + token[middle + 1 :]
    assert reason(lambda: read_token(KEYS, flipped, purpose="click")) is (
        BadTokenReason.BAD_SIGNATURE
    )


@pytest.mark.parametrize(
    "token",
    ["", "!", "abc$def", "a" * 20_000, "AAAA", "A", "ab.cd", "abc=", " " + "A" * 40],
)
def test_what_is_not_a_token_is_malformed(token: str) -> None:
    assert reason(lambda: read_token(KEYS, token, purpose="click")) is BadTokenReason.MALFORMED


def test_a_non_canonical_spelling_of_a_token_is_malformed() -> None:
    raw = b"\x01" + b"x" * 30  # 31 bytes: the last character carries 4 unused bits
    token = base64.urlsafe_b64encode(raw).rstrip(b"=").decode()
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    twin = token[:-1] + alphabet[alphabet.index(token[-1]) ^ 1]  # flip an unused bit
    assert base64.urlsafe_b64decode(twin + "==") == raw  # decodes to the same bytes
    assert reason(lambda: read_token(KEYS, twin, purpose="click")) is BadTokenReason.MALFORMED


def test_an_unknown_version_is_malformed() -> None:
    token = sign_token(KEYS, {"a": 1}, purpose="click")
    raw = bytearray(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
    raw[0] = 2
    other = base64.urlsafe_b64encode(bytes(raw)).rstrip(b"=").decode()
    assert reason(lambda: read_token(KEYS, other, purpose="click")) is BadTokenReason.MALFORMED


def test_keys_rotate_the_new_one_signs_and_the_old_one_still_verifies() -> None:
    old_token = sign_token(TrackingKeys.of(OLD), {"a": 1}, purpose="click")
    rotated = TrackingKeys.of(NEW, OLD)
    assert read_token(rotated, old_token, purpose="click") == {"a": 1}
    new_token = sign_token(rotated, {"a": 1}, purpose="click")
    assert read_token(TrackingKeys.of(NEW), new_token, purpose="click") == {"a": 1}
    assert reason(lambda: read_token(TrackingKeys.of(OLD), new_token, purpose="click")) is (
        BadTokenReason.BAD_SIGNATURE
    )
    # once the old key is dropped, its tokens stop working
    assert reason(lambda: read_token(KEYS, old_token, purpose="click")) is (
        BadTokenReason.BAD_SIGNATURE
    )


def test_a_token_for_one_purpose_is_refused_for_another() -> None:
    token = token_of(click("https://example.com/", 1))
    assert reason(lambda: read_token(KEYS, token, purpose="unsubscribe")) is (
        BadTokenReason.WRONG_PURPOSE
    )
    assert reason(lambda: read_unsubscribe(KEYS, token)) is BadTokenReason.WRONG_PURPOSE
    assert reason(lambda: read_open(KEYS, token)) is BadTokenReason.WRONG_PURPOSE
    assert reason(lambda: read_preferences(KEYS, token)) is BadTokenReason.WRONG_PURPOSE


def test_the_purpose_is_signed_relabelling_a_token_breaks_it() -> None:
    token = sign_token(KEYS, {"a": 1}, purpose="click")
    raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
    relabelled = raw.replace(b"click\x00", b"clock\x00")
    forged = base64.urlsafe_b64encode(relabelled).rstrip(b"=").decode()
    assert reason(lambda: read_token(KEYS, forged, purpose="clock")) is (
        BadTokenReason.BAD_SIGNATURE
    )


def test_a_token_without_not_after_never_expires() -> None:
    token = sign_token(KEYS, {"a": 1}, purpose="click")
    assert read_token(KEYS, token, purpose="click", now=NOW + timedelta(days=3650)) == {"a": 1}


def test_not_after_is_honoured_when_given() -> None:
    limit = int(NOW.timestamp())
    token = sign_token(KEYS, {"a": 1, "not_after": limit}, purpose="preferences")
    assert read_token(KEYS, token, purpose="preferences", now=NOW)["a"] == 1
    late = NOW + timedelta(seconds=1)
    assert reason(lambda: read_token(KEYS, token, purpose="preferences", now=late)) is (
        BadTokenReason.EXPIRED
    )
    with pytest.raises(ValueError, match="now"):
        read_token(KEYS, token, purpose="preferences")
    with pytest.raises(ValueError, match="now"):
        read_token(KEYS, token, purpose="preferences", now=NOW.replace(tzinfo=None))


def test_a_tampered_token_is_a_bad_signature_before_it_is_expired() -> None:
    token = sign_token(KEYS, {"not_after": 0}, purpose="click")
    middle = len(token) // 2
    flipped = token[:middle] + ("A" if token[middle] != "A" else "B") + token[middle + 1 :]
    assert reason(lambda: read_token(KEYS, flipped, purpose="click", now=NOW)) is (
        BadTokenReason.BAD_SIGNATURE
    )


@pytest.mark.parametrize("not_after", ["2026-01-01", 1.5, True])
def test_not_after_must_be_unix_seconds(not_after: Any) -> None:
    with pytest.raises(ValueError, match="not_after"):
        sign_token(KEYS, {"not_after": not_after}, purpose="click")


@pytest.mark.parametrize("purpose", ["", "Click", "a b", "x" * 40, "1st"])
def test_a_purpose_is_a_short_lowercase_name(purpose: str) -> None:
    with pytest.raises(ValueError, match="purpose"):
        sign_token(KEYS, {}, purpose=purpose)


def test_keys_need_long_enough_secrets() -> None:
    with pytest.raises(InvalidInput) as caught:
        TrackingKeys.of(NEW, b"short")
    assert [str(i) for i in caught.value.issues] == ["keys[1]: a secret of at least 16 bytes"]
    with pytest.raises(InvalidInput):
        TrackingKeys(())
    with pytest.raises(InvalidInput, match=r"TrackingKeys\.of"):
        TrackingKeys(NEW)  # type: ignore[arg-type]


def test_keys_do_not_show_their_secrets() -> None:
    assert "nnnn" not in repr(KEYS)


# -- clicks ---------------------------------------------------------------------------------------


def test_a_click_url_round_trips() -> None:
    url = click_url(
        BASE + "/", KEYS, message_id=MID, url="https://example.com/a?b=1&c=d#e", link_id=3
    )
    assert url.startswith(f"{BASE}/c/")
    assert "/" not in url.removeprefix(f"{BASE}/c/")
    assert read_click(KEYS, token_of(url)) == Click(MID, "https://example.com/a?b=1&c=d#e", 3)


def test_a_base_url_may_have_a_path() -> None:
    url = click_url(
        "https://t.example.com/acme", KEYS, message_id=MID, url="https://e.com/", link_id=1
    )
    assert url.startswith("https://t.example.com/acme/c/")


@pytest.mark.parametrize(
    "destination",
    ["mailto:someone@example.com?subject=Hi", "tel:+4930123456", "HTTPS://EXAMPLE.COM/Path"],
)
def test_mailto_tel_and_any_case_http_are_allowed_destinations(destination: str) -> None:
    assert read_click(KEYS, token_of(click(destination, 1))).url == destination


@pytest.mark.parametrize(
    "destination",
    [
        "javascript:alert(1)",
        "JavaScript:alert(1)",
        " javascript:alert(1)",
        "java\tscript:alert(1)",
        "data:text/html;base64,PHNjcmlwdD4=",
        "vbscript:msgbox",
        "file:///etc/passwd",
        "ftp://example.com/",
        "/relative/path",
        "//example.com/protocol-relative",
        "https://",
        "https:///path",
        "https://example.com/a b",
        "https://example.com/\r\nSet-Cookie: x",
        "",
        "https://example.com/" + "a" * 9000,
    ],
)
def test_unsafe_or_invalid_destinations_are_refused(destination: str) -> None:
    with pytest.raises(InvalidInput) as caught:
        click(destination, 1)
    assert [i.path for i in caught.value.issues] == ["url"]


def test_every_bad_argument_is_named() -> None:
    with pytest.raises(InvalidInput) as caught:
        click_url(
            "ftp://t.example.com?x=1",
            KEYS,
            message_id="",
            url="javascript:x",
            link_id=-1,
        )
    assert [i.path for i in caught.value.issues] == ["base_url", "message_id", "url", "link_id"]


@pytest.mark.parametrize(
    "base",
    ["t.example.com", "https://t.example.com/?a=1", "https://t.example.com/#x", "https://u@t.x"],
)
def test_a_base_url_is_a_plain_http_url(base: str) -> None:
    with pytest.raises(InvalidInput) as caught:
        click_url(base, KEYS, message_id=MID, url="https://e.com/", link_id=1)
    assert [i.path for i in caught.value.issues] == ["base_url"]


def test_a_click_token_signed_with_an_unsafe_destination_is_refused_when_read() -> None:
    token = sign_token(KEYS, {"m": MID, "u": "javascript:alert(1)", "l": 1}, purpose="click")
    assert reason(lambda: read_click(KEYS, token)) is BadTokenReason.MALFORMED


def test_a_click_url_may_expire() -> None:
    url = click_url(BASE, KEYS, message_id=MID, url="https://e.com/", link_id=1, not_after=NOW)
    assert read_click(KEYS, token_of(url), now=NOW).url == "https://e.com/"
    later = NOW + timedelta(hours=1)
    assert reason(lambda: read_click(KEYS, token_of(url), now=later)) is BadTokenReason.EXPIRED
    with pytest.raises(ValueError, match="aware"):
        click_url(
            BASE,
            KEYS,
            message_id=MID,
            url="https://e.com/",
            link_id=1,
            not_after=NOW.replace(tzinfo=None),
        )


_PATH_CHARS = st.characters(
    codec="utf-8",
    exclude_categories=("Cc", "Cs", "Zs", "Zl", "Zp"),
    exclude_characters="#?",
)


@st.composite
def http_urls(draw: st.DrawFn) -> str:
    """http(s) URLs, including non-ASCII paths, odd queries and fragments."""
    scheme = draw(st.sampled_from(["http", "https", "HTTPS"]))
    host = draw(
        st.from_regex(r"[a-z0-9]([a-z0-9-]{0,20}[a-z0-9])?(\.[a-z]{2,6}){1,3}", fullmatch=True)
    )
    port = draw(st.one_of(st.just(""), st.integers(1, 65535).map(lambda p: f":{p}")))
    path = draw(st.text(_PATH_CHARS, max_size=40))
    query = draw(st.one_of(st.just(""), st.text(_PATH_CHARS, max_size=30).map("?{}".format)))
    fragment = draw(st.one_of(st.just(""), st.text(_PATH_CHARS, max_size=10).map("#{}".format)))
    return f"{scheme}://{host}{port}/{path}{query}{fragment}"


@given(
    url=st.one_of(provisional.urls(), http_urls()),
    link_id=st.integers(0, 10_000),
    message_id=st.text(min_size=1, max_size=64),
)
def test_any_http_url_survives_a_click_round_trip_exactly(
    url: str, link_id: int, message_id: str
) -> None:
    tracked = click(url, link_id, message_id)
    assert re.fullmatch(r"https://t\.example\.com/c/[A-Za-z0-9_-]+", tracked)
    assert read_click(KEYS, token_of(tracked)) == Click(message_id, url, link_id)


# -- opens ----------------------------------------------------------------------------------------


def test_an_open_pixel_url_round_trips_with_or_without_its_extension() -> None:
    url = open_pixel_url(BASE, KEYS, MID)
    assert re.fullmatch(r"https://t\.example\.com/o/[A-Za-z0-9_-]+\.gif", url)
    token = url.removeprefix(f"{BASE}/o/")
    assert read_open(KEYS, token) == Open(MID)
    assert read_open(KEYS, token.removesuffix(".gif")) == Open(MID)


def test_the_pixel_is_a_transparent_1x1_gif89a() -> None:
    gif = PIXEL_GIF
    assert len(gif) == 43
    assert gif[:6] == b"GIF89a"
    width, height = int.from_bytes(gif[6:8], "little"), int.from_bytes(gif[8:10], "little")
    assert (width, height) == (1, 1)
    packed = gif[10]
    assert packed & 0x80  # a global colour table follows
    table_size = 3 * 2 ** ((packed & 0x07) + 1)
    at = 13 + table_size
    # graphic control extension: transparency on, for colour index `transparent`
    assert gif[at : at + 3] == b"\x21\xf9\x04"
    assert gif[at + 3] & 0x01
    transparent = gif[at + 6]
    assert transparent < table_size // 3
    assert gif[at + 7] == 0
    at += 8
    # image descriptor: a 1x1 image at (0, 0), no local colour table
    assert gif[at] == 0x2C
    assert [int.from_bytes(gif[at + i : at + i + 2], "little") for i in (1, 3, 5, 7)] == [
        0,
        0,
        1,
        1,
    ]
    assert gif[at + 9] & 0x80 == 0
    at += 10
    assert 2 <= gif[at] <= 8  # LZW minimum code size
    at += 1
    while gif[at] != 0:  # data sub-blocks
        at += gif[at] + 1
    assert gif[at + 1 :] == b";"  # the trailer, and nothing after it


# -- unsubscribe and preferences ------------------------------------------------------------------


def test_an_unsubscribe_url_round_trips() -> None:
    url = unsubscribe_url(
        BASE, KEYS, message_id=MID, profile_id="p-1", channel=Channel.EMAIL, purpose="marketing"
    )
    assert url.startswith(f"{BASE}/u/")
    read = read_unsubscribe(KEYS, token_of(url))
    assert read == Unsubscribe(MID, "p-1", Channel.EMAIL, "marketing")
    with pytest.raises(dataclasses.FrozenInstanceError):
        read.profile_id = "p-2"  # type: ignore[misc]


def test_a_preferences_url_round_trips_and_may_expire() -> None:
    url = preferences_url(BASE, KEYS, message_id=MID, profile_id="p-1")
    assert url.startswith(f"{BASE}/p/")
    assert read_preferences(KEYS, token_of(url)) == Preferences(MID, "p-1")
    expiring = preferences_url(BASE, KEYS, message_id=MID, profile_id="p-1", not_after=NOW)
    later = NOW + timedelta(days=1)
    assert reason(lambda: read_preferences(KEYS, token_of(expiring), now=later)) is (
        BadTokenReason.EXPIRED
    )


def test_unsubscribe_arguments_are_checked() -> None:
    with pytest.raises(InvalidInput) as caught:
        unsubscribe_url(
            BASE,
            KEYS,
            message_id=MID,
            profile_id="",
            channel="email",  # type: ignore[arg-type]
            purpose="",
        )
    assert [i.path for i in caught.value.issues] == ["profile_id", "channel", "purpose"]


# -- HTML -----------------------------------------------------------------------------------------

DOCUMENT = "\n".join(
    [
        '<!DOCTYPE html PUBLIC "-//W3C//DTD XHTML 1.0 Transitional//EN"'
        ' "http://www.w3.org/TR/xhtml1/DTD/xhtml1-transitional.dtd">',
        '<html xmlns="http://www.w3.org/1999/xhtml" xmlns:v="urn:schemas-microsoft-com:vml"'
        ' lang="de">',
        "<head>",
        '<meta http-equiv="Content-Type" content="text/html; charset=utf-8">',
        "<!--[if mso]><xml><o:OfficeDocumentSettings><o:PixelsPerInch>96</o:PixelsPerInch>"
        "</o:OfficeDocumentSettings></xml><![endif]-->",
        '<style type="text/css">td > a { color: #ff0000; }'
        " @media (max-width: 600px) { .col { width: 100% !important; } }</style>",
        "<title>Grüße</title>",
        "</head>",
        '<body style="margin:0;padding:0">',
        '<!--[if mso]><v:roundrect href="https://example.com/buy?a=1&amp;b=2"'
        ' style="height:40px"><center>Buy</center></v:roundrect><![endif]-->',
        '<!--[if !mso]><!-- --><a href="https://example.com/buy?a=1&amp;b=2" class="btn">'
        "Buy now</a><!--<![endif]-->",
        '<table role="presentation" width="100%"><tr><td class="col" nowrap>'
        "Schöne Grüße — 😀</td></tr></table>",
        '<p><a href="https://example.com/logo">'
        '<img src="https://cdn.example.com/logo.png" alt="Logo"></a></p>',
        '<p><a href="mailto:help@example.com?subject=Hello there">Write to us</a>'
        ' <a href="#top">Top</a></p>',
        "</body>",
        "</html>",
        "",
    ]
)


def test_a_document_keeps_its_structure_and_only_its_links_change() -> None:
    tracked = track(DOCUMENT)
    buy, logo = "https://example.com/buy?a=1&b=2", "https://example.com/logo"
    assert tracked.links == (Link(1, buy, "Buy now"), Link(2, logo, "Logo"))
    expected = (
        DOCUMENT.replace('href="https://example.com/buy?a=1&amp;b=2"', f'href="{click(buy, 1)}"')
        .replace('href="https://example.com/logo"', f'href="{click(logo, 2)}"')
        .replace("</p>\n</body>", f"</p>\n{pixel()}</body>")
    )
    assert tracked.html == expected


def test_entities_and_non_ascii_text_mean_the_same_after_tracking() -> None:
    html = (
        "<!DOCTYPE html><html><head><title>Caf&eacute; &amp; Bar</title></head><body>"
        '<p title="&quot;quoted&quot; &lt;b&gt;">5 &lt; 6 &amp;&amp; 7 &gt; 6 &copy; &#8364;'
        " &#x1F600;&nbsp;Ünïcødé 中文 עברית</p>"
        '<a href="https://example.com/?q=caf%C3%A9&amp;x=&lt;y&gt;">Café&nbsp;link</a>'
        "</body></html>"
    )
    tracked = track(html, track_opens=False)
    assert shape(tracked.html) == shape(html)
    before = lxml.html.document_fromstring(html.encode(), lxml.html.HTMLParser(encoding="utf-8"))
    after = lxml.html.document_fromstring(
        tracked.html.encode(), lxml.html.HTMLParser(encoding="utf-8")
    )
    assert after.text_content() == before.text_content()
    assert "5 &lt; 6 &amp;&amp; 7 &gt; 6" in tracked.html  # markup characters stay escaped
    assert tracked.links == (Link(1, "https://example.com/?q=caf%C3%A9&x=<y>", "Café link"),)


def test_an_xml_declaration_and_surrounding_whitespace_are_kept() -> None:
    html = (
        '<?xml version="1.0" encoding="utf-8"?>\n'
        "<!DOCTYPE html>\n<html><body><p>x</p></body></html>\n"
    )
    assert track(html, track_opens=False).html == html


def test_a_document_without_a_doctype_gets_none() -> None:
    html = "<html><body><p>x</p></body></html>"
    assert track(html, track_opens=False).html == html


def test_a_fragment_stays_a_fragment() -> None:
    html = 'Hello <b>you</b>,<p>see <a href="https://example.com/x">this</a></p>and bye\n'
    tracked = track(html)
    expected = (
        f'Hello <b>you</b>,<p>see <a href="{click("https://example.com/x", 1)}">this</a></p>'
        f"and bye\n{pixel()}"
    )
    assert tracked.html == expected
    assert "<html" not in tracked.html and "<body" not in tracked.html


def test_a_fragment_keeps_leading_style_and_comments() -> None:
    html = "<style>p > a { color: red; }</style><!-- note --><p>x</p><!--[if mso]>y<![endif]-->"
    assert track(html, track_opens=False).html == html


def test_links_that_are_not_http_are_left_exactly_as_they_were() -> None:
    html = (
        '<a href="mailto:help@example.com?subject=Hello there&amp;body=Grüße">m</a>'
        '<a href="tel:+49 30 123456">t</a><a href="sms:+4930123456">s</a>'
        '<a href="#section-2">anchor</a><a href="/relative/page">rel</a>'
        '<a href="javascript:void(0)">js</a><a>no href</a><a href="">empty</a>'
        '<img src="https://cdn.example.com/ä b.png" alt="">'
        '<form action="https://example.com/ü s"></form>'
    )
    tracked = track(html, track_opens=False)
    assert tracked.html == html
    assert tracked.links == ()


def test_liquid_leftovers_are_not_tracked() -> None:
    html = (
        '<a href="https://example.com/?id={{ profile.id }}">a</a>'
        '<a href="https://example.com/{% if x %}y{% endif %}">b</a>'
        '<a href="https://example.com/%7B%7Bprofile.id%7D%7D">c</a>'
    )
    tracked = track(html, track_opens=False)
    assert tracked.html == html
    assert tracked.links == ()


def test_notrack_keeps_a_link_and_the_attribute_goes_either_way() -> None:
    html = (
        '<a data-wm-notrack href="https://example.com/a">a</a>'
        '<div data-wm-notrack="true"><p><a href="https://example.com/b">b</a></p></div>'
        '<a href="https://example.com/c">c</a><span data-wm-notrack>d</span>'
    )
    tracked = track(html, track_opens=False)
    expected = (
        '<a href="https://example.com/a">a</a>'
        '<div><p><a href="https://example.com/b">b</a></p></div>'
        f'<a href="{click("https://example.com/c", 1)}">c</a><span>d</span>'
    )
    assert tracked.html == expected
    assert tracked.links == (Link(1, "https://example.com/c", "c"),)
    untracked = track(html, track_clicks=False, track_opens=False)
    assert "data-wm-notrack" not in untracked.html
    assert untracked.links == ()


def test_own_unsubscribe_and_preferences_links_keep_working_as_they_are() -> None:
    unsubscribe = unsubscribe_url(
        BASE, KEYS, message_id=MID, profile_id="p-1", channel=Channel.EMAIL, purpose="marketing"
    )
    preferences = preferences_url(BASE, KEYS, message_id=MID, profile_id="p-1")
    html = f'<a href="{unsubscribe}">Unsubscribe</a> | <a href="{preferences}">Preferences</a>'
    tracked = track(html, track_opens=False)
    assert tracked.html == html
    assert tracked.links == ()


def test_a_site_on_the_tracking_host_is_still_tracked() -> None:
    html = f'<a href="{BASE}/blog/post">post</a>'
    assert track(html, track_opens=False).links == (Link(1, f"{BASE}/blog/post", "post"),)


def test_tracking_twice_changes_nothing_more() -> None:
    once = track(DOCUMENT)
    twice = track(once.html)
    assert twice.html == once.html
    assert twice.links == ()


def test_links_get_ids_in_document_order_with_their_text() -> None:
    html = (
        '<a href="https://e.com/1">  First\n   link </a>'
        '<a href="https://e.com/2"><img src="x.png" alt="Hero image"></a>'
        '<a href="https://e.com/3" title="Icon"><img src="x.png"></a>'
        '<a href="https://e.com/1">First again</a>'
        '<map><area href="https://e.com/4" alt="map"></map>'
    )
    tracked = track(html, track_opens=False)
    assert tracked.links == (
        Link(1, "https://e.com/1", "First link"),
        Link(2, "https://e.com/2", "Hero image"),
        Link(3, "https://e.com/3", "Icon"),
        Link(4, "https://e.com/1", "First again"),
        Link(5, "https://e.com/4", "map"),
    )
    assert [read_click(KEYS, t).link_id for t in TOKEN_IN_URL.findall(tracked.html)] == [
        1,
        2,
        3,
        4,
        5,
    ]


def test_an_href_is_tracked_as_a_browser_would_follow_it() -> None:
    html = '<a href="  https://example.com/a\n/b?q=x y\t ">x</a>'
    tracked = track(html, track_opens=False)
    assert tracked.links == (Link(1, "https://example.com/a/b?q=x%20y", "x"),)


def test_an_outlook_button_link_shares_the_id_of_its_twin() -> None:
    tracked = track(DOCUMENT)
    comment = re.search(r"<!--\[if mso\]><v:roundrect href=\"([^\"]+)\"", tracked.html)
    assert comment is not None
    assert read_click(KEYS, token_of(comment.group(1))) == Click(
        MID, "https://example.com/buy?a=1&b=2", 1
    )


def test_a_link_only_in_a_conditional_comment_gets_the_next_id() -> None:
    html = (
        '<a href="https://e.com/a">a</a>'
        "<!--[if mso]><a href='https://e.com/mso'>mso</a><a href=\"mailto:x@y.z\">m</a><![endif]-->"
        '<!-- a plain comment: <a href="https://e.com/plain">p</a> -->'
    )
    tracked = track(html, track_opens=False)
    assert tracked.links == (Link(1, "https://e.com/a", "a"), Link(2, "https://e.com/mso", ""))
    assert 'href="mailto:x@y.z"' in tracked.html
    assert '<!-- a plain comment: <a href="https://e.com/plain">p</a> -->' in tracked.html


def test_the_pixel_goes_just_before_the_end_of_the_body() -> None:
    html = "<!DOCTYPE html><html><body><p>x</p></body></html>"
    assert track(html).html == f"<!DOCTYPE html>\n<html><body><p>x</p>{pixel()}</body></html>"


def test_the_pixel_is_added_to_a_body_that_is_not_closed() -> None:
    html = "<html><body><p>x</p>"
    assert track(html).html == f"<html><body><p>x</p>{pixel()}</body></html>"


def test_opens_and_clicks_can_be_turned_off() -> None:
    assert pixel() not in track(DOCUMENT, track_opens=False).html
    no_clicks = track(DOCUMENT, track_clicks=False)
    assert no_clicks.links == ()
    assert no_clicks.html == DOCUMENT.replace("</p>\n</body>", f"</p>\n{pixel()}</body>")


def test_blank_html_is_returned_as_it_is() -> None:
    assert track("").html == ""
    assert track("  \n").html == "  \n"
    assert track("<!DOCTYPE html>\n").html == "<!DOCTYPE html>\n"


def test_track_html_checks_its_arguments() -> None:
    with pytest.raises(InvalidInput) as caught:
        track_html("<p>x</p>", base_url="nope", keys=KEYS, message_id="")
    assert [i.path for i in caught.value.issues] == ["base_url", "message_id"]


# -- text -----------------------------------------------------------------------------------------


def text(value: str, known: tuple[Link, ...] = ()) -> Any:
    return track_text(value, base_url=BASE, keys=KEYS, message_id=MID, known=known)


def test_bare_urls_in_text_are_tracked_without_the_punctuation_around_them() -> None:
    tracked = text(
        "Shop: https://e.com/shop. Docs (https://e.com/wiki/A_(b)), "
        "«https://e.com/fr», <https://e.com/angle> and https://e.com/q?x=1&y=2!\n"
        "Again: https://e.com/shop"
    )
    urls = [
        "https://e.com/shop",
        "https://e.com/wiki/A_(b)",
        "https://e.com/fr",
        "https://e.com/angle",
        "https://e.com/q?x=1&y=2",
    ]
    assert tracked.links == tuple(Link(i, u, "") for i, u in enumerate(urls, start=1))
    c = [click(u, i) for i, u in enumerate(urls, start=1)]
    assert tracked.text == (
        f"Shop: {c[0]}. Docs ({c[1]}), «{c[2]}», <{c[3]}> and {c[4]}!\nAgain: {c[0]}"
    )


def test_text_links_take_the_ids_of_the_html_links() -> None:
    html_links = (Link(1, "https://e.com/a", "A"), Link(2, "https://e.com/b", "B"))
    tracked = text("B: https://e.com/b\nNew: https://e.com/new\nA: https://e.com/a", html_links)
    assert tracked.links == (html_links[1], Link(3, "https://e.com/new", ""), html_links[0])
    assert [read_click(KEYS, t).link_id for t in TOKEN_IN_URL.findall(tracked.text)] == [2, 3, 1]


def test_text_leaves_other_urls_alone() -> None:
    unsubscribe = unsubscribe_url(
        BASE, KEYS, message_id=MID, profile_id="p-1", channel=Channel.EMAIL, purpose="marketing"
    )
    value = (
        "Mail help@example.com or mailto:help@example.com, call tel:+4930123456, "
        "see https://e.com/{{ x }} or ftp://e.com/f or www.e.com.\n"
        f"Unsubscribe: {unsubscribe}\n"
    )
    tracked = text(value)
    assert tracked.text == value
    assert tracked.links == ()


# -- a rendered email -----------------------------------------------------------------------------


def test_an_email_gets_both_parts_tracked_with_the_same_link_ids() -> None:
    content = Rendered(
        Channel.EMAIL,
        {
            "subject": "Hi",
            "html": '<p><a href="https://e.com/a">A</a> <a href="https://e.com/b">B</a></p>',
            "text": "B: https://e.com/b\nC: https://e.com/c\n",
        },
    )
    tracked = track_email(content, base_url=BASE, keys=KEYS, message_id=MID)
    assert tracked.links == (
        Link(1, "https://e.com/a", "A"),
        Link(2, "https://e.com/b", "B"),
        Link(3, "https://e.com/c", ""),
    )
    fields = tracked.content.fields
    assert fields["subject"] == "Hi"
    assert fields["text"] == f"B: {click('https://e.com/b', 2)}\nC: {click('https://e.com/c', 3)}\n"
    assert fields["html"].endswith(pixel())
    assert content.fields["text"].startswith("B: https://e.com/b")  # the input is not changed


def test_a_text_only_email_and_an_untracked_email() -> None:
    content = Rendered(Channel.EMAIL, {"subject": "Hi", "text": "https://e.com/a"})
    tracked = track_email(content, base_url=BASE, keys=KEYS, message_id=MID)
    assert tracked.content.fields["text"] == click("https://e.com/a", 1)
    assert "html" not in tracked.content.fields
    off = track_email(
        content, base_url=BASE, keys=KEYS, message_id=MID, track_clicks=False, track_opens=False
    )
    assert off.content.fields == content.fields
    assert off.links == ()


def test_only_emails_are_tracked() -> None:
    with pytest.raises(ValueError, match="not an email"):
        track_email(
            Rendered(Channel.SMS, {"text": "https://e.com"}),
            base_url=BASE,
            keys=KEYS,
            message_id=MID,
        )
