"""
The cache core's rules for mutable entries, on a fake clock: fresh within
the TTL; past it, within the stale-while-revalidate window, the stale copy
at once and one revalidation in the background, whichever cache (process)
the requests land on; past the window, the revalidation waited for; and
stale-if-error as before.
"""

from __future__ import annotations

import os
from typing import Any, Iterator

import pytest
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.task import Clock
from twisted.logger import formatEvent, globalLogPublisher

from contentcache.cache import (
    HIT,
    MISS,
    NOT_MODIFIED,
    REVALIDATED,
    REVALIDATING,
    STALE,
    BACKGROUND_CONCURRENCY,
    BACKGROUND_RETRY,
    Background,
    Fill,
    Missing,
    ProtocolCache,
    Served,
    _NotModified,
)
from contentcache.hot import HotSet
from contentcache.index import Entry, SQLiteIndex
from contentcache.locks import FileLocks, KeyLocks
from contentcache.pool import SynchronousRunner
from contentcache.store import Store
from contentcache.upstream import NegativeCache, UpstreamError, UpstreamTimeout
from contentcache.web import cache_headers

from .conftest import resolve

TTL = 60.0
WINDOW = 3600.0
KEY = "example.com/m/@v/list"


class Upstream:
    """
    A scripted upstream: answers with C{content} (or raises C{error}), at
    once or, while C{held}, when the test lets it; counts what it is asked.
    """

    def __init__(self, store: Store) -> None:
        self.store = store
        self.content = b"v1.0.0\n"
        self.error: Exception | None = None
        self.not_modified = False
        self.held = False
        self.asked: list[Entry | None] = []
        self._waiting: list[Deferred[None]] = []

    async def revalidate(self, entry: Entry | None) -> Fill | _NotModified:
        self.asked.append(entry)
        if self.held:
            wait: Deferred[None] = Deferred()
            self._waiting.append(wait)
            try:
                await wait
            except CancelledError:
                # What the real upstream makes of a cancelled request.
                raise UpstreamTimeout("no response from upstream within 30 s") from None
        if self.error is not None:
            raise self.error
        if self.not_modified and entry is not None:
            return NOT_MODIFIED
        spool = await self.store.spool()
        await spool.write(self.content)
        return Fill(spool, {"etag": f'"{len(self.asked)}"'})

    def release(self) -> None:
        self.held = False
        waiting, self._waiting = self._waiting, []
        for wait in waiting:
            wait.callback(None)


@pytest.fixture
def upstream(store: Store) -> Upstream:
    return Upstream(store)


@pytest.fixture
def locks(tmp_path: Any, disk: SynchronousRunner, clock: Clock) -> KeyLocks:
    # Locks on a file, as between the workers of one machine: each cache
    # below stands for a process of its own.
    return KeyLocks(FileLocks(os.path.join(str(tmp_path), "run")), disk, clock)


def make_cache(index: SQLiteIndex, store: Store, clock: Clock, locks: KeyLocks | None = None,
               window: float = WINDOW) -> ProtocolCache:
    return ProtocolCache("go", index, store, clock, NegativeCache(clock, 60), HotSet(1 << 20), locks,
                         stale_while_revalidate=window, background=Background())


@pytest.fixture
def cache(index: SQLiteIndex, store: Store, clock: Clock, locks: KeyLocks) -> ProtocolCache:
    return make_cache(index, store, clock, locks)


@pytest.fixture
def logged() -> Iterator[list[dict[str, Any]]]:
    events: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(events.append)
    yield events
    globalLogPublisher.removeObserver(events.append)


def ask(cache: ProtocolCache, upstream: Upstream, **kwargs: Any) -> Deferred[Served]:
    return Deferred.fromCoroutine(cache.mutable(KEY, TTL, upstream.revalidate, body=True, **kwargs))


def answer(cache: ProtocolCache, upstream: Upstream, **kwargs: Any) -> Served:
    return resolve(ask(cache, upstream, **kwargs))


def body(cache: ProtocolCache, served: Served) -> bytes:
    if served.body is not None:
        return served.body
    return cache.store.read_now(served.entry.blob, 1 << 20) or b""


