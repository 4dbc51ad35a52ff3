"""
The npm registry protocol under C{/npm/}: packuments (full and
abbreviated), tarballs checked against their integrity, dist-tags, and the
endpoints that pass through (search, audit, C{?write=true}).
"""

from __future__ import annotations

import json
import math
import zlib
import re
from typing import Any, Awaitable, Callable, Iterator, Mapping

import treq
from attrs import define, field
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.web.http import BAD_REQUEST, NOT_ALLOWED, NOT_FOUND, OK, REQUEST_ENTITY_TOO_LARGE
from twisted.web.server import Request

from ... import activity
from ...cache import (
    HIT,
    MISS,
    REVALIDATING,
    STALE,
    Fill,
    IntegrityError,
    Missing,
    ProtocolCache,
    Revalidate,
    Served,
    _NotModified,
    body_of,
    body_or_status,
)
from ...hot import Found
from ...index import Entry
from ...policy import Policy, Refused, filter_packument, publish_times, retarget_tags
from ...pool import Runner
from ...routes import NpmRoute, first_match
from ...store import BlobNotFound, Store
from ...upstream import Coalescer, Upstream, UpstreamError, conditional_headers
from ...web import (
    CHUNK_SIZE, IMMUTABLE, HTTPError, IGuard, ProtocolResource, cache_headers, path_segments, read_blob, refetching,
    send_blob, text,
)
from .integrity import IntegrityMismatch, check_tarball
from .names import InvalidName, PackageName, check_tarball_file, split_request
from .packument import InvalidPackument, Renderer, allowed_host, analyse, host_port

log = Logger()

PROTOCOL = "npm"
DEFAULT_METADATA_TTL = 5 * 60.0
ABBREVIATED = "application/vnd.npm.install-v1+json"
FULL = "full"
ABBR = "abbr"
MAX_PACKUMENT_SIZE = 512 << 20
MAX_DIST_INDEX_SIZE = 256 << 20
MAX_TARBALL_SIZE = 2 << 30
MAX_PASS_THROUGH_BODY = 16 << 20
#: Rendered copies kept per packument variant (distinct bases x gzip).
MAX_RENDERS = 8
#: Parsed publish times kept in memory (packages a policy needs them of).
MAX_TIMES_HELD = 256
_HOST = re.compile(rb"(?:[A-Za-z0-9.-]{1,253}|\[[0-9A-Fa-f:.]{2,45}\])(?::([0-9]{1,5}))?")
MAX_PORT = 65535
_ENDPOINT = re.compile(r"[a-z0-9-]+")
READ_ONLY = "contentcache is a read-through cache: publish and change packages on the upstream registry"


def _variant(request: Request) -> str:
    accept = (request.getHeader(b"accept") or b"").decode("latin-1")
    return ABBR if ABBREVIATED in accept else FULL


def _accepts_gzip(request: Request) -> bool:
    for token in (request.getHeader(b"accept-encoding") or b"").decode("latin-1").split(","):
        coding, _, params = token.strip().partition(";")
        if coding.strip().lower() in ("gzip", "x-gzip"):
            q = params.strip().removeprefix("q=")
            try:
                return not params.strip() or float(q) > 0
            except ValueError:
                return True
    return False


