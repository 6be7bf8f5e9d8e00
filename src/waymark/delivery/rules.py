"""Delivery rules: whether one message goes now, is held until a time, or is excluded, and why.

A workspace's rules are a JSON document (:func:`parse_rules`)::

    {"caps": [{"name": "marketing email", "channel": "email", "purpose": "marketing",
               "limit": 3, "per": "7d"},
              {"name": "push daily", "channel": "push", "limit": 1, "per": "1d"}],
     "quiet_hours": [{"name": "night", "channels": ["sms", "push"], "start": "21:00",
                      "end": "08:00", "action": "hold"}],
     "require_consent": true}

- a **cap** allows ``limit`` messages in any rolling window of ``per`` (``"30m"``, ``"12h"``,
  ``"7d"``; at most 366 days). Without ``channel`` it counts every channel, without ``purpose``
  every purpose. Transactional messages are never capped and never count toward a cap.
- a **quiet hours** window (``start`` inclusive, ``end`` exclusive, local wall-clock times that
  may wrap midnight) applies to its ``channels`` (all when omitted) in the recipient's time zone,
  or in its own ``time_zone`` when given. ``action`` ``"hold"`` (the default) holds the message
  until the window ends; ``"drop"`` excludes it.
- ``require_consent`` (default true): a non-transactional message needs an ``opted_in`` consent,
  except in the in-app inbox (shown only inside the app) and a webhook (a call to a system, not
  to the person); an ``opted_out`` blocks every channel.

:func:`decide` checks, in this order, and the first that fails decides:

1. address: present (``no_address``), then valid (``invalid_address``);
2. suppression list (``suppressed``): every reason blocks every message, except that
   ``unsubscribed`` does not block transactional messages;
3. consent (``no_consent``): for non-transactional messages only (see :func:`decide`);
4. quiet hours: a hold, or ``quiet_hours`` for a ``drop`` window; transactional messages bypass;
5. frequency caps (``frequency_cap``), in document order; transactional messages bypass.

A full cap excludes; it never holds. A hold is not a promise: decide again at ``until`` (caps
are counted then). Pure: no I/O, no clock (``now`` is an argument).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta, tzinfo
from enum import StrEnum
from typing import Any, Final
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError, available_timezones

from waymark.core.errors import InvalidInput, Issue, join_path
from waymark.delivery.templates import Channel
from waymark.segmentation.lang.check import did_you_mean

__all__ = [
    "ANY_PURPOSE",
    "MAX_PER",
    "MAX_RULES",
    "Action",
    "Cap",
    "CapCheck",
    "Decision",
    "Exclude",
    "Hold",
    "Message",
    "QuietHours",
    "Reason",
    "Rules",
    "Send",
    "SentRecord",
    "cap_keys",
    "decide",
    "parse_rules",
]

#: Longest window a cap may have (the sends of that long must be kept to count them).
MAX_PER: Final = timedelta(days=366)
#: Most caps, and most quiet hours windows, a workspace may have.
MAX_RULES: Final = 100
#: Largest cap limit.
MAX_LIMIT: Final = 1_000_000
#: A consent key ``(channel, ANY_PURPOSE)`` covers every purpose of that channel.
ANY_PURPOSE: Final = "*"

_DURATION: Final = re.compile(r"([1-9][0-9]{0,6})([mhd])")
_UNITS: Final = {"m": 60, "h": 3600, "d": 86400}
_UNIT_WORDS: Final = {"m": "minute", "h": "hour", "d": "day"}
_CLOCK: Final = re.compile(r"([01][0-9]|2[0-3]):([0-5][0-9])")
_NAME_MAX: Final = 128

_TOP_KEYS: Final = ("caps", "quiet_hours", "require_consent")
_CAP_KEYS: Final = ("name", "channel", "purpose", "limit", "per")
_QUIET_KEYS: Final = ("name", "channels", "start", "end", "action", "time_zone")


class Action(StrEnum):
    """What a quiet hours window does to a message that would go out inside it."""

    HOLD = "hold"
    DROP = "drop"


class Reason(StrEnum):
    """Why a message was excluded (the machine code recorded with it)."""

    NO_ADDRESS = "no_address"
    INVALID_ADDRESS = "invalid_address"
    SUPPRESSED = "suppressed"
    NO_CONSENT = "no_consent"
    QUIET_HOURS = "quiet_hours"
    FREQUENCY_CAP = "frequency_cap"
    NO_PROFILE = "no_profile"  # the profile went away before the message did (decided by storage)


# -- the rules ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Cap:
    """At most ``limit`` messages in any window of ``per``; ``None`` channel or purpose: any."""

    name: str
    limit: int
    per: timedelta
    channel: Channel | None = None
    purpose: str | None = None

    def to_json(self) -> dict[str, Any]:
        """The JSON form (see the module docstring)."""
        out: dict[str, Any] = {"name": self.name}
        if self.channel is not None:
            out["channel"] = self.channel.value
        if self.purpose is not None:
            out["purpose"] = self.purpose
        out["limit"] = self.limit
        out["per"] = _format_duration(self.per)
        return out


@dataclass(frozen=True)
class QuietHours:
    """A daily window of local wall-clock time, ``start`` inclusive and ``end`` exclusive (it
    wraps midnight when ``end < start``), for ``channels`` (``None``: all), evaluated in
    ``time_zone`` or, when ``None``, in the recipient's zone."""

    name: str
    start: time
    end: time
    channels: frozenset[Channel] | None = None
    action: Action = Action.HOLD
    time_zone: str | None = None

    def applies(self, channel: Channel) -> bool:
        """Whether this window concerns ``channel``."""
        return self.channels is None or channel in self.channels

    def covers(self, wall: time) -> bool:
        """Whether the local wall-clock time ``wall`` is inside the window."""
        if self.start < self.end:
            return self.start <= wall < self.end
        return wall >= self.start or wall < self.end

    def to_json(self) -> dict[str, Any]:
        """The JSON form (see the module docstring); channels in :class:`Channel` order."""
        out: dict[str, Any] = {"name": self.name}
        if self.channels is not None:
            out["channels"] = [c.value for c in Channel if c in self.channels]
        out["start"] = self.start.strftime("%H:%M")
        out["end"] = self.end.strftime("%H:%M")
        out["action"] = self.action.value
        if self.time_zone is not None:
            out["time_zone"] = self.time_zone
        return out


