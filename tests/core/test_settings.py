from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from waymark.core.clock import ManualClock
from waymark.core.errors import InvalidInput
from waymark.core.ids import new_id, stable_id
from waymark.settings import load_settings


def test_precedence_file_then_environment_then_overrides(tmp_path: Path) -> None:
    conf = tmp_path / "waymark.toml"
    conf.write_text('[waymark]\nport = 9000\nlog_level = "debug"\nmax_event_bytes = 1000\n')
    s = load_settings(environ={"WAYMARK_PORT": "9100"}, config_file=conf, log_level="error")
    assert (s.port, s.log_level, s.max_event_bytes) == (9100, "error", 1000)
    assert s.state_url == f"sqlite:///{Path('data') / 'state.db'}"
    assert s.events_url.startswith("duckdb:///")


def test_bad_values_name_the_setting(tmp_path: Path) -> None:
    with pytest.raises(InvalidInput) as err:
        load_settings(environ={"WAYMARK_PORT": "eighty"})
    assert err.value.issues[0].path == "port"
    bad = tmp_path / "w.toml"
    bad.write_text("port = [")
    with pytest.raises(InvalidInput, match="cannot read configuration"):
        load_settings(environ={}, config_file=bad)
    with pytest.raises(InvalidInput) as err:
        load_settings(environ={}, colour="blue")
    assert err.value.issues[0].path == "colour"


def test_postgres_state_needs_the_postgres_log() -> None:
    pg = "postgresql+psycopg://localhost/x"
    s = load_settings(environ={}, database_url=pg)
    assert s.events_url == pg and s.shared_event_log
    mixed = load_settings(environ={}, database_url=pg, event_log_url="duckdb:///e.duckdb")
    with pytest.raises(InvalidInput, match="same PostgreSQL database"):
        mixed.check_stores()


def test_ids_are_time_ordered_and_stable_ids_deterministic() -> None:
    a, b = new_id(1_000), new_id(2_000)
    assert a < b and len(a) == 36 and a[14] == "7"
    assert stable_id("x", "y") == stable_id("x", "y") != stable_id("xy", "")


def test_manual_clock_only_moves_forward() -> None:
    clock = ManualClock(datetime(2026, 1, 1, tzinfo=UTC))
    clock.advance(timedelta(days=1))
    assert clock.now() == datetime(2026, 1, 2, tzinfo=UTC)
    with pytest.raises(ValueError):
        clock.advance(timedelta(seconds=-1))
    with pytest.raises(ValueError):
        clock.set(datetime(2025, 1, 1, tzinfo=UTC))
