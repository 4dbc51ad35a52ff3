"""
Starting the GOPROXY adapter: which upstream and checksum databases to use,
from the flags or else from the go command's own settings.
"""

from __future__ import annotations

from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred, gatherResults
from twisted.logger import Logger

from ...discover import GO_SETTINGS, choose_upstream, first_proxy_url, go_env
from ...upstream import Timeouts, Upstream
from .resource import GoProxy
from .sumdb import InvalidSumDB, SumDB, parse_gosumdb

log = Logger()


class GoProxyService(Service):
    """
    Resolves the adapter's upstreams at start and closes their connections
    at stop.

    @param upstream: C{--go-upstream}, or L{None} to ask C{go env GOPROXY}.
    @param sumdbs: C{--go-sumdb} values, C{"off"}, or L{None} to ask
        C{go env GOSUMDB}.
    @param port: the TCP port the daemon listens on, if known, to refuse an
        upstream that is this daemon.
    """

    def __init__(
        self,
        proxy: GoProxy,
        reactor: Any,
        timeouts: Timeouts,
        upstream: str | None,
        sumdbs: list[SumDB] | str | None,
        port: int | None,
        nosumdb: str | None = None,
    ) -> None:
        self.proxy = proxy
        self._reactor = reactor
        self._timeouts = timeouts
        self._upstream = upstream
        self._sumdbs = sumdbs
        self._port = port
        self._nosumdb = nosumdb

    def _settings(self) -> dict[str, str]:
        if self._upstream is not None and self._sumdbs is not None and self._nosumdb is not None:
            return {}
        return go_env(*GO_SETTINGS) or {}

    def startService(self) -> None:
        settings = self._settings()
        url = choose_upstream(
            self._upstream, lambda: first_proxy_url(settings.get("GOPROXY", "")),
            self._port, "/goproxy", "go env GOPROXY", "--go-upstream",
        )
        if url is not None:
            self.proxy.upstream = Upstream.create(url, self._reactor, self._timeouts, protocol="go")

        sumdbs: list[SumDB] = []
        if isinstance(self._sumdbs, list):
            sumdbs = self._sumdbs
        elif self._sumdbs is None:
            try:
                found = parse_gosumdb(settings.get("GOSUMDB", ""))
            except InvalidSumDB as e:
                raise SystemExit(f"{e}; pass --go-sumdb NAME=URL or --go-sumdb off.") from None
            if found is not None:
                sumdbs = [found]
                log.info("checksum database {name} at {url} (from go env GOSUMDB)", name=found.name, url=found.url)
        for sumdb in sumdbs:
            self.proxy.sumdbs[sumdb.name] = (
                sumdb, Upstream.create(sumdb.url, self._reactor, self._timeouts, protocol="gosumdb")
            )
        self.proxy.verifier = sumdbs[0].name if sumdbs else None
        if self._nosumdb is not None:
            self.proxy.nosumdb = self._nosumdb
        else:
            # The go command reads GONOSUMDB, which defaults to GOPRIVATE.
            self.proxy.nosumdb = settings.get("GONOSUMDB") or settings.get("GOPRIVATE", "")
        if self.proxy.nosumdb and sumdbs:
            log.info("not looking up modules matching {patterns} in the checksum database",
                     patterns=self.proxy.nosumdb)
        if not sumdbs:
            log.info("no checksum database: Go downloads are stored unverified")
        self.proxy.policy.announce()
        super().startService()

    def stopService(self) -> Deferred[Any]:
        super().stopService()
        upstreams = [u for _, u in self.proxy.sumdbs.values()] + [route.upstream for route in self.proxy.routes]
        if self.proxy.upstream is not None:
            upstreams.append(self.proxy.upstream)
        return gatherResults([u.close() for u in upstreams])
