"""
The caching rules every protocol shares: immutable entries fetched once,
mutable entries revalidated after a TTL and served stale when upstream
fails, a short memory of what upstream does not have, and one upstream
request for any number of concurrent misses.

Past its TTL, a mutable entry may be answered at once, stale, while it is
revalidated in the background (stale-while-revalidate): one revalidation
per key for the whole cache, whichever process or node the requests land
on (L{Background}, and the per-key locks for the other processes).

A protocol adapter supplies the fetch: it asks its upstream, checks what
came back by the protocol's own rules, and hands over a L{Fill} (a spooled
body and its index attributes), L{NOT_MODIFIED}, or raises L{Missing} or an
L{UpstreamError}. The rest (store, index, freshness, coalescing) is here.
"""

from __future__ import annotations

import contextvars
from contextlib import AbstractAsyncContextManager, nullcontext
from typing import Any, Awaitable, Callable, Coroutine, Hashable, Mapping, Sequence

from attrs import Factory, define, field, frozen
from twisted.application.service import Service
from twisted.internet.defer import CancelledError, Deferred, DeferredSemaphore, gatherResults
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from .backend import StorageUnavailable
from .hash import Hash
from .hot import Found, HotSet
from .index import Entry, IIndex, IndexUnavailable
from .locks import KeyLocks
from .space import is_full
from .store import MAX_WHOLE_READ, Blob, Spool, Store
from .upstream import Coalescer, Fetched, NegativeCache, UpstreamError

log = Logger()

HIT = "hit"
MISS = "miss"
#: A stale copy, because upstream failed (stale-if-error).
STALE = "stale"
#: A stale copy answered at once while it is revalidated in the
#: background (stale-while-revalidate).
REVALIDATING = "revalidating"
REVALIDATED = "revalidated"


#: The X-Cache header for each outcome.
OUTCOME_HEADER = {
    HIT: b"HIT", MISS: b"MISS", STALE: b"STALE", REVALIDATING: b"STALE", REVALIDATED: b"REVALIDATED",
}


class Missing(Exception):
    """
    Upstream does not have it (404/410), or no upstream is configured and
    the cache does not have it either.
    """


class IntegrityError(Exception):
    """
    What upstream sent failed the protocol's checks: it must not be stored
    or served.
    """


@frozen
class Fill:
    """
    Fresh content from upstream, spooled and checked, with what the index
    should record about it.
    """

    spool: Spool
    attrs: Mapping[str, Any]


class _NotModified:
    pass


#: What a revalidating fetch returns for an upstream 304.
NOT_MODIFIED = _NotModified()


def body_or_status(fetched: Fetched, what: str, conditional: bool = False) -> Spool | _NotModified:
    """
    What an upstream answer means for the cache: its spooled body, a 304
    (to a C{conditional} request; to any other it is upstream's mistake),
    L{Missing} for a 404 or 410, L{UpstreamError} for anything else.
    """
    if fetched.status in (404, 410):
        raise Missing(what)
    if fetched.status == 304:
        if not conditional:
            raise UpstreamError(f"upstream answered 304 to an unconditional request for {what}")
        return NOT_MODIFIED
    if fetched.spool is None:
        raise UpstreamError(f"upstream answered {fetched.status} for {what}")
    return fetched.spool


def body_of(fetched: Fetched, what: str) -> Spool:
    """
    The spooled body of an answer to an unconditional request (see
    L{body_or_status}).
    """
    body = body_or_status(fetched, what)
    assert not isinstance(body, _NotModified)  # an UpstreamError instead
    return body


@frozen
class Served:
    """
    What answers a request, and how the cache came by it.
    """

    entry: Entry
    outcome: str
    #: Why a stale copy was served.
    reason: str | None = None
    #: The blob's bytes, when they are at hand (a small blob, hot or read
    #: with its entry): nothing to read from the store.
    body: bytes | None = None


Fetch = Callable[[], Awaitable[Fill]]
Revalidate = Callable[[Entry | None], Awaitable["Fill | _NotModified"]]


