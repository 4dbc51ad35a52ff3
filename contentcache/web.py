"""
HTTP plumbing shared by every resource: async handlers, the one place known
errors become status codes, and streaming a blob to a client.
"""

from __future__ import annotations

import json
import re
import time
from typing import Any, Awaitable, Callable, Coroutine, Protocol

from attrs import frozen
from opentelemetry.trace import SpanKind, StatusCode
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IPushProducer
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.http import (
    datetimeToString,
    stringToDatetime,
    BAD_GATEWAY,
    FORBIDDEN,
    GATEWAY_TIMEOUT,
    INSUFFICIENT_STORAGE_SPACE,
    INTERNAL_SERVER_ERROR,
    NOT_ALLOWED,
    NOT_FOUND,
    NOT_MODIFIED,
    OK,
    PARTIAL_CONTENT,
    REQUESTED_RANGE_NOT_SATISFIABLE,
    SERVICE_UNAVAILABLE,
    UNAUTHORIZED,
)
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request
from zope.interface import implementer

from . import metrics
from .tracing import child_span, tracer
from .backend import IReader, StorageUnavailable
from .index.interface import IndexUnavailable
from .cache import OUTCOME_HEADER, REVALIDATING, STALE, IntegrityError, Missing, ProtocolCache
from .hash import Hash
from .policy import Refused
from .space import is_full
from .store import Blob, BlobCorrupt, BlobNotFound, Store
from .units import MINUTE
from .upstream import UpstreamError, UpstreamTimeout

log = Logger()

#: How much of a blob one disk read fetches while streaming it out: large
#: enough that a big blob needs few trips to the disk pool, small enough
#: that a connection holds little while its client is slow.
CHUNK_SIZE = 256 * 1024
#: What a large blob streams in: one trip to the disk pool per MiB (each
#: read, hashed and checked on the way, written before the next is read).
STREAM_CHUNK = 1 << 20
TEXT = b"text/plain; charset=utf-8"
#: The Cache-Control of what never changes once published.
IMMUTABLE = b"public, max-age=31536000, immutable"
#: What a stale answer says of itself (RFC 7234, 5.5): upstream failed,
#: or it is being revalidated in the background.
STALE_WARNING = b'111 - "Revalidation Failed"'
REVALIDATING_WARNING = b'110 - "Response is Stale"'


def cache_headers(outcome: str, cache_control: bytes) -> dict[bytes, bytes]:
    """
    The headers that say how the cache came by an answer: X-Cache, the
    Warning of a stale one, and its Cache-Control.
    """
    headers = {b"x-cache": OUTCOME_HEADER[outcome], b"cache-control": cache_control}
    if outcome in (STALE, REVALIDATING):
        headers[b"warning"] = STALE_WARNING if outcome == STALE else REVALIDATING_WARNING
        # Not kept as fresh by the client or a cache in front: the next
        # request should find the revalidated copy.
        headers[b"cache-control"] = _MAX_AGE.sub(b"max-age=0", cache_control)
    return headers


_MAX_AGE = re.compile(rb"max-age=[0-9]+")


class HTTPError(Exception):
    """
    An error a client should see as C{code} with a one-line C{message}.
    """

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def text(request: Request, code: int, message: str) -> bytes:
    """
    Set up a one-line plain-text response and return its body.
    """
    line = (message.splitlines() or [""])[0]
    body = line.encode("utf-8") + b"\n"
    if code >= 400:
        request.reason = line  # type: ignore[attr-defined]  # for the status page's last errors
    request.setResponseCode(code)
    request.setHeader(b"content-type", TEXT)
    request.setHeader(b"content-length", b"%d" % len(body))
    return body


def json_error(request: Request, code: int, message: str) -> bytes:
    """
    Set up an error response as npm shows one (its C{error} field) and
    return its body.
    """
    body = json.dumps({"error": (message.splitlines() or [""])[0]}).encode("utf-8") + b"\n"
    request.setResponseCode(code)
    request.setHeader(b"content-type", b"application/json")
    request.setHeader(b"content-length", b"%d" % len(body))
    return body


_SUCCESS_HEADERS = (
    b"etag",
    b"accept-ranges",
    b"cache-control",
    b"content-encoding",
    b"content-range",
    b"last-modified",
    b"vary",
    b"warning",
    b"x-cache",
)


