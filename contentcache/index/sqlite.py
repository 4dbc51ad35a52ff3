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
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Mapping, Sequence, TypeVar

from attrs import define, field, frozen
from twisted.application.service import Service
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import Interface, implementer

from .compress import IDENTITY
from .hash import Hash
from .pool import Runner
from .space import DiskSpace, StorageFull, guarded
from .store import Blob
from .tracing import traced_call

T = TypeVar("T")

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
    2: [
        # Each blob once, with its size and when it entered the store: what
        # expiry needs to keep the store under its size limit and to leave
        # young blobs alone.
        """
        CREATE TABLE blobs (
            hash TEXT PRIMARY KEY,
            size INTEGER NOT NULL,
            created REAL NOT NULL
        ) WITHOUT ROWID
        """,
        """
        INSERT OR IGNORE INTO blobs (hash, size, created)
        SELECT hash, max(size), min(created) FROM entries GROUP BY hash
        """,
        # Least recently used first; ties broken by age, older first.
        "DROP INDEX entries_by_access",
        "CREATE INDEX entries_by_lru ON entries (accessed, created)",
        "CREATE INDEX blobs_by_created ON blobs (created, hash)",
    ],
    3: [
        # How the backend holds each blob and how many bytes that takes:
        # the store may compress. What expiry counts is the stored size.
        # (A worker of the previous version, still running, inserts rows
        # without it: readers take the size then.)
        "ALTER TABLE blobs ADD COLUMN encoding TEXT NOT NULL DEFAULT 'identity'",
        "ALTER TABLE blobs ADD COLUMN stored INTEGER",
        "UPDATE blobs SET stored = size",
    ],
    4: [
        # What changed, for the in-memory hot sets of every process using
        # this index (the workers, and a daemon beside the admin command):
        # each looks here once a second and drops what it holds of these
        # keys. An INSERT OR REPLACE fires the insert trigger; a touch
        # (which changes only the access time) fires nothing.
        """
        CREATE TABLE changes (
            seq INTEGER PRIMARY KEY AUTOINCREMENT,
            protocol TEXT NOT NULL,
            key TEXT NOT NULL,
            at REAL NOT NULL DEFAULT ((julianday('now') - 2440587.5) * 86400.0)
        )
        """,
        "CREATE INDEX changes_by_time ON changes (at)",
        """
        CREATE TRIGGER entries_inserted AFTER INSERT ON entries BEGIN
            INSERT INTO changes (protocol, key) VALUES (new.protocol, new.key);
        END
        """,
        """
        CREATE TRIGGER entries_deleted AFTER DELETE ON entries BEGIN
            INSERT INTO changes (protocol, key) VALUES (old.protocol, old.key);
        END
        """,
        """
        CREATE TRIGGER entries_changed AFTER UPDATE OF hash, size, attrs, created ON entries BEGIN
            INSERT INTO changes (protocol, key) VALUES (new.protocol, new.key);
        END
        """,
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
    #: How the store holds the blob (see L{contentcache.compress}).
    encoding: str = IDENTITY

    @property
    def blob(self) -> Blob:
        """
        What the store needs to read the blob.
        """
        return Blob(self.hash, self.size, self.encoding)


class IIndex(Interface):
    """
    The metadata index. Every method but L{touch} returns a Deferred and
    does its work off the reactor thread.
    """

    def get(protocol: str, key: str) -> Deferred[Entry | None]:
        """
        The entry for C{(protocol, key)}, or L{None}.
        """

    def put(protocol: str, key: str, blob: Blob, attrs: Mapping[str, Any]) -> Deferred[Entry]:
        """
        Create or replace the entry for C{(protocol, key)}, answered by
        C{blob} as the store reported it.
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
    protocol, key, hexhash, size, attrs, created, accessed, encoding = row
    return Entry(protocol, key, Hash.from_hex(hexhash), size, json.loads(attrs), created, accessed, encoding)


_COLUMNS = "protocol, key, hash, size, attrs, created, accessed"
#: How long the rows of L{Database.changes_since} are kept: a process that
#: has not looked for longer than this drops its whole hot set.
CHANGES_KEPT = 60.0
#: Changes read at once; more than this, and a hot set is dropped whole.
CHANGES_LIMIT = 10_000


@frozen
class Changes:
    """
    The keys whose entries changed after a position in the index's log of
    changes, and the position to look from next. C{keys} is L{None} when
    they cannot be told (too many, or some were pruned unseen): then
    everything held may be out of date.
    """

    keys: list[tuple[str, str]] | None
    position: int
#: Hashes per "IN (...)" query, well under SQLite's parameter limit.
_IN_CHUNK = 500


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

    def get(self, protocol: str, key: str) -> Entry | None:
        with self._lock:
            row = self._db.execute(
                "SELECT e.protocol, e.key, e.hash, e.size, e.attrs, e.created, e.accessed, "
                "coalesce(b.encoding, 'identity') FROM entries AS e "
                "LEFT JOIN blobs AS b ON b.hash = e.hash WHERE e.protocol = ? AND e.key = ?",
                (protocol, key),
            ).fetchone()
        return None if row is None else _row_to_entry(row)

    def put(
        self,
        protocol: str,
        key: str,
        blob: Blob,
        attrs: Mapping[str, Any],
        now: float,
    ) -> Entry:
        encoded = json.dumps(attrs, sort_keys=True, separators=(",", ":"))
        stored = blob.size if blob.stored is None else blob.stored
        with self._transaction() as db:
            db.execute(
                f"INSERT OR REPLACE INTO entries ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (protocol, key, blob.hash.hex, blob.size, encoded, now, now),
            )
            # What the store reports of a blob it has just written or found
            # wins over an older row (a worker with other settings may have
            # written it again since).
            db.execute(
                "INSERT INTO blobs (hash, size, created, encoding, stored) VALUES (?, ?, ?, ?, ?) "
                "ON CONFLICT (hash) DO UPDATE SET encoding = excluded.encoding, stored = excluded.stored "
                "WHERE ?",
                (blob.hash.hex, blob.size, now, blob.encoding, stored, blob.stored is not None),
            )
        return Entry(protocol, key, blob.hash, blob.size, json.loads(encoded), now, now, blob.encoding)

    def lookup(
        self, protocol: str, wanted: Sequence[tuple[str, Callable[[Entry], T] | None]]
    ) -> list[tuple[Entry, T | None] | None]:
        """
        The entries of C{protocol} for several keys, each with what its
        function (run on this same thread: reading a small blob) makes of
        it.
        """
        found: list[tuple[Entry, T | None] | None] = []
        for key, then in wanted:
            entry = self.get(protocol, key)
            found.append(None if entry is None else (entry, None if then is None else then(entry)))
        return found

    def changes_since(self, position: int | None) -> Changes:
        """
        The keys changed after C{position} (L{None}: only where the log is
        now).
        """
        with self._lock:
            if position is None:
                # The sequence, not the rows: they may all be pruned.
                row = self._db.execute("SELECT seq FROM sqlite_sequence WHERE name = 'changes'").fetchone()
                return Changes([], row[0] if row else 0)
            rows = self._db.execute(
                "SELECT seq, protocol, key FROM changes WHERE seq > ? ORDER BY seq LIMIT ?",
                (position, CHANGES_LIMIT + 1),
            ).fetchall()
            if not rows:
                return Changes([], position)
            if len(rows) > CHANGES_LIMIT or rows[0][0] > position + 1:
                # Too many to go through, or pruned before this process saw
                # them (AUTOINCREMENT leaves no gap of its own: a rolled
                # back insert gives its number back).
                (last,) = self._db.execute("SELECT max(seq) FROM changes").fetchone()
                return Changes(None, last)
        return Changes([(protocol, key) for _, protocol, key in rows], rows[-1][0])

    def prune_changes(self, before: float) -> int:
        """
        Forget the changes made before C{before}, oldest first by number
        (a clock set back cannot open a gap in the middle).
        """
        with self._transaction() as db:
            return db.execute(
                "DELETE FROM changes WHERE seq <= (SELECT max(seq) FROM changes WHERE at < ?)", (before,)
            ).rowcount

    @contextmanager
    def _transaction(self, immediate: bool = False) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE" if immediate else "BEGIN")
            try:
                yield self._db
                # A COMMIT that fails (the disk is full) leaves the
                # transaction open: it is rolled back like any other.
                self._db.execute("COMMIT")
            except BaseException:
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                raise

    # Expiry and the admin command.

    def stats(self) -> dict[str, Any]:
        with self._lock:
            per_protocol = dict(
                self._db.execute("SELECT protocol, count(*) FROM entries GROUP BY protocol").fetchall()
            )
            logical = self._db.execute("SELECT total(size) FROM entries").fetchone()[0]
            blobs, unique, stored = self._db.execute(
                "SELECT count(*), total(size), total(coalesce(stored, size)) FROM blobs"
            ).fetchone()
            compressed = self._db.execute(
                "SELECT count(*) FROM blobs WHERE encoding != 'identity'"
            ).fetchone()[0]
        return {
            "entries": per_protocol,
            "blobs": blobs,
            "compressed_blobs": compressed,
            "logical_bytes": int(logical),
            "unique_bytes": int(unique),
            "stored_bytes": int(stored),
        }

    def stored_bytes(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT total(coalesce(stored, size)) FROM blobs").fetchone()[0])

    def least_recently_used(self, limit: int, after: tuple[float, float, str, str] | None) -> list[tuple[Any, ...]]:
        """
        Up to C{limit} entries in LRU order (ties: older first), after the
        position C{after} (accessed, created, protocol, key).
        """
        with self._lock:
            if after is None:
                return self._db.execute(
                    "SELECT accessed, created, protocol, key, hash FROM entries "
                    "ORDER BY accessed, created, protocol, key LIMIT ?", (limit,)
                ).fetchall()
            return self._db.execute(
                "SELECT accessed, created, protocol, key, hash FROM entries "
                "WHERE (accessed, created, protocol, key) > (?, ?, ?, ?) "
                "ORDER BY accessed, created, protocol, key LIMIT ?", (*after, limit)
            ).fetchall()

    def evict(self, entries: list[tuple[str, str, str]]) -> list[tuple[str, int]]:
        """
        Remove the given (protocol, key, hash) entries, if they still point
        at that hash; return the blobs (hash, stored size) nothing references any
        more.
        """
        freed = []
        with self._transaction(immediate=True) as db:
            for protocol, key, hexhash in entries:
                db.execute("DELETE FROM entries WHERE protocol = ? AND key = ? AND hash = ?",
                           (protocol, key, hexhash))
            for hexhash in {h for _, _, h in entries}:
                if db.execute("SELECT 1 FROM entries WHERE hash = ? LIMIT 1", (hexhash,)).fetchone() is None:
                    row = db.execute("SELECT coalesce(stored, size) FROM blobs WHERE hash = ?", (hexhash,)).fetchone()
                    freed.append((hexhash, row[0] if row else 0))
        return freed

    def unreferenced_blobs(
        self, cutoff: float, limit: int, after: tuple[float, str] | None = None
    ) -> tuple[list[tuple[str, int]], tuple[float, str] | None]:
        """
        Look at up to C{limit} blobs that entered the store before
        C{cutoff}, in order of age, after the position C{after}; return the
        unreferenced ones and the position to go on from (L{None} at the
        end). Bounded, so the connection is never held for long.
        """
        start = after or (float("-inf"), "")
        with self._lock:
            rows = self._db.execute(
                "SELECT hash, coalesce(stored, size), created, NOT EXISTS "
                "(SELECT 1 FROM entries WHERE entries.hash = blobs.hash) FROM blobs "
                "WHERE created < ? AND (created, hash) > (?, ?) ORDER BY created, hash LIMIT ?",
                (cutoff, *start, limit),
            ).fetchall()
        position = (rows[-1][2], rows[-1][0]) if len(rows) == limit else None
        return [(h, size) for h, size, _, free in rows if free], position

    def forget_blobs(self, hashes: list[str]) -> list[str]:
        """
        Drop the rows of those blobs nothing references (checked in the same
        transaction); return which were dropped, for their files to go.
        """
        dropped = []
        with self._transaction(immediate=True) as db:
            for hexhash in hashes:
                cursor = db.execute(
                    "DELETE FROM blobs WHERE hash = ? AND NOT EXISTS "
                    "(SELECT 1 FROM entries WHERE entries.hash = ?)", (hexhash, hexhash)
                )
                if cursor.rowcount:
                    dropped.append(hexhash)
        return dropped

    def reference_counts(self, hashes: list[str]) -> dict[str, int]:
        counts: dict[str, int] = {}
        with self._lock:
            for i in range(0, len(hashes), _IN_CHUNK):
                chunk = hashes[i : i + _IN_CHUNK]
                counts.update(self._db.execute(
                    f"SELECT hash, count(*) FROM entries WHERE hash IN ({','.join('?' * len(chunk))}) "
                    "GROUP BY hash", chunk).fetchall())
        return counts

    def blob_rows_for(self, hashes: list[str]) -> dict[str, tuple[int, float]]:
        rows: dict[str, tuple[int, float]] = {}
        with self._lock:
            for i in range(0, len(hashes), _IN_CHUNK):
                chunk = hashes[i : i + _IN_CHUNK]
                for h, size, created in self._db.execute(
                    f"SELECT hash, coalesce(stored, size), created FROM blobs WHERE hash IN ({','.join('?' * len(chunk))})",
                    chunk,
                ):
                    rows[h] = (size, created)
        return rows

    def forget_blob(self, hexhash: str) -> bool:
        """
        Drop a blob's row if still nothing references it; whether it did.
        """
        with self._transaction(immediate=True) as db:
            cursor = db.execute(
                "DELETE FROM blobs WHERE hash = ? AND NOT EXISTS "
                "(SELECT 1 FROM entries WHERE entries.hash = ?)", (hexhash, hexhash)
            )
        return cursor.rowcount > 0

    def set_blob_storage(self, hexhash: str, encoding: str, stored: int) -> None:
        """
        Record how a blob is stored now (verify removed a damaged copy).
        """
        with self._transaction() as db:
            db.execute("UPDATE blobs SET encoding = ?, stored = ? WHERE hash = ?", (encoding, stored, hexhash))

    def blob_rows(self) -> dict[str, tuple[int, float]]:
        with self._lock:
            return {h: (size, created) for h, size, created in
                    self._db.execute("SELECT hash, coalesce(stored, size), created FROM blobs")}

    def referenced_hashes(self) -> set[str]:
        with self._lock:
            return {h for (h,) in self._db.execute("SELECT DISTINCT hash FROM entries")}

    def delete_entries_of(self, hexhash: str, now: float) -> int:
        with self._transaction() as db:
            cursor = db.execute("DELETE FROM entries WHERE hash = ?", (hexhash,))
            # Young again: a copy a concurrent miss is storing right now is
            # out of expiry's reach until its entry is recorded.
            db.execute("UPDATE blobs SET created = ? WHERE hash = ?", (now, hexhash))
        return cursor.rowcount

    def delete_where_hash(self, hexhash: str) -> int:
        with self._transaction(immediate=True) as db:
            cursor = db.execute("DELETE FROM entries WHERE hash = ?", (hexhash,))
            db.execute("DELETE FROM blobs WHERE hash = ?", (hexhash,))
        return cursor.rowcount

    def delete_prefixes(self, protocol: str, prefixes: list[str]) -> list[tuple[str, str]]:
        """
        Remove every entry of C{protocol} whose key starts with one of
        C{prefixes}; return (key, hash) of each.
        """
        removed = []
        with self._transaction(immediate=True) as db:
            for prefix in prefixes:
                rows = db.execute(
                    "SELECT key, hash FROM entries WHERE protocol = ? AND key >= ? AND key < ?",
                    (protocol, prefix, prefix + "\U0010ffff"),
                ).fetchall()
                db.executemany("DELETE FROM entries WHERE protocol = ? AND key = ?",
                               [(protocol, k) for k, _ in rows])
                removed += rows
        return removed

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
        with self._transaction() as db:
            cursor = db.executemany(
                "UPDATE entries SET accessed = max(accessed, ?) "
                "WHERE protocol = ? AND key = ?",
                [(when, protocol, key) for (protocol, key), when in accesses.items()],
            )
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
    #: Told when the index cannot grow because the disk is full.
    space: DiskSpace | None = None
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
        call = getattr(self._database, method)
        if method == "get":
            # The lookup every hit makes: it writes nothing (so needs no
            # full-disk guard) and is not worth a span of its own.
            return self._disk.run(call, *args)
        d = self._disk.run(call, *args) if self.space is None else self._disk.run(guarded, self.space, call, *args)
        return traced_call(f"index {method}", d)

    def get(self, protocol: str, key: str) -> Deferred[Entry | None]:
        return self._call("get", protocol, key)

    def lookup(
        self, protocol: str, wanted: Sequence[tuple[str, Callable[[Entry], T] | None]]
    ) -> Deferred[list[tuple[Entry, T | None] | None]]:
        """
        Several entries of C{protocol} in one trip to the disk pool, each
        with what its function (a blocking read of its blob, say) makes of
        it in that trip.
        """
        if self._database is None:
            return fail(RuntimeError("the index is not open"))
        return self._disk.run(self._database.lookup, protocol, wanted)

    def changes_since(self, position: int | None) -> Deferred[Changes]:
        """
        The keys whose entries changed (in any process) after C{position};
        L{None} for where the log of changes is now.
        """
        if self._database is None:
            return fail(RuntimeError("the index is not open"))
        return self._disk.run(self._database.changes_since, position)

    def put(self, protocol: str, key: str, blob: Blob, attrs: Mapping[str, Any]) -> Deferred[Entry]:
        self._pending.pop((protocol, key), None)
        return self._call("put", protocol, key, blob, attrs, self._clock.seconds())

    def delete(self, protocol: str, key: str) -> Deferred[bool]:
        self._pending.pop((protocol, key), None)
        return self._call("delete", protocol, key)

    def references(self, hash: Hash) -> Deferred[int]:
        return self._call("references", hash)

    def forget_entries(self, hash: Hash) -> Deferred[int]:
        """
        The blob C{hash} is gone from the store: remove every entry that
        points at it; fire with how many went. Its row stays for expiry
        (which deletes it once nothing references it), so a copy stored
        again meanwhile is never an orphan.
        """
        return self._call("delete_entries_of", hash.hex, self._clock.seconds())

    def keys(self, protocol: str, prefix: str, limit: int = 10_000) -> Deferred[list[str]]:
        return self._call("keys", protocol, prefix, limit)

    def touch(self, protocol: str, key: str) -> None:
        self._pending[protocol, key] = self._clock.seconds()
        if len(self._pending) >= self.flush_threshold:
            self.flush().addErrback(self._flush_failed)

    def _flush_failed(self, failure: Failure) -> None:
        if not failure.check(StorageFull):  # said already, once a minute
            self.log.failure("writing access times to the index failed", failure)

    def flush(self) -> Deferred[int]:
        batch, self._pending = self._pending, {}
        if not batch:
            return succeed(0)
        return self._call("touch", batch)

    def writable(self) -> Deferred[bool]:
        return self._call("writable")

    def call(self, method: str, *args: object) -> Deferred[Any]:
        """
        Run one of L{Database}'s expiry and maintenance queries on the disk
        pool (their names and arguments are L{Database}'s).
        """
        return self._call(method, *args)

    def close(self) -> Deferred[None]:
        d = self._call("close")
        self._database = None
        return d


@contextmanager
def startup_errors(directory: str) -> Iterator[None]:
    """
    An index that cannot be opened stops startup in one sentence.
    """
    try:
        yield
    except IndexTooNew as e:
        raise SystemExit(str(e)) from None
    except (OSError, sqlite3.Error) as e:
        raise SystemExit(f"Cannot open the index in {directory}: {e}.") from None


def prepare(directory: str) -> None:
    """
    Create or migrate the index in C{directory} and close it again (the
    supervisor of workers, before it starts them: one migration, and a
    sentence rather than N failing workers).
    """
    with startup_errors(directory):
        os.makedirs(directory, exist_ok=True)
        Database(os.path.join(directory, INDEX_FILENAME)).close()


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
        with startup_errors(self.index.directory):
            os.makedirs(self.index.directory, exist_ok=True)
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
