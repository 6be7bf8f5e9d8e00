"""The dispatcher: takes due messages from the outbox and hands them to the providers.

One round (:meth:`Dispatcher.run_once`):

1. **claim**, in one write transaction: due messages (``queued`` or ``held`` whose
   ``next_attempt_at`` has come, and ``sending`` ones whose lease ran out: a dispatcher that
   died while sending them) are decided again under the rules as they stand now
   (:meth:`waymark.delivery.outbox.Outbox.redecide`). Those still to send become ``sending``
   with a lease (``next_attempt_at`` = the lease's end) and one more attempt; the rest are held
   again or excluded, with their reasons. In-app messages are delivered right here: the inbox
   row and the ``sent`` status commit together, exactly once. On PostgreSQL the rows are
   locked ``FOR UPDATE SKIP LOCKED``, so several dispatchers share the work.
2. **send**, outside any transaction, from a pool of worker threads (each with its own provider
   instances, so an SMTP connection belongs to one thread): per provider a token bucket limits
   the rate and a circuit breaker stops sending after repeated transient failures (the message
   goes back to the queue, not counted as an attempt).
3. **record** each result right after its send, before the worker's next send (the results
   of workers finishing at the same time share one commit): ``sent`` with the
   provider's id; a transient failure is retried after exponential backoff with jitter (or the
   provider's ``Retry-After``, whichever is later) until ``max_attempts``, then the message is
   ``dead`` and gets a row in ``dead_letters`` (inspect and replay: :mod:`waymark.delivery.
   messages`); a permanent failure is ``failed``. An address the provider reports gone is
   suppressed (email, SMS) or its push subscription deleted. Messages that do not go no longer
   count toward the caps.

A crash at any point loses nothing: a claimed message whose result was not recorded is claimed
again when its lease ends, and sent again. Receivers that honour the message id as an
idempotency key (webhooks, Twilio) deduplicate that; SMTP and SendGrid's API cannot, so a
crash between the server's acceptance and the record can deliver one message twice (with the
same ``Message-ID``): since each worker's result is committed before its next send, that
window is one message per worker.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Final

from sqlalchemy import Connection, delete, func, insert, select, update

from waymark.channels.base import DeliveryResult, Outcome, OutgoingMessage, Provider
from waymark.delivery.feedback import record_sent
from waymark.delivery.flow import CircuitBreaker, TokenBucket, backoff
from waymark.delivery.outbox import Outbox, cap_locks_of, read_content
from waymark.delivery.rules import Exclude, Hold
from waymark.delivery.store import suppress
from waymark.delivery.templates import Channel
from waymark.hub import Hub
from waymark.storage.tables import (
    dead_letters,
    inbox_messages,
    message_events,
    messages,
    push_subscriptions,
)

__all__ = [
    "DispatchSettings",
    "DispatchStats",
    "Dispatcher",
    "GroupCommit",
    "ProviderFactory",
    "pending",
]

log = logging.getLogger(__name__)

#: Builds one provider instance for one worker thread.
ProviderFactory = Callable[[], Provider]
#: statuses a message can be claimed from
_CLAIMABLE: Final = ("queued", "held", "sending")


@dataclass(frozen=True)
class DispatchSettings:
    """How the dispatcher paces and retries. ``rates``: sends per second per channel (a token
    bucket of ``burst`` tokens); channels without one are not limited."""

    batch: int = 200
    workers: int = 4
    lease: timedelta = timedelta(minutes=5)
    max_attempts: int = 8
    backoff_base: float = 30.0
    backoff_cap: float = 6 * 3600.0
    breaker_threshold: int = 5
    breaker_cooldown: float = 60.0
    rates: Mapping[str, float] = field(default_factory=dict)
    burst: float = 10.0


@dataclass
class DispatchStats:
    """What one round did."""

    claimed: int = 0
    sent: int = 0
    retried: int = 0
    failed: int = 0
    dead: int = 0
    held: int = 0
    excluded: int = 0
    deferred: int = 0  # put back because a circuit breaker was open

    def add(self, other: DispatchStats) -> None:
        for name in self.__dataclass_fields__:
            setattr(self, name, getattr(self, name) + getattr(other, name))

    def to_json(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in self.__dataclass_fields__}


class Dispatcher:
    """Delivers due messages with the providers that ``factories`` build per channel.

    ``monotonic`` and ``sleep`` pace the token buckets (tests pass their own); ``draw`` gives
    the jitter. ``fault`` is called with the name of each step (``claimed``, ``sent``,
    ``recording`` inside the record's transaction, ``recorded``) so tests can crash the
    dispatcher there."""

    def __init__(
        self,
        hub: Hub,
        factories: Mapping[Channel, ProviderFactory],
        *,
        outbox: Outbox | None = None,
        settings: DispatchSettings | None = None,
        content_hook: Callable[[Mapping[str, Any], OutgoingMessage], OutgoingMessage] | None = None,
        monotonic: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
        draw: Callable[[], float] = random.random,
        fault: Callable[[str], None] | None = None,
    ) -> None:
        self.hub = hub
        self.factories = dict(factories)
        self.outbox = outbox or Outbox()
        self.settings = settings or DispatchSettings()
        self.content_hook = content_hook
        self.monotonic = monotonic
        self.sleep = sleep
        self.draw = draw
        self.fault = fault or (lambda _step: None)
        self.breakers: dict[Channel, CircuitBreaker] = {
            c: CircuitBreaker(self.settings.breaker_threshold, self.settings.breaker_cooldown)
            for c in self.factories
        }
        self.buckets: dict[Channel, TokenBucket] = {
            Channel(c): TokenBucket(rate, max(1.0, self.settings.burst))
            for c, rate in self.settings.rates.items()
        }
        self._guard = threading.Lock()  # breakers and buckets are shared by the workers
        self._records = GroupCommit(self._record_batch)
        self._round = threading.Lock()  # held by a round; close() waits for it
        self._stopped = False
        self._local = threading.local()
        self._made: list[Provider] = []
        self._pool = ThreadPoolExecutor(
            max_workers=max(1, self.settings.workers), thread_name_prefix="waymark-dispatch"
        )

    def close(self) -> None:
        """Let the round in progress finish, stop the workers and close every provider they
        opened; later rounds do nothing."""
        self._stopped = True
        with self._round:
            pass
        self._pool.shutdown(wait=True)
        with self._guard:
            made, self._made = self._made, []
        for provider in made:
            try:
                provider.close()
            except Exception:  # closing is best effort
                log.exception("closing provider %s failed", provider.name)

    # -- one round --------------------------------------------------------------------------

    def run_once(self) -> DispatchStats:
        """Claim, send and record one batch; what happened (nothing once closed)."""
        stats = DispatchStats()
        with self._round:
            if self._stopped:
                return stats
            claimed = self._claim(stats)
            self.fault("claimed")
            if claimed:
                for result in self._pool.map(self._deliver, claimed):
                    stats.add(result)
        if stats.sent:
            self.hub.inbox_signal.set()  # their message.sent events go to the log now
        return stats

    def run_until_idle(self, *, rounds: int = 1000) -> DispatchStats:
        """Rounds until one claims nothing (tests, the demo, ``waymark message dispatch``)."""
        total = DispatchStats()
        for _ in range(rounds):
            stats = self.run_once()
            total.add(stats)
            if stats.claimed == 0:
                break
        return total

    # -- claim ------------------------------------------------------------------------------

    def _claim(self, stats: DispatchStats) -> list[dict[str, Any]]:
        now = self.hub.clock.now()
        ready: list[dict[str, Any]] = []
        with self.hub.tx() as conn:
            query = (
                select(messages)
                .where(
                    messages.c.status.in_(_CLAIMABLE),
                    messages.c.next_attempt_at <= now,
                )
                .order_by(messages.c.next_attempt_at)
                .limit(self.settings.batch)
            )
            if conn.dialect.name == "postgresql":
                query = query.with_for_update(skip_locked=True)
            rows = [dict(r._mapping) for r in conn.execute(query)]
            stats.claimed = len(rows)
            by_workspace: dict[str, list[dict[str, Any]]] = {}
            for row in rows:
                by_workspace.setdefault(row["workspace_id"], []).append(row)
            events: list[dict[str, Any]] = []
            # every profile's cap lock in one sorted call (several calls, one per workspace,
            # could take overlapping locks in different orders in two dispatchers)
            cap_locks_of(conn, [(r["workspace_id"], r["profile_id"]) for r in rows])
            for workspace_id, mine in by_workspace.items():
                decisions = self.outbox.redecide(conn, workspace_id, mine, now=now, locked=True)
                for row in mine:
                    decision = decisions[row["id"]]
                    if row["status"] == "sending":  # a dispatcher died with it in hand
                        events.append(
                            _event(row, "lease_expired", now, {"attempt": row["attempts"]})
                        )
                        if row["attempts"] >= self.settings.max_attempts:
                            self._bury(conn, row, now, "the lease ran out on every attempt")
                            events.append(_event(row, "dead", now, {"attempts": row["attempts"]}))
                            stats.dead += 1
                            continue
                    if isinstance(decision, Exclude):
                        self._set(
                            conn,
                            row,
                            now,
                            status="excluded",
                            reason=decision.reason.value,
                            rule=decision.rule,
                            detail=decision.detail,
                            counted_at=None,
                            next_attempt_at=None,
                            lease_until=None,
                        )
                        events.append(_event(row, "excluded", now, decision.to_json()))
                        stats.excluded += 1
                    elif isinstance(decision, Hold):
                        self._set(
                            conn,
                            row,
                            now,
                            status="held",
                            rule=decision.rule,
                            detail=decision.detail,
                            counted_at=None,
                            next_attempt_at=decision.until,
                            lease_until=None,
                        )
                        events.append(_event(row, "held", now, decision.to_json()))
                        stats.held += 1
                    elif row["channel"] == Channel.INBOX.value:
                        self._to_inbox(conn, row, now)
                        record_sent(conn, row, provider="inbox", now=now)
                        events.append(_event(row, "sent", now, {"provider": "inbox"}))
                        stats.sent += 1
                    else:
                        lease_end = now + self.settings.lease
                        self._set(
                            conn,
                            row,
                            now,
                            status="sending",
                            attempts=row["attempts"] + 1,
                            next_attempt_at=lease_end,
                            lease_until=lease_end,
                            counted_at=now,  # caps count when messages go, not when written
                        )
                        row["attempts"] += 1
                        row["lease_until"] = lease_end
                        ready.append(row)
            if events:
                conn.execute(insert(message_events), events)
        return ready

    @staticmethod
    def _bury(conn: Connection, row: Mapping[str, Any], now: datetime, detail: str) -> None:
        """A message out of attempts: ``dead``, with its dead letter."""
        conn.execute(
            update(messages)
            .where(messages.c.id == row["id"])
            .values(
                status="dead",
                reason="retries_exhausted",
                detail=detail,
                next_attempt_at=None,
                lease_until=None,
                counted_at=None,
                updated_at=now,
            )
        )
        conn.execute(delete(dead_letters).where(dead_letters.c.message_id == row["id"]))
        conn.execute(
            insert(dead_letters).values(
                message_id=row["id"],
                workspace_id=row["workspace_id"],
                profile_id=row["profile_id"],
                provider=row["provider"] or "none",
                attempts=row["attempts"],
                last_error=detail,
                failed_at=now,
            )
        )

    @staticmethod
    def _settle(conn: Connection, row: Mapping[str, Any], now: datetime, **values: Any) -> bool:
        """Record the outcome of our attempt, unless the message is no longer ours: deleted
        (a privacy deletion) or claimed again after our lease ran out (theirs to record)."""
        done = conn.execute(
            update(messages)
            .where(
                messages.c.id == row["id"],
                messages.c.status == "sending",
                messages.c.attempts == row["attempts"],
            )
            .values(updated_at=now, **values)
        ).rowcount
        return bool(done)

    @staticmethod
    def _set(conn: Connection, row: Mapping[str, Any], now: datetime, **values: Any) -> None:
        conn.execute(
            update(messages).where(messages.c.id == row["id"]).values(updated_at=now, **values)
        )

    def _to_inbox(self, conn: Connection, row: Mapping[str, Any], now: datetime) -> None:
        content = read_content(row["content"])
        conn.execute(
            insert(inbox_messages).values(
                message_id=row["id"],
                workspace_id=row["workspace_id"],
                profile_id=row["profile_id"],
                content={"fields": dict(content.fields), "data": dict(content.data)},
                created_at=now,
            )
        )
        self._set(
            conn,
            row,
            now,
            status="sent",
            provider="inbox",
            provider_id=row["id"],
            sent_at=now,
            next_attempt_at=None,
            lease_until=None,
            counted_at=row["counted_at"] or now,
            attempts=row["attempts"] + 1,
        )

    # -- send and record --------------------------------------------------------------------

    def _provider(self, channel: Channel) -> Provider | None:
        made: dict[Channel, Provider] = getattr(self._local, "providers", None) or {}
        self._local.providers = made
        provider = made.get(channel)
        if provider is None:
            factory = self.factories.get(channel)
            if factory is None:
                return None
            provider = made[channel] = factory()
            with self._guard:
                self._made.append(provider)
        return provider

    def _deliver(self, row: dict[str, Any]) -> DispatchStats:
        stats = DispatchStats()
        channel = Channel(row["channel"])
        provider = self._provider(channel)
        if provider is None:
            result = DeliveryResult.failed(
                f"no provider is configured for {channel.value}", transient=True
            )
            self._record(row, result, "none", stats)
            return stats
        breaker = self.breakers[channel]
        with self._guard:
            allowed = breaker.allow(self.monotonic())
            wait_breaker = breaker.retry_in(self.monotonic())
        if not allowed:
            self._defer(row, wait_breaker, provider.name)
            stats.deferred += 1
            return stats
        bucket = self.buckets.get(channel)
        while bucket is not None:
            with self._guard:
                wait = bucket.wait(self.monotonic())
            if wait <= 0:
                break
            self.sleep(wait)
        if self.hub.clock.now() >= row["lease_until"]:
            # paced past our lease: another dispatcher may hold it now; it goes when reclaimed
            with self._guard:
                breaker.release()
            return stats
        try:
            message = OutgoingMessage(
                id=row["id"],
                channel=channel,
                to=row["to_address"] or "",
                content=read_content(row["content"]),
                created_at=row["created_at"],
            )
            # tracked links and the signed List-Unsubscribe are the content hook's
            # (waymark.delivery.feedback); a test send is not tracked
            if self.content_hook is not None and row["source_kind"] != "test":
                message = self.content_hook(row, message)
        except Exception as exc:  # e.g. the store unreachable for the tracking keys
            log.exception("preparing message %s failed", row["id"])
            with self._guard:
                breaker.release()
            self._record(
                row,
                DeliveryResult.failed(f"cannot prepare the message: {exc!r}", transient=True),
                provider.name,
                stats,
            )
            return stats
        try:
            result = provider.send(message)
        except Exception as exc:  # a provider's bug must not stop the others
            log.exception("provider %s raised", provider.name)
            result = DeliveryResult.failed(f"the provider raised {exc!r}", transient=True)
        self.fault("sent")
        with self._guard:
            if result.outcome is Outcome.SENT or not result.transient:
                breaker.success()  # a permanent refusal is an answer: the provider is up
            else:
                breaker.failure(self.monotonic())
        self._record(row, result, provider.name, stats)
        self.fault("recorded")
        return stats

    def _defer(self, row: Mapping[str, Any], seconds: float, provider: str) -> None:
        now = self.hub.clock.now()
        with self.hub.tx() as conn:
            if not self._settle(
                conn,
                row,
                now,
                status="queued",
                attempts=row["attempts"] - 1,
                next_attempt_at=now + timedelta(seconds=max(1.0, seconds)),
                lease_until=None,
            ):
                return  # no longer ours
            conn.execute(
                insert(message_events).values(
                    _event(row, "deferred", now, {"provider": provider, "why": "circuit open"})
                )
            )

    def _record(
        self, row: Mapping[str, Any], result: DeliveryResult, provider: str, stats: DispatchStats
    ) -> None:
        """Record one result; returns once it is committed (with those of the other workers
        that finished meanwhile: one commit for all of them), so each worker's next send
        waits for its last result to be durable."""
        self._records.submit((row, result, provider, stats))

    def _record_batch(
        self, batch: list[tuple[Mapping[str, Any], DeliveryResult, str, DispatchStats]]
    ) -> None:
        try:
            with self.hub.tx() as conn:
                self.fault("recording")
                for row, result, provider, stats in batch:
                    self._record_one(conn, row, result, provider, stats)
        except Exception:
            if len(batch) == 1:
                raise
            # one result's error must not undo the others': each in its own transaction
            log.exception("recording %d results together failed; one by one", len(batch))
            for item in batch:
                try:
                    self._record_batch([item])
                except Exception:  # that message is claimed again when its lease ends
                    log.exception("recording the result of message %s failed", item[0]["id"])

    def _record_one(
        self,
        conn: Connection,
        row: Mapping[str, Any],
        result: DeliveryResult,
        provider: str,
        stats: DispatchStats,
    ) -> None:
        now = self.hub.clock.now()
        detail = result.detail[:2000]
        if result.outcome is Outcome.SENT:
            if not self._settle(
                conn,
                row,
                now,
                status="sent",
                provider=provider,
                provider_id=result.provider_id,
                sent_at=now,
                detail=detail,
                next_attempt_at=None,
                lease_until=None,
            ):
                return  # deleted, or taken over once our lease ran out
            record_sent(conn, row, provider=provider, now=now)
            event = _event(
                row, "sent", now, {"provider": provider, "provider_id": result.provider_id}
            )
            stats.sent += 1
        elif result.transient and row["attempts"] < self.settings.max_attempts:
            delay = backoff(
                row["attempts"],
                base=self.settings.backoff_base,
                cap=self.settings.backoff_cap,
                draw=self.draw(),
            )
            if result.retry_after is not None:
                delay = max(delay, result.retry_after)
            retry_at = now + timedelta(seconds=delay)
            if not self._settle(
                conn,
                row,
                now,
                status="queued",
                provider=provider,
                detail=detail,
                next_attempt_at=retry_at,
                lease_until=None,
            ):
                return  # deleted, or taken over once our lease ran out
            event = _event(
                row,
                "retrying",
                now,
                {
                    "provider": provider,
                    "detail": detail,
                    "attempt": row["attempts"],
                    "retry_at": retry_at.isoformat(),
                },
            )
            stats.retried += 1
        elif result.transient:
            if not self._settle(
                conn,
                row,
                now,
                status="dead",
                provider=provider,
                detail=detail,
                reason="retries_exhausted",
                next_attempt_at=None,
                lease_until=None,
                counted_at=None,
            ):
                return  # deleted, or taken over once our lease ran out
            conn.execute(delete(dead_letters).where(dead_letters.c.message_id == row["id"]))
            conn.execute(
                insert(dead_letters).values(
                    message_id=row["id"],
                    workspace_id=row["workspace_id"],
                    profile_id=row["profile_id"],
                    provider=provider,
                    attempts=row["attempts"],
                    last_error=detail,
                    failed_at=now,
                )
            )
            event = _event(
                row,
                "dead",
                now,
                {"provider": provider, "detail": detail, "attempts": row["attempts"]},
            )
            stats.dead += 1
        else:
            reason = "address_gone" if result.address_gone else "provider_rejected"
            if not self._settle(
                conn,
                row,
                now,
                status="failed",
                provider=provider,
                detail=detail,
                reason=reason,
                next_attempt_at=None,
                lease_until=None,
                counted_at=None,
            ):
                return  # deleted, or taken over once our lease ran out
            event = _event(
                row, "failed", now, {"provider": provider, "detail": detail, "reason": reason}
            )
            if result.address_gone:
                self._prune(conn, row, detail, now)
            stats.failed += 1
        conn.execute(insert(message_events).values(event))

    @staticmethod
    def _prune(conn: Connection, row: Mapping[str, Any], detail: str, now: datetime) -> None:
        """Forget an address the provider says is gone."""
        channel = Channel(row["channel"])
        address = row["to_address"]
        if not address:
            return
        if channel is Channel.PUSH:
            conn.execute(
                delete(push_subscriptions).where(
                    push_subscriptions.c.workspace_id == row["workspace_id"],
                    push_subscriptions.c.address == address,
                )
            )
        elif channel in (Channel.EMAIL, Channel.SMS):
            suppress(
                conn,
                row["workspace_id"],
                channel=channel.value,
                address=address,
                reason="invalid",
                source="provider",
                detail=detail,
                now=now,
                profile_id=row["profile_id"],
            )


class GroupCommit:
    """Runs ``commit`` on every item submitted while an earlier run was busy, in one call:
    the first waiting thread leads (runs the batch), the others wait for it. :meth:`submit`
    returns once its item's batch has run, or raises what the batch raised."""

    def __init__(self, commit: Callable[[list[Any]], None]) -> None:
        self._commit = commit
        self._cond = threading.Condition()
        self._pending: list[list[Any]] = []  # [item, done, error] per submitted item
        self._leading = False

    def submit(self, item: Any) -> None:
        slot: list[Any] = [item, False, None]
        with self._cond:
            self._pending.append(slot)
            while not slot[1]:
                if self._leading:
                    self._cond.wait()
                    continue
                self._leading = True
                batch, self._pending = self._pending, []
                self._cond.release()
                error: BaseException | None = None
                try:
                    self._commit([s[0] for s in batch])
                except BaseException as exc:  # every item of the batch shares the outcome
                    error = exc
                finally:
                    self._cond.acquire()
                    self._leading = False
                    for s in batch:
                        s[1], s[2] = True, error
                    self._cond.notify_all()
        if slot[2] is not None:
            raise slot[2]


def _event(
    row: Mapping[str, Any], status: str, at: datetime, detail: Mapping[str, Any]
) -> dict[str, Any]:
    return {
        "workspace_id": row["workspace_id"],
        "message_id": row["id"],
        "profile_id": row["profile_id"],
        "status": status,
        "at": at,
        "detail": dict(detail),
    }


def pending(conn: Connection, *, now: datetime) -> int:
    """How many messages are due now (queued or held, or sending with an expired lease)."""
    return int(
        conn.execute(
            select(func.count())
            .select_from(messages)
            .where(messages.c.status.in_(_CLAIMABLE), messages.c.next_attempt_at <= now)
        ).scalar_one()
    )
