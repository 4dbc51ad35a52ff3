"""
Client tokens and the access decision.

A token is 32 random bytes, shown once when it is created
(C{contentcache token create NAME}); the index keeps only its BLAKE3
digest, under its name, on either engine. A request presents it the way
each client sends one: npm, pnpm and yarn as C{Authorization: Bearer
TOKEN}, the go command as HTTP Basic from C{~/.netrc} (any login, the
token as the password).

Each process remembers for a second what a digest named: a revoked token
stops working within two seconds on every worker and node, and a hit
costs a digest and a dict lookup, not a query.
"""

from __future__ import annotations

import base64
import binascii
import re
import secrets
import time
from typing import Callable

from blake3 import blake3
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.web.server import Request

from . import metrics
from .index import IIndex
from .web import HTTPError

log = Logger()

#: What a token starts with, so that one found in a log or a repository
#: is recognisable as ours.
TOKEN_PREFIX = "cc_"
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
#: How long a process trusts what it last learnt of a digest.
REMEMBERED = 1.0
#: Digests remembered at most (a stream of made-up tokens cannot grow it).
REMEMBERED_MAX = 10_000
REALM = b'realm="contentcache"'
CHALLENGES = [b"Bearer " + REALM, b"Basic " + REALM]
UNAUTHORIZED = 401
#: At most one log line a second says that authentications fail.
LOG_INTERVAL = 1.0


def new_token() -> str:
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def digest(token: str) -> str:
    return blake3(token.encode("utf-8")).hexdigest()


def check_name(name: str) -> str:
    if not NAME.fullmatch(name):
        raise ValueError(f"a token's name is letters, digits, '.', '_' and '-', at most 64, not {name!r}")
    return name


def presented(request: Request) -> str | None:
    """
    The token a request carries: Bearer, or the password of Basic.
    """
    raw = request.getHeader(b"authorization")
    if raw is None:
        return None
    header = raw.decode("latin-1") if isinstance(raw, bytes) else raw
    scheme, _, value = header.strip().partition(" ")
    scheme = scheme.lower()
    if scheme == "bearer":
        return value.strip() or None
    if scheme == "basic":
        try:
            decoded = base64.b64decode(value.strip(), validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError):
            return None
        _, colon, password = decoded.partition(":")
        return password if colon and password else None
    return None


class Tokens:
    """
    What this process knows of the index's tokens, for a second at a time.
    """

    def __init__(self, index: IIndex, clock: IReactorTime) -> None:
        self._index = index
        self._clock = clock
        self._known: dict[str, tuple[str | None, float]] = {}

    async def name_of(self, token: str) -> str | None:
        """
        The name of the token, or L{None} if it is none of ours (now).
        """
        key = digest(token)
        now = self._clock.seconds()
        known = self._known.get(key)
        if known is not None and now - known[1] < REMEMBERED:
            name = known[0]
        else:
            name = await self._index.token_named_by(key)
            if len(self._known) >= REMEMBERED_MAX:
                self._known.clear()
            self._known[key] = (name, now)
        if name is not None:
            self._index.token_used(name)
        return name


class Guard:
    """
    Lets through a request that carries a valid token; answers any other
    401, asking for Bearer or Basic.
    """

    def __init__(self, tokens: Tokens, monotonic: Callable[[], float] = time.monotonic) -> None:
        self._tokens = tokens
        self._monotonic = monotonic
        self._logged_at = float("-inf")
        self._unlogged = 0

    async def check(self, request: Request) -> None:
        token = presented(request)
        if token is not None and await self._tokens.name_of(token) is not None:
            return
        reason = "missing" if token is None else "unknown"
        metrics.auth_failures.labels(reason).inc()
        self._note(request, reason)
        request.responseHeaders.setRawHeaders(b"www-authenticate", CHALLENGES)
        if token is None:
            raise HTTPError(UNAUTHORIZED, "a token is needed: Authorization: Bearer TOKEN (or Basic, the token as password)")
        raise HTTPError(UNAUTHORIZED, "that token is not valid here (revoked, or never created)")

    def _note(self, request: Request, reason: str) -> None:
        # Said at most once a second, with how many went unsaid: a client
        # trying tokens cannot fill the log. Never the token.
        now = self._monotonic()
        if now - self._logged_at < LOG_INTERVAL:
            self._unlogged += 1
            return
        peer = request.getClientAddress()
        log.warn("authentication failed ({reason} token) for {path} from {peer}{more}", reason=reason,
                 path=request.path.decode("latin-1")[:200], peer=getattr(peer, "host", "?"),
                 more=f"; {self._unlogged} more since the last such line" if self._unlogged else "")
        self._logged_at = now
        self._unlogged = 0
