"""Email link tracking: signed tokens, the click, open, unsubscribe and preferences URLs, and
the rewriting of a message's HTML and text parts to go through them.

**Tokens** (:func:`sign_token`, :func:`read_token`) are one URL-safe path segment: the
unpadded base64url of ``version (1 byte) | tag (16 bytes) | purpose | NUL | JSON payload``,
where ``tag`` is HMAC-SHA256 truncated to 128 bits over everything but itself, keyed by a key
derived from a workspace secret (so a secret shared with another use cannot forge tokens here).
The **purpose** (``click``, ``open``, ``unsubscribe``, ``preferences`` or a caller's own) is
signed with the payload, so a click token is never accepted as an unsubscribe token. Reading
checks, in this order, and raises :class:`BadToken` with the first that fails: the form (the
alphabet, canonical base64, the version), the signature (against every key of
:class:`TrackingKeys`: the first signs, all verify, which is how keys rotate), the purpose, and,
when the payload has ``not_after`` (Unix seconds), the expiry against ``now``. Tokens do not
expire unless asked to: links in old emails keep working. Tokens are signed, not encrypted:
whoever holds a link can read what it carries (ids and the destination), never change it. The
same payload always gives the same token, so a message rendered again is the same message.

**URLs** hang off a configured base (``https://t.example.com``, or with a path); tokens carry no
workspace, so a workspace's keys are found from its base URL (``https://t.example.com/acme``):

- ``{base}/c/{token}`` a click: message id, destination URL, link id. The endpoint redirects to
  the URL it reads from the signed token, so it can never be an open redirect. Destinations are
  http(s), mailto or tel only; never ``javascript:`` or ``data:`` (refused when signing). A
  destination may hold non-ASCII characters: the redirect must encode its ``Location`` header
  (Starlette's ``RedirectResponse`` does).
- ``{base}/o/{token}.gif`` an open: the message id; the endpoint answers :data:`PIXEL_GIF`.
- ``{base}/u/{token}`` an unsubscribe (message, profile, channel, purpose: the consent key to
  revoke), fit for ``List-Unsubscribe`` one-click POSTs as well as a GET landing page.
- ``{base}/p/{token}`` the preference centre of a profile, from a message.

**HTML** (:func:`track_html`) is parsed with lxml and written back with the same structure:
doctype, head, styles, comments (Outlook's ``<!--[if mso]>`` included) and attributes stay;
a fragment stays a fragment. Character references come back as the characters they stand for,
line ends as LF; URI attributes keep their exact value (libxml2 would percent-escape them).
Each ``<a href>``/``<area href>`` whose scheme is http(s) becomes a click URL, in document
order with link ids 1, 2, …; then ``href="…"`` attributes inside conditional comments (VML
buttons for Outlook) are rewritten too, taking the id of the ``<a>`` with the same URL. Left as
they are: other schemes (``mailto:``, ``tel:``), relative links and ``#anchors``, URLs with
Liquid left in them (``{{``, ``{%``: a template rendered incompletely), links inside or on an
element with ``data-wm-notrack`` (the attribute is removed from the output either way), and
links to this module's own endpoints under the base URL: an unsubscribe or preferences link
records its own event and must keep working as the same URL as ``List-Unsubscribe``, and an
already tracked document is not wrapped twice. The open pixel goes just before ``</body>`` (at
the end of a fragment), unless one for this base is already there. Gmail clips a message over
about 102 kB, and with it an end-of-body pixel: keep messages below that.

**Text** (:func:`track_text`) gets the same for bare http(s) URLs, so clicks from text-only
clients count, with the ids of the HTML's links for the same URL (:func:`track_email` does both
parts of a rendered email).

Pure: no I/O, no clock (``now`` is an argument), no network (lxml is told so).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import re
import unicodedata
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from enum import StrEnum
from html import escape, unescape
from typing import Any, Final

import lxml.html
from lxml import etree

from waymark.core.errors import InvalidInput, Issue, WaymarkError
from waymark.delivery.templates import Channel, Rendered

__all__ = [
    "MAX_URL",
    "NOTRACK",
    "PIXEL_GIF",
    "BadToken",
    "BadTokenReason",
    "Click",
    "Link",
    "Open",
    "Preferences",
    "TokenPurpose",
    "TrackedEmail",
    "TrackedHtml",
    "TrackedText",
    "TrackingKeys",
    "Unsubscribe",
    "click_url",
    "open_pixel_url",
    "preferences_url",
    "read_click",
    "read_open",
    "read_preferences",
    "read_token",
    "read_unsubscribe",
    "sign_token",
    "track_email",
    "track_html",
    "track_text",
    "unsubscribe_url",
]

#: A transparent 1x1 GIF89a (43 bytes): one palette entry, made transparent by the graphic
#: control extension, and one LZW-coded pixel.
PIXEL_GIF: Final = (
    b"GIF89a\x01\x00\x01\x00\x80\x00\x00\x00\x00\x00\xff\xff\xff"
    b"!\xf9\x04\x01\x00\x00\x00\x00"
    b",\x00\x00\x00\x00\x01\x00\x01\x00\x00\x02\x02D\x01\x00;"
)
#: The attribute that keeps a link (or every link inside an element) from being tracked.
NOTRACK: Final = "data-wm-notrack"
#: Longest destination URL a click token may carry.
MAX_URL: Final = 8192
#: Shortest secret accepted (128 bits).
MIN_SECRET: Final = 16
#: Longest id (message, profile) a token may carry.
MAX_ID: Final = 256

_VERSION: Final = 1
_TAG: Final = 16
_MAX_TOKEN: Final = 16_384
_KEY_LABEL: Final = b"waymark.delivery.tracking/v1"
_TOKEN_CHARS: Final = re.compile(r"[A-Za-z0-9_-]+")
_PURPOSE: Final = re.compile(r"[a-z][a-z0-9_.-]{0,31}")
_SCHEME: Final = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*):")
_HTTP: Final = re.compile(r"https?://[^/?#]+", re.IGNORECASE)
_BASE: Final = re.compile(r"https?://[^\x00-\x20\x7f/?#@]+(?:/[^\x00-\x20\x7f?#]*)?", re.I)
_CONTROL_OR_SPACE: Final = re.compile(r"[\x00-\x20\x7f]")
_LIQUID: Final = re.compile(r"\{\{|\{%|%7B%7B|%7B%25", re.IGNORECASE)
_ENDPOINTS: Final = ("c", "o", "u", "p")
_DOCUMENT: Final = re.compile(r"<!doctype|<(?:html|head|body)[\s>/]", re.IGNORECASE)
_XML_DECLARATION: Final = re.compile(r"\s*<\?xml[^>]*\?>", re.IGNORECASE)
_COMMENT_HREF: Final = re.compile(r"""(\bhref\s*=\s*)(?:"([^"]*)"|'([^']*)')""", re.IGNORECASE)
_TEXT_URL: Final = re.compile(r"(?<![\w@/.+-])https?://[^\s<>\"]+", re.IGNORECASE)
_TRAILING: Final = ".,;:!?'\"*"
_CLOSERS: Final = {")": "(", "]": "[", "}": "{"}
#: Attributes libxml2 percent-escapes when it writes HTML (``name`` only on ``<a>``).
_URI_ATTRIBUTES: Final = frozenset({"href", "src", "action", "name"})
_MAX_LINK_TEXT: Final = 200
_PIXEL_STYLE: Final = "display:block;width:1px;height:1px;border:0;margin:0;padding:0"


