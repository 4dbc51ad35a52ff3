"""
The in-memory hot set: index entries and the bytes of small blobs, so that
a hit on them makes no trip to the disk pool and no index query.

Bounded by bytes, least recently used out first. What it holds is dropped
as soon as this process changes the entry, and within a second or two when
another process does (a worker beside it, C{contentcache purge}, C{gc} or
C{verify --repair}): L{Invalidations} reads the index's log of changes.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Iterable

from attrs import define, field, frozen
from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from .hash import Hash
from .index import CHANGES_KEPT, Entry, IIndex, IndexUnavailable

log = Logger()

DEFAULT_SIZE = 256 << 20
#: The largest blob whose bytes are kept: metadata, rendered packuments and
#: small tarballs; an artifact larger than this streams from the store.
MAX_ITEM = 4 << 20
#: A held entry's own weight besides its blob's bytes: the Entry, its
#: attributes and the keys that find it, as this interpreter lays them out.
ENTRY_OVERHEAD = 1100
#: How often L{Invalidations} looks for changes other processes made.
POLL_INTERVAL = 1.0

Key = tuple[str, str]


@frozen
class Found:
    """
    An index entry, with its blob's bytes when they are at hand.
    """

    entry: Entry
    body: bytes | None = None


def _weight(key: Key, found: Found) -> int:
    attrs = sum(len(str(k)) + len(str(v)) for k, v in found.entry.attrs.items())
    return ENTRY_OVERHEAD + 2 * (len(key[0]) + len(key[1])) + attrs + len(found.body or b"")


@define
class HotSet:
    """
    Entries by C{(protocol, key)}, at most C{bound} bytes of them.
    """

    bound: int
    _items: OrderedDict[Key, tuple[Found, int]] = field(factory=OrderedDict)
    size: int = 0
    #: Counts every drop: a lookup that began before one may not put back
    #: what it read (it may be what was dropped).
    generation: int = 0
    _dropped: dict[Key, int] = field(factory=dict)
    _cleared: int = 0

    @property
    def enabled(self) -> bool:
        return self.bound > 0

    @property
    def item_limit(self) -> int:
        """
        The largest blob whose bytes are kept.
        """
        return min(MAX_ITEM, self.bound // 8)

    def __len__(self) -> int:
        return len(self._items)

    def get(self, key: Key) -> Found | None:
        held = self._items.get(key)
        if held is None:
            return None
        self._items.move_to_end(key)
        return held[0]

    def put(self, key: Key, found: Found, since: int) -> None:
        """
        Hold C{found} for C{key}, as read by a lookup that began at
        generation C{since}: not if C{key} was dropped since then.
        """
        if not self.enabled or self._cleared > since or self._dropped.get(key, -1) > since:
            return
        if found.body is not None and len(found.body) > self.item_limit:
            found = Found(found.entry)
        weight = _weight(key, found)
        if weight > self.bound:
            return
        old = self._items.pop(key, None)
        if old is not None:
            self.size -= old[1]
        self._items[key] = (found, weight)
        self.size += weight
        while self.size > self.bound:
            _, (_, evicted) = self._items.popitem(last=False)
            self.size -= evicted

    def drop(self, keys: Iterable[Key]) -> None:
        self.generation += 1
        for key in keys:
            held = self._items.pop(key, None)
            if held is not None:
                self.size -= held[1]
            self._dropped[key] = self.generation
        if len(self._dropped) > 10_000:
            # Forget which: refuse every lookup begun before now instead.
            self._dropped.clear()
            self._cleared = self.generation

    def drop_blob(self, h: Hash) -> None:
        """
        Drop every entry answered by the blob C{h} (it is gone).
        """
        self.drop([key for key, (found, _) in self._items.items() if found.entry.hash == h])

    def clear(self) -> None:
        self.generation += 1
        self._items.clear()
        self._dropped.clear()
        self.size = 0
        self._cleared = self.generation


class Invalidations(Service):
    """
    Once a second, drop from the hot set what other processes changed in
    the index; the process that runs expiry also prunes the log of changes.
    """

    def __init__(self, hot: HotSet, index: IIndex, clock: IReactorTime, prune: bool = True) -> None:
        self.hot = hot
        self.index = index
        self.prune = prune
        self._clock = clock
        self._position: int | None = None
        self._loop = LoopingCall(self._poll)
        self._loop.clock = clock
        self._pruned_at = float("-inf")
        self._failing = False
        self._polling: Deferred[None] | None = None

    def startService(self) -> None:
        super().startService()
        self._loop.start(POLL_INTERVAL, now=True)

    async def _poll_async(self) -> None:
        try:
            changes = await self.index.changes_since(self._position)
        except IndexUnavailable as e:
            # The database is out of reach: hits from memory go on. What
            # changed in it before is read once it answers (from where
            # this process got to; all of it, if pruned meanwhile), and
            # nobody changes an index nobody reaches... except a node on
            # the other side of a network split, which is the price of
            # serving through the outage.
            if not self._failing:
                log.warn("cannot read the index's changes ({error}); serving what is held in memory", error=e)
            self._failing = True
            return
        except Exception as e:
            # Nothing seen, nothing dropped: hold nothing until it answers.
            self.hot.clear()
            if not self._failing:
                log.warn("cannot read the index's changes ({error}); nothing is held in memory until it answers",
                         error=e)
            self._failing = True
            return
        self._failing = False
        if self._position is None:
            # What was held before this process knew where the log stood
            # may have changed unseen.
            self.hot.clear()
        else:
            if changes.keys is None:
                log.info("dropping the in-memory hot set: changes to the index it could not go through")
                self.hot.clear()
            elif changes.keys:
                self.hot.drop(changes.keys)
        self._position = changes.position
        now = self._clock.seconds()
        if self.prune and now - self._pruned_at > CHANGES_KEPT / 2:
            self._pruned_at = now
            try:
                await self.index.prune_changes(CHANGES_KEPT)
            except Exception as e:
                # A longer log costs a little disk, nothing else.
                log.debug("pruning the index's changes failed: {error}", error=e)

    def _poll(self) -> Deferred[None]:
        self._polling = Deferred.fromCoroutine(self._poll_async())
        return self._polling

    def stopService(self) -> Deferred[None] | None:
        super().stopService()
        if self._loop.running:
            self._loop.stop()
        # The index closes after this: let the last look finish first.
        return self._polling if self._polling is not None and not self._polling.called else None