def filled(cache: ProtocolCache, upstream: Upstream, clock: Clock) -> Served:
    served = answer(cache, upstream)
    assert served.outcome == MISS and len(upstream.asked) == 1
    upstream.asked.clear()
    upstream.content = b"v1.0.0\nv1.1.0\n"  # what upstream says next
    return served


def test_fresh_within_the_ttl(cache: ProtocolCache, upstream: Upstream, clock: Clock) -> None:
    filled(cache, upstream, clock)
    clock.advance(TTL - 1)
    served = answer(cache, upstream)
    assert served.outcome == HIT and body(cache, served) == b"v1.0.0\n"
    assert upstream.asked == []


def test_stale_within_the_window_is_answered_at_once_and_revalidated_once(
    cache: ProtocolCache, upstream: Upstream, clock: Clock
) -> None:
    filled(cache, upstream, clock)
    clock.advance(TTL + 1)
    upstream.held = True  # a slow upstream
    answers = [answer(cache, upstream) for _ in range(10)]
    # Every one answered before upstream said anything: the stale copy.
    assert {a.outcome for a in answers} == {REVALIDATING}
    assert {body(cache, a) for a in answers} == {b"v1.0.0\n"}
    headers = cache_headers(answers[0].outcome, b"max-age=60")
    assert headers[b"x-cache"] == b"STALE" and headers[b"warning"] == b'110 - "Response is Stale"'
    assert len(upstream.asked) == 1 and upstream.asked[0] is not None  # conditional, with the entry
    assert len(cache.background) == 1

    upstream.release()
    assert len(cache.background) == 0
    served = answer(cache, upstream)
    assert served.outcome == HIT and body(cache, served) == b"v1.0.0\nv1.1.0\n"
    assert len(upstream.asked) == 1


def test_a_304_in_the_background_renews_the_copy(
    cache: ProtocolCache, upstream: Upstream, clock: Clock
) -> None:
    filled(cache, upstream, clock)
    upstream.not_modified = True
    clock.advance(TTL + 1)
    assert answer(cache, upstream).outcome == REVALIDATING
    served = answer(cache, upstream)
    assert served.outcome == HIT and body(cache, served) == b"v1.0.0\n"
    assert served.entry.created == clock.seconds()
    assert len(upstream.asked) == 1


@pytest.fixture(params=["files", "postgresql"])
def two_processes(request: pytest.FixtureRequest, locks: KeyLocks, disk: SynchronousRunner,
                  clock: Clock) -> Iterator[tuple[KeyLocks, KeyLocks]]:
    """
    The key locks of two processes: of workers on one machine (one file),
    or of two nodes (advisory locks, each on its own connection).
    """
    if request.param == "files":
        yield locks, locks
        return
    from contentcache.index.postgresql import AdvisoryLocks

    spaces = AdvisoryLocks(request.getfixturevalue("pg_dsn")), AdvisoryLocks(request.getfixturevalue("pg_dsn"))
    try:
        yield KeyLocks(spaces[0], disk, clock), KeyLocks(spaces[1], disk, clock)
    finally:
        for space in spaces:
            space.close()


def test_one_revalidation_whichever_process_is_asked(
    index: SQLiteIndex, store: Store, clock: Clock, two_processes: tuple[KeyLocks, KeyLocks], upstream: Upstream
) -> None:
    first, second = (make_cache(index, store, clock, locks) for locks in two_processes)
    filled(first, upstream, clock)
    assert answer(second, upstream).outcome == HIT  # now held in its memory too
    clock.advance(TTL + 1)
    upstream.held = True
    assert answer(first, upstream).outcome == REVALIDATING
    for _ in range(5):
        # The other process finds the key's lock held: it leaves it to the first.
        assert answer(second, upstream).outcome == REVALIDATING
    assert len(upstream.asked) == 1 and len(second.background) == 0

    upstream.release()
    # The second still holds the stale copy in memory (until it reads the
    # index's log of changes): it answers that once more, and finds from
    # the index that there is nothing to revalidate.
    served = answer(second, upstream)
    assert served.outcome == REVALIDATING and body(second, served) == b"v1.0.0\n"
    for cache in (second, first):
        served = answer(cache, upstream)
        assert served.outcome == HIT and body(cache, served) == b"v1.0.0\nv1.1.0\n"
    assert len(upstream.asked) == 1


