"""
The metadata index: which blob answers C{(protocol, key)}, with what the
protocol needs to serve it, and when each entry was created and last used.

This module is the only one that speaks SQL. L{SQLiteIndex} keeps the index
in one SQLite file in WAL mode, so a second process (the admin command, a
second worker) can read and write it while the daemon runs. Access times
are recorded in memory and written in batches, not once per cache hit.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
from typing import Any, Mapping

from attrs import define, field, frozen
from twisted.application.service import Service
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from zope.interface import Interface, implementer

from .hash import Hash
from .pool import Runner

INDEX_FILENAME = "index.sqlite"
#: How long a recorded access may wait in memory before it is written.
DEFAULT_FLUSH_INTERVAL = 5.0
#: Write the recorded accesses early once this many are waiting.
DEFAULT_FLUSH_THRESHOLD = 1000
#: How long a writer waits for another process's write lock.
BUSY_TIMEOUT_MS = 10_000

#: Each schema version's statements, applied in order to bring an older
#: index up to date. Never edit a released step: add the next one.
MIGRATIONS: dict[int, list[str]] = {
    1: [
        """
        CREATE TABLE entries (
            protocol TEXT NOT NULL,
            key TEXT NOT NULL,
            hash TEXT NOT NULL,
            size INTEGER NOT NULL,
            attrs TEXT NOT NULL,
            created REAL NOT NULL,
            accessed REAL NOT NULL,
            PRIMARY KEY (protocol, key)
        ) WITHOUT ROWID
        """,
        # Reference counts are a range count on this index.
        "CREATE INDEX entries_by_hash ON entries (hash)",
        # Expiry walks entries in order of last access.
        "CREATE INDEX entries_by_access ON entries (accessed)",
    ],
}
SCHEMA_VERSION = max(MIGRATIONS)


class IndexTooNew(Exception):
    """
    The index was written by a newer contentcache than this one.
    """


@frozen
class Entry:
    """
    One index entry: C{(protocol, key)} answered by the blob C{hash}.
    """

    protocol: str
    key: str
    hash: Hash
    size: int
    attrs: Mapping[str, Any]
    created: float
    accessed: float


class IIndex(Interface):
    """
    The metadata index. Every method but L{touch} returns a Deferred and
    does its work off the reactor thread.
    """

    def get(protocol: str, key: str) -> Deferred[Entry | None]:
        """
        The entry for C{(protocol, key)}, or L{None}.
        """

    def put(
        protocol: str, key: str, hash: Hash, size: int, attrs: Mapping[str, Any]
    ) -> Deferred[Entry]:
        """
        Create or replace the entry for C{(protocol, key)}.
        """

    def delete(protocol: str, key: str) -> Deferred[bool]:
        """
        Remove the entry; fire with whether there was one.
        """

    def references(hash: Hash) -> Deferred[int]:
        """
        How many entries point at the blob C{hash}.
        """

    def keys(protocol: str, prefix: str, limit: int) -> Deferred[list[str]]:
        """
        The keys of C{protocol} that start with C{prefix}, in order, at
        most C{limit} of them.
        """

    def touch(protocol: str, key: str) -> None:
        """
        Record a use of the entry now; written with the next batch.
        """

    def flush() -> Deferred[int]:
        """
        Write the recorded uses; fire with how many entries they touched.
        """


def _row_to_entry(row: tuple[Any, ...]) -> Entry:
    protocol, key, hexhash, size, attrs, created, accessed = row
    return Entry(protocol, key, Hash.from_hex(hexhash), size, json.loads(attrs), created, accessed)


_COLUMNS = "protocol, key, hash, size, attrs, created, accessed"


class Database:
    """
    A SQLite connection shared by the disk pool's threads, one call at a
    time. Every method blocks: call it through the disk pool.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._db = sqlite3.connect(
            path,
            timeout=BUSY_TIMEOUT_MS / 1000,
            isolation_level=None,
            check_same_thread=False,
        )
        try:
            self._db.execute("PRAGMA journal_mode=WAL")
            # In WAL mode NORMAL cannot corrupt the index; a power cut may
            # lose the last access-time batch, which costs nothing but LRU
            # precision.
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._migrate()
        except BaseException:
            self._db.close()
            raise

    def _migrate(self) -> None:
        (version,) = self._db.execute("PRAGMA user_version").fetchone()
        if version > SCHEMA_VERSION:
            raise IndexTooNew(
                f"The index {self.path} has schema version {version}, newer than "
                f"the {SCHEMA_VERSION} this contentcache understands: upgrade "
                f"contentcache or point --storage at another directory."
            )
        if version == SCHEMA_VERSION:
            return
        with self._lock:
            # IMMEDIATE takes the write lock before reading the version
            # again, so two processes starting at once migrate only once.
            self._db.execute("BEGIN IMMEDIATE")
            try:
                (version,) = self._db.execute("PRAGMA user_version").fetchone()
                for step in range(version + 1, SCHEMA_VERSION + 1):
                    for statement in MIGRATIONS[step]:
                        self._db.execute(statement)
                self._db.execute(f"PRAGMA user_version = {SCHEMA_VERSION:d}")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def schema_version(self) -> int:
        with self._lock:
            return self._db.execute("PRAGMA user_version").fetchone()[0]

    def get(self, protocol: str, key: str) -> Entry | None:
        with self._lock:
            row = self._db.execute(
                f"SELECT {_COLUMNS} FROM entries WHERE protocol = ? AND key = ?",
                (protocol, key),
            ).fetchone()
        return None if row is None else _row_to_entry(row)

    def put(
        self,
        protocol: str,
        key: str,
        hash: Hash,
        size: int,
        attrs: Mapping[str, Any],
        now: float,
    ) -> Entry:
        encoded = json.dumps(attrs, sort_keys=True, separators=(",", ":"))
        with self._lock:
            self._db.execute(
                f"INSERT OR REPLACE INTO entries ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (protocol, key, hash.hex, size, encoded, now, now),
            )
        return Entry(protocol, key, hash, size, json.loads(encoded), now, now)

    def delete(self, protocol: str, key: str) -> bool:
        with self._lock:
            cursor = self._db.execute(
                "DELETE FROM entries WHERE protocol = ? AND key = ?", (protocol, key)
            )
        return cursor.rowcount > 0

    def keys(self, protocol: str, prefix: str, limit: int) -> list[str]:
        # A range scan on the primary key: prefix <= key < prefix + U+10FFFF.
        with self._lock:
            rows = self._db.execute(
                "SELECT key FROM entries WHERE protocol = ? AND key >= ? AND key < ? "
                "ORDER BY key LIMIT ?",
                (protocol, prefix, prefix + "\U0010ffff", limit),
            ).fetchall()
        return [key for (key,) in rows]

    def references(self, hash: Hash) -> int:
        with self._lock:
            return self._db.execute(
                "SELECT count(*) FROM entries WHERE hash = ?", (hash.hex,)
            ).fetchone()[0]

    def touch(self, accesses: Mapping[tuple[str, str], float]) -> int:
        with self._lock:
            self._db.execute("BEGIN")
            try:
                cursor = self._db.executemany(
                    "UPDATE entries SET accessed = max(accessed, ?) "
                    "WHERE protocol = ? AND key = ?",
                    [(when, protocol, key) for (protocol, key), when in accesses.items()],
                )
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")
        return cursor.rowcount

    def writable(self) -> bool:
        """
        Whether the index answers and accepts writes now.
        """
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            self._db.execute("ROLLBACK")
        return True

    def close(self) -> None:
        with self._lock:
            self._db.close()


