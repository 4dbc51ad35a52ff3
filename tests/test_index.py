from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import threading
import time
from typing import Any, Callable, Iterator

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock

from contentcache.index import sqlite as index_module
from contentcache.hash import Hash
from contentcache.index import (
    INDEX_FILENAME,
    SCHEMA_VERSION,
    IndexService,
    BlobRow,
    IndexTooNew,
    SQLiteIndex,
)
from contentcache.index import PooledIndex
from contentcache.index.postgresql import PostgreSQLIndex
from contentcache.pool import DiskPool, SynchronousRunner
from contentcache.store import Blob

from .conftest import resolve

A = Hash.of(b"a")
B = Hash.of(b"b")


@pytest.fixture(params=["sqlite", "postgresql"])
def any_index(request: pytest.FixtureRequest, storage: str, disk: SynchronousRunner, clock: Clock) -> Iterator[PooledIndex]:
    """
    The index on each engine: SQLite in the storage directory, and an
    empty database on the tests' own PostgreSQL.
    """
    idx: PooledIndex
    if request.param == "sqlite":
        idx = SQLiteIndex(storage, disk, clock)
    else:
        idx = PostgreSQLIndex(request.getfixturevalue("pg_dsn"), disk, clock)
    idx.open()
    yield idx
    resolve(idx.close())


class CountingRunner(SynchronousRunner):
    def __init__(self) -> None:
        self.calls: list[str] = []

    def run(self, f: Callable[..., Any], *args: object) -> Deferred[Any]:
        self.calls.append(f.__name__)
        return super().run(f, *args)


def test_put_get_delete(any_index: PooledIndex, clock: Clock) -> None:
    index = any_index
    clock.advance(1000.25)
    entry = resolve(index.put("go", "example.com/m/@v/v1.0.0.zip", Blob(A, 123), {"h1": "h1:xyz"}))
    assert entry.created == entry.accessed == 1000.25
    got = resolve(index.get("go", "example.com/m/@v/v1.0.0.zip"))
    assert got == entry
    assert got.hash == A and got.size == 123 and got.attrs == {"h1": "h1:xyz"}
    # Keys are per protocol.
    assert resolve(index.get("npm", "example.com/m/@v/v1.0.0.zip")) is None
    assert resolve(index.delete("go", "example.com/m/@v/v1.0.0.zip")) is True
    assert resolve(index.get("go", "example.com/m/@v/v1.0.0.zip")) is None
    assert resolve(index.delete("go", "example.com/m/@v/v1.0.0.zip")) is False


def test_put_replaces(any_index: PooledIndex, clock: Clock) -> None:
    index = any_index
    resolve(index.put("npm", "left-pad", Blob(A, 1), {"etag": "1"}))
    clock.advance(5)
    resolve(index.put("npm", "left-pad", Blob(B, 2), {"etag": "2"}))
    got = resolve(index.get("npm", "left-pad"))
    assert (got.hash, got.size, got.attrs, got.created) == (B, 2, {"etag": "2"}, 5)


def test_reference_counts(any_index: PooledIndex) -> None:
    index = any_index
    assert resolve(index.references(A)) == 0
    resolve(index.put("go", "one", Blob(A, 1), {}))
    resolve(index.put("npm", "two", Blob(A, 1), {}))
    resolve(index.put("npm", "three", Blob(B, 1), {}))
    assert resolve(index.references(A)) == 2
    assert resolve(index.references(B)) == 1
    resolve(index.delete("go", "one"))
    assert resolve(index.references(A)) == 1


def test_reference_count_uses_an_index(index: SQLiteIndex) -> None:
    db = sqlite3.connect(os.path.join(index.directory, INDEX_FILENAME))
    plan = db.execute(
        "EXPLAIN QUERY PLAN SELECT count(*) FROM entries WHERE hash = ?", (A.hex,)
    ).fetchall()
    db.close()
    assert "USING COVERING INDEX entries_by_hash" in " ".join(str(row) for row in plan)


