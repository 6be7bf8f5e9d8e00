"""The development sink: real SMTP in, calls of the other channels, listing, concurrency, pages."""

from __future__ import annotations

import datetime as dt
import mailbox
import os
import smtplib
import subprocess
import sys
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from waymark.api.sink import sink_router
from waymark.channels.base import Outcome, OutgoingMessage
from waymark.channels.email import EmailSettings, SmtpProvider
from waymark.channels.sink import (
    CallDetail,
    EmailDetail,
    SinkProvider,
    SinkSmtpServer,
    SinkStore,
)
from waymark.core.clock import ManualClock
from waymark.delivery.templates import Channel, Rendered

NOW = dt.datetime(2026, 12, 2, 9, 30, tzinfo=dt.UTC)
SETTINGS = EmailSettings("news@shop.test", "Shop", message_id_domain="mail.shop.test")


@pytest.fixture
def store(tmp_path: Path) -> SinkStore:
    return SinkStore(tmp_path / "sink")


@pytest.fixture
def server(store: SinkStore) -> Iterator[SinkSmtpServer]:
    with SinkSmtpServer(store) as running:
        yield running


def _smtp(server: SinkSmtpServer) -> SmtpProvider:
    return SmtpProvider(SETTINGS, host=server.host, port=server.port, security="none")


def _email(
    n: int, to: str = "ann@x.test", subject: str = "Grüße, Ann – {n}", html: str | None = None
) -> OutgoingMessage:
    fields = {
        "subject": subject.format(n=n),
        "html": html or f"<html><body><p>Hi <b>Ann</b>, pick #{n}: ünïcode</p></body></html>",
        "text": f"Hi Ann, pick #{n}: ünïcode\n",
    }
    return OutgoingMessage(f"m{n}", Channel.EMAIL, to, Rendered(Channel.EMAIL, fields), NOW)


def _call(channel: Channel, n: int, to: str = "+33612345678", **fields: str) -> OutgoingMessage:
    data: dict[str, str] = {}
    body: Any = None
    if channel is Channel.SMS:
        fields = {"text": f"Your code is {n}", **fields}
    elif channel is Channel.PUSH:
        fields = {"title": f"Sale {n}", "body": "Today only", **fields}
        data = {"deep_link": f"shop://sale/{n}"}
    elif channel is Channel.WEBHOOK:
        fields = {"body": f'{{"n": {n}}}', **fields}
        body = {"n": n}
    else:
        fields = {"title": f"Inbox {n}", "body": "Hello", **fields}
    return OutgoingMessage(
        f"{channel.value}-{n}",
        channel,
        to,
        Rendered(channel, fields, data, body),
        NOW,
        headers={"X-Campaign": "c1"},
    )


# -- email over real SMTP -------------------------------------------------------------------------


def test_emails_sent_by_the_smtp_provider_are_stored_whole(
    store: SinkStore, server: SinkSmtpServer
) -> None:
    assert server.host == "127.0.0.1" and server.port > 0
    provider = _smtp(server)
    results = [provider.send(_email(n, to=f"u{n}@x.test")) for n in (1, 2)]
    provider.close()
    assert [r.outcome for r in results] == [Outcome.SENT] * 2

    newest, oldest = store.list()
    assert (newest.channel, newest.to, newest.summary) == (
        Channel.EMAIL,
        "u2@x.test",
        "Grüße, Ann – 2",
    )
    assert oldest.to == "u1@x.test"
    assert newest.received_at.tzinfo is dt.UTC and newest.received_at >= oldest.received_at
    detail = oldest.detail()
    assert isinstance(detail, EmailDetail)
    assert (detail.mail_from, detail.rcpt_to) == ("news@shop.test", ("u1@x.test",))
    headers = dict(detail.headers)
    assert headers["From"] == "Shop <news@shop.test>"
    assert headers["To"] == "u1@x.test"
    assert headers["Subject"] == "Grüße, Ann – 1"
    assert headers["Message-ID"] == "<m1@mail.shop.test>"
    assert headers["Content-Type"].startswith("multipart/alternative")
    assert not any(name.startswith("X-Sink-") for name in headers)  # the envelope is apart
    assert detail.text == "Hi Ann, pick #1: ünïcode\n"
    assert detail.html is not None and "<p>Hi <b>Ann</b>, pick #1: ünïcode</p>" in detail.html
    assert store.get(oldest.id) == oldest

    # a real Maildir, readable by the standard library (and any mail client)
    box = mailbox.Maildir(store.folder / "mail", create=False)
    stored = {key: box[key] for key in box.iterkeys()}
    assert sorted(stored) == [oldest.id, newest.id]
    first = stored[oldest.id]
    assert first.keys()[:2] == ["X-Sink-Mail-From", "X-Sink-Rcpt-To"]  # prepended
    assert first["Message-ID"] == "<m1@mail.shop.test>"
    assert os.listdir(store.folder / "mail" / "tmp") == []


