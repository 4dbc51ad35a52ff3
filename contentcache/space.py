"""
Room on the storage's filesystem: whether the last write found the disk
full, how much is free, and how much expiry keeps free (C{--min-free}).

A full disk is a state, not a crash: a write that fails with C{ENOSPC} or
C{EDQUOT} (or SQLite's "database or disk is full") becomes L{StorageFull},
answered C{507}; hits go on being served; the state lasts until a write
succeeds again, and every time it begins, whoever listens (expiry) is told
so that it can make room at once.
"""

from __future__ import annotations

import errno
import os
import re
import sqlite3
import time
from typing import Any, Callable

from attrs import define, field, frozen
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.threadable import isInIOThread

from .units import MINUTE, parse_size

log = Logger()

#: The errors that mean "no room": the filesystem or the user's quota.
FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})
#: SQLite's result code for a full disk (sqlite3.h).
SQLITE_FULL = 13
#: The full state is logged at most this often.
WARN_INTERVAL = MINUTE
DEFAULT_MIN_FREE = "5%"

_PERCENT = re.compile(r"\s*([0-9]+(?:\.[0-9]+)?)\s*%\s*")


class StorageFull(Exception):
    """
    Nothing more fits in the storage; the message is one sentence.
    """


def is_full(error: BaseException) -> bool:
    """
    Whether C{error} says the filesystem (or the quota) has no room.
    """
    if isinstance(error, StorageFull):
        return True
    if isinstance(error, OSError):
        return error.errno in FULL_ERRNOS
    if isinstance(error, sqlite3.Error):
        return getattr(error, "sqlite_errorcode", None) == SQLITE_FULL
    return False


@frozen
class MinFree:
    """
    How much of the filesystem to keep free: a number of bytes, or a share
    of the filesystem's size.
    """

    size: int = 0
    share: float = 0.0

    @classmethod
    def parse(cls, text: str) -> MinFree:
        """
        C{5%}, C{2GiB}, or C{0} (off); L{ValueError} with a sentence otherwise.
        """
        m = _PERCENT.fullmatch(text)
        if m is not None:
            share = float(m[1]) / 100
            if share >= 1:
                raise ValueError(f"{text.strip()!r} is not a share of the filesystem below 100%")
            return cls(share=share)
        try:
            return cls(size=parse_size(text))
        except ValueError:
            raise ValueError(f"{text!r} is neither a size like 2GiB nor a percentage like 5%") from None

    @property
    def enabled(self) -> bool:
        return self.size > 0 or self.share > 0

    def bytes_of(self, total: int) -> int:
        """
        The bytes to keep free on a filesystem of C{total} bytes.
        """
        return self.size if self.size else int(total * self.share)


@frozen
class Room:
    """
    A filesystem's size and what is free of it for the daemon, in bytes.
    """

    free: int
    total: int


def measure(path: str) -> Room:
    """
    The room on the filesystem that holds C{path}. Blocks (network
    filesystems answer slowly): call it on the disk pool.
    """
    st = os.statvfs(path)
    return Room(free=st.f_bavail * st.f_frsize, total=st.f_blocks * st.f_frsize)


