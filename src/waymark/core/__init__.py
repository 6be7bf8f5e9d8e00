"""Stdlib-only building blocks shared by every layer: ids, clocks, errors."""
