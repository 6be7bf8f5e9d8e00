"""The identity graph and its merge policy, as pure functions over plain data.

No storage, no clock, no I/O: a service loads the profiles touched by one incoming record, calls
these functions and persists what they return. One record is handled as::

    owners = {i: <profile holding i> for i in record.identities if <i is known>}
    res = resolve(record.identities, owners, policy)
    if res.profiles:                 # merge what may be merged (one profile merges to itself)
        out = merge_profiles(res.profiles, policy)
        base = out.state             # store it; delete out.absorbed_ids; unlink out.dropped
    else:
        base = new_profile(<new id>, record.timestamp)
    state = apply_record(base, res.attach, record.attributes,
                         at=record.timestamp, source=record.source, policy=policy)
    # store state; its identities replace base's (the graph limit may have removed some)

All datetimes must be comparable with each other (the hub uses aware UTC throughout). Results
never depend on the order in which states, identities or candidate values are passed.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from types import MappingProxyType
from typing import Any

from waymark.core.errors import Conflict
from waymark.model.events import DEFAULT_UNIQUE_NAMESPACES, Identity


@dataclass(frozen=True, slots=True)
class AttributeValue:
    """One attribute's value, when and by which source it was set; ``None`` is an explicit unset."""

    value: Any
    updated_at: datetime
    source: str


@dataclass(frozen=True, slots=True)
class LinkedIdentity:
    """An identity on a profile and the earliest time the profile was seen with it."""

    identity: Identity
    first_seen: datetime


@dataclass(frozen=True, slots=True)
class ProfileState:
    """One profile as the graph sees it.

    ``identities`` are stored sorted by identity (canonical order), each at most once;
    ``attributes`` is a read-only copy. Raises ``ValueError`` on a repeated identity or when
    ``last_seen`` precedes ``first_seen``.
    """

    profile_id: str
    identities: tuple[LinkedIdentity, ...]
    attributes: Mapping[str, AttributeValue] = field(hash=False)
    first_seen: datetime
    last_seen: datetime

    def __post_init__(self) -> None:
        links = tuple(sorted(self.identities, key=lambda link: link.identity))
        if len({link.identity for link in links}) != len(links):
            raise ValueError(f"profile {self.profile_id}: an identity is linked twice")
        if self.last_seen < self.first_seen:
            raise ValueError(f"profile {self.profile_id}: last_seen precedes first_seen")
        object.__setattr__(self, "identities", links)
        object.__setattr__(self, "attributes", MappingProxyType(dict(self.attributes)))


@dataclass(frozen=True, slots=True)
class MergePolicy:
    """How attribute conflicts are settled and how large a profile may grow.

    ``source_priority[attr]`` lists sources highest first for ``attr``; attributes it does not
    name use ``default_source_priority``. Unlisted sources rank below listed ones, equal among
    themselves. A profile holds at most ``max_identities`` identities (see :func:`enforce_limit`)
    and at most one identity per namespace in ``unique_namespaces``.
    """

    source_priority: Mapping[str, tuple[str, ...]] = field(default_factory=dict, hash=False)
    default_source_priority: tuple[str, ...] = ()
    max_identities: int = 50
    unique_namespaces: frozenset[str] = DEFAULT_UNIQUE_NAMESPACES

    def __post_init__(self) -> None:
        if self.max_identities < 1:
            raise ValueError("max_identities must be at least 1")
        priority = {attr: tuple(order) for attr, order in self.source_priority.items()}
        object.__setattr__(self, "source_priority", MappingProxyType(priority))
        object.__setattr__(self, "default_source_priority", tuple(self.default_source_priority))
        object.__setattr__(self, "unique_namespaces", frozenset(self.unique_namespaces))

    def rank(self, attribute: str, source: str) -> int:
        """Return the rank of ``source`` for ``attribute``: 0 is highest, unlisted rank last."""
        order = self.source_priority.get(attribute, self.default_source_priority)
        return order.index(source) if source in order else len(order)


