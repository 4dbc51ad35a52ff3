"""
Keeping the store bounded: entries expire a TTL after their last use; above
the size limit the least recently used go first, down to a low-water mark;
a blob is deleted only when no entry references it any more, and never
while it is younger than the grace period.

A pass walks the entries in LRU order in bounded batches, each batch one
trip to the disk pool, so the daemon keeps serving while it runs.
"""

from __future__ import annotations

import time
from contextlib import AbstractAsyncContextManager
from functools import partial
from typing import Any, Callable

from attrs import define, field, frozen
from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from . import activity, metrics
from .hash import Hash
from .backend import StorageUnavailable
from .index import BlobRow, IIndex, IndexUnavailable, Used
from .space import MinFree
from .store import Store
from .units import DAY, MINUTE, SECOND

log = Logger()

DEFAULT_TTL = 30 * DAY
DEFAULT_GRACE = 15 * MINUTE
DEFAULT_INTERVAL = 10 * MINUTE
#: Above the size limit, evict until the store is under this share of it;
#: below --min-free, until the free space is that divided by this share.
LOW_WATER = 0.9
BATCH = 1000
#: A write that finds the disk full (or leaves less than --min-free) starts
#: a pass at once; when the last such pass freed nothing, not again within
#: this long (every miss would start one).
TRIGGER_INTERVAL = 10 * SECOND


@frozen
class Policy:
    ttl: float | None = DEFAULT_TTL
    max_size: int | None = None
    grace: float = DEFAULT_GRACE
    #: Keep this much of the storage's filesystem free.
    min_free: MinFree = MinFree()


@define
class Report:
    """
    What one pass did (or, dry, would do).
    """

    dry_run: bool = False
    expired: int = 0
    evicted: int = 0
    blobs_deleted: int = 0
    bytes_freed: int = 0
    skipped: int = 0
    stored_before: int = 0
    stored_after: int = 0
    #: Bytes free on the storage's filesystem, when --min-free asked.
    free_before: int | None = None
    free_after: int | None = None
    seconds: float = 0.0
    #: The bytes the pass set out to free (to get under --max-size, or to
    #: leave --min-free).
    to_free: int = 0
    #: The blobs this pass tried to delete: each once, even if it failed.
    tried: set[str] = field(factory=set, repr=False, eq=False)

    def summary(self) -> str:
        verb = "would remove" if self.dry_run else "removed"
        free = "" if self.free_before is None else f"; free {self.free_before} -> {self.free_after} bytes"
        return (
            f"{verb} {self.expired} expired and {self.evicted} evicted entries, "
            f"{self.blobs_deleted} blobs ({self.bytes_freed} bytes); store "
            f"{self.stored_before} -> {self.stored_after} bytes{free}; "
            f"{self.skipped} items skipped; {self.seconds:.3f} s"
        )

    def as_dict(self) -> dict[str, Any]:
        return {
            "dry_run": self.dry_run,
            "expired_entries": self.expired,
            "evicted_entries": self.evicted,
            "deleted_blobs": self.blobs_deleted,
            "freed_bytes": self.bytes_freed,
            "skipped": self.skipped,
            "stored_bytes_before": self.stored_before,
            "stored_bytes_after": self.stored_after,
            "free_bytes_before": self.free_before,
            "free_bytes_after": self.free_after,
            "seconds": round(self.seconds, 6),
        }


class _PassStopped(Exception):
    """
    The index or the storage went away mid-pass: the pass ends there.
    """