#: What a miss is answered while the storage has no room.
STORAGE_FULL = "storage full: nothing new can be stored until there is room; cached content is still served"


def _uri(request: Request) -> str:
    return request.uri.decode("latin-1")[:1024]


def _known(failure: Failure, request: Request) -> tuple[int, str] | None:
    """
    The status and one-line message for an error the daemon expects (and
    the log line the operator should see of it), or L{None} for a bug.
    """
    e = failure.value
    if failure.check(HTTPError):
        return e.code, e.message
    if failure.check(Missing):
        # Not here, or not upstream either: an answer, not an error to list.
        request.not_here = True  # type: ignore[attr-defined]
        return NOT_FOUND, f"not found: {e}"
    if failure.check(Refused):
        metrics.policy_refusals.labels(e.protocol, e.hidden.rule).inc()
        return FORBIDDEN, e.hidden.reason
    if failure.check(IntegrityError):
        metrics.integrity_failures.labels(metrics.protocol_of(request)).inc()
        return BAD_GATEWAY, f"refused: {e}"
    if failure.check(UpstreamTimeout):
        log.warn("upstream timeout for {uri}: {error}", uri=_uri(request), error=e)
        return GATEWAY_TIMEOUT, f"upstream timeout: {e}"
    if failure.check(UpstreamError):
        log.warn("upstream failure for {uri}: {error}", uri=_uri(request), error=e)
        return BAD_GATEWAY, f"upstream failure: {e}"
    if isinstance(e, BaseException) and is_full(e):
        # Logged by the storage's state, at most once a minute.
        return INSUFFICIENT_STORAGE_SPACE, STORAGE_FULL
    if failure.check(StorageUnavailable):
        log.warn("storage unavailable for {uri}: {error}", uri=_uri(request), error=e)
        return SERVICE_UNAVAILABLE, "storage unavailable; try again"
    if failure.check(IndexUnavailable):
        log.warn("index unavailable for {uri}: {error}", uri=_uri(request), error=e)
        return SERVICE_UNAVAILABLE, "index unavailable; try again"
    if failure.check(BlobNotFound):
        # Damage was logged where it was found.
        if not failure.check(BlobCorrupt):
            log.warn("blob {hash} is missing from the store", hash=str(e))
        return NOT_FOUND, "not found"
    return None


def _fail(failure: Failure, request: Request, gone: list[bool]) -> None:
    if request.finished or gone or request.channel is None:
        # The client went away; the cancellation that followed is expected,
        # and a known error is nobody's to read now.
        if not failure.check(CancelledError) and _known(failure, request) is None:
            log.failure("request for {uri} failed after its client left", failure, uri=_uri(request))
        return
    known = _known(failure, request)
    if request.startedWriting:
        # Headers are gone: the only honest signal left is a cut connection.
        if known is None:
            log.failure("response to {uri} failed part-way; closing the connection", failure, uri=_uri(request))
        else:
            log.warn("response to {uri} failed part-way ({error}); closing the connection",
                     uri=_uri(request), error=known[1])
        request.cut = True  # type: ignore[attr-defined]  # not the client's doing: no abort
        request.loseConnection()
        return
    # Headers set for a success that did not happen (ETag, immutable
    # caching, X-Cache, Content-Range) must not describe the error.
    for name in _SUCCESS_HEADERS:
        request.responseHeaders.removeHeader(name)
    request.setHeader(b"cache-control", b"no-store")
    if known is None:
        log.failure("request for {uri} failed", failure, uri=_uri(request))
        known = INTERNAL_SERVER_ERROR, "internal error; see the daemon's log"
    if failure.check(Refused) and failure.value.protocol == "npm":
        request.write(json_error(request, *known))
    else:
        request.write(text(request, *known))
    request.finish()


