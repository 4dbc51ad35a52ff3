"""
Locks between the processes that make one cache: the workers of a daemon
(and a second daemon on the same directory, by mistake or during a
restart), and with a shared index, the nodes on other machines.

L{KeyLocks} gives each cache key a lock, so that concurrent misses for it
make one upstream request whichever process they land on. L{Leadership}
holds one lock for as long as a process runs the cache's single-instance
work (expiry, the scrub). Both take their locks from an L{ILockSpace}:

- L{FileLocks}, on one machine: open-file-description locks (Linux's
  C{F_OFD_SETLK}) on one byte each of a single file under
  C{<state-dir>/run/}, at an offset derived from the key: no file per key
  to create or clean up, and the kernel releases every lock a process
  holds when it dies, even by C{SIGKILL};
- PostgreSQL's advisory locks (L{contentcache.index.postgresql.AdvisoryLocks}),
  across machines: the server releases them when the process's connection
  ends.
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct
import time
from contextlib import asynccontextmanager
from typing import AsyncIterator, Callable

from attrs import define
from blake3 import blake3
from zope.interface import Interface, implementer
from twisted.application.service import MultiService
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall, deferLater
from twisted.logger import Logger

from .pool import Runner

log = Logger()

RUN_DIRECTORY = "run"
KEY_LOCKS = "keys.lock"
LEADER_LOCK = "leader.lock"
#: Left by a process that found the disk short of room, for the leader.
ROOM_WANTED = "room-wanted"
#: Offsets of key locks: below 2**62, so any off_t holds them.
_OFFSETS = (1 << 62) - 1
#: How long a waiter sleeps between tries: short at first (a hit on what
#: another worker is storing should not wait long), longer as it waits.
FIRST_WAIT = 0.005
LONGEST_WAIT = 0.1
#: How long a miss waits for another process's fill of the same key before
#: fetching it itself: longer than a large download takes.
PATIENCE = 300.0
#: How often a process that does not lead tries to become the leader.
LEADER_RETRY = 1.0
#: How often the leader looks for word that another process is short of room.
ASK_INTERVAL = 0.25

_F_OFD_SETLK = getattr(fcntl, "F_OFD_SETLK", 37)


def run_directory(state_dir: str) -> str:
    """
    Where run-time files live: locks, metrics of the workers, sockets.
    """
    return os.path.join(state_dir, RUN_DIRECTORY)


def _lock_byte(fd: int, offset: int) -> bool:
    """
    Take the write lock on one byte of C{fd}'s file without waiting;
    whether it was free.
    """
    flock = struct.pack("hhqqi4x", fcntl.F_WRLCK, os.SEEK_SET, offset, 1, 0)
    try:
        fcntl.fcntl(fd, _F_OFD_SETLK, flock)
    except OSError as e:
        if e.errno in (errno.EAGAIN, errno.EACCES):
            return False
        raise
    return True


def _open(path: str) -> int:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    return os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)


def _try(path: str, offset: int) -> int | None:
    """
    On the disk pool: a descriptor holding the lock at C{offset} of
    C{path}, or L{None} if another holds it.
    """
    fd = _open(path)
    try:
        if _lock_byte(fd, offset):
            return fd
    except BaseException:
        os.close(fd)
        raise
    os.close(fd)
    return None


def _touch(path: str) -> None:
    with open(path, "a"):
        pass


def _take_file(path: str) -> bool:
    """
    Remove C{path}; whether it was there.
    """
    try:
        os.unlink(path)
    except FileNotFoundError:
        return False
    return True


LEADER = "leader"
#: Held by an expiry pass that changes anything, in the daemon or in a gc
#: command (not a cache key: those are protocol NUL key).
EXPIRY_PASS = "expiry pass"


def key_number(name: str) -> int:
    """
    A lock's name as 64 bits (of which a lock space uses what it can).
    """
    return int.from_bytes(blake3(name.encode("utf-8")).digest(8), "big")


class ILockSpace(Interface):
    """
    Named locks shared by the processes of one cache. Every method blocks:
    call it on the disk pool (or before the reactor runs).
    """

    def try_lock(name: str) -> object | None:
        """
        Take the lock C{name} without waiting: a token that holds it, or
        L{None} if another process holds it.
        """

    def unlock(token: object) -> None:
        """
        Let go of the lock C{token} holds.
        """

    def held(token: object) -> bool:
        """
        Whether C{token} still holds its lock (a lock that lives on a
        connection is lost with it).
        """


@implementer(ILockSpace)
@define
class FileLocks:
    """
    Locks on files in a run directory, for the processes of one machine.
    """

    directory: str

    def try_lock(self, name: str) -> int | None:
        if name == LEADER:
            return _try(os.path.join(self.directory, LEADER_LOCK), 0)
        return _try(os.path.join(self.directory, KEY_LOCKS), key_number(name) & _OFFSETS)

    def unlock(self, token: object) -> None:
        # Closing the descriptor releases the lock.
        assert isinstance(token, int)
        os.close(token)

    def held(self, token: object) -> bool:
        return True


@define
class KeyLocks:
    """
    A lock per key, shared by every process of the cache.
    """

    space: ILockSpace
    _disk: Runner
    _clock: IReactorTime
    #: How long to wait for a lock before going on without it.
    patience: float = PATIENCE

    @asynccontextmanager
    async def hold(self, key: str) -> AsyncIterator[None]:
        """
        Hold C{key}'s lock for the body of the C{async with}, waiting (off
        the reactor thread, a poll that backs off) while another process
        holds it.
        """
        wait = FIRST_WAIT
        deadline = self._clock.seconds() + self.patience
        while (token := await self._disk.run(self.space.try_lock, key)) is None:
            if self._clock.seconds() > deadline:
                # The holder may be a node that vanished without a word
                # (the server lets go of its locks once keepalives tell):
                # a second fetch costs less than a build that waits.
                log.warn("waited {seconds:.0f} s for the lock of {key!r}; going on without it",
                         seconds=self.patience, key=key)
                break
            await deferLater(self._clock, wait)
            wait = min(wait * 2, LONGEST_WAIT)
        try:
            yield
        finally:
            if token is not None:
                await self._release(key, token)

    @asynccontextmanager
    async def hold_if_free(self, key: str) -> AsyncIterator[bool]:
        """
        Hold C{key}'s lock for the body of the C{async with} if no other
        process holds it, without waiting: whether this one does (work
        that another process is doing already need not be done twice).
        """
        token = await self._disk.run(self.space.try_lock, key)
        try:
            yield token is not None
        finally:
            if token is not None:
                await self._release(key, token)

    async def _release(self, key: str, token: object) -> None:
        try:
            await self._disk.run(self.space.unlock, token)
        except Exception as e:
            # Its connection went, and the lock with it.
            log.debug("letting go of the lock of {key!r} failed: {error}", key=key, error=e)


@asynccontextmanager
async def held_blocking(space: ILockSpace, name: str, poll: float = 0.1) -> AsyncIterator[None]:
    """
    Hold the lock C{name}, waiting for it in this thread: for the admin
    command, which runs no reactor.
    """
    while (token := space.try_lock(name)) is None:
        time.sleep(poll)
    try:
        yield
    finally:
        space.unlock(token)


class Leadership(MultiService):
    """
    Runs its child services (expiry, the scrub) only while this process
    holds the leader lock: in one process of the cache at a time. One that
    does not lead tries again every second, so when the leader dies another
    takes over; the leader looks as often whether it still holds the lock
    (a lock on a database connection is lost with it) and stops its
    services if not.
    """

    def __init__(self, space: ILockSpace, directory: str, disk: Runner, clock: IReactorTime,
                 on_change: Callable[[bool], None] | None = None) -> None:
        super().__init__()
        self.space = space
        self._disk = disk
        self._token: object | None = None
        self._on_change = on_change
        self._loop = LoopingCall(self._every_second)
        self._loop.clock = clock
        self._wanted = os.path.join(directory, ROOM_WANTED)
        self._room: Callable[[], object] | None = None
        self._asked = LoopingCall(self._look_for_asks)
        self._asked.clock = clock
        self._busy = False

    @property
    def leading(self) -> bool:
        return self._token is not None

    def startService(self) -> None:
        # At startup, before the reactor runs, blocking is allowed (as
        # opening the index is): the leader starts its services at once.
        self.running = 1
        try:
            self._token = self.space.try_lock(LEADER)
        except Exception as e:
            log.warn("cannot take the leader lock: {error}", error=e)
        if self._token is not None:
            self._lead()
        self._loop.start(LEADER_RETRY, now=False)

    def _lead(self) -> None:
        log.debug("this process runs expiry and the scrub")
        if self._on_change is not None:
            self._on_change(True)
        for service in self:
            service.startService()
        self._asked.start(ASK_INTERVAL, now=False)

    async def _follow(self) -> None:
        self._asked.stop()
        if self._on_change is not None:
            self._on_change(False)
        await self._stop_children()

    def when_short(self, make_room: Callable[[], object]) -> None:
        """
        What the leader runs when a process finds the disk short of room.
        """
        self._room = make_room

    def short(self) -> None:
        """
        This process found the disk short of room: make room here if it
        leads, else leave word for the leader (who looks four times a second).
        """
        if self.leading:
            if self._room is not None:
                self._room()
        else:
            self._disk.run(_touch, self._wanted).addErrback(lambda f: None)

    async def _look_for_asks_async(self) -> None:
        try:
            asked = await self._disk.run(_take_file, self._wanted)
        except OSError as e:
            log.warn("cannot read {path}: {error}", path=self._wanted, error=e)
            return
        if asked and self._room is not None:
            self._room()

    def _look_for_asks(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self._look_for_asks_async())

    def _every_second(self) -> Deferred[None] | None:
        if self._busy:
            return None  # the last look has not finished (a database slow to answer)
        return Deferred.fromCoroutine(self._look())

    async def _look(self) -> None:
        self._busy = True
        try:
            if self._token is not None:
                if await self._disk.run(self.space.held, self._token) or not self.running:
                    return
                log.warn("lost the leader lock (its connection to the index went): "
                         "expiry and the scrub stop here until this process leads again")
                self._token = None
                await self._follow()
                return
            try:
                token = await self._disk.run(self.space.try_lock, LEADER)
            except Exception as e:
                log.warn("cannot take the leader lock: {error}", error=e)
                return
            if token is None:
                return
            if not self.running:
                await self._disk.run(self.space.unlock, token)
                return
            self._token = token
            log.info("taking over expiry and the scrub (pid {pid})", pid=os.getpid())
            self._lead()
        finally:
            self._busy = False

    async def _stop_children(self) -> None:
        for service in reversed(list(self)):
            if service.running:
                try:
                    await maybeDeferred(service.stopService)
                except Exception:
                    log.failure("stopping {service} failed", service=service)

    async def _stop(self) -> None:
        for loop in (self._loop, self._asked):
            if loop.running:
                loop.stop()
        if self._token is not None:
            await self._stop_children()
            token, self._token = self._token, None
            try:
                await self._disk.run(self.space.unlock, token)
            except Exception as e:
                log.debug("letting go of the leader lock failed: {error}", error=e)

    def stopService(self) -> Deferred[None]:
        self.running = 0
        return Deferred.fromCoroutine(self._stop())
