"""The embedded event log's own contracts: seq numbering and batched merge re-pointing."""

from __future__ import annotations

import threading
from datetime import UTC, datetime
from pathlib import Path

import pyarrow as pa

from waymark.storage.eventlog import EVENT_ARROW_SCHEMA, DuckDBEventLog, final_survivors

AT = datetime(2026, 3, 1, tzinfo=UTC)


def _rows(*pairs: tuple[str, str]) -> pa.Table:
    n = len(pairs)
    return pa.table(
        {
            "workspace_id": [w for w, _ in pairs],
            "profile_id": [p for _, p in pairs],
            "message_id": [f"m{i}-{p}" for i, (_, p) in enumerate(pairs)],
            "type": ["track"] * n,
            "name": ["e"] * n,
            "timestamp": [AT] * n,
            "received_at": [AT] * n,
            "identities": ["{}"] * n,
            "properties": ["{}"] * n,
            "traits": ["{}"] * n,
            "context": ["{}"] * n,
            "source": ["t"] * n,
            "flags": ["[]"] * n,
            "previous_id": [None] * n,
            "group_id": [None] * n,
        },
        schema=EVENT_ARROW_SCHEMA,
    )


def test_chains_of_merges_end_at_the_last_survivor_per_workspace() -> None:
    merges = [(1, "w", "a", "b"), (2, "w", "b", "c"), (3, "v", "a", "z"), (4, "w", "x", "a")]
    assert final_survivors(merges) == {
        ("w", "a"): "c",
        ("w", "b"): "c",
        ("v", "a"): "z",
        # x went into a after a had gone into b then c: its events follow a's
        ("w", "x"): "c",
    }


def test_merges_re_point_events_in_one_batch_once(tmp_path: Path) -> None:
    log = DuckDBEventLog(tmp_path / "events.duckdb")
    try:
        log.append(_rows(("w", "a"), ("w", "b"), ("w", "c"), ("v", "a"), ("w", "keep")))
        merges = [(1, "w", "a", "b"), (2, "w", "b", "c")]
        log.apply_merges(merges)
        log.apply_merges(merges)  # again: below the watermark, nothing happens
        owners = sorted(log.sql("SELECT workspace_id, profile_id, seq FROM events ORDER BY seq"))
        assert [(w, p) for w, p, _ in owners] == [
            ("v", "a"),
            ("w", "c"),
            ("w", "c"),
            ("w", "c"),
            ("w", "keep"),
        ]
        assert log.merge_watermark() == 2
    finally:
        log.close()


def test_seq_numbers_continue_across_appends_and_reopening(tmp_path: Path) -> None:
    path = tmp_path / "events.duckdb"
    log = DuckDBEventLog(path)
    log.append(_rows(("w", "a"), ("w", "b")))
    log.append(_rows(("w", "c")))
    log.close()
    log = DuckDBEventLog(path)
    try:
        log.append(_rows(("w", "d")))
        seqs = [r[0] for r in log.sql("SELECT seq FROM events ORDER BY seq")]
        assert seqs == [1, 2, 3, 4]
    finally:
        log.close()


def _on_disk(log: DuckDBEventLog) -> dict[str, int]:
    return {key: int(value) for key, value in log.sql("SELECT key, value FROM log_meta")}


