"""The collector pause: off while anyone holds it, back as it was after the last one."""

from __future__ import annotations

import gc
import os
import threading
from collections.abc import Iterator

import pytest

from waymark.gcpause import collector_paused


@pytest.fixture(autouse=True)
def _restore_collector() -> Iterator[None]:
    was = gc.isenabled()
    yield
    if was:
        gc.enable()
    else:
        gc.disable()


def test_the_collector_is_off_inside_and_on_again_after() -> None:
    gc.enable()
    with collector_paused():
        assert not gc.isenabled()
    assert gc.isenabled()


def test_nested_pauses_end_with_the_outermost() -> None:
    gc.enable()
    with collector_paused():
        with collector_paused():
            assert not gc.isenabled()
        assert not gc.isenabled()
    assert gc.isenabled()


def test_a_collector_that_was_off_stays_off() -> None:
    gc.disable()
    with collector_paused():
        pass
    assert not gc.isenabled()


def test_an_error_inside_still_ends_the_pause() -> None:
    gc.enable()
    with pytest.raises(RuntimeError), collector_paused():
        raise RuntimeError("boom")
    assert gc.isenabled()


def test_the_last_thread_out_turns_it_back_on() -> None:
    gc.enable()
    inside = threading.Barrier(2)
    first_out = threading.Event()
    seen: list[bool] = []

    def first() -> None:
        with collector_paused():
            inside.wait()
        first_out.set()

    def second() -> None:
        with collector_paused():
            inside.wait()
            first_out.wait()
            seen.append(gc.isenabled())  # the first one left: still off for this one

    threads = [threading.Thread(target=first), threading.Thread(target=second)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert seen == [False]
    assert gc.isenabled()


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_child_forked_inside_a_pause_collects_again() -> None:
    gc.enable()
    held = threading.Event()
    release = threading.Event()

    def holder() -> None:
        with collector_paused():
            held.set()
            release.wait()

    thread = threading.Thread(target=holder)
    thread.start()
    held.wait()
    read, write = os.pipe()
    child = os.fork()
    if child == 0:  # the holder thread is gone here: nobody would end its pause
        try:
            os.write(write, b"1" if gc.isenabled() else b"0")
            with collector_paused():
                pass
            os.write(write, b"1" if gc.isenabled() else b"0")
        finally:
            os._exit(0)
    os.close(write)
    os.waitpid(child, 0)
    answer = b""
    while chunk := os.read(read, 2):
        answer += chunk
    os.close(read)
    release.set()
    thread.join()
    assert answer == b"11"
    assert gc.isenabled()


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_pause_begun_before_a_fork_does_not_end_the_childs_own() -> None:
    gc.enable()
    read, write = os.pipe()
    with collector_paused():
        child = os.fork()
        if child == 0:
            try:
                with collector_paused():
                    _leave_as_the_parents_pause_would()
                    os.write(write, b"1" if gc.isenabled() else b"0")
            finally:
                os._exit(0)
    os.close(write)
    os.waitpid(child, 0)
    answer = os.read(read, 1)
    os.close(read)
    assert answer == b"0"  # still off inside the child's own pause
    assert gc.isenabled()


def _leave_as_the_parents_pause_would() -> None:
    from waymark import gcpause

    gcpause._leave(gcpause._pause.forks - 1)
