"""
The index in PostgreSQL, shared by every node of one cache: psycopg 3 and
its connection pool, used from the daemon's own threads.

This module holds all of PostgreSQL's SQL. What several nodes need of it:

- a blob's row is locked (C{SELECT ... FOR UPDATE}) by the transaction
  that decides to delete it and removes its bytes, and by every put that
  reuses it (an upsert locks the row first), so a blob is never deleted
  while an entry references it or is about to;
- the log of changes the hot sets follow is ordered by transaction ID, and
  read only up to the oldest transaction still running
  (C{pg_snapshot_xmin}): a change that commits late is never skipped, as a
  sequence number could be;
- the store's figures are counters kept by triggers;
- migrations run once, under an advisory lock, however many nodes start
  together.

Passwords come from libpq's own places (C{PGPASSWORD}, C{~/.pgpass}, a
service file), never from the address.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from typing import Any, Callable, Mapping, Sequence, TypeVar

from twisted.internet.interfaces import IReactorTime
from zope.interface import implementer

from ..hash import Hash
from ..locks import ILockSpace, key_number
from ..pool import Runner
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

SCHEMES = ("postgresql://", "postgres://")
#: The advisory lock key migrations run under (any 64-bit number of ours).
MIGRATION_LOCK = 0x636F6E74656E7401
#: How long a call waits for a connection from the pool.
CONNECTION_TIMEOUT = 3.0
#: How long one attempt to connect may take (libpq's connect_timeout).
CONNECT_TIMEOUT = 2
#: After the server failed to answer: how long calls fail at once, rather
#: than each waiting for a connection that will not come.
DOWN_FOR = 1.0
#: Connections in a process's pool, at most (one per disk thread that may
#: call it): several workers on several nodes share the server's
#: max_connections (100 by default), and the pool closes idle ones.
MAX_CONNECTIONS = 8
#: How long a statement of the daemon's may run (the admin command's may
#: take as long as they take).
STATEMENT_TIMEOUT = 60.0

_ENTRY_COLUMNS = "protocol, key, hash, size, attrs, created, accessed"

#: Each schema version's statements. Never edit a released step: add the
#: next one. Text that is compared or ordered is in the "C" collation, so
#: that prefix ranges and key order are by code point whatever the
#: database's default.
MIGRATIONS: dict[int, list[str]] = {
    1: [
        """
        CREATE TABLE entries (
            protocol text COLLATE "C" NOT NULL,
            key text COLLATE "C" NOT NULL,
            hash text COLLATE "C" NOT NULL,
            size bigint NOT NULL,
            attrs text NOT NULL,
            created double precision NOT NULL,
            accessed double precision NOT NULL,
            PRIMARY KEY (protocol, key)
        )
        """,
        "CREATE INDEX entries_by_hash ON entries (hash)",
        "CREATE INDEX entries_by_lru ON entries (accessed, created)",
        """
        CREATE TABLE blobs (
            hash text COLLATE "C" PRIMARY KEY,
            size bigint NOT NULL,
            created double precision NOT NULL,
            encoding text NOT NULL DEFAULT 'identity',
            stored bigint
        )
        """,
        "CREATE INDEX blobs_by_created ON blobs (created, hash)",
        """
        CREATE TABLE changes (
            xid xid8 NOT NULL DEFAULT pg_current_xact_id(),
            protocol text NOT NULL,
            key text NOT NULL,
            at double precision NOT NULL DEFAULT extract(epoch FROM now())
        )
        """,
        "CREATE INDEX changes_by_xid ON changes (xid)",
        "CREATE INDEX changes_by_time ON changes (at)",
        # The highest transaction whose changes were pruned: a reader that
        # has not seen up to it cannot tell what changed.
        "CREATE TABLE changes_pruned (one integer PRIMARY KEY CHECK (one = 1), upto xid8 NOT NULL)",
        "INSERT INTO changes_pruned VALUES (1, '0')",
        """
        CREATE FUNCTION contentcache_entry_changed() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            IF TG_OP = 'DELETE' THEN
                INSERT INTO changes (protocol, key) VALUES (OLD.protocol, OLD.key);
            ELSIF TG_OP = 'INSERT' OR NEW.hash IS DISTINCT FROM OLD.hash OR NEW.size IS DISTINCT FROM OLD.size
                    OR NEW.attrs IS DISTINCT FROM OLD.attrs OR NEW.created IS DISTINCT FROM OLD.created THEN
                -- A touch (only the access time) changes nothing held.
                INSERT INTO changes (protocol, key) VALUES (NEW.protocol, NEW.key);
            END IF;
            RETURN NULL;
        END $$
        """,
        """
        CREATE TRIGGER entries_changed AFTER INSERT OR UPDATE OR DELETE ON entries
        FOR EACH ROW EXECUTE FUNCTION contentcache_entry_changed()
        """,
        # The counters, and what changed them since the leader last folded
        # it in: a write appends its deltas and locks no counter, so writers
        # on every node neither queue on one row nor deadlock on two.
        """
        CREATE TABLE counters (
            name text COLLATE "C" PRIMARY KEY,
            value bigint NOT NULL
        )
        """,
        "CREATE TABLE counter_deltas (name text COLLATE \"C\" NOT NULL, value bigint NOT NULL)",
        """
        CREATE FUNCTION contentcache_count(deltas text[], amounts bigint[]) RETURNS void LANGUAGE sql AS $$
            INSERT INTO counter_deltas (name, value) SELECT * FROM unnest(deltas, amounts)
        $$
        """,
        """
        CREATE FUNCTION contentcache_count_entry() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            IF TG_OP = 'INSERT' THEN
                PERFORM contentcache_count(ARRAY['entries:' || NEW.protocol, 'logical_bytes'], ARRAY[1, NEW.size]);
            ELSIF TG_OP = 'DELETE' THEN
                PERFORM contentcache_count(ARRAY['entries:' || OLD.protocol, 'logical_bytes'], ARRAY[-1, -OLD.size]);
            ELSIF NEW.size <> OLD.size THEN
                PERFORM contentcache_count(ARRAY['logical_bytes'], ARRAY[NEW.size - OLD.size]);
            END IF;
            RETURN NULL;
        END $$
        """,
        """
        CREATE TRIGGER entries_counted AFTER INSERT OR UPDATE OR DELETE ON entries
        FOR EACH ROW EXECUTE FUNCTION contentcache_count_entry()
        """,
        """
        CREATE FUNCTION contentcache_count_blob() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            IF TG_OP = 'INSERT' THEN
                PERFORM contentcache_count(
                    ARRAY['blobs', 'compressed_blobs', 'stored_bytes', 'unique_bytes'],
                    ARRAY[1, (NEW.encoding <> 'identity')::int, coalesce(NEW.stored, NEW.size), NEW.size]);
            ELSIF TG_OP = 'DELETE' THEN
                PERFORM contentcache_count(
                    ARRAY['blobs', 'compressed_blobs', 'stored_bytes', 'unique_bytes'],
                    ARRAY[-1, -(OLD.encoding <> 'identity')::int, -coalesce(OLD.stored, OLD.size), -OLD.size]);
            ELSIF NEW.size <> OLD.size OR NEW.stored IS DISTINCT FROM OLD.stored OR NEW.encoding <> OLD.encoding THEN
                PERFORM contentcache_count(
                    ARRAY['compressed_blobs', 'stored_bytes', 'unique_bytes'],
                    ARRAY[(NEW.encoding <> 'identity')::int - (OLD.encoding <> 'identity')::int,
                          coalesce(NEW.stored, NEW.size) - coalesce(OLD.stored, OLD.size), NEW.size - OLD.size]);
            END IF;
            RETURN NULL;
        END $$
        """,
        """
        CREATE TRIGGER blobs_counted AFTER INSERT OR UPDATE OR DELETE ON blobs
        FOR EACH ROW EXECUTE FUNCTION contentcache_count_blob()
        """,
    ],
    2: [
        # Client tokens: a name and the digest of the token, never the token.
        """
        CREATE TABLE tokens (
            name text COLLATE "C" PRIMARY KEY,
            digest text COLLATE "C" NOT NULL UNIQUE,
            created double precision NOT NULL,
            last_used double precision
        )
        """,
    ],
}
SCHEMA_VERSION = max(MIGRATIONS)

#: What verify --repair counts again from the tables.
_RECOUNT = [
    # No write counts meanwhile: they wait.
    "LOCK TABLE counters, counter_deltas IN EXCLUSIVE MODE",
    "DELETE FROM counter_deltas",
    "DELETE FROM counters",
    """
    INSERT INTO counters (name, value)
    SELECT 'entries:' || protocol, count(*) FROM entries GROUP BY protocol
    UNION ALL SELECT 'logical_bytes', coalesce(sum(size), 0) FROM entries
    UNION ALL SELECT 'blobs', count(*) FROM blobs
    UNION ALL SELECT 'compressed_blobs', count(*) FROM blobs WHERE encoding <> 'identity'
    UNION ALL SELECT 'unique_bytes', coalesce(sum(size), 0) FROM blobs
    UNION ALL SELECT 'stored_bytes', coalesce(sum(coalesce(stored, size)), 0) FROM blobs
    """,
]


def is_postgresql(address: str) -> bool:
    """
    Whether C{address} names a PostgreSQL database.
    """
    return address.startswith(SCHEMES)


def check_address(address: str) -> str:
    """
    C{address} if it is a PostgreSQL URL without a password; else
    L{ValueError} with one sentence (the password is not repeated).
    """
    from psycopg.conninfo import conninfo_to_dict

    if not is_postgresql(address):
        raise ValueError("--index takes postgresql://[user@]host[:port]/dbname")
    try:
        parts = conninfo_to_dict(address)
    except Exception:
        raise ValueError("--index is not a valid postgresql:// address") from None
    if "password" in parts or "sslpassword" in parts:
        raise ValueError(
            "--index must not hold a password: give it in PGPASSWORD, ~/.pgpass or a service file"
        )
    return address


def describe(address: str) -> str:
    """
    Where the database is, for log lines and /health.
    """
    from psycopg.conninfo import conninfo_to_dict

    parts = conninfo_to_dict(address)
    host = parts.get("host", "localhost")
    port = parts.get("port", "5432")
    user = f"{parts['user']}@" if "user" in parts else ""
    return f"PostgreSQL {user}{host}:{port}/{parts.get('dbname', '')}"


def connection_settings(address: str, name: str, statement_timeout: float | None = None) -> dict[str, Any]:
    """
    What every connection of ours asks for, beside C{address}'s own: a
    bounded wait to connect, and keepalives both ways, so that a node or
    a server that vanishes from the network is noticed within half a
    minute (the server then lets go of that node's advisory locks). With
    C{statement_timeout} (the daemon's), no statement runs longer.
    """
    from psycopg.conninfo import conninfo_to_dict

    server = ["-c tcp_keepalives_idle=10", "-c tcp_keepalives_interval=5", "-c tcp_keepalives_count=3"]
    if statement_timeout is not None:
        server.append(f"-c statement_timeout={int(statement_timeout * 1000)}")
    own = conninfo_to_dict(address).get("options")
    return {
        "autocommit": True,
        "connect_timeout": CONNECT_TIMEOUT,
        "application_name": name,
        "keepalives": 1,
        "keepalives_idle": 10,
        "keepalives_interval": 5,
        "keepalives_count": 3,
        "tcp_user_timeout": 30_000,
        "options": " ".join([*([str(own)] if own else []), *server]),
    }


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


def _entry(row: tuple[Any, ...]) -> Entry:
    protocol, key, hexhash, size, attrs, created, accessed, encoding = row
    return Entry(protocol, key, Hash.from_hex(hexhash), size, json.loads(attrs), created, accessed, encoding)


@implementer(IDatabase)
class PostgreSQLDatabase:
    """
    A pool of connections to the index's database. Every method blocks:
    call it through the disk pool.
    """

    def __init__(
        self, address: str, max_connections: int = MAX_CONNECTIONS, statement_timeout: float | None = None
    ) -> None:
        import psycopg
        from psycopg_pool import ConnectionPool

        self.address = check_address(address)
        self.description = describe(address)
        settings = self._settings = connection_settings(address, "contentcache", statement_timeout)
        # One connection first, for libpq's own reason when it fails (the
        # pool's is only that it timed out).
        try:
            psycopg.connect(address, **settings).close()
        except psycopg.Error as e:
            raise IndexUnavailable(f"Cannot use the index ({self.description}): {_one_line(e)}.") from None
        # The pool's own warnings are several lines each, per attempt: a
        # request that needs the index says it in one line instead.
        logging.getLogger("psycopg.pool").setLevel(logging.CRITICAL)
        self._down_until = 0.0
        self._down_lock = threading.Lock()
        self._pool = ConnectionPool(
            address,
            min_size=1,
            max_size=max(1, max_connections),
            kwargs=settings,
            open=False,
            timeout=CONNECTION_TIMEOUT,
            # Given up reconnecting after this: the next call asks again.
            reconnect_timeout=30.0,
            name="contentcache-index",
        )
        try:
            self._pool.open(wait=True, timeout=CONNECTION_TIMEOUT * 2)
        except Exception as e:
            self._pool.close()
            raise IndexUnavailable(f"Cannot reach the index ({self.description}): {_one_line(e)}.") from None
        try:
            self._migrate()
        except IndexUnavailable as e:
            self._pool.close()
            raise IndexUnavailable(f"Cannot set up the index ({self.description}): {e}.") from None
        except BaseException:
            self._pool.close()
            raise

    # Connections, and what a lost server does.

    def _unavailable(self, e: BaseException, down: bool) -> IndexUnavailable:
        if down:
            with self._down_lock:
                self._down_until = time.monotonic() + DOWN_FOR
        return IndexUnavailable(f"{self.description}: {_one_line(e)}")

    def _reachable(self) -> bool:
        import psycopg

        try:
            psycopg.connect(self.address, **self._settings).close()
        except psycopg.Error:
            return False
        return True

    def _call(self, work: Callable[[Any], T]) -> T:
        """
        C{work} with a connection of the pool; once more on another if the
        first one had died (a restarted server leaves every pooled
        connection broken), or if the server chose it to break a deadlock.
        The work is idempotent where it matters.

        Every database error becomes L{IndexUnavailable} (one line, a 503
        for a request). Only a server out of reach makes the calls of the
        next second fail at once, rather than each wait for a connection.
        """
        import psycopg
        from psycopg_pool import PoolTimeout

        for attempt in (1, 2):
            if time.monotonic() < self._down_until:
                raise IndexUnavailable(f"{self.description} did not answer a moment ago")
            broken = False
            try:
                with self._pool.connection() as conn:
                    try:
                        return work(conn)
                    except psycopg.errors.TransactionRollback:
                        if attempt == 1:
                            raise _Retry() from None
                        raise
                    except psycopg.OperationalError:
                        broken = conn.broken
                        if attempt == 1 and broken:
                            raise _Retry() from None
                        raise
            except _Retry:
                continue
            except PoolTimeout as e:
                # Every connection busy, or the server gone: one try of our
                # own tells which.
                raise self._unavailable(e, down=not self._reachable()) from None
            except psycopg.OperationalError as e:
                raise self._unavailable(e, down=broken) from None
            except psycopg.DatabaseError as e:
                raise self._unavailable(e, down=False) from None
        raise AssertionError("unreachable")

    def _query(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        def work(conn: Any) -> list[tuple[Any, ...]]:
            cursor = conn.execute(sql, params)
            return cursor.fetchall() if cursor.description is not None else []

        return self._call(work)

    def _count(self, sql: str, params: Sequence[Any] = ()) -> int:
        return int(self._call(lambda conn: conn.execute(sql, params).rowcount))

    def _transaction(self, work: Callable[[Any], T]) -> T:
        def run(conn: Any) -> T:
            with conn.transaction():
                return work(conn)

        return self._call(run)

    def _migrate(self) -> None:
        def migrate(conn: Any) -> None:
            with conn.transaction():
                conn.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK,))
                conn.execute("CREATE TABLE IF NOT EXISTS contentcache_schema (version integer NOT NULL)")
                row = conn.execute("SELECT version FROM contentcache_schema").fetchone()
                version = 0 if row is None else row[0]
                if version > SCHEMA_VERSION:
                    raise IndexTooNew(
                        f"The index {self.description} has schema version {version}, newer than the "
                        f"{SCHEMA_VERSION} this contentcache understands: upgrade contentcache."
                    )
                for step in range(version + 1, SCHEMA_VERSION + 1):
                    for statement in MIGRATIONS[step]:
                        conn.execute(statement)
                if row is None:
                    conn.execute("INSERT INTO contentcache_schema VALUES (%s)", (SCHEMA_VERSION,))
                elif version != SCHEMA_VERSION:
                    conn.execute("UPDATE contentcache_schema SET version = %s", (SCHEMA_VERSION,))

        self._call(migrate)

    # What hits and misses ask.

    _SELECT_ENTRY = (
        "SELECT e.protocol, e.key, e.hash, e.size, e.attrs, e.created, e.accessed, "
        "coalesce(b.encoding, 'identity') FROM entries AS e LEFT JOIN blobs AS b ON b.hash = e.hash "
        "WHERE e.protocol = %s AND e.key = %s"
    )

    def get(self, protocol: str, key: str) -> Entry | None:
        rows = self._query(self._SELECT_ENTRY, (protocol, key))
        return _entry(rows[0]) if rows else None

    def lookup(
        self, protocol: str, wanted: Sequence[tuple[str, Callable[[Entry], T] | None]]
    ) -> list[tuple[Entry, T | None] | None]:
        def work(conn: Any) -> list[Entry | None]:
            rows = [conn.execute(self._SELECT_ENTRY, (protocol, key)).fetchone() for key, _ in wanted]
            return [None if row is None else _entry(row) for row in rows]

        # The functions (reads of small blobs, from S3 perhaps) run with the
        # connection back in the pool.
        entries = self._call(work)
        return [
            None if entry is None else (entry, None if then is None else then(entry))
            for entry, (_, then) in zip(entries, wanted)
        ]

    def put(self, protocol: str, key: str, blob: Blob, attrs: Mapping[str, Any], now: float) -> Entry:
        encoded = json.dumps(attrs, sort_keys=True, separators=(",", ":"))
        stored = blob.size if blob.stored is None else blob.stored

        def work(conn: Any) -> None:
            # The blob's row first: the upsert locks it (even when it
            # changes nothing), so a deletion deciding on it waits, or has
            # finished and this inserts it again.
            conn.execute(
                "INSERT INTO blobs (hash, size, created, encoding, stored) VALUES (%s, %s, %s, %s, %s) "
                "ON CONFLICT (hash) DO UPDATE SET encoding = excluded.encoding, stored = excluded.stored "
                "WHERE %s",
                (blob.hash.hex, blob.size, now, blob.encoding, stored, blob.stored is not None),
            )
            conn.execute(
                f"INSERT INTO entries ({_ENTRY_COLUMNS}) VALUES (%s, %s, %s, %s, %s, %s, %s) "
                "ON CONFLICT (protocol, key) DO UPDATE SET hash = excluded.hash, size = excluded.size, "
                "attrs = excluded.attrs, created = excluded.created, accessed = excluded.accessed",
                (protocol, key, blob.hash.hex, blob.size, encoded, now, now),
            )

        self._transaction(work)
        return Entry(protocol, key, blob.hash, blob.size, json.loads(encoded), now, now, blob.encoding)

    def delete(self, protocol: str, key: str) -> bool:
        return self._count("DELETE FROM entries WHERE protocol = %s AND key = %s", (protocol, key)) > 0

    def keys(self, protocol: str, prefix: str, limit: int) -> list[str]:
        rows = self._query(
            "SELECT key FROM entries WHERE protocol = %s AND key >= %s AND key < %s ORDER BY key LIMIT %s",
            (protocol, prefix, prefix + "\U0010ffff", limit),
        )
        return [key for (key,) in rows]

    def references(self, hexhash: str) -> int:
        return int(self._query("SELECT count(*) FROM entries WHERE hash = %s", (hexhash,))[0][0])

    def touch(self, accesses: Mapping[tuple[str, str], float]) -> int:
        # One statement for the batch, in a stable order (two nodes
        # touching the same rows never wait on each other in a circle).
        items = sorted(accesses.items())
        return self._count(
            "UPDATE entries AS e SET accessed = greatest(e.accessed, t.at) "
            "FROM unnest(%s::text[], %s::text[], %s::float8[]) AS t(protocol, key, at) "
            "WHERE e.protocol = t.protocol AND e.key = t.key AND e.accessed < t.at",
            ([p for (p, _), _ in items], [k for (_, k), _ in items], [at for _, at in items]),
        )

    # Blobs coming and going: the blob's row lock orders a claim and a
    # deletion, on any node.

    def claim_blob(self, hexhash: str, now: float) -> bool:
        return self._count(
            "UPDATE blobs SET created = greatest(created, %s) WHERE hash = %s", (now, hexhash)
        ) > 0

    def delete_blob(self, hexhash: str, cutoff: float | None, remove: Callable[[], object]) -> bool:
        def work(conn: Any) -> bool:
            row = conn.execute("SELECT created FROM blobs WHERE hash = %s FOR UPDATE", (hexhash,)).fetchone()
            if row is None or (cutoff is not None and row[0] >= cutoff):
                return False
            if conn.execute("SELECT 1 FROM entries WHERE hash = %s LIMIT 1", (hexhash,)).fetchone() is not None:
                return False
            remove()
            conn.execute("DELETE FROM blobs WHERE hash = %s", (hexhash,))
            return True

        return self._transaction(work)

    def forget_entries_of(self, hexhash: str, now: float) -> int:
        def work(conn: Any) -> int:
            # Young again: a copy a concurrent miss is storing right now is
            # out of expiry's reach until its entry is recorded.
            conn.execute("UPDATE blobs SET created = %s WHERE hash = %s", (now, hexhash))
            return int(conn.execute("DELETE FROM entries WHERE hash = %s", (hexhash,)).rowcount)

        return self._transaction(work)

    def delete_where_hash(self, hexhash: str) -> int:
        def work(conn: Any) -> int:
            # The blob's row first, as a put takes them.
            conn.execute("DELETE FROM blobs WHERE hash = %s", (hexhash,))
            return int(conn.execute("DELETE FROM entries WHERE hash = %s", (hexhash,)).rowcount)

        return self._transaction(work)

    def delete_prefixes(self, protocol: str, prefixes: Sequence[str]) -> list[Removed]:
        def work(conn: Any) -> list[Removed]:
            removed: list[Removed] = []
            for prefix in prefixes:
                rows = conn.execute(
                    "DELETE FROM entries WHERE protocol = %s AND key >= %s AND key < %s RETURNING key, hash",
                    (protocol, prefix, prefix + "\U0010ffff"),
                ).fetchall()
                removed += [Removed(k, h) for k, h in rows]
            return removed

        return self._transaction(work)

    def set_blob_storage(self, hexhash: str, encoding: str, stored: int) -> None:
        self._count("UPDATE blobs SET encoding = %s, stored = %s WHERE hash = %s", (encoding, stored, hexhash))

    # Expiry, the scrub, metrics and the admin command.

    def stats(self) -> StoreStats:
        counters = {name: int(value) for name, value in self._query(
            "SELECT name, sum(value) FROM (SELECT name, value FROM counters "
            "UNION ALL SELECT name, value FROM counter_deltas) AS c GROUP BY name"
        )}
        return StoreStats.from_counters(counters)

    def recount(self) -> StoreStats:
        def work(conn: Any) -> None:
            for statement in _RECOUNT:
                conn.execute(statement)

        self._transaction(work)
        return self.stats()

    def least_recently_used(self, limit: int, after: tuple[float, float, str, str] | None) -> list[Used]:
        columns = "SELECT accessed, created, protocol, key, hash FROM entries "
        order = "ORDER BY accessed, created, protocol, key LIMIT %s"
        if after is None:
            rows = self._query(columns + order, (limit,))
        else:
            rows = self._query(
                columns + "WHERE (accessed, created, protocol, key) > (%s, %s, %s, %s) " + order, (*after, limit)
            )
        return [Used(*row) for row in rows]

    def reference_counts(self, hexhashes: Sequence[str]) -> dict[str, int]:
        rows = self._query(
            "SELECT hash, count(*) FROM entries WHERE hash = ANY(%s) GROUP BY hash", (list(hexhashes),)
        )
        return {h: int(n) for h, n in rows}

    def blob_rows(self, hexhashes: Sequence[str]) -> dict[str, BlobRow]:
        rows = self._query(
            "SELECT hash, coalesce(stored, size), created FROM blobs WHERE hash = ANY(%s)", (list(hexhashes),)
        )
        return {h: BlobRow(h, int(stored), created) for h, stored, created in rows}

    def evict(self, entries: Sequence[tuple[str, str, str]]) -> list[BlobRow]:
        def work(conn: Any) -> list[BlobRow]:
            # In key order, as touch takes them: two never wait in a circle.
            for protocol, key, hexhash in sorted(entries):
                conn.execute(
                    "DELETE FROM entries WHERE protocol = %s AND key = %s AND hash = %s", (protocol, key, hexhash)
                )
            rows = conn.execute(
                "SELECT b.hash, coalesce(b.stored, b.size), b.created FROM blobs AS b WHERE b.hash = ANY(%s) "
                "AND NOT EXISTS (SELECT 1 FROM entries AS e WHERE e.hash = b.hash)",
                (sorted({h for _, _, h in entries}),),
            ).fetchall()
            return [BlobRow(h, int(stored), created) for h, stored, created in rows]

        return self._transaction(work)

    def unreferenced_blobs(
        self, cutoff: float, limit: int, after: tuple[float, str] | None
    ) -> tuple[list[BlobRow], tuple[float, str] | None]:
        start = after or (float("-inf"), "")
        rows = self._query(
            "SELECT hash, coalesce(stored, size), created, NOT EXISTS "
            "(SELECT 1 FROM entries WHERE entries.hash = blobs.hash) FROM blobs "
            "WHERE created < %s AND (created, hash) > (%s, %s) ORDER BY created, hash LIMIT %s",
            (cutoff, *start, limit),
        )
        position = (rows[-1][2], rows[-1][0]) if len(rows) == limit else None
        return [BlobRow(h, int(stored), created) for h, stored, created, free in rows if free], position

    def referenced_hashes(self) -> set[str]:
        return {h for (h,) in self._query("SELECT DISTINCT hash FROM entries")}

    # Copying an index (migrate-index).

    def adopt_blob(self, blob: StoredBlob) -> bool:
        return self._count(
            "INSERT INTO blobs (hash, size, created, encoding, stored) VALUES (%s, %s, %s, %s, %s) "
            "ON CONFLICT (hash) DO NOTHING", (blob.hash, blob.size, blob.created, blob.encoding, blob.stored),
        ) > 0

    def create_token(self, name: str, digest: str, now: float) -> bool:
        return self._count(
            "INSERT INTO tokens (name, digest, created) VALUES (%s, %s, %s) ON CONFLICT (name) DO NOTHING",
            (name, digest, now),
        ) > 0

    def token_named_by(self, digest: str) -> str | None:
        rows = self._query("SELECT name FROM tokens WHERE digest = %s", (digest,))
        return str(rows[0][0]) if rows else None

    def tokens(self) -> list[TokenRow]:
        return [TokenRow(*row) for row in self._query("SELECT name, created, last_used FROM tokens ORDER BY name")]

    def revoke_token(self, name: str) -> bool:
        return self._count("DELETE FROM tokens WHERE name = %s", (name,)) > 0

    def tokens_used(self, uses: Mapping[str, float]) -> None:
        items = sorted(uses.items())
        self._count(
            "UPDATE tokens AS t SET last_used = u.at FROM unnest(%s::text[], %s::float8[]) AS u(name, at) "
            "WHERE t.name = u.name AND coalesce(t.last_used, 0) < u.at",
            ([n for n, _ in items], [at for _, at in items]),
        )

    def empty(self) -> bool:
        rows = self._query("SELECT EXISTS (SELECT 1 FROM entries) OR EXISTS (SELECT 1 FROM blobs)")
        return not rows[0][0]

    def entry_rows(self, after: tuple[str, str] | None, limit: int) -> list[Entry]:
        start = after or ("", "")
        rows = self._query(
            "SELECT e.protocol, e.key, e.hash, e.size, e.attrs, e.created, e.accessed, "
            "coalesce(b.encoding, 'identity') FROM entries AS e LEFT JOIN blobs AS b ON b.hash = e.hash "
            "WHERE (e.protocol, e.key) > (%s, %s) ORDER BY e.protocol, e.key LIMIT %s", (*start, limit)
        )
        return [_entry(row) for row in rows]

    def blob_records(self, after: str | None, limit: int) -> list[StoredBlob]:
        rows = self._query(
            "SELECT hash, size, created, encoding, stored FROM blobs WHERE hash > %s ORDER BY hash LIMIT %s",
            (after or "", limit),
        )
        return [StoredBlob(*row) for row in rows]

    def load(self, blobs: Sequence[StoredBlob], entries: Sequence[Entry]) -> None:
        def work(conn: Any) -> None:
            with conn.cursor() as cursor:
                cursor.executemany(
                    "INSERT INTO blobs (hash, size, created, encoding, stored) VALUES (%s, %s, %s, %s, %s)",
                    [(b.hash, b.size, b.created, b.encoding, b.stored) for b in blobs],
                )
                cursor.executemany(
                    f"INSERT INTO entries ({_ENTRY_COLUMNS}) VALUES (%s, %s, %s, %s, %s, %s, %s)",
                    [(e.protocol, e.key, e.hash.hex, e.size,
                      json.dumps(e.attrs, sort_keys=True, separators=(",", ":")), e.created, e.accessed)
                     for e in entries],
                )

        self._transaction(work)

    # The log of changes the hot sets follow, by transaction: read up to
    # the oldest transaction still running, whose changes may yet commit.

    def changes_since(self, position: int | None) -> Changes:
        def work(conn: Any) -> Changes:
            horizon, pruned = conn.execute(
                "SELECT pg_snapshot_xmin(pg_current_snapshot())::text::bigint, "
                "(SELECT upto::text::bigint FROM changes_pruned)"
            ).fetchone()
            if position is None:
                return Changes([], int(horizon))
            if pruned >= position or horizon < position:
                # Pruned unseen; or transaction numbers went back (the
                # database was restored elsewhere): anything may have changed.
                return Changes(None, int(horizon))
            rows = conn.execute(
                "SELECT protocol, key FROM changes WHERE xid >= %s::text::xid8 AND xid < %s::text::xid8 "
                "ORDER BY xid LIMIT %s",
                (str(position), str(horizon), CHANGES_LIMIT + 1),
            ).fetchall()
            if len(rows) > CHANGES_LIMIT:
                return Changes(None, int(horizon))
            return Changes([(protocol, key) for protocol, key in rows], max(int(horizon), position))

        return self._call(work)

    def prune_changes(self, keep: float) -> int:
        def work(conn: Any) -> int:
            # The counters' deltas, folded in (in name order: one folder at
            # a time, the leader, and nothing else locks counters).
            conn.execute(
                "WITH d AS (DELETE FROM counter_deltas RETURNING name, value) "
                "INSERT INTO counters (name, value) SELECT name, sum(value) FROM d GROUP BY name ORDER BY name "
                "ON CONFLICT (name) DO UPDATE SET value = counters.value + excluded.value"
            )
            # By the server's clock, and never what a reader may not have
            # seen yet: the changes of transactions at or past the oldest
            # one still running (a long transaction holds readers back, not
            # into dropping everything).
            row = conn.execute(
                "SELECT xid::text FROM changes WHERE at < extract(epoch FROM now())::float8 - %s::float8 "
                "AND xid < pg_snapshot_xmin(pg_current_snapshot()) ORDER BY xid DESC LIMIT 1", (keep,)
            ).fetchone()
            if row is None:
                return 0
            conn.execute("UPDATE changes_pruned SET upto = greatest(upto, %s::text::xid8)", (row[0],))
            return int(conn.execute("DELETE FROM changes WHERE xid <= %s::text::xid8", (row[0],)).rowcount)

        return self._transaction(work)

    def nodes(self) -> int | None:
        # Every process of every node holds one locks connection: the
        # machines they come from (a socket's, this one's).
        rows = self._query(
            "SELECT count(DISTINCT coalesce(host(client_addr), 'local')) FROM pg_stat_activity "
            "WHERE datname = current_database() AND application_name = 'contentcache-locks'"
        )
        return int(rows[0][0]) if rows else None

    def writable(self) -> bool:
        def work(conn: Any) -> bool:
            with conn.transaction():
                conn.execute("SELECT pg_current_xact_id()")
            return True

        return self._call(work)

    def close(self) -> None:
        self._pool.close()


class _Retry(Exception):
    """
    The connection had died: the call goes again on another.
    """


class PostgreSQLIndex(PooledIndex):
    """
    The index in the PostgreSQL database at C{address}, every call on the
    disk pool.
    """

    def __init__(
        self,
        address: str,
        disk: Runner,
        clock: IReactorTime,
        flush_threshold: int = DEFAULT_FLUSH_THRESHOLD,
        max_connections: int = MAX_CONNECTIONS,
        statement_timeout: float | None = None,
    ) -> None:
        check_address(address)
        super().__init__(
            describe(address), lambda: PostgreSQLDatabase(address, max_connections, statement_timeout),
            disk, clock, flush_threshold,
        )
        self.address = address


def prepare(address: str) -> None:
    """
    Connect and migrate once (the supervisor of workers, before it starts
    them), then close again.
    """
    PostgreSQLDatabase(address, 1).close()


@implementer(ILockSpace)
class AdvisoryLocks:
    """
    The cache's locks as PostgreSQL advisory locks, for every node that
    shares the index: session locks on one connection of this process's
    own (many locks, one connection; the server lets go of them all when
    the connection ends, as the kernel does for a dead process's file
    locks). Calls are short and one at a time on that connection.
    """

    def __init__(self, address: str) -> None:
        self.address = check_address(address)
        self.description = describe(address)
        self._lock = threading.Lock()
        self._conn: Any = None
        #: Which connection a token's lock lives on: a new connection
        #: holds none of the old one's.
        self._generation = 0

    def _connection(self) -> Any:
        import psycopg

        if self._conn is None or self._conn.closed or self._conn.broken:
            self._generation += 1
            self._conn = psycopg.connect(self.address, **connection_settings(self.address, "contentcache-locks"))
        return self._conn

    def _lost(self, e: BaseException) -> IndexUnavailable:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()
        return IndexUnavailable(f"{self.description}: {_one_line(e)}")

    def try_lock(self, name: str) -> tuple[int, int] | None:
        import psycopg

        # Advisory lock keys are signed 64-bit numbers.
        key = key_number(name) - (1 << 63)
        with self._lock:
            for attempt in (1, 2):
                try:
                    (taken,) = self._connection().execute("SELECT pg_try_advisory_lock(%s)", (key,)).fetchone()
                    return (self._generation, key) if taken else None
                except psycopg.OperationalError as e:
                    # Once more on a new connection: a restarted server
                    # leaves the old one dead (and its locks gone with it).
                    lost = self._lost(e)
                    if attempt == 2:
                        raise lost from None
        raise AssertionError("unreachable")

    def unlock(self, token: object) -> None:
        import psycopg

        assert isinstance(token, tuple)
        generation, key = token
        with self._lock:
            if generation != self._generation or self._conn is None:
                return  # its connection is gone, and the lock with it
            try:
                self._conn.execute("SELECT pg_advisory_unlock(%s)", (key,))
            except psycopg.OperationalError as e:
                raise self._lost(e) from None

    def held(self, token: object) -> bool:
        import psycopg

        assert isinstance(token, tuple)
        with self._lock:
            if token[0] != self._generation or self._conn is None:
                return False
            try:
                self._conn.execute("SELECT 1")
            except psycopg.OperationalError as e:
                self._lost(e)
                return False
            return True

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None