@dataclass(frozen=True, slots=True)
class MergeOutcome:
    """Profiles merged into one.

    Storage keeps ``state`` under ``survivor_id``, moves the links of ``absorbed_ids`` to it,
    deletes those profiles, and deletes the links in ``dropped`` (removed by the graph limit).
    """

    absorbed_ids: tuple[str, ...]
    state: ProfileState
    dropped: tuple[LinkedIdentity, ...]

    @property
    def survivor_id(self) -> str:
        """The id the merged profile keeps."""
        return self.state.profile_id


@dataclass(frozen=True, slots=True)
class IdentityConflict:
    """A record identity that :func:`resolve` refused to attach.

    ``owner_id`` is the profile that keeps it (``None``: it stays unlinked); ``prevailing`` is
    the identity, in the same unique namespace, that the record's profile holds instead.
    """

    identity: Identity
    owner_id: str | None
    prevailing: Identity


@dataclass(frozen=True, slots=True)
class Resolution:
    """Where one record lands; see :func:`resolve` for the rule.

    ``profiles``: existing profiles to merge, survivor first (empty: create a new profile);
    ``attach``: record identities for the resulting profile, canonical order; ``conflicts``:
    record identities refused, canonical order.
    """

    profiles: tuple[ProfileState, ...]
    attach: tuple[Identity, ...]
    conflicts: tuple[IdentityConflict, ...]

    @property
    def target(self) -> str | None:
        """The id of the profile the record lands on, or ``None`` to create one."""
        return self.profiles[0].profile_id if self.profiles else None


def new_profile(profile_id: str, at: datetime) -> ProfileState:
    """Return an empty profile first and last seen at ``at``, ready for :func:`apply_record`."""
    return ProfileState(profile_id, (), {}, at, at)


def fresh_profile(
    profile_id: str, identities: Iterable[Identity], at: datetime, policy: MergePolicy
) -> ProfileState | None:
    """The profile a record of only new ``identities`` and no attributes creates, or ``None``
    when the record needs the full rules (:func:`resolve`, :func:`apply_record`): two values
    of a unique namespace, or more identities than the limit.

    The same state that :func:`new_profile` then :func:`apply_record` give for such a record,
    built directly: first-time people are a large share of what ingestion sees."""
    distinct = set(identities)
    if not distinct or len(distinct) > policy.max_identities:
        return None
    unique = [i.namespace for i in distinct if i.namespace in policy.unique_namespaces]
    if len(unique) != len(set(unique)):
        return None
    return ProfileState(profile_id, tuple(LinkedIdentity(i, at) for i in distinct), {}, at, at)


def widen_seen(state: ProfileState, first: datetime, last: datetime) -> ProfileState:
    """``state`` with its seen-interval widened to include ``first`` and ``last``.

    The ingestion hot path does this for most events, so the copy skips ``__post_init__``:
    its identities and attributes are ``state``'s own (already sorted and read-only), and
    widening keeps ``first_seen <= last_seen``."""
    if last < first:
        raise ValueError("last precedes first")
    wider = object.__new__(ProfileState)
    for name, value in (
        ("profile_id", state.profile_id),
        ("identities", state.identities),
        ("attributes", state.attributes),
        ("first_seen", min(state.first_seen, first)),
        ("last_seen", max(state.last_seen, last)),
    ):
        object.__setattr__(wider, name, value)
    return wider


def visible_attributes(state: ProfileState) -> dict[str, Any]:
    """Return the profile's attribute values, leaving out explicitly unset (``None``) ones."""
    return {k: v.value for k, v in state.attributes.items() if v.value is not None}


def pick_value(
    attribute: str, candidates: Iterable[AttributeValue], policy: MergePolicy
) -> AttributeValue:
    """Return the winning value of ``attribute`` among ``candidates`` (rule 1).

    Higher source rank wins; at equal rank the later ``updated_at``; an exact tie goes to the
    greatest source name, then the greatest canonical JSON encoding of the value, so the result
    does not depend on the candidates' order. ``None`` competes like any value.
    Raises ``ValueError`` when there are no candidates.
    """

    def precedence(c: AttributeValue) -> tuple[int, datetime, str, str]:
        return (-policy.rank(attribute, c.source), c.updated_at, c.source, _canonical(c.value))

    return max(candidates, key=precedence)


