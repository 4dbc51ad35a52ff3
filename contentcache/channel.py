"""
The daemon's HTTP connections: deadlines for slow and idle clients, request
bodies of a bounded size, one-line answers to what cannot be parsed, and
requests that outlive their client quietly.

A connection is in one of four phases, each with a deadline:
  - the request line and headers must arrive within C{header} seconds of
    the first byte (of the connection, for its first request), however
    slowly they trickle in;
  - a body may go C{body} seconds without a byte (as upstream bodies may),
    and after that first C{body} seconds must keep up L{BODY_MIN_RATE} on
    the whole;
  - a response may wait C{send} seconds for a client that reads nothing;
  - between requests, an idle connection is closed after C{keepalive}.
While a request is being answered (a slow miss, say), nothing is expected
of the client, and no deadline runs but the one for sending. One timer per
site (L{Watch}) looks at every connection's deadline twice a second.
"""

from __future__ import annotations

import time
from typing import Any, cast

from attrs import frozen
from twisted.internet.interfaces import IReactorTime, ITCPTransport
from twisted.internet.protocol import connectionDone
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.http import (
    BAD_REQUEST,
    REQUEST_ENTITY_TOO_LARGE,
    REQUEST_TIMEOUT,
    RESPONSES,
    HTTPChannel,
)
from twisted.web.server import Request

log = Logger()

DEFAULT_HEADER_TIMEOUT = 10.0
DEFAULT_KEEPALIVE_TIMEOUT = 60.0
#: Bodies and stalled responses: as long as an upstream body may go quiet.
DEFAULT_BODY_TIMEOUT = 30.0
#: The largest request body accepted (npm audit's bulk advisories, gzipped,
#: for a lockfile of many thousands of packages, are a few MB).
MAX_REQUEST_BODY = 16 << 20
#: A Content-Length of more digits than this is larger than any body (or,
#: padded with zeros, not worth Twisted's int() of thousands of digits).
_MAX_LENGTH_DIGITS = 18
#: However a body trickles in, it must come at least this fast on the whole
#: (bytes a second, after the first --idle-timeout): a body of a byte every
#: 29 s would otherwise hold a connection for ever. (A 4 MB npm audit over
#: a 256 kbit/s link comes at twice this.)
BODY_MIN_RATE = 16 * 1024
#: Pipelined bytes held while a request is answered, before reading stops.
_MAX_PIPELINED = 64 * 1024
#: nginx's status for a request its client closed before the response.
CLIENT_CLOSED_REQUEST = 499
#: RFC 6585 (Twisted has no name for it).
REQUEST_HEADER_FIELDS_TOO_LARGE = 431


_REASONS = {REQUEST_HEADER_FIELDS_TOO_LARGE: b"Request Header Fields Too Large"}


@frozen
class Deadlines:
    """
    How long a client may take, in seconds, and how big a body it may send.
    """

    header: float = DEFAULT_HEADER_TIMEOUT
    keepalive: float = DEFAULT_KEEPALIVE_TIMEOUT
    body: float = DEFAULT_BODY_TIMEOUT
    send: float = DEFAULT_BODY_TIMEOUT
    max_body: int = MAX_REQUEST_BODY