@implementer(IIndex)
@define
class SQLiteIndex:
    """
    The index in a SQLite database, every call on the disk pool.
    """

    log = Logger()

    directory: str
    _disk: Runner
    _clock: IReactorTime
    flush_threshold: int = DEFAULT_FLUSH_THRESHOLD
    _database: Database | None = None
    _pending: dict[tuple[str, str], float] = field(factory=dict)

    def open(self) -> None:
        """
        Open (creating or migrating) the index file. This blocks: the daemon
        calls it once, before the reactor runs, so that an index it cannot
        use stops startup before the port listens.
        """
        self._database = Database(os.path.join(self.directory, INDEX_FILENAME))

    def _call(self, method: str, *args: object) -> Deferred[Any]:
        if self._database is None:
            return fail(RuntimeError("the index is not open"))
        return self._disk.run(getattr(self._database, method), *args)

    def get(self, protocol: str, key: str) -> Deferred[Entry | None]:
        return self._call("get", protocol, key)

    def put(
        self, protocol: str, key: str, hash: Hash, size: int, attrs: Mapping[str, Any]
    ) -> Deferred[Entry]:
        self._pending.pop((protocol, key), None)
        return self._call("put", protocol, key, hash, size, attrs, self._clock.seconds())

    def delete(self, protocol: str, key: str) -> Deferred[bool]:
        self._pending.pop((protocol, key), None)
        return self._call("delete", protocol, key)

    def references(self, hash: Hash) -> Deferred[int]:
        return self._call("references", hash)

    def keys(self, protocol: str, prefix: str, limit: int = 10_000) -> Deferred[list[str]]:
        return self._call("keys", protocol, prefix, limit)

    def touch(self, protocol: str, key: str) -> None:
        self._pending[protocol, key] = self._clock.seconds()
        if len(self._pending) >= self.flush_threshold:
            self.flush().addErrback(
                lambda f: self.log.failure("writing access times to the index failed", f)
            )

    def flush(self) -> Deferred[int]:
        batch, self._pending = self._pending, {}
        if not batch:
            return succeed(0)
        return self._call("touch", batch)

    def writable(self) -> Deferred[bool]:
        return self._call("writable")

    def close(self) -> Deferred[None]:
        d = self._call("close")
        self._database = None
        return d


class IndexService(Service):
    """
    Opens the index at start, writes recorded accesses every
    C{flush_interval} seconds, and at stop writes the last batch and closes
    the index.
    """

    log = Logger()

    def __init__(
        self,
        index: SQLiteIndex,
        clock: IReactorTime,
        flush_interval: float = DEFAULT_FLUSH_INTERVAL,
    ) -> None:
        self.index = index
        self._loop = LoopingCall(self._flush)
        self._loop.clock = clock
        self._flush_interval = flush_interval

    def startService(self) -> None:
        try:
            os.makedirs(self.index.directory, exist_ok=True)
            self.index.open()
        except IndexTooNew as e:
            raise SystemExit(str(e)) from None
        except (OSError, sqlite3.Error) as e:
            raise SystemExit(
                f"Cannot open the index in {self.index.directory}: {e}."
            ) from None
        super().startService()
        self._loop.start(self._flush_interval, now=False)

    async def _flush_async(self) -> None:
        try:
            await self.index.flush()
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
