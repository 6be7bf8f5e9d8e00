"""Properties and examples of the identity graph: order independence, merge laws, conflicts."""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from waymark.core.errors import Conflict
from waymark.identity.graph import (
    AttributeValue,
    IdentityConflict,
    LinkedIdentity,
    MergePolicy,
    ProfileState,
    apply_record,
    enforce_limit,
    fresh_profile,
    merge_profiles,
    new_profile,
    pick_value,
    resolve,
    visible_attributes,
    widen_seen,
)
from waymark.model.events import Identity

T0 = datetime(2026, 1, 1, tzinfo=UTC)
DEFAULT = MergePolicy()
PRIORITY = MergePolicy(source_priority={"plan": ("crm", "web")}, default_source_priority=("web",))


def t(minutes: int) -> datetime:
    return T0 + timedelta(minutes=minutes)


def i(text: str) -> Identity:
    namespace, _, value = text.partition(":")
    return Identity(namespace, value)


def profile(
    profile_id: str, *identities: str, first: int = 0, last: int | None = None
) -> ProfileState:
    """A profile whose identities were all first seen at ``first``."""
    links = tuple(LinkedIdentity(i(x), t(first)) for x in identities)
    return ProfileState(profile_id, links, {}, t(first), t(first if last is None else last))


# --- a tiny in-memory stand-in for the storage-backed service ------------------------------


@dataclass(frozen=True)
class Record:
    identities: tuple[Identity, ...]
    attributes: dict[str, Any]
    at: datetime
    source: str


class Store:
    def __init__(self, policy: MergePolicy) -> None:
        self.policy = policy
        self.profiles: dict[str, ProfileState] = {}
        self.owner: dict[Identity, str] = {}
        self.dropped: set[Identity] = set()
        self.refused: list[IdentityConflict] = []
        self.created = 0

    def ingest(self, record: Record) -> None:
        owners = {x: self.profiles[self.owner[x]] for x in record.identities if x in self.owner}
        res = resolve(record.identities, owners, self.policy)
        assert {*res.attach, *(c.identity for c in res.conflicts)} == set(record.identities)
        self.refused.extend(res.conflicts)
        if res.profiles:
            outcome = merge_profiles(res.profiles, self.policy)
            for absorbed in outcome.absorbed_ids:
                del self.profiles[absorbed]
            base = outcome.state
        else:
            self.created += 1
            base = new_profile(f"p{self.created}", record.at)
        state = apply_record(
            base,
            res.attach,
            record.attributes,
            at=record.at,
            source=record.source,
            policy=self.policy,
        )
        linked = {li.identity for li in state.identities}
        for p in res.profiles:
            for li in p.identities:
                del self.owner[li.identity]
        touched = {li.identity for p in res.profiles for li in p.identities} | set(res.attach)
        self.dropped |= touched - linked
        for x in linked:
            self.owner[x] = state.profile_id
        self.profiles[state.profile_id] = state


def fold(records: list[Record], policy: MergePolicy) -> Store:
    store = Store(policy)
    for record in records:
        store.ingest(record)
    return store


def snapshot(store: Store) -> dict[frozenset[Identity], tuple[Any, ...]]:
    """Profiles keyed by their identity sets, so stores are compared without their ids."""
    return {
        frozenset(li.identity for li in p.identities): (
            p.identities,
            dict(p.attributes),
            visible_attributes(p),
            p.first_seen,
            p.last_seen,
        )
        for p in store.profiles.values()
    }


# --- strategies ------------------------------------------------------------------------------

SHARED = [
    *(i(f"anonymous_id:a{n}") for n in range(4)),
    *(i(f"email:e{n}") for n in range(2)),
    *(i(f"phone:p{n}") for n in range(2)),
]
USERS = [i("user_id:u0"), i("user_id:u1"), i("user_id:u2")]
SOURCES = ("crm", "web", "app")
KEYS = ("plan", "name", "vip")