def test_touches_are_batched(storage: str, clock: Clock) -> None:
    runner = CountingRunner()
    os.makedirs(storage)
    index = SQLiteIndex(storage, runner, clock)
    index.open()
    resolve(index.put("go", "k1", Blob(A, 1), {}))
    resolve(index.put("go", "k2", Blob(B, 1), {}))
    runner.calls.clear()

    for i in range(100):
        clock.advance(0.01)
        index.touch("go", "k1" if i % 2 else "k2")
    assert runner.calls == []  # no write per hit
    assert resolve(index.get("go", "k1")).accessed == 0

    assert resolve(index.flush()) == 2
    assert runner.calls.count("touch") == 1
    assert resolve(index.get("go", "k1")).accessed == pytest.approx(1.0)
    assert resolve(index.get("go", "k2")).accessed == pytest.approx(0.99)
    resolve(index.close())


def test_flush_early_past_threshold(storage: str, clock: Clock) -> None:
    runner = CountingRunner()
    os.makedirs(storage)
    index = SQLiteIndex(storage, runner, clock, flush_threshold=10)
    index.open()
    for i in range(25):
        index.touch("npm", f"p{i}")
    assert runner.calls.count("touch") == 2
    resolve(index.close())


def test_access_never_moves_backwards(any_index: PooledIndex, clock: Clock) -> None:
    index = any_index
    clock.advance(10)
    resolve(index.put("go", "k", Blob(A, 1), {}))
    index._pending[("go", "k")] = 5.0  # a stale access from before the put
    resolve(index.flush())
    assert resolve(index.get("go", "k")).accessed == 10


def test_service_flushes_on_timer_and_at_stop(storage: str, clock: Clock) -> None:
    os.makedirs(storage)
    service = IndexService(SQLiteIndex(storage, SynchronousRunner(), clock), clock, 5.0)
    service.startService()
    idx = service.index
    resolve(idx.put("go", "k", Blob(A, 1), {}))
    clock.advance(1)
    idx.touch("go", "k")
    clock.advance(4)  # the timer fires
    assert resolve(idx.get("go", "k")).accessed == 1
    clock.advance(0.5)
    idx.touch("go", "k")
    resolve(service.stopService())
    assert clock.getDelayedCalls() == []

    # A new daemon sees the access recorded just before shutdown.
    reopened = SQLiteIndex(storage, SynchronousRunner(), clock)
    reopened.open()
    assert resolve(reopened.get("go", "k")).accessed == 5.5
    resolve(reopened.close())


def test_wal_mode_and_schema_version(index: SQLiteIndex) -> None:
    db = sqlite3.connect(os.path.join(index.directory, INDEX_FILENAME))
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    db.close()


def test_second_process_reads_and_writes(index: SQLiteIndex) -> None:
    resolve(index.put("go", "ours", Blob(A, 1), {}))
    script = f"""
import sys
from twisted.internet.task import Clock
from contentcache.hash import Hash
from contentcache.index import SQLiteIndex
from contentcache.store import Blob
from contentcache.pool import SynchronousRunner
idx = SQLiteIndex({index.directory!r}, SynchronousRunner(), Clock())
idx.open()
results = []
idx.get("go", "ours").addCallback(results.append)
idx.put("npm", "theirs", Blob(Hash.of(b"b"), 7), {{"from": "admin"}}).addCallback(results.append)
idx.close()
print(results[0].hash.hex)
"""
    out = subprocess.run(
        [sys.executable, "-c", script], check=True, capture_output=True, text=True, timeout=30
    )
    assert out.stdout.strip() == A.hex
    theirs = resolve(index.get("npm", "theirs"))
    assert theirs.size == 7 and theirs.attrs == {"from": "admin"}


