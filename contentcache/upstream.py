"""
Fetching from upstream servers: streaming into the store's spool with
backpressure and an inactivity timeout, conditional requests, coalescing of
concurrent misses, and a short memory of what upstream does not have.
"""

from __future__ import annotations

import re
import time
from typing import Any, Callable, Coroutine, Generic, Hashable, Mapping, TypeVar, cast
from urllib.parse import urlsplit

from attrs import define, field, frozen
from opentelemetry.trace import SpanKind
from treq.client import HTTPClient
from twisted.internet.defer import CancelledError, Deferred, TimeoutError as DeferredTimeout, succeed
from twisted.internet.interfaces import IDelayedCall, IPushProducer, IReactorTime
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.internet.error import (
    ConnectError,
    ConnectingCancelledError,
    ConnectionDone,
    ConnectionLost,
    ConnectionRefusedError,
    DNSLookupError,
    TCPTimedOutError,
    TimeoutError as ConnectTimeout,
)
from twisted.web._newclient import ParseError, ResponseFailed, ResponseNeverReceived, _WrapperException
from twisted.web.client import HTTPConnectionPool, ResponseDone, _HTTP11ClientFactory
from twisted.web.iweb import UNKNOWN_LENGTH

try:
    from OpenSSL.SSL import Error as TLSError
except ImportError:  # pragma: no cover - twisted[tls] brings it
    class TLSError(Exception):  # type: ignore[no-redef]
        pass
from twisted.web.http import PotentialDataLoss
from twisted.web.http import NOT_MODIFIED, OK
from twisted.web.http_headers import Headers
from twisted.web.iweb import IResponse

from . import activity, metrics, outbound
from .tracing import recording, tracer
from .store import Spool, Store

log = Logger()
T = TypeVar("T")
K = TypeVar("K", bound=Hashable)

DEFAULT_CONNECT_TIMEOUT = 10.0
#: How long to wait for the status line and headers.
DEFAULT_RESPONSE_TIMEOUT = 30.0
#: How long a body may go without a byte before the fetch is abandoned.
DEFAULT_IDLE_TIMEOUT = 30.0
#: Writes waiting for the disk before the upstream connection is paused.
_MAX_PENDING_WRITES = 4


class UpstreamError(Exception):
    """
    Upstream failed: unreachable, an unexpected status, a broken body.
    """


class UpstreamTimeout(UpstreamError):
    """
    Upstream did not answer, or stopped sending, within the timeout.
    """


#: What a Python object's repr looks like, never to reach a client.
_REPR = re.compile(r"<[A-Za-z_][\w.]* .*>|^\[\(|object at 0x|\w\((?:\w+=|\[)")


def _cause(error: BaseException) -> BaseException:
    """
    What lies under the agent's wrappers (a list of failures each).
    """
    while isinstance(error, _WrapperException) and error.reasons:
        error = error.reasons[0].value
    return error


def what_happened(error: BaseException) -> str:
    """
    What upstream did, as the end of a sentence that begins "upstream":
    never a repr, whatever the error.
    """
    cause = _cause(error)
    if isinstance(cause, ConnectionRefusedError):
        return "refused the connection"
    if isinstance(cause, DNSLookupError):
        return "has a host name that does not resolve"
    if isinstance(cause, (TCPTimedOutError, ConnectTimeout)):
        return "did not accept the connection in time"
    if isinstance(cause, (ConnectionDone, PotentialDataLoss)) or type(cause).__name__ == "_DataLoss":
        return "closed the connection"
    if isinstance(cause, ConnectionLost):
        return "reset the connection"
    if isinstance(cause, ParseError):
        return "sent a malformed response"
    if isinstance(cause, ConnectError):
        return "could not be reached"
    if isinstance(cause, TLSError):
        # pyOpenSSL's message is a list of (library, function, reason).
        found = cause.args[0] if cause.args and isinstance(cause.args[0], list) else []
        reasons = [str(part) for r in found if isinstance(r, tuple) for part in r if part]
        return f"failed the TLS handshake ({reasons[-1][:200] if reasons else 'no reason given'})"
    if type(cause).__name__ == "VerificationError":
        # service_identity: the certificate names another host.
        return "presented a certificate for another host name"
    detail = str(cause).strip().splitlines()[0] if str(cause).strip() else ""
    if not detail or _REPR.search(detail):
        detail = type(cause).__name__
    return f"failed ({detail[:200]})"