@define
class Expiry:
    """
    One expiry pass over an index and a store.

    @ivar removed: called with (protocol, key) for each entry removed, and
        with ("blob", hash) for each blob deleted (the admin command prints
        them).
    """

    index: IIndex
    store: Store
    clock: IReactorTime
    policy: Policy
    batch: int = BATCH
    removed: Callable[[str, str], None] | None = None
    #: Called with how many entries the pass has looked at so far.
    progress: Callable[[int, int | None], None] | None = None
    #: Held for the whole of a pass that changes anything: one pass at a
    #: time in the whole cache (the leader's, and gc commands run on any
    #: machine meanwhile).
    exclusive: Callable[[], AbstractAsyncContextManager[None]] | None = None

    def _note(self, kind: str, name: str) -> None:
        if self.removed is not None:
            self.removed(kind, name)

    async def run(self, dry_run: bool = False) -> Report:
        if dry_run or self.exclusive is None:
            return await self._run_or_stop(dry_run)
        async with self.exclusive():
            return await self._run_or_stop(dry_run)

    async def _run_or_stop(self, dry_run: bool) -> Report:
        report = Report(dry_run=dry_run)
        try:
            return await self._run(dry_run, report)
        except _PassStopped:
            return report

    async def _run(self, dry_run: bool, report: Report) -> Report:
        started = time.monotonic()
        now = self.clock.seconds()
        stored = await self.index.stored_bytes()
        report.stored_before = stored
        ttl_cutoff = now - self.policy.ttl if self.policy.ttl is not None else None
        # Bytes whose last reference must go: to get under --max-size (down
        # to the low-water mark), and to have --min-free free (as much
        # above it).
        to_free = 0
        max_size = self.policy.max_size
        if max_size is not None and stored > max_size:
            to_free = stored - int(max_size * LOW_WATER)
        if self.policy.min_free.enabled:
            room = await self.store.room()
            report.free_before = room.free
            wanted = self.policy.min_free.bytes_of(room.total)
            if room.free < wanted:
                to_free = max(to_free, int(wanted / LOW_WATER) - room.free)
        report.to_free = to_free
        freed = 0
        blob_cutoff = now - self.policy.grace

        # References each blob would lose: for the whole pass when dry (the
        # index does not change), per batch otherwise (it does).
        removed_refs: dict[str, int] = {}
        after: tuple[float, float, str, str] | None = None
        done = False
        walked = 0
        while not done:
            rows: list[Used] = await self.index.least_recently_used(self.batch, after)
            if not rows:
                break
            walked += len(rows)
            if self.progress is not None:
                self.progress(walked, None)
            hashes = list({row.hash for row in rows})
            counts = await self.index.reference_counts(hashes)
            blobs = await self.index.blob_rows(hashes)
            if not dry_run:
                removed_refs = {}
            chosen: list[tuple[str, str, str]] = []
            for row in rows:
                protocol, key, hexhash = row.protocol, row.key, row.hash
                expired = ttl_cutoff is not None and row.accessed < ttl_cutoff
                needed = freed < to_free
                if not expired and not needed:
                    done = True
                    break
                after = row.position
                chosen.append((protocol, key, hexhash))
                if expired:
                    report.expired += 1
                else:
                    report.evicted += 1
                self._note(protocol, key)
                removed_refs[hexhash] = removed_refs.get(hexhash, 0) + 1
                blob = blobs.get(hexhash)
                size, blob_created = (blob.stored, blob.created) if blob is not None else (0, now)
                if removed_refs[hexhash] == counts.get(hexhash, 0):
                    # Its last reference goes: it counts as freed now, even
                    # if grace keeps its file a while longer; otherwise a
                    # burst of new content would evict everything else.
                    stored -= size
                    freed += size
                    if dry_run and blob_created < blob_cutoff:
                        report.blobs_deleted += 1
                        report.bytes_freed += size
                        self._note("blob", hexhash)
            if not dry_run and chosen:
                await self._evict(chosen, blobs, blob_cutoff, report)

        if not dry_run:
            # Blobs left unreferenced earlier (young then, or by a purge),
            # looked at in bounded steps so hits never wait long for the index.
            position: tuple[float, str] | None = None
            while True:
                leftovers, position = await self.index.unreferenced_blobs(blob_cutoff, self.batch * 10, position)
                if leftovers:
                    await self._delete_blobs(leftovers, blob_cutoff, report)
                if position is None:
                    break
            stored = await self.index.stored_bytes()
            if report.free_before is not None:
                report.free_after = (await self.store.room()).free
        report.stored_after = stored
        report.seconds = time.monotonic() - started
        return report

    async def _evict(
        self,
        chosen: list[tuple[str, str, str]],
        blobs: dict[str, BlobRow],
        blob_cutoff: float,
        report: Report,
    ) -> int:
        try:
            freed = await self.index.evict(chosen)
        except IndexUnavailable as e:
            log.warn("evicting entries stopped: {error}", error=e)
            report.skipped += len(chosen)
            raise _PassStopped() from None
        except Exception:
            log.failure("evicting {count} entries failed; skipped", count=len(chosen))
            report.skipped += len(chosen)
            return 0
        return await self._delete_blobs([b for b in freed if b.created < blob_cutoff], blob_cutoff, report)

    async def _delete_blobs(self, blobs: list[BlobRow], blob_cutoff: float, report: Report) -> int:
        blobs = [b for b in blobs if b.hash not in report.tried]
        report.tried.update(b.hash for b in blobs)
        # Each in one transaction of the index that holds the blob's row: the
        # check that nothing references it and is about to (a put that
        # reuses it claims it first), the removal from the store, and the
        # row. A blob without a row is an orphan that verify finds; a row
        # without a blob would be served.
        freed = 0
        for blob in blobs:
            h = Hash.from_hex(blob.hash)
            try:
                deleted = await self.index.delete_blob(blob.hash, blob_cutoff, partial(self.store.delete_now, h))
            except (IndexUnavailable, StorageUnavailable) as e:
                # Every other would fail alike: the next pass goes on.
                log.warn("deleting blobs stopped: {error}", error=e)
                report.skipped += len(blobs) - (blobs.index(blob))
                raise _PassStopped() from None
            except Exception:
                log.failure("deleting blob {hash} failed; skipped", hash=blob.hash)
                report.skipped += 1
                continue
            if not deleted:
                continue
            report.blobs_deleted += 1
            report.bytes_freed += blob.stored
            freed += blob.stored
            self._note("blob", blob.hash)
        return freed


