"""
The root resource: the daemon's whole HTTP surface.
"""

from __future__ import annotations

import json
import time
from typing import Any, Mapping

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.web import http
from twisted.web.http import NOT_ALLOWED, NOT_FOUND, OK, SERVICE_UNAVAILABLE
from twisted.web.resource import IResource, Resource
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from twisted.web.server import Request, Site

from . import __version__, metrics, tempfiles
from .index import SQLiteIndex
from .pool import Runner
from .store import BLOB_PREFIX, Store
from .web import AsyncResource, NotFoundResource, exact, text

log = Logger()
access = Logger(namespace="contentcache.access")


def _probe_directory(directory: str) -> None:
    path, handle = tempfiles.create(directory, "health-")
    tempfiles.discard(path, handle)


class Health(AsyncResource):
    """
    C{GET /health}: 200 when the storage accepts writes and the index
    answers, 503 (with what failed) otherwise.
    """

    def __init__(self, store: Store, index: SQLiteIndex, disk: Runner) -> None:
        super().__init__()
        self._store = store
        self._index = index
        self._disk = disk

    async def _check(self, what: str, d: Deferred[Any]) -> str:
        try:
            await d
        except Exception as e:
            log.warn("health check: {what} failed: {error}", what=what, error=e)
            return f"error: {e}"
        return "ok"

    async def _probe_storage(self) -> None:
        await self._disk.run(_probe_directory, self._store.staging)
        # A round trip to the backend (S3: a HEAD that finds nothing).
        await self._store.backend.stat(BLOB_PREFIX)

    async def render_async(self, request: Request) -> None:
        checks = {
            "storage": await self._check("storage", Deferred.fromCoroutine(self._probe_storage())),
            "index": await self._check("index", self._index.writable()),
        }
        healthy = all(v == "ok" for v in checks.values())
        body = json.dumps(
            {"status": "ok" if healthy else "unavailable", "version": __version__, **checks}
        ).encode("utf-8") + b"\n"
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

    def __init__(self, index: SQLiteIndex) -> None:
        super().__init__()
        self._index = index
        self._stats_at = float("-inf")

    async def render_async(self, request: Request) -> None:
        if time.monotonic() - self._stats_at > metrics.STORE_STATS_MAX_AGE:
            found = await self._index.call("stats")
            metrics.store_blobs.set(found["blobs"])
            metrics.store_logical_bytes.set(found["logical_bytes"])
            metrics.store_bytes.set(found["stored_bytes"])
            self._stats_at = time.monotonic()
        body = generate_latest(metrics.REGISTRY)
        request.setHeader(b"content-type", CONTENT_TYPE_LATEST.encode())
        request.setHeader(b"cache-control", b"no-store")
        request.setHeader(b"content-length", b"%d" % len(body))
        request.write(body)
        request.finish()


class TimedRequest(Request):
    """
    A request that knows when it arrived.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.started = time.monotonic()


class CacheSite(Site):
    """
    The daemon's site: one log line and the metrics for every request.
    """

    requestFactory = TimedRequest
    displayTracebacks = False
    count_requests = True

    def log(self, request: http.Request) -> None:
        started = getattr(request, "started", time.monotonic())
        if self.count_requests:
            metrics.observe_request(request, started)
        outcome = request.responseHeaders.getRawHeaders(b"x-cache", [b"-"])[0]
        access.info(
            "{method} {path} {status} {cache_result} {bytes} {duration:.4f} {upstream_time:.4f}",
            method=request.method.decode("latin-1"),
            path=request.uri.decode("latin-1")[:2048],
            status=request.code,
            cache_result=outcome.decode("latin-1").lower(),
            bytes=request.sentLength,
            duration=time.monotonic() - started,
            upstream_time=getattr(request, "upstream_time", [0.0])[0],
            client=request.getClientAddress().host if hasattr(request.getClientAddress(), "host") else "-",
        )


class Root(Resource):
    """
    Routes the top-level path segment; anything unknown is a 404.
    """

    def __init__(
        self,
        store: Store,
        index: SQLiteIndex,
        disk: Runner,
        protocols: Mapping[bytes, IResource] | None = None,
    ) -> None:
        super().__init__()
        self.putChild(b"health", Health(store, index, disk))
        self.putChild(b"metrics", Metrics(index))
        for name, resource in (protocols or {}).items():
            self.putChild(name, resource)

    def getChild(self, path: bytes, request: Request) -> IResource:
        if path == b"":
            return _Home()
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

