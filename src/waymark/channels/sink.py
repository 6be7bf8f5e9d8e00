"""The development sink: everything Waymark sends in the demo lands here, where it can be read.

:class:`SinkStore` keeps what arrives under one folder (the data folder's ``sink/``):

- ``mail/`` is a Maildir (any mail client reads it; :mod:`mailbox` reads it here). Each message is
  stored as the bytes the SMTP client sent (line ends as LF, the Maildir convention), after a
  prepended block of envelope headers: ``X-Sink-Mail-From`` (the envelope sender) and one
  ``X-Sink-Rcpt-To`` per envelope recipient. Only that leading block counts as the envelope, so a
  message carrying its own ``X-Sink-*`` headers cannot pass for another envelope.
- ``calls/`` holds one JSON document per message of another channel (SMS, push, webhook, inbox).

Every entry has an id that sorts in arrival order and names its channel:
``<UTC time to the microsecond>Z-<pid>-<per-process sequence>-<channel>``, e.g.
``20261202T093000123456Z-4242-00000017-sms``. Listing sorts names only, then reads the entries it
returns. The time comes from the store's clock; entries of one process received at the same
instant keep their order through the sequence.

Writes are atomic: the file is written under a temporary name, flushed to disk and renamed into
place, so a reader (a thread or another process) sees a whole entry or none. Mail is delivered by
that same Maildir protocol (``tmp/``, fsync, rename into ``new/``) rather than with
:meth:`mailbox.Maildir.add`, whose names (``<s>.M<µs>P<pid>Q<n>``, the microseconds unpadded) do
not sort by arrival and whose name counter is shared between threads without a lock. aiosmtpd's own
``Mailbox`` handler is not used either: it parses and re-serialises the message and appends the
envelope at the end, where the sink should keep what was sent.

:class:`SinkSmtpServer` is a real SMTP server (aiosmtpd) storing every message it accepts;
:class:`SinkProvider` is the provider of the other channels. Email reaches the sink through the
ordinary :class:`~waymark.channels.email.SmtpProvider` pointed at the server.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import mailbox
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email import policy
from email.message import EmailMessage, Message, MIMEPart
from email.parser import BytesParser
from pathlib import Path
from types import TracebackType
from typing import Any, Final, Self

import orjson
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, Envelope, Session

from waymark.channels.base import DeliveryResult, OutgoingMessage
from waymark.core.clock import Clock, SystemClock
from waymark.delivery.templates import Channel

__all__ = [
    "MAIL_FROM_HEADER",
    "RCPT_TO_HEADER",
    "CallDetail",
    "EmailDetail",
    "SinkEntry",
    "SinkProvider",
    "SinkSmtpServer",
    "SinkStore",
]

MAIL_FROM_HEADER: Final = "X-Sink-Mail-From"
RCPT_TO_HEADER: Final = "X-Sink-Rcpt-To"
_ENVELOPE_HEADERS: Final = frozenset({MAIL_FROM_HEADER.lower(), RCPT_TO_HEADER.lower()})

_STAMP: Final = "%Y%m%dT%H%M%S%f"
_ID: Final = re.compile(r"(\d{8}T\d{12})Z-\d+-\d+-(email|sms|push|webhook|inbox)")
#: Ids of one process; ``next`` on it is atomic, so threads never share a number.
_SEQUENCE: Final = itertools.count(1)
#: The field that sums up a call of each channel in a listing.
_SUMMARY_FIELD: Final = {
    Channel.SMS: "text",
    Channel.PUSH: "title",
    Channel.WEBHOOK: "body",
    Channel.INBOX: "title",
}
_SUMMARY_LENGTH: Final = 120


@dataclass(frozen=True)
class EmailDetail:
    """The content of a stored email: the envelope, the message's headers in order (without the
    sink's envelope block), the text and HTML parts (None when absent) and the names of the
    attachments."""

    mail_from: str
    rcpt_to: tuple[str, ...]
    headers: tuple[tuple[str, str], ...]
    text: str | None
    html: str | None
    attachments: tuple[str, ...] = ()


@dataclass(frozen=True)
class CallDetail:
    """The content of a stored call: the message's id and creation time, its rendered fields and
    data, a webhook's parsed JSON body, and its extra headers."""

    message_id: str
    created_at: datetime
    fields: Mapping[str, str]
    data: Mapping[str, str]
    json: Any
    headers: Mapping[str, str]