def enforce_limit(
    state: ProfileState, policy: MergePolicy
) -> tuple[ProfileState, tuple[LinkedIdentity, ...]]:
    """Trim ``state`` to ``policy.max_identities`` identities; return it and the links removed.

    The oldest links go first (by ``first_seen``, ties by identity order); links in a unique
    namespace are never removed, so a profile exceeds the limit only if it holds more unique
    identities than the limit allows. Removed links are returned oldest first.
    """
    excess = len(state.identities) - policy.max_identities
    if excess <= 0:
        return state, ()
    removable = sorted(
        (li for li in state.identities if li.identity.namespace not in policy.unique_namespaces),
        key=lambda li: (li.first_seen, li.identity),
    )
    dropped = tuple(removable[:excess])
    gone = {li.identity for li in dropped}
    kept = tuple(li for li in state.identities if li.identity not in gone)
    return replace(state, identities=kept), dropped


def apply_record(
    state: ProfileState,
    identities: Iterable[Identity],
    attributes: Mapping[str, Any],
    *,
    at: datetime,
    source: str,
    policy: MergePolicy,
) -> ProfileState:
    """Return ``state`` after one record from ``source`` at ``at``.

    Identities are added (``first_seen`` = the earlier of the known one and ``at``), each
    attribute competes with the current value by :func:`pick_value`, ``first_seen``/``last_seen``
    widen to include ``at``, and the graph limit is applied (links absent from the result were
    removed by it). Applying the same record twice equals applying it once.
    Raises :class:`Conflict` if the result would hold two values of a unique namespace; pass only
    identities that :func:`resolve` attached.
    """
    record = ProfileState(
        state.profile_id,
        tuple(LinkedIdentity(i, at) for i in set(identities)),
        {key: AttributeValue(value, at, source) for key, value in attributes.items()},
        at,
        at,
    )
    result, _ = enforce_limit(_combine(state.profile_id, (state, record), policy), policy)
    return result


def merge_profiles(states: Sequence[ProfileState], policy: MergePolicy) -> MergeOutcome:
    """Merge ``states`` into one profile.

    The survivor is the state with the earliest ``first_seen``, then the smallest id; the others'
    ids are ``absorbed_ids`` (sorted, without the survivor's). The merged state holds the union of
    identities (earliest ``first_seen`` each), attributes by :func:`pick_value`, the earliest
    ``first_seen`` and latest ``last_seen``, trimmed by :func:`enforce_limit` (``dropped``).
    Idempotent, commutative and associative on states within the limit.
    Raises ``ValueError`` for no states and :class:`Conflict` when two states hold different
    values of a unique namespace.
    """
    if not states:
        raise ValueError("merge_profiles needs at least one profile")
    survivor = min(states, key=_seniority)
    absorbed = tuple(sorted({s.profile_id for s in states} - {survivor.profile_id}))
    merged, dropped = enforce_limit(_combine(survivor.profile_id, states, policy), policy)
    return MergeOutcome(absorbed, merged, dropped)