def test_older_index_is_migrated_in_place(
    index: SQLiteIndex, storage: str, clock: Clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    resolve(index.put("go", "k", Blob(A, 1), {"x": 1}))
    resolve(index.close())
    migrations = dict(index_module.MIGRATIONS)
    migrations[SCHEMA_VERSION + 1] = ["ALTER TABLE entries ADD COLUMN encoding TEXT"]
    monkeypatch.setattr(index_module, "MIGRATIONS", migrations)
    monkeypatch.setattr(index_module, "SCHEMA_VERSION", SCHEMA_VERSION + 1)

    newer = SQLiteIndex(storage, SynchronousRunner(), clock)
    newer.open()
    assert resolve(newer.get("go", "k")).attrs == {"x": 1}
    resolve(newer.close())
    db = sqlite3.connect(os.path.join(storage, INDEX_FILENAME))
    assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION + 1
    assert "encoding" in [row[1] for row in db.execute("PRAGMA table_info(entries)")]
    db.close()


def test_a_version_2_index_gains_encodings(storage: str, clock: Clock) -> None:
    # An index as the previous release left it: blobs without encodings.
    os.makedirs(storage)
    db = sqlite3.connect(os.path.join(storage, INDEX_FILENAME), isolation_level=None)
    for step in (1, 2):
        for statement in index_module.MIGRATIONS[step]:
            db.execute(statement)
    db.execute("INSERT INTO entries VALUES ('go', 'k', ?, 100, '{}', 1.0, 1.0)", (A.hex,))
    db.execute("INSERT INTO blobs VALUES (?, 100, 1.0)", (A.hex,))
    db.execute("PRAGMA user_version = 2")
    db.close()

    index = SQLiteIndex(storage, SynchronousRunner(), clock)
    index.open()
    entry = resolve(index.get("go", "k"))
    assert entry.blob == Blob(A, 100, "identity")
    assert resolve(index.stats()).stored_bytes == 100
    resolve(index.close())


def test_rows_a_previous_worker_writes_count_their_size(index: SQLiteIndex, clock: Clock) -> None:
    # A worker of version 2 still running beside a migrated index inserts
    # blobs without a stored size.
    resolve(index.put("go", "new", Blob(A, 10, "zstd", 4), {}))
    db = sqlite3.connect(os.path.join(index.directory, INDEX_FILENAME), isolation_level=None)
    db.execute("INSERT INTO entries VALUES ('go', 'old', ?, 100, '{}', 1.0, 1.0)", (B.hex,))
    db.execute("INSERT INTO blobs (hash, size, created) VALUES (?, 100, 1.0)", (B.hex,))
    db.close()
    assert resolve(index.stored_bytes()) == 104
    assert resolve(index.blob_rows([B.hex]))[B.hex] == BlobRow(B.hex, 100, 1.0)
    assert resolve(index.evict([("go", "old", B.hex)])) == [BlobRow(B.hex, 100, 1.0)]


def test_the_index_records_how_blobs_are_stored(any_index: PooledIndex) -> None:
    index = any_index
    resolve(index.put("npm", "packument", Blob(A, 1000, "zstd", 90), {}))
    entry = resolve(index.get("npm", "packument"))
    assert entry.encoding == "zstd" and entry.blob == Blob(A, 1000, "zstd")
    # Renewing an entry (a 304) knows nothing new of the blob: kept as is.
    resolve(index.put("npm", "packument", entry.blob, {"etag": "2"}))
    stats = resolve(index.stats())
    assert (stats.unique_bytes, stats.stored_bytes, stats.compressed_blobs) == (1000, 90, 1)
    # The store wrote it again otherwise (another worker's settings).
    resolve(index.put("npm", "other", Blob(A, 1000, "identity", 1000), {}))
    assert resolve(index.get("npm", "packument")).encoding == "identity"
    assert resolve(index.stats()).stored_bytes == 1000


def test_newer_index_is_refused(index: SQLiteIndex, storage: str, clock: Clock) -> None:
    resolve(index.close())
    db = sqlite3.connect(os.path.join(storage, INDEX_FILENAME))
    db.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    db.close()
    with pytest.raises(IndexTooNew, match="upgrade contentcache"):
        SQLiteIndex(storage, SynchronousRunner(), clock).open()

    service = IndexService(SQLiteIndex(storage, SynchronousRunner(), clock), clock)
    with pytest.raises(SystemExit) as e:
        service.startService()
    message = str(e.value)
    assert message.count(".") >= 1 and "\n" not in message
    assert f"schema version {SCHEMA_VERSION + 1}" in message


@pytest_twisted.ensureDeferred
async def test_calls_run_on_the_disk_pool(storage: str, monkeypatch: pytest.MonkeyPatch) -> None:
    threads: list[str] = []
    original = index_module.SQLiteDatabase.get

    def get(self: Any, protocol: str, key: str) -> Any:
        threads.append(threading.current_thread().name)
        return original(self, protocol, key)

    monkeypatch.setattr(index_module.SQLiteDatabase, "get", get)
    pool = DiskPool(reactor, 2)
    pool.startService()
    try:
        os.makedirs(storage)
        idx = SQLiteIndex(storage, pool, reactor)
        idx.open()
        await idx.put("go", "k", Blob(A, 1), {})
        assert (await idx.get("go", "k")).hash == A
        await idx.close()
    finally:
        pool.stopService()
    assert threads and all("contentcache-disk" in name for name in threads)
    assert threading.main_thread().name not in threads


def test_keys_by_prefix(any_index: PooledIndex) -> None:
    index = any_index
    for key in ["example.com/a/@v/v1.0.0.info", "example.com/a/@v/v1.1.0.zip",
                "example.com/a/@v/list", "example.com/ab/@v/v1.0.0.info", "example.com/a/@latest"]:
        resolve(index.put("go", key, Blob(A, 1), {}))
    resolve(index.put("npm", "example.com/a/@v/v9.0.0.info", Blob(A, 1), {}))
    assert resolve(index.keys("go", "example.com/a/@v/")) == [
        "example.com/a/@v/list",
        "example.com/a/@v/v1.0.0.info",
        "example.com/a/@v/v1.1.0.zip",
    ]
    assert resolve(index.keys("go", "example.com/a/@v/", 1)) == ["example.com/a/@v/list"]


@pytest_twisted.ensureDeferred
async def test_daemon_stop_writes_the_last_batch_through_the_pool(storage: str) -> None:
    from contentcache.lifecycle import SequentialServices

    os.makedirs(storage)
    top = SequentialServices()
    pool = DiskPool(reactor, 2)
    pool.setServiceParent(top)
    service = IndexService(SQLiteIndex(storage, pool, reactor), reactor)
    service.setServiceParent(top)
    top.startService()
    idx = service.index
    await idx.put("go", "k", Blob(A, 1), {})
    before = (await idx.get("go", "k")).accessed
    idx.touch("go", "k")
    await top.stopService()  # a MultiService would stop the pool first and hang here
    assert not any(t.is_alive() for t in pool.pool.threads)

    reopened = SQLiteIndex(storage, SynchronousRunner(), reactor)
    reopened.open()
    assert resolve(reopened.get("go", "k")).accessed > before
    resolve(reopened.close())


# What every engine must do alike (and what several nodes rely on).

C = Hash.of(b"c")


def test_statistics_are_counted_as_entries_and_blobs_change(any_index: PooledIndex) -> None:
    index = any_index
    resolve(index.put("go", "a", Blob(A, 100, "zstd", 40), {}))
    resolve(index.put("go", "b", Blob(A, 100, "zstd", 40), {}))  # the same blob again
    resolve(index.put("npm", "c", Blob(B, 10), {}))
    resolve(index.put("npm", "c", Blob(C, 30), {}))  # replaced: its old blob stays, unreferenced
    resolve(index.delete("go", "b"))
    stats = resolve(index.stats())
    assert dict(stats.entries) == {"go": 1, "npm": 1}
    assert (stats.logical_bytes, stats.blobs, stats.unique_bytes, stats.stored_bytes, stats.compressed_blobs) == (
        130, 3, 140, 80, 1)
    freed = resolve(index.evict([("go", "a", A.hex), ("npm", "c", C.hex)]))
    assert sorted(b.hash for b in freed) == sorted([A.hex, C.hex])
    for blob in [A, B, C]:
        assert resolve(index.delete_blob(blob.hex, None, lambda: None))
    assert resolve(index.stats()) == resolve(index.recount())
    assert resolve(index.stats()).blobs == 0 and resolve(index.stored_bytes()) == 0


def test_a_blob_goes_only_when_nothing_references_it_and_it_is_old(any_index: PooledIndex, clock: Clock) -> None:
    index = any_index
    removed: list[str] = []
    clock.advance(100)
    resolve(index.put("go", "a", Blob(A, 1), {}))
    assert not resolve(index.delete_blob(A.hex, None, lambda: removed.append("a")))  # referenced
    resolve(index.delete("go", "a"))
    assert not resolve(index.delete_blob(A.hex, 50.0, lambda: removed.append("a")))  # too young
    clock.advance(100)
    assert resolve(index.claim_blob(A))  # about to be used again: young now
    assert not resolve(index.delete_blob(A.hex, 150.0, lambda: removed.append("a")))
    assert resolve(index.delete_blob(A.hex, 250.0, lambda: removed.append("a")))
    assert removed == ["a"]
    assert not resolve(index.claim_blob(A))  # gone: the claimant stores it again
    assert resolve(index.blob_rows([A.hex])) == {}


def test_a_failed_removal_keeps_the_blobs_row(any_index: PooledIndex) -> None:
    index = any_index
    resolve(index.put("go", "a", Blob(A, 1), {}))
    resolve(index.delete("go", "a"))

    def fail() -> None:
        raise OSError("the disk said no")

    with pytest.raises(OSError):
        resolve(index.delete_blob(A.hex, None, fail))
    assert A.hex in resolve(index.blob_rows([A.hex]))


def test_a_claim_waits_for_a_deletion_under_way(any_index: PooledIndex) -> None:
    # The race several workers or nodes run: expiry has decided a blob goes
    # and is removing its bytes while a miss finds the same blob in the
    # store. The claim must wait, then learn the blob is gone (so the miss
    # stores it again), never go first and then lose its bytes.
    index = any_index
    resolve(index.put("go", "a", Blob(A, 1), {}))
    resolve(index.delete("go", "a"))
    db = index.database
    removing, release = threading.Event(), threading.Event()
    claimed: list[bool] = []

    def remove() -> None:
        removing.set()
        assert release.wait(10)

    deleter = threading.Thread(target=db.delete_blob, args=(A.hex, None, remove))
    deleter.start()
    try:
        assert removing.wait(10)
        claimant = threading.Thread(target=lambda: claimed.append(db.claim_blob(A.hex, 1e9)))
        claimant.start()
        claimant.join(0.5)
        assert claimed == []  # waiting on the deletion
        # Reads do not wait behind it.
        reader: list[Any] = []
        threading.Thread(target=lambda: reader.append(db.get("go", "a"))).start()
        deadline = time.monotonic() + 5
        while not reader and time.monotonic() < deadline:
            time.sleep(0.01)
        assert reader == [None]
    finally:
        release.set()
        deleter.join(10)
    claimant.join(10)
    assert claimed == [False]


def test_the_log_of_changes_follows_every_write_but_a_touch(any_index: PooledIndex) -> None:
    db = any_index.database
    start = db.changes_since(None)
    assert start.keys == []
    blob = Blob(A, 1)
    db.put("go", "a", blob, {}, 1.0)
    db.put("go", "a", blob, {"etag": "2"}, 2.0)  # replaced
    db.touch({("go", "a"): 3.0})  # an access changes nothing held
    db.put("npm", "b", blob, {}, 1.0)
    db.delete("npm", "b")
    changes = db.changes_since(start.position)
    assert changes.keys == [("go", "a"), ("go", "a"), ("npm", "b"), ("npm", "b")]
    assert db.changes_since(changes.position).keys == []
    db.delete_prefixes("go", ["a"])
    assert db.changes_since(changes.position).keys == [("go", "a")]


def test_changes_pruned_unseen_mean_everything_may_have_changed(any_index: PooledIndex) -> None:
    db = any_index.database
    db.put("go", "a", Blob(A, 1), {}, 1.0)
    seen = db.changes_since(None)
    db.put("go", "b", Blob(A, 1), {}, 1.0)
    db.prune_changes(keep=float("-inf"))  # b unseen
    assert db.changes_since(seen.position).keys is None  # even with nothing newer left
    db.put("go", "c", Blob(A, 1), {}, 1.0)
    changes = db.changes_since(seen.position)
    assert changes.keys is None
    assert db.changes_since(changes.position).keys == []
    # A process starting now starts where the log is, even when pruned empty.
    db.prune_changes(keep=float("-inf"))
    fresh = db.changes_since(None)
    db.put("go", "d", Blob(A, 1), {}, 1.0)
    assert db.changes_since(fresh.position).keys == [("go", "d")]


def test_purging_by_prefix_and_walking_unreferenced_blobs(any_index: PooledIndex, clock: Clock) -> None:
    index = any_index
    for i, key in enumerate(["m/@v/v1.0.0.zip", "m/@v/v1.0.0.mod", "m/@v/list", "mx/@v/list"]):
        clock.advance(1)
        resolve(index.put("go", key, Blob(Hash.of(key.encode()), 10 + i), {}))
    removed = resolve(index.delete_prefixes("go", ["m/@v/"]))
    assert sorted(r.key for r in removed) == ["m/@v/list", "m/@v/v1.0.0.mod", "m/@v/v1.0.0.zip"]
    assert resolve(index.keys("go", "")) == ["mx/@v/list"]
    found: list[str] = []
    position = None
    while True:
        blobs, position = resolve(index.unreferenced_blobs(1e9, 2, position))
        found += [b.hash for b in blobs]
        if position is None:
            break
    assert sorted(found) == sorted(r.hash for r in removed)
    assert set(resolve(index.reference_counts([r.hash for r in removed] + [Hash.of(b"mx/@v/list").hex]))) == {
        Hash.of(b"mx/@v/list").hex}


def test_least_recently_used_walks_in_order(any_index: PooledIndex, clock: Clock) -> None:
    index = any_index
    for key in ["c", "a", "b"]:
        clock.advance(1)
        resolve(index.put("go", key, Blob(A, 1), {}))
    index.database.touch({("go", "c"): 100.0})
    first = resolve(index.least_recently_used(2, None))
    assert [u.key for u in first] == ["a", "b"]
    assert [u.key for u in resolve(index.least_recently_used(2, first[-1].position))] == ["c"]


# PostgreSQL's own.

def test_a_password_in_the_address_is_refused() -> None:
    from contentcache.index.postgresql import check_address

    with pytest.raises(ValueError) as e:
        check_address("postgresql://ci:hunter2@db.example/cache")
    assert "hunter2" not in str(e.value) and "PGPASSWORD" in str(e.value)
    with pytest.raises(ValueError):
        check_address("postgresql://db.example/cache?password=hunter2")
    assert check_address("postgresql://ci@db.example:5433/cache")


def test_several_nodes_starting_together_migrate_once(pg_dsn: str) -> None:
    from contentcache.index.postgresql import SCHEMA_VERSION as PG_SCHEMA, PostgreSQLDatabase

    errors: list[BaseException] = []
    opened: list[Any] = []

    def start() -> None:
        try:
            opened.append(PostgreSQLDatabase(pg_dsn, 1))
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=start) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert errors == [] and len(opened) == 4
    for db in opened:
        db.close()
    import psycopg

    with psycopg.connect(pg_dsn) as conn:
        assert conn.execute("SELECT version FROM contentcache_schema").fetchall() == [(PG_SCHEMA,)]