@dataclass(frozen=True)
class Rules:
    """A workspace's delivery rules; build with :func:`parse_rules`."""

    caps: tuple[Cap, ...] = ()
    quiet_hours: tuple[QuietHours, ...] = ()
    require_consent: bool = True

    def to_json(self) -> dict[str, Any]:
        """The JSON form, which :func:`parse_rules` reads back to equal rules."""
        return {
            "caps": [c.to_json() for c in self.caps],
            "quiet_hours": [q.to_json() for q in self.quiet_hours],
            "require_consent": self.require_consent,
        }


# -- parsing --------------------------------------------------------------------------------------


def parse_rules(document: Any) -> Rules:
    """The rules in ``document`` (the JSON form); :class:`InvalidInput` naming the path and the
    reason of every problem found (unknown keys, bad limits, channels, durations, clock times
    and time zones, duplicate names)."""
    if not isinstance(document, Mapping):
        raise InvalidInput([Issue("", "the delivery rules are a JSON object")])
    issues: list[Issue] = []
    _unknown_keys(document, _TOP_KEYS, "", "the delivery rules", issues)
    caps = tuple(
        cap
        for index, item in enumerate(_list(document, "caps", "caps", issues))
        if (cap := _parse_cap(item, join_path("caps", index), issues)) is not None
    )
    windows = tuple(
        window
        for index, item in enumerate(_list(document, "quiet_hours", "quiet hours windows", issues))
        if (window := _parse_quiet(item, join_path("quiet_hours", index), issues)) is not None
    )
    _unique_names(document, "caps", issues)
    _unique_names(document, "quiet_hours", issues)
    require_consent = document.get("require_consent", True)
    if not isinstance(require_consent, bool):
        issues.append(Issue("require_consent", "either true or false"))
        require_consent = True
    if issues:
        raise InvalidInput(issues)
    return Rules(caps, windows, require_consent)


def _unknown_keys(
    item: Mapping[Any, Any], known: Sequence[str], base: str, what: str, issues: list[Issue]
) -> None:
    for key in item:
        if key not in known:
            hint = did_you_mean(str(key), known)
            issues.append(Issue(join_path(base, str(key)), f"not a key of {what}{hint}"))


