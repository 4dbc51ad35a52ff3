"""
Expiry with a fake clock: TTL, LRU under a size limit, shared blobs,
the grace period, and failures that must not stop the timer.
"""

from __future__ import annotations

import os
import sqlite3
from typing import Any

import pytest
from twisted.internet.task import Clock

from contentcache.index import sqlite as index_module
from contentcache.backend.filesystem import FilesystemBackend
from contentcache.expiry import Expiry, ExpiryService, Policy
from contentcache.hash import Hash
from contentcache.index import INDEX_FILENAME, BlobRow, SQLiteIndex
from contentcache.pool import SynchronousRunner
from contentcache.space import DiskSpace, MinFree, Room
from contentcache.store import Blob, Store

from .conftest import resolve


def add(index: SQLiteIndex, store: Store, key: str, content: bytes, protocol: str = "go") -> Hash:
    h = resolve(store.put([content])).hash
    resolve(index.put(protocol, key, Blob(h, len(content)), {}))
    return h


def keys(index: SQLiteIndex) -> list[str]:
    return sorted(resolve(index.keys("go", "")) + resolve(index.keys("npm", "")))


def run(index: SQLiteIndex, store: Store, clock: Clock, dry_run: bool = False, **policy: Any) -> Any:
    policy.setdefault("grace", 0)
    return resolve(Expiry(index, store, clock, Policy(**policy)).run(dry_run=dry_run))


def test_ttl_boundary(index: SQLiteIndex, store: Store, clock: Clock) -> None:
    clock.advance(1000)
    h = add(index, store, "a", b"a" * 10)
    clock.advance(99.9)
    report = run(index, store, clock, ttl=100)
    assert report.expired == 0 and keys(index) == ["a"] and resolve(store.has(h))
    clock.advance(0.2)
    report = run(index, store, clock, ttl=100)
    assert report.expired == 1 and keys(index) == []
    assert not resolve(store.has(h))
    assert report.blobs_deleted == 1 and report.bytes_freed == 10


def test_use_renews_the_ttl(index: SQLiteIndex, store: Store, clock: Clock) -> None:
    add(index, store, "a", b"a")
    clock.advance(90)
    index.touch("go", "a")
    resolve(index.flush())
    clock.advance(90)
    assert run(index, store, clock, ttl=100).expired == 0
    assert keys(index) == ["a"]


def test_lru_order_under_max_size(index: SQLiteIndex, store: Store, clock: Clock) -> None:
    for i, key in enumerate(["e1", "e2", "e3", "e4", "e5"]):
        clock.advance(1)
        add(index, store, key, bytes([i]) * 100)
    # Use them in another order: e3 is now the least recently used.
    for key in ["e4", "e1", "e5", "e2"]:
        clock.advance(1)
        index.touch("go", key)
    resolve(index.flush())
    report = run(index, store, clock, ttl=None, max_size=350)
    # 500 bytes > 350: evict down to 90% (315): e3, then e4.
    assert report.evicted == 2 and report.stored_before == 500 and report.stored_after == 300
    assert keys(index) == ["e1", "e2", "e5"]


def test_ties_in_last_access_break_by_age(index: SQLiteIndex, store: Store, clock: Clock) -> None:
    add(index, store, "older", b"o" * 100)
    clock.advance(1)
    add(index, store, "newer", b"n" * 100)
    index.database.touch({("go", "older"): 50.0, ("go", "newer"): 50.0})
    run(index, store, clock, ttl=None, max_size=150)
    assert keys(index) == ["newer"]


def test_shared_blob_goes_with_its_last_entry(index: SQLiteIndex, store: Store, clock: Clock) -> None:
    shared = add(index, store, "first", b"same bytes")
    clock.advance(100)
    assert add(index, store, "second", b"same bytes", protocol="npm") == shared
    clock.advance(100)
    report = run(index, store, clock, ttl=150)  # "first" is 200 s old, "second" 100 s
    assert keys(index) == ["second"]
    assert resolve(store.has(shared)) and report.blobs_deleted == 0
    clock.advance(100)
    report = run(index, store, clock, ttl=150)
    assert keys(index) == []
    assert not resolve(store.has(shared)) and report.blobs_deleted == 1