@dataclass(frozen=True)
class SinkEntry:
    """One message the sink received. ``to`` is the envelope's recipients for an email (joined
    with ", "), the address for a call; ``summary`` is an email's subject, a push or inbox
    message's title, an SMS's text or a webhook's body (shortened to one line).
    ``received_at`` is aware UTC. ``raw`` is the stored file as it is on disk."""

    id: str
    channel: Channel
    received_at: datetime
    to: str
    summary: str
    raw: bytes = field(repr=False)

    def detail(self) -> EmailDetail | CallDetail:
        """The full content: :class:`EmailDetail` for an email, :class:`CallDetail` otherwise."""
        if self.channel is Channel.EMAIL:
            return _email_detail(_parse_mail(self.raw))
        document = orjson.loads(self.raw)
        return CallDetail(
            message_id=str(document.get("message_id", "")),
            created_at=datetime.fromisoformat(document["created_at"]),
            fields=document.get("fields", {}),
            data=document.get("data", {}),
            json=document.get("json"),
            headers=document.get("headers", {}),
        )

    def to_json(self) -> dict[str, Any]:
        """The listing fields as JSON values (the time in ISO 8601)."""
        return {
            "id": self.id,
            "channel": self.channel.value,
            "received_at": self.received_at.isoformat(),
            "to": self.to,
            "summary": self.summary,
        }


def _parse_mail(raw: bytes) -> EmailMessage:
    parsed = BytesParser(policy=policy.default).parsebytes(raw)
    assert isinstance(parsed, EmailMessage)  # policy.default builds EmailMessage
    return parsed


def _split_envelope(mail: Message) -> tuple[str, tuple[str, ...], list[tuple[str, str]]]:
    """The envelope block at the top of ``mail`` and the headers after it."""
    mail_from, rcpt_to = "", []
    items = [(name, str(value)) for name, value in mail.items()]
    at = 0
    while at < len(items) and items[at][0].lower() in _ENVELOPE_HEADERS:
        name, value = items[at]
        if name.lower() == RCPT_TO_HEADER.lower():
            rcpt_to.append(value)
        else:
            mail_from = value
        at += 1
    return mail_from, tuple(rcpt_to), items[at:]


def _part_text(part: MIMEPart | None) -> str | None:
    if part is None:
        return None
    try:
        content = part.get_content()
    except (LookupError, UnicodeError):  # an unknown or lying charset
        payload = part.get_payload(decode=True)
        return payload.decode("utf-8", "replace") if isinstance(payload, bytes) else None
    return content if isinstance(content, str) else None


def _email_detail(mail: EmailMessage) -> EmailDetail:
    mail_from, rcpt_to, headers = _split_envelope(mail)
    return EmailDetail(
        mail_from=mail_from,
        rcpt_to=rcpt_to,
        headers=tuple(headers),
        text=_part_text(mail.get_body(("plain",))),
        html=_part_text(mail.get_body(("html",))),
        attachments=tuple(
            part.get_filename() or part.get_content_type() for part in mail.iter_attachments()
        ),
    )


def _one_line(text: str) -> str:
    line = " ".join(text.split())
    return line if len(line) <= _SUMMARY_LENGTH else line[: _SUMMARY_LENGTH - 1] + "…"


def _header_line(name: str, value: str) -> bytes:
    # an SMTP address holds no line break; a stray one must not start a header of its own
    value = value.replace("\r", " ").replace("\n", " ")
    return f"{name}: {value}\n".encode()


