"""
Finding upstreams in the user's own client configuration when no flag
names them: C{go env GOPROXY}, C{go env GOSUMDB} and C{npm config get
registry}.

These functions run a client once at startup, before the reactor runs.
"""

from __future__ import annotations

import ipaddress
import json
import os
import socket
import subprocess
from typing import Any, Callable
from urllib.parse import urlsplit

from twisted.logger import Logger

log = Logger()

CLIENT_TIMEOUT = 20.0


def _ask(argv: list[str]) -> str | None:
    """
    What a client prints for a question about its configuration, or
    L{None} (logged) when there is no such client or it fails. Its output
    is captured: none of it reaches the daemon's log as is.
    """
    try:
        result = subprocess.run(argv, capture_output=True, timeout=CLIENT_TIMEOUT, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired) as e:
        log.info("could not run {command}: {error}", command=" ".join(argv), error=e)
        return None
    if result.returncode != 0:
        log.warn("{command} failed: {error}", command=" ".join(argv),
                 error=result.stderr.decode(errors="replace").strip()[:500])
        return None
    return result.stdout.decode(errors="replace")


#: What the supervisor of workers found, for its workers (JSON): asking
#: the go and npm commands takes a second, and a worker that replaces one
#: that died should serve at once.
FOUND_VARIABLE = "CONTENTCACHE_FOUND_SETTINGS"
GO_SETTINGS = ("GOPROXY", "GOSUMDB", "GONOSUMDB", "GOPRIVATE")


def _found() -> dict[str, Any]:
    found: dict[str, Any] = json.loads(os.environ.get(FOUND_VARIABLE) or "{}")
    return found


def find_for_workers() -> str:
    """
    The clients' settings, asked once, as the JSON workers find in
    L{FOUND_VARIABLE} (and this process too, from now on).
    """
    found = json.dumps({"go": go_env(*GO_SETTINGS), "npm": npm_registry()})
    os.environ[FOUND_VARIABLE] = found
    return found


def go_env(*names: str) -> dict[str, str] | None:
    """
    The go command's settings, or L{None} when there is no go command.
    """
    found = _found()
    if "go" in found:
        return None if found["go"] is None else {k: v for k, v in found["go"].items() if k in names}
    output = _ask(["go", "env", "-json", *names])
    if output is None:
        return None
    settings: dict[str, str] = json.loads(output)
    return settings


def npm_registry() -> str | None:
    """
    The registry the npm client is configured to use, or L{None} when
    there is no npm client.
    """
    found = _found()
    if "npm" in found:
        return str(found["npm"]) if found["npm"] else None
    url = (_ask(["npm", "config", "get", "registry"]) or "").strip()
    if not url.startswith(("http://", "https://")):
        log.warn("npm config get registry gave no registry URL")
        return None
    return url.rstrip("/")


def first_proxy_url(goproxy: str) -> str | None:
    """
    The first URL in a GOPROXY list (entries separated by C{,} or C{|};
    C{direct} and C{off} are not URLs).
    """
    for entry in goproxy.replace("|", ",").split(","):
        entry = entry.strip()
        if entry == "off":
            return None
        if entry.startswith(("http://", "https://")):
            return entry.rstrip("/")
    return None


def _local_names() -> set[str]:
    names = {"localhost", "localhost.localdomain"}
    try:
        names.add(socket.gethostname().lower())
        names.add(socket.getfqdn().lower())
    except OSError:
        pass
    return names


def _is_local(host: str) -> bool:
    if host.lower() in _local_names():
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    return address.is_loopback or address.is_unspecified


def points_at_self(url: str, port: int | None, prefix: str) -> bool:
    """
    Whether C{url} would send this daemon's requests back to itself: a
    local address on the port it listens on (or, when that port is not
    known, under the path it serves this protocol at).
    """
    parts = urlsplit(url)
    if not parts.hostname or not _is_local(parts.hostname):
        return False
    url_port = parts.port or (443 if parts.scheme == "https" else 80)
    if port is not None:
        return url_port == port
    return parts.path.rstrip("/").startswith(prefix)


def choose_upstream(
    flag: str | None,
    discover: Callable[[], str | None],
    port: int | None,
    prefix: str,
    source: str,
    option: str,
    quiet: bool = False,
) -> str | None:
    """
    The upstream a protocol fetches from: C{flag} if given, else what the
    client's configuration (C{source}) names, refused when that would be
    this daemon itself. L{None} means cache-only, and is logged.
    """
    url = flag
    if url is None:
        url = discover()
        if url is not None and points_at_self(url, port, prefix):
            raise SystemExit(
                f"{source} ({url}) points at this daemon; pass {option} with the upstream to fetch from."
            )
        if url is not None and not quiet:
            log.info("{prefix} upstream {url} (from {source})", prefix=prefix, url=url, source=source)
    if url is None and not quiet:
        log.warn("no upstream ({option} or {source}): {prefix} serves only what is cached",
                 option=option, source=source, prefix=prefix)
    return url
