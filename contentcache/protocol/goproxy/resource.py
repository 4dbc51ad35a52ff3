"""
The GOPROXY protocol under C{/goproxy/}: module versions, lists and
queries, and checksum-database proxying, translated into cache lookups and
upstream fetches.
"""

from __future__ import annotations

import hashlib
import json
from typing import Awaitable, Callable

from attrs import define, evolve, field, frozen
from twisted.internet.defer import CancelledError, Deferred, DeferredSemaphore, FirstError, gatherResults
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.web.http import NOT_FOUND, OK
from twisted.web.server import Request

from ... import activity, metrics
from ...backend import StorageUnavailable
from ...cache import (
    HIT,
    MISS,
    STALE,
    Fetch,
    Fill,
    IntegrityError,
    Missing,
    ProtocolCache,
    Served,
    _NotModified,
    body_or_status,
)
from ...index import Entry, IndexUnavailable
from ...policy import Policy, Refused, is_prerelease, parse_time, version_key
from ...pool import Runner
from ...store import BlobNotFound, Store
from ...routes import GoRoute, first_match
from ...space import is_full
from ...upstream import Upstream, UpstreamError, conditional_headers
from ...web import (
    CHUNK_SIZE, IMMUTABLE, TEXT, IGuard, ProtocolResource, cache_headers, path_segments, read_blob, refetching,
    send_blob, text,
)
from .modzip import MAX_GO_MOD_SIZE, MAX_ZIP_SIZE, ZipRuleError, check_and_hash_zip, hash_go_mod
from .paths import InvalidPath, Module, Version, escape, is_canonical, match_prefix_patterns, unescape
from .sumdb import (
    HASH_SIZE, MAX_RECORD_SIZE, InvalidSumDB, Place, SumDB, Tile, check_tile, client_tiles, lookup_places,
    parse_lookup, parse_record, parse_tile, tile_prefix,
)

log = Logger()

PROTOCOL = "go"
SUMDB_PROTOCOL = "gosumdb"
DEFAULT_METADATA_TTL = 10 * 60.0
#: .info, lists and sumdb answers are small; anything bigger is not one.
MAX_METADATA_SIZE = 16 << 20
JSON = b"application/json"
ZIP = b"application/zip"
OCTETS = b"application/octet-stream"
#: .info files fetched at once to learn the versions' times for a policy.
INFO_FETCHES = 8
#: Lists (filtered by a policy) and versions' times kept in memory.
MAX_LISTS_HELD = 1024
MAX_TIMES_HELD = 65536
#: How soon a version whose time could not be learnt is asked about again.
TIME_RETRY = 60.0
#: The index attribute of a tile cut from a wider one: that one's path.
DERIVED_FROM = "derived_from"
#: Wider tiles tried in turn (widest first) before asking upstream: more
#: than one only when a held tile is not of its width.
MAX_DERIVATION_SOURCES = 3
#: At most this many tiles at one N are considered (2**H + 1 with the full
#: one, for the sumdb's own height of 8).
MAX_HELD_TILES = 1025
#: Tiles fetched ahead of the go clients at once, for each database (in
#: one piece of background work: the others' revalidations are not kept
#: waiting).
PREFETCH_FETCHES = 4
#: Stored lookups whose tiles a process fetches ahead, for each database
#: (the first so many by key, when there are more).
MAX_PROVEN_LOOKUPS = 65536
#: Stored lookups read, or tiles looked for, at once (one trip to the
#: disk pool).
ENTRIES_AT_ONCE = 256
#: Tiles a process remembers it holds, for each database (not asked for
#: again); the oldest are forgotten first.
MAX_KNOWN_TILES = 131072
#: After fetching ahead fell short (the database gone, the storage full),
#: how soon a lookup served tries again.
PREFETCH_RETRY = 60.0
#: Seconds between the starts of two rounds of fetching ahead.
PREFETCH_INTERVAL = 5.0


@define
class _Proofs:
    """
    One checksum database's stored lookups as this process knows them,
    for fetching ahead the tiles a go client checks them against.
    """

    #: The stored lookups read: for each (by key), where the hashes are
    #: that a go client reads for it (L{lookup_places}) and the tree it
    #: names; L{None} for one that names none.
    lookups: dict[str, tuple[frozenset[Place], int] | None] = field(factory=dict)
    #: When the last round began.
    round_began: float = float("-inf")

    @property
    def places(self) -> set[Place]:
        return {place for known in self.lookups.values() if known is not None for place in known[0]}

    @property
    def size(self) -> int:
        """
        The largest tree they name: the tiles are fetched as it has them,
        and those of every smaller tree are cut from them.
        """
        return max((known[1] for known in self.lookups.values() if known is not None), default=0)
    #: Paths of the tiles known to be held, oldest first.
    held: dict[str, None] = field(factory=dict)
    #: A lookup was served since the running prefetch read the stored ones.
    pending: bool = False
    #: When the last prefetch fell short of a tile.
    short_since: float | None = None
    warned: bool = False

    def holds(self, path: str) -> None:
        if len(self.held) >= MAX_KNOWN_TILES:
            del self.held[next(iter(self.held))]
        self.held[path] = None


