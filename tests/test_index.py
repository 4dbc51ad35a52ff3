from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import threading
from typing import Any, Callable

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
from contentcache.pool import DiskPool, SynchronousRunner
from contentcache.store import Blob

from .conftest import resolve

A = Hash.of(b"a")
B = Hash.of(b"b")


class CountingRunner(SynchronousRunner):
    def __init__(self) -> None:
        self.calls: list[str] = []

    def run(self, f: Callable[..., Any], *args: object) -> Deferred[Any]:
        self.calls.append(f.__name__)
        return super().run(f, *args)


def test_put_get_delete(index: SQLiteIndex, clock: Clock) -> None:
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


def test_put_replaces(index: SQLiteIndex, clock: Clock) -> None:
    resolve(index.put("npm", "left-pad", Blob(A, 1), {"etag": "1"}))
    clock.advance(5)
    resolve(index.put("npm", "left-pad", Blob(B, 2), {"etag": "2"}))
    got = resolve(index.get("npm", "left-pad"))
    assert (got.hash, got.size, got.attrs, got.created) == (B, 2, {"etag": "2"}, 5)


def test_reference_counts(index: SQLiteIndex) -> None:
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


def test_access_never_moves_backwards(index: SQLiteIndex, clock: Clock) -> None:
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


def test_the_index_records_how_blobs_are_stored(index: SQLiteIndex) -> None:
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


def test_keys_by_prefix(index: SQLiteIndex) -> None:
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