times = st.integers(0, 8).map(t)
values = st.none() | st.booleans() | st.integers(0, 3) | st.sampled_from(["x", "y"])
policies = st.sampled_from([DEFAULT, PRIORITY])
records = st.builds(
    Record,
    identities=st.lists(st.sampled_from(SHARED + USERS), min_size=1, max_size=3, unique=True).map(
        tuple
    ),
    attributes=st.dictionaries(st.sampled_from(KEYS), values, max_size=2),
    at=times,
    source=st.sampled_from(SOURCES),
)


def one_user_id_per_component(history: list[Record]) -> list[Record]:
    """Rewrite user_ids so that each connected group of identities holds at most one."""
    parent: dict[Identity, Identity] = {}

    def root(x: Identity) -> Identity:
        while parent.setdefault(x, x) != x:
            x = parent[x]
        return x

    for r in history:
        for x in r.identities:
            parent[root(x)] = root(r.identities[0])
    user_of: dict[Identity, Identity] = {}
    for x in sorted(parent):
        if x.namespace == "user_id":
            user_of.setdefault(root(x), x)

    def fix(x: Identity) -> Identity:
        return user_of[root(x)] if x.namespace == "user_id" else x

    return [replace(r, identities=tuple(dict.fromkeys(map(fix, r.identities)))) for r in history]


histories = st.lists(records, min_size=1, max_size=8).map(one_user_id_per_component)
any_histories = st.lists(records, min_size=1, max_size=10)  # unique conflicts allowed

attribute_values = st.builds(AttributeValue, values, times, st.sampled_from(SOURCES))


@st.composite
def states(draw: st.DrawFn) -> ProfileState:
    """Profiles that never clash with each other (their only user_id is u0)."""
    links = draw(st.dictionaries(st.sampled_from([*SHARED, USERS[0]]), times, max_size=5))
    first, last = sorted((draw(times), draw(times)))
    return ProfileState(
        draw(st.sampled_from(["p1", "p2", "p3"])),
        tuple(LinkedIdentity(x, seen) for x, seen in links.items()),
        draw(st.dictionaries(st.sampled_from(KEYS), attribute_values, max_size=3)),
        first,
        last,
    )


# --- order independence and nothing lost ----------------------------------------------------


@given(history=histories, policy=policies, data=st.data())
def test_arrival_order_does_not_change_the_profiles(
    history: list[Record], policy: MergePolicy, data: st.DataObject
) -> None:
    shuffled = data.draw(st.permutations(history))
    assert snapshot(fold(shuffled, policy)) == snapshot(fold(history, policy))


@given(history=histories, policy=policies)
def test_nothing_an_identity_brought_is_lost(history: list[Record], policy: MergePolicy) -> None:
    store = fold(history, policy)
    on_profiles = [li.identity for p in store.profiles.values() for li in p.identities]
    assert len(on_profiles) == len(set(on_profiles))  # each on exactly one profile
    assert set(on_profiles) == {x for r in history for x in r.identities}
    assert not store.dropped and not store.refused
    assert all(store.profiles[owner].profile_id == owner for owner in store.owner.values())
    for r in history:
        landed = store.profiles[store.owner[r.identities[0]]]
        assert set(r.identities) <= {li.identity for li in landed.identities}
        assert set(r.attributes) <= set(landed.attributes)


@given(history=histories, policy=policies)
def test_ingesting_records_again_changes_nothing(
    history: list[Record], policy: MergePolicy
) -> None:
    once = fold(history, policy)
    twice = fold([r for r in history for _ in (1, 2)], policy)
    assert twice.profiles == once.profiles
    assert snapshot(fold(history + history, policy)) == snapshot(once)