def _list(document: Mapping[Any, Any], key: str, what: str, issues: list[Issue]) -> list[Any]:
    raw = document.get(key, [])
    if not isinstance(raw, list):
        issues.append(Issue(key, f"a list of {what}"))
        return []
    if len(raw) > MAX_RULES:
        issues.append(Issue(key, f"at most {MAX_RULES} {what}, not {len(raw)}"))
        return []
    return raw


def _unique_names(document: Mapping[Any, Any], key: str, issues: list[Issue]) -> None:
    raw = document.get(key)
    if not isinstance(raw, list) or len(raw) > MAX_RULES:
        return
    seen: dict[str, int] = {}
    for index, item in enumerate(raw):
        if not isinstance(item, Mapping) or not isinstance(name := item.get("name"), str):
            continue
        if name in seen:
            where = join_path(key, seen[name])
            issues.append(
                Issue(join_path(join_path(key, index), "name"), f"{name!r} is taken by {where}")
            )
        else:
            seen[name] = index


def _name(item: Mapping[Any, Any], base: str, issues: list[Issue]) -> str | None:
    name = item.get("name")
    if not isinstance(name, str) or not name.strip():
        issues.append(Issue(join_path(base, "name"), "a non-empty name is required"))
        return None
    if len(name) > _NAME_MAX:
        issues.append(Issue(join_path(base, "name"), f"longer than {_NAME_MAX} characters"))
        return None
    return name


def _channel(raw: Any, path: str, issues: list[Issue]) -> Channel | None:
    if isinstance(raw, str):
        try:
            return Channel(raw)
        except ValueError:
            pass
    hint = did_you_mean(str(raw), [c.value for c in Channel])
    issues.append(Issue(path, f"unknown channel {raw!r}{hint}"))
    return None


def _parse_cap(item: Any, base: str, issues: list[Issue]) -> Cap | None:
    if not isinstance(item, Mapping):
        issues.append(Issue(base, "a cap is a JSON object"))
        return None
    before = len(issues)
    _unknown_keys(item, _CAP_KEYS, base, "a cap", issues)
    name = _name(item, base, issues)
    channel = None
    if "channel" in item:
        channel = _channel(item["channel"], join_path(base, "channel"), issues)
    purpose = item.get("purpose")
    if purpose is not None and not (isinstance(purpose, str) and purpose.strip()):
        issues.append(Issue(join_path(base, "purpose"), "a non-empty purpose, or leave it out"))
    limit = item.get("limit")
    if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= MAX_LIMIT:
        issues.append(
            Issue(
                join_path(base, "limit"), f"a whole number from 1 to {MAX_LIMIT:,}, not {limit!r}"
            )
        )
    per = _parse_duration(item.get("per"), join_path(base, "per"), issues)
    if len(issues) > before or name is None or per is None or not isinstance(limit, int):
        return None
    return Cap(name, limit, per, channel, purpose)


def _parse_duration(raw: Any, path: str, issues: list[Issue]) -> timedelta | None:
    match = _DURATION.fullmatch(raw) if isinstance(raw, str) else None
    if match is None:
        issues.append(
            Issue(path, f'{raw!r} is not a duration; write a number and a unit: "30m", "12h", "7d"')
        )
        return None
    per = timedelta(seconds=int(match[1]) * _UNITS[match[2]])
    if per > MAX_PER:
        issues.append(Issue(path, f"at most {_format_duration(MAX_PER)}, not {raw}"))
        return None
    return per


def _format_duration(per: timedelta) -> str:
    count, unit = _duration_parts(per)
    return f"{count}{unit}"


def _duration_parts(per: timedelta) -> tuple[int, str]:
    seconds = int(per.total_seconds())
    for unit in ("d", "h"):
        if seconds % _UNITS[unit] == 0:
            return seconds // _UNITS[unit], unit
    return seconds // 60, "m"


def _human_duration(per: timedelta) -> str:
    count, unit = _duration_parts(per)
    return f"{count} {_UNIT_WORDS[unit]}{'' if count == 1 else 's'}"


