"""
The root resource: the daemon's whole HTTP surface.
"""

from __future__ import annotations

import json
from typing import Any, Mapping

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.web.http import NOT_ALLOWED, NOT_FOUND, OK, SERVICE_UNAVAILABLE
from twisted.web.resource import IResource, Resource
from twisted.web.server import Request

from . import __version__, tempfiles
from .index import SQLiteIndex
from .pool import Runner
from .store import Store
from .web import AsyncResource, NotFoundResource, exact, text

log = Logger()


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

    async def render_async(self, request: Request) -> None:
        checks = {
            "storage": await self._check(
                "storage", self._disk.run(_probe_directory, self._store.staging)
            ),
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