@define
class NpmRegistry:
    """
    The npm adapter's state: where to fetch from and the caches.
    """

    store: Store
    cache: ProtocolCache
    _disk: Runner
    _clock: IReactorTime
    upstream: Upstream | None
    tarball_hosts: set[str] = field(factory=set)
    #: Private packages' upstreams, first match wins (the config file's).
    routes: list[NpmRoute] = field(factory=list)
    public_url: str | None = None
    metadata_ttl: float = DEFAULT_METADATA_TTL
    #: The minimum release age and deny rules (none by default).
    policy: Policy = field(factory=lambda: Policy(PROTOCOL))
    _renders: Coalescer[str, Entry] = field(factory=Coalescer)
    #: Publish times by the hash of their blob.
    _times_held: dict[str, Mapping[str, float | None]] = field(factory=dict)

    def route_for(self, name: PackageName) -> NpmRoute | None:
        """
        The route of a package, if one matches its name.
        """
        return first_match(self.routes, name.full)

    def upstream_for(self, name: PackageName) -> Upstream | None:
        route = self.route_for(name)
        return route.upstream if route is not None else self.upstream

    # Packuments.

    def _packument_key(self, name: PackageName, variant: str) -> str:
        return f"packument:{variant}:{name.full}"

    async def packument(
        self, name: PackageName, variant: str, ttl: float | None = None, conditional: bool = True
    ) -> Served:
        """
        The packument's template, fresh within C{ttl} (default: the
        metadata TTL; 0 forces a revalidation, and C{conditional=False} a
        full fetch even when upstream would say 304).
        """
        upstream = self.upstream_for(name)
        return await self.cache.mutable(
            self._packument_key(name, variant),
            self.metadata_ttl if ttl is None else ttl,
            self._revalidator(upstream, name, variant, conditional) if upstream is not None else None,
            # What is asked for with a TTL of its own is wanted fresh.
            background=ttl is None,
        )

    def _revalidator(
        self, upstream: Upstream, name: PackageName, variant: str, conditional: bool = True
    ) -> Revalidate:
        async def revalidate(entry: Entry | None) -> Fill | _NotModified:
            return await self._fetch_packument(upstream, name, variant, entry if conditional else None)

        return revalidate

    async def _fetch_packument(
        self, upstream: Upstream, name: PackageName, variant: str, entry: Entry | None
    ) -> Fill | _NotModified:
        headers = {"Accept": f"{ABBREVIATED}, application/json;q=0.8" if variant == ABBR else "application/json"}
        if entry is not None:
            headers.update(conditional_headers(entry.attrs.get("etag"), entry.attrs.get("last_modified")))
        fetched = await upstream.fetch(self.store, upstream.url(name.path), headers, MAX_PACKUMENT_SIZE)
        raw = body_or_status(fetched, name.full, conditional=entry is not None)
        if isinstance(raw, _NotModified):
            return raw
        template = await self.store.spool()
        try:
            dist = await self._disk.run(analyse, raw.path, _SpoolWriter(template), name)
        except InvalidPackument as e:
            # An error page or a cut-off body: upstream failed, and the last
            # good copy (if any) is served.
            await template.abort()
            raise UpstreamError(f"{name.full}: {e}") from None
        except BaseException:
            await template.abort()
            raise
        finally:
            await raw.abort()
        try:
            stored = await self.store.put([dist])
            await self.cache.put(f"dist:{name.full}", stored.blob, {})
        except BaseException:
            await template.abort()
            raise
        content_type = (fetched.header("content-type") or "application/json").split(",")[0]
        attrs = {
            "content_type": content_type,
            "fetched": self._clock.seconds(),
            **{k: v for k, v in (("etag", fetched.header("etag")),
                                 ("last_modified", fetched.header("last-modified"))) if v},
        }
        return Fill(template, attrs)

    async def rendered(
        self, name: PackageName, variant: str, base: str, gzip: bool
    ) -> tuple[Found, Served, bool]:
        """
        The packument as this client sees it: tarball addresses under
        C{base}, gzip if asked. Rendered once per base and revision; the
        last item says whether this call rendered it. A hit is one lookup
        of both the template and the rendered copy (none when they are hot).
        """
        template_key = self._packument_key(name, variant)
        key = f"render:{template_key}:{'gzip' if gzip else 'identity'}:{base}"
        policy = self.policy
        filtered = policy.applies(name.full)
        timed = filtered and policy.needs_times(name.full)
        full_key = self._packument_key(name, FULL)
        wanted = [(template_key, False), (key, True)]
        if filtered:
            # The template without what the policy hides, and the publish
            # times with the full packument they come from.
            wanted.append((f"filtered:{template_key}", False))
            if timed:
                wanted += [(self._times_key(name), False), (full_key, False)]
        found = await self.cache.find_all(wanted)
        template, render = found[0], found[1]
        times_found, full = (found[3], found[4]) if timed else (None, None)
        source = found[2] if filtered else template
        if (
            template is not None
            and render is not None
            and source is not None
            and render.entry.attrs.get("source") == source.entry.hash.hex
            and (
                not filtered
                or (
                    self._filtered_current(source.entry, template.entry, times_found)
                    and (not timed or self._times_current(times_found, full))
                )
            )
        ):
            # What must be fresh for the rendered copy to be: the template,
            # and under an age the full packument that gives its times.
            upstream = self.upstream_for(name)
            sources = [(template_key, variant, template.entry)]
            if full is not None and variant != FULL:
                sources.append((full_key, FULL, full.entry))
            stale = [] if upstream is None else [
                (k, v, e) for k, v, e in sources if not self.cache.fresh(e, self.metadata_ttl)
            ]
            if not stale:
                self.cache.touch(f"dist:{name.full}")
                return render, Served(template.entry, HIT), False
            if upstream is not None and all(self.cache.within_stale_window(e, self.metadata_ttl) for _, _, e in stale):
                # As the cache would answer it: at once, revalidated after
                # (stale-if-error while the last revalidation failed).
                outcome, reason = REVALIDATING, None
                for stale_key, stale_variant, stale_entry in stale:
                    failed = self.cache.last_failure(stale_key, stale_entry)  # before this attempt
                    if failed is not None:
                        outcome, reason = STALE, failed
                    self.cache.revalidate_in_background(
                        stale_key, self.metadata_ttl, self._revalidator(upstream, name, stale_variant)
                    )
                self.cache.touch(f"dist:{name.full}")
                return render, Served(template.entry, outcome, reason), False
        served = await self._either_variant(name, variant)
        # The dist index is used with the packument: it expires with it.
        self.cache.touch(f"dist:{name.full}")
        source_entry = served.entry
        if filtered:
            times = await self._times(name) if timed else (None, {})
            source_entry = await self._filtered(name, served.entry, times)
        key = f"render:{served.entry.key}:{'gzip' if gzip else 'identity'}:{base}"
        found_render = await self.cache.find(key, body=True)
        if found_render is not None and found_render.entry.attrs.get("source") == source_entry.hash.hex:
            return found_render, served, False
        # (Keyed by the source too: a request that sees a newer template
        # does not take a copy rendered from the older.)
        entry = await self._renders.run(f"{key}\0{source_entry.hash.hex}",
                                        lambda: self._render(key, source_entry, base, gzip))
        await self._prune_renders(served.entry)
        return Found(entry), served, True

    def _times_current(self, times: Found | None, full: Found | None) -> bool:
        """
        Whether the publish times held were taken from the full packument
        held (else they are taken again before anything is rendered).
        """
        return full is not None and times is not None and times.entry.attrs.get("source") == full.entry.hash.hex

    def _filtered_current(self, filtered: Entry, template: Entry, times: Found | None) -> bool:
        """
        Whether a filtered template was made from C{template} under the
        policy in force, with the publish times held now, and nothing it
        hid is old enough yet.
        """
        attrs = filtered.attrs
        until = attrs.get("until")
        return (
            attrs.get("source") == template.hash.hex
            and attrs.get("policy") == self.policy.digest
            and attrs.get("times") == (times.entry.hash.hex if times is not None else None)
            and (until is None or self._clock.seconds() < until)
        )

    async def _filtered(
        self, name: PackageName, template: Entry, times: tuple[Entry | None, Mapping[str, float | None]]
    ) -> Entry:
        """
        The template without what the policy hides (the versions, their
        times, the dist-tags naming them): parsed and written again once
        per revision, policy and change as time passes, whatever the
        number of bases and encodings it is then rendered for.
        """
        key = f"filtered:{template.key}"
        found = await self.cache.find(key)
        times_found = Found(times[0]) if times[0] is not None else None
        if found is not None and self._filtered_current(found.entry, template, times_found):
            return found.entry
        return await self._renders.run(key, lambda: self._make_filtered(key, name, template, times))

    async def _make_filtered(
        self, key: str, name: PackageName, template: Entry, times: tuple[Entry | None, Mapping[str, float | None]]
    ) -> Entry:
        body = await read_blob(self.store, template.blob, MAX_PACKUMENT_SIZE)
        policy, now = self.policy, self._clock.seconds()

        def filtered() -> tuple[bytes, float]:
            document = json.loads(body)
            until = filter_packument(document, policy, name.full, times[1], now)
            return json.dumps(document, ensure_ascii=True, separators=(",", ":")).encode("ascii"), until

        data, until = await self._disk.run(filtered)
        del body
        return await self._put_small(key, data, {
            "source": template.hash.hex,
            "policy": policy.digest,
            "times": times[0].hash.hex if times[0] is not None else None,
            "until": until if math.isfinite(until) else None,
        })

    async def _put_small(self, key: str, data: bytes, attrs: Mapping[str, Any]) -> Entry:
        spool = await self.store.spool()
        try:
            await spool.write(data)
        except BaseException:
            await spool.abort()
            raise
        result = await spool.commit()
        return await self.cache.put(key, result.blob, attrs)

    # Publish times, for the minimum release age.

    def _times_key(self, name: PackageName) -> str:
        return f"times:{name.full}"

    async def _times(self, name: PackageName) -> tuple[Entry | None, Mapping[str, float | None]]:
        """
        The publish time of each version of C{name}, from its full
        packument (the abbreviated one has none; a stale copy when
        upstream fails), kept as a small entry of its own that follows the
        packument's revisions. Without a full packument: L{Missing} or
        L{UpstreamError}, never a guess.
        """
        served = await self.packument(name, FULL)
        key = self._times_key(name)
        found = await self.cache.find(key, body=True)
        if found is None or found.entry.attrs.get("source") != served.entry.hash.hex:
            entry = await self._renders.run(key, lambda: self._derive_times(key, served.entry))
            found = Found(entry)
        return found.entry, await self._read_times(found)

    async def _derive_times(self, key: str, template: Entry) -> Entry:
        body = await read_blob(self.store, template.blob, MAX_PACKUMENT_SIZE)
        data = await self._disk.run(lambda: json.dumps(publish_times(json.loads(body))).encode())
        return await self._put_small(key, data, {"source": template.hash.hex})

    async def _read_times(self, found: Found) -> Mapping[str, float | None]:
        held = self._times_held.pop(found.entry.hash.hex, None)
        if held is None:
            body = found.body
            if body is None:
                body = await read_blob(self.store, found.entry.blob, MAX_PACKUMENT_SIZE)
            held = await self._disk.run(json.loads, body)
            assert held is not None
            if len(self._times_held) >= MAX_TIMES_HELD:
                del self._times_held[next(iter(self._times_held))]
        # Least recently used first.
        self._times_held[found.entry.hash.hex] = held
        return held

    async def check_version(self, name: PackageName, version: str) -> None:
        """
        Raise L{Refused} if the policy hides C{name@version}, L{Missing} if
        there is no such version. A version the publish times held allow
        is decided without asking upstream.
        """
        policy = self.policy
        denied = policy.denied(name.full, version)
        if denied is not None:
            raise Refused(PROTOCOL, denied)
        if not policy.needs_times(name.full, version):
            return
        now = self._clock.seconds()
        held = await self.cache.find(self._times_key(name), body=True)
        if held is not None:
            times = await self._read_times(held)
            if version in times and policy.verdict(name.full, version, times[version], now) is None:
                return
        _, times = await self._times(name)
        if version not in times and self.upstream_for(name) is not None:
            # Newer than the packument held: ask upstream once more.
            await self.packument(name, FULL, ttl=0)
            _, times = await self._times(name)
        if version not in times:
            raise Missing(f"{name.full}@{version}")
        hidden = policy.verdict(name.full, version, times[version], now)
        if hidden is not None:
            raise Refused(PROTOCOL, hidden)

    async def held_verdicts(self, name: PackageName, versions: list[str]) -> dict[str, str]:
        """
        Why the policy hides each of C{versions} that it hides, by what is
        held (upstream is not asked and no use is recorded: for the status
        page). A version whose time is not held is decided by deny rules
        alone.
        """
        policy = self.policy
        if not policy.applies(name.full):
            return {}
        times: Mapping[str, float | None] = {}
        if policy.needs_times(name.full):
            rows = await self.cache.index.lookup(PROTOCOL, [(self._times_key(name), None)])
            if rows[0] is not None:
                times = await self._read_times(Found(rows[0][0]))
        now = self._clock.seconds()
        out = {}
        for version in versions:
            hidden = (policy.verdict(name.full, version, times[version], now) if version in times
                      else policy.denied(name.full, version))
            if hidden is not None:
                out[version] = hidden.reason
        return out

    async def dist_tags(self, name: PackageName, tags: Mapping[str, Any], versions: list[str]) -> dict[str, Any]:
        """
        A packument's dist-tags as the policy lets clients see them.
        """
        policy = self.policy
        if not policy.applies(name.full):
            return dict(tags)
        times: Mapping[str, float | None] = {}
        if policy.needs_times(name.full):
            _, times = await self._times(name)
        now = self._clock.seconds()

        def visible() -> dict[str, Any]:
            hidden, _ = policy.hidden_versions(name.full, versions, times, now)
            return retarget_tags(tags, [v for v in versions if v not in hidden], hidden)

        return await self._disk.run(visible)

    async def _prune_renders(self, template: Entry) -> None:
        """
        Keep at most L{MAX_RENDERS} rendered copies of a packument: the
        base comes from the client's Host header, and a client sending a
        new one on every request must not fill the disk. The least recently
        used copies go; their blobs go with the next expiry pass.
        """
        entries = await self.cache.entries(f"render:{template.key}:", MAX_RENDERS * 4)
        if len(entries) <= MAX_RENDERS:
            return
        entries.sort(key=lambda e: (e.accessed, e.created))
        for entry in entries[: len(entries) - MAX_RENDERS]:
            await self.cache.remove(entry.key)

    async def _either_variant(self, name: PackageName, variant: str) -> Served:
        """
        The packument in the variant asked for, or, when upstream cannot be
        reached and only the other variant is cached, that one (stale):
        either serves an install, and an install beats an error.
        """
        try:
            return await self.packument(name, variant)
        except (UpstreamError, Missing) as e:
            if isinstance(e, Missing) and self.upstream_for(name) is not None:
                raise
            other = ABBR if variant == FULL else FULL
            entry = await self.cache.lookup(self._packument_key(name, other))
            if entry is None:
                raise
            return Served(entry, STALE, str(e))

    async def _render(self, key: str, template: Entry, base: str, gzip: bool) -> Entry:
        renderer = Renderer(base, gzip)
        reader = await self.store.get(template.blob)
        spool = await self.store.spool()
        try:
            try:
                while chunk := await reader.read(CHUNK_SIZE):
                    out = await self._disk.run(renderer.feed, chunk)
                    if out:
                        await spool.write(out)
            finally:
                await reader.close()
            await spool.write(await self._disk.run(renderer.finish))
        except BaseException:
            await spool.abort()
            raise
        result = await spool.commit()
        return await self.cache.put(key, result.blob, {"source": template.hash.hex})

    async def dist_index(self, name: PackageName) -> dict[str, Any] | None:
        entry = await self.cache.lookup(f"dist:{name.full}")
        if entry is None:
            return None
        try:
            body = await read_blob(self.store, entry.blob, MAX_DIST_INDEX_SIZE)
        except BlobNotFound as e:
            # Gone or damaged: the packument is fetched again, and with it
            # the dist index.
            await self.cache.forget(e.hash)
            return None
        parsed: dict[str, Any] = await self._disk.run(json.loads, body)
        return parsed

    # Tarballs.

    async def tarball(self, name: PackageName, file: str) -> Served:
        key = f"tarball:{name.full}/{file}"
        if self.policy.applies(name.full):
            # Refused whether it is cached or not.
            if key in self.cache.negative:
                raise Missing(key)
            try:
                await self.check_version(name, file[len(name.base) + 1 : -len(".tgz")])
            except Missing:
                self.cache.negative.add(key)
                raise
        upstream = self.upstream_for(name)
        if upstream is None:
            return await self.cache.immutable(key, None, body=True)
        return await self.cache.immutable(key, lambda: self._fetch_tarball(upstream, name, file), body=True)

    async def _tarball_info(self, name: PackageName, file: str) -> dict[str, Any]:
        dist = await self.dist_index(name)
        if dist is None or file not in dist["files"]:
            # npm ci asks for tarballs before (or without) the packument, a
            # cached packument may predate this version, and the dist index
            # may have expired: fetch the packument whole, unconditionally.
            await self.packument(name, ABBR, ttl=0, conditional=False)
            dist = await self.dist_index(name)
        if dist is None or file not in dist["files"]:
            raise Missing(f"{name.full}/-/{file}")
        info: dict[str, Any] = dist["files"][file]
        return info

    def _allowed_hosts(self, name: PackageName, upstream: Upstream) -> set[str]:
        route = self.route_for(name)
        extra = route.tarball_hosts if route is not None else self.tarball_hosts
        return {host_port(upstream.base), *(host.lower() for host in extra)}

    async def _fetch_tarball(self, upstream: Upstream, name: PackageName, file: str) -> Fill:
        info = await self._tarball_info(name, file)
        url = info["url"]
        if not allowed_host(url, self._allowed_hosts(name, upstream)):
            log.warn("not fetching {url}: not an upstream host (see --npm-tarball-host)", url=url)
            raise IntegrityError(f"{name.full}/-/{file}: its address is not on an allowed upstream host")
        fetched = await upstream.fetch(self.store, url, {}, MAX_TARBALL_SIZE)
        spool = body_of(fetched, f"{name.full}/-/{file}")
        try:
            await self._disk.run(check_tarball, spool.path, info.get("integrity"), info.get("shasum"))
        except IntegrityMismatch as e:
            await spool.abort()
            log.critical(
                "INTEGRITY MISMATCH for {name}/-/{file} from {url}: {error}; not stored, not served",
                name=name.full, file=file, url=url, error=e,
            )
            raise IntegrityError(f"{name.full}/-/{file}: {e}") from None
        except BaseException:
            await spool.abort()
            raise
        return Fill(spool, {"version": info["version"], "integrity": info.get("integrity")})


