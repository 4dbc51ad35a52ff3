"""
The index in SQLite: one file in the state directory, in WAL mode, so
that the workers, the admin command and a second daemon by mistake can all
read and write it at once. Each thread has its own connection: a read
never waits behind a write, and writes wait on SQLite's own lock (the busy
timeout), not on one another's Python lock.

This module holds all of SQLite's SQL.
"""

from __future__ import annotations

import functools
import json
import os
import sqlite3
import threading
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Mapping, Sequence, TypeVar

from twisted.internet.interfaces import IReactorTime
from zope.interface import implementer

from ..hash import Hash
from ..pool import Runner
from ..space import DiskSpace
from ..store import Blob
from .interface import (
    CHANGES_LIMIT,
    BlobRow,
    Changes,
    Entry,
    IDatabase,
    IndexTooNew,
    IndexUnavailable,
    Removed,
    StoredBlob,
    StoreStats,
    TokenRow,
    Used,
)
from .pooled import DEFAULT_FLUSH_THRESHOLD, PooledIndex

T = TypeVar("T")

INDEX_FILENAME = "index.sqlite"
#: How long a writer waits for another process's write lock.
BUSY_TIMEOUT_MS = 10_000
#: Hashes per "IN (...)" query, well under SQLite's parameter limit.
_IN_CHUNK = 500

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
    5: [
        # The store's figures as counters kept by the writes themselves, so
        # that /metrics and stats never scan the tables. A put replaces an
        # entry with an UPSERT (an update, which these see); an INSERT OR
        # REPLACE of a version 4 worker still running deletes without
        # firing the delete trigger: the counters drift until verify
        # --repair counts again.
        """
        CREATE TABLE counters (
            name TEXT PRIMARY KEY,
            value INTEGER NOT NULL
        ) WITHOUT ROWID
        """,
        """
        INSERT INTO counters (name, value)
        SELECT 'entries:' || protocol, count(*) FROM entries GROUP BY protocol
        """,
        """
        INSERT INTO counters (name, value)
        SELECT 'logical_bytes', coalesce(sum(size), 0) FROM entries
        UNION ALL SELECT 'blobs', count(*) FROM blobs
        UNION ALL SELECT 'compressed_blobs', count(*) FROM blobs WHERE encoding != 'identity'
        UNION ALL SELECT 'unique_bytes', coalesce(sum(size), 0) FROM blobs
        UNION ALL SELECT 'stored_bytes', coalesce(sum(coalesce(stored, size)), 0) FROM blobs
        """,
        """
        CREATE TRIGGER count_entry_inserted AFTER INSERT ON entries BEGIN
            INSERT INTO counters (name, value) VALUES ('entries:' || new.protocol, 1), ('logical_bytes', new.size)
            ON CONFLICT (name) DO UPDATE SET value = value + excluded.value;
        END
        """,
        """
        CREATE TRIGGER count_entry_deleted AFTER DELETE ON entries BEGIN
            INSERT INTO counters (name, value) VALUES ('entries:' || old.protocol, -1), ('logical_bytes', -old.size)
            ON CONFLICT (name) DO UPDATE SET value = value + excluded.value;
        END
        """,
        """
        CREATE TRIGGER count_entry_resized AFTER UPDATE OF size ON entries BEGIN
            INSERT INTO counters (name, value) VALUES ('logical_bytes', new.size - old.size)
            ON CONFLICT (name) DO UPDATE SET value = value + excluded.value;
        END
        """,
        """
        CREATE TRIGGER count_blob_inserted AFTER INSERT ON blobs BEGIN
            INSERT INTO counters (name, value) VALUES
                ('blobs', 1), ('unique_bytes', new.size),
                ('stored_bytes', coalesce(new.stored, new.size)),
                ('compressed_blobs', new.encoding != 'identity')
            ON CONFLICT (name) DO UPDATE SET value = value + excluded.value;
        END
        """,
        """
        CREATE TRIGGER count_blob_deleted AFTER DELETE ON blobs BEGIN
            INSERT INTO counters (name, value) VALUES
                ('blobs', -1), ('unique_bytes', -old.size),
                ('stored_bytes', -coalesce(old.stored, old.size)),
                ('compressed_blobs', -(old.encoding != 'identity'))
            ON CONFLICT (name) DO UPDATE SET value = value + excluded.value;
        END
        """,
        """
        CREATE TRIGGER count_blob_changed AFTER UPDATE OF size, stored, encoding ON blobs BEGIN
            INSERT INTO counters (name, value) VALUES
                ('unique_bytes', new.size - old.size),
                ('stored_bytes', coalesce(new.stored, new.size) - coalesce(old.stored, old.size)),
                ('compressed_blobs', (new.encoding != 'identity') - (old.encoding != 'identity'))
            ON CONFLICT (name) DO UPDATE SET value = value + excluded.value;
        END
        """,
    ],
    6: [
        # Client tokens: a name and the digest of the token, never the token.
        """
        CREATE TABLE tokens (
            name TEXT PRIMARY KEY,
            digest TEXT NOT NULL UNIQUE,
            created REAL NOT NULL,
            last_used REAL
        ) WITHOUT ROWID
        """,
    ],
}
SCHEMA_VERSION = max(MIGRATIONS)