@frozen
class Made:
    """
    An answer made here rather than a stored one: a list filtered by the
    policy, or made from the versions held when upstream could not say.
    """

    body: bytes
    outcome: str


@define
class GoProxy:
    """
    The GOPROXY adapter's state: where to fetch from, the caches, and the
    checksum database used to verify what is fetched.
    """

    store: Store
    cache: ProtocolCache
    sumdb_cache: ProtocolCache
    _disk: Runner
    _clock: IReactorTime
    upstream: Upstream | None
    #: Configured checksum databases by name, each with its upstream.
    sumdbs: dict[str, tuple[SumDB, Upstream]] = field(factory=dict)
    #: The database that verifies downloads: the first configured.
    verifier: str | None = None
    metadata_ttl: float = DEFAULT_METADATA_TTL
    #: GONOSUMDB-style patterns: modules never looked up in the database
    #: (their names are private), stored unverified.
    nosumdb: str = ""
    #: Private modules' upstreams, first match wins (the config file's).
    #: A routed module is never looked up in a checksum database.
    routes: list[GoRoute] = field(factory=list)
    #: The minimum release age and deny rules (none by default).
    policy: Policy = field(factory=lambda: Policy(PROTOCOL))
    _unreachable_warned: bool = False
    #: Filtered lists: (module, list's hash, policy) -> (body, until).
    _lists: dict[tuple[str, str, str], tuple[bytes, float]] = field(factory=dict)
    #: Each canonical version's .info Time ("module@version" -> seconds).
    _times: dict[str, float | None] = field(factory=dict)
    #: Each checksum database's stored lookups, whose tiles are fetched
    #: ahead of the go clients.
    _proofs: dict[str, _Proofs] = field(factory=dict)

    def route_for(self, module: Module) -> GoRoute | None:
        return first_match(self.routes, module.path)

    def upstream_for(self, module: Module) -> Upstream | None:
        route = self.route_for(module)
        return route.upstream if route is not None else self.upstream

    # Fetches, each returning what the cache should store.

    async def _get(
        self, upstream: Upstream, path: str, limit: int, headers: dict[str, str] | None = None
    ) -> Fill | _NotModified:
        fetched = await upstream.fetch(self.store, upstream.url(path), headers, limit)
        body = body_or_status(fetched, path, conditional=bool(headers))
        if isinstance(body, _NotModified):
            return body
        attrs = {
            k: v
            for k, v in (
                ("etag", fetched.header("etag")),
                ("last_modified", fetched.header("last-modified")),
            )
            if v
        }
        return Fill(body, attrs)

    async def _get_new(self, upstream: Upstream, path: str, limit: int) -> Fill:
        fill = await self._get(upstream, path, limit)
        assert isinstance(fill, Fill)
        return fill

    def _revalidator(
        self, upstream: Upstream | None, path: str, limit: int = MAX_METADATA_SIZE
    ) -> Callable[[Entry | None], Awaitable[Fill | _NotModified]] | None:
        if upstream is None:
            return None

        async def revalidate(entry: Entry | None) -> Fill | _NotModified:
            headers = None
            if entry is not None:
                headers = conditional_headers(
                    entry.attrs.get("etag"), entry.attrs.get("last_modified")
                )
            return await self._get(upstream, path, limit, headers)

        return revalidate

    async def _fetch_mod(self, module: Module, version: Version, key: str) -> Fill:
        upstream = self.upstream_for(module)
        assert upstream is not None
        fill = await self._get_new(upstream, key, MAX_GO_MOD_SIZE)
        try:
            h1 = await self._disk.run(hash_go_mod, fill.spool.path)
        except BaseException:
            await fill.spool.abort()
            raise
        return await self._verified(fill, module, version, "/go.mod", h1)

    async def _fetch_zip(self, module: Module, version: Version, key: str) -> Fill:
        upstream = self.upstream_for(module)
        assert upstream is not None
        fill = await self._get_new(upstream, key, MAX_ZIP_SIZE)
        try:
            h1 = await self._disk.run(check_and_hash_zip, fill.spool.path, module.path, version.name)
        except ZipRuleError as e:
            await fill.spool.abort()
            log.error(
                "refusing {module}@{version}.zip from upstream: {error}",
                module=module.path,
                version=version.name,
                error=e,
            )
            raise IntegrityError(f"{module.path}@{version.name}: bad module zip: {e}") from None
        except BaseException:
            await fill.spool.abort()
            raise
        return await self._verified(fill, module, version, "", h1)

    async def _verified(
        self, fill: Fill, module: Module, version: Version, suffix: str, h1: str
    ) -> Fill:
        """
        Compare C{h1} with the checksum database's record; the artifact is
        discarded on a mismatch, stored unverified when the database cannot
        say.
        """
        try:
            verified = await self._check_sum(module, version, suffix, h1)
        except BaseException:
            await fill.spool.abort()
            raise
        return Fill(fill.spool, {**fill.attrs, "h1": h1, "verified": verified})

    async def _check_sum(self, module: Module, version: Version, suffix: str, h1: str) -> bool:
        if self.verifier is None or match_prefix_patterns(self.nosumdb, module.path) or self.route_for(module):
            return False
        sumdb, upstream = self.sumdbs[self.verifier]
        try:
            served = await self.sumdb_lookup(sumdb.name, module, version, prefetch=False)
        except Missing:
            log.info(
                "{sumdb} has no record of {module}@{version}; stored unverified",
                sumdb=sumdb.name,
                module=module.path,
                version=version.name,
            )
            return False
        except UpstreamError as e:
            if not self._unreachable_warned:
                self._unreachable_warned = True
                log.warn(
                    "checksum database {sumdb} is unreachable ({error}); storing "
                    "downloads unverified until it answers (the go command still "
                    "verifies them)",
                    sumdb=sumdb.name,
                    error=e,
                )
            return False
        if self._unreachable_warned:
            self._unreachable_warned = False
            log.info("checksum database {sumdb} answers again", sumdb=sumdb.name)
        try:
            body = await read_blob(self.store, served.entry.blob, MAX_METADATA_SIZE)
        except BlobNotFound as e:
            await self.sumdb_cache.forget(e.hash)
            served = await self.sumdb_lookup(sumdb.name, module, version, prefetch=False)
            body = await read_blob(self.store, served.entry.blob, MAX_METADATA_SIZE)
        record = parse_record(body)
        expected = record.get(f"{module.path} {version.name}{suffix}")
        if expected is None:
            self.prove(sumdb.name, _lookup_key(sumdb.name, module, version))
            return False
        if expected != h1:
            log.critical(
                "CHECKSUM MISMATCH for {module}@{version}{suffix}: upstream sent {actual}, "
                "checksum database {sumdb} says {expected}; not stored, not served",
                module=module.path,
                version=version.name,
                suffix=suffix,
                actual=h1,
                expected=expected,
                sumdb=sumdb.name,
            )
            raise IntegrityError(
                f"{module.path}@{version.name}{suffix}: checksum mismatch with {sumdb.name}"
            )
        # Served, so a go client may check it (not so a refused download).
        self.prove(sumdb.name, _lookup_key(sumdb.name, module, version))
        return True

    async def sumdb_lookup(self, name: str, module: Module, version: Version, prefetch: bool = True) -> Served:
        """
        The database's lookup answer for C{module@version}; with
        C{prefetch}, the tiles a go client checks it against are fetched
        ahead (L{prove}).
        """
        sumdb, upstream = self.sumdbs[name]
        key = _lookup_key(name, module, version)
        path = key.removeprefix(f"{name}/")
        served = await self.sumdb_cache.immutable(key, lambda: self._get_new(upstream, path, MAX_METADATA_SIZE))
        if prefetch:
            self.prove(name, key)
        return served

    def prove(self, name: str, key: str) -> None:
        """
        Fetch ahead, in the background, the tiles a go client with an empty
        module cache checks the stored lookup C{key} against, with every
        other lookup of database C{name} it may be served (L{client_tiles}
        of them all, in the largest tree they name): unless this process
        has done so since that tree grew, or fell short and tried less than
        L{PREFETCH_RETRY} ago.
        """
        proofs = self._proofs.get(name)
        if proofs is None:
            proofs = self._proofs[name] = _Proofs()
        if key in proofs.lookups or len(proofs.lookups) >= MAX_PROVEN_LOOKUPS:
            if proofs.short_since is None or self._clock.seconds() - proofs.short_since < PREFETCH_RETRY:
                return
        proofs.pending = True
        # One piece of work per database: what it has not read when it
        # ends its round, it reads in the next.
        self.sumdb_cache.background.start((SUMDB_PROTOCOL, name, "proofs"), lambda: self._prove(name, proofs))

    async def _prove(self, name: str, proofs: _Proofs) -> None:
        background = self.sumdb_cache.background
        while proofs.pending and not background.stopping:
            # At most a round every PREFETCH_INTERVAL: the lookups served
            # meanwhile wait for the next.
            wait = proofs.round_began + PREFETCH_INTERVAL - self._clock.seconds()
            if wait > 0:
                await deferLater(self._clock, wait)
                if background.stopping:
                    return
            proofs.round_began = self._clock.seconds()
            proofs.pending = False
            problem: str | None
            try:
                await self._read_lookups(name, proofs)
                if background.stopping:
                    return
                complete, problem = await self._fetch_proofs(name, proofs)
            except (IndexUnavailable, StorageUnavailable) as e:
                complete, problem = False, f"reading the stored lookups: {e}"
            except Exception as e:
                if not is_full(e):
                    raise
                complete, problem = False, None  # the storage's state says so
            if background.stopping:
                return
            if complete:
                proofs.short_since = None
                if proofs.warned:
                    proofs.warned = False
                    log.info("prefetching {sumdb} tiles again", sumdb=name)
                continue
            proofs.short_since = self._clock.seconds()
            # Once until a prefetch works again: a client asking for the
            # tile fetches it then, or sees the error itself.
            if problem is not None and not proofs.warned:
                proofs.warned = True
                log.warn(
                    "could not prefetch {sumdb} tiles ({error}); go clients fetch them when they ask",
                    sumdb=name, error=problem,
                )

    async def _read_lookups(self, name: str, proofs: _Proofs) -> None:
        """
        Read the stored lookups of database C{name} this process has not
        (any process may have stored them): where the hashes are that
        prove them, and the largest tree they name.
        """
        keys = await self.sumdb_cache.keys(f"{name}/lookup/", MAX_PROVEN_LOOKUPS)
        # Those gone (expired, purged) are proved no more.
        stored = set(keys)
        for gone in [key for key in proofs.lookups if key not in stored]:
            del proofs.lookups[gone]
        unread = [key for key in keys if key not in proofs.lookups]
        store = self.store

        def read(entry: Entry) -> bytes | None:
            # On the disk pool, in the trip that finds the entries.
            return store.read_now(entry.blob, MAX_METADATA_SIZE)

        for start in range(0, len(unread), ENTRIES_AT_ONCE):
            batch = unread[start:start + ENTRIES_AT_ONCE]
            rows = await self.sumdb_cache.index.lookup(SUMDB_PROTOCOL, [(key, read) for key in batch])
            for key, row in zip(batch, rows):
                if row is None:
                    continue  # gone meanwhile
                entry, body = row
                if body is None:
                    try:
                        body = await read_blob(self.store, entry.blob, MAX_METADATA_SIZE)
                    except BlobNotFound as e:
                        await self.sumdb_cache.forget(e.hash)
                        continue  # fetched again when it is asked for
                try:
                    record, tree = parse_lookup(body)
                except InvalidSumDB as e:
                    proofs.lookups[key] = None
                    log.warn("{sumdb} {key}: {error}; no tiles are fetched ahead for it",
                             sumdb=name, key=key.removeprefix(f"{name}/"), error=e)
                    continue
                proofs.lookups[key] = (frozenset(lookup_places(record, tree)), tree)
            if self.sumdb_cache.background.stopping:
                return

    async def _fetch_proofs(self, name: str, proofs: _Proofs) -> tuple[bool, str | None]:
        """
        Fetch the tiles that prove the stored lookups as the largest tree
        they name has them (L{client_tiles}), but those held: whether all
        are held now, and if not, what went wrong first that is worth
        saying.
        """
        places = proofs.places
        if not places:
            return True, None
        # (The plan is the CPU's work for many lookups: off the reactor.)
        tiles = await self._disk.run(client_tiles, list(places), proofs.size)
        unknown = [tile for tile in tiles if tile.path() not in proofs.held]
        background = self.sumdb_cache.background
        # Those held, found many at a time (a process that starts knows
        # none of them).
        missing = []
        for start in range(0, len(unknown), ENTRIES_AT_ONCE):
            batch = unknown[start:start + ENTRIES_AT_ONCE]
            rows = await self.sumdb_cache.index.lookup(
                SUMDB_PROTOCOL, [(f"{name}/{tile.path()}", None) for tile in batch]
            )
            for tile, row in zip(batch, rows):
                if row is None:
                    missing.append(tile)
                else:
                    proofs.holds(tile.path())
            if background.stopping:
                return False, None
        wanted = iter(missing)
        problems: list[str] = []
        short = []

        async def fetch_each() -> None:
            for tile in wanted:
                if background.stopping:
                    return
                path = tile.path()
                try:
                    await self._prefetch_tile(name, tile)
                except Missing:
                    problems.append(f"{path}: the database does not have it")
                except (UpstreamError, IndexUnavailable, StorageUnavailable, BlobNotFound) as e:
                    problems.append(f"{path}: {e}")
                except CancelledError:
                    raise
                except Exception as e:
                    if not is_full(e):
                        raise
                    short.append(path)  # the storage's state says so
                else:
                    proofs.holds(path)

        fetchers = [Deferred.fromCoroutine(fetch_each()) for _ in range(PREFETCH_FETCHES)]
        try:
            await gatherResults(fetchers, consumeErrors=True)
        except FirstError as e:
            for fetcher in fetchers:
                fetcher.cancel()  # none left running outside the background work
            e.subFailure.raiseException()
        return not (problems or short), (problems[0] if problems else None)

    async def _prefetch_tile(self, name: str, tile: Tile) -> None:
        """
        Have C{tile} held: fetched from the database unless it is, or, for
        a partial tile, a wider one is (a request for it is cut from that).
        """
        sumdb, upstream = self.sumdbs[name]

        def fetch(path: str) -> Fetch:
            async def fetched() -> Fill:
                fill = await self._get_new(upstream, path, MAX_METADATA_SIZE)
                # Here, where only the prefetch fetches: a client's fill it
                # joined is not counted.
                metrics.sumdb_prefetched_tiles.inc()
                return fill
            return fetched

        path = tile.path()
        if tile.width < tile.full_width:
            if await self._wider_held(name, tile):
                return
            try:
                await self.sumdb_cache.immutable(f"{name}/{path}", fetch(path))
                return
            except Missing:
                # A database may keep only the full tile once it is
                # complete (the go command then asks for that one).
                path = tile.path(tile.full_width)
        await self.sumdb_cache.immutable(f"{name}/{path}", fetch(path))

    # Answers to each route.

    async def module_file(self, module: Module, version: Version, ext: str) -> Served:
        key = f"{module.escaped}/@v/{version.escaped}.{ext}"
        upstream = self.upstream_for(module)
        if ext == "info" and not version.canonical:
            return await self.cache.mutable(
                key, self.metadata_ttl, self._revalidator(upstream, key), body=True
            )
        if not version.canonical:
            raise Missing(f"{module.path}@{version.name}: .{ext} needs a canonical version")
        if upstream is None:
            return await self.cache.immutable(key, None, body=True)
        if ext == "zip":
            return await self.cache.immutable(key, lambda: self._fetch_zip(module, version, key), body=True)
        if ext == "mod":
            return await self.cache.immutable(key, lambda: self._fetch_mod(module, version, key), body=True)
        return await self.cache.immutable(
            key, lambda: self._get_new(upstream, key, MAX_METADATA_SIZE), body=True
        )

    async def latest(self, module: Module) -> Served:
        key = f"{module.escaped}/@latest"
        return await self.cache.mutable(
            key, self.metadata_ttl, self._revalidator(self.upstream_for(module), key), body=True
        )

    async def version_list(self, module: Module) -> Served | Made:
        """
        Upstream's list of versions; when upstream cannot be asked and no
        list was ever fetched, the versions this cache holds.
        """
        key = f"{module.escaped}/@v/list"
        upstream = self.upstream_for(module)
        try:
            return await self.cache.mutable(
                key, self.metadata_ttl, self._revalidator(upstream, key), body=True
            )
        except (UpstreamError, Missing) as e:
            if isinstance(e, Missing) and upstream is not None:
                raise
            versions = await self.cached_versions(module)
            if not versions:
                raise
            return Made("".join(f"{v}\n" for v in versions).encode("utf-8"), STALE)

    async def cached_versions(self, module: Module) -> list[str]:
        prefix = f"{module.escaped}/@v/"
        versions = set()
        for key in await self.cache.keys(prefix):
            name, _, ext = key[len(prefix):].rpartition(".")
            if ext in ("info", "mod", "zip"):
                version = unescape(name, "version")
                if is_canonical(version):
                    versions.add(version)
        return sorted(versions)

    # The policy: what it hides is left out of lists and @latest, and
    # refused (403, so that the go command does not go on to direct) where
    # it is asked for by name.

    async def _body(self, served: Served) -> bytes:
        if served.body is not None:
            return served.body
        return await read_blob(self.store, served.entry.blob, MAX_METADATA_SIZE)

    async def published(self, module: Module, version: str) -> float | None:
        """
        The C{Time} of a canonical version's .info (fetched once and
        kept: it never changes), L{None} if it has none; L{Missing} or
        L{UpstreamError} if the .info cannot be had.
        """
        key = f"{module.path}@{version}"
        if key in self._times:
            return self._times[key]
        if not is_canonical(version):
            return None  # not a version a list may name: no time, hidden
        served = await self.module_file(module, Version.parse(escape(version)), "info")
        try:
            info = json.loads(await self._body(served))
        except ValueError:
            info = None
        published = parse_time(info.get("Time")) if isinstance(info, dict) else None
        self._remember_time(key, published)
        return published

    def _remember_time(self, key: str, published: float | None) -> None:
        if len(self._times) >= MAX_TIMES_HELD:
            del self._times[next(iter(self._times))]
        self._times[key] = published

    async def _info(self, served: Served, what: str) -> dict[str, object]:
        """
        An .info or @latest answer's JSON; what is not JSON is upstream's
        failure (the policy cannot say whether it may be served).
        """
        try:
            info = json.loads(await self._body(served))
        except ValueError:
            raise UpstreamError(f"{what}: upstream's answer is not JSON") from None
        if not isinstance(info, dict) or not isinstance(info.get("Version"), str):
            raise UpstreamError(f"{what}: upstream's answer names no Version")
        return info

    async def check_version(self, module: Module, version: str, published: float | None = None) -> None:
        """
        Raise L{Refused} if the policy hides C{module@version}
        (C{published}: its time, when the caller has it). A deny rule is
        decided before any time is asked for.
        """
        policy = self.policy
        if not policy.applies(module.path):
            return
        denied = policy.denied(module.path, version)
        if denied is not None:
            raise Refused(PROTOCOL, denied)
        if published is None and policy.needs_times(module.path, version):
            try:
                published = await self.published(module, version)
            except Missing:
                if self.upstream_for(module) is not None:
                    raise  # no such version
                # Cache-only, its .info never fetched: fail closed with a
                # 403, not a 404 that sends the go command direct.
        hidden = policy.verdict(module.path, version, published, self._clock.seconds())
        if hidden is not None:
            raise Refused(PROTOCOL, hidden)

    async def held_verdicts(self, module: Module, versions: list[str]) -> dict[str, str]:
        """
        Why the policy hides each of C{versions} that it hides, by what is
        held (upstream is not asked and no use is recorded: for the status
        page). A version whose .info is not held is decided by deny rules
        alone.
        """
        policy = self.policy
        if not policy.applies(module.path):
            return {}
        now = self._clock.seconds()
        out = {}
        for version in versions:
            hidden = policy.denied(module.path, version)
            if hidden is None and policy.needs_times(module.path, version):
                key = f"{module.path}@{version}"
                if key not in self._times:
                    info_key = f"{module.escaped}/@v/{escape(version)}.info"
                    rows = await self.cache.index.lookup(PROTOCOL, [(info_key, None)])
                    if rows[0] is None:
                        continue
                    try:
                        info = json.loads(await read_blob(self.store, rows[0][0].blob, MAX_METADATA_SIZE))
                    except (ValueError, BlobNotFound):
                        continue
                    self._remember_time(key, parse_time(info.get("Time")) if isinstance(info, dict) else None)
                hidden = policy.verdict(module.path, version, self._times.get(key), now)
            if hidden is not None:
                out[version] = hidden.reason
        return out

    async def allowed_file(self, module: Module, version: Version, ext: str) -> Served:
        """
        L{module_file}, refused if the policy hides the version (for a
        query such as a branch name, the version it resolves to).
        """
        if not self.policy.applies(module.path):
            return await self.module_file(module, version, ext)
        if version.canonical:
            await self.check_version(module, version.name)
            return await self.module_file(module, version, ext)
        served = await self.module_file(module, version, ext)
        info = await self._info(served, f"{module.path}@{version.name}")
        await self.check_version(module, str(info["Version"]), parse_time(info.get("Time")))
        return served

    async def allowed_list(self, module: Module) -> Served | Made:
        """
        L{version_list} without the versions the policy hides.
        """
        listed = await self.version_list(module)
        policy = self.policy
        if not policy.applies(module.path):
            return listed
        if isinstance(listed, Made):
            body, outcome = listed.body, listed.outcome
            source = hashlib.sha256(body).hexdigest()
        else:
            body, source, outcome = await self._body(listed), listed.entry.hash.hex, listed.outcome
        now = self._clock.seconds()
        # (Two modules' lists may be the same blob.)
        memo = (module.path, source, policy.digest)
        held = self._lists.get(memo)
        if held is not None and now < held[1]:
            return Made(held[0], outcome)
        versions = [line.strip() for line in body.decode("utf-8", "replace").splitlines() if line.strip()]
        times: dict[str, float | None] = {}
        timed = [v for v in versions if policy.denied(module.path, v) is None and policy.needs_times(module.path, v)]
        if timed:
            limit = DeferredSemaphore(INFO_FETCHES)

            async def one(version: str) -> None:
                try:
                    times[version] = await self.published(module, version)
                except (Missing, UpstreamError, IntegrityError, InvalidPath):
                    times[version] = None  # hidden, and asked again soon

            try:
                await gatherResults([limit.run(one, v) for v in timed], consumeErrors=True)
            except FirstError as e:
                # The first failure as itself (an index or storage fault).
                e.subFailure.raiseException()
        hidden, until = policy.hidden_versions(module.path, versions, times, now)
        if any(times.get(v) is None and h.rule == "min-age" for v, h in hidden.items()):
            until = min(until, now + TIME_RETRY)
        filtered = "".join(f"{v}\n" for v in versions if v not in hidden).encode("utf-8")
        if len(self._lists) >= MAX_LISTS_HELD:
            del self._lists[next(iter(self._lists))]
        self._lists[memo] = (filtered, until)
        return Made(filtered, outcome)

    async def allowed_latest(self, module: Module) -> Served:
        """
        L{latest}, or when the policy hides the version it names, the
        .info of the newest version it allows (a release before a
        prerelease, as the go command chooses); refused if there is none,
        so that the go command does not fetch it direct.
        """
        served = await self.latest(module)
        if not self.policy.applies(module.path):
            return served
        info = await self._info(served, f"{module.path}@latest")
        try:
            await self.check_version(module, str(info["Version"]), parse_time(info.get("Time")))
            return served
        except Refused as refused:
            hidden = refused
        try:
            listed = await self.allowed_list(module)
        except (Missing, UpstreamError):
            raise hidden from None
        body = listed.body if isinstance(listed, Made) else await self._body(listed)
        keyed = [(key, v) for v in body.decode("utf-8", "replace").split() if (key := version_key(v)) is not None]
        if not keyed:
            raise hidden
        releases = [k for k in keyed if not is_prerelease(k[1])]
        newest = max(releases or keyed)[1]
        return await self.module_file(module, Version.parse(escape(newest)), "info")

    async def sumdb_path(self, name: str, path: str) -> Served:
        sumdb, upstream = self.sumdbs[name]
        key = f"{name}/{path}"
        if path == "latest":
            return await self.sumdb_cache.mutable(
                key, self.metadata_ttl, self._revalidator(upstream, path), body=True
            )
        # A tile never changes, full or partial (a partial one's path names
        # its width, and the log only grows).
        check_tile(path.removeprefix("tile/"))
        tile = parse_tile(path)
        if tile is None or tile.width == tile.full_width:
            return await self.sumdb_cache.immutable(
                key, lambda: self._get_new(upstream, path, MAX_METADATA_SIZE), body=True
            )

        async def derive_or_fetch() -> Fill:
            # Derived first: the same bytes upstream would send, and the
            # answer when upstream is gone.
            derived = await self._derived_tile(name, tile)
            if derived is not None:
                # Once a cut (those joining this fill share it).
                metrics.sumdb_derived_tiles.labels("data" if tile.is_data else "hash").inc()
                return derived
            return await self._get_new(upstream, path, MAX_METADATA_SIZE)

        if key in self.sumdb_cache.negative and await self._wider_held(name, tile):
            # Missing upstream when last asked (a database may keep only
            # the full tile once it is complete), and held wider since.
            self.sumdb_cache.negative.discard(key)
        served = await self.sumdb_cache.immutable(key, derive_or_fetch, body=True)
        if served.outcome == MISS and DERIVED_FROM in served.entry.attrs:
            return evolve(served, outcome=HIT)  # upstream was not asked
        return served

    async def _wider_held(self, name: str, tile: Tile) -> list[tuple[int, str]]:
        """
        The widths and keys of the tiles held at C{tile}'s coordinates
        that are wider than it (a partial tile of greater width, or the
        full one), widest first.
        """
        prefix = f"{name}/{tile.path(tile.full_width)}"
        # One lookup: the keys of this N's tiles (the full one, its .p/W).
        held = []
        for key in await self.sumdb_cache.keys(prefix, min(tile.full_width + 1, MAX_HELD_TILES)):
            width = tile.width_of(key[len(prefix):])
            if width is not None and width > tile.width:
                held.append((width, key))
        return sorted(held, reverse=True)

    async def _derived_tile(self, name: str, tile: Tile) -> Fill | None:
        """
        Partial tile C{tile} cut from a wider one the cache holds at the
        same coordinates (a partial tile of greater width, or the full
        one): its first entries are this tile. L{None} when none serves.
        """
        for width, key in (await self._wider_held(name, tile))[:MAX_DERIVATION_SOURCES]:
            found = await self.sumdb_cache.find(key, body=True)
            if found is None:
                continue
            # What cannot be a tile of its width is not read: a hash tile
            # is exactly its hashes, a data tile's records are not long.
            size = found.entry.size
            limit = width * MAX_RECORD_SIZE if tile.is_data else width * HASH_SIZE
            body = found.body
            if body is None and (size <= limit if tile.is_data else size == limit):
                try:
                    body = await read_blob(self.store, found.entry.blob, limit)
                except BlobNotFound as e:
                    await self.sumdb_cache.forget(e.hash)
                    continue
            length = None if body is None else tile_prefix(body, width, tile.width, tile.is_data)
            if body is None or length is None:
                log.warn(
                    "{sumdb} {source} as cached ({size} bytes) is not a tile of width {width}; not used for "
                    "{tile}", sumdb=name, source=key.removeprefix(f"{name}/"), size=size, width=width,
                    tile=tile.path(),
                )
                continue
            spool = await self.store.spool()
            try:
                # A chunk at a time: never a second copy of a tile in memory.
                for start in range(0, length, CHUNK_SIZE):
                    await spool.write(body[start:min(start + CHUNK_SIZE, length)])
            except BaseException:
                await spool.abort()
                raise
            return Fill(spool, {DERIVED_FROM: key.removeprefix(f"{name}/")})
        return None