def test_past_the_window_the_revalidation_is_waited_for(
    cache: ProtocolCache, upstream: Upstream, clock: Clock
) -> None:
    filled(cache, upstream, clock)
    clock.advance(TTL + WINDOW + 1)
    upstream.held = True
    waiting = [ask(cache, upstream) for _ in range(3)]
    assert not any(d.called for d in waiting)
    assert len(upstream.asked) == 1
    upstream.release()
    for d in waiting:
        served = resolve(d)
        assert served.outcome == MISS and body(cache, served) == b"v1.0.0\nv1.1.0\n"
    assert len(cache.background) == 0


def test_a_revalidation_asked_for_is_waited_for_within_the_window(
    cache: ProtocolCache, upstream: Upstream, clock: Clock
) -> None:
    filled(cache, upstream, clock)
    clock.advance(TTL + 1)
    upstream.held = True
    d = ask(cache, upstream, background=False)
    assert not d.called
    upstream.release()
    assert resolve(d).outcome == MISS


@pytest.mark.parametrize("not_modified", [False, True])
def test_a_window_of_0_waits_and_serves_stale_if_upstream_fails(
    index: SQLiteIndex, store: Store, clock: Clock, locks: KeyLocks, upstream: Upstream, not_modified: bool
) -> None:
    cache = make_cache(index, store, clock, locks, window=0)
    filled(cache, upstream, clock)
    upstream.not_modified = not_modified
    clock.advance(TTL + 1)
    upstream.held = True
    d = ask(cache, upstream)
    assert not d.called
    upstream.release()
    served = resolve(d)
    assert served.outcome == (REVALIDATED if not_modified else MISS)
    clock.advance(TTL + 1)
    upstream.error = UpstreamError("upstream answered 503 for example.com/m/@v/list")
    served = answer(cache, upstream)
    assert served.outcome == STALE and served.reason == "upstream answered 503 for example.com/m/@v/list"
    headers = cache_headers(served.outcome, b"max-age=60")
    assert headers[b"x-cache"] == b"STALE" and headers[b"warning"] == b'111 - "Revalidation Failed"'
    assert len(cache.background) == 0


def test_a_failed_background_revalidation_is_logged_and_the_stale_copy_kept(
    cache: ProtocolCache, upstream: Upstream, clock: Clock, logged: list[dict[str, Any]],
    clean_reactor: list[dict[str, Any]],
) -> None:
    filled(cache, upstream, clock)
    clock.advance(TTL + 1)
    upstream.error = UpstreamError("upstream refused the connection")
    served = answer(cache, upstream)
    assert served.outcome == REVALIDATING and body(cache, served) == b"v1.0.0\n"
    lines = [formatEvent(e) for e in logged if "revalidating" in (e.get("log_format") or "")]
    assert lines == ["revalidating go example.com/m/@v/list in the background failed: upstream refused "
                     "the connection; its stale copy is served meanwhile"]
    assert not clean_reactor  # no traceback
    # Kept, and still answered at once, now as stale-if-error says (111,
    # the reason); not asked again for BACKGROUND_RETRY seconds.
    served = answer(cache, upstream)
    assert served.outcome == STALE and served.reason == "upstream refused the connection"
    assert body(cache, served) == b"v1.0.0\n" and len(upstream.asked) == 1
    clock.advance(BACKGROUND_RETRY)
    upstream.error = None
    assert answer(cache, upstream).outcome == STALE  # the failure stands until the retry ends
    assert len(upstream.asked) == 2
    served = answer(cache, upstream)
    assert served.outcome == HIT and body(cache, served) == b"v1.0.0\nv1.1.0\n"


def test_a_404_in_the_background_removes_the_entry(
    cache: ProtocolCache, upstream: Upstream, clock: Clock, index: SQLiteIndex
) -> None:
    filled(cache, upstream, clock)
    clock.advance(TTL + 1)
    upstream.error = Missing(KEY)
    assert answer(cache, upstream).outcome == REVALIDATING
    assert resolve(index.get("go", KEY)) is None
    # Remembered as missing, as after a 404 waited for.
    with pytest.raises(Missing):
        answer(cache, upstream)
    assert len(upstream.asked) == 1