class _SpoolWriter:
    """
    A file-like C{write} into a spool, for code running on the disk pool.
    """

    def __init__(self, spool: Any) -> None:
        self.write = spool.write_blocking


class NpmResource(ProtocolResource):
    """
    C{/npm/...}.
    """

    takes_subpath = True
    methods = (b"GET", b"HEAD", b"POST", b"PUT", b"DELETE", b"PATCH")

    def __init__(self, registry: NpmRegistry, access: str = "public", token_guard: IGuard | None = None) -> None:
        super().__init__(access, token_guard)
        self.registry = registry

    def _base(self, request: Request) -> str:
        if self.registry.public_url:
            return self.registry.public_url.rstrip("/") + "/npm"
        host = request.getHeader(b"host") or b""
        m = _HOST.fullmatch(host)
        if m is None or (m[1] is not None and int(m[1]) > MAX_PORT):
            raise InvalidName("invalid Host header")
        proto = (request.getHeader(b"x-forwarded-proto") or b"").split(b",")[0].strip().lower()
        if proto not in (b"http", b"https"):
            proto = b"https" if request.isSecure() else b"http"
        return f"{proto.decode()}://{host.decode().lower()}/npm"

    async def render_async(self, request: Request) -> None:
        try:
            segments = path_segments(request, InvalidName, slash_allowed=True)
            handler, name = self._route(request, segments)
        except InvalidName as e:
            request.write(text(request, BAD_REQUEST if "Host" in str(e) else NOT_FOUND, str(e)))
            request.finish()
            return
        route = self.registry.route_for(name) if name is not None else None
        if self.needs_token(route.access if route is not None else None):
            await self.check_token(request)
        if name is not None:
            # (Once the request may be answered: a name a token protects
            # is not counted for whoever asks without one.)
            activity.current.requested(PROTOCOL, name.full)
        await handler(request)

    def _route(
        self, request: Request, segments: list[str]
    ) -> tuple[Callable[[Request], Awaitable[None]], PackageName | None]:
        """
        What answers the request, and the package it is about (if any).
        """
        method = request.method
        if segments[:1] == ["-"]:
            return self._route_special(method, segments[1:])
        if method not in (b"GET", b"HEAD"):
            return self._read_only, None
        name, rest = split_request(segments)
        if rest in ([], [""]):
            if request.args is not None and request.args.get(b"write") == [b"true"]:
                return (lambda r: self._pass_through(r, name.path, name)), name
            base = self._base(request)
            return (lambda r: self._packument(r, name, base)), name
        if len(rest) == 2 and rest[0] == "-":
            file = check_tarball_file(name, rest[1])
            return (lambda r: self._tarball(r, name, file)), name
        raise InvalidName("not found")

    def _route_special(
        self, method: bytes, rest: list[str]
    ) -> tuple[Callable[[Request], Awaitable[None]], PackageName | None]:
        if rest == ["ping"] and method in (b"GET", b"HEAD"):
            return self._ping, None
        if rest == ["v1", "search"] and method in (b"GET", b"HEAD"):
            return (lambda r: self._pass_through(r, "-/v1/search")), None
        if (
            rest[:3] == ["npm", "v1", "security"]
            and method == b"POST"
            and len(rest) > 3
            and all(_ENDPOINT.fullmatch(s) for s in rest[3:])
        ):
            return (lambda r: self._pass_through(r, "-/npm/v1/security/" + "/".join(rest[3:]))), None
        if rest[:1] == ["package"] and rest[-1:] == ["dist-tags"] and method in (b"GET", b"HEAD"):
            name, tail = split_request(rest[1:-1] + ["dist-tags"])
            if tail == ["dist-tags"]:
                return (lambda r: self._dist_tags(r, name)), name
        if method not in (b"GET", b"HEAD"):
            return self._read_only, None
        raise InvalidName("not found")

    async def _read_only(self, request: Request) -> None:
        request.setHeader(b"allow", b"GET, HEAD")
        request.write(text(request, NOT_ALLOWED, READ_ONLY))
        request.finish()

    async def _ping(self, request: Request) -> None:
        self._json(request, b"{}")

    def _json(self, request: Request, body: bytes) -> None:
        request.setResponseCode(OK)
        request.setHeader(b"content-type", b"application/json")
        request.setHeader(b"content-length", b"%d" % len(body))
        request.write(body)
        request.finish()

    async def _packument(self, request: Request, name: PackageName, base: str) -> None:
        registry = self.registry
        variant, gzip = _variant(request), _accepts_gzip(request)

        async def answer() -> None:
            found, served, fresh = await registry.rendered(name, variant, base, gzip)
            outcome = MISS if fresh and served.outcome == HIT else served.outcome
            headers = cache_headers(outcome, b"public, max-age=%d" % int(registry.metadata_ttl))
            headers[b"vary"] = b"Accept, Accept-Encoding"
            if gzip:
                headers[b"content-encoding"] = b"gzip"
            content_type = str(served.entry.attrs.get("content_type", "application/json")).encode()
            last_modified = served.entry.attrs.get("fetched", served.entry.created)
            if registry.policy.applies(name.full):
                # What the policy hides changes without upstream's doing.
                last_modified = max(last_modified, found.entry.created)
            await send_blob(
                request, registry.store, found.entry.blob, content_type, headers,
                last_modified=last_modified, body=found.body,
            )

        await refetching(request, registry.cache, answer)

    async def _tarball(self, request: Request, name: PackageName, file: str) -> None:
        registry = self.registry

        async def answer() -> None:
            served = await registry.tarball(name, file)
            headers = cache_headers(served.outcome, IMMUTABLE)
            await send_blob(
                request, registry.store, served.entry.blob, b"application/octet-stream", headers, body=served.body
            )

        await refetching(request, registry.cache, answer)

    async def _dist_tags(self, request: Request, name: PackageName) -> None:
        served = await self.registry.packument(name, ABBR)
        dist = await self.registry.dist_index(name)
        if dist is None:
            raise Missing(name.full)
        versions = sorted({info["version"] for info in dist["files"].values()})
        tags = await self.registry.dist_tags(name, dist["dist-tags"], versions)
        for header, value in cache_headers(served.outcome, b"public, max-age=%d" % int(self.registry.metadata_ttl)).items():
            request.setHeader(header, value)
        self._json(request, json.dumps(tags).encode())

    def _without_private_names(self, path: str, headers: dict[str, str], body: bytes) -> bytes:
        """
        An audit's body with no routed package in it (their names are
        private: never sent to the public registry). A bulk audit loses
        those names; a quick audit that holds one is not sent at all.
        """
        if headers.get("content-encoding", "").lower() == "gzip":
            try:
                body = zlib.decompress(body, 16 + zlib.MAX_WBITS, MAX_PASS_THROUGH_BODY)
            except zlib.error:
                raise HTTPError(BAD_REQUEST, "the audit's gzip body cannot be read") from None
            del headers["content-encoding"]
        try:
            document = json.loads(body)
        except ValueError:
            raise HTTPError(BAD_REQUEST, "an audit's body is JSON") from None
        registry = self.registry

        def private(name: object) -> bool:
            return isinstance(name, str) and any(route.matches(name) for route in registry.routes)

        if path.endswith("/bulk") and isinstance(document, dict):
            return json.dumps({k: v for k, v in document.items() if not private(k)}).encode()

        def names(node: object) -> Iterator[object]:
            if isinstance(node, dict):
                for key in ("requires", "dependencies"):
                    inner = node.get(key)
                    if isinstance(inner, dict):
                        yield from inner
                        for child in inner.values():
                            yield from names(child)

        if any(private(n) for n in names(document)):
            raise HTTPError(NOT_FOUND, "not forwarded: this audit names private packages (use a bulk audit)")
        return body

    async def _pass_through(self, request: Request, path: str, name: PackageName | None = None) -> None:
        # A package's own goes to its route; search and audits to the
        # public upstream.
        upstream = self.registry.upstream_for(name) if name is not None else self.registry.upstream
        if upstream is None:
            raise Missing(f"{path} (no npm upstream is configured)")
        query = request.uri.split(b"?", 1)[1].decode("latin-1") if b"?" in request.uri else ""
        url = upstream.url(path) + (f"?{query}" if query else "")
        headers = {}
        for header in (b"accept", b"content-type", b"content-encoding", b"npm-command", b"user-agent"):
            value = request.getHeader(header)
            if value is not None:
                headers[header.decode()] = value.decode("latin-1")
        body = None
        if request.method == b"POST" and request.content is not None:
            body = request.content.read(MAX_PASS_THROUGH_BODY + 1)
            if len(body) > MAX_PASS_THROUGH_BODY:
                raise HTTPError(REQUEST_ENTITY_TOO_LARGE, "request body too large")
            if path.startswith("-/npm/v1/security/") and self.registry.routes:
                body = await self.registry._disk.run(self._without_private_names, path, headers, body)
        response, received = await upstream.forward(request.method.decode(), url, headers, body)
        content = await treq.content(response)
        request.setResponseCode(response.code)
        for field_name in ("content-type", "content-encoding"):
            if field_name in received:
                request.setHeader(field_name.encode(), received[field_name].encode("latin-1"))
        request.setHeader(b"content-length", b"%d" % len(content))
        request.setHeader(b"cache-control", b"no-store")
        request.write(content)
        request.finish()