def test_the_envelope_is_kept_apart_from_the_headers(
    store: SinkStore, server: SinkSmtpServer
) -> None:
    # a Bcc'd recipient is only in the envelope; headers that imitate the sink's are the
    # message's own
    raw = (
        "From: a@shop.test\r\nTo: ann@x.test\r\nSubject: plain\r\n"
        "X-Sink-Mail-From: forged@evil.test\r\n\r\nJust text.\r\n"
    )
    with smtplib.SMTP(server.host, server.port) as client:
        refused = client.sendmail("bounces@shop.test", ["ann@x.test", "bob@x.test"], raw)
    assert refused == {}
    (entry,) = store.list()
    assert entry.to == "ann@x.test, bob@x.test"
    detail = entry.detail()
    assert isinstance(detail, EmailDetail)
    assert detail.mail_from == "bounces@shop.test"
    assert detail.rcpt_to == ("ann@x.test", "bob@x.test")
    assert ("X-Sink-Mail-From", "forged@evil.test") in detail.headers
    assert (detail.text, detail.html) == ("Just text.\n", None)


def test_the_server_listens_on_the_port_asked_and_stops(store: SinkStore) -> None:
    with SinkSmtpServer(store) as first:
        port = first.port
    server = SinkSmtpServer(store, port=port)
    assert server.port == port
    server.stop()  # not running: nothing to do
    server.start()
    try:
        with smtplib.SMTP("127.0.0.1", port) as client:
            assert client.noop()[0] == 250
    finally:
        server.stop()
    with pytest.raises(OSError), smtplib.SMTP("127.0.0.1", port, timeout=2):
        pass


# -- the other channels ---------------------------------------------------------------------------


def test_calls_of_the_other_channels_are_stored_as_json(store: SinkStore) -> None:
    sms, push, webhook = (
        SinkProvider(store, c) for c in (Channel.SMS, Channel.PUSH, Channel.WEBHOOK)
    )
    results = [
        sms.send(_call(Channel.SMS, 1)),
        push.send(_call(Channel.PUSH, 2, to="sub-42")),
        webhook.send(_call(Channel.WEBHOOK, 3, to="https://hooks.test/in")),
    ]
    assert [r.outcome for r in results] == [Outcome.SENT] * 3
    entries = store.list()
    assert [e.id for e in entries] == [r.provider_id for r in reversed(results)]
    assert [(e.channel, e.to, e.summary) for e in entries] == [
        (Channel.WEBHOOK, "https://hooks.test/in", '{"n": 3}'),
        (Channel.PUSH, "sub-42", "Sale 2"),
        (Channel.SMS, "+33612345678", "Your code is 1"),
    ]
    hook, note, text = (e.detail() for e in entries)
    assert isinstance(hook, CallDetail) and isinstance(note, CallDetail)
    assert isinstance(text, CallDetail)
    assert (text.message_id, text.created_at, dict(text.fields)) == (
        "sms-1",
        NOW,
        {"text": "Your code is 1"},
    )
    assert dict(note.data) == {"deep_link": "shop://sale/2"}
    assert hook.json == {"n": 3} and dict(hook.headers) == {"X-Campaign": "c1"}
    files = sorted(os.listdir(store.folder / "calls"))
    assert files == sorted(f"{e.id}.json" for e in entries)  # no temporary file is left