def test_a_lost_database_fails_in_one_line_and_comes_back(postgresql: Any, pg_dsn: str, clock: Clock) -> None:
    from contentcache.index import IndexUnavailable

    index = PostgreSQLIndex(pg_dsn, SynchronousRunner(), clock)
    index.open()
    try:
        resolve(index.put("go", "a", Blob(A, 1), {}))
        postgresql.stop()
        started = time.monotonic()
        with pytest.raises(IndexUnavailable) as e:
            resolve(index.get("go", "a"))
        assert "\n" not in str(e.value) and "PostgreSQL" in str(e.value)
        assert time.monotonic() - started < 10
        # Once it said so, calls fail at once for a moment rather than wait.
        started = time.monotonic()
        with pytest.raises(IndexUnavailable):
            resolve(index.writable())
        assert time.monotonic() - started < 0.5
        postgresql.start()
        deadline = time.monotonic() + 15
        while True:
            try:
                entry = resolve(index.get("go", "a"))
                break
            except IndexUnavailable:
                assert time.monotonic() < deadline, "the pool never reconnected"
                time.sleep(0.2)
        assert entry is not None and entry.hash == A
    finally:
        postgresql.start()
        resolve(index.close())


def test_advisory_locks_exclude_across_processes_and_go_with_their_connection(pg_dsn: str) -> None:
    import psycopg

    from contentcache.index.postgresql import AdvisoryLocks
    from contentcache.locks import LEADER

    ours, theirs = AdvisoryLocks(pg_dsn), AdvisoryLocks(pg_dsn)
    try:
        token = ours.try_lock(LEADER)
        assert token is not None and ours.held(token)
        assert theirs.try_lock(LEADER) is None
        key = theirs.try_lock("go\0example.com/m/@v/v1.0.0.zip")
        assert key is not None and ours.try_lock("go\0example.com/m/@v/v1.0.0.zip") is None
        theirs.unlock(key)
        assert ours.try_lock("go\0example.com/m/@v/v1.0.0.zip") is not None
        # The server ends our connection (a node that vanished, as the
        # keepalives find it): the lock is gone, and we know it.
        with psycopg.connect(pg_dsn, autocommit=True) as admin:
            admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                          "WHERE application_name = 'contentcache-locks' AND pid <> pg_backend_pid() "
                          "AND pid = (SELECT pid FROM pg_locks WHERE locktype = 'advisory' LIMIT 1)")
        deadline = time.monotonic() + 5
        while theirs.try_lock(LEADER) is None:
            assert time.monotonic() < deadline, "the leader lock outlived its connection"
            time.sleep(0.1)
        assert not ours.held(token)
        assert ours.try_lock(LEADER) is None  # a new connection, and the other leads now
    finally:
        ours.close()
        theirs.close()


