"""
The background scrub on a fake clock: its pace, where it resumes, and how
it stops.
"""

from __future__ import annotations

import os
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock

from contentcache.index import SQLiteIndex
from contentcache.pool import SynchronousRunner
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
    fill(index, store, [1000, 3000, 6000])
    done: list[Any] = []
    Deferred.fromCoroutine(scrub_of(index, store, clock, storage, interval=100).run_pass()).addCallback(done.append)
    clock.pump([1] * 90)
    assert not done, "paced: not through before its bytes' share of the interval"
    clock.pump([1] * 11)
    [report] = done
    assert (report.blobs, report.bytes, report.damaged) == (3, 10_000, 0)


def test_one_blob_does_not_make_it_spin(index: SQLiteIndex, store: Store, clock: Clock, storage: str) -> None:
    fill(index, store, [500])
    service = ScrubService(scrub_of(index, store, clock, storage, interval=60), clock)
    service.startService()
    try:
        for _ in range(3):
            clock.advance(60)
    finally:
        stopped = service.stopService()
        if stopped is not None:
            resolve(stopped)
    # A pass a minute: the blob's bytes are worth the whole interval.
    assert len(service.reports) == 3


def test_a_restart_resumes_where_the_walk_got_to(index: SQLiteIndex, store: Store, clock: Clock, storage: str) -> None:
    blobs = fill(index, store, [1000] * 4)
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
