"""Email through a real SMTP server (aiosmtpd): the MIME written, the reply codes, reuse, TLS."""

from __future__ import annotations

import dataclasses
import datetime as dt
import socket
import ssl
from collections.abc import Iterator
from email import message_from_bytes, policy
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, Envelope, Session
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from waymark.channels.base import Outcome, OutgoingMessage
from waymark.channels.email import EmailSettings, SmtpProvider, build_mime
from waymark.delivery.templates import Channel, Rendered, compile_template, parse_template
from waymark.model.schemas import parse_schema

NOW = dt.datetime(2026, 12, 2, 9, 30, tzinfo=dt.UTC)
SETTINGS = EmailSettings("news@shop.test", "Shop", message_id_domain="mail.shop.test")


class Sink:
    """An aiosmtpd handler keeping what arrives; some recipients answer with chosen codes."""

    def __init__(self) -> None:
        self.received: list[tuple[Envelope, EmailMessage]] = []
        self.sessions: set[int] = set()
        self.codes = {"busy@x.test": "451 4.3.0 try later", "gone@x.test": "550 5.1.1 no such user"}

    async def handle_RCPT(
        self, server: Any, session: Session, envelope: Envelope, address: str, options: Any
    ) -> str:
        if address in self.codes:
            return self.codes[address]
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: Any, session: Session, envelope: Envelope) -> str:
        self.sessions.add(id(session))
        raw = envelope.original_content or b""
        parsed = message_from_bytes(raw, policy=policy.default)
        assert isinstance(parsed, EmailMessage)
        self.received.append((envelope, parsed))
        return "250 2.0.0 queued"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def sink() -> Iterator[tuple[Sink, int]]:
    handler = Sink()
    port = _free_port()
    controller = Controller(handler, hostname="127.0.0.1", port=port)
    controller.start()
    try:
        yield handler, port
    finally:
        controller.stop()


def _message(to: str, n: int = 1, **extra: Any) -> OutgoingMessage:
    template = compile_template(
        parse_template(
            {
                "channel": "email",
                "subject": "Hello {{ profile.first_name }} – {{ profile.n }}",
                "preheader": "Your weekly picks",
                "html": (
                    "<html><body><p>Hi {{ profile.first_name }}, here is ünïcode.</p></body></html>"
                ),
            }
        ),
        parse_schema({"attributes": {"first_name": {"type": "string"}, "n": {"type": "integer"}}}),
    )
    return OutgoingMessage(
        id=f"m{n}",
        channel=template.definition.channel,
        to=to,
        content=template.render({"profile": {"first_name": "Ann", "n": n}}),
        created_at=NOW,
        **extra,
    )


def test_messages_arrive_as_written_over_one_reused_connection(sink: tuple[Sink, int]) -> None:
    handler, port = sink
    provider = SmtpProvider(SETTINGS, host="127.0.0.1", port=port, security="none")
    results = [
        provider.send(
            _message(
                f"u{n}@x.test",
                n,
                unsubscribe_url=f"https://shop.test/u/{n}",
                unsubscribe_mailto="unsub@shop.test",
            )
        )
        for n in range(3)
    ]
    provider.close()
    assert [r.outcome for r in results] == [Outcome.SENT] * 3
    assert results[0].provider_id == "<m0@mail.shop.test>"
    assert provider.connections == 1 and len(handler.sessions) == 1
    assert [env.rcpt_tos for env, _ in handler.received] == [[f"u{n}@x.test"] for n in range(3)]
    envelope, mail = handler.received[1]
    assert envelope.mail_from == "news@shop.test"
    assert mail["From"] == "Shop <news@shop.test>"
    assert mail["To"] == "u1@x.test"
    assert mail["Subject"] == "Hello Ann – 1"
    assert mail["Message-ID"] == "<m1@mail.shop.test>"
    assert mail["Date"] == "Wed, 02 Dec 2026 09:30:00 +0000"
    assert mail["List-Unsubscribe"] == "<https://shop.test/u/1>, <mailto:unsub@shop.test>"
    assert mail["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
    assert mail.get_content_type() == "multipart/alternative"
    parts = [part.get_content_type() for part in mail.iter_parts()]
    assert parts == ["text/plain", "text/html"]  # the preferred part last
    text = mail.get_body(("plain",))
    html = mail.get_body(("html",))
    assert text is not None and html is not None
    assert text.get_content().strip() == "Hi Ann, here is ünïcode."
    body = html.get_content()
    assert body.index("Your weekly picks") < body.index("Hi Ann")  # the preheader comes first
    assert "display:none" in body


def test_no_one_click_header_without_an_https_link() -> None:
    mail = build_mime(_message("a@x.test", unsubscribe_url="http://shop.test/u"), SETTINGS)
    assert mail["List-Unsubscribe"] == "<http://shop.test/u>"
    assert mail["List-Unsubscribe-Post"] is None
    plain = build_mime(_message("a@x.test"), SETTINGS)
    assert plain["List-Unsubscribe"] is None


def test_reply_codes_become_transient_or_permanent_failures(sink: tuple[Sink, int]) -> None:
    handler, port = sink
    provider = SmtpProvider(SETTINGS, host="127.0.0.1", port=port, security="none")
    busy = provider.send(_message("busy@x.test"))
    gone = provider.send(_message("gone@x.test"))
    fine = provider.send(_message("ok@x.test"))
    provider.close()
    assert (busy.outcome, busy.transient) == (Outcome.FAILED, True)
    assert "451" in busy.detail and "try later" in busy.detail
    assert (gone.outcome, gone.transient) == (Outcome.FAILED, False)
    assert "550" in gone.detail
    assert fine.outcome is Outcome.SENT  # the connection survived the refusals
    assert len(handler.received) == 1


def test_a_connection_the_server_dropped_is_reopened() -> None:
    handler = Sink()
    port = _free_port()
    first = Controller(handler, hostname="127.0.0.1", port=port)
    first.start()
    provider = SmtpProvider(SETTINGS, host="127.0.0.1", port=port, security="none")
    assert provider.send(_message("a@x.test", 1)).outcome is Outcome.SENT
    first.stop()
    second = Controller(handler, hostname="127.0.0.1", port=port)
    second.start()
    try:
        assert provider.send(_message("b@x.test", 2)).outcome is Outcome.SENT
    finally:
        provider.close()
        second.stop()
    assert provider.connections == 2
    assert [env.rcpt_tos for env, _ in handler.received] == [["a@x.test"], ["b@x.test"]]


def test_a_server_that_is_not_there_is_a_transient_failure() -> None:
    provider = SmtpProvider(SETTINGS, host="127.0.0.1", port=_free_port(), security="none")
    result = provider.send(_message("a@x.test"))
    assert (result.outcome, result.transient) == (Outcome.FAILED, True)
    assert "cannot connect" in result.detail


def _certificate(folder: Path) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(dt.datetime(2026, 1, 1, tzinfo=dt.UTC))
        .not_valid_after(dt.datetime(2036, 1, 1, tzinfo=dt.UTC))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
        .sign(key, hashes.SHA256())
    )
    cert_file, key_file = folder / "cert.pem", folder / "key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_file, key_file


