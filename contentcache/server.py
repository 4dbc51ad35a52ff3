"""
The root resource: the daemon's whole HTTP surface.
"""

from __future__ import annotations

import json
import time
from typing import Any, Callable, Mapping
from urllib.parse import unquote

from twisted.internet.defer import CancelledError, Deferred
from twisted.logger import Logger
from twisted.web import http
from twisted.web.http import NOT_ALLOWED, NOT_FOUND, OK, SERVICE_UNAVAILABLE
from twisted.web.resource import IResource, Resource
from prometheus_client import CONTENT_TYPE_LATEST
from twisted.web.server import Request, Site

from . import __version__, activity, metrics
from .channel import CacheChannel, CacheRequest, Deadlines, Watch, peer
from .logs import AccessLog
from .index import IIndex, IndexUnavailable
from .space import StorageFull
from .pool import Runner
from .store import Store
from .web import AsyncResource, NotFoundResource, exact, text

log = Logger()


class Health(AsyncResource):
    """
    C{GET /health}: 200 when the storage accepts writes and the index
    answers, 503 (with what failed) otherwise. A full storage is 200 with
    C{"storage": "full"}: hits are still served, misses are not stored.
    """

    def __init__(self, store: Store, index: IIndex) -> None:
        super().__init__()
        self._store = store
        self._index = index

    async def _check(self, what: str, d: Deferred[Any]) -> str:
        try:
            await d
        except CancelledError:
            raise  # the client left: nobody to answer
        except StorageFull:
            return "full"
        except Exception as e:
            log.warn("health check: {what} failed: {error}", what=what, error=e)
            return f"error: {e}"
        return "ok"

    async def render_async(self, request: Request) -> None:
        checks = {
            "storage": await self._check("storage", Deferred.fromCoroutine(self._store.probe())),
            "index": await self._check("index", self._index.writable()),
        }
        healthy = all(v in ("ok", "full") for v in checks.values())
        status = "unavailable" if not healthy else "degraded" if "full" in checks.values() else "ok"
        body = json.dumps({"status": status, "version": __version__, **checks}).encode("utf-8") + b"\n"
        request.setResponseCode(OK if healthy else SERVICE_UNAVAILABLE)
        request.setHeader(b"content-type", b"application/json")
        request.setHeader(b"cache-control", b"no-store")
        request.setHeader(b"content-length", b"%d" % len(body))
        request.write(body)
        request.finish()


class Metrics(AsyncResource):
    """
    C{GET /metrics}: the Prometheus text format.
    """

    def __init__(self, index: IIndex, store: Store, disk: Runner | None = None,
                 gauges: Callable[[], None] | None = None) -> None:
        super().__init__()
        self._index = index
        self._store = store
        self._disk = disk
        self._gauges = gauges
        self._stats_at = float("-inf")

    async def render_async(self, request: Request) -> None:
        if time.monotonic() - self._stats_at > metrics.STORE_STATS_MAX_AGE:
            try:
                found = await self._index.stats()
            except IndexUnavailable as e:
                # The last figures stay: a node's own counts matter most
                # when its index is away.
                log.warn("store figures for /metrics: {error}", error=e)
            else:
                metrics.store_blobs.set(found.blobs)
                metrics.store_logical_bytes.set(found.logical_bytes)
                metrics.store_bytes.set(found.stored_bytes)
                self._stats_at = time.monotonic()
        room = await self._store.room()
        metrics.storage_free_bytes.set(room.free)
        metrics.storage_size_bytes.set(room.total)
        # The storage's state as every worker sees it (the last to write
        # says whether it is full): set by whichever answers.
        full = await Deferred.fromCoroutine(self._full_now())
        metrics.storage_full.set(1 if full else 0)
        if self._gauges is not None:
            self._gauges()
        if metrics.MULTIPROCESS_DIRECTORY is not None and self._disk is not None:
            body = await self._disk.run(metrics.collect)  # every worker's files
        else:
            body = metrics.collect()
        request.setHeader(b"content-type", CONTENT_TYPE_LATEST.encode())
        request.setHeader(b"cache-control", b"no-store")
        request.setHeader(b"content-length", b"%d" % len(body))
        request.write(body)
        request.finish()


    async def _full_now(self) -> bool:
        if self._disk is None:
            return self._store.space.full
        return bool(await self._disk.run(self._store.space.full_now))