class Background(Service):
    """
    What the cache does after it has answered (revalidations in the
    background): at most one piece of work per key at a time, at most
    L{BACKGROUND_CONCURRENCY} running at once (the rest queued, at most
    L{BACKGROUND_QUEUE} in all: beyond that a request that would start
    more starts none, and the next one past its TTL does), and the last
    failure of each key remembered for a while. Stopping drops what is
    queued, gives what runs L{STOP_PATIENCE} seconds to end (its disk and
    index work cannot be interrupted), then cancels it, before the
    upstreams, the index and the disk pool it uses go.
    """

    def __init__(self, clock: IReactorTime | None = None) -> None:
        self._running: dict[Hashable, Deferred[None]] = {}
        self._limit = DeferredSemaphore(BACKGROUND_CONCURRENCY)
        #: Keys whose work has its turn (the others are queued).
        self._active: set[Hashable] = set()
        #: key -> (when, why) of the last failed attempt, oldest first.
        self._failures: dict[Hashable, tuple[float, str]] = {}
        self._clock = clock
        #: Set once stopping: errors of cancelled work are nobody's news.
        self.stopping = False

    def __contains__(self, key: Hashable) -> bool:
        return key in self._running

    def __len__(self) -> int:
        return len(self._running)

    def underway(self, key: Hashable) -> Deferred[None] | None:
        """
        What fires when the work for C{key} has ended, if it runs (not if
        it is queued behind other work: a request does not wait for that).
        """
        d = self._running.get(key)
        return None if d is None or key not in self._active else _ended(d)

    def start(self, key: Hashable, work: Callable[[], Coroutine[Any, Any, None]]) -> bool:
        """
        Run C{work} unless work for C{key} runs already (or the daemon is
        stopping, or too much is queued); whether it was started. C{work}
        handles its own errors.
        """
        if self.stopping or key in self._running or len(self._running) >= BACKGROUND_QUEUE:
            return False

        async def limited() -> None:
            await self._limit.acquire()
            self._active.add(key)
            try:
                await work()
            finally:
                self._active.discard(key)
                self._limit.release()

        # In a context of its own, not the request's: the work outlives
        # the request, whose span and upstream time it is not part of.
        d: Deferred[None] = contextvars.Context().run(Deferred.fromCoroutine, limited())
        if d.called:
            # Done at once (nothing to revalidate, or no lock to be had).
            d.addErrback(self._failed, key)
            return True
        self._running[key] = d
        d.addBoth(self._finished, key)
        return True

    def failed(self, key: Hashable, reason: str, now: float) -> None:
        """
        Remember that the last attempt for C{key} failed, and why.
        """
        self._failures.pop(key, None)
        if len(self._failures) >= MAX_FAILURES_HELD:
            del self._failures[next(iter(self._failures))]
        self._failures[key] = (now, reason)

    def succeeded(self, key: Hashable) -> None:
        self._failures.pop(key, None)

    def failure(self, key: Hashable) -> tuple[float, str] | None:
        """
        When the last attempt for C{key} failed and why, if it did.
        """
        return self._failures.get(key)

    def _finished(self, result: object, key: Hashable) -> None:
        del self._running[key]
        if isinstance(result, Failure):
            self._failed(result, key)

    def _failed(self, failure: Failure, key: Hashable) -> None:
        if not (failure.check(CancelledError) or self.stopping):
            log.failure("background work for {key!r} failed", failure, key=key)

    def stopService(self) -> Deferred[Any]:
        super().stopService()
        self.stopping = True
        running = dict(self._running)
        ended = gatherResults([_ended(d) for d in running.values()])
        # Queued work ends at once (cancelled waiting for its turn).
        for key, d in running.items():
            if key not in self._active or self._clock is None:
                d.cancel()
        if self._clock is None or not self._active:
            return ended
        def cancel() -> None:
            for d in running.values():
                d.cancel()

        late = self._clock.callLater(STOP_PATIENCE, cancel)

        def done(result: object) -> object:
            if late.active():
                late.cancel()
            return result

        return ended.addBoth(done)


#: Background revalidations running at once (more wait their turn), and
#: waiting in all.
BACKGROUND_CONCURRENCY = 8
BACKGROUND_QUEUE = 1024
#: Keys whose last background failure is remembered.
MAX_FAILURES_HELD = 4096
#: After a failed background revalidation, its stale copy is answered as
#: stale-if-error (Warning 111), and revalidated again no sooner than this.
BACKGROUND_RETRY = 10.0
#: Seconds stopping waits for background work before cancelling it.
STOP_PATIENCE = 5.0


def _ended(d: Deferred[None]) -> Deferred[None]:
    """
    A Deferred of its own that fires, with nothing, when C{d} has.
    """
    ended: Deferred[None] = Deferred()

    def end(result: object) -> object:
        ended.callback(None)
        return result

    d.addBoth(end)
    return ended