@given(history=any_histories)
def test_conflicting_histories_keep_one_value_per_unique_namespace(
    history: list[Record],
) -> None:
    store = fold(history, DEFAULT)  # apply_record would raise Conflict on a second user_id
    on_profiles = [li.identity for p in store.profiles.values() for li in p.identities]
    assert len(on_profiles) == len(set(on_profiles))
    for p in store.profiles.values():
        assert len([li for li in p.identities if li.identity.namespace == "user_id"]) <= 1
    unlinked = {c.identity for c in store.refused if c.owner_id is None}
    assert {x for r in history for x in r.identities} <= set(on_profiles) | unlinked
    assert not store.dropped


@given(history=histories)
def test_graph_limit_reports_what_it_drops_and_keeps_user_ids(history: list[Record]) -> None:
    policy = MergePolicy(max_identities=2)
    store = fold(history, policy)
    on_profiles = [li.identity for p in store.profiles.values() for li in p.identities]
    assert len(on_profiles) == len(set(on_profiles))
    assert {x for r in history for x in r.identities} <= set(on_profiles) | store.dropped
    assert all(len(p.identities) <= 2 for p in store.profiles.values())
    assert all(x.namespace != "user_id" for x in store.dropped)


# --- merge laws ----------------------------------------------------------------------------


@given(a=states(), policy=policies)
def test_merge_is_idempotent(a: ProfileState, policy: MergePolicy) -> None:
    outcome = merge_profiles([a, a], policy)
    assert outcome.state == a
    assert outcome.absorbed_ids == ()
    assert outcome.dropped == ()


@given(a=states(), b=states(), policy=policies)
def test_merge_is_commutative(a: ProfileState, b: ProfileState, policy: MergePolicy) -> None:
    assert merge_profiles([a, b], policy) == merge_profiles([b, a], policy)


@given(a=states(), b=states(), c=states(), policy=policies)
def test_merge_is_associative(
    a: ProfileState, b: ProfileState, c: ProfileState, policy: MergePolicy
) -> None:
    left = merge_profiles([merge_profiles([a, b], policy).state, c], policy).state
    right = merge_profiles([a, merge_profiles([b, c], policy).state], policy).state
    assert left == right == merge_profiles([a, b, c], policy).state


@given(state=states(), record=records, policy=policies)
def test_applying_a_record_twice_equals_once(
    state: ProfileState, record: Record, policy: MergePolicy
) -> None:
    identities = [x for x in record.identities if x.namespace != "user_id"]

    def apply(s: ProfileState) -> ProfileState:
        return apply_record(
            s, identities, record.attributes, at=record.at, source=record.source, policy=policy
        )

    assert apply(apply(state)) == apply(state)


def test_merge_keeps_the_senior_profile_and_unions_everything() -> None:
    old = replace(
        profile("p9", "anonymous_id:a", first=1, last=2),
        attributes={"plan": AttributeValue("pro", t(2), "web")},
    )
    young = replace(
        profile("p1", "anonymous_id:a", "email:e", first=3, last=7),
        attributes={
            "plan": AttributeValue(None, t(5), "web"),
            "name": AttributeValue("x", t(3), "web"),
        },
    )
    outcome = merge_profiles([young, old], DEFAULT)
    assert outcome.survivor_id == "p9"
    assert outcome.absorbed_ids == ("p1",)
    assert outcome.state.identities == (
        LinkedIdentity(i("anonymous_id:a"), t(1)),
        LinkedIdentity(i("email:e"), t(3)),
    )
    assert (outcome.state.first_seen, outcome.state.last_seen) == (t(1), t(7))
    assert visible_attributes(outcome.state) == {"name": "x"}  # the later unset wins
    assert outcome.state.attributes["plan"] == AttributeValue(None, t(5), "web")
    tie = merge_profiles([profile("p2", first=1), profile("p1", first=1)], DEFAULT)
    assert tie.survivor_id == "p1"


