"""
The background scrub: every stored blob re-hashed, at a rate that makes a
full pass take about C{--scrub-interval}, so that damage (bit rot, a bad
sector, an operator's mistake) is found before a client asks for the blob.
A damaged blob is deleted and its entries forgotten, as when a read finds
it: the next request fetches it again.

The walk goes through the backend's keys in order and remembers, in the
state directory, where it got to, so a daemon restarted more often than
the interval still covers the whole store.
"""

from __future__ import annotations

import os
from typing import Any

from attrs import define, field
from twisted.application.service import Service
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import deferLater
from twisted.logger import Logger

from . import activity, metrics, tempfiles
from .backend import StorageUnavailable
from .index import IIndex
from .pool import Runner
from .store import BlobNotFound, Store, blob_key
from .units import DAY, MINUTE

log = Logger()

DEFAULT_INTERVAL = 7 * DAY
#: Where the walk got to, in the state directory.
POSITION_FILENAME = "scrub.position"
#: How often that is written down.
SAVE_EVERY = MINUTE
#: A pass that failed is tried again after this long (or the interval, if shorter).
IDLE_WAIT = 10 * MINUTE


#: The pace's bounds, in bytes a second: a small store is gone over at a
#: gentle pace rather than a blob a day (and one whose index undercounts
#: it, not at full speed), a large one never at more than a disk spares.
MIN_RATE = 4 * 1024
MAX_RATE = 64 << 20


@define
class PassReport:
    blobs: int = 0
    bytes: int = 0
    damaged: int = 0


@define
class Scrub:
    """
    Walks the store at C{rate} bytes a second, set per pass from the
    store's size and the interval.
    """

    store: Store
    index: IIndex
    clock: IReactorTime
    disk: Runner
    state_dir: str
    interval: float = DEFAULT_INTERVAL
    _saved_at: float = float("-inf")
    position: str = field(default="")

    @property
    def _position_file(self) -> str:
        return os.path.join(self.state_dir, POSITION_FILENAME)

    def _load(self) -> str:
        try:
            with open(self._position_file, encoding="ascii") as f:
                return f.read().strip()
        except (OSError, UnicodeDecodeError):
            return ""

    def _save(self, position: str) -> None:
        path, handle = tempfiles.create(self.state_dir)
        try:
            handle.write(position.encode("ascii"))
            handle.close()
            os.replace(path, self._position_file)
        except BaseException:
            tempfiles.discard(path, handle)
            raise

    async def _remember(self, position: str, now: bool = False) -> None:
        self.position = position
        if not now and self.clock.seconds() - self._saved_at < SAVE_EVERY:
            return
        self._saved_at = self.clock.seconds()
        try:
            await self.disk.run(self._save, position)
        except OSError as e:
            # Only costs going over some blobs again after a restart.
            log.debug("could not write down where the scrub got to: {error}", error=e)

    async def run_pass(self) -> PassReport:
        """
        One pass over the whole store (from where the last one stopped, if a
        restart interrupted it).
        """
        report = PassReport()
        resume = await self.disk.run(self._load)
        total = await self.index.stored_bytes()
        # Bytes a second, and never faster than MAX_RATE (the index may
        # undercount what the backend holds); the service waits out what
        # is left of the interval after the pass.
        rate = min(max(total / self.interval, MIN_RATE), MAX_RATE)
        async for h, encoding in self.store.stored():
            key = blob_key(h, encoding)
            if resume and key <= resume:
                continue
            try:
                sound, stored = await self.store.scrub(h, encoding)
            except BlobNotFound:
                continue  # expiry deleted it while we walked
            except (CancelledError, StorageUnavailable):
                raise  # stopping; or the storage fails: the pass waits
            except Exception:
                # One blob the scrub cannot read must not stop it for good.
                log.failure("scrubbing blob {hash} failed; going on", hash=h.hex)
                continue
            report.blobs += 1
            report.bytes += stored
            report.damaged += not sound
            metrics.scrub_bytes.inc(stored)
            await self._remember(key)
            # The time this blob's bytes are worth at this rate, so that a
            # pass takes about the interval.
            if stored:
                await deferLater(self.clock, stored / rate, lambda: None)
        await self._remember("", now=True)
        metrics.scrub_passes.inc()
        return report


class ScrubService(Service):
    """
    Runs scrub passes one after another while the daemon runs.
    """

    def __init__(self, scrub: Scrub, clock: IReactorTime) -> None:
        self.scrub = scrub
        self._clock = clock
        self._running: Deferred[None] | None = None
        self.passes = 0
        #: What the last finished pass found.
        self.last: PassReport | None = None

    async def _passes(self) -> None:
        while self.running:
            started = self._clock.seconds()
            finished = False
            activity.current.scrub_scheduled(True, self.scrub.interval)
            try:
                report = await self.scrub.run_pass()
            except CancelledError:
                return
            except StorageUnavailable as e:
                log.warn("scrub pass stopped: {error}; trying again later", error=e)
            except Exception:
                log.failure("scrub pass failed; trying again later")
            else:
                finished = True
                self.passes += 1
                self.last = report
                log.info(
                    "scrub pass: checked {blobs} blobs ({bytes} bytes); {damaged} damaged "
                    "(deleted, to be fetched again)",
                    blobs=report.blobs, bytes=report.bytes, damaged=report.damaged,
                )
            # A paced pass takes about the interval; one over a store that
            # grew less, or emptied, waits out the rest: one pass an
            # interval at most. A pass that failed is tried again later.
            if finished:
                wait = started + self.scrub.interval - self._clock.seconds()
                assert self.last is not None
                activity.current.scrub_passed(
                    {"blobs": self.last.blobs, "bytes": self.last.bytes, "damaged": self.last.damaged},
                    self._clock.seconds() + max(wait, 0),
                )
            else:
                wait = min(self.scrub.interval, IDLE_WAIT)
                activity.current.scrub_scheduled(False, self.scrub.interval, self._clock.seconds() + wait)
            if wait > 0:
                try:
                    await deferLater(self._clock, wait, lambda: None)
                except CancelledError:
                    return

    def startService(self) -> None:
        super().startService()
        self._running = Deferred.fromCoroutine(self._passes())

    def stopService(self) -> Deferred[Any] | None:
        super().stopService()
        activity.current.scrub_scheduled(False, self.scrub.interval)
        running, self._running = self._running, None
        if running is not None and not running.called:
            running.cancel()
            # A blob being hashed finishes on the pool; the pool waits for it.
            running.addErrback(lambda f: f.trap(CancelledError))
            return running
        return None
