"""The HTTP API (FastAPI): Segment-compatible ingestion, profiles, schemas, keys, privacy."""