def _clock(raw: Any, path: str, issues: list[Issue]) -> time | None:
    match = _CLOCK.fullmatch(raw) if isinstance(raw, str) else None
    if match is None:
        issues.append(
            Issue(path, f'{raw!r} is not a time of day; write "HH:MM" from 00:00 to 23:59')
        )
        return None
    return time(int(match[1]), int(match[2]))


def _lookup_zone(raw: Any) -> ZoneInfo | None:
    """The IANA zone named ``raw``, or None."""
    if isinstance(raw, str) and raw:
        try:
            return ZoneInfo(raw)
        except (ZoneInfoNotFoundError, ValueError, OSError):
            pass
    return None


def _zone(raw: Any, path: str, issues: list[Issue]) -> ZoneInfo | None:
    """The IANA zone named ``raw``, else an issue (with a did-you-mean hint) and None."""
    zone = _lookup_zone(raw)
    if zone is not None:
        return zone
    hint = did_you_mean(str(raw), available_timezones(), none="no time zone data installed")
    issues.append(Issue(path, f"unknown time zone {raw!r}{hint}"))
    return None


def _parse_quiet(item: Any, base: str, issues: list[Issue]) -> QuietHours | None:
    if not isinstance(item, Mapping):
        issues.append(Issue(base, "a quiet hours window is a JSON object"))
        return None
    before = len(issues)
    _unknown_keys(item, _QUIET_KEYS, base, "a quiet hours window", issues)
    name = _name(item, base, issues)
    channels: frozenset[Channel] | None = None
    if "channels" in item:
        raw = item["channels"]
        path = join_path(base, "channels")
        if not isinstance(raw, list) or not raw:
            issues.append(Issue(path, "a non-empty list of channels, or leave it out for all"))
        else:
            found = [_channel(c, join_path(path, i), issues) for i, c in enumerate(raw)]
            channels = frozenset(c for c in found if c is not None)
            if len(channels) < len(found) and None not in found:
                issues.append(Issue(path, "a channel is listed twice"))
    start = _clock(item.get("start"), join_path(base, "start"), issues)
    end = _clock(item.get("end"), join_path(base, "end"), issues)
    if start is not None and start == end:
        issues.append(Issue(join_path(base, "end"), "a window cannot end when it starts"))
    try:
        action = Action(item.get("action", Action.HOLD.value))
    except ValueError:
        issues.append(Issue(join_path(base, "action"), 'either "hold" or "drop"'))
        action = Action.HOLD
    time_zone = item.get("time_zone")
    if time_zone is not None:
        _zone(time_zone, join_path(base, "time_zone"), issues)
    if len(issues) > before or name is None or start is None or end is None:
        return None
    return QuietHours(name, start, end, channels, action, time_zone)


# -- what is checked ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Message:
    """One message about to be sent. ``address_valid`` is the caller's verdict on ``address``;
    ``time_zone`` is the recipient's IANA zone (``None`` or unknown: the workspace's)."""

    channel: Channel
    purpose: str
    address: str | None
    address_valid: bool = True
    transactional: bool = False
    time_zone: str | None = None


@dataclass(frozen=True)
class SentRecord:
    """An earlier send to the same profile; ``timestamp`` is aware."""

    timestamp: datetime
    channel: Channel
    purpose: str
    transactional: bool = False

    def __post_init__(self) -> None:
        if self.timestamp.utcoffset() is None:
            raise ValueError("a SentRecord timestamp must be timezone-aware")


@dataclass(frozen=True)
class CapCheck:
    """One cap to check for one message: the sends to count are the non-transactional ones
    matching ``channel`` and ``purpose`` (``None``: any) with ``start < timestamp <= end``; the
    message is excluded when there are ``limit`` or more. A storage layer counts with the same
    definition (:meth:`counts`)."""

    name: str
    channel: Channel | None
    purpose: str | None
    start: datetime
    end: datetime
    limit: int
    per: timedelta

    def counts(self, record: SentRecord) -> bool:
        """Whether ``record`` counts toward this cap."""
        return (
            not record.transactional
            and (self.channel is None or record.channel is self.channel)
            and (self.purpose is None or record.purpose == self.purpose)
            and self.start < record.timestamp <= self.end
        )


