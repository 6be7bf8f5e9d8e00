"""The per-profile logic ``serve`` runs for streaming audiences (which audiences an event
concerns, the shared answer of untouched ones, timers, replays), against the in-memory
evaluator: random definitions and histories, events arriving in random batches (late ones
included) while time passes, timers firing at their instants."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.segmentation.data import Person, people
from tests.segmentation.engines import memory_members
from tests.segmentation.strategies import audiences
from tests.segmentation.test_equivalence import NOWS, SCHEMA
from waymark.segmentation import live
from waymark.segmentation.compile.memory import MemoryEvent, compile_memory
from waymark.segmentation.compile.streaming import compile_streaming, plan
from waymark.segmentation.lang import ast


def _live(expr: ast.Expr, name: str) -> live.Live:
    compiled = compile_streaming(expr, max_events=live.MAX_EVENTS)
    return live.Live(
        id=name,
        workspace_id="w",
        name=name,
        compiled=compiled,
        memory=compile_memory(expr),
        built_key=compiled.key,
        through=None,
        ready=True,
    )


class _Serve:
    """What ``serve`` keeps for a few profiles, with rows in memory instead of tables."""

    def __init__(self, lives: list[live.Live], crowd: list[Person]) -> None:
        self.lives = lives
        self.people = {
            p.profile_id: live._Profile(p.attributes, dict(p.consents), None) for p in crowd
        }
        self.arrived: dict[str, list[MemoryEvent]] = {p.profile_id: [] for p in crowd}
        self.rows: dict[str, Any] = {}
        self.member: dict[tuple[str, str], bool] = {}

    def _evaluator(self, now: datetime) -> live._Evaluator:
        def history(ids: Any, names: Any) -> list[Any]:
            return [
                (pid, e.name, e.timestamp, e.seq, e.properties)
                for pid in ids
                for e in self.arrived[pid]
                if e.name in names
            ]

        return live._Evaluator(self.lives, now=now, history=history)

    def _apply(self, work: live.FoldWork) -> None:
        self.rows.update(work.rows)
        self.member.update(work.answers)

    def fold(self, batch: dict[str, list[MemoryEvent]], now: datetime) -> None:
        evaluator = self._evaluator(now)
        work = live.FoldWork("w")
        for pid, events in batch.items():
            self.arrived[pid].extend(events)
            live._evaluate_profile(
                work, evaluator, pid, self.people[pid], self.rows.get(pid), events=list(events)
            )
        self._apply(work)

    def replay(self, pid: str, now: datetime) -> None:
        """A rebuild from the whole history, as after a merge."""
        evaluator = self._evaluator(now)
        work = live.FoldWork("w")
        live._evaluate_profile(
            work,
            evaluator,
            pid,
            self.people[pid],
            self.rows.get(pid),
            history=list(self.arrived[pid]),
            replay={a.id for a in self.lives},
            recheck=True,
        )
        self._apply(work)

    def timers_until(self, end: datetime) -> None:
        """Fire every timer due by ``end``, each at its own instant, in order."""
        while True:
            due = [
                (entry["d"], pid, aid)
                for pid, (entries, _seen) in self.rows.items()
                for aid, entry in entries.items()
                if entry.get("d") is not None
            ]
            due = [d for d in due if live._moment(d[0]) <= end]
            if not due:
                return
            micros, pid, aid = min(due)
            at = live._moment(micros)
            audience = next(a for a in self.lives if a.id == aid)
            entries, seen = self.rows[pid]
            state = entries[aid]["s"]
            member, turn = self._evaluator(at).answer(audience, state, self.people[pid], pid)
            assert turn is None or turn > micros, "a timer must move forward"
            self.member[(aid, pid)] = member
            self.rows[pid] = ({**entries, aid: {"s": state, "d": turn}}, seen)

    def members(self, aid: str) -> set[str]:
        return {pid for (a, pid), m in self.member.items() if a == aid and m}


def _visible(crowd: list[Person], arrived: dict[str, list[MemoryEvent]]) -> list[Person]:
    keep = {(pid, e.seq) for pid, events in arrived.items() for e in events}
    return [
        Person(
            p.profile_id,
            p.attributes,
            p.consents,
            tuple(e for e in p.events if (p.profile_id, e.seq) in keep),
        )
        for p in crowd
    ]


@settings(
    max_examples=80,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(data=st.data())
def test_streamed_answers_match_the_in_memory_evaluator(data: st.DataObject) -> None:
    exprs = [
        data.draw(audiences(SCHEMA, names=(), depth=2), label=f"definition {i}") for i in range(2)
    ]
    exprs = [e for e in exprs if plan(e).streamable]
    if not exprs:
        return
    end = data.draw(st.sampled_from(NOWS), label="end")
    crowd = data.draw(people(SCHEMA, exprs[0], end), label="people")
    lives = [_live(e, f"a{i}") for i, e in enumerate(exprs)]
    serve = _Serve(lives, crowd)
    # arrival: each event at its timestamp or later (late by up to two days), in batches
    start = end - timedelta(days=data.draw(st.integers(1, 60), label="days"))
    pending = []
    for p in crowd:
        for e in p.events:
            late = timedelta(minutes=data.draw(st.sampled_from([0, 0, 5, 90, 2880])))
            arrival = min(max(e.timestamp + late, start), end)
            pending.append(
                (arrival, p.profile_id, MemoryEvent(e.name, e.timestamp, e.seq, e.properties))
            )
    pending.sort(key=lambda item: (item[0], item[2].seq))
    instants = sorted({start, end, *(a for a, _p, _e in pending)})
    # every profile is seen once at the start (a build of profiles without events)
    serve.fold({p.profile_id: [] for p in crowd}, start)
    checks = 0
    for at in instants:
        serve.timers_until(at)
        batch: dict[str, list[MemoryEvent]] = {}
        for arrival, pid, event in pending:
            if arrival == at:
                batch.setdefault(pid, []).append(event)
        if batch:
            serve.fold(batch, at)
        if data.draw(st.booleans(), label="replay someone") and crowd:
            serve.replay(data.draw(st.sampled_from(crowd)).profile_id, at)
        if at == end or data.draw(st.integers(0, 3)) == 0:
            seen = _visible(crowd, serve.arrived)
            for audience, expr in zip(lives, exprs, strict=True):
                expected = memory_members(expr, seen, at)
                assert serve.members(audience.id) == expected, (audience.id, at)
            checks += 1
    assert checks >= 1