class _QuietClientFactory(_HTTP11ClientFactory):
    noisy = False


@frozen
class Timeouts:
    connect: float = DEFAULT_CONNECT_TIMEOUT
    response: float = DEFAULT_RESPONSE_TIMEOUT
    idle: float = DEFAULT_IDLE_TIMEOUT


@frozen
class Fetched:
    """
    An upstream answer. For a 200 the body is in C{spool}, closed and
    hashed, for the caller to check and commit or abort.
    """

    status: int
    headers: Mapping[str, str]
    spool: Spool | None = None

    def header(self, name: str) -> str | None:
        return self.headers.get(name.lower())


class _SpoolBody(Protocol):
    """
    Receives a response body into a spool, one write at a time, pausing
    the connection while the disk falls behind and giving up when upstream
    goes quiet for C{idle} seconds.
    """

    def __init__(
        self, spool: Spool, clock: IReactorTime, idle: float, limit: int | None, expected: int | None = None
    ) -> None:
        self.done: Deferred[None] = Deferred()
        self._spool = spool
        self._clock = clock
        self._idle = idle
        self._limit = limit
        #: The Content-Length, when upstream gave one.
        self._expected = expected
        self._received = 0
        self._pending = 0
        self._paused = False
        self._tail: Deferred[None] = Deferred()
        self._tail.callback(None)
        self._error: Exception | None = None
        self._timer: IDelayedCall | None = None

    def connectionMade(self) -> None:
        self._timer = self._clock.callLater(self._idle, self._timed_out)

    def _timed_out(self) -> None:
        self._timer = None
        self._abandon(UpstreamTimeout(f"upstream sent nothing for {self._idle:g} s after {self._progress()}"))

    def _progress(self) -> str:
        of = f" of {self._expected:,}" if self._expected is not None else ""
        return f"{self._received:,}{of} bytes"

    @property
    def _producer(self) -> IPushProducer:
        return cast(IPushProducer, self.transport)

    def _abandon(self, error: Exception) -> None:
        if self._error is None:
            self._error = error
        self._producer.stopProducing()

    def dataReceived(self, data: bytes) -> None:
        if self._error is not None:
            return
        if self._timer is not None:
            self._timer.reset(self._idle)
        self._received += len(data)
        if self._limit is not None and self._received > self._limit:
            self._abandon(UpstreamError(f"upstream body exceeds {self._limit:,} bytes"))
            return
        self._pending += 1
        if self._pending >= _MAX_PENDING_WRITES and not self._paused:
            # Upstream is not idle while we hold it back for the disk.
            self._paused = True
            self._producer.pauseProducing()
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
        self._tail.addCallback(lambda _: self._spool.write(data))
        self._tail.addCallbacks(self._written, self._write_failed)

    def _written(self, _: object) -> None:
        self._pending -= 1
        if self._paused and self._pending <= 1 and self._error is None:
            self._paused = False
            self._timer = self._clock.callLater(self._idle, self._timed_out)
            self._producer.resumeProducing()

    def _write_failed(self, failure: Failure) -> None:
        self._pending -= 1
        error = failure.value if isinstance(failure.value, Exception) else UpstreamError("write failed")
        self._abandon(error)

    def connectionLost(self, reason: Failure = Failure(ResponseDone())) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

        def finish(_: object) -> None:
            if self._error is not None:
                self.done.errback(self._error)
            elif not reason.check(ResponseDone, PotentialDataLoss):
                # PotentialDataLoss: a body without a length, ended by
                # closing the connection, as HTTP/1.0 servers do.
                self.done.errback(UpstreamError(f"upstream {what_happened(reason.value)} after {self._progress()}"))
            else:
                self.done.callback(None)

        self._tail.addBoth(finish)