def _write_atomically(temporary: Path, final: Path, data: bytes) -> None:
    """Write ``data`` to ``temporary`` (which must not exist), flush it to disk, and rename it to
    ``final`` (same folder or file system)."""
    try:
        with temporary.open("xb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        temporary.rename(final)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            temporary.unlink()
        raise


class SinkStore:
    """What the sink received, under ``folder`` (see the module docstring), stamped by ``clock``
    on arrival. Any number of threads and processes may write and read at the same time; files
    in the folders that the store did not name are ignored."""

    def __init__(self, folder: Path, *, clock: Clock | None = None) -> None:
        self.folder = Path(folder)
        self.clock: Clock = clock or SystemClock()
        self.mail_dir = self.folder / "mail"
        self.calls_dir = self.folder / "calls"
        # made here rather than by mailbox.Maildir(create=True), which fails when another
        # process creates the same folders at the same time
        for sub in ("tmp", "new", "cur"):
            (self.mail_dir / sub).mkdir(parents=True, exist_ok=True)
        self.calls_dir.mkdir(parents=True, exist_ok=True)

    def _maildir(self) -> mailbox.Maildir:
        # one per operation: a Maildir's table of contents is not safe to share between threads
        return mailbox.Maildir(self.mail_dir, factory=None, create=False)

    def _new_id(self, channel: Channel) -> tuple[str, datetime]:
        at = self.clock.now().astimezone(UTC)
        return f"{at:{_STAMP}}Z-{os.getpid()}-{next(_SEQUENCE):08d}-{channel.value}", at

    def add_mail(self, raw: bytes, *, mail_from: str, rcpt_to: Sequence[str]) -> SinkEntry:
        """Store the message ``raw`` (as sent over SMTP) with its envelope; raises ``OSError``
        when it cannot be written (then nothing is stored)."""
        entry_id, _ = self._new_id(Channel.EMAIL)
        envelope = _header_line(MAIL_FROM_HEADER, mail_from) + b"".join(
            _header_line(RCPT_TO_HEADER, address) for address in rcpt_to
        )
        data = envelope + raw.replace(b"\r\n", b"\n")
        _write_atomically(self.mail_dir / "tmp" / entry_id, self.mail_dir / "new" / entry_id, data)
        return _entry(entry_id, data)

    def add_call(self, message: OutgoingMessage) -> SinkEntry:
        """Store ``message`` of a channel other than email as a call; ``ValueError`` for an
        email, ``OSError`` when it cannot be written (then nothing is stored)."""
        if message.channel is Channel.EMAIL:
            raise ValueError("email reaches the sink over SMTP (SinkSmtpServer), not as a call")
        entry_id, at = self._new_id(message.channel)
        document = {
            "id": entry_id,
            "channel": message.channel.value,
            "received_at": at.isoformat(),
            "to": message.to,
            "message_id": message.id,
            "created_at": message.created_at.isoformat(),
            "fields": dict(message.content.fields),
            "data": dict(message.content.data),
            "json": message.content.json,
            "headers": dict(message.headers),
        }
        data = orjson.dumps(document, option=orjson.OPT_INDENT_2, default=str)
        _write_atomically(
            self.calls_dir / f".{entry_id}.tmp", self.calls_dir / f"{entry_id}.json", data
        )
        return _entry(entry_id, data)

    def list(self, channel: Channel | None = None, limit: int = 100) -> list[SinkEntry]:
        """Up to ``limit`` entries, newest first, of every channel or of ``channel``."""
        ids: list[str] = []
        box = self._maildir()
        if channel is None or channel is Channel.EMAIL:
            ids.extend(box.keys())
        if channel is not Channel.EMAIL:
            ids.extend(
                name[: -len(".json")]
                for name in os.listdir(self.calls_dir)
                if name.endswith(".json") and not name.startswith(".")
            )
        wanted = sorted(
            (
                entry_id
                for entry_id in ids
                if (match := _ID.fullmatch(entry_id))
                and (channel is None or match[2] == channel.value)
            ),
            reverse=True,
        )
        found: list[SinkEntry] = []
        for entry_id in wanted:
            entry = self._load(box, entry_id)
            if entry is not None:  # else removed since it was listed
                found.append(entry)
                if len(found) == limit:
                    break
        return found

    def get(self, entry_id: str) -> SinkEntry | None:
        """The entry ``entry_id``, or None when there is none (or the id is not one of ours)."""
        if _ID.fullmatch(entry_id) is None:
            return None
        return self._load(self._maildir(), entry_id)

    def _load(self, box: mailbox.Maildir, entry_id: str) -> SinkEntry | None:
        try:
            if entry_id.endswith("-email"):
                raw = box.get_bytes(entry_id)
            else:
                raw = (self.calls_dir / f"{entry_id}.json").read_bytes()
        except (KeyError, FileNotFoundError):
            return None
        return _entry(entry_id, raw)

    def clear(self) -> int:
        """Remove every entry; the number removed. A write in progress is not disturbed (it may
        land just after)."""
        removed = 0
        box = self._maildir()
        for key in box.iterkeys():
            with contextlib.suppress(KeyError, FileNotFoundError):
                box.remove(key)
                removed += 1
        for name in os.listdir(self.calls_dir):
            if name.endswith(".json") and not name.startswith("."):
                with contextlib.suppress(FileNotFoundError):
                    (self.calls_dir / name).unlink()
                    removed += 1
        return removed


def _entry(entry_id: str, raw: bytes) -> SinkEntry:
    """The listing fields of the stored file ``raw`` named ``entry_id`` (one of :data:`_ID`)."""
    match = _ID.fullmatch(entry_id)
    assert match is not None
    received_at = datetime.strptime(match[1], _STAMP).replace(tzinfo=UTC)
    channel = Channel(match[2])
    if channel is Channel.EMAIL:
        mail = _parse_mail(raw)
        _, rcpt_to, _ = _split_envelope(mail)
        to = ", ".join(rcpt_to) or str(mail.get("To", ""))
        summary = str(mail.get("Subject", ""))
    else:
        document = orjson.loads(raw)
        to = str(document.get("to", ""))
        summary = str(document.get("fields", {}).get(_SUMMARY_FIELD[channel], ""))
    return SinkEntry(entry_id, channel, received_at, to, _one_line(summary), raw)


class _Handler:
    """Stores each message the server accepts; a message that cannot be stored is refused with
    a transient reply, so the client tries again."""

    def __init__(self, store: SinkStore) -> None:
        self.store = store

    async def handle_DATA(  # noqa: N802 (the name aiosmtpd calls)
        self, server: SMTP, session: Session, envelope: Envelope
    ) -> str:
        try:
            entry = await asyncio.to_thread(
                self.store.add_mail,
                envelope.original_content or b"",
                mail_from=envelope.mail_from or "",
                rcpt_to=list(envelope.rcpt_tos),
            )
        except OSError as exc:
            return f"451 4.3.0 the sink could not store the message: {exc.strerror or exc}"
        return f"250 2.0.0 stored as {entry.id}"


class _Controller(Controller):
    """aiosmtpd 1.4's controller cannot listen on port 0: after binding, it checks the server by
    connecting to the port it was given (aio-libs/aiosmtpd#388). This reads the bound port
    before that check."""

    def _trigger_server(self) -> None:
        sockets = getattr(self.server, "sockets", None)
        if self.port == 0 and sockets:
            self.port = int(sockets[0].getsockname()[1])
        super()._trigger_server()  # type: ignore[no-untyped-call]


class SinkSmtpServer:
    """An SMTP server on ``host:port`` (by default 127.0.0.1 and a free port) that stores every
    message it accepts in ``store``. No TLS, no AUTH: point an
    :class:`~waymark.channels.email.SmtpProvider` at it with ``security="none"``. A context
    manager (starts and stops). After a restart it listens on the same port."""

    def __init__(self, store: SinkStore, host: str = "127.0.0.1", port: int = 0) -> None:
        self.store = store
        # server_hostname: the greeting's name, which otherwise costs a DNS lookup (getfqdn)
        self._controller = _Controller(
            _Handler(store), hostname=host, port=port, server_hostname="waymark-sink"
        )
        self._running = False

    @property
    def host(self) -> str:
        return str(self._controller.hostname)

    @property
    def port(self) -> int:
        """The port it listens on: the one the system chose when 0 was asked, once started."""
        return int(self._controller.port)

    def start(self) -> None:
        """Listen; returns once the server answers. ``OSError`` when the port is taken."""
        if not self._running:
            self._controller.start()
            self._running = True

    def stop(self) -> None:
        """Stop listening (nothing happens when it is not running)."""
        if self._running:
            self._controller.stop()
            self._running = False

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()


class SinkProvider:
    """The provider of one channel other than email that stores each message in ``store`` as a
    call and answers sent, with the entry's id as the provider id (an unwritable store is a
    transient failure). Thread-safe."""

    def __init__(self, store: SinkStore, channel: Channel, name: str = "sink") -> None:
        if channel is Channel.EMAIL:
            raise ValueError(
                "email goes to the sink through SmtpProvider and SinkSmtpServer, not SinkProvider"
            )
        self.store = store
        self.channel: Channel = channel
        self.name = name

    def send(self, message: OutgoingMessage) -> DeliveryResult:
        if message.channel is not self.channel:
            raise ValueError(f"{self.name} sends {self.channel.value}, not {message.channel.value}")
        try:
            entry = self.store.add_call(message)
        except OSError as exc:
            return DeliveryResult.failed(f"the sink could not store it: {exc}", transient=True)
        return DeliveryResult.sent(entry.id)

    def close(self) -> None:
        return None