def test_a_sink_provider_serves_one_channel_and_never_email(store: SinkStore) -> None:
    with pytest.raises(ValueError, match="SmtpProvider"):
        SinkProvider(store, Channel.EMAIL)
    with pytest.raises(ValueError, match="sends sms, not push"):
        SinkProvider(store, Channel.SMS).send(_call(Channel.PUSH, 1))
    with pytest.raises(ValueError, match="SMTP"):
        store.add_call(_email(1))


def test_an_unwritable_store_is_a_transient_failure(tmp_path: Path) -> None:
    store = SinkStore(tmp_path / "sink")
    (store.folder / "calls").rename(tmp_path / "elsewhere")
    result = SinkProvider(store, Channel.SMS).send(_call(Channel.SMS, 1))
    assert (result.outcome, result.transient) == (Outcome.FAILED, True)
    assert "could not store" in result.detail


# -- listing --------------------------------------------------------------------------------------


def test_listing_is_newest_first_across_channels_with_filters(tmp_path: Path) -> None:
    clock = ManualClock(NOW)
    store = SinkStore(tmp_path / "sink", clock=clock)
    SinkProvider(store, Channel.SMS).send(_call(Channel.SMS, 1))
    clock.advance(dt.timedelta(seconds=1))
    with SinkSmtpServer(store) as server:
        provider = _smtp(server)
        assert provider.send(_email(2)).outcome is Outcome.SENT
        provider.close()
    clock.advance(dt.timedelta(milliseconds=1))
    # two at the same instant keep their order of arrival
    SinkProvider(store, Channel.PUSH).send(_call(Channel.PUSH, 3))
    SinkProvider(store, Channel.WEBHOOK).send(_call(Channel.WEBHOOK, 4))
    SinkProvider(store, Channel.INBOX).send(_call(Channel.INBOX, 5, to="profile-1"))

    entries = store.list()
    assert [e.channel for e in entries] == [
        Channel.INBOX,
        Channel.WEBHOOK,
        Channel.PUSH,
        Channel.EMAIL,
        Channel.SMS,
    ]
    later = NOW + dt.timedelta(seconds=1, milliseconds=1)
    assert [e.received_at for e in entries] == [later] * 3 + [NOW + dt.timedelta(seconds=1), NOW]
    assert [e.channel for e in store.list(limit=2)] == [Channel.INBOX, Channel.WEBHOOK]
    assert [e.summary for e in store.list(Channel.EMAIL)] == ["Grüße, Ann – 2"]
    assert [e.summary for e in store.list(Channel.SMS)] == ["Your code is 1"]
    assert store.list(Channel.PUSH, limit=1)[0].to == "+33612345678"

    for entry in entries:
        assert store.get(entry.id) == entry
    for unknown in ("nope", "../../etc/passwd", entries[0].id.replace("inbox", "sms"), ""):
        assert store.get(unknown) is None

    # another store on the same folder (another process) sees the same
    assert SinkStore(store.folder).list() == entries
    assert store.clear() == 5
    assert store.list() == []


def test_long_summaries_are_one_shortened_line(store: SinkStore) -> None:
    text = "line one\nline two " + "x" * 300
    SinkProvider(store, Channel.SMS).send(_call(Channel.SMS, 1, text=text))
    (entry,) = store.list()
    assert entry.summary.startswith("line one line two xxx") and entry.summary.endswith("…")
    assert len(entry.summary) == 120
    detail = entry.detail()
    assert isinstance(detail, CallDetail) and detail.fields["text"] == text  # all of it kept


# -- concurrency ----------------------------------------------------------------------------------