_DEFAULT_PORTS = {"http": 80, "https": 443}


def host_port(url: str) -> str:
    """
    C{host:port} of an http or https URL, lower case, the port explicit;
    empty for anything else.
    """
    parts = urlsplit(url)
    try:
        port = parts.port or _DEFAULT_PORTS.get(parts.scheme)
    except ValueError:
        return ""
    if parts.scheme not in _DEFAULT_PORTS or not parts.hostname or port is None:
        return ""
    return f"{parts.hostname.lower()}:{port}"


def allowed_host(url: str, hosts: set[str]) -> bool:
    """
    Whether a tarball address points at one of the hosts we fetch from
    (C{host:port} entries, or a bare host for any port).
    """
    where = host_port(url)
    return bool(where) and (where in hosts or where.rsplit(":", 1)[0] in hosts)


def credential_origins(base: str, extra_hosts: frozenset[str]) -> frozenset[tuple[str, str]]:
    """
    Where a route's credential may go: its upstream's origin, and each
    extra host by the upstream's scheme (on its default port, unless the
    host names one): never over plain http when the upstream is https.
    """
    scheme = urlsplit(base).scheme
    default = _DEFAULT_PORTS.get(scheme, 443)
    origins = {(scheme, host_port(base))}
    for host in extra_hosts:
        host = host.lower()
        origins.add((scheme, host if re.search(r":\d+$", host) else f"{host}:{default}"))
    return frozenset(origins)