def handle(request: Request, handler: Callable[[], Coroutine[Any, Any, Any]]) -> object:
    """
    Run an async handler for C{request} in a span of its own: cancelled
    when the client goes away, its known errors turned into status codes,
    anything else logged and answered with a 500 without a traceback.
    """
    gone: list[bool] = []
    spent = [0.0]
    request.upstream_time = spent  # type: ignore[attr-defined]

    async def traced() -> None:
        metrics.upstream_time.set(spent)
        protocol = metrics.protocol_of(request)
        method = request.method.decode("latin-1")
        with tracer.start_as_current_span(f"{method} {protocol}", kind=SpanKind.SERVER) as span:
            # Attributes only for a recorded span: most hits are not.
            traced = span.is_recording()
            if traced:
                span.set_attribute("http.request.method", method)
                span.set_attribute("url.path", request.path.decode("latin-1")[:1024])
                span.set_attribute("contentcache.protocol", protocol)
            try:
                await handler()
            except BaseException:
                _fail(Failure(), request, gone)
            if traced:
                span.set_attribute("http.response.status_code", request.code)
                outcome = request.responseHeaders.getRawHeaders(b"x-cache", [None])[0]
                span.set_attribute(
                    "contentcache.cache_result",
                    metrics.RESULTS.get(outcome or b"", "error" if request.code >= 400 else "bypass"),
                )
                if request.code >= 500:
                    span.set_status(StatusCode.ERROR)

    d: Deferred[None] = Deferred.fromCoroutine(traced())

    def client_left(reason: Failure) -> None:
        gone.append(True)
        d.cancel()

    request.notifyFinish().addErrback(client_left)
    return NOT_DONE_YET


def exact(request: Request) -> bool:
    """
    Whether a leaf resource was asked for itself (C{/health}, C{/health/}),
    not for some path below it.
    """
    return request.postpath in ([], [b""])


class IGuard(Protocol):
    """
    What decides whether a request may be answered (a client token).
    """

    async def check(self, request: Request) -> None:
        """
        Return if it may; raise L{HTTPError} (401) if not.
        """


class AsyncResource(Resource):
    """
    A leaf resource whose methods are C{async def render_async(request)}.
    Paths below it are 404 unless C{takes_subpath} is set. With a
    C{guard}, only requests it lets through are answered.
    """

    isLeaf = True
    methods: tuple[bytes, ...] = (b"GET", b"HEAD")
    takes_subpath = False
    guard: IGuard | None = None

    async def _guarded(self, request: Request) -> None:
        assert self.guard is not None
        request.private = True  # type: ignore[attr-defined]  # a CacheRequest: no shared cache keeps it
        await self.guard.check(request)
        await self.render_async(request)

    async def render_async(self, request: Request) -> None:
        raise NotImplementedError

    def render(self, request: Request) -> object:
        if not self.takes_subpath and not exact(request):
            return text(request, NOT_FOUND, "not found")
        if request.method not in self.methods:
            request.setHeader(b"allow", b", ".join(self.methods))
            return text(request, NOT_ALLOWED, "method not allowed")
        if self.guard is not None:
            return handle(request, lambda: self._guarded(request))
        return handle(request, lambda: self.render_async(request))


class NotFoundResource(Resource):
    """
    404 text/plain for any path below it.
    """

    isLeaf = True

    def __init__(self, message: str = "not found") -> None:
        super().__init__()
        self._message = message

    def render(self, request: Request) -> bytes:
        return text(request, NOT_FOUND, self._message)


def path_segments(request: Request, invalid: type[Exception], slash_allowed: bool) -> list[str]:
    """
    The request's path below a leaf resource as text, or C{invalid} raised
    with a one-line reason. Twisted has already percent-decoded each
    segment, so a "/" inside one was a %2F in the request.
    """
    segments = []
    for raw in request.postpath or []:
        try:
            segment = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise invalid("invalid path: not UTF-8") from None
        if "\x00" in segment or (not slash_allowed and "/" in segment):
            raise invalid("invalid path: an encoded '/' or NUL")
        segments.append(segment)
    return segments


@frozen
class ByteRange:
    start: int
    end: int  # inclusive

    @property
    def length(self) -> int:
        return self.end - self.start + 1


class Unsatisfiable(Exception):
    pass


_RANGE = re.compile(r"bytes[ \t]*=[ \t]*([0-9]*)[ \t]*-[ \t]*([0-9]*)[ \t]*")
#: Larger than any blob: what a position of more digits than this means
#: (int() refuses strings of thousands of digits, and none is needed).
_BEYOND = 10**18
_MAX_DIGITS = 18


