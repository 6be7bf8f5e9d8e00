"""Delivery as a process runs it: the development sink, the providers, the outbox and the
dispatcher, opened together from the settings and closed together."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

from waymark.channels.base import OutgoingMessage
from waymark.channels.sink import SinkSmtpServer, SinkStore
from waymark.delivery.dispatcher import Dispatcher, DispatchSettings, ProviderFactory
from waymark.delivery.outbox import Outbox
from waymark.delivery.providers import build_factories, uses_sink
from waymark.delivery.templates import Channel
from waymark.hub import Hub

__all__ = ["DeliveryRuntime"]

log = logging.getLogger(__name__)

ContentHook = Callable[[Mapping[str, Any], OutgoingMessage], OutgoingMessage]


class DeliveryRuntime:
    """Opens the sink (its SMTP server only when email goes to it), builds the providers of
    ``hub.settings.providers`` (:class:`InvalidInput` naming bad options) and the dispatcher,
    whose emails are tracked (links, the open pixel) and carry signed unsubscribe links.
    ``factories`` replaces the configured providers (tests, benchmarks)."""

    def __init__(
        self,
        hub: Hub,
        *,
        factories: Mapping[Channel, ProviderFactory] | None = None,
        content_hook: ContentHook | None = None,
        dispatch: DispatchSettings | None = None,
        outbox: Outbox | None = None,
    ) -> None:
        settings = hub.settings
        self.hub = hub
        self.sink = SinkStore(settings.data_dir / "sink", clock=hub.clock)
        self.smtp: SinkSmtpServer | None = None
        if factories is None:
            local = settings.local_only
            if uses_sink(settings.providers, Channel.EMAIL, fallback=local):
                self.smtp = SinkSmtpServer(self.sink)
                self.smtp.start()
            try:
                factories = build_factories(
                    settings.providers,
                    sink=self.sink,
                    sink_smtp_port=self.smtp.port if self.smtp is not None else None,
                    fallback_to_sink=local,
                )
            except BaseException:
                self.close()
                raise
        self.outbox = outbox or Outbox(public_url=settings.public_url)
        if content_hook is None:  # tracked links, the open pixel, signed List-Unsubscribe
            content_hook = self.outbox.tracker.content_hook(hub)
        self.dispatcher = Dispatcher(
            hub,
            factories,
            outbox=self.outbox,
            settings=dispatch
            or DispatchSettings(workers=settings.dispatch_workers, rates=settings.dispatch_rates),
            content_hook=content_hook,
        )

    def close(self) -> None:
        """Stop the dispatcher's workers, close the providers, stop the sink's SMTP server."""
        dispatcher = getattr(self, "dispatcher", None)
        if dispatcher is not None:
            dispatcher.close()
        if self.smtp is not None:
            self.smtp.stop()
            self.smtp = None
