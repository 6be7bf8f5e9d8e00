"""The provider registry built from settings: kinds, checked options, the sink in development."""

from __future__ import annotations

from pathlib import Path

import pytest

from waymark.channels.sink import SinkStore
from waymark.core.errors import InvalidInput
from waymark.delivery.providers import build_factories, uses_sink
from waymark.delivery.templates import Channel
from waymark.settings import load_settings


def test_every_bad_option_is_named_with_its_path(tmp_path: Path) -> None:
    with pytest.raises(InvalidInput) as caught:
        build_factories(
            {
                "email": {"kind": "smtp", "port": 25, "from_adress": "x@y.z"},
                "sms": {"kind": "carrier-pigeon"},
                "webhook": {"kind": "signed", "secret": "short"},
                "fax": {"kind": "sink"},
            },
            sink=SinkStore(tmp_path),
            sink_smtp_port=2525,
        )
    found = [str(i) for i in caught.value.issues]
    assert "providers.fax: unknown channel; one of email, sms, push, webhook" in found
    assert any(i.startswith("providers.email.host: is required") for i in found)
    assert any(i.startswith("providers.email.from_adress: unknown option") for i in found)
    assert any(i.startswith("providers.sms.kind: unknown kind 'carrier-pigeon'") for i in found)
    assert any(i.startswith("providers.webhook.secret: is required") for i in found)


def test_unconfigured_channels_go_to_the_sink_only_in_development(tmp_path: Path) -> None:
    store = SinkStore(tmp_path)
    smtp = {"kind": "smtp", "host": "smtp.example.com", "from_address": "shop@example.com"}
    dev = build_factories({"email": smtp}, sink=store, sink_smtp_port=2525)
    assert set(dev) == {Channel.EMAIL, Channel.SMS, Channel.PUSH, Channel.WEBHOOK}
    assert dev[Channel.SMS]().name == "sink" and dev[Channel.EMAIL]().name == "smtp"
    live = build_factories({"email": smtp}, sink=store, fallback_to_sink=False)
    assert set(live) == {Channel.EMAIL}  # the others wait for a provider, then dead letters
    assert uses_sink({}, Channel.SMS) and not uses_sink({}, Channel.SMS, fallback=False)
    assert load_settings(environ={}).local_only
    assert not load_settings(environ={}, public_url="https://hub.example.com").local_only
    assert load_settings(environ={}, public_url="http://[::1]:8088/").local_only