_COLUMNS = "protocol, key, hash, size, attrs, created, accessed"
_ENTRY = (
    "SELECT e.protocol, e.key, e.hash, e.size, e.attrs, e.created, e.accessed, "
    "coalesce(b.encoding, 'identity') FROM entries AS e LEFT JOIN blobs AS b ON b.hash = e.hash "
)


def _row_to_entry(row: tuple[Any, ...]) -> Entry:
    protocol, key, hexhash, size, attrs, created, accessed, encoding = row
    return Entry(protocol, key, Hash.from_hex(hexhash), size, json.loads(attrs), created, accessed, encoding)


def _chunks(items: Sequence[str]) -> Iterator[Sequence[str]]:
    for i in range(0, len(items), _IN_CHUNK):
        yield items[i : i + _IN_CHUNK]


def _placeholders(chunk: Sequence[object]) -> str:
    return ",".join("?" * len(chunk))


def _busy_is_unavailable(cls: type[T]) -> type[T]:
    """
    Every public method of C{cls}: SQLite's own errors (locked past the
    busy timeout, an I/O error) become L{IndexUnavailable}, one line and a
    503; a full disk stays itself, for the storage's full state.
    """
    from ..space import is_full

    def wrap(method: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(method)
        def call(self: Any, *args: Any, **kwargs: Any) -> Any:
            try:
                return method(self, *args, **kwargs)
            except sqlite3.OperationalError as e:
                if is_full(e):
                    raise
                raise IndexUnavailable(f"the index {self.path}: {e}") from None

        return call

    for name, value in list(vars(cls).items()):
        if callable(value) and not name.startswith("_"):
            setattr(cls, name, wrap(value))
    return cls


@implementer(IDatabase)
@_busy_is_unavailable
class SQLiteDatabase:
    """
    The index file, a connection per thread that uses it. Every method
    blocks: call it through the disk pool.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self._local = threading.local()
        self._all: list[sqlite3.Connection] = []
        self._all_lock = threading.Lock()
        self._closed = False
        self._migrate(self._connection())

    def _connection(self) -> sqlite3.Connection:
        if self._closed:
            raise IndexUnavailable("the index is closed")
        db: sqlite3.Connection | None = getattr(self._local, "db", None)
        if db is not None:
            return db
        db = sqlite3.connect(
            self.path, timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None, check_same_thread=False
        )
        try:
            db.execute("PRAGMA journal_mode=WAL")
            # In WAL mode NORMAL cannot corrupt the index; a power cut may
            # lose the last access-time batch, which costs nothing but LRU
            # precision.
            db.execute("PRAGMA synchronous=NORMAL")
        except BaseException:
            db.close()
            raise
        with self._all_lock:
            self._all.append(db)
        self._local.db = db
        return db

    def _migrate(self, db: sqlite3.Connection) -> None:
        (version,) = db.execute("PRAGMA user_version").fetchone()
        if version > SCHEMA_VERSION:
            self.close()
            raise IndexTooNew(
                f"The index {self.path} has schema version {version}, newer than "
                f"the {SCHEMA_VERSION} this contentcache understands: upgrade "
                f"contentcache or point --storage at another directory."
            )
        if version == SCHEMA_VERSION:
            return
        try:
            # IMMEDIATE takes the write lock before reading the version
            # again, so two processes starting at once migrate only once.
            with self._transaction() as db:
                (version,) = db.execute("PRAGMA user_version").fetchone()
                for step in range(version + 1, SCHEMA_VERSION + 1):
                    for statement in MIGRATIONS[step]:
                        db.execute(statement)
                db.execute(f"PRAGMA user_version = {SCHEMA_VERSION:d}")
        except BaseException:
            self.close()
            raise

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        """
        A write transaction that takes the write lock at once: one that
        read first and wrote later could fail to upgrade its lock at once
        (SQLITE_BUSY without waiting) beside another writer.
        """
        db = self._connection()
        db.execute("BEGIN IMMEDIATE")
        try:
            yield db
            # A COMMIT that fails (the disk is full) leaves the
            # transaction open: it is rolled back like any other.
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise

    # What hits and misses ask.

    def get(self, protocol: str, key: str) -> Entry | None:
        row = self._connection().execute(_ENTRY + "WHERE e.protocol = ? AND e.key = ?", (protocol, key)).fetchone()
        return None if row is None else _row_to_entry(row)

    def lookup(
        self, protocol: str, wanted: Sequence[tuple[str, Callable[[Entry], T] | None]]
    ) -> list[tuple[Entry, T | None] | None]:
        found: list[tuple[Entry, T | None] | None] = []
        for key, then in wanted:
            entry = self.get(protocol, key)
            found.append(None if entry is None else (entry, None if then is None else then(entry)))
        return found

    def put(self, protocol: str, key: str, blob: Blob, attrs: Mapping[str, Any], now: float) -> Entry:
        encoded = json.dumps(attrs, sort_keys=True, separators=(",", ":"))
        stored = blob.size if blob.stored is None else blob.stored
        with self._transaction() as db:
            # An UPSERT, not INSERT OR REPLACE: a replace deletes without
            # firing the delete triggers that keep the counters.
            db.execute(
                f"INSERT INTO entries ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?) "
                "ON CONFLICT (protocol, key) DO UPDATE SET hash = excluded.hash, size = excluded.size, "
                "attrs = excluded.attrs, created = excluded.created, accessed = excluded.accessed",
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

    def delete(self, protocol: str, key: str) -> bool:
        cursor = self._connection().execute("DELETE FROM entries WHERE protocol = ? AND key = ?", (protocol, key))
        return cursor.rowcount > 0

    def keys(self, protocol: str, prefix: str, limit: int) -> list[str]:
        # A range scan on the primary key: prefix <= key < prefix + U+10FFFF.
        rows = self._connection().execute(
            "SELECT key FROM entries WHERE protocol = ? AND key >= ? AND key < ? ORDER BY key LIMIT ?",
            (protocol, prefix, prefix + "\U0010ffff", limit),
        ).fetchall()
        return [key for (key,) in rows]

    def references(self, hexhash: str) -> int:
        (count,) = self._connection().execute("SELECT count(*) FROM entries WHERE hash = ?", (hexhash,)).fetchone()
        return int(count)

    def touch(self, accesses: Mapping[tuple[str, str], float]) -> int:
        with self._transaction() as db:
            cursor = db.executemany(
                "UPDATE entries SET accessed = ? WHERE protocol = ? AND key = ? AND accessed < ?",
                [(when, protocol, key, when) for (protocol, key), when in accesses.items()],
            )
        return cursor.rowcount

    # Blobs coming and going: the write lock orders a claim and a deletion.

    def claim_blob(self, hexhash: str, now: float) -> bool:
        cursor = self._connection().execute(
            "UPDATE blobs SET created = max(created, ?) WHERE hash = ?", (now, hexhash)
        )
        return cursor.rowcount > 0

    def delete_blob(self, hexhash: str, cutoff: float | None, remove: Callable[[], object]) -> bool:
        with self._transaction() as db:
            row = db.execute(
                "SELECT created FROM blobs WHERE hash = ? AND NOT EXISTS "
                "(SELECT 1 FROM entries WHERE entries.hash = ?)", (hexhash, hexhash)
            ).fetchone()
            if row is None or (cutoff is not None and row[0] >= cutoff):
                return False
            remove()
            db.execute("DELETE FROM blobs WHERE hash = ?", (hexhash,))
        return True

    def forget_entries_of(self, hexhash: str, now: float) -> int:
        with self._transaction() as db:
            cursor = db.execute("DELETE FROM entries WHERE hash = ?", (hexhash,))
            # Young again: a copy a concurrent miss is storing right now is
            # out of expiry's reach until its entry is recorded.
            db.execute("UPDATE blobs SET created = ? WHERE hash = ?", (now, hexhash))
        return cursor.rowcount

    def delete_where_hash(self, hexhash: str) -> int:
        with self._transaction() as db:
            cursor = db.execute("DELETE FROM entries WHERE hash = ?", (hexhash,))
            db.execute("DELETE FROM blobs WHERE hash = ?", (hexhash,))
        return cursor.rowcount

    def delete_prefixes(self, protocol: str, prefixes: Sequence[str]) -> list[Removed]:
        removed: list[Removed] = []
        with self._transaction() as db:
            for prefix in prefixes:
                rows = db.execute(
                    "SELECT key, hash FROM entries WHERE protocol = ? AND key >= ? AND key < ?",
                    (protocol, prefix, prefix + "\U0010ffff"),
                ).fetchall()
                db.executemany("DELETE FROM entries WHERE protocol = ? AND key = ?", [(protocol, k) for k, _ in rows])
                removed += [Removed(k, h) for k, h in rows]
        return removed

    def set_blob_storage(self, hexhash: str, encoding: str, stored: int) -> None:
        with self._transaction() as db:
            db.execute("UPDATE blobs SET encoding = ?, stored = ? WHERE hash = ?", (encoding, stored, hexhash))

    # Expiry, the scrub, metrics and the admin command.

    def stats(self) -> StoreStats:
        counters = dict(self._connection().execute("SELECT name, value FROM counters").fetchall())
        return StoreStats.from_counters(counters)

    def least_recently_used(self, limit: int, after: tuple[float, float, str, str] | None) -> list[Used]:
        db = self._connection()
        columns = "SELECT accessed, created, protocol, key, hash FROM entries "
        order = "ORDER BY accessed, created, protocol, key LIMIT ?"
        if after is None:
            rows = db.execute(columns + order, (limit,)).fetchall()
        else:
            rows = db.execute(columns + "WHERE (accessed, created, protocol, key) > (?, ?, ?, ?) " + order,
                              (*after, limit)).fetchall()
        return [Used(*row) for row in rows]

    def reference_counts(self, hexhashes: Sequence[str]) -> dict[str, int]:
        counts: dict[str, int] = {}
        db = self._connection()
        for chunk in _chunks(hexhashes):
            counts.update(db.execute(
                f"SELECT hash, count(*) FROM entries WHERE hash IN ({_placeholders(chunk)}) GROUP BY hash", chunk
            ).fetchall())
        return counts

    def blob_rows(self, hexhashes: Sequence[str]) -> dict[str, BlobRow]:
        rows: dict[str, BlobRow] = {}
        db = self._connection()
        for chunk in _chunks(hexhashes):
            for h, stored, created in db.execute(
                f"SELECT hash, coalesce(stored, size), created FROM blobs WHERE hash IN ({_placeholders(chunk)})",
                chunk,
            ):
                rows[h] = BlobRow(h, stored, created)
        return rows

    def evict(self, entries: Sequence[tuple[str, str, str]]) -> list[BlobRow]:
        freed: list[BlobRow] = []
        with self._transaction() as db:
            for protocol, key, hexhash in entries:
                db.execute("DELETE FROM entries WHERE protocol = ? AND key = ? AND hash = ?", (protocol, key, hexhash))
            for hexhash in {h for _, _, h in entries}:
                if db.execute("SELECT 1 FROM entries WHERE hash = ? LIMIT 1", (hexhash,)).fetchone() is None:
                    row = db.execute(
                        "SELECT coalesce(stored, size), created FROM blobs WHERE hash = ?", (hexhash,)
                    ).fetchone()
                    if row is not None:
                        freed.append(BlobRow(hexhash, row[0], row[1]))
        return freed

    def unreferenced_blobs(
        self, cutoff: float, limit: int, after: tuple[float, str] | None
    ) -> tuple[list[BlobRow], tuple[float, str] | None]:
        # Bounded, so that no connection is held for long.
        start = after or (float("-inf"), "")
        rows = self._connection().execute(
            "SELECT hash, coalesce(stored, size), created, NOT EXISTS "
            "(SELECT 1 FROM entries WHERE entries.hash = blobs.hash) FROM blobs "
            "WHERE created < ? AND (created, hash) > (?, ?) ORDER BY created, hash LIMIT ?",
            (cutoff, *start, limit),
        ).fetchall()
        position = (rows[-1][2], rows[-1][0]) if len(rows) == limit else None
        return [BlobRow(h, stored, created) for h, stored, created, free in rows if free], position

    def recount(self) -> StoreStats:
        with self._transaction() as db:
            db.execute("DELETE FROM counters")
            for statement in MIGRATIONS[5][1:3]:
                db.execute(statement)
        return self.stats()

    def referenced_hashes(self) -> set[str]:
        return {h for (h,) in self._connection().execute("SELECT DISTINCT hash FROM entries")}

    # Copying an index (migrate-index).

    def adopt_blob(self, blob: StoredBlob) -> bool:
        cursor = self._connection().execute(
            "INSERT INTO blobs (hash, size, created, encoding, stored) VALUES (?, ?, ?, ?, ?) "
            "ON CONFLICT (hash) DO NOTHING", (blob.hash, blob.size, blob.created, blob.encoding, blob.stored),
        )
        return cursor.rowcount > 0

    def create_token(self, name: str, digest: str, now: float) -> bool:
        cursor = self._connection().execute(
            "INSERT INTO tokens (name, digest, created) VALUES (?, ?, ?) ON CONFLICT (name) DO NOTHING",
            (name, digest, now),
        )
        return cursor.rowcount > 0

    def token_named_by(self, digest: str) -> str | None:
        row = self._connection().execute("SELECT name FROM tokens WHERE digest = ?", (digest,)).fetchone()
        return None if row is None else str(row[0])

    def tokens(self) -> list[TokenRow]:
        rows = self._connection().execute("SELECT name, created, last_used FROM tokens ORDER BY name").fetchall()
        return [TokenRow(*row) for row in rows]

    def revoke_token(self, name: str) -> bool:
        return self._connection().execute("DELETE FROM tokens WHERE name = ?", (name,)).rowcount > 0

    def tokens_used(self, uses: Mapping[str, float]) -> None:
        with self._transaction() as db:
            db.executemany("UPDATE tokens SET last_used = ? WHERE name = ? AND coalesce(last_used, 0) < ?",
                           [(when, name, when) for name, when in uses.items()])

    def empty(self) -> bool:
        db = self._connection()
        return not db.execute("SELECT 1 FROM entries LIMIT 1").fetchone() and not db.execute(
            "SELECT 1 FROM blobs LIMIT 1").fetchone()

    def entry_rows(self, after: tuple[str, str] | None, limit: int) -> list[Entry]:
        start = after or ("", "")
        rows = self._connection().execute(
            _ENTRY + "WHERE (e.protocol, e.key) > (?, ?) ORDER BY e.protocol, e.key LIMIT ?", (*start, limit)
        ).fetchall()
        return [_row_to_entry(row) for row in rows]

    def blob_records(self, after: str | None, limit: int) -> list[StoredBlob]:
        rows = self._connection().execute(
            "SELECT hash, size, created, encoding, stored FROM blobs WHERE hash > ? ORDER BY hash LIMIT ?",
            (after or "", limit),
        ).fetchall()
        return [StoredBlob(*row) for row in rows]

    def load(self, blobs: Sequence[StoredBlob], entries: Sequence[Entry]) -> None:
        with self._transaction() as db:
            db.executemany(
                "INSERT INTO blobs (hash, size, created, encoding, stored) VALUES (?, ?, ?, ?, ?)",
                [(b.hash, b.size, b.created, b.encoding, b.stored) for b in blobs],
            )
            db.executemany(
                f"INSERT INTO entries ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?)",
                [(e.protocol, e.key, e.hash.hex, e.size, json.dumps(e.attrs, sort_keys=True, separators=(",", ":")),
                  e.created, e.accessed) for e in entries],
            )

    # The log of changes the hot sets follow.

    def changes_since(self, position: int | None) -> Changes:
        db = self._connection()
        if position is None:
            # The sequence, not the rows: they may all be pruned.
            row = db.execute("SELECT seq FROM sqlite_sequence WHERE name = 'changes'").fetchone()
            return Changes([], row[0] if row else 0)
        # One read transaction: the rows and the highest number agree.
        db.execute("BEGIN")
        try:
            rows = db.execute(
                "SELECT seq, protocol, key FROM changes WHERE seq > ? ORDER BY seq LIMIT ?",
                (position, CHANGES_LIMIT + 1),
            ).fetchall()
            if not rows:
                # None left past it; but were there, pruned unseen?
                row = db.execute("SELECT seq FROM sqlite_sequence WHERE name = 'changes'").fetchone()
                last = row[0] if row else 0
                return Changes([], position) if last <= position else Changes(None, last)
            if len(rows) > CHANGES_LIMIT or rows[0][0] > position + 1:
                # Too many to go through, or pruned before this process saw
                # them (AUTOINCREMENT leaves no gap of its own: a rolled
                # back insert gives its number back).
                (last,) = db.execute("SELECT max(seq) FROM changes").fetchone()
                return Changes(None, last)
        finally:
            db.execute("COMMIT")
        return Changes([(protocol, key) for _, protocol, key in rows], rows[-1][0])

    def prune_changes(self, keep: float) -> int:
        # Oldest first by number: a clock set back cannot open a gap in the
        # middle.
        with self._transaction() as db:
            return db.execute(
                "DELETE FROM changes WHERE seq <= (SELECT max(seq) FROM changes "
                "WHERE at < (julianday('now') - 2440587.5) * 86400.0 - ?)", (keep,)
            ).rowcount

    def nodes(self) -> int | None:
        return None  # one machine's index

    def writable(self) -> bool:
        db = self._connection()
        db.execute("BEGIN IMMEDIATE")
        db.execute("ROLLBACK")
        return True

    def close(self) -> None:
        with self._all_lock:
            self._closed = True
            connections, self._all = self._all, []
        for db in connections:
            db.close()


class SQLiteIndex(PooledIndex):
    """
    The index in C{directory}/index.sqlite, every call on the disk pool.
    """

    def __init__(
        self,
        directory: str,
        disk: Runner,
        clock: IReactorTime,
        flush_threshold: int = DEFAULT_FLUSH_THRESHOLD,
        space: DiskSpace | None = None,
    ) -> None:
        path = os.path.join(directory, INDEX_FILENAME)

        def connect() -> SQLiteDatabase:
            os.makedirs(directory, exist_ok=True)
            return SQLiteDatabase(path)

        super().__init__(f"SQLite {path}", connect, disk, clock, flush_threshold, space)
        self.directory = directory


def prepare(directory: str) -> None:
    """
    Create or migrate the index in C{directory} and close it again (the
    supervisor of workers, before it starts them: one migration, and a
    sentence rather than N failing workers).
    """
    os.makedirs(directory, exist_ok=True)
    SQLiteDatabase(os.path.join(directory, INDEX_FILENAME)).close()