def test_concurrent_writers_lose_nothing(store: SinkStore, server: SinkSmtpServer) -> None:
    call_threads, mail_threads, calls_each, mails_each = 6, 3, 40, 15
    writing = threading.Event()
    writing.set()

    def write_calls(t: int) -> None:
        provider = SinkProvider(store, Channel.SMS)  # or shared: it holds no state
        for n in range(calls_each):
            result = provider.send(_call(Channel.SMS, t * 1000 + n))
            assert result.outcome is Outcome.SENT, result.detail

    def write_mail(t: int) -> None:
        provider = _smtp(server)  # a connection of its own
        try:
            for n in range(mails_each):
                result = provider.send(_email(t * 1000 + n))
                assert result.outcome is Outcome.SENT, result.detail
        finally:
            provider.close()

    def read() -> list[int]:
        counts = []
        while writing.is_set():
            entries = store.list(limit=10_000)
            for entry in entries:
                entry.detail()  # every entry listed is whole
            counts.append(len(entries))
        return counts

    with ThreadPoolExecutor(max_workers=1 + call_threads + mail_threads) as pool:
        reader = pool.submit(read)
        writers = [pool.submit(write_calls, t) for t in range(call_threads)]
        writers += [pool.submit(write_mail, 100 + t) for t in range(mail_threads)]
        for future in writers:
            future.result()
        writing.clear()
        seen = reader.result()
    assert seen == sorted(seen)  # nothing went missing in between

    entries = store.list(limit=10_000)
    assert len(entries) == call_threads * calls_each + mail_threads * mails_each
    assert len({e.id for e in entries}) == len(entries)
    assert {e.summary for e in entries} == {
        *(f"Your code is {t * 1000 + n}" for t in range(call_threads) for n in range(calls_each)),
        *(
            f"Grüße, Ann – {t * 1000 + n}"
            for t in range(100, 100 + mail_threads)
            for n in range(mails_each)
        ),
    }


_CHILD = """
import datetime as dt, sys
from pathlib import Path
from waymark.channels.base import OutgoingMessage
from waymark.channels.sink import SinkProvider, SinkStore
from waymark.delivery.templates import Channel, Rendered

provider = SinkProvider(SinkStore(Path(sys.argv[1])), Channel.WEBHOOK)
for n in range(int(sys.argv[2])):
    body = '{"n": %d, "pad": "%s"}' % (n, "x" * 20_000)
    content = Rendered(Channel.WEBHOOK, {"body": body}, {}, {"n": n})
    message = OutgoingMessage(f"w{n}", Channel.WEBHOOK, "https://hooks.test", content,
                              dt.datetime.now(dt.UTC))
    assert provider.send(message).provider_id
"""


def test_a_reader_in_another_process_sees_whole_entries(store: SinkStore) -> None:
    count = 150
    child = subprocess.Popen(
        [sys.executable, "-c", _CHILD, str(store.folder), str(count)], stderr=subprocess.PIPE
    )
    try:
        while child.poll() is None:
            for entry in store.list(Channel.WEBHOOK, limit=count):
                detail = entry.detail()
                assert isinstance(detail, CallDetail) and detail.json == {
                    "n": int(detail.message_id[1:])
                }
    finally:
        _, stderr = child.communicate(timeout=60)
    assert child.returncode == 0, stderr.decode()
    ids = []
    for entry in store.list(limit=1000):
        detail = entry.detail()
        assert isinstance(detail, CallDetail)
        ids.append(detail.message_id)
    assert ids == [f"w{n}" for n in reversed(range(count))]


# -- the pages ------------------------------------------------------------------------------------


