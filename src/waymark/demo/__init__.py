"""Seeded synthetic online-shop data (profiles, events, schema) for demos, tests and benchmarks."""
