"""Authentication: HTTP Basic with the key as user name (as Segment clients send the write
key), ``Authorization: Bearer <key>``, or a ``writeKey`` field in a Segment body."""

from __future__ import annotations

import base64
import binascii
import threading
import time

from fastapi import Request

from waymark.access.service import Principal, authenticate, hash_key
from waymark.core.errors import Unauthenticated
from waymark.hub import Hub


def presented_key(request: Request) -> str | None:
    """The key in the request's Authorization header, if any."""
    header = request.headers.get("authorization")
    if not header:
        return None
    scheme, _, value = header.partition(" ")
    scheme = scheme.lower()
    if scheme == "bearer":
        return value.strip()
    if scheme == "basic":
        try:
            decoded = base64.b64decode(value.strip(), validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError) as exc:
            raise Unauthenticated("the Basic credentials are not valid base64") from exc
        user, _, _password = decoded.partition(":")
        return user
    raise Unauthenticated(f"unsupported authorization scheme {scheme!r}; use Basic or Bearer")


class KeyCache:
    """Resolved keys for a few seconds, so hot ingestion paths skip a query per request.

    A revocation through this process clears the cache at once; another process's revocation
    takes effect here within ``ttl`` seconds.
    """

    def __init__(self, hub: Hub, ttl: float = 2.0) -> None:
        self.hub = hub
        self.ttl = ttl
        self._lock = threading.Lock()
        self._entries: dict[str, tuple[float, Principal]] = {}

    def resolve(self, key: str | None) -> Principal:
        """The principal for ``key``; raises :class:`Unauthenticated`."""
        if not key:
            raise Unauthenticated("no key given: send the key as the Basic user name or Bearer")
        digest = hash_key(key)
        now = time.monotonic()
        with self._lock:
            hit = self._entries.get(digest)
            if hit is not None and hit[0] > now:
                return hit[1]
        with self.hub.engine.connect() as conn:
            principal = authenticate(conn, key)
        with self._lock:
            if len(self._entries) > 10_000:
                self._entries.clear()
            self._entries[digest] = (now + self.ttl, principal)
        return principal

    def clear(self) -> None:
        """Forget every cached key (after a revocation or a role change)."""
        with self._lock:
            self._entries.clear()