@define
class Upstream:
    """
    One upstream server, addressed by its base URL.
    """

    base: str
    _client: HTTPClient
    _reactor: Any
    _timeouts: Timeouts = Timeouts()
    _pool: HTTPConnectionPool | None = None
    #: The protocol label of this upstream's metrics.
    protocol: str = "other"
    #: The C{Authorization} this upstream's route sends, and the hosts
    #: (C{host:port}) it goes to: never another, also not across a
    #: redirect (Twisted's redirect agent drops it for another origin).
    credential: str | None = field(default=None, repr=False)
    #: (scheme, host:port) of each origin the credential goes to.
    credential_origins: frozenset[tuple[str, str]] = frozenset()

    @classmethod
    def create(
        cls, base: str, reactor: Any, timeouts: Timeouts = Timeouts(), protocol: str = "other",
        credential: str | None = None, extra_hosts: frozenset[str] = frozenset(),
    ) -> Upstream:
        pool = HTTPConnectionPool(reactor, persistent=True)
        # Not a log line per upstream connection opened and closed.
        pool._factory = _QuietClientFactory
        pool.maxPersistentPerHost = 8
        agent = outbound.current.agent(reactor, timeouts.connect, pool)
        origins = credential_origins(base, extra_hosts) if credential else frozenset()
        upstream = cls(base.rstrip("/"), HTTPClient(agent), reactor, timeouts, pool, protocol, credential, origins)
        activity.current.upstream(protocol, base)  # on the status page from the start
        return upstream

    @property
    def _activity_key(self) -> tuple[str, str]:
        return (self.protocol, activity.display_url(self.base))

    def close(self) -> Deferred[None]:
        """
        Close idle connections (at shutdown).
        """
        if self._pool is None:
            return succeed(None)
        return self._pool.closeCachedConnections()

    def url(self, path: str) -> str:
        return f"{self.base}/{path.lstrip('/')}"

    async def _request(
        self, method: str, url: str, headers: Mapping[str, str], data: bytes | None = None
    ) -> IResponse:
        metrics.upstream_requests.labels(self.protocol).inc()
        started = time.monotonic()
        try:
            return await self._send(method, url, headers, data)
        except UpstreamError as e:
            metrics.upstream_errors.labels(self.protocol).inc()
            activity.current.fetched(self._activity_key, time.monotonic() - started, str(e))
            raise
        finally:
            elapsed = time.monotonic() - started
            metrics.upstream_duration.labels(self.protocol).observe(elapsed)
            spent = metrics.upstream_time.get()
            if spent is not None:
                spent[0] += elapsed

    async def _send(
        self, method: str, url: str, headers: Mapping[str, str], data: bytes | None = None
    ) -> IResponse:
        if self.credential is not None and (urlsplit(url).scheme, host_port(url)) in self.credential_origins:
            headers = {**headers, "Authorization": self.credential}
        try:
            return await self._client.request(
                method,
                url,
                headers=Headers({k: [v] for k, v in headers.items()}),
                data=data,
                unbuffered=True,
                timeout=self._timeouts.response,
                reactor=self._reactor,
            )
        except (CancelledError, DeferredTimeout):
            raise UpstreamTimeout(
                f"no response from upstream within {self._timeouts.response:g} s"
            ) from None
        except (ResponseNeverReceived, ResponseFailed) as e:
            # treq's timeout cancels the request; the agent reports that
            # wrapped in one of these.
            if any(r.check(CancelledError) for r in e.reasons):
                raise UpstreamTimeout(
                    f"no response from upstream within {self._timeouts.response:g} s"
                ) from None
            raise UpstreamError(f"upstream {what_happened(e)} before answering") from None
        except (ConnectingCancelledError, TCPTimedOutError, ConnectTimeout):
            raise UpstreamTimeout(f"could not connect to upstream within {self._timeouts.connect:g} s") from None
        except Exception as e:
            raise UpstreamError(f"upstream {what_happened(e)}") from e

    async def fetch(
        self,
        store: Store,
        url: str,
        headers: Mapping[str, str] | None = None,
        limit: int | None = None,
    ) -> Fetched:
        """
        GET C{url}. A 200's body is spooled (at most C{limit} bytes); any
        other status comes back without a body, for the caller to judge.
        """
        if not recording():
            return await self._fetch(store, url, headers, limit)
        with tracer.start_as_current_span(
            "upstream fetch",
            kind=SpanKind.CLIENT,
            attributes={"url.full": url, "contentcache.protocol": self.protocol},
        ) as span:
            fetched = await self._fetch(store, url, headers, limit)
            span.set_attribute("http.response.status_code", fetched.status)
            if fetched.spool is not None:
                span.set_attribute("contentcache.bytes", fetched.spool.size)
            return fetched

    async def _fetch(
        self, store: Store, url: str, headers: Mapping[str, str] | None, limit: int | None
    ) -> Fetched:
        started = time.monotonic()
        response = await self._request("GET", url, headers or {})
        elapsed = time.monotonic() - started
        received = _headers(response)
        if response.code != OK:
            _discard(response)
            # 304, 404 and 410 are answers; anything else, upstream's failure.
            failed = _failure(response.code)
            if failed is not None:
                metrics.upstream_errors.labels(self.protocol).inc()
            activity.current.fetched(self._activity_key, elapsed, failed)
            return Fetched(response.code, received)
        try:
            spool = await store.spool()
        except BaseException:
            _discard(response)
            raise
        length = None if response.length is UNKNOWN_LENGTH else int(response.length)
        body = _SpoolBody(spool, self._reactor, self._timeouts.idle, limit, length)
        response.deliverBody(body)
        try:
            await body.done
            await spool.close()
        except BaseException as e:
            if isinstance(e, UpstreamError):
                metrics.upstream_errors.labels(self.protocol).inc()
                activity.current.fetched(self._activity_key, elapsed, str(e))
            await spool.abort()
            raise
        metrics.upstream_bytes.labels(self.protocol).inc(spool.size)
        activity.current.fetched(self._activity_key, elapsed)
        return Fetched(OK, received, spool)

    async def forward(
        self, method: str, url: str, headers: Mapping[str, str], data: bytes | None = None
    ) -> tuple[IResponse, Mapping[str, str]]:
        """
        Send a request on for a client, for pass-through endpoints; the
        caller streams the response body.
        """
        started = time.monotonic()
        response = await self._request(method, url, headers, data)
        failed = _failure(response.code) if response.code >= 500 else None  # a 4xx is the client's
        if failed is not None:
            metrics.upstream_errors.labels(self.protocol).inc()
        activity.current.fetched(self._activity_key, time.monotonic() - started, failed)
        received = _headers(response)
        return response, received


