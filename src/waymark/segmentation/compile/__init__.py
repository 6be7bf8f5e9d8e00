"""Evaluators of a checked audience AST: SQL through sqlglot, in memory, streaming."""
