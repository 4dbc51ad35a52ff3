"""
Upstream routes: which packages come from which upstream, with which
credentials, and whether what was fetched with them needs a client token.

A route's secret is read at start from the environment variable or the
file the configuration names, and lives only in the route's upstream
(never in a log line, an error, a metric or a trace).
"""

from __future__ import annotations

import base64
import fnmatch
import os
import stat
from typing import Any, Mapping, Protocol, Sequence, TypeVar

from attrs import field, frozen
from twisted.logger import Logger

from .config import ConfigError, Route
from .protocol.goproxy.paths import match_prefix_patterns
from .upstream import Timeouts, Upstream

log = Logger()


@frozen
class NpmRoute:
    """
    A configured route with its upstream, ready to fetch.
    """

    patterns: list[str]
    upstream: Upstream = field(repr=False)
    tarball_hosts: frozenset[str]
    #: "token": what it serves needs a client token; "public": it does not.
    access: str
    where: str

    def matches(self, name: str) -> bool:
        return any(fnmatch.fnmatchcase(name, pattern) for pattern in self.patterns)


class _Matching(Protocol):
    def matches(self, name: str) -> bool: ...


R = TypeVar("R", bound=_Matching)


def first_match(routes: Sequence[R], name: str) -> R | None:
    """
    The route of a package or module: the first whose patterns match its
    name (an npm name, a Go module path).
    """
    for route in routes:
        if route.matches(name):
            return route
    return None


def _secret_file(path: str, where: str, key: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            secret = f.read().strip()
        mode = os.stat(path).st_mode
    except OSError as e:
        raise ConfigError(f"{where}: key {key!r}: cannot read {path}: {e.strerror}.") from None
    if mode & (stat.S_IRGRP | stat.S_IROTH):
        log.warn("{path} ({where}) holds a secret and other users can read it: chmod 600 {path}",
                 path=path, where=where)
    if not secret:
        raise ConfigError(f"{where}: key {key!r}: {path} is empty.")
    return secret


def _secret_env(name: str, environ: Mapping[str, str], where: str, key: str) -> str:
    secret = environ.get(name, "").strip()
    if not secret:
        raise ConfigError(f"{where}: key {key!r}: the environment variable {name} is not set.")
    return secret


def credential(route: Route, environ: Mapping[str, str]) -> str | None:
    """
    The C{Authorization} value a route sends, read now; L{None} without one.
    """
    if route.token_env is not None:
        return "Bearer " + _secret_env(route.token_env, environ, route.at("token_env"), "token_env")
    if route.token_file is not None:
        return "Bearer " + _secret_file(route.token_file, route.at("token_file"), "token_file")
    if route.username is not None:
        if route.password_env is not None:
            password = _secret_env(route.password_env, environ, route.at("password_env"), "password_env")
        else:
            assert route.password_file is not None
            password = _secret_file(route.password_file, route.at("password_file"), "password_file")
        return "Basic " + base64.b64encode(f"{route.username}:{password}".encode()).decode("ascii")
    return None


@frozen
class GoRoute:
    """
    A configured route for Go modules (GOPRIVATE-style path globs).
    """

    patterns: list[str]
    upstream: Upstream = field(repr=False)
    access: str
    where: str

    def matches(self, path: str) -> bool:
        return match_prefix_patterns(",".join(self.patterns), path)


def go_routes(
    routes: list[Route], reactor: Any, timeouts: Timeouts, environ: Mapping[str, str] = os.environ
) -> list[GoRoute]:
    """
    The configured Go routes with their upstreams.
    """
    return [
        GoRoute(list(route.patterns), Upstream.create(route.upstream, reactor, timeouts, protocol="go",
                                                       credential=credential(route, environ)),
                route.access, route.where)
        for route in routes
    ]


def npm_routes(
    routes: list[Route], reactor: Any, timeouts: Timeouts, environ: Mapping[str, str] = os.environ
) -> list[NpmRoute]:
    """
    The configured npm routes with their upstreams (raises L{ConfigError}
    in one sentence for a credential it cannot read).
    """
    made = []
    for route in routes:
        hosts = frozenset(h.lower() for h in route.tarball_hosts)
        upstream = Upstream.create(route.upstream, reactor, timeouts, protocol="npm",
                                   credential=credential(route, environ), extra_hosts=hosts)
        made.append(NpmRoute(list(route.patterns), upstream, hosts, route.access, route.where))
    return made