class CacheSite(Site):
    """
    The daemon's site: its connections' deadlines, and one log line and
    the metrics for every request, also for one whose client left before
    it was answered (and for what never became a request).
    """

    protocol = CacheChannel  # type: ignore[assignment]  # HTTP/1.1 only: no TLS, so no h2
    requestFactory = CacheRequest
    displayTracebacks = False
    count_requests = True

    def __init__(self, resource: IResource, deadlines: Deadlines = Deadlines(), **kwargs: Any) -> None:
        # The channels keep their own deadlines: no Twisted idle timeout.
        super().__init__(resource, timeout=None, **kwargs)
        self.deadlines = deadlines
        self.watch = Watch(self.reactor)
        self.access = AccessLog(self.reactor)

    def startFactory(self) -> None:
        super().startFactory()
        self.access.start()

    def stopFactory(self) -> None:
        self.access.stop()
        super().stopFactory()

    def log(self, request: http.Request) -> None:
        started = getattr(request, "started", time.monotonic())
        if self.count_requests:
            metrics.observe_request(request, started)
        outcome = request.responseHeaders.getRawHeaders(b"x-cache", [b"-"])[0]
        aborted = getattr(request, "aborted", False)
        cut = getattr(request, "cut", False)
        if outcome == b"STALE":
            if not metrics.is_revalidating(request):
                activity.current.served_stale(metrics.protocol_of(request))
        elif request.code >= 400 and not aborted and not getattr(request, "not_here", False):
            _record_error(request)
        self.access.log(
            end=" client left" if aborted else " cut off" if cut else "",
            method=request.method.decode("latin-1"),
            path=request.uri.decode("latin-1")[:2048],
            status=request.code,
            cache_result=outcome.decode("latin-1").lower(),
            bytes=request.sentLength,
            duration=time.monotonic() - started,
            upstream_time=getattr(request, "upstream_time", [0.0])[0],
            client=_client(request),
            aborted=aborted,
            cut=cut,
        )

    def client_left(self, request: CacheRequest) -> None:
        """
        A request's connection went before it was finished: logged once
        like any other request, and, if its client left with the response
        cut short, counted as an abort (at debug level: clients do this
        all the time).
        """
        if request.aborted:
            metrics.client_aborts.labels(metrics.protocol_of(request)).inc()
            log.debug("client left {method} {path} after {bytes} bytes of the response",
                      method=request.method.decode("latin-1"), path=request.uri.decode("latin-1")[:256],
                      bytes=request.sentLength)
        self.log(request)

    def refused(self, channel: http.HTTPChannel, code: int, reason: str) -> None:
        """
        A connection was answered C{code} before it held a request the
        site could answer (one that cannot be parsed, is too slow or too
        large): counted, and logged at debug level.
        """
        if self.count_requests:
            metrics.observe_refused(code)
        log.debug("answered {status} to {peer}: {reason}", status=code, reason=reason, peer=peer(channel))


def _record_error(request: http.Request) -> None:
    """
    An error answered, for the status page: the path without its query
    (which may hold what is not ours to show), and what the client was told.
    """
    path = unquote(request.uri.split(b"?", 1)[0].decode("latin-1"), errors="replace")
    reason = getattr(request, "reason", None) or http.RESPONSES.get(request.code, b"error").decode("latin-1")
    activity.current.error(metrics.protocol_of(request), request.method.decode("latin-1"), path,
                           int(request.code), reason)


def _client(request: http.Request) -> str:
    address = request.getClientAddress()
    return str(getattr(address, "host", "-"))


class Root(Resource):
    """
    Routes the top-level path segment; anything unknown is a 404.
    """

    def __init__(
        self,
        store: Store,
        index: IIndex,
        protocols: Mapping[bytes, IResource] | None = None,
        disk: Runner | None = None,
        gauges: Callable[[], None] | None = None,
        ui: tuple[IResource, IResource, IResource] | None = None,
    ) -> None:
        super().__init__()
        self.putChild(b"health", Health(store, index))
        self.metrics = Metrics(index, store, disk, gauges)
        self.putChild(b"metrics", self.metrics)
        for name, resource in (protocols or {}).items():
            self.putChild(name, resource)
        #: The status page, without one a line that names the daemon.
        self.home: IResource = _Home()
        if ui is not None:
            self.home, below, icon = ui
            self.putChild(b"-", below)
            self.putChild(b"favicon.ico", icon)

    def getChild(self, path: bytes, request: Request) -> IResource:
        if path == b"":
            return self.home
        return NotFoundResource()


class _Home(Resource):
    isLeaf = True

    def render(self, request: Request) -> bytes:
        if not exact(request):
            return text(request, NOT_FOUND, "not found")
        if request.method not in (b"GET", b"HEAD"):
            request.setHeader(b"allow", b"GET, HEAD")
            return text(request, NOT_ALLOWED, "method not allowed")
        return text(request, OK, f"contentcache {__version__}")