def test_eviction_counts_a_shared_blob_once(index: SQLiteIndex, store: Store, clock: Clock) -> None:
    shared = add(index, store, "first", b"s" * 100)
    clock.advance(1)
    add(index, store, "second", b"s" * 100, protocol="npm")
    clock.advance(1)
    add(index, store, "other", b"x" * 100)
    # 200 bytes on disk, limit 150 (down to 135): evicting "first" frees
    # nothing while "second" holds the blob, so both go, "other" stays.
    report = run(index, store, clock, ttl=None, max_size=150)
    assert keys(index) == ["other"] and report.evicted == 2 and report.stored_after == 100
    assert not resolve(store.has(shared))


def test_blob_inside_grace_survives(index: SQLiteIndex, store: Store, clock: Clock) -> None:
    h = add(index, store, "a", b"young")
    clock.advance(100)
    report = run(index, store, clock, ttl=50, grace=600)
    assert report.expired == 1 and keys(index) == []
    assert resolve(store.has(h)) and report.blobs_deleted == 0
    clock.advance(600)
    report = run(index, store, clock, ttl=50, grace=600)
    assert not resolve(store.has(h)) and report.blobs_deleted == 1


def test_dry_run_changes_nothing(index: SQLiteIndex, store: Store, clock: Clock) -> None:
    h = add(index, store, "a", b"a" * 100)
    clock.advance(1)
    add(index, store, "b", b"b" * 100)
    clock.advance(1000)
    report = run(index, store, clock, dry_run=True, ttl=500)
    assert report.expired == 2 and report.blobs_deleted == 2 and report.stored_after == 0
    assert keys(index) == ["a", "b"] and resolve(store.has(h))


def test_failing_item_is_skipped(
    index: SQLiteIndex, store: Store, clock: Clock, monkeypatch: pytest.MonkeyPatch,
    clean_reactor: list[dict[str, Any]],
) -> None:
    bad = add(index, store, "bad", b"b")
    good = add(index, store, "good", b"g")
    original = FilesystemBackend.delete_now

    def delete_now(self: FilesystemBackend, key: str) -> Any:
        if bad.hex in key:
            raise OSError("the disk said no")
        return original(self, key)

    monkeypatch.setattr(FilesystemBackend, "delete_now", delete_now)
    clock.advance(100)
    report = run(index, store, clock, ttl=10)
    assert report.skipped == 1 and report.blobs_deleted == 1
    assert not resolve(store.has(good))
    # Still there, and still known: the next pass tries it again.
    assert resolve(store.has(bad)) and bad.hex in resolve(index.blob_rows([bad.hex]))
    assert len(clean_reactor) == 1  # the skipped item was logged
    clean_reactor.clear()


def test_a_pass_that_raises_does_not_stop_the_timer(
    index: SQLiteIndex, store: Store, clock: Clock, monkeypatch: pytest.MonkeyPatch,
    clean_reactor: list[dict[str, Any]],
) -> None:
    expiry = Expiry(index, store, clock, Policy(ttl=10, grace=0))
    service = ExpiryService(expiry, clock, interval=60)
    service.startService()
    calls = []
    real_run = Expiry.run

    async def flaky(self: Expiry, dry_run: bool = False) -> Any:
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("index locked")
        return await real_run(self, dry_run)

    monkeypatch.setattr(Expiry, "run", flaky)
    add(index, store, "a", b"a")
    clock.advance(60)
    assert service.passes == 1 and keys(index) == ["a"]
    assert len(clean_reactor) == 1
    clean_reactor.clear()
    clock.advance(60)
    assert service.passes == 2 and keys(index) == []
    service.stopService()
    assert clock.getDelayedCalls() == []