def cap_keys(rules: Rules, message: Message, *, now: datetime) -> list[CapCheck]:
    """The caps that apply to ``message`` at ``now``, in document order, each with its window
    ``(now - per, now]``; none for a transactional message."""
    now = _utc(now)
    if message.transactional:
        return []
    return [
        CapCheck(cap.name, cap.channel, cap.purpose, now - cap.per, now, cap.limit, cap.per)
        for cap in rules.caps
        if (cap.channel is None or cap.channel is message.channel)
        and (cap.purpose is None or cap.purpose == message.purpose)
    ]


# -- decisions ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Send:
    """Send now."""

    def to_json(self) -> dict[str, Any]:
        """The form recorded with the message."""
        return {"outcome": "send"}


@dataclass(frozen=True)
class Hold:
    """Hold until ``until`` (aware, UTC) when the quiet hours window ``rule`` ends; decide again
    then."""

    until: datetime
    rule: str
    detail: str

    def to_json(self) -> dict[str, Any]:
        """The form recorded with the message."""
        return {
            "outcome": "hold",
            "until": self.until.isoformat(),
            "rule": self.rule,
            "detail": self.detail,
        }


@dataclass(frozen=True)
class Exclude:
    """Do not send: ``reason`` is the machine code, ``detail`` says it for people and ``rule``
    names the cap or window that excluded it (``None`` for the other reasons)."""

    reason: Reason
    detail: str
    rule: str | None = None

    def to_json(self) -> dict[str, Any]:
        """The form recorded with the message."""
        out: dict[str, Any] = {"outcome": "exclude", "reason": self.reason.value}
        if self.rule is not None:
            out["rule"] = self.rule
        out["detail"] = self.detail
        return out


Decision = Send | Hold | Exclude


def decide(
    rules: Rules,
    message: Message,
    *,
    consents: Mapping[tuple[str, str], str],
    suppressed: Mapping[str, str],
    sent: Sequence[SentRecord],
    now: datetime,
    workspace_zone: str = "UTC",
) -> Decision:
    """Whether ``message`` goes at ``now`` (aware), in the order of the module docstring.

    ``consents`` maps ``(channel, purpose)`` to a status; ``(channel, "*")`` covers every
    purpose of the channel. An ``opted_out`` at either key excludes a non-transactional
    message; with ``require_consent`` one of them must be ``opted_in`` (any other status, or
    none, is no consent). ``suppressed`` maps an address, compared exactly as given, to a reason
    (``hard_bounce``, ``complaint``, ``unsubscribed``, ``manual`` …). ``sent`` holds the
    profile's earlier sends. :class:`InvalidInput` if ``workspace_zone`` is not a time zone;
    ``ValueError`` if ``now`` is naive."""
    now = _utc(now)
    issues: list[Issue] = []
    fallback = _zone(workspace_zone, "workspace_zone", issues)
    if fallback is None:
        raise InvalidInput(issues)
    if not message.address:
        return Exclude(Reason.NO_ADDRESS, f"the profile has no {message.channel.value} address")
    if not message.address_valid:
        return Exclude(Reason.INVALID_ADDRESS, f"the {message.channel.value} address is not valid")
    suppression = suppressed.get(message.address)
    if suppression is not None and not (message.transactional and suppression == "unsubscribed"):
        return Exclude(Reason.SUPPRESSED, f"the address is on the suppression list: {suppression}")
    if message.transactional:
        return Send()
    refusal = _consent(rules, message, consents)
    if refusal is not None:
        return refusal
    quiet = _quiet_hours(rules, message, now, fallback)
    if quiet is not None:
        return quiet
    for check in cap_keys(rules, message, now=now):
        count = sum(1 for record in sent if check.counts(record))
        if count >= check.limit:
            detail = (
                f"cap {check.name!r}: {count} of {check.limit} "
                f"in the last {_human_duration(check.per)}"
            )
            return Exclude(Reason.FREQUENCY_CAP, detail, check.name)
    return Send()


def _utc(moment: datetime) -> datetime:
    if moment.utcoffset() is None:
        raise ValueError("now must be timezone-aware")
    return moment.astimezone(UTC)


