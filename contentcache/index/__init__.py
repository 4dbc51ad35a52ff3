"""
The metadata index: which blob answers C{(protocol, key)}, with what the
protocol needs to serve it, and when each entry was created and last used.

L{IIndex} is all the daemon knows of it; L{sqlite} (the default, a file in
the state directory) and L{postgresql} (shared by several nodes) hold the
SQL of each engine.
"""

from __future__ import annotations

import os
import sqlite3
from contextlib import contextmanager
from typing import Iterator

from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from ..locks import FileLocks, ILockSpace
from ..pool import Runner
from ..space import DiskSpace, StorageFull
from .interface import (
    CHANGES_KEPT,
    BlobRow,
    Changes,
    Entry,
    IDatabase,
    IIndex,
    IndexTooNew,
    IndexUnavailable,
    Removed,
    StoredBlob,
    StoreStats,
    TokenRow,
    Used,
)
from .pooled import PooledIndex
from .sqlite import INDEX_FILENAME, MIGRATIONS, SCHEMA_VERSION, SQLiteDatabase, SQLiteIndex

__all__ = [
    "CHANGES_KEPT",
    "INDEX_FILENAME",
    "MIGRATIONS",
    "SCHEMA_VERSION",
    "BlobRow",
    "Changes",
    "Entry",
    "IDatabase",
    "IIndex",
    "IndexService",
    "IndexTooNew",
    "IndexUnavailable",
    "PooledIndex",
    "Removed",
    "SQLiteDatabase",
    "SQLiteIndex",
    "StoreStats",
    "StoredBlob",
    "TokenRow",
    "Used",
    "make_index",
    "make_locks",
    "prepare",
    "startup_errors",
]

#: How long a recorded access may wait in memory before it is written.
DEFAULT_FLUSH_INTERVAL = 5.0


@contextmanager
def startup_errors(description: str) -> Iterator[None]:
    """
    An index that cannot be opened stops startup in one sentence.
    """
    try:
        yield
    except (IndexTooNew, IndexUnavailable) as e:
        raise SystemExit(str(e)) from None
    except (OSError, sqlite3.Error) as e:
        raise SystemExit(f"Cannot open the index ({description}): {e}.") from None


def prepare(address: str | None, state_dir: str) -> None:
    """
    Create or migrate the index (C{address}, or SQLite in C{state_dir})
    and close it again: the supervisor of workers, before it starts them
    (one migration, and a sentence rather than N failing workers).
    """
    if address is not None:
        from .postgresql import describe, prepare as prepare_postgresql

        with startup_errors(describe(address)):
            prepare_postgresql(address)
        return
    from .sqlite import prepare as prepare_sqlite

    with startup_errors(os.path.join(state_dir, INDEX_FILENAME)):
        prepare_sqlite(state_dir)


def make_index(
    address: str | None,
    state_dir: str,
    disk: Runner,
    clock: IReactorTime,
    space: DiskSpace | None = None,
    threads: int = 1,
    statement_timeout: float | None = None,
) -> PooledIndex:
    """
    The index at C{address} (a C{postgresql://} URL), or SQLite in
    C{state_dir}; not opened yet. C{space} guards a local index's writes
    against a full disk; C{threads} bounds a server's connections, and
    C{statement_timeout} its statements.
    """
    if address is not None:
        from .postgresql import MAX_CONNECTIONS, PostgreSQLIndex

        return PostgreSQLIndex(address, disk, clock, max_connections=min(threads, MAX_CONNECTIONS),
                               statement_timeout=statement_timeout)
    return SQLiteIndex(state_dir, disk, clock, space=space)


def make_locks(address: str | None, run_directory: str) -> ILockSpace:
    """
    The locks of the processes of one cache: advisory locks on the shared
    index's server, else files in the run directory.
    """
    if address is not None:
        from .postgresql import AdvisoryLocks

        return AdvisoryLocks(address)
    return FileLocks(run_directory)


class IndexService(Service):
    """
    Opens the index at start, writes recorded accesses every
    C{flush_interval} seconds, and at stop writes the last batch and closes
    the index.
    """

    log = Logger()

    def __init__(
        self,
        index: IIndex,
        clock: IReactorTime,
        flush_interval: float = DEFAULT_FLUSH_INTERVAL,
    ) -> None:
        self.index = index
        self._loop = LoopingCall(self._flush)
        self._loop.clock = clock
        self._flush_interval = flush_interval

    def startService(self) -> None:
        with startup_errors(self.index.description):
            self.index.open()
        super().startService()
        self._loop.start(self._flush_interval, now=False)

    async def _flush_async(self) -> None:
        try:
            await self.index.flush()
        except StorageFull:
            # Said already (once a minute); the accesses are lost, which
            # costs only LRU precision.
            pass
        except IndexUnavailable as e:
            self.log.warn("writing access times to the index failed: {error}", error=e)
        except Exception:
            # A lost batch only costs LRU precision; the timer must go on.
            self.log.failure("writing access times to the index failed")

    def _flush(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self._flush_async())

    async def _stop(self) -> None:
        if self._loop.running:
            self._loop.stop()
        await self._flush_async()
        await self.index.close()

    def stopService(self) -> Deferred[None]:
        super().stopService()
        return Deferred.fromCoroutine(self._stop())