@define
class DiskSpace:
    """
    The storage's room as this daemon last saw it.

    @ivar path: a directory on the filesystem to watch: where spool files
        are written (beside the blobs, or the state directory with S3).
    @ivar full: a write found no room, and none has succeeded since.
    """

    path: str
    #: Announcements from disk threads go through the reactor; without one
    #: (tests, the admin command) everything runs on the calling thread.
    _reactor: Any = None
    #: Room to keep free: writes that leave less say the room is short.
    min_free: MinFree = MinFree()
    _clock: Callable[[], float] = time.monotonic
    full: bool = False
    reason: str = ""
    room: Room | None = None
    _warned_at: float = float("-inf")
    _roomy_at: float = float("-inf")
    _listeners: list[Callable[[], object]] = field(factory=list)
    #: A directory where the processes sharing this storage (workers) tell
    #: each other that it is full, or has room again: the last mark wins.
    shared: str | None = None
    #: Runs the blocking marks from the reactor thread (the disk pool).
    runner: Any = None

    def when_short(self, listener: Callable[[], object]) -> None:
        """
        Call C{listener} (on the reactor thread) each time a write finds no
        room, or leaves less than C{min_free}.
        """
        self._listeners.append(listener)

    def failed(self, error: BaseException) -> StorageFull:
        """
        A write found no room: enter the full state. Safe on any thread;
        returns the exception to raise in C{error}'s place.
        """
        if isinstance(error, StorageFull):
            return error
        reason = error.strerror if isinstance(error, OSError) and error.strerror else str(error)
        self.full = True
        self.reason = reason
        if self.shared is not None:
            if not isInIOThread():
                self._mark(FULL_MARK)
            elif self.runner is not None:
                self.runner.run(self._mark, FULL_MARK).addErrback(lambda f: None)
        if self._reactor is not None and not isInIOThread():
            self._reactor.callFromThread(self._announce)
        else:
            self._announce()
        return StorageFull(f"the storage is full ({reason})")

    def _announce(self) -> None:
        now = self._clock()
        if now - self._warned_at >= WARN_INTERVAL:
            self._warned_at = now
            log.warn(
                "storage is full ({reason}): misses are answered 507 and cached content is "
                "still served (at most one such warning a minute)",
                reason=self.reason,
            )
        self._short()

    def _short(self) -> None:
        for listener in self._listeners:
            try:
                listener()
            except Exception:
                log.failure("a listener for the storage's room failed")

    def wrote(self) -> Deferred[None] | None:
        """
        A write succeeded (on the reactor thread): there is room again, if
        perhaps less than C{min_free} (as last measured). With workers, a
        Deferred that fires once the others can know it: the caller waits
        for it before it answers, so that no worker says "full" to a
        client after a write has succeeded.
        """
        marked: Deferred[None] | None = None
        was_full, self.full = self.full, False
        if self.shared is not None and self.runner is not None:
            # Another worker may have found it full: room is news to it.
            marked = self.runner.run(self._room_again).addCallback(
                lambda flipped: self._roomy() if flipped or was_full else None
            ).addErrback(lambda f: None)
        elif was_full:
            self._roomy()
        if self.room is not None and self.min_free.enabled and self.room.free < self.min_free.bytes_of(self.room.total):
            self._short()
        return marked

    def _mark(self, name: str) -> None:
        """
        Say so to the other processes (blocks): the mark's time is now, and
        later than the other mark's (the clock's ticks are coarser than a
        nanosecond: two marks in one tick would tie). An existing file's
        times change without a byte of room.
        """
        assert self.shared is not None
        path = os.path.join(self.shared, name)
        other = os.path.join(self.shared, ROOM_MARK if name == FULL_MARK else FULL_MARK)
        try:
            later = os.stat(other).st_mtime_ns + 1
        except OSError:
            later = 0
        when = max(time.time_ns(), later)
        try:
            os.utime(path, ns=(when, when))
        except FileNotFoundError:
            try:
                os.makedirs(self.shared, exist_ok=True)
                open(path, "a").close()
                os.utime(path, ns=(when, when))
            except OSError:
                pass
        except OSError:
            pass

    def _roomy(self) -> None:
        now = self._clock()
        if now - self._roomy_at >= WARN_INTERVAL:
            self._roomy_at = now
            log.info("storage has room again; misses are stored")

    def _room_again(self) -> bool:
        """
        Mark room again if the last mark said full (blocks); whether it did.
        """
        if self.full_elsewhere():
            self._mark(ROOM_MARK)
            return True
        return False

    def full_now(self) -> bool:
        """
        Whether the storage is full now (blocks): with workers, as the last
        of them to find out said (full, or room again), else as this
        process last found.
        """
        if self.shared is None:
            return self.full
        full = self.full_elsewhere()
        if not full:
            # Another worker wrote since: this one's last failure is old news.
            self.full = False
        return full

    def prepare_marks(self) -> None:
        """
        Create the marks while there is room (blocks), the room mark last.
        """
        if self.shared is not None:
            self._mark(FULL_MARK)
            self._mark(ROOM_MARK)

    def full_elsewhere(self) -> bool:
        """
        Whether another process sharing the storage found it full last (blocks).
        """
        if self.shared is None:
            return False
        try:
            full = os.stat(os.path.join(self.shared, FULL_MARK)).st_mtime_ns
            room = os.stat(os.path.join(self.shared, ROOM_MARK)).st_mtime_ns
        except OSError:
            return False
        return full > room

    def measure(self) -> Room:
        """
        Look at the filesystem now (blocks: on the disk pool).
        """
        self.room = measure(self.path)
        return self.room


FULL_MARK = "storage-full"
ROOM_MARK = "storage-room"


def guarded(space: DiskSpace, f: Callable[..., Any], *args: object) -> Any:
    """
    Call C{f} (a blocking write), turning "no room" into L{StorageFull}.
    """
    try:
        return f(*args)
    except (OSError, sqlite3.Error) as e:
        if is_full(e):
            raise space.failed(e) from e
        raise
