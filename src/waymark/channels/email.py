"""Email: the MIME document of a rendered message, and an SMTP provider that reuses its
connection.

:func:`build_mime` writes ``multipart/alternative`` (plain text first, then HTML, as RFC 2046
asks: the last part is the preferred one) with a ``Message-ID`` derived from the message id (a
retried message keeps it, so receivers that deduplicate on it see one message), ``Date`` from
when the intent was written, and, for marketing mail with an unsubscribe URL, ``List-Unsubscribe``
and ``List-Unsubscribe-Post: List-Unsubscribe=One-Click`` (RFC 2369, RFC 8058). A preheader is
the hidden first text of the HTML body (the inbox's preview line).

:class:`SmtpProvider` speaks SMTP through :mod:`smtplib` with implicit TLS (port 465),
STARTTLS (587) or neither (a local relay), with optional AUTH. One connection is kept and
reused across sends; a dropped connection is reopened once per send. Replies map to results:
4xx is transient, 5xx permanent, a refused connection or a timeout transient.

Duplicates: SMTP has no idempotency key. If the connection drops after the server accepted the
DATA but before its reply reached us, the message is retried and may arrive twice (with the same
``Message-ID``). That window is one message per connection: the dispatcher never pipelines.
"""

from __future__ import annotations

import contextlib
import smtplib
import socket
import ssl
import threading
from dataclasses import dataclass
from email.charset import QP, Charset
from email.header import Header
from email.message import Message
from email.mime.multipart import MIMEMultipart
from email.mime.text import MIMEText
from email.utils import format_datetime, formataddr, parseaddr
from html import escape
from typing import Final, Literal

from waymark.channels.base import DeliveryResult, OutgoingMessage
from waymark.delivery.templates import Channel

__all__ = ["EmailSettings", "SmtpProvider", "build_mime"]

#: Characters that keep the preview line from showing the body's first words after the preheader.
_PREVIEW_PAD: Final = "&#847;&zwnj;&nbsp;" * 40


@dataclass(frozen=True)
class EmailSettings:
    """The sender side: the default ``From`` (a template may set its own name and address), the
    domain of generated Message-IDs, and an optional ``Reply-To``."""

    from_address: str
    from_name: str | None = None
    message_id_domain: str | None = None
    reply_to: str | None = None

    @property
    def domain(self) -> str:
        return self.message_id_domain or self.from_address.rpartition("@")[2] or "localhost"


#: UTF-8 parts and headers, quoted-printable bodies (readable, and safe for 7-bit relays)
_UTF8: Final = Charset("utf-8")
_UTF8.body_encoding = QP
_UTF8.header_encoding = QP


def _header(name: str, value: str) -> str | Header:
    """A header value as written: refused with a line break in it (header injection), encoded
    (RFC 2047) when it is not ASCII."""
    if "\r" in value or "\n" in value:
        raise ValueError(f"the {name} holds a line break")
    return value if value.isascii() else Header(value, _UTF8, header_name=name)


def _address(name: str, address: str) -> str:
    """An address for a header and the envelope: the domain in IDNA when it is not ASCII; a
    local part that is not ASCII is refused (it needs SMTPUTF8)."""
    address = address.strip()
    local, at, domain = address.rpartition("@")
    if not at or not local or not domain or "\r" in address or "\n" in address:
        raise ValueError(f"the {name} address {address!r} cannot be written")
    if not local.isascii():
        raise ValueError(f"the {name} address {address!r} needs SMTPUTF8, which is not used")
    if not domain.isascii():
        domain = domain.encode("idna").decode("ascii")
    return f"{local}@{domain}"


def with_preheader(html: str, preheader: str) -> str:
    """``html`` with ``preheader`` as its hidden first text (right after ``<body>``)."""
    hidden = (
        '<div style="display:none;max-height:0;overflow:hidden;mso-hide:all">'
        f"{escape(preheader)}{_PREVIEW_PAD}</div>"
    )
    lower = html.lower()
    at = lower.find("<body")
    if at >= 0:
        end = html.find(">", at)
        if end >= 0:
            return html[: end + 1] + hidden + html[end + 1 :]
    return hidden + html