class CacheRequest(Request):
    """
    A request that knows when it arrived, refuses a body larger than its
    channel accepts, and, when its client goes away before the response
    is complete, is logged and counted once (by the site's C{client_left})
    instead of failing when its handler finishes it.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.started = time.monotonic()
        #: The whole request (line, headers, body) was received.
        self.received = False
        #: The client left before the whole response was sent.
        self.aborted = False
        #: The daemon cut the connection itself (the response failed after
        #: its headers were sent): not the client's doing.
        self.cut = False
        #: The answer needed a client token: no shared cache may keep it.
        self.private = False
        self._body_size = 0

    def write(self, data: bytes) -> None:
        if not self.startedWriting and self.private:
            # Whatever the handler said, a token's answer is the client's
            # alone (RFC 9111: "public" would let a proxy or CDN in front
            # keep it and serve it to anyone).
            headers = self.responseHeaders
            control = headers.getRawHeaders(b"cache-control", [b""])[0]
            kept = [d.strip() for d in control.split(b",") if d.strip() and d.strip().lower() != b"public"]
            headers.setRawHeaders(b"cache-control", [b", ".join([b"private", *kept])])
            vary = [v for v in headers.getRawHeaders(b"vary", []) if v]
            headers.setRawHeaders(b"vary", [b", ".join([*vary, b"Authorization"])])
        super().write(data)

    def handleContentChunk(self, data: bytes) -> None:
        self._body_size += len(data)
        channel = self.channel
        if isinstance(channel, CacheChannel) and self._body_size > channel.deadlines.max_body:
            channel.refuse(REQUEST_ENTITY_TOO_LARGE, "request body too large")
            return
        super().handleContentChunk(data)

    def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:
        self.received = True
        super().requestReceived(command, path, version)

    def finish(self) -> None:
        if self._disconnected:
            return  # logged and counted when the connection went
        super().finish()

    def unregisterProducer(self) -> None:
        if self.channel is None:
            # The connection is gone, and with it the channel's producer.
            self.producer = None
            return
        super().unregisterProducer()

    def _complete(self) -> bool:
        """
        Whether everything the response announced has been written.
        """
        if not self.startedWriting or self.method == b"HEAD":
            return False
        length = self.responseHeaders.getRawHeaders(b"content-length")
        return length is not None and length[0].isdigit() and self.sentLength >= int(length[0])

    def connectionLost(self, reason: Failure) -> None:
        channel = self.channel
        unanswered = self.received and not self.finished
        super().connectionLost(reason)
        if not unanswered:
            return
        self.aborted = not self.cut and not self._complete()
        if not self.startedWriting:
            self.code, self.code_message = CLIENT_CLOSED_REQUEST, b"Client Closed Request"
        site = getattr(channel, "site", None)
        if site is not None and hasattr(site, "client_left"):
            site.client_left(self)


#: How often the deadlines of open connections are looked at: each is met
#: to within this.
TICK = 0.5
#: A connection being closed that has not gone after this long (its client
#: reads nothing of what is left to send) is cut.
ABORT_AFTER = 15.0

#: What a connection is waiting for.
HEADERS, BODY, BUSY, IDLE, CLOSING = "headers", "body", "busy", "idle", "closing"


class Watch:
    """
    The deadlines of a site's open connections, looked at every L{TICK} by
    one timer while any is open. A timer per connection, started and
    cancelled for each phase of each request, cost a cached hit a fifth of
    its throughput; here a request costs a few assignments.
    """

    def __init__(self, clock: IReactorTime) -> None:
        self.clock = clock
        self._channels: set[CacheChannel] = set()
        self._loop: LoopingCall | None = None

    def add(self, channel: CacheChannel) -> None:
        self._channels.add(channel)
        if self._loop is None:
            self._loop = LoopingCall(self._sweep)
            self._loop.clock = self.clock
            self._loop.start(TICK, now=False)

    def remove(self, channel: CacheChannel) -> None:
        self._channels.discard(channel)
        if not self._channels and self._loop is not None:
            self._loop.stop()
            self._loop = None

    def _sweep(self) -> None:
        now = self.clock.seconds()
        for channel in list(self._channels):
            try:
                channel.check(now)
            except Exception:
                log.failure("checking the deadlines of a connection failed")


class CacheChannel(HTTPChannel):
    """
    An HTTP/1.1 connection with the deadlines of its site's L{Deadlines},
    kept by the site's L{Watch} (Twisted's own idle timeout is off).
    """

    deadlines = Deadlines()
    _watch: Watch
    _phase = HEADERS
    #: When the current phase's deadline passes.
    _due: float | None = None
    #: When the request body began, and how much of it has come.
    _body_started = 0.0
    _body_bytes = 0
    #: Some of the request line and headers being waited for have arrived.
    _begun = False
    #: Since when the client has read nothing of the response.
    _stalled_since: float | None = None
    #: What the transport held unsent at the last look: less now means the
    #: client reads.
    _unsent_seen = 0
    #: Answered by L{refuse}: whatever else arrives is not a request.
    _refused = False
    _answered = 0

    def connectionMade(self) -> None:
        site = self.site  # type: ignore[attr-defined]
        self.deadlines = site.deadlines
        self._watch = site.watch
        super().connectionMade()
        self._watch.add(self)
        self._expect_headers()

    def _now(self) -> float:
        return float(self._watch.clock.seconds())

    def _expect_headers(self) -> None:
        # One deadline for the whole header section, however it trickles in.
        self._phase = HEADERS
        self._begun = False
        self._due = self._now() + self.deadlines.header

    def check(self, now: float) -> None:
        """
        Act on a deadline that has passed (called by the site's L{Watch}).
        """
        unsent = _unsent(self.transport)
        reads = unsent < self._unsent_seen
        self._unsent_seen = unsent
        if self._stalled_since is not None:
            if reads:
                # It reads, if slowly: the deadline is for reading nothing.
                self._stalled_since = now
            elif now - self._stalled_since >= self.deadlines.send:
                log.debug("closing a connection from {peer}: it read nothing for {seconds:g} s",
                          peer=peer(self), seconds=self.deadlines.send)
                self._abort()
                return
        if self._due is None:
            return
        if self._phase == BODY:
            late = now - self._body_started - self.deadlines.body
            if late > 0 and self._body_bytes < late * BODY_MIN_RATE:
                log.debug("closing a connection from {peer}: its request body came too slowly", peer=peer(self))
                self._due = None
                self.refuse(REQUEST_TIMEOUT, "request body too slow")
                return
        if reads and self._phase in (IDLE, CLOSING):
            # Still taking the end of the last response: not idle, and a
            # close waits for it.
            self._due = max(self._due, now + (self.deadlines.keepalive if self._phase == IDLE else ABORT_AFTER))
        if now < self._due:
            return
        self._due = None
        if self._phase == HEADERS:
            log.debug("closing a connection from {peer}: no whole request within {seconds:g} s",
                      peer=peer(self), seconds=self.deadlines.header)
            if self._begun:
                self.refuse(REQUEST_TIMEOUT, "request headers took too long")
            else:
                self._close()
        elif self._phase == BODY:
            log.debug("closing a connection from {peer}: its request body stalled", peer=peer(self))
            self.refuse(REQUEST_TIMEOUT, "request body stalled")
        elif self._phase == IDLE:
            log.debug("closing an idle connection from {peer}", peer=peer(self))
            self._close()
        elif self._phase == CLOSING:
            self._abort()

    def dataReceived(self, data: bytes) -> None:
        if self._refused:
            return
        if self._phase == IDLE:
            self._expect_headers()
        if self._phase == HEADERS:
            self._begun = True
        elif self._phase == BODY:
            # The same deadline for each read of a body as for upstream bodies.
            self._due = self._now() + self.deadlines.body
            self._body_bytes += len(data)
        super().dataReceived(data)

    def allHeadersReceived(self) -> None:
        self._phase = BODY
        if self.length == 0:
            self._due = None  # no body: allContentReceived comes next
        else:
            self._body_started = self._now()
            self._body_bytes = 0
            self._due = self._body_started + self.deadlines.body
        super().allHeadersReceived()

    def allContentReceived(self) -> None:
        if self._refused:
            return  # the end of a body too large, in the same read
        # Being answered: nothing is expected of the client until then. (It
        # may be answered before this returns.)
        self._phase = BUSY
        self._due = None
        super().allContentReceived()

    def requestDone(self, request: Request) -> None:
        self._answered += 1
        answered = self._answered
        # What came after this request: held while it was answered, or
        # still in the line buffer when it was answered at once (Twisted
        # holds an empty string after any body; a stray CRLF between
        # requests is no request).
        buffered = bool(b"".join(self._dataBuffer).lstrip(b"\r\n") or self._buffer.lstrip(b"\r\n"))
        self._phase = HEADERS
        super().requestDone(request)
        if answered != self._answered or self._phase != HEADERS or not self.persistent:
            # A pipelined request replayed from the buffer has been
            # answered (and decided) already, or is being answered now.
            return
        if buffered:
            self._expect_headers()  # part of the next request is here
            self._begun = True
        else:
            self._phase = IDLE
            self._due = self._now() + self.deadlines.keepalive

    # A client that reads nothing holds its response: it has a deadline too.

    def pauseProducing(self) -> None:
        super().pauseProducing()
        if self._stalled_since is None:
            self._stalled_since = self._now()

    def rawDataReceived(self, data: bytes) -> None:
        super().rawDataReceived(data)
        if self._handlingRequest and sum(map(len, self._dataBuffer)) > _MAX_PIPELINED:
            # Twisted stops reading here only while its transport is not
            # stalled; a client that reads nothing but sends on would fill
            # memory until the send deadline.
            self._networkProducer.pauseProducing()

    def resumeProducing(self) -> None:
        self._stalled_since = None
        super().resumeProducing()

    # Requests that cannot be parsed, or are too large.

    def headerReceived(self, line: bytes) -> bool:
        # A field name has no white space before its colon (RFC 9112, 5.1).
        if line[:15].lower() == b"content-length:":
            value = line[15:].strip(b" \t")
            if value.isdigit() and len(value) > _MAX_LENGTH_DIGITS:
                if len(value.lstrip(b"0")) <= _MAX_LENGTH_DIGITS:
                    self.refuse(BAD_REQUEST, "bad request: a Content-Length of too many digits")
                    return False
                self.refuse(REQUEST_ENTITY_TOO_LARGE, "request body too large")
                return False
            if value.isdigit() and int(value) > self.deadlines.max_body:
                self.refuse(REQUEST_ENTITY_TOO_LARGE, "request body too large")
                return False
        ok: bool = super().headerReceived(line)
        return ok

    def _respondToBadRequestAndDisconnect(self) -> None:
        self.refuse(BAD_REQUEST, "bad request: not a request this server can parse")

    def lineLengthExceeded(self, line: bytes) -> None:
        self.refuse(REQUEST_HEADER_FIELDS_TOO_LARGE, "request line or header too long")

    def refuse(self, code: int, message: str) -> None:
        """
        Answer with C{code} and a one-line body, and close the connection:
        for what never became a request the site could answer.
        """
        if self.transport is None or getattr(self.transport, "disconnecting", False):
            return
        self._refused = True
        body = message.encode("utf-8") + b"\n"
        reason = _REASONS.get(code) or RESPONSES.get(code, b"Error")
        self.transport.write(
            b"HTTP/1.1 %d %s\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: %d\r\n"
            b"Connection: close\r\n\r\n%s" % (code, reason, len(body), body)
        )
        site = getattr(self, "site", None)
        if site is not None and hasattr(site, "refused"):
            site.refused(self, code, message)
        self._close()

    def _close(self) -> None:
        if self.transport is not None:
            self.loseConnection()

    def loseConnection(self) -> None:
        # Every way of closing comes here (a refusal, a deadline, a request
        # that said Connection: close, a response cut short): a client that
        # stops reading what is left is cut ABORT_AFTER later.
        self._phase = CLOSING
        self._due = self._now() + ABORT_AFTER
        super().loseConnection()

    def _abort(self) -> None:
        if self.transport is not None:
            cast(ITCPTransport, self.transport).abortConnection()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._watch.remove(self)
        super().connectionLost(reason)


def _unsent(transport: Any) -> int:
    """
    Bytes a TCP transport still holds for its peer (Twisted's own buffers:
    what the kernel took is gone from them), to tell a client that reads
    slowly from one that reads nothing; behind TLS, the TCP transport's
    under it. 0 when the transport cannot say.
    """
    candidate: Any
    for candidate in (transport, getattr(transport, "transport", None)):
        try:
            return int(len(candidate.dataBuffer) - candidate.offset + candidate._tempDataLen)
        except (AttributeError, TypeError):
            continue
    return 0


def peer(channel: HTTPChannel) -> str:
    transport = channel.transport
    if transport is None:
        return "-"
    peer = transport.getPeer()
    host = getattr(peer, "host", None)
    return f"{host}:{getattr(peer, 'port', '')}" if host else str(peer)
