"""Typed settings, read once at the edge (CLI, server) and passed down.

Sources, later ones winning: defaults, an optional TOML file (``waymark.toml`` in the working
directory or the path in ``WAYMARK_CONFIG``), then ``WAYMARK_*`` environment variables.
Nothing below the edge reads the environment.
"""

from __future__ import annotations

import json
import os
import tomllib
from datetime import timedelta
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from waymark.core.errors import InvalidInput, Issue


class Settings(BaseModel):
    """Everything configurable. Store adapters are chosen by URL, never by editing code."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    data_dir: Path = Field(default=Path("data"), description="folder of the embedded stores")
    database_url: str | None = Field(
        default=None,
        description="state store: sqlite:///path or postgresql+psycopg://...; "
        "default sqlite in data_dir",
    )
    event_log_url: str | None = Field(
        default=None,
        description="event log: duckdb:///path or postgresql+psycopg://...; "
        "default duckdb in data_dir (or the state database when it is PostgreSQL)",
    )
    host: str = "127.0.0.1"
    port: int = 8088
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_format: Literal["console", "json"] = "console"
    max_event_bytes: int = 32 * 1024
    max_batch_bytes: int = 500 * 1024
    max_upload_bytes: int = 4 * 1024**3
    max_future_seconds: int = 86_400
    max_past_days: int = 3650
    dedup_window_days: int = 30
    flush_interval_ms: int = 1000
    checkpoint_interval_ms: int = Field(
        default=10_000,
        ge=100,
        description="embedded SQLite state store: how often `serve` copies the write-ahead log "
        "into the database, beside the event mover (each copy slows the mover's commits while "
        "it runs)",
    )
    ingest_workers: int = Field(
        default=1,
        ge=0,
        le=32,
        description="worker processes of `serve` that store ingested events "
        "(0: all in the API process)",
    )
    parse_workers: int = Field(
        default=1,
        ge=0,
        le=32,
        description="worker processes of `serve` that decode, parse and validate ingested "
        "events before a store worker stores them (0: the store workers parse too; unused "
        "when ingest_workers is 0)",
    )
    event_log_memory_mb: int = Field(
        default=256,
        ge=64,
        description="embedded DuckDB event log: memory for its buffer pool and queries, in MB "
        "(it spills to a folder beside the log beyond that)",
    )
    identity_graph_limit: int = 50
    public_url: str = Field(
        default="http://127.0.0.1:8088",
        description="where recipients reach this hub: the base of tracked links, the open "
        "pixel, unsubscribe and preference pages, and provider callbacks",
    )
    providers: dict[str, dict[str, Any]] = Field(
        default_factory=dict,
        description="per channel (email, sms, push, webhook), the provider that sends it and its "
        'options, e.g. {"email": {"kind": "smtp", "host": "smtp.example.com", "port": 587, '
        '"security": "starttls", "username": "...", "password": "...", "from_address": '
        '"shop@example.com"}}; while public_url is local (development), a channel without one '
        'goes to the development sink in the data folder (kind "sink"); otherwise its messages '
        "wait, then go to the dead letters, until one is configured",
    )
    dispatch_workers: int = Field(
        default=4, ge=1, le=64, description="threads of `serve` handing messages to providers"
    )
    dispatch_rates: dict[str, float] = Field(
        default_factory=dict,
        description='per channel, at most this many sends per second, e.g. {"sms": 10}',
    )
    soft_bounce_limit: int = Field(
        default=3,
        ge=1,
        description="soft bounces of one address within soft_bounce_days that put it on the "
        "suppression list",
    )
    soft_bounce_days: int = Field(default=30, ge=1)
    source_priority: dict[str, list[str]] = Field(
        default_factory=dict,
        description="per attribute, the sources whose values win over newer ones, highest "
        'first, e.g. {"email": ["crm", "api"]}; the key "*" applies to every other attribute',
    )

    @property
    def state_url(self) -> str:
        """The state store's URL, defaulting to SQLite in the data folder."""
        return self.database_url or f"sqlite:///{self.data_dir / 'state.db'}"

    @property
    def events_url(self) -> str:
        """The event log's URL: DuckDB in the data folder unless the state store is PostgreSQL."""
        if self.event_log_url:
            return self.event_log_url
        if self.state_url.startswith("postgresql"):
            return self.state_url
        return f"duckdb:///{self.data_dir / 'events.duckdb'}"

    @property
    def shared_event_log(self) -> bool:
        """Whether the event log lives in the state store's own PostgreSQL database, so that
        moving events and re-pointing merges happen in one transaction (server mode)."""
        return self.state_url.startswith("postgresql") and self.events_url == self.state_url

    def check_stores(self) -> None:
        """Refuse store combinations that cannot keep the no-loss guarantee."""
        if self.state_url.startswith("postgresql") and not self.shared_event_log:
            raise InvalidInput(
                [
                    Issue(
                        "event_log_url",
                        "with a PostgreSQL state store the event log must be the same "
                        "PostgreSQL database (leave event_log_url unset)",
                    )
                ]
            )

    @property
    def local_only(self) -> bool:
        """Whether recipients reach this hub only on this machine (``public_url`` on a loopback
        host): a development setup, where channels without a provider go to the development
        sink and its pages are served."""
        host = self.public_url.split("://", 1)[-1].split("/", 1)[0].rsplit(":", 1)[0]
        return host.strip("[]") in ("127.0.0.1", "localhost", "::1")

    @property
    def max_future(self) -> timedelta:
        return timedelta(seconds=self.max_future_seconds)

    @property
    def max_past(self) -> timedelta:
        return timedelta(days=self.max_past_days)


_ENV_PREFIX = "WAYMARK_"


def _env_value(raw: str) -> Any:
    """An environment value: JSON when it is an object or a list (``WAYMARK_PROVIDERS``),
    else the text, which the settings model converts."""
    if raw.lstrip().startswith(("{", "[")):
        try:
            return json.loads(raw)
        except ValueError:
            return raw  # the model then names the field that is not valid
    return raw


def load_settings(
    environ: dict[str, str] | None = None,
    config_file: Path | None = None,
    **overrides: Any,
) -> Settings:
    """Build :class:`Settings` from file, environment and explicit overrides.

    Raises :class:`InvalidInput` naming the offending key and its source.
    """
    env = dict(os.environ if environ is None else environ)
    values: dict[str, Any] = {}
    path = config_file or (Path(env["WAYMARK_CONFIG"]) if "WAYMARK_CONFIG" in env else None)
    if path is None and Path("waymark.toml").is_file():
        path = Path("waymark.toml")
    if path is not None:
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise InvalidInput([Issue(str(path), f"cannot read configuration: {exc}")]) from exc
        values.update(data.get("waymark", data))
    fields = Settings.model_fields
    for key, raw in env.items():
        if key.startswith(_ENV_PREFIX) and key != "WAYMARK_CONFIG":
            name = key[len(_ENV_PREFIX) :].lower()
            if name in fields:
                values[name] = _env_value(raw)
    values.update({k: v for k, v in overrides.items() if v is not None})
    try:
        return Settings.model_validate(values)
    except ValidationError as exc:
        issues = [Issue(".".join(str(p) for p in err["loc"]), err["msg"]) for err in exc.errors()]
        raise InvalidInput(issues, "invalid configuration: " + "; ".join(map(str, issues))) from exc