# -- keys and tokens ------------------------------------------------------------------------------


@dataclass(frozen=True)
class TrackingKeys:
    """A workspace's tracking secrets (bytes, at least 16 each; 32 random bytes recommended):
    the first signs, every one verifies. To rotate, put the new secret first and keep the old
    ones for as long as their emails' links should work. :class:`InvalidInput` when empty or a
    secret is too short. The secrets never show in ``repr``."""

    secrets: tuple[bytes, ...] = field(repr=False)
    _macs: tuple[bytes, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if isinstance(self.secrets, bytes | str):
            raise InvalidInput([Issue("keys", "a sequence of secrets: TrackingKeys.of(secret)")])
        secrets = tuple(self.secrets)
        issues = [
            Issue(f"keys[{index}]", f"a secret of at least {MIN_SECRET} bytes")
            for index, secret in enumerate(secrets)
            if not isinstance(secret, bytes) or len(secret) < MIN_SECRET
        ]
        if not secrets:
            issues.append(Issue("keys", "at least one secret is needed"))
        if issues:
            raise InvalidInput(issues)
        object.__setattr__(self, "secrets", secrets)
        macs = tuple(hmac.new(s, _KEY_LABEL, hashlib.sha256).digest() for s in secrets)
        object.__setattr__(self, "_macs", macs)

    @classmethod
    def of(cls, *secrets: bytes) -> TrackingKeys:
        """``TrackingKeys.of(new, old)``: the same as ``TrackingKeys((new, old))``."""
        return cls(secrets)


class TokenPurpose(StrEnum):
    """The purposes of this module's tokens; each is its own domain of signatures."""

    CLICK = "click"
    OPEN = "open"
    UNSUBSCRIBE = "unsubscribe"
    PREFERENCES = "preferences"


class BadTokenReason(StrEnum):
    """Why a token was refused."""

    MALFORMED = "malformed"  # not a token of ours: alphabet, base64, version, payload
    BAD_SIGNATURE = "bad_signature"  # altered, or signed by a key we do not hold
    WRONG_PURPOSE = "wrong_purpose"  # genuine, but made for another use
    EXPIRED = "expired"  # genuine, but past its not_after


class BadToken(WaymarkError):
    """A token was refused; ``reason`` says why."""

    code = "bad_token"

    def __init__(self, reason: BadTokenReason, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def _tag(mac_key: bytes, signed: bytes) -> bytes:
    return hmac.new(mac_key, signed, hashlib.sha256).digest()[:_TAG]


def _check_purpose(purpose: str) -> None:
    if not isinstance(purpose, str) or not _PURPOSE.fullmatch(purpose):
        raise ValueError(f"a token purpose is [a-z][a-z0-9_.-]{{0,31}}, not {purpose!r}")


def sign_token(keys: TrackingKeys, payload: Mapping[str, Any], *, purpose: str) -> str:
    """The token carrying ``payload`` (a JSON object) for ``purpose``, signed with the first key.

    ``payload["not_after"]``, when present, is an int of Unix seconds after which
    :func:`read_token` refuses the token. ``ValueError`` for a bad purpose or ``not_after``, or
    a payload that JSON cannot write (``TypeError`` for a value of another type)."""
    _check_purpose(purpose)
    not_after = payload.get("not_after")
    if not_after is not None and (not isinstance(not_after, int) or isinstance(not_after, bool)):
        raise ValueError("not_after is an int of Unix seconds")
    body = json.dumps(dict(payload), separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    head = bytes([_VERSION])
    rest = purpose.encode("ascii") + b"\0" + body.encode("utf-8")
    return _b64(head + _tag(keys._macs[0], head + rest) + rest)


def read_token(
    keys: TrackingKeys, token: str, *, purpose: str, now: datetime | None = None
) -> dict[str, Any]:
    """The payload of ``token`` if it is genuine (any of ``keys``), made for ``purpose`` and,
    when it has ``not_after``, not expired at ``now``; else :class:`BadToken` with the first
    reason, in the order of the module docstring. ``ValueError`` when the token expires and
    ``now`` is missing or naive (time is the caller's to give)."""
    _check_purpose(purpose)
    malformed = BadToken(BadTokenReason.MALFORMED, "not a tracking token")
    if not isinstance(token, str) or len(token) > _MAX_TOKEN or not _TOKEN_CHARS.fullmatch(token):
        raise malformed
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
    except (binascii.Error, ValueError):
        raise malformed from None
    # One token, one spelling: the unused low bits of the last character must be zero.
    if _b64(raw) != token or len(raw) < 1 + _TAG + 2 or raw[0] != _VERSION:
        raise malformed
    tag, rest = raw[1 : 1 + _TAG], raw[1 + _TAG :]
    nul = rest.find(b"\0")
    if nul < 1:
        raise malformed
    signed = raw[:1] + rest
    if not any(hmac.compare_digest(tag, _tag(mac, signed)) for mac in keys._macs):
        raise BadToken(BadTokenReason.BAD_SIGNATURE, "the token's signature does not verify")
    actual = rest[:nul].decode("ascii", errors="replace")
    if actual != purpose:
        raise BadToken(BadTokenReason.WRONG_PURPOSE, f"a token for {actual!r}, not for {purpose!r}")
    try:
        payload = json.loads(rest[nul + 1 :])
    except ValueError:
        raise malformed from None
    if not isinstance(payload, dict):
        raise malformed
    not_after = payload.get("not_after")
    if not_after is not None:
        if not isinstance(not_after, int) or isinstance(not_after, bool):
            raise malformed
        if now is None or now.utcoffset() is None:
            raise ValueError("this token has an expiry: pass now, timezone-aware")
        if now.timestamp() > not_after:
            raise BadToken(BadTokenReason.EXPIRED, "the token has expired")
    return payload


# -- what the tokens carry ------------------------------------------------------------------------


@dataclass(frozen=True)
class Click:
    """A click on link ``link_id`` of message ``message_id``, going to ``url``."""

    message_id: str
    url: str
    link_id: int


@dataclass(frozen=True)
class Open:
    """An open of message ``message_id`` (its pixel was fetched)."""

    message_id: str


@dataclass(frozen=True)
class Unsubscribe:
    """Profile ``profile_id`` asks, from message ``message_id``, to revoke its consent for
    ``(channel, purpose)``."""

    message_id: str
    profile_id: str
    channel: Channel
    purpose: str


@dataclass(frozen=True)
class Preferences:
    """Profile ``profile_id`` opens its preference centre from message ``message_id``."""

    message_id: str
    profile_id: str


def _base_problem(base_url: Any) -> str | None:
    if isinstance(base_url, str) and _BASE.fullmatch(base_url):
        return None
    return "an http(s) URL without query, fragment or user, e.g. https://t.example.com"


def _destination_problem(url: Any) -> str | None:
    """Why ``url`` may not be a click's destination, or None."""
    if not isinstance(url, str) or not url:
        return "a URL is required"
    if len(url) > MAX_URL:
        return f"longer than {MAX_URL:,} characters"
    if _CONTROL_OR_SPACE.search(url):
        return "a URL has no spaces or control characters (percent-encode them)"
    scheme = _SCHEME.match(url)
    if scheme is None:
        return "not an absolute URL"
    name = scheme.group(1).lower()
    if name in {"http", "https"}:
        return None if _HTTP.match(url) else "an http(s) URL needs a host"
    if name in {"mailto", "tel"}:
        return None
    return f"the scheme {name!r} is not allowed: only http, https, mailto and tel"


def _id_problem(value: Any) -> str | None:
    if isinstance(value, str) and 0 < len(value) <= MAX_ID:
        return None
    return f"a non-empty string of at most {MAX_ID} characters"


def _check(problems: Mapping[str, str | None]) -> None:
    """:class:`InvalidInput` with an issue per argument whose problem is not None."""
    issues = [Issue(name, reason) for name, reason in problems.items() if reason is not None]
    if issues:
        raise InvalidInput(issues)


def _signed_url(
    keys: TrackingKeys,
    base_url: str,
    endpoint: str,
    purpose: TokenPurpose,
    payload: dict[str, Any],
    checks: Mapping[str, str | None],
    not_after: datetime | None,
    suffix: str = "",
) -> str:
    """``{base}/{endpoint}/{token}{suffix}``; :class:`InvalidInput` naming each failed check."""
    _check({"base_url": _base_problem(base_url), **checks})
    if not_after is not None:
        if not_after.utcoffset() is None:
            raise ValueError("not_after must be timezone-aware")
        payload["not_after"] = int(not_after.timestamp())
    token = sign_token(keys, payload, purpose=purpose)
    return f"{base_url.rstrip('/')}/{endpoint}/{token}{suffix}"


def click_url(
    base_url: str,
    keys: TrackingKeys,
    *,
    message_id: str,
    url: str,
    link_id: int,
    not_after: datetime | None = None,
) -> str:
    """``{base_url}/c/{token}`` for a click on link ``link_id`` (an int >= 0) of message
    ``message_id`` going to ``url``, kept exactly. :class:`InvalidInput` for a bad base URL,
    id, link id or destination (see the module docstring)."""
    link_ok = isinstance(link_id, int) and not isinstance(link_id, bool) and link_id >= 0
    checks = {
        "message_id": _id_problem(message_id),
        "url": _destination_problem(url),
        "link_id": None if link_ok else "an int of at least 0",
    }
    payload = {"m": message_id, "u": url, "l": link_id}
    return _signed_url(keys, base_url, "c", TokenPurpose.CLICK, payload, checks, not_after)


def open_pixel_url(
    base_url: str, keys: TrackingKeys, message_id: str, *, not_after: datetime | None = None
) -> str:
    """``{base_url}/o/{token}.gif``, the open pixel of message ``message_id``."""
    checks = {"message_id": _id_problem(message_id)}
    return _signed_url(
        keys, base_url, "o", TokenPurpose.OPEN, {"m": message_id}, checks, not_after, ".gif"
    )


def unsubscribe_url(
    base_url: str,
    keys: TrackingKeys,
    *,
    message_id: str,
    profile_id: str,
    channel: Channel,
    purpose: str,
    not_after: datetime | None = None,
) -> str:
    """``{base_url}/u/{token}``: the link that revokes ``profile_id``'s consent for
    ``(channel, purpose)``, sent in message ``message_id``. Leave ``not_after`` unset for links
    in email bodies: the law in most places wants them to work for weeks at least."""
    checks = {
        "message_id": _id_problem(message_id),
        "profile_id": _id_problem(profile_id),
        "channel": None if isinstance(channel, Channel) else "a Channel",
        "purpose": _id_problem(purpose),
    }
    payload = {"m": message_id, "p": profile_id, "c": str(channel), "s": purpose}
    return _signed_url(keys, base_url, "u", TokenPurpose.UNSUBSCRIBE, payload, checks, not_after)


def preferences_url(
    base_url: str,
    keys: TrackingKeys,
    *,
    message_id: str,
    profile_id: str,
    not_after: datetime | None = None,
) -> str:
    """``{base_url}/p/{token}``: ``profile_id``'s preference centre, linked from message
    ``message_id``."""
    checks = {"message_id": _id_problem(message_id), "profile_id": _id_problem(profile_id)}
    payload = {"m": message_id, "p": profile_id}
    return _signed_url(keys, base_url, "p", TokenPurpose.PREFERENCES, payload, checks, not_after)


def _get(payload: Mapping[str, Any], key: str, kind: type) -> Any:
    """``payload[key]`` if it is a ``kind``; a malformed token otherwise (a token signed by
    another version of this module)."""
    value = payload.get(key)
    if not isinstance(value, kind) or isinstance(value, bool):
        raise BadToken(BadTokenReason.MALFORMED, f"the token lacks a valid {key!r}")
    return value


def read_click(keys: TrackingKeys, token: str, *, now: datetime | None = None) -> Click:
    """The click of a token made by :func:`click_url`; :class:`BadToken` as for
    :func:`read_token` (and ``malformed`` if the destination is not allowed now)."""
    payload = read_token(keys, token, purpose=TokenPurpose.CLICK, now=now)
    url = _get(payload, "u", str)
    if _destination_problem(url) is not None:
        raise BadToken(BadTokenReason.MALFORMED, "the token's destination is not allowed")
    return Click(_get(payload, "m", str), url, _get(payload, "l", int))


def read_open(keys: TrackingKeys, token: str, *, now: datetime | None = None) -> Open:
    """The open of a token made by :func:`open_pixel_url`, with or without its ``.gif``."""
    payload = read_token(keys, token.removesuffix(".gif"), purpose=TokenPurpose.OPEN, now=now)
    return Open(_get(payload, "m", str))


def read_unsubscribe(keys: TrackingKeys, token: str, *, now: datetime | None = None) -> Unsubscribe:
    """The request of a token made by :func:`unsubscribe_url`."""
    payload = read_token(keys, token, purpose=TokenPurpose.UNSUBSCRIBE, now=now)
    try:
        channel = Channel(_get(payload, "c", str))
    except ValueError:
        raise BadToken(BadTokenReason.MALFORMED, "the token names no known channel") from None
    return Unsubscribe(
        _get(payload, "m", str), _get(payload, "p", str), channel, _get(payload, "s", str)
    )


def read_preferences(keys: TrackingKeys, token: str, *, now: datetime | None = None) -> Preferences:
    """The request of a token made by :func:`preferences_url`."""
    payload = read_token(keys, token, purpose=TokenPurpose.PREFERENCES, now=now)
    return Preferences(_get(payload, "m", str), _get(payload, "p", str))


# -- rewriting content ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Link:
    """A tracked link: its id in the message, its destination and what the reader saw (the
    link's text, else an image's or an ``<area>``'s ``alt``, else the link's ``title``, cut at
    200 characters; empty for a link found only in a text part or a conditional comment)."""

    link_id: int
    url: str
    text: str


@dataclass(frozen=True)
class TrackedHtml:
    """The rewritten HTML and its tracked links, by link id."""

    html: str
    links: tuple[Link, ...]


@dataclass(frozen=True)
class TrackedText:
    """The rewritten text and the tracked links it contains."""

    text: str
    links: tuple[Link, ...]


@dataclass(frozen=True)
class TrackedEmail:
    """A rendered email with tracked parts, and every tracked link of both parts."""

    content: Rendered
    links: tuple[Link, ...]


class _Linker:
    """Gives link ids, one per link found, reusing the first id of a URL where asked."""

    def __init__(self, base: str, keys: TrackingKeys, message_id: str, known: Sequence[Link]):
        self.base, self.keys, self.message_id = base, keys, message_id
        self.links: list[Link] = []
        self.by_url: dict[str, Link] = {}
        for link in known:
            self.by_url.setdefault(link.url, link)
        self.next_id = max((link.link_id for link in known), default=0) + 1
        lower = base.lower()
        self.own = tuple(f"{lower}/{endpoint}/" for endpoint in _ENDPOINTS)

    def trackable(self, url: str) -> bool:
        return (
            _HTTP.match(url) is not None
            and _destination_problem(url) is None
            and not _LIQUID.search(url)
            and not url.lower().startswith(self.own)
        )

    def new(self, url: str, text: str) -> Link:
        link = Link(self.next_id, url, text)
        self.next_id += 1
        self.links.append(link)
        self.by_url.setdefault(url, link)
        return link

    def reuse(self, url: str) -> Link:
        """The link already given for ``url`` (recorded once more here), else a new one."""
        link = self.by_url.get(url)
        if link is None:
            return self.new(url, "")
        if link not in self.links:
            self.links.append(link)
        return link

    def click(self, link: Link) -> str:
        return click_url(
            self.base, self.keys, message_id=self.message_id, url=link.url, link_id=link.link_id
        )


def _clean_href(href: str) -> str:
    """What a browser follows for ``href``: no surrounding spaces or controls, no tabs or line
    breaks, spaces percent-encoded."""
    value = href.strip("".join(map(chr, range(0x21))))
    value = value.replace("\t", "").replace("\n", "").replace("\r", "")
    return value.replace(" ", "%20")


def _link_text(element: Any) -> str:
    text = " ".join(element.text_content().split())
    if not text:  # an image link, or an <area>: the first alt text, else the title
        alts = (e.get("alt", "") for e in element.iter("area", "img"))
        text = next((" ".join(alt.split()) for alt in alts if alt.strip()), "")
    text = text or " ".join(element.get("title", "").split())
    return text if len(text) <= _MAX_LINK_TEXT else text[: _MAX_LINK_TEXT - 1] + "…"


def _marker(*texts: str) -> str:
    """A prefix none of ``texts`` contains (made of characters libxml2 writes as they are)."""
    marker = "@wm-keep@"
    while any(marker in text for text in texts):
        marker += "@"
    return marker


def _serialize(node: Any, *avoid: str) -> str:
    """``node`` (an element or a tree) as HTML, URI attributes written exactly as they are:
    libxml2 would percent-escape them and drop their leading spaces, changing links we leave
    alone. Their values go out as numbered markers and come back after."""
    marker = _marker(*avoid, *(unescape(text) for text in avoid))
    held: list[str] = []
    root = node.getroot() if isinstance(node, etree._ElementTree) else node
    for element in root.iter(etree.Element):
        for name, value in element.items():
            if name in _URI_ATTRIBUTES:
                element.set(name, f"{marker}{len(held)}")
                held.append(value)
    out: str = etree.tostring(node, method="html", encoding="unicode")
    return re.sub(
        re.escape(marker) + r"(\d+)", lambda m: escape(held[int(m.group(1))], quote=True), out
    )


def _rewrite_comment(text: str, linker: _Linker) -> str:
    def rewrite(match: re.Match[str]) -> str:
        quoted = match.group(2) if match.group(2) is not None else match.group(3)
        url = _clean_href(unescape(quoted))
        if not linker.trackable(url):
            return match.group(0)
        return f'{match.group(1)}"{linker.click(linker.reuse(url))}"'

    return _COMMENT_HREF.sub(rewrite, text)


def track_html(
    html: str,
    *,
    base_url: str,
    keys: TrackingKeys,
    message_id: str,
    track_clicks: bool = True,
    track_opens: bool = True,
) -> TrackedHtml:
    """``html`` with its links turned into click URLs and the open pixel added, as the module
    docstring says, and the tracked links (none when ``track_clicks`` is false). A document
    (a doctype or an ``html``, ``head`` or ``body`` tag) comes back a document, anything else
    a fragment; a blank ``html``, or one without any element, comes back unchanged.
    :class:`InvalidInput` for a bad base URL or message id."""
    _check({"base_url": _base_problem(base_url), "message_id": _id_problem(message_id)})
    if not html.strip():
        return TrackedHtml(html, ())
    base = base_url.rstrip("/")
    linker = _Linker(base, keys, message_id, ())
    document = _DOCUMENT.search(html) is not None
    declaration, lead, trail, source = "", "", "", html
    if document:
        found = _XML_DECLARATION.match(html)
        if found is not None:  # the HTML parser would make it a comment
            declaration, source = found.group(0), html[found.end() :]
        lead = source[: len(source) - len(source.lstrip())]
        trail = source[len(source.rstrip()) :]
        source = source.strip()
    else:
        source = f"<html><body>{html}</body></html>"
    parser = lxml.html.HTMLParser(
        encoding="utf-8", default_doctype=False, no_network=True, remove_comments=False
    )
    try:
        root = lxml.html.document_fromstring(source.encode("utf-8"), parser=parser)
    except etree.ParserError:  # no element at all (a lone doctype): nothing to track
        return TrackedHtml(html, ())
    if track_clicks:
        for element in root.iter("a", "area"):
            href = element.get("href")
            if href is None or any(NOTRACK in e.attrib for e in element.iterancestors()):
                continue
            url = _clean_href(href)
            if NOTRACK not in element.attrib and linker.trackable(url):
                element.set("href", linker.click(linker.new(url, _link_text(element))))
        for comment in root.iter(etree.Comment):
            text = comment.text or ""
            if text.lstrip().lower().startswith("[if") and "href" in text.lower():
                comment.text = _rewrite_comment(text, linker)
    for element in root.iter(etree.Element):
        element.attrib.pop(NOTRACK, None)
    body = root.find("body")
    parent = root if body is None else body
    pixel_prefix = f"{base.lower()}/o/"
    has_pixel = any(img.get("src", "").lower().startswith(pixel_prefix) for img in root.iter("img"))
    if track_opens and not has_pixel:
        src = open_pixel_url(base, keys, message_id)
        attributes = {"src": src, "width": "1", "height": "1", "alt": "", "style": _PIXEL_STYLE}
        parent.append(root.makeelement("img", attributes))
    if document:
        out = declaration + lead + _serialize(root.getroottree(), html, base) + trail
    else:
        inner = _serialize(parent, html, base)
        out = inner[inner.index(">") + 1 : inner.rindex("</")]
    return TrackedHtml(out, tuple(linker.links))


def _trim(url: str) -> str:
    """``url`` without the punctuation that ends the sentence around it: trailing ``.,;:!?'"*``,
    non-ASCII punctuation, and closing brackets that do not close one opened in the URL."""
    while url and _ends_sentence(url):
        url = url[:-1]
    return url


def _ends_sentence(url: str) -> bool:
    last = url[-1]
    if last in _CLOSERS:
        return url.count(last) > url.count(_CLOSERS[last])
    return last in _TRAILING or (ord(last) > 0x7F and unicodedata.category(last)[0] == "P")


def track_text(
    text: str,
    *,
    base_url: str,
    keys: TrackingKeys,
    message_id: str,
    known: Sequence[Link] = (),
) -> TrackedText:
    """``text`` with each bare http(s) URL (punctuation around it left out) turned into a click
    URL, skipping the same URLs as :func:`track_html`, and the links it contains. A URL among
    ``known`` (the HTML part's links) keeps that link's id; a new URL gets the next free id,
    the same for each of its occurrences. :class:`InvalidInput` for a bad base URL or id."""
    _check({"base_url": _base_problem(base_url), "message_id": _id_problem(message_id)})
    linker = _Linker(base_url.rstrip("/"), keys, message_id, known)

    def rewrite(match: re.Match[str]) -> str:
        url = _trim(match.group(0))
        if not linker.trackable(url):
            return match.group(0)
        return linker.click(linker.reuse(url)) + match.group(0)[len(url) :]

    return TrackedText(_TEXT_URL.sub(rewrite, text), tuple(linker.links))


def track_email(
    content: Rendered,
    *,
    base_url: str,
    keys: TrackingKeys,
    message_id: str,
    track_clicks: bool = True,
    track_opens: bool = True,
) -> TrackedEmail:
    """``content`` (a rendered email) with its ``html`` tracked by :func:`track_html` and its
    ``text`` by :func:`track_text` (with the HTML's link ids), and the links of both, HTML's
    first. ``ValueError`` for another channel."""
    if content.channel is not Channel.EMAIL:
        raise ValueError(f"not an email: {content.channel.value}")
    fields = dict(content.fields)
    links: list[Link] = []
    if fields.get("html"):
        tracked = track_html(
            fields["html"],
            base_url=base_url,
            keys=keys,
            message_id=message_id,
            track_clicks=track_clicks,
            track_opens=track_opens,
        )
        fields["html"], links = tracked.html, list(tracked.links)
    if track_clicks and fields.get("text"):
        text = track_text(
            fields["text"], base_url=base_url, keys=keys, message_id=message_id, known=links
        )
        fields["text"] = text.text
        links += [link for link in text.links if link not in links]
    return TrackedEmail(replace(content, fields=fields), tuple(links))