def unsubscribe_headers(message: OutgoingMessage) -> dict[str, str]:
    """``List-Unsubscribe`` with the message's URL and mailto (RFC 2369) and, when the URL is
    https, ``List-Unsubscribe-Post`` for one-click unsubscribing (RFC 8058); none without
    either."""
    links = []
    if message.unsubscribe_url:
        links.append(f"<{message.unsubscribe_url}>")
    if message.unsubscribe_mailto:
        links.append(f"<mailto:{message.unsubscribe_mailto}>")
    if not links:
        return {}
    headers = {"List-Unsubscribe": ", ".join(links)}
    if message.unsubscribe_url and message.unsubscribe_url.startswith("https://"):
        headers["List-Unsubscribe-Post"] = "List-Unsubscribe=One-Click"
    return headers


def _part(text: str, subtype: str) -> MIMEText:
    """A UTF-8, quoted-printable text part (the stubs type the charset as a name; the
    standard library takes a :class:`Charset` too, which is how quoted-printable is chosen
    without changing the process-wide default for UTF-8)."""
    return MIMEText(text, subtype, _UTF8)  # type: ignore[arg-type]


def build_mime(message: OutgoingMessage, settings: EmailSettings) -> Message:
    """The RFC 5322 message for ``message`` (an email); ``ValueError`` for another channel, an
    address that cannot be written, or a header value with a line break. Built with the
    standard library's ``email.mime`` classes (the ``EmailMessage`` API parses every header
    as it is set, several times the cost of the whole message)."""
    if message.channel is not Channel.EMAIL:
        raise ValueError(f"not an email: {message.channel.value}")
    fields = message.content.fields
    text = fields.get("text", "")
    html = fields.get("html")
    plain = _part(text, "plain")
    if html:
        preheader = fields.get("preheader")
        if preheader:
            html = with_preheader(html, preheader)
        # a boundary of the message's own (the generator otherwise draws one and compiles a
        # pattern to check it against the parts, for every message)
        own = f"=_wm_{message.id.replace('-', '')}"
        boundary = None if own in html or own in text else own
        mime: Message = MIMEMultipart("alternative", boundary=boundary)
        mime.attach(plain)
        mime.attach(_part(html, "html"))
    else:
        mime = plain
    sender = _address("sender", fields.get("from_address") or settings.from_address)
    name = fields.get("from_name") or settings.from_name
    if name:
        _header("From", name)
        mime["From"] = formataddr((name, sender), charset="utf-8")
    else:
        mime["From"] = sender
    mime["To"] = _address("recipient", message.to)
    mime["Subject"] = _header("Subject", fields.get("subject", ""))  # type: ignore[assignment]
    reply_to = fields.get("reply_to") or settings.reply_to
    if reply_to:
        mime["Reply-To"] = _address("Reply-To", reply_to)
    mime["Date"] = format_datetime(message.created_at)
    mime["Message-ID"] = f"<{message.id}@{settings.domain}>"
    for key, value in (*unsubscribe_headers(message).items(), *message.headers.items()):
        mime[key] = _header(key, value)  # type: ignore[assignment]
    return mime


def _envelope_sender(mime: Message) -> str:
    """The address of the ``From`` header (for MAIL FROM)."""
    return parseaddr(str(mime["From"]))[1]


