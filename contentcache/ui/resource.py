"""
The UI's resources: C{/} (the status page), C{/-/stats}, C{/-/ui/...}
(package views, the search, the stylesheet and the refresher) and
C{/favicon.ico}. Read-only: GET and HEAD. With C{--ui-access token} the
pages need a client token (a browser asks for it as a Basic password);
the stylesheet, the refresher and the icon never do.
"""

from __future__ import annotations

from attrs import evolve

import json

from twisted.web.http import NOT_FOUND, OK
from twisted.web.resource import IResource, Resource
from twisted.web.server import Request

from ..web import AsyncResource, IGuard, NotFoundResource, exact, path_segments
from . import Dashboard
from .assets import FAVICON, REFRESHER, STYLESHEET
from .packages import NotAName, go_module, go_rows, npm_name, npm_rows, search
from .page import not_a_name_page, package_page, search_page, status_page

HTML = b"text/html; charset=utf-8"
#: Scripts, styles and images from this daemon only: a name that slipped
#: through escaping still could not run.
POLICY = (b"default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
          b"form-action 'self'; base-uri 'none'; frame-ancestors 'none'")
#: How long a browser keeps the stylesheet, the refresher and the icon.
ASSET_MAX_AGE = b"public, max-age=3600"


def _send(request: Request, code: int, content_type: bytes, body: bytes, cache_control: bytes = b"no-store") -> None:
    request.setResponseCode(code)
    request.setHeader(b"content-type", content_type)
    request.setHeader(b"content-length", b"%d" % len(body))
    request.setHeader(b"cache-control", cache_control)
    request.setHeader(b"x-content-type-options", b"nosniff")
    if content_type == HTML:
        request.setHeader(b"content-security-policy", POLICY)
        request.setHeader(b"referrer-policy", b"same-origin")
    request.write(body)
    request.finish()


class StatusPage(AsyncResource):
    """
    C{GET /}.
    """

    def __init__(self, dashboard: Dashboard) -> None:
        super().__init__()
        self.dashboard = dashboard

    async def render_async(self, request: Request) -> None:
        figures = await self.dashboard.figures()
        _send(request, OK, HTML, await self.dashboard.disk.run(status_page, figures))


class Stats(AsyncResource):
    """
    C{GET /-/stats}: the status page's figures as JSON.
    """

    def __init__(self, dashboard: Dashboard) -> None:
        super().__init__()
        self.dashboard = dashboard

    async def render_async(self, request: Request) -> None:
        body = json.dumps(await self.dashboard.figures(), indent=1, sort_keys=True).encode("utf-8") + b"\n"
        _send(request, OK, b"application/json", body)


class PackageView(AsyncResource):
    """
    C{GET /-/ui/npm/NAME} and C{GET /-/ui/go/MODULE}.
    """

    takes_subpath = True

    def __init__(self, dashboard: Dashboard, protocol: str) -> None:
        super().__init__()
        self.dashboard = dashboard
        self.protocol = protocol

    async def render_async(self, request: Request) -> None:
        kind = "Go module" if self.protocol == "go" else "npm package"
        index = self.dashboard.index
        try:
            text = "/".join(path_segments(request, NotAName, slash_allowed=True)).strip("/")
        except NotAName as e:
            _send(request, NOT_FOUND, HTML, not_a_name_page(kind, "", str(e)))
            return
        try:
            if self.protocol == "go":
                view = await go_rows(index, go_module(text))
            else:
                view = await npm_rows(index, npm_name(text))
        except NotAName as e:
            _send(request, NOT_FOUND, HTML, not_a_name_page(kind, text, str(e)))
            return
        verdicts = self.dashboard.verdicts.get(self.protocol)
        if verdicts is not None and view.versions:
            hidden = await verdicts(view.name, [row.version for row in view.versions])
            view = evolve(view, versions=[evolve(row, hidden=hidden.get(row.version)) for row in view.versions])
        body = package_page(view, self.dashboard.clock.seconds(), self.dashboard.settings.purge_options)
        _send(request, OK, HTML, body)


class Search(AsyncResource):
    """
    C{GET /-/ui/search?q=TEXT}: cached names that start with TEXT.
    """

    async def render_async(self, request: Request) -> None:
        args: dict[bytes, list[bytes]] = request.args or {}
        raw = args.get(b"q", [b""])[0]
        text = raw.decode("utf-8", "replace")[:256]
        found = await search(self.dashboard.index, text)
        _send(request, OK, HTML, search_page(text, found))

    def __init__(self, dashboard: Dashboard) -> None:
        super().__init__()
        self.dashboard = dashboard


class Asset(Resource):
    """
    A file of the UI's, the same bytes for everyone.
    """

    isLeaf = True

    def __init__(self, content_type: bytes, body: bytes) -> None:
        super().__init__()
        self._content_type = content_type
        self._body = body

    def render_GET(self, request: Request) -> bytes:
        if not exact(request):
            request.setResponseCode(NOT_FOUND)
            request.setHeader(b"content-type", b"text/plain; charset=utf-8")
            return b"not found\n"
        request.setHeader(b"content-type", self._content_type)
        request.setHeader(b"cache-control", ASSET_MAX_AGE)
        request.setHeader(b"x-content-type-options", b"nosniff")
        request.setHeader(b"content-length", b"%d" % len(self._body))
        return self._body

    render_HEAD = render_GET


class _Directory(Resource):
    """
    Routes one path segment; anything else is a 404.
    """

    def getChild(self, path: bytes, request: Request) -> IResource:
        return NotFoundResource()

    def render(self, request: Request) -> bytes:
        return NotFoundResource().render(request)


def resources(dashboard: Dashboard, guard: IGuard | None = None) -> tuple[IResource, IResource, IResource]:
    """
    The status page, the C{/-/} tree and the icon, guarded by C{guard}
    (a client token) where they show the cache's figures or names.
    """
    home = StatusPage(dashboard)
    stats = Stats(dashboard)
    finder = Search(dashboard)
    npm = PackageView(dashboard, "npm")
    go = PackageView(dashboard, "go")
    for resource in (home, stats, finder, npm, go):
        resource.guard = guard
    ui = _Directory()
    ui.putChild(b"style.css", Asset(b"text/css; charset=utf-8", STYLESHEET.encode("utf-8")))
    ui.putChild(b"refresh.js", Asset(b"text/javascript; charset=utf-8", REFRESHER.encode("utf-8")))
    ui.putChild(b"search", finder)
    ui.putChild(b"npm", npm)
    ui.putChild(b"go", go)
    dash = _Directory()
    dash.putChild(b"stats", stats)
    dash.putChild(b"ui", ui)
    return home, dash, Asset(b"image/x-icon", FAVICON)