def test_merge_refuses_profiles_with_different_unique_values() -> None:
    with pytest.raises(Conflict):
        merge_profiles([profile("p1", "user_id:u1"), profile("p2", "user_id:u2")], DEFAULT)
    with pytest.raises(Conflict):
        apply_record(
            profile("p1", "user_id:u1"),
            [i("user_id:u2")],
            {},
            at=t(1),
            source="web",
            policy=DEFAULT,
        )
    with pytest.raises(ValueError, match="at least one"):
        merge_profiles([], DEFAULT)


def test_profile_state_is_canonical() -> None:
    state = profile("p1", "phone:1", "anonymous_id:z", "email:e")
    assert [str(li.identity) for li in state.identities] == ["anonymous_id:z", "email:e", "phone:1"]
    with pytest.raises(ValueError, match="twice"):
        profile("p1", "email:e", "email:e")
    with pytest.raises(ValueError, match="precedes"):
        profile("p1", first=5, last=1)


# --- attribute conflicts -------------------------------------------------------------------


def test_source_priority_beats_recency() -> None:
    crm = {"plan": "pro", "name": "Ann"}
    web = {"plan": "free", "name": "Anne"}
    for order in (("crm", "web"), ("web", "crm")):
        state = new_profile("p1", t(0))
        for source in order:
            attributes, at = (crm, t(0)) if source == "crm" else (web, t(5))
            state = apply_record(state, [], attributes, at=at, source=source, policy=PRIORITY)
        # plan: crm outranks the later web; name: default priority puts web first
        assert visible_attributes(state) == {"plan": "pro", "name": "Anne"}
    later_unlisted = apply_record(state, [], {"plan": "x"}, at=t(9), source="app", policy=PRIORITY)
    assert visible_attributes(later_unlisted)["plan"] == "pro"
    unset = apply_record(state, [], {"plan": None}, at=t(9), source="crm", policy=PRIORITY)
    assert visible_attributes(unset) == {"name": "Anne"}
    assert unset.attributes["plan"].value is None


@given(candidates=st.lists(attribute_values, min_size=1, max_size=6), data=st.data())
def test_the_winning_value_ranks_first_then_is_latest_whatever_the_order(
    candidates: list[AttributeValue], data: st.DataObject
) -> None:
    winner = pick_value("plan", candidates, PRIORITY)
    assert pick_value("plan", data.draw(st.permutations(candidates)), PRIORITY) == winner
    best = min(PRIORITY.rank("plan", c.source) for c in candidates)
    assert PRIORITY.rank("plan", winner.source) == best
    ranked = [c for c in candidates if PRIORITY.rank("plan", c.source) == best]
    assert winner.updated_at == max(c.updated_at for c in ranked)


def test_exact_ties_are_broken_by_source_then_value() -> None:
    a, b = AttributeValue(1, t(0), "app"), AttributeValue(2, t(0), "app")
    c = AttributeValue(0, t(0), "other")
    assert pick_value("k", [a, b], DEFAULT) == pick_value("k", [b, a], DEFAULT) == b
    assert pick_value("k", [a, b, c], DEFAULT) == c


# --- graph limit ---------------------------------------------------------------------------


def test_graph_limit_keeps_the_newest_fifty_and_never_drops_user_id() -> None:
    links = [LinkedIdentity(i("user_id:u"), t(0))]
    links += [LinkedIdentity(i(f"anonymous_id:a{n:02}"), t(n)) for n in range(1, 61)]
    big = ProfileState("p1", tuple(links), {}, t(0), t(60))
    trimmed, dropped = enforce_limit(big, DEFAULT)
    assert len(trimmed.identities) == 50
    assert i("user_id:u") in {li.identity for li in trimmed.identities}
    assert dropped == tuple(links[1:12])  # the eleven oldest anonymous ids, oldest first
    assert set(trimmed.identities) | set(dropped) == set(links)

    halves = [
        ProfileState("p1", tuple(links[:31]), {}, t(0), t(30)),
        ProfileState("p2", tuple(links[31:]), {}, t(31), t(60)),
    ]
    assert merge_profiles(halves, DEFAULT).dropped == dropped

    full = ProfileState("p1", tuple(links[:50]), {}, t(0), t(49))
    grown = apply_record(full, [i("email:new")], {}, at=t(99), source="web", policy=DEFAULT)
    kept = {li.identity for li in grown.identities}
    assert len(kept) == 50
    assert {i("user_id:u"), i("email:new")} <= kept
    assert i("anonymous_id:a01") not in kept


