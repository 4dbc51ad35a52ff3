"""
The background scrub on a fake clock: its pace, where it resumes, and how
it stops.
"""

from __future__ import annotations

import os
from typing import Any

import pytest
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock

from contentcache.index import SQLiteIndex
from contentcache.pool import SynchronousRunner
from contentcache import store as store_module
from contentcache.backend import StorageUnavailable
from contentcache.scrub import POSITION_FILENAME, Scrub, ScrubService
from contentcache.store import Blob, Store, blob_key

from .conftest import resolve


def fill(index: SQLiteIndex, store: Store, sizes: list[int]) -> list[Blob]:
    blobs = []
    for i, size in enumerate(sizes):
        blob = resolve(store.put([os.urandom(size)])).blob
        resolve(index.put("go", f"m/@v/v1.0.{i}.zip", blob, {}))
        blobs.append(blob)
    return blobs


def scrub_of(index: SQLiteIndex, store: Store, clock: Clock, storage: str, interval: float) -> Scrub:
    return Scrub(store, index, clock, SynchronousRunner(), storage, interval)


def test_a_pass_takes_about_the_interval(index: SQLiteIndex, store: Store, clock: Clock, storage: str) -> None:
    fill(index, store, [100_000, 300_000, 600_000])
    done: list[Any] = []
    Deferred.fromCoroutine(scrub_of(index, store, clock, storage, interval=100).run_pass()).addCallback(done.append)
    clock.pump([1] * 90)
    assert not done, "paced: not through before its bytes' share of the interval"
    clock.pump([1] * 11)
    [report] = done
    assert (report.blobs, report.bytes, report.damaged) == (3, 1_000_000, 0)


@pytest.mark.parametrize("sizes", [[500], [0, 0]], ids=["one-blob", "empty-blobs"])
def test_a_small_store_is_scrubbed_once_an_interval(
    index: SQLiteIndex, store: Store, clock: Clock, storage: str, sizes: list[int]
) -> None:
    fill(index, store, sizes)
    service = ScrubService(scrub_of(index, store, clock, storage, interval=60), clock)
    service.startService()
    try:
        clock.pump([6] * 29 + [5])  # 179 s
    finally:
        stopped = service.stopService()
        if stopped is not None:
            resolve(stopped)
    assert 2 <= service.passes <= 3, "a pass a minute, not one after another"


def test_a_restart_resumes_where_the_walk_got_to(index: SQLiteIndex, store: Store, clock: Clock, storage: str) -> None:
    blobs = fill(index, store, [100_000] * 4)
    keys = sorted(blob_key(b.hash) for b in blobs)
    with open(os.path.join(storage, POSITION_FILENAME), "w") as f:
        f.write(keys[1])
    done: list[Any] = []
    Deferred.fromCoroutine(scrub_of(index, store, clock, storage, interval=10).run_pass()).addCallback(done.append)
    clock.pump([1] * 10)
    assert done[0].blobs == 2, "the two after the position"
    assert open(os.path.join(storage, POSITION_FILENAME)).read() == "", "and the next pass starts over"


def test_stopping_cancels_the_wait(index: SQLiteIndex, store: Store, clock: Clock, storage: str) -> None:
    fill(index, store, [1000])
    service = ScrubService(scrub_of(index, store, clock, storage, interval=3600), clock)
    service.startService()
    stopped = service.stopService()
    assert stopped is not None and resolve(stopped) is None
    assert clock.getDelayedCalls() == []


def test_stopping_while_a_blob_is_checked_stops(index: SQLiteIndex, store: Store, clock: Clock, storage: str) -> None:
    fill(index, store, [1000, 1000])
    gate: Deferred[object] = Deferred()

    class Held(SynchronousRunner):
        def run(self, f: Any, *args: object) -> Deferred[Any]:
            if getattr(f, "__name__", "") == "_hash_some":
                return gate  # the disk is slow: this trip is under way
            return super().run(f, *args)

    slow = Store(store.backend, store.staging, Held())
    service = ScrubService(Scrub(slow, index, clock, SynchronousRunner(), storage, 3600), clock)
    service.startService()
    stopped = service.stopService()
    assert stopped is not None and resolve(stopped) is None, "stopped, not on to the next blob"
    assert service.passes == 0 and clock.getDelayedCalls() == []


def test_a_failing_disk_stops_the_pass(
    index: SQLiteIndex, store: Store, clock: Clock, storage: str, monkeypatch: Any
) -> None:
    blobs = fill(index, store, [1000] * 7)
    keys = sorted(blob_key(b.hash) for b in blobs)
    bad = {keys[1], *keys[3:]}  # one bad sector, then the disk fails for good

    def read(stream: Any, hasher: Any, size: int) -> int:
        if any(stream.name.endswith(k.split("/")[-1]) for k in bad):
            raise OSError(5, "Input/output error")
        return real(stream, hasher, size)

    real = store_module._hash_some
    monkeypatch.setattr(store_module, "_hash_some", read)
    done: list[Any] = []
    Deferred.fromCoroutine(scrub_of(index, store, clock, storage, interval=1).run_pass()).addErrback(done.append)
    clock.pump([1] * 10)
    [failure] = done
    assert failure.check(StorageUnavailable) and "nothing is deleted" in failure.getErrorMessage()
    left = [k for k in keys if os.path.exists(os.path.join(storage, k))]
    # The lone bad sector went; of the run of failures, the first two (read
    # twice each) before the third showed the disk itself failing.
    assert left == [keys[0], keys[2], keys[5], keys[6]]
