"""
Starting the npm adapter: which upstream to use, from the flag or else
from the npm client's own configuration.
"""

from __future__ import annotations

from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred, gatherResults, succeed
from twisted.logger import Logger

from ...discover import choose_upstream, npm_registry
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
        url = choose_upstream(
            self._upstream, npm_registry, self._port, "/npm", "npm config get registry", "--npm-upstream"
        )
        if url is not None:
            self.registry.upstream = Upstream.create(url, self._reactor, self._timeouts, protocol="npm")
        self.registry.policy.announce()
        super().startService()

    def stopService(self) -> Deferred[Any]:
        super().stopService()
        upstreams = [route.upstream for route in self.registry.routes]
        if self.registry.upstream is not None:
            upstreams.append(self.registry.upstream)
        if not upstreams:
            return succeed(None)
        return gatherResults([u.close() for u in upstreams])