def _position(digits: str) -> int:
    digits = digits.lstrip("0") or "0"
    return _BEYOND if len(digits) > _MAX_DIGITS else int(digits)


def parse_range(header: bytes | None, size: int) -> ByteRange | None:
    """
    The single byte range a C{Range} header asks for, or L{None} to send
    the whole blob (no header, a syntax we ignore, or several ranges).
    Raises L{Unsatisfiable} for a range that lies outside the blob.
    """
    if header is None:
        return None
    m = _RANGE.fullmatch(header.decode("latin-1"))
    if m is None or (not m[1] and not m[2]):
        return None
    if not m[1]:
        suffix = _position(m[2])
        if suffix == 0 or size == 0:
            raise Unsatisfiable()
        return ByteRange(max(0, size - suffix), size - 1)
    start = _position(m[1])
    end = _position(m[2]) if m[2] else _BEYOND
    if end < start:
        return None
    if start >= size:
        raise Unsatisfiable()
    return ByteRange(start, min(end, size - 1))


def etag_of(h: Hash) -> bytes:
    return b'"%s"' % h.hex.encode("ascii")


def _matches(header: bytes | None, etag: bytes) -> bool:
    if header is None:
        return False
    for candidate in header.split(b","):
        candidate = candidate.strip()
        if candidate == b"*" or candidate.removeprefix(b"W/") == etag:
            return True
    return False


def _not_modified_since(request: Request, last_modified: float | None) -> bool:
    header = request.getHeader(b"if-modified-since")
    if header is None or last_modified is None:
        return False
    try:
        since = stringToDatetime(header)
    except Exception:
        # Not a date (or one no calendar holds): as if it were not there.
        return False
    # A date in the future is not a valid one (RFC 9110, 5.6.7).
    return int(last_modified) <= since <= time.time() + MINUTE


@implementer(IPushProducer)
class _BlobProducer:
    """
    Streams a reader to a request, reading the next chunk only while the
    client keeps up.
    """

    def __init__(self, request: Request, reader: IReader, length: int) -> None:
        self._request = request
        self._reader = reader
        self._remaining = length
        self._paused = False
        self._stopped = False
        self._waiting: Deferred[None] | None = None

    async def run(self) -> None:
        if self._request.channel is None:
            raise CancelledError("the client left")
        self._request.registerProducer(self, True)
        try:
            while self._remaining > 0:
                if self._paused:
                    self._waiting = Deferred()
                    await self._waiting
                if self._stopped:
                    raise CancelledError("the client stopped reading")
                chunk = await self._reader.read(min(STREAM_CHUNK, self._remaining))
                if not chunk:
                    raise OSError("blob ended before its recorded size")
                self._remaining -= len(chunk)
                self._request.write(chunk)
        finally:
            # A client that left took the channel, and the producer with it.
            if self._request.channel is not None:
                self._request.unregisterProducer()

    def _wake(self) -> None:
        waiting, self._waiting = self._waiting, None
        if waiting is not None:
            waiting.callback(None)

    def pauseProducing(self) -> None:
        self._paused = True

    def resumeProducing(self) -> None:
        self._paused = False
        self._wake()

    def stopProducing(self) -> None:
        self._stopped = True
        self._wake()


