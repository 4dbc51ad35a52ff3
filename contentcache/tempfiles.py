"""
Temporary files that a crash cannot turn into garbage.

Every temporary file is created with an exclusive C{flock} held for as long
as its writer has it open, which is until it has been renamed into place or
removed: a finished file waiting for a check is still locked. A sweep at start removes only temporary files
whose lock it can take: the writer is gone (the kernel drops the lock with
the process), so a second worker sharing the directory never loses a write
in flight to another worker's sweep.

These functions block: call them on the disk thread pool.
"""

from __future__ import annotations

import fcntl
import os
import secrets
from typing import BinaryIO

TEMP_PREFIX = ".tmp-"


def create(directory: str, prefix: str = TEMP_PREFIX) -> tuple[str, BinaryIO]:
    """
    Create and lock a new temporary file in C{directory}.

    @return: its path and a binary file object open for writing.
    """
    while True:
        path = os.path.join(directory, prefix + secrets.token_hex(12))
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            continue
        fcntl.flock(fd, fcntl.LOCK_EX)
        # Buffered: its write() writes everything or raises (a raw file's
        # may write part and say so, on a full disk for one).
        return path, os.fdopen(fd, "wb")


def finish(handle: BinaryIO) -> int:
    """
    Make a temporary file's content durable, keeping it open (and locked).

    @return: its size on disk.
    """
    handle.flush()
    os.fsync(handle.fileno())
    return os.fstat(handle.fileno()).st_size


def discard(path: str, handle: BinaryIO | None = None) -> None:
    """
    Remove a temporary file, whatever state it is in.
    """
    if handle is not None and not handle.closed:
        try:
            handle.close()
        except OSError:
            # Its buffer could not be flushed (the disk is full): the file
            # is closed all the same, and goes.
            pass
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def fsync_directory(directory: str) -> None:
    """
    Make a rename or unlink in C{directory} durable.
    """
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sweep(directory: str, prefix: str = TEMP_PREFIX, recursive: bool = False) -> int:
    """
    Remove abandoned temporary files: those no live writer holds locked.

    @return: how many were removed.
    """
    removed = 0
    try:
        entries = list(os.scandir(directory))
    except FileNotFoundError:
        return 0
    for entry in entries:
        if entry.is_dir(follow_symlinks=False):
            if recursive:
                removed += sweep(entry.path, prefix, recursive)
            continue
        if not entry.name.startswith(prefix):
            continue
        try:
            fd = os.open(entry.path, os.O_RDONLY)
        except FileNotFoundError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            continue
        else:
            discard(entry.path)
            removed += 1
        finally:
            os.close(fd)
    return removed
