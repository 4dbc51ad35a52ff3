"""
The daemon's own thread pool for disk and database work.

Blocking file and SQLite calls run here, never on the reactor thread and
never on the reactor's default pool, which also resolves host names for
upstream fetches: a slow disk must not stall DNS, and the other way round.
"""

from __future__ import annotations

from typing import Any, Callable, Protocol, TypeVar

from twisted.application.service import Service
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.threads import deferToThreadPool
from twisted.python.threadpool import ThreadPool

T = TypeVar("T")

DEFAULT_THREADS = 8


class Runner(Protocol):
    """
    Something that runs a blocking call off the reactor thread.
    """

    def run(self, f: Callable[..., T], *args: object) -> Deferred[T]:
        ...


class DiskPool(Service):
    """
    A service that owns a thread pool and runs blocking calls on it.
    """


    def __init__(self, reactor: Any, threads: int = DEFAULT_THREADS) -> None:
        self._reactor = reactor
        self.pool = ThreadPool(minthreads=1, maxthreads=threads, name="contentcache-disk")
        #: Calls queued or running: the pool's queue depth.
        self.pending = 0

    def _done(self, result: T) -> T:
        self.pending -= 1
        return result

    def run(self, f: Callable[..., T], *args: object) -> Deferred[T]:
        self.pending += 1
        return deferToThreadPool(self._reactor, self.pool, f, *args).addBoth(self._done)

    def startService(self) -> None:
        super().startService()
        # Threads start with the reactor: if a later service refuses to
        # start (an index from a newer version, say), no pool thread exists
        # yet to keep the process from exiting. Calls made before then wait
        # in the pool's queue.
        self._reactor.callWhenRunning(self.pool.start)

    def stopService(self) -> None:
        super().stopService()
        # Joins the threads: the services stopped before this one have
        # already waited for their own calls to finish.
        self.pool.stop()


class SynchronousRunner:
    """
    Runs each call at once on the calling thread: for tests, and for the
    admin command, which has no reactor to protect.
    """

    def run(self, f: Callable[..., T], *args: object) -> Deferred[T]:
        try:
            return succeed(f(*args))
        except BaseException:
            return fail()