@given(
    seen=st.dictionaries(st.integers(0, 80), st.integers(0, 5), max_size=80),
    user_seen=st.integers(0, 5),
    limit=st.integers(1, 60),
)
def test_graph_limit_drops_only_the_oldest(
    seen: dict[int, int], user_seen: int, limit: int
) -> None:
    links = [LinkedIdentity(i(f"anonymous_id:{n:03}"), t(m)) for n, m in seen.items()]
    links.append(LinkedIdentity(i("user_id:u"), t(user_seen)))
    state = ProfileState("p1", tuple(links), {}, t(0), t(5))
    trimmed, dropped = enforce_limit(state, MergePolicy(max_identities=limit))
    assert len(trimmed.identities) == min(len(links), limit)
    assert set(trimmed.identities) | set(dropped) == set(links)
    assert all(li.identity.namespace != "user_id" for li in dropped)
    if dropped:
        newest_dropped = max((li.first_seen, li.identity) for li in dropped)
        kept = [(li.first_seen, li.identity) for li in trimmed.identities]
        assert all(newest_dropped < k for k in kept if k[1].namespace != "user_id")


# --- resolve: the conflict rule --------------------------------------------------------------


def test_record_does_not_join_a_profile_with_another_user_id() -> None:
    u1 = profile("P1", "user_id:u1", "anonymous_id:a")
    res = resolve([i("user_id:u2"), i("anonymous_id:a")], {i("anonymous_id:a"): u1}, DEFAULT)
    assert res.target is None  # create a profile for u2
    assert res.profiles == ()
    assert res.attach == (i("user_id:u2"),)
    assert res.conflicts == (IdentityConflict(i("anonymous_id:a"), "P1", i("user_id:u2")),)

    u2 = profile("P2", "user_id:u2", first=5)
    owners = {i("anonymous_id:a"): u1, i("user_id:u2"): u2}
    res = resolve([i("anonymous_id:a"), i("user_id:u2")], owners, DEFAULT)
    assert res.target == "P2"
    assert res.profiles == (u2,)
    assert res.attach == (i("user_id:u2"),)
    assert [c.identity for c in res.conflicts] == [i("anonymous_id:a")]


def test_record_with_two_user_ids_keeps_the_first_in_canonical_order() -> None:
    res = resolve([i("user_id:u2"), i("email:e"), i("user_id:u1")], {}, DEFAULT)
    assert res.target is None
    assert res.attach == (i("email:e"), i("user_id:u1"))
    assert res.conflicts == (IdentityConflict(i("user_id:u2"), None, i("user_id:u1")),)

    u2 = profile("P2", "user_id:u2")
    res = resolve([i("user_id:u2"), i("user_id:u1")], {i("user_id:u2"): u2}, DEFAULT)
    assert res.profiles == ()
    assert res.conflicts == (IdentityConflict(i("user_id:u2"), "P2", i("user_id:u1")),)


def test_profiles_with_different_user_ids_are_not_merged_the_senior_one_takes_the_record() -> None:
    p1 = profile("P1", "user_id:u1", "anonymous_id:a", first=3)
    p2 = profile("P2", "user_id:u2", "email:e", first=1)
    owners = {i("anonymous_id:a"): p1, i("email:e"): p2}
    for order in ([i("email:e"), i("anonymous_id:a")], [i("anonymous_id:a"), i("email:e")]):
        res = resolve([*order, i("phone:9")], owners, DEFAULT)
        # not the canonical first identity's owner (P1) but the senior profile (P2)
        assert res.target == "P2"
        assert res.attach == (i("email:e"), i("phone:9"))
        assert res.conflicts == (IdentityConflict(i("anonymous_id:a"), "P1", i("user_id:u2")),)