def resolve(
    identities: Sequence[Identity],
    owners: Mapping[Identity, ProfileState],
    policy: MergePolicy,
) -> Resolution:
    """Decide which profiles one record merges and which of its identities it attaches.

    ``owners`` maps each known record identity to the profile holding it (other entries are
    ignored); unknown identities are new. The rule, which keeps every profile at most one value
    per unique namespace:

    1. The record's distinct identities are visited in this order: those in a unique namespace,
       in canonical order; then the others that have an owner, by owner seniority (earliest
       ``first_seen``, then smallest id), ties in canonical order; then the new ones.
    2. A group of profiles and its claims (one identity per unique namespace) start empty.
       For each visited identity:

       a. if the claims hold another value of its namespace, it is refused;
       b. else, if its owner is outside the group: the owner joins the group when none of its
          identities contradicts the claims (its unique identities then become claims);
          otherwise the owner is refused for the rest of the record and the identity with it
          (it stays on that owner);
       c. an identity not refused is attached; one in a unique namespace becomes a claim.

    3. The group is merged; the record lands on its senior profile, or on a new profile when
       the group is empty.

    So a record carrying two user_ids keeps the first in canonical order; a record carrying
    ``user_id:u2`` and ``anonymous_id:a`` whose owner holds ``user_id:u1`` lands on u2's
    profile (or a new one) while ``a`` stays with u1's; and a record without a unique identity
    touching profiles of u1 and u2 lands on the senior of the two and leaves the other alone.
    Raises ``ValueError`` if an owner does not hold the identity it is given for.
    """
    unique = policy.unique_namespaces
    record = set(identities)
    for identity in record:
        owner = owners.get(identity)
        if owner is not None and all(li.identity != identity for li in owner.identities):
            raise ValueError(f"{identity} is not on its owner {owner.profile_id}")

    claimed = sorted(i for i in record if i.namespace in unique)
    owned = sorted(
        (i for i in record if i.namespace not in unique and i in owners),
        key=lambda i: (*_seniority(owners[i]), i),
    )
    new = sorted(i for i in record if i.namespace not in unique and i not in owners)

    claims: dict[str, Identity] = {}
    group: dict[str, ProfileState] = {}
    attach: list[Identity] = []
    conflicts: list[IdentityConflict] = []
    for identity in (*claimed, *owned, *new):
        owner = owners.get(identity)
        prevailing = _contradiction((identity,), claims)
        if prevailing is None and owner is not None and owner.profile_id not in group:
            # claims only grow, so an owner refused once stays refused for this record
            prevailing = _contradiction((li.identity for li in owner.identities), claims)
            if prevailing is None:
                group[owner.profile_id] = owner
                claims.update(
                    (li.identity.namespace, li.identity)
                    for li in owner.identities
                    if li.identity.namespace in unique
                )
        if prevailing is None:
            attach.append(identity)
            if identity.namespace in unique:
                claims[identity.namespace] = identity
        else:
            owner_id = owner.profile_id if owner is not None else None
            conflicts.append(IdentityConflict(identity, owner_id, prevailing))

    return Resolution(
        profiles=tuple(sorted(group.values(), key=_seniority)),
        attach=tuple(sorted(attach)),
        conflicts=tuple(sorted(conflicts, key=lambda c: c.identity)),
    )


def _seniority(state: ProfileState) -> tuple[datetime, str]:
    """Sort key of profiles: the smallest survives a merge."""
    return state.first_seen, state.profile_id


def _contradiction(
    identities: Iterable[Identity], claims: Mapping[str, Identity]
) -> Identity | None:
    """Return the first claim that one of ``identities`` contradicts, or ``None``."""
    for identity in identities:
        claim = claims.get(identity.namespace)
        if claim is not None and claim != identity:
            return claim
    return None


def _combine(profile_id: str, states: Iterable[ProfileState], policy: MergePolicy) -> ProfileState:
    """Union ``states`` under ``profile_id`` without applying the graph limit."""
    states = tuple(states)
    first_seen: dict[Identity, datetime] = {}
    candidates: dict[str, list[AttributeValue]] = {}
    for state in states:
        for li in state.identities:
            known = first_seen.get(li.identity)
            first_seen[li.identity] = li.first_seen if known is None else min(known, li.first_seen)
        for key, value in state.attributes.items():
            candidates.setdefault(key, []).append(value)
    claims: dict[str, Identity] = {}
    for identity in sorted(first_seen):
        if identity.namespace in policy.unique_namespaces:
            claim = claims.setdefault(identity.namespace, identity)
            if claim != identity:
                raise Conflict(f"profile {profile_id} would hold both {claim} and {identity}")
    return ProfileState(
        profile_id,
        tuple(LinkedIdentity(i, t) for i, t in first_seen.items()),
        {key: pick_value(key, values, policy) for key, values in candidates.items()},
        min(s.first_seen for s in states),
        max(s.last_seen for s in states),
    )


def _canonical(value: Any) -> str:
    """Encode ``value`` deterministically, to break exact ties between attribute values."""
    try:
        return json.dumps(
            value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=repr
        )
    except (TypeError, ValueError):  # e.g. mixed-type keys, cycles
        return repr(value)
