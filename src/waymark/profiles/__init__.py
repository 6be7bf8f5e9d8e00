"""Profiles: schemas per workspace, look-up and search, updates, privacy requests."""