def _consent(
    rules: Rules, message: Message, consents: Mapping[tuple[str, str], str]
) -> Exclude | None:
    channel = message.channel.value
    what = f"{channel} {message.purpose}"
    statuses = [consents.get((channel, message.purpose)), consents.get((channel, ANY_PURPOSE))]
    if "opted_out" in statuses:
        return Exclude(Reason.NO_CONSENT, f"the profile opted out of {what}")
    # the in-app inbox is shown only inside the app the person uses, and a webhook calls a
    # system, not the person: neither needs an opt-in
    if (
        rules.require_consent
        and message.channel not in (Channel.INBOX, Channel.WEBHOOK)
        and "opted_in" not in statuses
    ):
        status = next((s for s in statuses if s is not None), "none")
        return Exclude(Reason.NO_CONSENT, f"no opt-in for {what} (consent: {status})")
    return None


def _quiet_hours(
    rules: Rules, message: Message, now: datetime, fallback: ZoneInfo
) -> Hold | Exclude | None:
    """A hold until the first instant at or after ``now`` outside every applicable window, or
    an exclusion when a ``drop`` window is met on the way (or the windows never open)."""
    windows = [w for w in rules.quiet_hours if w.applies(message.channel)]
    if not windows:
        return None
    recipient, note = fallback, ""
    if message.time_zone is not None:
        found = _lookup_zone(message.time_zone)
        if found is None:
            note = f"; unknown profile time zone {message.time_zone!r}, used {fallback.key}"
        else:
            recipient = found
    zones = {w.name: ZoneInfo(w.time_zone) if w.time_zone else recipient for w in windows}
    moment, first = now, None
    for _ in range(2 * len(windows) + 2):
        active = [w for w in windows if w.covers(moment.astimezone(zones[w.name]).time())]
        if not active:
            break
        for window in active:
            if window.action is Action.DROP:
                return Exclude(
                    Reason.QUIET_HOURS,
                    f"{_describe(window, zones[window.name])} drops {message.channel.value} "
                    f"messages{note}",
                    window.name,
                )
        first = first or active[0]
        moment = max(_next_end(w, moment, zones[w.name]) for w in active)
    else:
        return Exclude(
            Reason.QUIET_HOURS,
            f"quiet hours leave no time of day to send {message.channel.value} messages{note}",
            windows[0].name,
        )
    if first is None:
        return None
    zone = zones[first.name]
    local = moment.astimezone(zone).strftime("%Y-%m-%d %H:%M %Z")
    return Hold(moment, first.name, f"{_describe(first, zone)}: held until {local}{note}")


def _describe(window: QuietHours, zone: ZoneInfo) -> str:
    start, end = window.start.strftime("%H:%M"), window.end.strftime("%H:%M")
    return f"quiet hours {window.name!r} ({start}–{end} {zone.key})"


def _next_end(window: QuietHours, after: datetime, zone: ZoneInfo) -> datetime:
    """The first instant later than ``after`` at which the local clock reaches ``window.end``
    (when that wall time falls into a gap, the first valid instant after the gap)."""
    today = after.astimezone(zone).date()
    candidates = (
        instant
        for days in (-1, 0, 1, 2)
        for instant in _instants(today + timedelta(days=days), window.end, zone)
        if instant > after
    )
    return min(candidates)


def _instants(day: date, wall: time, zone: ZoneInfo) -> list[datetime]:
    """The UTC instants at which the clock of ``zone`` reads ``wall`` on ``day``: one, two in a
    fold, or, in a gap, the first instant after it."""
    naive = datetime.combine(day, wall)
    both = [naive.replace(tzinfo=zone, fold=fold).astimezone(UTC) for fold in (0, 1)]
    valid = sorted({i for i in both if i.astimezone(zone).replace(tzinfo=None) == naive})
    if valid:
        return valid
    return [_transition(min(both), max(both), zone)]


def _offset(moment: datetime, zone: tzinfo) -> timedelta | None:
    return moment.astimezone(zone).utcoffset()


def _transition(low: datetime, high: datetime, zone: ZoneInfo) -> datetime:
    """The first instant in ``(low, high]`` with the offset ``high`` has (to the second)."""
    target = _offset(high, zone)
    while high - low > timedelta(seconds=1):
        middle = low + timedelta(seconds=int((high - low).total_seconds()) // 2)
        if _offset(middle, zone) == target:
            high = middle
        else:
            low = middle
    return high
