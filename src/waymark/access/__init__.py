"""Workspaces, API keys, users with roles, and the audit log."""
