"""The provider registry: which provider sends each channel, built from the settings.

``settings.providers`` maps a channel to its provider's ``kind`` and options::

    [waymark.providers.email]
    kind = "smtp"                    # or "sendgrid", "sink"
    host = "smtp.example.com"
    port = 587
    security = "starttls"            # "tls", "none"
    username = "..."
    password = "..."
    from_address = "shop@example.com"

    [waymark.providers.sms]
    kind = "twilio"                  # or "sink"
    account_sid = "AC..."
    auth_token = "..."
    from_number = "+15005550006"

    [waymark.providers.push]         # Web Push and/or FCM, chosen per subscription
    kind = "push"
    webpush = { vapid_private_key = "...", vapid_subject = "mailto:ops@example.com" }
    fcm = { project_id = "my-app", service_account = "/etc/waymark/fcm.json" }

    [waymark.providers.webhook]
    kind = "signed"                  # or "sink"
    secret = "..."

While ``public_url`` is local (a development setup), a channel left out goes to the development
sink in the data folder (``kind = "sink"``): email through a real local SMTP server, the other
channels as files, all listed at ``/dev/sink``. Otherwise a channel left out has no provider:
its messages are retried, then kept as dead letters, until one is configured. The
in-app inbox needs no provider. Every option is checked when the registry is built, with the
path of each problem (``providers.email.port``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any, Final

from waymark.channels.base import DeliveryResult, OutgoingMessage, Provider
from waymark.channels.email import EmailSettings, SmtpProvider
from waymark.channels.email_api import HttpEmailProvider, HttpEmailSettings
from waymark.channels.push import (
    FcmProvider,
    FcmSettings,
    WebPushProvider,
    WebPushSettings,
    service_account_tokens,
)
from waymark.channels.sink import SinkProvider, SinkStore
from waymark.channels.sms import TwilioProvider, TwilioSettings
from waymark.channels.webhook import WebhookProvider
from waymark.core.errors import InvalidInput, Issue
from waymark.delivery.templates import Channel

__all__ = ["KINDS", "PushRouter", "build_factories", "uses_sink"]

ProviderFactory = Callable[[], Provider]

#: The kinds of provider per channel.
KINDS: Final[Mapping[Channel, tuple[str, ...]]] = {
    Channel.EMAIL: ("smtp", "sendgrid", "sink"),
    Channel.SMS: ("twilio", "sink"),
    Channel.PUSH: ("push", "sink"),
    Channel.WEBHOOK: ("signed", "sink"),
}
_SMTP_KEYS: Final = ("host", "port", "security", "username", "password", "timeout")


def _config(
    providers: Mapping[str, Mapping[str, Any]], channel: Channel, fallback: bool = True
) -> dict[str, Any]:
    found = providers.get(channel.value)
    if found:
        return dict(found)
    return {"kind": "sink"} if fallback else {}


def uses_sink(
    providers: Mapping[str, Mapping[str, Any]], channel: Channel, *, fallback: bool = True
) -> bool:
    """Whether ``channel`` goes to the development sink (``fallback``: an unconfigured
    channel does)."""
    config = _config(providers, channel, fallback)
    return bool(config) and config.get("kind", "sink") == "sink"


def _build(cls: type[Any], options: Mapping[str, Any], path: str, issues: list[Issue]) -> Any:
    """``cls(**options)`` for a settings dataclass, each problem an issue under ``path``."""
    names = {f.name for f in dataclasses.fields(cls)}
    required = {
        f.name
        for f in dataclasses.fields(cls)
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    }
    bad = False
    for key in sorted(set(options) - names):
        issues.append(Issue(f"{path}.{key}", f"unknown option; known: {', '.join(sorted(names))}"))
        bad = True
    for key in sorted(required - set(options)):
        issues.append(Issue(f"{path}.{key}", "is required"))
        bad = True
    if bad:
        return None
    try:
        return cls(**options)
    except (TypeError, ValueError) as exc:
        issues.append(Issue(path, str(exc)))
        return None


class PushRouter:
    """Sends each push message with Web Push or FCM by its address: a subscription (JSON
    object) or a device token."""

    channel = Channel.PUSH

    def __init__(self, webpush: Provider | None, fcm: Provider | None) -> None:
        self.name = "+".join(p.name for p in (webpush, fcm) if p is not None) or "push"
        self.webpush, self.fcm = webpush, fcm

    def send(self, message: OutgoingMessage) -> DeliveryResult:
        provider = self.webpush if message.to.lstrip().startswith("{") else self.fcm
        if provider is None:
            kind = "a Web Push subscription" if message.to.lstrip().startswith("{") else "a token"
            return DeliveryResult.failed(
                f"the address is {kind} but no provider for it is configured", transient=True
            )
        return provider.send(message)

    def close(self) -> None:
        for provider in (self.webpush, self.fcm):
            if provider is not None:
                provider.close()


def build_factories(
    providers: Mapping[str, Mapping[str, Any]],
    *,
    sink: SinkStore | None = None,
    sink_smtp_port: int | None = None,
    fallback_to_sink: bool = True,
) -> dict[Channel, ProviderFactory]:
    """A provider factory per channel (each worker thread builds its own instances);
    :class:`InvalidInput` naming every bad option. ``sink`` and ``sink_smtp_port`` serve the
    channels that go to the development sink: those configured so and, with
    ``fallback_to_sink``, those not configured (else they get no provider)."""
    issues: list[Issue] = []
    for name in sorted(set(providers) - {c.value for c in KINDS}):
        issues.append(
            Issue(
                f"providers.{name}", f"unknown channel; one of {', '.join(c.value for c in KINDS)}"
            )
        )
    factories: dict[Channel, ProviderFactory] = {}
    for channel, kinds in KINDS.items():
        config = _config(providers, channel, fallback_to_sink)
        if not config:
            continue
        path = f"providers.{channel.value}"
        kind = config.pop("kind", "sink")
        if kind not in kinds:
            issues.append(
                Issue(f"{path}.kind", f"unknown kind {kind!r}; one of {', '.join(kinds)}")
            )
            continue
        factory = _factory(channel, kind, config, path, issues, sink, sink_smtp_port)
        if factory is not None:
            factories[channel] = factory
    if issues:
        raise InvalidInput(issues)
    return factories


def _factory(
    channel: Channel,
    kind: str,
    config: dict[str, Any],
    path: str,
    issues: list[Issue],
    sink: SinkStore | None,
    sink_smtp_port: int | None,
) -> ProviderFactory | None:
    if kind == "sink":
        if sink is None:
            issues.append(Issue(f"{path}.kind", "the development sink is not running here"))
            return None
        if channel is Channel.EMAIL:
            if sink_smtp_port is None:
                issues.append(Issue(f"{path}.kind", "the sink's SMTP server is not running"))
                return None
            sender = EmailSettings(
                from_address=str(config.get("from_address", "waymark@localhost")),
                from_name=config.get("from_name"),
            )
            port = sink_smtp_port
            return lambda: SmtpProvider(
                sender, host="127.0.0.1", port=port, security="none", name="sink-smtp"
            )
        store = sink
        return lambda: SinkProvider(store, channel)
    if kind == "smtp":
        smtp = {k: config.pop(k) for k in _SMTP_KEYS if k in config}
        if "host" not in smtp:
            issues.append(Issue(f"{path}.host", "is required"))
        sender = _build(EmailSettings, config, path, issues)
        if sender is None or "host" not in smtp:
            return None
        smtp.setdefault("port", 587)
        if smtp.get("security", "starttls") not in ("none", "starttls", "tls"):
            issues.append(Issue(f"{path}.security", "one of none, starttls, tls"))
            return None
        return lambda: SmtpProvider(sender, **smtp)
    if kind == "sendgrid":
        config.pop("event_public_key", None)  # read by the event webhook
        api = _build(HttpEmailSettings, config, path, issues)
        return None if api is None else (lambda: HttpEmailProvider(api))
    if kind == "twilio":
        twilio = _build(TwilioSettings, config, path, issues)
        return None if twilio is None else (lambda: TwilioProvider(twilio))
    if kind == "signed":
        secret = config.pop("secret", None)
        for key in sorted(config):
            issues.append(Issue(f"{path}.{key}", "unknown option; known: secret"))
        if not isinstance(secret, str) or len(secret) < 16:
            issues.append(Issue(f"{path}.secret", "is required: at least 16 characters"))
            return None
        signing = secret.encode()
        return lambda: WebhookProvider(signing)
    return _push_factory(config, path, issues)


def _push_factory(config: dict[str, Any], path: str, issues: list[Issue]) -> ProviderFactory | None:
    webpush_options = config.pop("webpush", None)
    fcm_options = config.pop("fcm", None)
    for key in sorted(config):
        issues.append(Issue(f"{path}.{key}", "unknown option; known: webpush, fcm"))
    if webpush_options is None and fcm_options is None:
        issues.append(Issue(path, 'needs webpush or fcm options (or kind = "sink")'))
        return None
    webpush = None
    if webpush_options is not None:
        webpush = _build(WebPushSettings, dict(webpush_options), f"{path}.webpush", issues)
    fcm = None
    if fcm_options is not None:
        options = dict(fcm_options)
        account = options.pop("service_account", None)
        token_uri = options.pop("token_uri", None)
        if account is None:
            issues.append(Issue(f"{path}.fcm.service_account", "is required: a key file or object"))
        else:
            try:
                options["token_source"] = service_account_tokens(account, token_uri=token_uri)
            except (OSError, ValueError, InvalidInput) as exc:
                issues.append(Issue(f"{path}.fcm.service_account", f"cannot be read: {exc}"))
            else:
                fcm = _build(FcmSettings, options, f"{path}.fcm", issues)
    if (webpush_options is not None and webpush is None) or (
        fcm_options is not None and fcm is None
    ):
        return None
    return lambda: PushRouter(
        WebPushProvider(webpush) if webpush is not None else None,
        FcmProvider(fcm) if fcm is not None else None,
    )