def test_a_sqlite_index_locked_too_long_is_unavailable_not_an_error(
    storage: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from contentcache.index import IndexUnavailable

    monkeypatch.setattr(index_module, "BUSY_TIMEOUT_MS", 100)
    os.makedirs(storage)
    db = index_module.SQLiteDatabase(os.path.join(storage, INDEX_FILENAME))
    other = sqlite3.connect(os.path.join(storage, INDEX_FILENAME), isolation_level=None)
    try:
        other.execute("BEGIN IMMEDIATE")  # another process holds the write lock
        with pytest.raises(IndexUnavailable, match="database is locked"):
            db.put("go", "k", Blob(A, 1), {}, 1.0)
        assert db.get("go", "k") is None  # reads go on
        other.execute("ROLLBACK")
        db.put("go", "k", Blob(A, 1), {}, 1.0)
    finally:
        other.close()
        db.close()


def test_nodes_are_the_machines_whose_processes_hold_lock_connections(pg_dsn: str, storage: str) -> None:
    from contentcache.index.postgresql import AdvisoryLocks, PostgreSQLDatabase
    from contentcache.locks import LEADER

    os.makedirs(storage)
    assert index_module.SQLiteDatabase(os.path.join(storage, INDEX_FILENAME)).nodes() is None
    db = PostgreSQLDatabase(pg_dsn, 1)
    workers = [AdvisoryLocks(pg_dsn), AdvisoryLocks(pg_dsn)]
    try:
        assert db.nodes() == 0
        for locks in workers:  # two workers of one machine's daemon
            locks.try_lock(LEADER)
        assert db.nodes() == 1
    finally:
        for locks in workers:
            locks.close()
        db.close()