class _Tags(HTMLParser):
    """The start tags of a page with their (unescaped) attributes."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))


def _tags(page: str) -> list[tuple[str, dict[str, str | None]]]:
    parser = _Tags()
    parser.feed(page)
    parser.close()
    return parser.tags


HOSTILE_HTML = (
    '<html><body><p title="a&quot;b">Hi "you" &amp; <b>me</b></p>'
    "<script>alert(2)</script><img src=x onerror=alert(3)></body></html>"
)


@pytest.fixture
def client(store: SinkStore, server: SinkSmtpServer) -> Iterator[TestClient]:
    provider = _smtp(server)
    assert provider.send(
        _email(1, subject="<script>alert(1)</script>", html=HOSTILE_HTML)
    ).provider_id
    provider.close()
    SinkProvider(store, Channel.SMS).send(
        _call(Channel.SMS, 2, text="<img src=x onerror=alert(4)>")
    )
    app = FastAPI()
    app.include_router(sink_router(store))
    with TestClient(app) as test_client:
        yield test_client


def test_the_listing_page_shows_every_message_escaped(client: TestClient, store: SinkStore) -> None:
    answer = client.get("/dev/sink")
    assert answer.status_code == 200
    assert answer.headers["content-type"].startswith("text/html")
    assert "script-src 'none'" in answer.headers["content-security-policy"]
    page = answer.text
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "&lt;img src=x onerror=alert(4)&gt;" in page
    assert "<script" not in page and "<img" not in page
    tags = _tags(page)
    links = {attrs["href"] for tag, attrs in tags if tag == "a"}
    sms, mail = store.list()
    assert f"http://testserver/dev/sink/{mail.id}" in links
    assert f"http://testserver/dev/sink/{sms.id}" in links
    assert "http://testserver/dev/sink?channel=sms" in links
    assert "+33612345678" in page and "ann@x.test" in page

    only_sms = client.get("/dev/sink", params={"channel": "sms"}).text
    assert sms.id in only_sms and mail.id not in only_sms
    assert client.get("/dev/sink", params={"channel": "fax"}).status_code == 422


def test_an_email_page_keeps_the_html_part_inside_a_sandboxed_frame(
    client: TestClient, store: SinkStore
) -> None:
    mail = store.list(Channel.EMAIL)[0]
    answer = client.get(f"/dev/sink/{mail.id}")
    assert answer.status_code == 200
    page = answer.text
    assert "<script" not in page and "alert(1)</script>" not in page
    tags = _tags(page)
    assert [tag for tag, _ in tags if tag in {"script", "img", "b"}] == []
    frames = [attrs for tag, attrs in tags if tag == "iframe"]
    assert len(frames) == 1
    (frame,) = frames
    assert frame["sandbox"] == ""  # every restriction: no scripts, forms, same origin
    detail = mail.detail()
    assert isinstance(detail, EmailDetail) and detail.html is not None
    assert frame["srcdoc"] == detail.html  # unescaped by the browser, exactly the part
    assert "Hi Ann, pick #1: ünïcode" in page  # the text part
    assert "news@shop.test" in page and "&lt;m1@mail.shop.test&gt;" in page  # envelope, headers

    raw = client.get(f"/dev/sink/{mail.id}/raw")
    assert raw.status_code == 200 and raw.headers["content-type"].startswith("text/plain")
    assert raw.text.startswith("X-Sink-Mail-From: news@shop.test\n")


def test_a_call_page_shows_its_fields(client: TestClient, store: SinkStore) -> None:
    sms = store.list(Channel.SMS)[0]
    page = client.get(f"/dev/sink/{sms.id}").text
    assert "&lt;img src=x onerror=alert(4)&gt;" in page and "<img" not in page
    assert "sms-2" in page and "X-Campaign" in page


def test_the_json_listing(client: TestClient, store: SinkStore) -> None:
    answer = client.get("/dev/sink/messages.json")
    assert answer.status_code == 200
    assert answer.json() == {"messages": [e.to_json() for e in store.list()]}
    sms, mail = answer.json()["messages"]
    assert (sms["channel"], sms["to"]) == ("sms", "+33612345678")
    assert (mail["channel"], mail["summary"]) == ("email", "<script>alert(1)</script>")
    assert dt.datetime.fromisoformat(mail["received_at"]).tzinfo is not None
    only = client.get("/dev/sink/messages.json", params={"channel": "email", "limit": 5}).json()
    assert [m["id"] for m in only["messages"]] == [mail["id"]]


def test_an_unknown_message_is_not_found(client: TestClient) -> None:
    for path in (
        "/dev/sink/20261202T093000000000Z-1-00000001-sms",
        "/dev/sink/nope",
        "/dev/sink/%3Cscript%3E",
        "/dev/sink/nope/raw",
    ):
        answer = client.get(path)
        assert answer.status_code == 404, path
        assert "<script>" not in answer.text
