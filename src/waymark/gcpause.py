"""Pausing the cyclic garbage collector around allocation-heavy work that makes no cycles.

A streaming fold allocates millions of small dicts and lists (the audiences' JSON states) and
no reference cycles; the collector's passes over them are wasted work (see the move-and-fold
figure of ``benchmarks/audiences_streaming.py throughput`` in docs/benchmarks.md). Reference
counting still frees everything at once; only the search for cycles waits. The allocations
made meanwhile still count, so the collector runs soon after the pause ends and collects
whatever cycles other threads made during it.
"""

from __future__ import annotations

import gc
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager


class _Pause:
    """Who holds the collector off, and whether it was on before the first of them."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.holders = 0
        self.was_enabled = False
        #: how often this process was forked inside a pause: a pause begun before a fork ends
        #: without counting in the child
        self.forks = 0


_pause = _Pause()


@contextmanager
def collector_paused() -> Iterator[None]:
    """Keep the cyclic collector off while any thread is inside; the last one out turns it
    back on if it was on when the first one came in. Nestable, thread safe."""
    entered: int | None = None
    try:
        with _pause.lock:
            if _pause.holders == 0:
                _pause.was_enabled = gc.isenabled()
                gc.disable()
            _pause.holders += 1
            entered = _pause.forks
        yield
    finally:
        if entered is not None:
            _leave(entered)


def _leave(forks: int) -> None:
    with _pause.lock:
        if forks != _pause.forks:  # begun before this child was forked (see below)
            return
        _pause.holders -= 1
        if _pause.holders == 0 and _pause.was_enabled:
            gc.enable()


def _after_fork_in_child() -> None:
    """A child forked while a thread held the pause has only the forking thread: no holder
    will ever leave, so the collector is put back as it was before the pause."""
    _pause.lock = threading.Lock()
    if _pause.holders:
        if _pause.was_enabled:
            gc.enable()
        _pause.forks += 1
    _pause.holders = 0


os.register_at_fork(after_in_child=_after_fork_in_child)
