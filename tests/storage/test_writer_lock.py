"""The SQLite writer lock shared by the processes of one data folder."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

import pytest

from waymark.core.errors import StoreBusy
from waymark.storage.database import _WriterLock


def test_a_writer_waits_for_another_process_and_gives_up_with_a_clear_error(
    tmp_path: Path,
) -> None:
    path = tmp_path / "state.db-writer"
    lock = _WriterLock(path, timeout=0.3)
    with lock:  # creates the file
        pass
    other = os.open(path, os.O_RDWR)  # another open file stands for another process
    try:
        fcntl.flock(other, fcntl.LOCK_EX)
        with pytest.raises(StoreBusy, match="write lock"), lock:
            pass
        fcntl.flock(other, fcntl.LOCK_UN)
        # the failed wait released this process's turn: the next writer goes straight in
        with lock, pytest.raises(BlockingIOError):
            fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
    finally:
        os.close(other)


def test_an_interrupted_wait_leaves_the_lock_usable(tmp_path: Path) -> None:
    lock = _WriterLock(tmp_path / "w", timeout=5)

    class Interrupt(BaseException):
        pass

    def interrupted() -> None:
        raise Interrupt

    lock._lock_file = interrupted  # type: ignore[method-assign]
    with pytest.raises(Interrupt), lock:
        pass
    del lock._lock_file
    with lock:  # would hang if the thread lock had been kept
        pass


def test_closing_releases_the_file_descriptor(tmp_path: Path) -> None:
    lock = _WriterLock(tmp_path / "w")
    with lock:
        pass
    fd = lock._fd
    assert fd is not None
    os.fstat(fd)
    lock.close()
    with pytest.raises(OSError):
        os.fstat(fd)