@define
class ProtocolCache:
    """
    The cached entries of one protocol: what an adapter asks for a key,
    whatever is needed to answer it (the hot set, the index and the store,
    one upstream fetch), and every write of the protocol's entries.
    """

    protocol: str
    index: IIndex
    store: Store
    _clock: IReactorTime
    negative: NegativeCache[str]
    #: Entries and small blobs in memory, shared by every protocol.
    hot: HotSet = field(factory=lambda: HotSet(0))
    #: Locks between the processes sharing the storage: one upstream
    #: request for a key whichever of them the misses land on.
    locks: KeyLocks | None = None
    #: How long past its TTL a mutable entry is answered at once while it
    #: is revalidated in the background; 0: the revalidation is waited for.
    stale_while_revalidate: float = 0.0
    #: The revalidations running in the background (the daemon's caches
    #: share one, stopped with the daemon).
    background: Background = field(factory=Background)
    _coalescer: Coalescer[str, Served] = field(
        default=Factory(lambda self: Coalescer(protocol=self.protocol), takes_self=True)
    )

    def _held(self, key: str) -> AbstractAsyncContextManager[None]:
        if self.locks is None:
            return nullcontext()
        return self.locks.hold(f"{self.protocol}\0{key}")

    def _held_if_free(self, key: str) -> AbstractAsyncContextManager[bool]:
        if self.locks is None:
            return nullcontext(True)
        return self.locks.hold_if_free(f"{self.protocol}\0{key}")

    # Reading.

    async def find_all(self, wanted: Sequence[tuple[str, bool]]) -> list[Found | None]:
        """
        The entries for several C{(key, body)}, recording their use; with
        C{body}, the blob's bytes too if it is small. From the hot set
        where it holds them, else in one trip to the disk pool for all.
        """
        hot = self.hot
        found: list[Found | None] = []
        missing = []
        #: Entries held without the bytes wanted with them.
        bare: dict[int, Found] = {}
        for i, (key, body) in enumerate(wanted):
            held = hot.get((self.protocol, key))
            if held is not None and (not body or held.body is not None or held.entry.size > hot.item_limit):
                found.append(held)
            else:
                found.append(None)
                missing.append(i)
                if held is not None:
                    bare[i] = held
        if missing:
            since = hot.generation
            read = self._read_now if any(wanted[i][1] for i in missing) else None
            try:
                rows = await self.index.lookup(
                    self.protocol, [(wanted[i][0], read if wanted[i][1] else None) for i in missing]
                )
            except IndexUnavailable:
                if len(bare) < len(missing):
                    raise
                # The entries are known: their bytes come from the store.
                rows = [(bare[i].entry, None) for i in missing]
            for i, row in zip(missing, rows):
                if row is not None:
                    found[i] = Found(*row)
                    hot.put((self.protocol, wanted[i][0]), found[i], since)  # type: ignore[arg-type]
        for (key, _), result in zip(wanted, found):
            if result is not None:
                self.index.touch(self.protocol, key)
        return found

    def _read_now(self, entry: Entry) -> bytes | None:
        # On the disk pool, in the trip that found the entry.
        limit = self.hot.item_limit if self.hot.enabled else MAX_WHOLE_READ
        return self.store.read_now(entry.blob, limit)

    async def find(self, key: str, body: bool = False) -> Found | None:
        """
        The entry for C{key} (see L{find_all}).
        """
        return (await self.find_all([(key, body)]))[0]

    async def lookup(self, key: str) -> Entry | None:
        """
        The entry for C{key} if there is one, recording the access.
        """
        found = await self.find(key)
        return None if found is None else found.entry

    def touch(self, key: str) -> None:
        """
        Record a use of C{key}'s entry (one used with another: a
        packument's dist index), in the next batch.
        """
        self.index.touch(self.protocol, key)

    async def keys(self, prefix: str, limit: int = 10_000) -> list[str]:
        return await self.index.keys(self.protocol, prefix, limit)

    async def entries(self, prefix: str, limit: int) -> list[Entry]:
        """
        The entries whose keys start with C{prefix}, without recording a use.
        """
        keys = await self.keys(prefix, limit)
        rows = await self.index.lookup(self.protocol, [(key, None) for key in keys])
        return [row[0] for row in rows if row is not None]

    # Writing: every entry of the protocol is written here, so that what
    # this process holds in memory goes with it.

    async def put(self, key: str, blob: Blob, attrs: Mapping[str, Any]) -> Entry:
        """
        Record C{key} as answered by C{blob}.
        """
        try:
            return await self.index.put(self.protocol, key, blob, attrs)
        finally:
            self.hot.drop([(self.protocol, key)])

    async def remove(self, key: str) -> bool:
        try:
            return await self.index.delete(self.protocol, key)
        finally:
            self.hot.drop([(self.protocol, key)])

    async def _commit(self, key: str, fill: Fill) -> Entry:
        result = await fill.spool.commit()
        self.negative.discard(key)
        return await self.put(key, result.blob, fill.attrs)

    # The caching rules.

    async def immutable(self, key: str, fetch: Fetch | None, body: bool = False) -> Served:
        """
        Content that never changes once published: served from the cache
        when present, fetched once otherwise. C{fetch} is L{None} in
        cache-only mode. With C{body}, a small blob's bytes come with it.
        """
        found = await self.find(key, body)
        if found is not None:
            return Served(found.entry, HIT, body=found.body)
        if fetch is None or key in self.negative:
            raise Missing(key)
        return await self._coalescer.run(key, lambda: self._fill(key, fetch))

    async def _fill(self, key: str, fetch: Fetch) -> Served:
        async with self._held(key):
            # A fill for this key (here or in another process) may have
            # finished between our lookup and this operation starting.
            entry = await self.index.get(self.protocol, key)
            if entry is not None:
                return Served(entry, HIT)
            try:
                fill = await fetch()
            except Missing:
                self.negative.add(key)
                raise
            return Served(await self._commit(key, fill), MISS)

    def fresh(self, entry: Entry, ttl: float) -> bool:
        return self._clock.seconds() - entry.created < ttl

    def within_stale_window(self, entry: Entry, ttl: float) -> bool:
        """
        Whether C{entry}, past C{ttl}, may still be answered at once while
        it is revalidated in the background.
        """
        # A TTL of 0 asks for every answer revalidated first.
        return ttl > 0 and self._clock.seconds() - entry.created < ttl + self.stale_while_revalidate

    def revalidate_in_background(self, key: str, ttl: float, revalidate: Revalidate) -> None:
        """
        Revalidate C{key} after answering its stale copy, unless that is
        under way already: here in the background or for a waiting
        request (whose fresh copy is the next request's too), or in another
        process (which holds the key's lock).
        """
        if self._coalescer.waiting(key):
            return
        failure = self.background.failure((self.protocol, key))
        if failure is not None and self._clock.seconds() - failure[0] < BACKGROUND_RETRY:
            return
        self.background.start((self.protocol, key), lambda: self._revalidate_in_background(key, ttl, revalidate))

    def answer_stale(self, key: str, found: Found, ttl: float, revalidate: Revalidate) -> Served:
        """
        The stale copy of C{key}, answered at once within the window, its
        revalidation started in the background: as stale-while-revalidate
        (Warning 110), or, while its last revalidation failed, as
        stale-if-error (111, with the reason).
        """
        reason = self.last_failure(key, found.entry)  # before this attempt
        self.revalidate_in_background(key, ttl, revalidate)
        if reason is not None:
            return Served(found.entry, STALE, reason, body=found.body)
        return Served(found.entry, REVALIDATING, body=found.body)

    def last_failure(self, key: str, entry: Entry) -> str | None:
        """
        Why the last background revalidation of C{key} failed, if it did
        after C{entry} was made (a copy revalidated since, by any request
        or process, is no failure's).
        """
        failure = self.background.failure((self.protocol, key))
        if failure is None or entry.created > failure[0]:
            return None
        return failure[1]

    async def mutable(
        self, key: str, ttl: float, revalidate: Revalidate | None, body: bool = False, background: bool = True
    ) -> Served:
        """
        Content that changes upstream: served from the cache for C{ttl}
        seconds after it was fetched or last revalidated, then revalidated
        (C{revalidate} gets the current entry for a conditional request):
        in the background while within the stale-while-revalidate window
        (unless not C{background}), the stale copy answered at once; past
        it, before answering. When upstream fails, the last good copy is
        served as stale.
        """
        found = await self.find(key, body)
        entry = None if found is None else found.entry
        if found is not None and (revalidate is None or self.fresh(found.entry, ttl)):
            return Served(found.entry, HIT, body=found.body)
        if revalidate is None or (entry is None and key in self.negative):
            raise Missing(key)
        if found is not None and background and self.within_stale_window(found.entry, ttl):
            return self.answer_stale(key, found, ttl, revalidate)
        running = self.background.underway((self.protocol, key)) if ttl > 0 else None
        try:
            if running is not None:
                # Join the background revalidation rather than ask upstream
                # beside it (a PostgreSQL advisory lock is this process's
                # already), then answer what it made if that is fresh.
                await running
                current = await self.index.get(self.protocol, key)
                if current is not None and self.fresh(current, ttl):
                    return Served(current, HIT)
            return await self._coalescer.run(key, lambda: self._refresh(key, entry, ttl, revalidate))
        except IndexUnavailable as e:
            if found is None:
                raise
            # What is held in memory, past its TTL, rather than a 503: as
            # when upstream fails (stale-if-error).
            log.warn("serving stale {protocol} {key}: {error}", protocol=self.protocol, key=key, error=e)
            return Served(found.entry, STALE, str(e), body=found.body)

    async def _refresh(self, key: str, entry: Entry | None, ttl: float, revalidate: Revalidate) -> Served:
        async with self._held(key):
            if self.locks is not None:
                # Another process may have revalidated it while we waited.
                current = await self.index.get(self.protocol, key)
                if current is not None and self.fresh(current, ttl):
                    self.hot.drop([(self.protocol, key)])  # the stale copy it held
                    return Served(current, HIT)
                entry = current if current is not None else entry
            return await self._revalidate(key, entry, revalidate)

    async def _revalidate_in_background(self, key: str, ttl: float, revalidate: Revalidate) -> None:
        """
        Revalidate C{key} unless another process is (it holds the key's
        lock) or has just done so; errors are logged, for no client waits.
        """
        try:
            async with self._held_if_free(key) as held:
                if not held:
                    return
                current = await self.index.get(self.protocol, key)
                if current is None:
                    # Gone meanwhile (upstream's 404 to another process, a
                    # purge): the next request asks upstream.
                    self.hot.drop([(self.protocol, key)])
                    return
                if self.fresh(current, ttl):
                    # Revalidated by another process since this one read it.
                    self.hot.drop([(self.protocol, key)])  # the stale copy it held
                    return
                served = await self._revalidate(key, current, revalidate, background=True)
                self.background.succeeded((self.protocol, key))
                log.debug("revalidated {protocol} {key} in the background: {outcome}",
                          protocol=self.protocol, key=key, outcome=served.outcome)
        except Missing:
            log.info("{protocol} {key}: upstream no longer has it; removed from the cache",
                     protocol=self.protocol, key=key)
        except (UpstreamError, IntegrityError, IndexUnavailable, StorageUnavailable) as e:
            if not self.background.stopping:  # else cancelled, and nobody's news
                self.background.failed((self.protocol, key), str(e), self._clock.seconds())
                log.warn("revalidating {protocol} {key} in the background failed: {error}; "
                         "its stale copy is served meanwhile", protocol=self.protocol, key=key, error=e)
        except Exception as e:
            if not is_full(e):
                raise
            # No room for the new copy: the storage's state says so, once a minute.

    async def _revalidate(
        self, key: str, entry: Entry | None, revalidate: Revalidate, background: bool = False
    ) -> Served:
        try:
            result = await revalidate(entry)
        except Missing:
            self.negative.add(key)
            if entry is not None:
                await self.remove(key)
            raise
        except UpstreamError as e:
            if entry is None or background:
                raise
            log.warn(
                "serving stale {protocol} {key}: {error}",
                protocol=self.protocol,
                key=key,
                error=e,
            )
            return Served(entry, STALE, str(e))
        if isinstance(result, _NotModified):
            assert entry is not None
            # The blob is about to be referenced again: claimed first, as a
            # miss claims what it finds in the store. If expiry deleted it
            # meanwhile, what upstream says has not changed is gone here.
            if await self.index.claim_blob(entry.hash):
                renewed = await self.put(key, entry.blob, entry.attrs)
                return Served(renewed, REVALIDATED)
            result = await revalidate(None)
            if isinstance(result, _NotModified):
                raise UpstreamError(f"{key}: upstream answered 304 to an unconditional request")
        return Served(await self._commit(key, result), MISS)

    async def forget(self, h: Hash) -> None:
        """
        The blob C{h} has gone from the store (an operator's repair, damage
        found and deleted): forget every entry that points at it, of any
        protocol, so that the next request fetches it again.
        """
        self.hot.drop_blob(h)
        if await self.store.has(h):
            return  # back already: another request fetched it again
        forgotten = await self.index.forget_entries(h)
        if forgotten:
            log.warn("blob {hash} is missing from the store; {count} entries that pointed at it "
                     "will be fetched again", hash=h.hex, count=forgotten)
