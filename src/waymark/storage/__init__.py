"""Storage adapters: the state store (SQLAlchemy Core on SQLite or PostgreSQL) and the event log."""