def _lookup_key(name: str, module: Module, version: Version) -> str:
    return f"{name}/lookup/{module.escaped}@{version.escaped}"


def _module_of(segments: list[str]) -> Module | None:
    """
    The module a GOPROXY path is about (none for the checksum database's).
    """
    try:
        if not segments or segments[0] == "sumdb":
            return None
        if segments[-1] == "@latest":
            return Module.parse("/".join(segments[:-1]))
        if len(segments) >= 3 and segments[-2] == "@v":
            return Module.parse("/".join(segments[:-2]))
    except InvalidPath:
        return None
    return None


class GoProxyResource(ProtocolResource):
    """
    C{/goproxy/...}.
    """

    takes_subpath = True

    def __init__(self, proxy: GoProxy, access: str = "public", token_guard: IGuard | None = None) -> None:
        super().__init__(access, token_guard)
        self.proxy = proxy

    async def _send(
        self, request: Request, served: Served | Made, content_type: bytes, immutable: bool
    ) -> None:
        cache_control = IMMUTABLE if immutable else b"max-age=60"
        if isinstance(served, Made):
            # A list filtered by the policy, or made from what the cache
            # holds when upstream could not say.
            request.setResponseCode(OK)
            for name, value in cache_headers(served.outcome, cache_control).items():
                request.setHeader(name, value)
            request.setHeader(b"content-type", content_type)
            request.setHeader(b"content-length", b"%d" % len(served.body))
            request.write(served.body)
            request.finish()
            return
        headers = cache_headers(served.outcome, cache_control)
        await send_blob(request, self.proxy.store, served.entry.blob, content_type, headers, body=served.body)

    async def render_async(self, request: Request) -> None:
        try:
            segments = path_segments(request, InvalidPath, slash_allowed=False)
            handler = self._route(segments)
        except (InvalidPath, InvalidSumDB) as e:
            request.write(text(request, NOT_FOUND, str(e)))
            request.finish()
            return
        # (A hit parses its path once more only when there are routes.)
        module = _module_of(segments) if self.proxy.routes else None
        route = self.proxy.route_for(module) if module is not None else None
        if self.needs_token(route.access if route is not None else None):
            await self.check_token(request)
        await handler(request)

    def _route(self, segments: list[str]) -> Callable[[Request], Awaitable[None]]:
        proxy = self.proxy
        if not segments or segments == [""]:
            raise InvalidPath("not found: name a module, e.g. /goproxy/example.com/m/@v/list")
        if segments[0] == "sumdb":
            return self._route_sumdb(segments[1:])
        if segments[-1] == "@latest":
            module = Module.parse("/".join(segments[:-1]))
            return lambda r: self._answer(r, lambda: proxy.allowed_latest(module), JSON, False, module)
        if len(segments) < 3 or segments[-2] != "@v":
            raise InvalidPath("not found: not a GOPROXY path")
        module = Module.parse("/".join(segments[:-2]))
        last = segments[-1]
        if last == "list":
            return lambda r: self._answer(r, lambda: proxy.allowed_list(module), TEXT, False, module)
        name, dot, ext = last.rpartition(".")
        if not dot or ext not in ("info", "mod", "zip"):
            raise InvalidPath("not found: not a GOPROXY path")
        version = Version.parse(name)
        content_type = {"info": JSON, "mod": TEXT, "zip": ZIP}[ext]
        return lambda r: self._answer(
            r, lambda: proxy.allowed_file(module, version, ext), content_type, version.canonical, module
        )

    def _route_sumdb(self, segments: list[str]) -> Callable[[Request], Awaitable[None]]:
        proxy = self.proxy
        if len(segments) < 2 or segments[0] not in proxy.sumdbs:
            raise InvalidSumDB("not found: no such checksum database here")
        name, rest = segments[0], segments[1:]
        if rest == ["supported"]:
            return self._supported
        if rest == ["latest"]:
            return lambda r: self._answer(r, lambda: proxy.sumdb_path(name, "latest"), TEXT, False)
        if rest[0] == "lookup" and len(rest) >= 2:
            module_path, at, version_name = "/".join(rest[1:]).rpartition("@")
            if not at:
                raise InvalidPath("invalid lookup: no @version")
            module, version = Module.parse(module_path), Version.parse(version_name)
            if proxy.route_for(module) is not None:
                # Its name is private: never sent to a public database.
                raise InvalidSumDB("not found: a routed module is never looked up in a checksum database")
            if match_prefix_patterns(proxy.nosumdb, module.path):
                raise InvalidSumDB("not found: this module is never looked up in a checksum database (--go-nosumdb)")
            return lambda r: self._answer(
                r, lambda: proxy.sumdb_lookup(name, module, version), TEXT, True
            )
        if rest[0] == "tile":
            path = "tile/" + check_tile("/".join(rest[1:]))
            return lambda r: self._answer(r, lambda: proxy.sumdb_path(name, path), OCTETS, True)
        raise InvalidSumDB("not found: not a checksum database path")

    async def _supported(self, request: Request) -> None:
        request.setResponseCode(OK)
        request.setHeader(b"content-type", TEXT)
        request.setHeader(b"content-length", b"0")
        request.finish()

    async def _answer(
        self,
        request: Request,
        lookup: Callable[[], Awaitable[Served | Made]],
        content_type: bytes,
        immutable: bool,
        module: Module | None = None,
    ) -> None:
        if module is not None:
            # (Once the request may be answered: a name a token protects
            # is not counted for whoever asks without one.)
            activity.current.requested(PROTOCOL, module.path)
        async def answer() -> None:
            await self._send(request, await lookup(), content_type, immutable)

        await refetching(request, self.proxy.cache, answer)