def _failure(code: int) -> str | None:
    """
    What an upstream's status means for its health: 200, 304, 404 and 410
    are answers; anything else is upstream's failure.
    """
    return None if code in (OK, NOT_MODIFIED, 404, 410) else f"upstream answered {code}"


def _headers(response: IResponse) -> dict[str, str]:
    """
    A response's headers by lower-case name, repeated ones joined.
    """
    return {
        k.decode("latin-1").lower(): b", ".join(v).decode("latin-1")
        for k, v in response.headers.getAllRawHeaders()
    }


def _discard(response: IResponse) -> None:
    """
    Read and drop a body we do not want, so the connection can be reused.
    """

    class Drop(Protocol):
        def connectionLost(self, reason: Failure = Failure(ResponseDone())) -> None:
            pass

    response.deliverBody(Drop())


def conditional_headers(etag: str | None, last_modified: str | None) -> dict[str, str]:
    headers = {}
    if etag:
        headers["If-None-Match"] = etag
    if last_modified:
        headers["If-Modified-Since"] = last_modified
    return headers


def is_not_modified(fetched: Fetched) -> bool:
    return fetched.status == NOT_MODIFIED


@define
class Coalescer(Generic[K, T]):
    """
    Runs one operation per key at a time: concurrent callers for the same
    key share its result. Each caller gets a Deferred of its own, so a
    caller that gives up (a client that disconnects) cancels only its own
    wait, never the shared operation.
    """

    #: The protocol label of the coalesced-waiters metric.
    protocol: str = "other"
    _inflight: dict[K, list[Deferred[T]]] = field(factory=dict)

    def __len__(self) -> int:
        return len(self._inflight)

    def waiting(self, key: K) -> int:
        return len(self._inflight.get(key, ()))

    def run(self, key: K, operation: Callable[[], Coroutine[Any, Any, T]]) -> Deferred[T]:
        waiter: Deferred[T] = Deferred()
        if key in self._inflight:
            self._inflight[key].append(waiter)
            metrics.coalesced.labels(self.protocol).inc()
            return waiter
        self._inflight[key] = [waiter]
        Deferred.fromCoroutine(operation()).addBoth(self._finished, key)
        return waiter

    def _finished(self, result: T | Failure, key: K) -> None:
        delivered = False
        for waiter in self._inflight.pop(key):
            if waiter.called:
                continue  # cancelled by its caller
            delivered = True
            if isinstance(result, Failure):
                waiter.errback(result)
            else:
                waiter.callback(result)
        if isinstance(result, Failure) and not delivered:
            log.warn("{key} failed with nobody left waiting: {error}",
                     key=key, error=result.getErrorMessage())


@define
class NegativeCache(Generic[K]):
    """
    Remembers for C{ttl} seconds that upstream does not have a key, so a
    burst of requests for it (the go command probing path prefixes) costs
    one upstream request. Bounded: the oldest memories go first.
    """

    _clock: IReactorTime
    ttl: float
    limit: int = 10_000
    _until: dict[K, float] = field(factory=dict)

    def add(self, key: K) -> None:
        if self.ttl <= 0:
            return
        self._until.pop(key, None)
        self._until[key] = self._clock.seconds() + self.ttl
        while len(self._until) > self.limit:
            del self._until[next(iter(self._until))]

    def __contains__(self, key: K) -> bool:
        until = self._until.get(key)
        if until is None:
            return False
        if until <= self._clock.seconds():
            del self._until[key]
            return False
        return True

    def discard(self, key: K) -> None:
        self._until.pop(key, None)