def test_starttls_and_auth(tmp_path: Path) -> None:
    cert_file, key_file = _certificate(tmp_path)
    server_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_tls.load_cert_chain(cert_file, key_file)
    client_tls = ssl.create_default_context(cafile=str(cert_file))
    logins: list[tuple[bytes, bytes]] = []
    # (login_data is deprecated in aiosmtpd; the login and password are read from the data)

    def authenticate(server: Any, session: Any, envelope: Any, mechanism: str, data: Any) -> Any:
        del server, session, envelope, mechanism
        logins.append((data.login, data.password))
        ok = data.login == b"shop" and data.password == b"s3cret"
        return AuthResult(success=ok, handled=False)  # handled=False: the server replies

    handler = Sink()
    port = _free_port()
    controller = Controller(
        handler,
        hostname="127.0.0.1",
        port=port,
        server_hostname="localhost",
        tls_context=server_tls,
        require_starttls=True,
        authenticator=authenticate,
        auth_required=True,
    )
    controller.start()
    try:
        good = SmtpProvider(
            SETTINGS,
            host="localhost",
            port=port,
            security="starttls",
            username="shop",
            password="s3cret",
            tls_context=client_tls,
        )
        assert good.send(_message("a@x.test")).outcome is Outcome.SENT
        good.close()
        bad = SmtpProvider(
            SETTINGS,
            host="localhost",
            port=port,
            security="starttls",
            username="shop",
            password="wrong",
            tls_context=client_tls,
        )
        refused = bad.send(_message("b@x.test"))
        bad.close()
        untrusted = SmtpProvider(SETTINGS, host="localhost", port=port, security="starttls")
        unverified = untrusted.send(_message("c@x.test"))
    finally:
        controller.stop()
    assert logins == [(b"shop", b"s3cret"), (b"shop", b"wrong")]  # one try each
    assert (refused.outcome, refused.transient) == (Outcome.FAILED, False)
    assert "authentication failed: 535" in refused.detail
    assert (unverified.outcome, unverified.transient) == (Outcome.FAILED, True)
    assert "TLS certificate not trusted" in unverified.detail
    assert [env.rcpt_tos for env, _ in handler.received] == [["a@x.test"]]


def test_headers_are_encoded_and_line_breaks_refused() -> None:
    message = _message("anna@bücher.example")
    content = Rendered(
        Channel.EMAIL,
        {
            "subject": "Grüße aus Köln 🎉 " + "long words " * 12,
            "text": "Hallo",
            "from_name": "Jürgen",
        },
    )
    mail = build_mime(dataclasses.replace(message, content=content), SETTINGS)
    back = message_from_bytes(mail.as_bytes(), policy=policy.default)
    assert back["Subject"] == content.fields["subject"]
    assert back["From"].addresses[0].display_name == "Jürgen"
    assert back["To"] == "anna@xn--bcher-kva.example"
    assert back.get_content().strip() == "Hallo"
    for bad in (
        {"subject": "hi\r\nBcc: x@evil.test", "text": "t"},
        {"subject": "s", "text": "t", "from_name": "a\nb"},
    ):
        with pytest.raises(ValueError, match="line break"):
            build_mime(dataclasses.replace(message, content=Rendered(Channel.EMAIL, bad)), SETTINGS)
    with pytest.raises(ValueError, match="SMTPUTF8"):
        build_mime(_message("jürgen@x.test"), SETTINGS)