def test_counters_kept_in_memory_are_the_files(tmp_path: Path) -> None:
    """The log keeps its counters after reading them once; what it keeps always equals what
    the file holds, after appends, markers, merges, a failed append and reopening."""
    path = tmp_path / "events.duckdb"
    log = DuckDBEventLog(path)
    try:
        assert log.inbox_watermark() == 0 and log.merge_watermark() == 0
        assert log.append_numbered(_rows(("w", "a"), ("w", "b")), marker=("inbox", 5)) == [1, 2]
        assert log.append_numbered(_rows(("w", "c")), marker=("inbox", 5)) is None  # done
        assert log.append_numbered(_rows(("w", "c")), marker=("inbox", 9)) == [3]
        assert log.append_numbered(_rows(("w", "d")), marker=("import:x", 1)) == [4]
        log.apply_merges([(3, "w", "a", "b")])
        bad = _rows(("w", "e")).set_column(0, "workspace_id", pa.array([None], pa.string()))
        try:
            log.append_numbered(bad, marker=("inbox", 12))
        except Exception:  # NOT NULL: the transaction rolls back, counters included
            pass
        else:
            raise AssertionError("a row without a workspace was appended")
        kept = {
            "seq": log.marker_value("seq"),
            "inbox": log.inbox_watermark(),
            "import:x": log.marker_value("import:x"),
            "merges": log.merge_watermark(),
        }
        assert kept == {"seq": 4, "inbox": 9, "import:x": 1, "merges": 3} == _on_disk(log)
        assert log.append_numbered(_rows(("w", "e")), marker=("inbox", 12)) == [5]
    finally:
        log.close()
    log = DuckDBEventLog(path)
    try:
        assert log.inbox_watermark() == 12 and log.merge_watermark() == 3
        assert log.append_numbered(_rows(("w", "f"))) == [6]
        assert _on_disk(log)["seq"] == 6
    finally:
        log.close()


def test_appends_from_two_threads_never_share_a_number(tmp_path: Path) -> None:
    """The mover's thread and a file import's append to one log at once: every row gets its
    own ``seq`` and the counter kept ends where the file's does."""
    log = DuckDBEventLog(tmp_path / "events.duckdb")
    errors: list[BaseException] = []

    def appending(marker_key: str) -> None:
        try:
            for i in range(1, 121):
                log.append_numbered(_rows(("w", f"{marker_key}{i}")), marker=(marker_key, i))
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=appending, args=(key,)) for key in ("inbox", "import:x")]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert not errors
        seqs = [r[0] for r in log.sql("SELECT seq FROM events ORDER BY seq")]
        assert seqs == list(range(1, 241))
        assert _on_disk(log)["seq"] == 240 == log.next_seq() - 1
    finally:
        log.close()


def test_two_logs_open_on_one_file_share_their_counters(tmp_path: Path) -> None:
    path = tmp_path / "events.duckdb"
    first, second = DuckDBEventLog(path), DuckDBEventLog(path)
    try:
        assert first.inbox_watermark() == 0
        assert second.append_numbered(_rows(("w", "a")), marker=("inbox", 5)) == [1]
        assert first.append_numbered(_rows(("w", "a")), marker=("inbox", 5)) is None
        assert first.append_numbered(_rows(("w", "b"))) == [2]
        assert second.append_numbered(_rows(("w", "c"))) == [3]
    finally:
        first.close()
        first.close()  # twice: counted once
        second.close()
    again = DuckDBEventLog(path)  # none open: read afresh
    try:
        assert again.next_seq() == 4 and again.inbox_watermark() == 5
    finally:
        again.close()


def test_reserved_numbers_are_kept_for_the_append_that_reserved_them(tmp_path: Path) -> None:
    """The mover reserves a batch's numbers before it folds; appends meanwhile take later
    ones, the batch takes its own, and numbers given already are refused."""
    path = tmp_path / "events.duckdb"
    log = DuckDBEventLog(path)
    try:
        assert log.append_numbered(_rows(("w", "a"))) == [1]
        first = log.reserve(2)
        assert first == 2 and log.next_seq() == 4
        assert log.append_numbered(_rows(("w", "import")), marker=("import:x", 1)) == [4]
        assert log.append_numbered(_rows(("w", "b"), ("w", "c")), marker=("inbox", 7), first=2) == [
            2,
            3,
        ]
        assert log.next_seq() == 5 and _on_disk(log)["seq"] == 4
        try:
            log.append_numbered(_rows(("w", "again")), first=3)
        except ValueError as exc:
            assert "seq 3 to 3 were given already" in str(exc)
        else:
            raise AssertionError("a number given twice")
        assert [r[0] for r in log.sql("SELECT seq FROM events ORDER BY seq")] == [1, 2, 3, 4]
        assert log.reserve(0) == 5 and log.next_seq() == 5
        log.reserve_through(9)  # numbers reserved before a restart
        assert log.next_seq() == 10
        assert log.append_numbered(_rows(("w", "d"))) == [10]
    finally:
        log.close()
