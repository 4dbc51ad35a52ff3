"""
The caching rules every protocol shares: immutable entries fetched once,
mutable entries revalidated after a TTL and served stale when upstream
fails, a short memory of what upstream does not have, and one upstream
request for any number of concurrent misses.

A protocol adapter supplies the fetch: it asks its upstream, checks what
came back by the protocol's own rules, and hands over a L{Fill} (a spooled
body and its index attributes), L{NOT_MODIFIED}, or raises L{Missing} or an
L{UpstreamError}. The rest (store, index, freshness, coalescing) is here.
"""

from __future__ import annotations

from typing import Any, Awaitable, Callable, Mapping

from attrs import Factory, define, field, frozen
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from .hash import Hash
from .index import Entry, SQLiteIndex
from .store import Spool, Store
from .upstream import Coalescer, Fetched, NegativeCache, UpstreamError

log = Logger()

HIT = "hit"
MISS = "miss"
STALE = "stale"
REVALIDATED = "revalidated"


#: The X-Cache header for each outcome.
OUTCOME_HEADER = {HIT: b"HIT", MISS: b"MISS", STALE: b"STALE", REVALIDATED: b"REVALIDATED"}


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


Fetch = Callable[[], Awaitable[Fill]]
Revalidate = Callable[[Entry | None], Awaitable["Fill | _NotModified"]]


@define
class ProtocolCache:
    """
    The cached entries of one protocol.
    """

    protocol: str
    index: SQLiteIndex
    store: Store
    _clock: IReactorTime
    negative: NegativeCache[str]
    _coalescer: Coalescer[str, Served] = field(
        default=Factory(lambda self: Coalescer(protocol=self.protocol), takes_self=True)
    )

    async def _commit(self, key: str, fill: Fill) -> Entry:
        result = await fill.spool.commit()
        self.negative.discard(key)
        return await self.index.put(self.protocol, key, result.blob, fill.attrs)

    async def lookup(self, key: str) -> Entry | None:
        """
        The entry for C{key} if there is one, recording the access.
        """
        entry = await self.index.get(self.protocol, key)
        if entry is not None:
            self.index.touch(self.protocol, key)
        return entry

    async def immutable(self, key: str, fetch: Fetch | None) -> Served:
        """
        Content that never changes once published: served from the cache
        when present, fetched once otherwise. C{fetch} is L{None} in
        cache-only mode.
        """
        entry = await self.lookup(key)
        if entry is not None:
            return Served(entry, HIT)
        if fetch is None or key in self.negative:
            raise Missing(key)
        return await self._coalescer.run(key, lambda: self._fill(key, fetch))

    async def _fill(self, key: str, fetch: Fetch) -> Served:
        # A fill for this key may have finished between our lookup and
        # this operation starting.
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

    async def mutable(self, key: str, ttl: float, revalidate: Revalidate | None) -> Served:
        """
        Content that changes upstream: served from the cache for C{ttl}
        seconds after it was fetched or last revalidated, then revalidated
        (C{revalidate} gets the current entry for a conditional request).
        When upstream fails, the last good copy is served as stale.
        """
        entry = await self.lookup(key)
        if entry is not None and (revalidate is None or self.fresh(entry, ttl)):
            return Served(entry, HIT)
        if revalidate is None or (entry is None and key in self.negative):
            raise Missing(key)
        return await self._coalescer.run(key, lambda: self._refresh(key, entry, revalidate))

    async def _refresh(self, key: str, entry: Entry | None, revalidate: Revalidate) -> Served:
        try:
            result = await revalidate(entry)
        except Missing:
            self.negative.add(key)
            if entry is not None:
                await self.index.delete(self.protocol, key)
            raise
        except UpstreamError as e:
            if entry is None:
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
            renewed = await self.index.put(self.protocol, key, entry.blob, entry.attrs)
            return Served(renewed, REVALIDATED)
        return Served(await self._commit(key, result), MISS)

    async def forget(self, h: Hash) -> None:
        """
        The blob C{h} has gone from the store (an operator's repair, damage
        found and deleted): forget every entry that points at it, of any
        protocol, so that the next request fetches it again.
        """
        if await self.store.has(h):
            return  # back already: another request fetched it again
        forgotten = await self.index.forget_entries(h)
        if forgotten:
            log.warn("blob {hash} is missing from the store; {count} entries that pointed at it "
                     "will be fetched again", hash=h.hex, count=forgotten)