def test_compatible_profiles_are_merged() -> None:
    p1 = profile("P1", "user_id:u1", "anonymous_id:a", first=4)
    p2 = profile("P2", "email:e", first=2)
    p3 = profile("P3", "phone:1", first=2)
    owners = {i("anonymous_id:a"): p1, i("email:e"): p2, i("phone:1"): p3, i("user_id:u1"): p1}
    record = [i("user_id:u1"), i("anonymous_id:a"), i("email:e"), i("phone:1"), i("phone:2")]
    res = resolve(record, owners, DEFAULT)
    assert res.profiles == (p2, p3, p1)
    assert res.target == "P2"
    assert res.attach == tuple(sorted(record))
    assert res.conflicts == ()
    merged = merge_profiles(res.profiles, DEFAULT)
    assert merged.absorbed_ids == ("P1", "P3")


def test_unique_claims_of_merged_profiles_constrain_later_ones() -> None:
    policy = MergePolicy(unique_namespaces=frozenset({"user_id", "email"}))
    p1 = profile("P1", "user_id:u1", "email:x", first=1)
    p2 = profile("P2", "anonymous_id:a", "email:y", first=0)
    owners = {i("user_id:u1"): p1, i("anonymous_id:a"): p2}
    res = resolve([i("anonymous_id:a"), i("user_id:u1")], owners, policy)
    # unique identities are visited first: u1 brings P1 and its email:x, which P2 contradicts
    assert res.target == "P1"
    assert res.attach == (i("user_id:u1"),)
    assert res.conflicts == (IdentityConflict(i("anonymous_id:a"), "P2", i("email:x")),)


def test_resolve_rejects_an_owner_without_the_identity() -> None:
    with pytest.raises(ValueError, match="not on its owner"):
        resolve([i("email:e")], {i("email:e"): profile("P1", "email:f")}, DEFAULT)


@given(
    first=st.integers(0, 1000),
    span=st.integers(0, 1000),
    a=st.integers(-2000, 2000),
    b=st.integers(0, 2000),
)
def test_widening_the_seen_interval_equals_rebuilding_the_profile(
    first: int, span: int, a: int, b: int
) -> None:
    state = profile("p", "user_id:u", "email:e@x", first=first, last=first + span)
    wider = widen_seen(state, t(a), t(a + b))
    expected = replace(
        state,
        first_seen=min(state.first_seen, t(a)),
        last_seen=max(state.last_seen, t(a + b)),
    )
    assert wider == expected
    assert hash(wider) == hash(expected)
    with pytest.raises(ValueError):
        widen_seen(state, t(a + b + 1), t(a))


_IDENTITIES = st.lists(
    st.builds(
        Identity,
        st.sampled_from(["user_id", "anonymous_id", "email"]),
        st.sampled_from(["a", "b", "c"]),
    ),
    min_size=1,
    max_size=6,
)


@given(ids=_IDENTITIES, limit=st.integers(1, 4), at=st.integers(0, 1000))
def test_a_fresh_profile_is_what_the_full_rules_give_or_is_declined(
    ids: list[Identity], limit: int, at: int
) -> None:
    policy = MergePolicy(max_identities=limit)
    fast = fresh_profile("p", ids, t(at), policy)
    res = resolve(ids, {}, policy)
    full = apply_record(
        new_profile("p", t(at)), res.attach, {}, at=t(at), source="api", policy=policy
    )
    if fast is None:  # declined only where the full rules refuse or trim something
        assert res.conflicts or len(full.identities) < len(set(ids))
    else:
        assert not res.conflicts
        assert fast == full