async def send_blob(
    request: Request,
    store: Store,
    blob: Blob,
    content_type: bytes,
    headers: dict[bytes, bytes] | None = None,
    last_modified: float | None = None,
    body: bytes | None = None,
) -> None:
    """
    Answer C{request} with a blob: C{Content-Length}, C{ETag} (the blob's
    hash), 304 for a matching C{If-None-Match} (or, without one, an
    C{If-Modified-Since} not older than C{last_modified}), HEAD, and a
    single C{Range} as 206 (or 416). The body is C{body} when the blob's
    checked bytes are at hand (a small blob); otherwise it is read from the
    store, a large blob streamed with backpressure, never held whole in
    memory.
    """
    size = blob.size
    etag = etag_of(blob.hash)
    request.setHeader(b"etag", etag)
    request.setHeader(b"accept-ranges", b"bytes")
    for name, value in (headers or {}).items():
        request.setHeader(name, value)
    if last_modified is not None:
        request.setHeader(b"last-modified", datetimeToString(int(last_modified)))

    if_none_match = request.getHeader(b"if-none-match")
    if _matches(if_none_match, etag) or (
        if_none_match is None and _not_modified_since(request, last_modified)
    ):
        request.setResponseCode(NOT_MODIFIED)
        request.finish()
        return

    byte_range: ByteRange | None = None
    if_range = request.getHeader(b"if-range")
    if if_range is None or if_range.strip() == etag:
        try:
            byte_range = parse_range(request.getHeader(b"range"), size)
        except Unsatisfiable:
            request.setHeader(b"content-range", b"bytes */%d" % size)
            request.write(text(request, REQUESTED_RANGE_NOT_SATISFIABLE, "range not satisfiable"))
            request.finish()
            return

    if byte_range is None:
        offset, length = 0, size
        request.setResponseCode(OK)
    else:
        offset, length = byte_range.start, byte_range.length
        request.setResponseCode(PARTIAL_CONTENT)
        request.setHeader(
            b"content-range", b"bytes %d-%d/%d" % (byte_range.start, byte_range.end, size)
        )
    request.setHeader(b"content-type", content_type)
    request.setHeader(b"content-length", b"%d" % length)

    if request.method == b"HEAD" or length == 0:
        request.finish()
        return

    if body is not None:
        request.write(body if length == len(body) else body[offset : offset + length])
        request.finish()
        return
    if length <= CHUNK_SIZE:
        # One trip to the disk pool instead of open, read and close.
        request.write(await store.read(blob, offset, length))
        request.finish()
        return
    with child_span("store get", **{"contentcache.blob": blob.hash.hex, "contentcache.bytes": length}):
        reader = await store.get(blob, offset)
        try:
            await _BlobProducer(request, reader, length).run()
            # Finished (and logged) before the trip that closes the file: a
            # client may close the connection as soon as it has the last byte.
            request.finish()
        finally:
            await reader.close()


async def refetching(request: Request, cache: ProtocolCache, answer: Callable[[], Awaitable[object]]) -> None:
    """
    Answer C{request} with C{answer}. If the blob behind it turns out to be
    missing or damaged, every entry that pointed at it is forgotten, and
    unless the response has begun, C{answer} runs once more: the content is
    fetched again, with all its checks, as for a first request.
    """
    try:
        await answer()
    except BlobNotFound as e:
        if not (isinstance(e, BlobCorrupt) and cache.store.damaged is not None):
            await cache.forget(e.hash)  # else the store did, when it found the damage
        if request.startedWriting:
            raise
        await answer()


async def read_blob(store: Store, blob: Blob, limit: int) -> bytes:
    """
    A small blob's whole content (metadata, never an artifact); more than
    C{limit} bytes is an error.
    """
    reader = await store.get(blob)
    try:
        if reader.size > limit:
            raise ValueError(f"blob {blob.hash.hex} is {reader.size} bytes, more than {limit}")
        parts = []
        while chunk := await reader.read(CHUNK_SIZE):
            parts.append(chunk)
        return b"".join(parts)
    finally:
        await reader.close()


class ProtocolResource(AsyncResource):
    """
    A protocol's resource: who may have what no route names (C{access},
    public or token), and the guard that checks a client token where one
    is needed (a route's content unless it says public).
    """

    def __init__(self, access: str = "public", token_guard: IGuard | None = None) -> None:
        super().__init__()
        self.access = access
        self.token_guard = token_guard

    def needs_token(self, route_access: str | None) -> bool:
        """
        Whether a request needs a client token (C{route_access}: its
        route's, or L{None} for what no route names): decided without a
        coroutine, since most hits need none.
        """
        return (route_access or self.access) != "public"

    async def check_token(self, request: Request) -> None:
        """
        Return if the request carries a valid token; else 401.
        """
        if self.token_guard is None:  # never so wired: refuse rather than serve
            raise HTTPError(UNAUTHORIZED, "a token is needed, and this daemon checks none")
        request.private = True  # type: ignore[attr-defined]  # a CacheRequest: no shared cache keeps it
        await self.token_guard.check(request)
