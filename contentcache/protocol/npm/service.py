"""
Starting the npm adapter: which upstream to use, from the flag or else
from the npm client's own configuration.
"""

from __future__ import annotations

from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger

from ...discover import npm_registry, points_at_self
from ...upstream import Timeouts, Upstream
from .resource import NpmRegistry

log = Logger()


class NpmService(Service):
    """
    Resolves the npm upstream at start and closes its connections at stop.
    """

    def __init__(
        self,
        registry: NpmRegistry,
        reactor: Any,
        timeouts: Timeouts,
        upstream: str | None,
        port: int | None,
    ) -> None:
        self.registry = registry
        self._reactor = reactor
        self._timeouts = timeouts
        self._upstream = upstream
        self._port = port

    def startService(self) -> None:
        url = self._upstream
        if url is None:
            url = npm_registry()
            if url is not None and points_at_self(url, self._port, "/npm"):
                raise SystemExit(
                    f"npm config get registry ({url}) points at this daemon; pass "
                    f"--npm-upstream with the registry to fetch from."
                )
            if url is not None:
                log.info("npm upstream {url} (from npm config get registry)", url=url)
        if url is None:
            log.warn("no npm upstream (--npm-upstream or npm config get registry): /npm serves only what is cached")
        else:
            self.registry.upstream = Upstream.create(url, self._reactor, self._timeouts)
        super().startService()

    def stopService(self) -> Deferred[Any]:
        super().stopService()
        if self.registry.upstream is None:
            return succeed(None)
        return self.registry.upstream.close()