class SmtpProvider:
    """Email over SMTP (see the module docstring). Thread-safe: sends on one instance are
    serialised over its one connection; run one instance per connection wanted."""

    channel = Channel.EMAIL

    def __init__(
        self,
        settings: EmailSettings,
        *,
        host: str,
        port: int,
        security: Literal["none", "starttls", "tls"] = "starttls",
        username: str | None = None,
        password: str | None = None,
        timeout: float = 30.0,
        tls_context: ssl.SSLContext | None = None,
        name: str = "smtp",
    ) -> None:
        self.name = name
        self.settings = settings
        self.host, self.port, self.security = host, port, security
        self.username, self.password = username, password
        self.timeout = timeout
        self.tls_context = tls_context or ssl.create_default_context()
        self._conn: smtplib.SMTP | None = None
        self._lock = threading.Lock()
        #: how many connections were opened (connection reuse is visible in tests and stats)
        self.connections = 0

    def _connect(self) -> smtplib.SMTP:
        conn: smtplib.SMTP
        if self.security == "tls":
            conn = smtplib.SMTP_SSL(
                self.host, self.port, timeout=self.timeout, context=self.tls_context
            )
        else:
            conn = smtplib.SMTP(self.host, self.port, timeout=self.timeout)
        try:
            conn.ehlo()
            if self.security == "starttls":
                conn.starttls(context=self.tls_context)
                conn.ehlo()
            if self.username is not None:
                self._login(conn)
        except BaseException:
            conn.close()
            raise
        self.connections += 1
        return conn

    def _login(self, conn: smtplib.SMTP) -> None:
        """AUTH with one mechanism, PLAIN if offered, else LOGIN (``smtplib.SMTP.login`` would
        try each in turn with the same wrong password)."""
        offered = conn.esmtp_features.get("auth", "").upper().split()
        mechanism = next((m for m in ("PLAIN", "LOGIN") if m in offered), None)
        if mechanism is None:
            raise smtplib.SMTPNotSupportedError(
                f"the server offers no AUTH mechanism Waymark speaks (offered: {offered or 'none'})"
            )
        conn.user, conn.password = self.username or "", self.password or ""
        method = conn.auth_plain if mechanism == "PLAIN" else conn.auth_login
        conn.auth(mechanism, method)

    def send(self, message: OutgoingMessage) -> DeliveryResult:
        try:
            mime = build_mime(message, self.settings)
            recipient = _address("recipient", message.to)  # as the To header has it (IDNA)
        except ValueError as exc:
            return DeliveryResult.failed(f"cannot write the message: {exc}", transient=False)
        with self._lock:
            for attempt in (1, 2):
                try:
                    if self._conn is None:
                        self._conn = self._connect()
                    refused = self._conn.send_message(
                        mime, from_addr=_envelope_sender(mime), to_addrs=[recipient]
                    )
                except smtplib.SMTPServerDisconnected as exc:
                    self._drop()
                    if attempt == 2:
                        return DeliveryResult.failed(f"server disconnected: {exc}", transient=True)
                    continue  # a reused connection the server had closed: open a new one
                except smtplib.SMTPRecipientsRefused as exc:
                    code, reply = exc.recipients.get(recipient, (550, b"refused"))
                    return self._refused(code, reply, "recipient refused")
                except smtplib.SMTPSenderRefused as exc:
                    return self._refused(exc.smtp_code, exc.smtp_error, "sender refused")
                except smtplib.SMTPAuthenticationError as exc:
                    self._drop()
                    return self._refused(exc.smtp_code, exc.smtp_error, "authentication failed")
                except smtplib.SMTPResponseException as exc:
                    self._drop()
                    return self._refused(exc.smtp_code, exc.smtp_error, "server said")
                except (OSError, smtplib.SMTPException) as exc:
                    self._drop()
                    kind = "timed out" if isinstance(exc, socket.timeout) else "cannot connect"
                    if isinstance(exc, ssl.SSLCertVerificationError):
                        kind = "TLS certificate not trusted, connecting"
                    return DeliveryResult.failed(
                        f"{kind} to {self.host}:{self.port}: {exc}", transient=True
                    )
                if refused:
                    code, reply = refused[recipient]
                    return self._refused(code, reply, "recipient refused")
                return DeliveryResult.sent(mime["Message-ID"])
        raise AssertionError("unreachable")

    @staticmethod
    def _refused(code: int, reply: bytes | str, what: str) -> DeliveryResult:
        text = reply.decode(errors="replace") if isinstance(reply, bytes) else str(reply)
        return DeliveryResult.failed(f"{what}: {code} {text}", transient=400 <= code < 500)

    def _drop(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(OSError):
                conn.close()

    def close(self) -> None:
        """Say QUIT and close the connection, if one is open."""
        with self._lock:
            conn, self._conn = self._conn, None
            if conn is not None:
                try:
                    conn.quit()
                except (OSError, smtplib.SMTPException):
                    conn.close()
