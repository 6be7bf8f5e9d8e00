"""Delivery rules: parsing, the order of checks, caps, consent, suppression and quiet hours."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from waymark.core.errors import InvalidInput
from waymark.delivery.rules import (
    Cap,
    Decision,
    Exclude,
    Hold,
    Message,
    Reason,
    Rules,
    Send,
    SentRecord,
    cap_keys,
    decide,
    parse_rules,
)
from waymark.delivery.templates import Channel

BERLIN = ZoneInfo("Europe/Berlin")
NOW = datetime(2026, 6, 10, 12, 0, tzinfo=UTC)
EXAMPLE: dict[str, Any] = {
    "caps": [
        {
            "name": "marketing email",
            "channel": "email",
            "purpose": "marketing",
            "limit": 3,
            "per": "7d",
        },
        {"name": "push daily", "channel": "push", "limit": 1, "per": "1d"},
    ],
    "quiet_hours": [
        {
            "name": "night",
            "channels": ["sms", "push"],
            "start": "21:00",
            "end": "08:00",
            "action": "hold",
        }
    ],
    "require_consent": True,
}
ALL_IN = {(c.value, "*"): "opted_in" for c in Channel}


def message(
    channel: Channel = Channel.EMAIL,
    purpose: str = "marketing",
    *,
    address: str | None = "ada@example.com",
    address_valid: bool = True,
    transactional: bool = False,
    time_zone: str | None = None,
) -> Message:
    return Message(channel, purpose, address, address_valid, transactional, time_zone)


def run(
    rules: Rules,
    msg: Message,
    *,
    consents: Mapping[tuple[str, str], str] = ALL_IN,
    suppressed: Mapping[str, str] | None = None,
    sent: Sequence[SentRecord] = (),
    now: datetime = NOW,
    workspace_zone: str = "UTC",
) -> Decision:
    return decide(
        rules,
        msg,
        consents=consents,
        suppressed=suppressed or {},
        sent=sent,
        now=now,
        workspace_zone=workspace_zone,
    )


def quiet(start: str, end: str, action: str = "hold", **extra: Any) -> Rules:
    window = {"name": "night", "start": start, "end": end, "action": action, **extra}
    return parse_rules({"quiet_hours": [window], "require_consent": False})


def reason(decision: Decision) -> Reason | None:
    return decision.reason if isinstance(decision, Exclude) else None


# -- parsing ---------------------------------------------------------------------------------------


def test_the_example_parses_and_reads_back() -> None:
    rules = parse_rules(EXAMPLE)
    assert rules.caps[0] == Cap("marketing email", 3, timedelta(days=7), Channel.EMAIL, "marketing")
    assert rules.caps[1].purpose is None
    assert rules.quiet_hours[0].channels == frozenset({Channel.SMS, Channel.PUSH})
    assert rules.to_json() == EXAMPLE
    assert parse_rules(json.loads(json.dumps(rules.to_json()))) == rules


def test_defaults() -> None:
    rules = parse_rules({})
    assert rules == Rules((), (), require_consent=True)
    window = quiet("22:00", "06:00").quiet_hours[0]
    assert window.channels is None
    assert window.action == "hold"
    assert parse_rules({"caps": [{"name": "x", "limit": 1, "per": "168h"}]}).to_json()["caps"] == [
        {"name": "x", "limit": 1, "per": "7d"}
    ]


def _cap(**changes: Any) -> dict[str, Any]:
    return {"caps": [{"name": "c", "limit": 2, "per": "1d", **changes}]}


def _window(**changes: Any) -> dict[str, Any]:
    return {"quiet_hours": [{"name": "w", "start": "21:00", "end": "08:00", **changes}]}


@pytest.mark.parametrize(
    ("document", "path", "words"),
    [
        ([], "", "JSON object"),
        ({"cap": []}, "cap", 'did you mean "caps"'),
        ({"caps": {}}, "caps", "a list of caps"),
        ({"caps": [1]}, "caps[0]", "a cap is a JSON object"),
        (_cap(chanel="email"), "caps[0].chanel", 'did you mean "channel"'),
        (_cap(limit=0), "caps[0].limit", "from 1 to"),
        (_cap(limit=-3), "caps[0].limit", "from 1 to"),
        (_cap(limit=True), "caps[0].limit", "from 1 to"),
        (_cap(limit=2.5), "caps[0].limit", "from 1 to"),
        (_cap(channel="fax"), "caps[0].channel", "unknown channel 'fax'"),
        (_cap(channel="emial"), "caps[0].channel", 'did you mean "email"'),
        (_cap(per="7 days"), "caps[0].per", "not a duration"),
        (_cap(per="0d"), "caps[0].per", "not a duration"),
        (_cap(per="-1h"), "caps[0].per", "not a duration"),
        (_cap(per=7), "caps[0].per", "not a duration"),
        (_cap(per="400d"), "caps[0].per", "at most 366d"),
        (_cap(purpose=""), "caps[0].purpose", "non-empty"),
        (_cap(name=""), "caps[0].name", "name is required"),
        (
            {"caps": [{"name": "c", "limit": 1, "per": "1d"}] * 2},
            "caps[1].name",
            "taken by caps[0]",
        ),
        (_window(start="25:00"), "quiet_hours[0].start", "not a time of day"),
        (_window(end="8:00"), "quiet_hours[0].end", "not a time of day"),
        (_window(end="21:00"), "quiet_hours[0].end", "cannot end when it starts"),
        (_window(action="wait"), "quiet_hours[0].action", '"hold" or "drop"'),
        (_window(channels=[]), "quiet_hours[0].channels", "non-empty list"),
        (_window(channels=["sms", "pigeon"]), "quiet_hours[0].channels[1]", "unknown channel"),
        (_window(channels=["sms", "sms"]), "quiet_hours[0].channels", "listed twice"),
        (_window(time_zone="Europe/Berln"), "quiet_hours[0].time_zone", "Europe/Berlin"),
        (_window(time_zone="Mars/Olympus"), "quiet_hours[0].time_zone", "unknown time zone"),
        (_window(time_zone="../etc/passwd"), "quiet_hours[0].time_zone", "unknown time zone"),
        (_window(begin="21:00"), "quiet_hours[0].begin", "not a key of a quiet hours window"),
        ({"require_consent": "yes"}, "require_consent", "true or false"),
    ],
)
def test_parse_errors_name_the_path(document: Any, path: str, words: str) -> None:
    with pytest.raises(InvalidInput) as caught:
        parse_rules(document)
    issues = {issue.path: issue.reason for issue in caught.value.issues}
    assert path in issues, issues
    assert words in issues[path]


def test_every_problem_is_reported_at_once() -> None:
    document = {
        "caps": [{"name": "a", "limit": 0, "per": "1w", "chanel": "sms"}],
        "quiet_hours": [{"name": "b", "start": "25:00", "end": "08:00", "time_zone": "Nowhere"}],
    }
    with pytest.raises(InvalidInput) as caught:
        parse_rules(document)
    assert {i.path for i in caught.value.issues} == {
        "caps[0].limit",
        "caps[0].per",
        "caps[0].chanel",
        "quiet_hours[0].start",
        "quiet_hours[0].time_zone",
    }


_ZONES = ["Europe/Berlin", "America/New_York", "Asia/Kolkata", "UTC", "Australia/Lord_Howe"]
_clock = st.builds(lambda h, m: f"{h:02d}:{m:02d}", st.integers(0, 23), st.integers(0, 59))
_duration = st.one_of(
    st.builds(lambda n: f"{n}m", st.integers(1, 366 * 24 * 60)),
    st.builds(lambda n: f"{n}h", st.integers(1, 366 * 24)),
    st.builds(lambda n: f"{n}d", st.integers(1, 366)),
)


@st.composite
def _cap_documents(draw: st.DrawFn) -> dict[str, Any]:
    out: dict[str, Any] = {"name": draw(st.text(min_size=1, max_size=20).filter(str.strip))}
    if draw(st.booleans()):
        out["channel"] = draw(st.sampled_from([c.value for c in Channel]))
    if draw(st.booleans()):
        out["purpose"] = draw(st.sampled_from(["marketing", "news", "reminders"]))
    out["limit"] = draw(st.integers(1, 1_000_000))
    out["per"] = draw(_duration)
    return out


@st.composite
def _window_documents(draw: st.DrawFn) -> dict[str, Any]:
    start = draw(_clock)
    out: dict[str, Any] = {
        "name": draw(st.text(min_size=1, max_size=20).filter(str.strip)),
        "start": start,
        "end": draw(_clock.filter(lambda end: end != start)),
    }
    if draw(st.booleans()):
        out["channels"] = draw(
            st.lists(st.sampled_from([c.value for c in Channel]), min_size=1, unique=True)
        )
    if draw(st.booleans()):
        out["action"] = draw(st.sampled_from(["hold", "drop"]))
    if draw(st.booleans()):
        out["time_zone"] = draw(st.sampled_from(_ZONES))
    return out


_documents = st.fixed_dictionaries(
    {},
    optional={
        "caps": st.lists(_cap_documents(), max_size=5, unique_by=lambda c: c["name"]),
        "quiet_hours": st.lists(_window_documents(), max_size=5, unique_by=lambda w: w["name"]),
        "require_consent": st.booleans(),
    },
)


@given(_documents)
def test_json_round_trip(document: dict[str, Any]) -> None:
    rules = parse_rules(document)
    written = json.loads(json.dumps(rules.to_json()))
    assert parse_rules(written) == rules
    assert parse_rules(written).to_json() == written


# -- the order of checks --------------------------------------------------------------------------


def test_the_order_of_checks() -> None:
    """Address presence, validity, suppression, consent, quiet hours, caps: with every check
    failing, the first decides; removing that failure reveals the next."""
    rules = parse_rules(
        {
            "caps": [{"name": "one", "limit": 1, "per": "1d"}],
            "quiet_hours": [{"name": "midday", "start": "11:00", "end": "13:00"}],
        }
    )
    failing: dict[str, Any] = {
        "address": None,
        "address_valid": False,
        "suppressed": {"ada@example.com": "complaint"},
        "consents": {},
        "now": NOW,  # 12:00, inside the quiet hours
        "sent": _sent(timedelta(hours=1)),  # the cap is full
    }
    fixes: list[tuple[Reason | str, dict[str, Any]]] = [
        (Reason.NO_ADDRESS, {"address": "ada@example.com"}),
        (Reason.INVALID_ADDRESS, {"address_valid": True}),
        (Reason.SUPPRESSED, {"suppressed": {}}),
        (Reason.NO_CONSENT, {"consents": ALL_IN}),
        ("hold", {"now": NOW + timedelta(hours=2)}),
        (Reason.FREQUENCY_CAP, {"sent": ()}),
        ("send", {}),
    ]
    state = dict(failing)
    for expected, fix in fixes:
        msg = message(address=state["address"], address_valid=state["address_valid"])
        decision = run(
            rules,
            msg,
            suppressed=state["suppressed"],
            consents=state["consents"],
            now=state["now"],
            sent=state["sent"],
        )
        if expected == "hold":
            assert isinstance(decision, Hold), decision
        elif expected == "send":
            assert decision == Send()
        else:
            assert reason(decision) is expected, decision
        state |= fix


def test_no_address_comes_before_everything() -> None:
    decision = run(
        parse_rules({}),
        message(address="", address_valid=False, transactional=True),
        suppressed={"": "manual"},
    )
    assert decision == Exclude(Reason.NO_ADDRESS, "the profile has no email address")


def test_suppression_comes_before_consent_and_names_the_reason() -> None:
    decision = run(parse_rules({}), message(), suppressed={"ada@example.com": "hard_bounce"})
    assert decision == Exclude(
        Reason.SUPPRESSED, "the address is on the suppression list: hard_bounce"
    )
    other = run(parse_rules({}), message(), suppressed={"bob@example.com": "hard_bounce"})
    assert other == Send()


def test_consent_comes_before_quiet_hours() -> None:
    rules = parse_rules({"quiet_hours": [{"name": "w", "start": "00:00", "end": "23:59"}]})
    assert reason(run(rules, message(), consents={})) is Reason.NO_CONSENT


def test_a_drop_window_comes_before_caps() -> None:
    rules = parse_rules(
        {
            "caps": [{"name": "one", "limit": 1, "per": "1d"}],
            "quiet_hours": [{"name": "w", "start": "11:00", "end": "13:00", "action": "drop"}],
        }
    )
    sent = [SentRecord(NOW - timedelta(hours=1), Channel.EMAIL, "marketing")]
    decision = run(rules, message(), sent=sent)
    assert decision == Exclude(
        Reason.QUIET_HOURS, "quiet hours 'w' (11:00–13:00 UTC) drops email messages", "w"
    )


# -- consent --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("require", "consents", "expected"),
    [
        (True, {}, Reason.NO_CONSENT),
        (True, {("email", "marketing"): "opted_in"}, None),
        (True, {("email", "*"): "opted_in"}, None),
        (True, {("email", "news"): "opted_in"}, Reason.NO_CONSENT),
        (True, {("sms", "marketing"): "opted_in"}, Reason.NO_CONSENT),
        (True, {("email", "marketing"): "pending"}, Reason.NO_CONSENT),
        (
            True,
            {("email", "marketing"): "opted_in", ("email", "*"): "opted_out"},
            Reason.NO_CONSENT,
        ),
        (
            True,
            {("email", "marketing"): "opted_out", ("email", "*"): "opted_in"},
            Reason.NO_CONSENT,
        ),
        (False, {}, None),
        (False, {("email", "marketing"): "pending"}, None),
        (False, {("email", "marketing"): "opted_out"}, Reason.NO_CONSENT),
        (False, {("email", "*"): "opted_out"}, Reason.NO_CONSENT),
    ],
)
def test_consent(
    require: bool, consents: dict[tuple[str, str], str], expected: Reason | None
) -> None:
    rules = parse_rules({"require_consent": require})
    assert reason(run(rules, message(), consents=consents)) is expected


def test_consent_details() -> None:
    rules = parse_rules({})
    assert run(rules, message(), consents={("email", "marketing"): "pending"}) == Exclude(
        Reason.NO_CONSENT, "no opt-in for email marketing (consent: pending)"
    )
    assert run(rules, message(), consents={("email", "*"): "opted_out"}) == Exclude(
        Reason.NO_CONSENT, "the profile opted out of email marketing"
    )


# -- transactional messages -----------------------------------------------------------------------


def test_transactional_bypasses_consent_quiet_hours_and_caps() -> None:
    rules = parse_rules(
        {
            "caps": [{"name": "any", "limit": 1, "per": "1d"}],
            "quiet_hours": [{"name": "w", "start": "00:00", "end": "23:59", "action": "drop"}],
        }
    )
    sent = [SentRecord(NOW - timedelta(minutes=5), Channel.SMS, "otp", transactional=False)]
    msg = message(Channel.SMS, "otp", address="+4915112345678", transactional=True)
    opted_out = {("sms", "*"): "opted_out"}
    assert run(rules, msg, consents=opted_out, sent=sent) == Send()
    assert (
        run(rules, msg, consents=opted_out, suppressed={"+4915112345678": "unsubscribed"}) == Send()
    )
    assert cap_keys(rules, msg, now=NOW) == []


@pytest.mark.parametrize("why", ["hard_bounce", "complaint", "manual", "something_new"])
def test_transactional_does_not_bypass_suppression(why: str) -> None:
    msg = message(transactional=True)
    decision = run(parse_rules({}), msg, suppressed={"ada@example.com": why})
    assert reason(decision) is Reason.SUPPRESSED


def test_unsubscribed_suppresses_non_transactional() -> None:
    decision = run(parse_rules({}), message(), suppressed={"ada@example.com": "unsubscribed"})
    assert reason(decision) is Reason.SUPPRESSED


def test_transactional_does_not_bypass_address_checks() -> None:
    rules = parse_rules({})
    assert reason(run(rules, message(address=None, transactional=True))) is Reason.NO_ADDRESS
    invalid = message(address_valid=False, transactional=True)
    assert reason(run(rules, invalid)) is Reason.INVALID_ADDRESS


# -- caps -----------------------------------------------------------------------------------------


def _sent(
    *ages: timedelta, channel: Channel = Channel.EMAIL, purpose: str = "marketing"
) -> list[SentRecord]:
    return [SentRecord(NOW - age, channel, purpose) for age in ages]


def test_a_full_cap_excludes_naming_the_cap() -> None:
    rules = parse_rules(EXAMPLE)
    sent = _sent(timedelta(days=1), timedelta(days=3), timedelta(days=6, hours=23))
    assert run(rules, message(), sent=sent) == Exclude(
        Reason.FREQUENCY_CAP, "cap 'marketing email': 3 of 3 in the last 7 days", "marketing email"
    )
    assert run(rules, message(), sent=sent[:2]) == Send()


def test_cap_window_boundaries() -> None:
    """The window is ``(now - per, now]``: a send exactly ``per`` ago no longer counts, one at
    ``now`` does, one after ``now`` does not."""
    rules = parse_rules({"caps": [{"name": "daily", "limit": 1, "per": "1d"}]})
    day = timedelta(days=1)
    tick = timedelta(microseconds=1)
    assert run(rules, message(), sent=_sent(day)) == Send()
    assert reason(run(rules, message(), sent=_sent(day - tick))) is Reason.FREQUENCY_CAP
    assert reason(run(rules, message(), sent=_sent(timedelta(0)))) is Reason.FREQUENCY_CAP
    assert run(rules, message(), sent=_sent(-tick)) == Send()
    # the same instant in another zone is the same instant
    in_berlin = [SentRecord((NOW - day).astimezone(BERLIN), Channel.EMAIL, "marketing")]
    assert run(rules, message(), sent=in_berlin, now=NOW.astimezone(BERLIN)) == Send()


def test_what_counts_toward_a_cap() -> None:
    rules = parse_rules(
        {
            "caps": [
                {"name": "all", "limit": 3, "per": "1d"},
                {
                    "name": "email news",
                    "channel": "email",
                    "purpose": "news",
                    "limit": 1,
                    "per": "1d",
                },
            ]
        }
    )
    hour = timedelta(hours=1)
    mixed = [
        *_sent(hour, channel=Channel.SMS),
        *_sent(hour, channel=Channel.PUSH, purpose="news"),
        SentRecord(NOW - hour, Channel.EMAIL, "marketing", transactional=True),
    ]
    assert run(rules, message(), sent=mixed) == Send()  # 2 of 3; the transactional one is free
    full = [*mixed, *_sent(hour, channel=Channel.WEBHOOK)]
    assert run(rules, message(), sent=full) == Exclude(
        Reason.FREQUENCY_CAP, "cap 'all': 3 of 3 in the last 1 day", "all"
    )
    news = message(purpose="news")
    one_news = _sent(hour, purpose="news")
    assert run(rules, news, sent=one_news) == Exclude(
        Reason.FREQUENCY_CAP, "cap 'email news': 1 of 1 in the last 1 day", "email news"
    )
    assert run(rules, message(), sent=one_news) == Send()  # the news cap does not apply


def test_cap_keys() -> None:
    rules = parse_rules(EXAMPLE)
    [check] = cap_keys(rules, message(), now=NOW)
    assert (check.name, check.start, check.end, check.limit) == (
        "marketing email",
        NOW - timedelta(days=7),
        NOW,
        3,
    )
    assert cap_keys(rules, message(purpose="news"), now=NOW) == []
    assert [c.name for c in cap_keys(rules, message(Channel.PUSH), now=NOW)] == ["push daily"]


_records = st.lists(
    st.builds(
        SentRecord,
        st.one_of(
            st.integers(-8 * 24 * 60, 60).map(lambda m: NOW + timedelta(minutes=m)),
            st.sampled_from([timedelta(days=1), timedelta(hours=12), timedelta(days=7)]).map(
                lambda per: NOW - per
            ),
        ),
        st.sampled_from([Channel.EMAIL, Channel.SMS]),
        st.sampled_from(["marketing", "news"]),
        st.booleans(),
    ),
    max_size=30,
)
_caps = st.lists(
    st.builds(
        Cap,
        st.text("abcdef", min_size=1, max_size=3),
        st.integers(1, 6),
        st.sampled_from([timedelta(days=1), timedelta(hours=12), timedelta(days=7)]),
        st.sampled_from([None, Channel.EMAIL, Channel.SMS]),
        st.sampled_from([None, "marketing", "news"]),
    ),
    max_size=4,
    unique_by=lambda c: c.name,
)


@settings(max_examples=300)
@given(
    _caps,
    _records,
    st.sampled_from([Channel.EMAIL, Channel.SMS]),
    st.sampled_from(["marketing", "news"]),
)
def test_caps_agree_with_a_naive_count(
    caps: list[Cap], sent: list[SentRecord], channel: Channel, purpose: str
) -> None:
    rules = Rules(tuple(caps), (), require_consent=False)
    expected: str | None = None
    for cap in caps:
        if cap.channel not in (None, channel) or cap.purpose not in (None, purpose):
            continue
        count = 0
        for record in sent:
            if record.transactional:
                continue
            if cap.channel is not None and record.channel != cap.channel:
                continue
            if cap.purpose is not None and record.purpose != cap.purpose:
                continue
            if NOW - cap.per < record.timestamp <= NOW:
                count += 1
        if count >= cap.limit:
            expected = cap.name
            break
    decision = run(rules, message(channel, purpose), sent=sent)
    if expected is None:
        assert decision == Send()
    else:
        assert isinstance(decision, Exclude)
        assert (decision.reason, decision.rule) == (Reason.FREQUENCY_CAP, expected)


# -- quiet hours ----------------------------------------------------------------------------------


def _at(text: str, zone: ZoneInfo | None = None) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=zone or UTC)


def test_quiet_hours_wrapping_midnight() -> None:
    rules = quiet("21:00", "08:00")
    day = "2026-06-10"
    assert run(rules, message(), now=_at(f"{day} 20:59:59")) == Send()
    held = run(rules, message(), now=_at(f"{day} 21:00"))
    assert held == Hold(
        _at("2026-06-11 08:00"),
        "night",
        "quiet hours 'night' (21:00–08:00 UTC): held until 2026-06-11 08:00 UTC",
    )
    assert isinstance(early := run(rules, message(), now=_at(f"{day} 03:00")), Hold)
    assert early.until == _at(f"{day} 08:00")
    assert run(rules, message(), now=_at(f"{day} 08:00")) == Send()


def test_quiet_hours_within_a_day() -> None:
    rules = quiet("12:00", "14:00")
    assert run(rules, message(), now=_at("2026-06-10 11:59")) == Send()
    held = run(rules, message(), now=_at("2026-06-10 13:30"))
    assert isinstance(held, Hold)
    assert held.until == _at("2026-06-10 14:00")


def test_quiet_hours_in_the_recipients_zone() -> None:
    rules = quiet("21:00", "08:00")
    new_york = ZoneInfo("America/New_York")
    now = _at("2026-01-15 03:00")  # 22:00 the evening before in New York
    decision = run(rules, message(time_zone="America/New_York"), now=now)
    assert isinstance(decision, Hold)
    assert decision.until == _at("2026-01-15 08:00", new_york) == _at("2026-01-15 13:00")
    assert decision.until.tzinfo is UTC
    assert "America/New_York" in decision.detail
    assert run(rules, message(), now=now) == Hold(  # UTC: 03:00 is quiet too, until 08:00
        _at("2026-01-15 08:00"),
        "night",
        "quiet hours 'night' (21:00–08:00 UTC): held until 2026-01-15 08:00 UTC",
    )
    # the workspace's zone when the profile has none: 12:00 in Tokyo is not quiet
    assert run(rules, message(), now=now, workspace_zone="Asia/Tokyo") == Send()


def test_an_unknown_profile_zone_falls_back_and_says_so() -> None:
    rules = quiet("21:00", "08:00")
    decision = run(
        rules, message(time_zone="Mars/Base"), now=_at("2026-01-15 03:00"), workspace_zone="UTC"
    )
    assert isinstance(decision, Hold)
    assert decision.until == _at("2026-01-15 08:00")
    assert "unknown profile time zone 'Mars/Base', used UTC" in decision.detail


def test_a_window_with_its_own_zone_ignores_the_recipients() -> None:
    rules = quiet("21:00", "08:00", time_zone="Europe/Berlin")
    decision = run(rules, message(time_zone="Asia/Tokyo"), now=_at("2026-01-15 22:00", BERLIN))
    assert isinstance(decision, Hold)
    assert decision.until == _at("2026-01-16 08:00", BERLIN)


def test_an_unknown_workspace_zone_is_invalid_input() -> None:
    with pytest.raises(InvalidInput) as caught:
        run(quiet("21:00", "08:00"), message(), workspace_zone="Europe/Berln")
    assert caught.value.issues[0].path == "workspace_zone"
    assert "Europe/Berlin" in caught.value.issues[0].reason


def test_now_must_be_aware() -> None:
    with pytest.raises(ValueError, match="aware"):
        run(parse_rules({}), message(), now=datetime(2026, 6, 10, 12))
    with pytest.raises(ValueError, match="aware"):
        SentRecord(datetime(2026, 6, 10, 12), Channel.EMAIL, "marketing")


def test_quiet_hours_only_for_their_channels() -> None:
    rules = parse_rules(EXAMPLE)
    night = _at("2026-06-10 23:00")
    assert run(rules, message(Channel.EMAIL), now=night) == Send()
    assert isinstance(run(rules, message(Channel.SMS, address="+491511"), now=night), Hold)


def test_drop_windows_exclude() -> None:
    rules = quiet("21:00", "08:00", action="drop", time_zone="Europe/Berlin")
    decision = run(rules, message(), now=_at("2026-06-10 23:00", BERLIN))
    assert decision == Exclude(
        Reason.QUIET_HOURS,
        "quiet hours 'night' (21:00–08:00 Europe/Berlin) drops email messages",
        "night",
    )


def test_adjacent_windows_hold_until_the_last_ends() -> None:
    rules = parse_rules(
        {
            "quiet_hours": [
                {"name": "evening", "start": "21:00", "end": "00:00"},
                {"name": "night", "start": "00:00", "end": "06:00"},
                {"name": "dawn", "start": "05:00", "end": "07:30"},
            ],
            "require_consent": False,
        }
    )
    decision = run(rules, message(), now=_at("2026-06-10 22:00"))
    assert isinstance(decision, Hold)
    assert (decision.until, decision.rule) == (_at("2026-06-11 07:30"), "evening")


def test_a_hold_into_a_drop_window_is_dropped() -> None:
    rules = parse_rules(
        {
            "quiet_hours": [
                {"name": "evening", "start": "21:00", "end": "00:00"},
                {"name": "night", "start": "00:00", "end": "06:00", "action": "drop"},
            ],
            "require_consent": False,
        }
    )
    decision = run(rules, message(), now=_at("2026-06-10 22:00"))
    assert reason(decision) is Reason.QUIET_HOURS
    assert isinstance(decision, Exclude)
    assert decision.rule == "night"


def test_windows_covering_the_whole_day_exclude() -> None:
    rules = parse_rules(
        {
            "quiet_hours": [
                {"name": "am", "start": "00:00", "end": "12:00"},
                {"name": "pm", "start": "12:00", "end": "00:00"},
            ],
            "require_consent": False,
        }
    )
    decision = run(rules, message(), now=_at("2026-06-10 22:00"))
    assert isinstance(decision, Exclude)
    assert decision.reason is Reason.QUIET_HOURS
    assert "no time of day" in decision.detail


# Europe/Berlin: 2026-03-29 02:00 CET -> 03:00 CEST (01:00 UTC); 2026-10-25 03:00 CEST -> 02:00 CET
# (01:00 UTC).


def _hold_until(rules: Rules, now: datetime) -> datetime:
    decision = run(rules, message(time_zone="Europe/Berlin"), now=now)
    assert isinstance(decision, Hold), decision
    return decision.until


def test_a_night_across_spring_forward_is_an_hour_shorter() -> None:
    rules = quiet("21:00", "08:00")
    until = _hold_until(rules, _at("2026-03-28 21:30", BERLIN))
    assert until == _at("2026-03-29 06:00")  # 08:00 CEST
    assert until - _at("2026-03-28 21:30", BERLIN) == timedelta(hours=9, minutes=30)


def test_a_hold_ending_in_the_spring_gap_ends_when_the_gap_does() -> None:
    """02:30 does not exist on 2026-03-29 in Berlin: the first valid instant after the gap is
    03:00 CEST (01:00 UTC)."""
    rules = quiet("22:00", "02:30")
    until = _hold_until(rules, _at("2026-03-28 23:00", BERLIN))
    assert until == _at("2026-03-29 01:00")
    assert until.astimezone(BERLIN).strftime("%H:%M %Z") == "03:00 CEST"
    held = run(rules, message(time_zone="Europe/Berlin"), now=_at("2026-03-28 23:00", BERLIN))
    assert isinstance(held, Hold)
    assert "held until 2026-03-29 03:00 CEST" in held.detail
    # a window ending exactly at the gap's start
    assert _hold_until(quiet("22:00", "02:00"), _at("2026-03-29 01:59", BERLIN)) == _at(
        "2026-03-29 01:00"
    )
    # a window whose only free minute falls into the gap does not open that day
    assert _hold_until(quiet("02:01", "02:00"), _at("2026-03-28 02:30", BERLIN)) == _at(
        "2026-03-30 02:00", BERLIN
    )
    # after the gap the clock reads 03:00: outside the window
    assert run(rules, message(time_zone="Europe/Berlin"), now=_at("2026-03-29 01:00")) == Send()


def test_a_night_across_fall_back_is_an_hour_longer() -> None:
    rules = quiet("21:00", "08:00")
    until = _hold_until(rules, _at("2026-10-24 21:30", BERLIN))
    assert until == _at("2026-10-25 07:00")  # 08:00 CET
    assert until - _at("2026-10-24 21:30", BERLIN) == timedelta(hours=11, minutes=30)


def test_a_window_ending_in_the_repeated_hour() -> None:
    """02:30 happens twice on 2026-10-25 in Berlin: a hold ends at the first one after now, and
    the repeated wall-clock times are quiet again."""
    rules = quiet("21:00", "02:30")
    assert _hold_until(rules, _at("2026-10-24 22:00", BERLIN)) == _at("2026-10-25 00:30")
    # 00:45 UTC is 02:45 CEST: outside the window
    assert run(rules, message(time_zone="Europe/Berlin"), now=_at("2026-10-25 00:45")) == Send()
    # 01:10 UTC is 02:10 CET, the second pass: quiet until 02:30 CET
    assert _hold_until(rules, _at("2026-10-25 01:10")) == _at("2026-10-25 01:30")


_instants = st.one_of(
    st.integers(0, 5 * 24 * 60).map(lambda m: _at("2026-03-27 00:00") + timedelta(minutes=m)),
    st.integers(0, 5 * 24 * 60).map(lambda m: _at("2026-10-23 00:00") + timedelta(minutes=m)),
    st.integers(0, 365 * 24 * 60).map(lambda m: _at("2026-01-01 00:00") + timedelta(minutes=m)),
)


@settings(max_examples=300)
@given(_clock, _clock, _instants, st.sampled_from(_ZONES))
def test_a_hold_ends_when_the_window_does(start: str, end: str, now: datetime, zone: str) -> None:
    if start == end:
        return
    rules = quiet(start, end)
    msg = message(time_zone=zone)
    decision = run(rules, msg, now=now)
    if isinstance(decision, Send):
        return
    assert isinstance(decision, Hold)
    # at most a day, plus a day when the only free time falls into a DST gap (02:01–02:00 on
    # 2026-03-29 in Berlin never opens), plus the DST hour
    assert now < decision.until <= now + timedelta(hours=49)
    assert run(rules, msg, now=decision.until) == Send()
    assert isinstance(run(rules, msg, now=decision.until - timedelta(seconds=1)), Hold)


def test_decisions_have_a_json_form() -> None:
    assert Send().to_json() == {"outcome": "send"}
    held = Hold(_at("2026-06-11 08:00"), "night", "…")
    assert held.to_json() == {
        "outcome": "hold",
        "until": "2026-06-11T08:00:00+00:00",
        "rule": "night",
        "detail": "…",
    }
    assert Exclude(Reason.SUPPRESSED, "x").to_json() == {
        "outcome": "exclude",
        "reason": "suppressed",
        "detail": "x",
    }


def test_the_inbox_and_webhooks_need_no_opt_in_but_an_opt_out_still_blocks() -> None:
    rules = parse_rules({})
    for channel in (Channel.INBOX, Channel.WEBHOOK):
        message = Message(channel, "marketing", "x")
        assert isinstance(
            decide(rules, message, consents={}, suppressed={}, sent=[], now=NOW), Send
        )
        out = decide(
            rules,
            message,
            consents={(channel.value, "marketing"): "opted_out"},
            suppressed={},
            sent=[],
            now=NOW,
        )
        assert isinstance(out, Exclude) and out.reason.value == "no_consent"