def test_stopping_cancels_the_background_work_quietly(
    cache: ProtocolCache, upstream: Upstream, clock: Clock, locks: KeyLocks, logged: list[dict[str, Any]],
    index: SQLiteIndex,
) -> None:
    filled(cache, upstream, clock)
    clock.advance(TTL + 1)
    upstream.held = True
    assert answer(cache, upstream).outcome == REVALIDATING
    assert len(cache.background) == 1
    resolve(cache.background.stopService())
    assert len(cache.background) == 0
    assert [formatEvent(e) for e in logged if e.get("log_level") and e["log_level"].name in ("warn", "error")] == []
    # The key's lock was let go of, and the stale copy is still there.
    token = locks.space.try_lock(f"go\0{KEY}")
    assert token is not None
    locks.space.unlock(token)
    entry = resolve(index.get("go", KEY))
    assert entry is not None and entry.created == 0
    # Nothing more starts once stopping.
    assert answer(cache, upstream).outcome == REVALIDATING
    assert len(cache.background) == 0 and len(upstream.asked) == 1


class ReentrantLocks(FileLocks):
    """
    Locks as a PostgreSQL session holds advisory locks: the process's one
    session takes a lock it holds already.
    """

    def __init__(self, directory: str) -> None:
        super().__init__(directory)
        self.held: dict[str, Any] = {}

    def try_lock(self, name: str) -> Any:
        if name in self.held:
            return self.held[name]
        token = super().try_lock(name)
        if token is not None:
            self.held[name] = token
        return token

    def unlock(self, token: Any) -> None:
        for name, held in list(self.held.items()):
            if held is token:
                del self.held[name]
        super().unlock(token)


def test_a_waited_for_revalidation_joins_the_one_in_the_background(
    tmp_path: Any, index: SQLiteIndex, store: Store, clock: Clock, disk: SynchronousRunner, upstream: Upstream,
) -> None:
    locks = KeyLocks(ReentrantLocks(os.path.join(str(tmp_path), "pg")), disk, clock)
    cache = make_cache(index, store, clock, locks)
    filled(cache, upstream, clock)
    clock.advance(TTL + 1)
    upstream.held = True
    assert answer(cache, upstream).outcome == REVALIDATING
    # A request that may not be answered stale (a forced refresh) while
    # the background revalidation runs: it waits for that one.
    waiting = ask(cache, upstream, background=False)
    assert not waiting.called
    upstream.release()
    served = resolve(waiting)
    assert served.outcome == HIT and body(cache, served) == b"v1.0.0\nv1.1.0\n"
    assert len(upstream.asked) == 1


def test_a_failure_is_forgotten_once_the_copy_is_revalidated_another_way(
    cache: ProtocolCache, upstream: Upstream, clock: Clock
) -> None:
    filled(cache, upstream, clock)
    clock.advance(TTL + 1)
    upstream.error = UpstreamError("upstream refused the connection")
    assert answer(cache, upstream).outcome == REVALIDATING  # and fails behind
    assert answer(cache, upstream).outcome == STALE
    # A request that waits for its revalidation gets it, upstream back.
    upstream.error = None
    clock.advance(1)
    assert answer(cache, upstream, background=False).outcome == MISS
    # Stale again a TTL later: being revalidated, not upstream's failure.
    clock.advance(TTL + 1)
    served = answer(cache, upstream)
    assert served.outcome == REVALIDATING and served.reason is None


def test_a_forced_revalidation_does_not_wait_for_queued_work(
    cache: ProtocolCache, upstream: Upstream, clock: Clock
) -> None:
    filled(cache, upstream, clock)
    clock.advance(TTL + 1)
    blockers: list[Deferred[None]] = []

    async def hang() -> None:
        d: Deferred[None] = Deferred()
        blockers.append(d)
        await d

    for n in range(BACKGROUND_CONCURRENCY):
        assert cache.background.start(("other", n), hang)
    assert answer(cache, upstream).outcome == REVALIDATING  # queued behind the others
    served = answer(cache, upstream, background=False)
    assert served.outcome == MISS and len(upstream.asked) == 1
    for d in blockers:
        d.callback(None)
