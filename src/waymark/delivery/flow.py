"""Flow control for the dispatcher: token buckets, circuit breakers and retry backoff.

Pure: time is an argument (seconds on any monotonic scale), randomness too.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum

__all__ = ["BreakerState", "CircuitBreaker", "TokenBucket", "backoff"]


@dataclass
class TokenBucket:
    """At most ``rate`` sends per second on average, ``burst`` at once. :meth:`wait` says how
    long until a token is free (0: take it now, and it is taken)."""

    rate: float
    burst: float
    _tokens: float = field(default=-1.0, repr=False)
    _at: float | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.rate <= 0 or self.burst < 1:
            raise ValueError("a token bucket needs rate > 0 and burst >= 1")
        self._tokens = self.burst

    def wait(self, now: float) -> float:
        """Take a token if one is free at ``now`` (returning 0), else the seconds until one is
        (nothing taken)."""
        if self._at is not None:
            self._tokens = min(self.burst, self._tokens + (now - self._at) * self.rate)
        self._at = now
        if self._tokens >= 1:
            self._tokens -= 1
            return 0.0
        return (1 - self._tokens) / self.rate


class BreakerState(StrEnum):
    CLOSED = "closed"  # sending
    OPEN = "open"  # not sending until the cool-down has passed
    HALF_OPEN = "half_open"  # one trial send decides


@dataclass
class CircuitBreaker:
    """Opens after ``threshold`` transient failures in a row; after ``cooldown`` seconds one
    trial is let through (half open): a success closes it, a failure opens it again."""

    threshold: int = 5
    cooldown: float = 60.0
    failures: int = 0
    opened_at: float | None = None
    trial: bool = False

    def state(self, now: float) -> BreakerState:
        if self.opened_at is None:
            return BreakerState.CLOSED
        if now - self.opened_at >= self.cooldown:
            return BreakerState.HALF_OPEN
        return BreakerState.OPEN

    def allow(self, now: float) -> bool:
        """Whether a send may go now; in the half-open state only the first caller gets the
        trial until its result is recorded."""
        state = self.state(now)
        if state is BreakerState.CLOSED:
            return True
        if state is BreakerState.HALF_OPEN and not self.trial:
            self.trial = True
            return True
        return False

    def release(self) -> None:
        """The send :meth:`allow` let through did not happen: a half-open trial is free again."""
        self.trial = False

    def success(self) -> None:
        self.failures, self.opened_at, self.trial = 0, None, False

    def failure(self, now: float) -> None:
        """A transient failure (a permanent one says nothing about the provider's health)."""
        self.failures += 1
        if self.trial or self.failures >= self.threshold:
            self.opened_at, self.trial = now, False

    def retry_in(self, now: float) -> float:
        """Seconds until the breaker lets a trial through (0 when closed or half open)."""
        if self.opened_at is None:
            return 0.0
        return max(0.0, self.cooldown - (now - self.opened_at))


def backoff(attempt: int, *, base: float, cap: float, draw: float) -> float:
    """Seconds before retry number ``attempt`` (1 for the first retry): exponential from
    ``base``, at most ``cap``, with "full jitter" (``draw`` uniform in [0, 1) scales it, but
    never below half, so retries neither stampede nor come back at once)."""
    if attempt < 1:
        raise ValueError("attempt counts from 1")
    ceiling = min(cap, base * 2.0 ** (attempt - 1))
    return ceiling * (0.5 + draw / 2)
