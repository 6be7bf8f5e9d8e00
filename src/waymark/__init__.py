"""Waymark: an open-source customer journey platform (hub, audiences, journeys, campaigns)."""

__version__ = "0.1.0"