def test_version_1_index_is_migrated_with_its_blobs(storage: str, clock: Clock) -> None:
    os.makedirs(storage)
    db = sqlite3.connect(os.path.join(storage, INDEX_FILENAME))
    for statement in index_module.MIGRATIONS[1]:
        db.execute(statement)
    db.execute("PRAGMA user_version = 1")
    h = Hash.of(b"x").hex
    db.execute("INSERT INTO entries VALUES ('go', 'a', ?, 5, '{}', 10.0, 20.0)", (h,))
    db.execute("INSERT INTO entries VALUES ('npm', 'b', ?, 5, '{}', 7.0, 30.0)", (h,))
    db.commit()
    db.close()
    idx = SQLiteIndex(storage, SynchronousRunner(), clock)
    idx.open()
    assert resolve(idx.blob_rows([h])) == {h: BlobRow(h, 5, 7.0)}
    assert resolve(idx.stored_bytes()) == 5
    resolve(idx.close())


def test_young_blobs_count_as_freed_when_their_last_entry_goes(
    index: SQLiteIndex, store: Store, clock: Clock
) -> None:
    for i in range(10):
        clock.advance(1)
        add(index, store, f"e{i}", bytes([i]) * 100)
    # All ten blobs are inside the grace period: evicting entries cannot
    # delete them yet, but must still stop once enough is freed.
    report = run(index, store, clock, ttl=None, max_size=500, grace=600)
    assert report.evicted == 6
    assert keys(index) == ["e6", "e7", "e8", "e9"]


def test_min_free_evicts_least_recently_used_until_there_is_room(
    index: SQLiteIndex, store: Store, clock: Clock, monkeypatch: Any
) -> None:
    # A filesystem of 1,000,000 bytes holding the store and little else.
    used = {"other": 100_000}

    def measure() -> Room:
        stored = resolve(index.stored_bytes())
        return Room(free=1_000_000 - used["other"] - stored, total=1_000_000)

    monkeypatch.setattr(DiskSpace, "measure", lambda self: measure())
    for i in range(8):
        clock.advance(10)
        add(index, store, f"k{i}", bytes([i]) * 100_000)
    assert measure().free == 100_000
    report = run(index, store, clock, ttl=None, min_free=MinFree.parse("30%"))
    # 30% of 1,000,000 is 300,000; to have that divided by the low-water
    # mark free (333,333), the three least recently used go.
    assert keys(index) == [f"k{i}" for i in range(3, 8)]
    assert report.evicted == 3 and report.free_before == 100_000 and report.free_after == 400_000
    assert "free 100000 -> 400000 bytes" in report.summary()
    assert run(index, store, clock, ttl=None, min_free=MinFree.parse("30%")).evicted == 0


def test_min_free_parses_sizes_and_shares() -> None:
    assert MinFree.parse("5%").bytes_of(200) == 10
    assert MinFree.parse("2GiB").bytes_of(10) == 2 << 30
    assert not MinFree.parse("0").enabled and not MinFree.parse("0%").enabled
    for bad in ("100%", "lots", "-1%"):
        with pytest.raises(ValueError):
            MinFree.parse(bad)


def test_a_full_disk_starts_a_pass_at_once_but_not_a_storm(index: SQLiteIndex, store: Store, clock: Clock) -> None:
    service = ExpiryService(Expiry(index, store, clock, Policy(ttl=100, grace=0)), clock, interval=600)
    store.space.when_short(service.make_room)
    service.startService()
    full = OSError(28, "No space left on device")
    try:
        add(index, store, "old", b"o" * 10)
        clock.advance(200)
        store.space.failed(full)
        assert service.passes == 1 and keys(index) == []
        # That pass freed something: the next full disk starts one at once.
        store.space.failed(full)
        assert service.passes == 2
        # That one freed nothing: not again for a while.
        clock.advance(5)
        store.space.failed(full)
        assert service.passes == 2
        clock.advance(6)
        store.space.failed(full)
        assert service.passes == 3
    finally:
        service.stopService()


def test_a_write_that_leaves_less_than_min_free_starts_a_pass(
    index: SQLiteIndex, store: Store, clock: Clock, monkeypatch: Any
) -> None:
    store.space.min_free = MinFree(size=1000)
    monkeypatch.setattr(DiskSpace, "measure", lambda self: setattr(self, "room", Room(500, 10_000)) or self.room)
    service = ExpiryService(Expiry(index, store, clock, Policy(ttl=None)), clock, interval=600)
    store.space.when_short(service.make_room)
    service.startService()
    try:
        resolve(store.put([b"a new blob"]))
        assert service.passes == 1
    finally:
        service.stopService()