class ExpiryService(Service):
    """
    Runs an expiry pass every C{interval} seconds. A pass that fails is
    logged and the timer goes on.
    """

    def __init__(self, expiry: Expiry, clock: IReactorTime, interval: float = DEFAULT_INTERVAL) -> None:
        self.expiry = expiry
        self._clock = clock
        self._loop = LoopingCall(self._pass)
        self._loop.clock = clock
        self._interval = interval
        self.passes = 0
        self._running: Deferred[None] | None = None
        self._triggered_at = float("-inf")
        self._freed = True

    async def _run(self) -> None:
        try:
            report = await self.expiry.run()
        except Exception:
            log.failure("expiry pass failed")
            return
        finally:
            self.passes += 1
            metrics.expiry_passes.inc()
        # A pass that found nothing to free (another had made the room by
        # then) is not one that could not free it: the next shortage starts
        # a pass at once. (Without a size rule it cannot tell: a pass that
        # freed nothing could not.)
        policy = self.expiry.policy
        sized = policy.max_size is not None or policy.min_free.enabled
        self._freed = report.bytes_freed > 0 or (sized and report.to_free == 0)
        metrics.expiry_evicted_entries.inc(report.expired + report.evicted)
        metrics.expiry_deleted_blobs.inc(report.blobs_deleted)
        metrics.expiry_duration.observe(report.seconds)
        next_at = self._next_at()
        metrics.expiry_next_pass.set(next_at)
        activity.current.expiry_passed(report.as_dict(), next_at)
        log.info("expiry pass: {summary}", summary=report.summary(), **report.as_dict())

    def _next_at(self) -> float:
        """
        When the timer runs the next pass: on the interval's beat since it started.
        """
        now = self._clock.seconds()
        started = self._loop.starttime if self._loop.starttime is not None else now
        return now + self._interval - ((now - started) % self._interval)

    def _pass(self) -> Deferred[None] | None:
        if self._running is not None and not self._running.called:
            return None  # a pass started early is still going
        self._running = Deferred.fromCoroutine(self._run())
        return self._running

    def make_room(self) -> None:
        """
        A write found no room, or left less than --min-free: a pass now
        rather than at the next interval.
        """
        now = self._clock.seconds()
        if not self.running or (self._running is not None and not self._running.called):
            return
        if not self._freed and now - self._triggered_at < TRIGGER_INTERVAL:
            return
        self._triggered_at = now
        log.info("the storage is short of room: starting an expiry pass now")
        self._pass()

    def startService(self) -> None:
        super().startService()
        self._loop.start(self._interval, now=False)
        next_at = self._clock.seconds() + self._interval
        metrics.expiry_interval.set(self._interval)
        metrics.expiry_next_pass.set(next_at)
        activity.current.expiry_scheduled(next_at, self._interval)

    def stopService(self) -> Deferred[None] | None:
        super().stopService()
        if self._loop.running:
            self._loop.stop()
        activity.current.expiry_scheduled(None, self._interval)  # another process's now, if any
        # A pass under way finishes before the index and the pool stop.
        running, self._running = self._running, None
        return running if running is not None and not running.called else None
