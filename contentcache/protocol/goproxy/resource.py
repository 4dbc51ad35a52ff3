"""
The GOPROXY protocol under C{/goproxy/}: module versions, lists and
queries, and checksum-database proxying, translated into cache lookups and
upstream fetches.
"""

from __future__ import annotations

from typing import Awaitable, Callable

from attrs import define, field
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.web.http import NOT_FOUND, OK
from twisted.web.server import Request

from ... import activity
from ...cache import (
    STALE,
    Fill,
    IntegrityError,
    Missing,
    ProtocolCache,
    Served,
    _NotModified,
    body_or_status,
)
from ...index import Entry
from ...pool import Runner
from ...store import BlobNotFound, Store
from ...routes import GoRoute
from ...upstream import Upstream, UpstreamError, conditional_headers
from ...web import (
    IMMUTABLE, TEXT, IGuard, ProtocolResource, cache_headers, path_segments, read_blob, refetching,
    send_blob, text,
)
from .modzip import MAX_GO_MOD_SIZE, MAX_ZIP_SIZE, ZipRuleError, check_and_hash_zip, hash_go_mod
from .paths import InvalidPath, Module, Version, is_canonical, match_prefix_patterns, unescape
from .sumdb import InvalidSumDB, SumDB, check_tile, parse_record

log = Logger()

PROTOCOL = "go"
SUMDB_PROTOCOL = "gosumdb"
DEFAULT_METADATA_TTL = 10 * 60.0
#: .info, lists and sumdb answers are small; anything bigger is not one.
MAX_METADATA_SIZE = 16 << 20
JSON = b"application/json"
ZIP = b"application/zip"
OCTETS = b"application/octet-stream"


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
    _unreachable_warned: bool = False

    def route_for(self, module: Module) -> GoRoute | None:
        for route in self.routes:
            if route.matches(module.path):
                return route
        return None

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
            served = await self.sumdb_lookup(sumdb.name, module, version)
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
            served = await self.sumdb_lookup(sumdb.name, module, version)
            body = await read_blob(self.store, served.entry.blob, MAX_METADATA_SIZE)
        record = parse_record(body)
        expected = record.get(f"{module.path} {version.name}{suffix}")
        if expected is None:
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
        return True

    async def sumdb_lookup(self, name: str, module: Module, version: Version) -> Served:
        sumdb, upstream = self.sumdbs[name]
        path = f"lookup/{module.escaped}@{version.escaped}"
        return await self.sumdb_cache.immutable(
            f"{name}/{path}", lambda: self._get_new(upstream, path, MAX_METADATA_SIZE)
        )

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

    async def version_list(self, module: Module) -> Served | bytes:
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
            return "".join(f"{v}\n" for v in versions).encode("utf-8")

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
        return await self.sumdb_cache.immutable(
            key, lambda: self._get_new(upstream, path, MAX_METADATA_SIZE), body=True
        )


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
        self, request: Request, served: Served | bytes, content_type: bytes, immutable: bool
    ) -> None:
        cache_control = IMMUTABLE if immutable else b"max-age=60"
        if isinstance(served, bytes):
            # A list made from what the cache holds: upstream could not say.
            request.setResponseCode(OK)
            for name, value in cache_headers(STALE, cache_control).items():
                request.setHeader(name, value)
            request.setHeader(b"content-type", content_type)
            request.setHeader(b"content-length", b"%d" % len(served))
            request.write(served)
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
            activity.current.requested(PROTOCOL, module.path)
            return lambda r: self._answer(r, lambda: proxy.latest(module), JSON, False)
        if len(segments) < 3 or segments[-2] != "@v":
            raise InvalidPath("not found: not a GOPROXY path")
        module = Module.parse("/".join(segments[:-2]))
        activity.current.requested(PROTOCOL, module.path)
        last = segments[-1]
        if last == "list":
            return lambda r: self._answer(r, lambda: proxy.version_list(module), TEXT, False)
        name, dot, ext = last.rpartition(".")
        if not dot or ext not in ("info", "mod", "zip"):
            raise InvalidPath("not found: not a GOPROXY path")
        version = Version.parse(name)
        content_type = {"info": JSON, "mod": TEXT, "zip": ZIP}[ext]
        return lambda r: self._answer(
            r, lambda: proxy.module_file(module, version, ext), content_type, version.canonical
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
        lookup: Callable[[], Awaitable[Served | bytes]],
        content_type: bytes,
        immutable: bool,
    ) -> None:
        async def answer() -> None:
            await self._send(request, await lookup(), content_type, immutable)

        await refetching(request, self.proxy.cache, answer)
