"""
The daemon's HTTP connections: deadlines for slow and idle clients, request
bodies of a bounded size, one-line answers to what cannot be parsed, and
requests that outlive their client quietly.

A connection is in one of four phases, each with a deadline:
  - the request line and headers must arrive within C{header} seconds of
    the first byte (of the connection, for its first request), however
    slowly they trickle in;
  - a body may go C{body} seconds without a byte (as upstream bodies may);
  - a response may wait C{send} seconds for a client that reads nothing;
  - between requests, an idle connection is closed after C{keepalive}.
While a request is being answered (a slow miss, say), nothing is expected
of the client, and no deadline runs but the one for sending.
"""

from __future__ import annotations

import time
from typing import Any, cast

from attrs import frozen
from twisted.internet.interfaces import IDelayedCall, ITCPTransport
from twisted.internet.protocol import connectionDone
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
#: A Content-Length of more digits than this is larger than any body.
_MAX_LENGTH_DIGITS = 18
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
        self._body_size = 0

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
        self.aborted = not self._complete()
        if not self.startedWriting:
            self.code, self.code_message = CLIENT_CLOSED_REQUEST, b"Client Closed Request"
        site = getattr(channel, "site", None)
        if site is not None and hasattr(site, "client_left"):
            site.client_left(self)


class CacheChannel(HTTPChannel):
    """
    An HTTP/1.1 connection with the deadlines of its site's L{Deadlines}.
    """

    deadlines = Deadlines()
    _deadline: IDelayedCall | None = None
    _stalled: IDelayedCall | None = None
    #: Between requests: nothing of the next one has arrived yet.
    _idle = False
    #: The request line and headers of the next request are expected.
    _awaiting_headers = True
    #: Some of them have arrived.
    _begun = False
    _answered = 0

    def connectionMade(self) -> None:
        self.deadlines = getattr(getattr(self, "site", None), "deadlines", self.deadlines)
        super().connectionMade()
        self._expect_headers()

    def _expect_headers(self) -> None:
        # One deadline for the whole header section: the idle timeout
        # would start again with every byte of a trickle.
        self._idle = False
        self._awaiting_headers = True
        self._begun = False
        self.setTimeout(None)
        if self._deadline is None:
            self._deadline = self.callLater(self.deadlines.header, self._headers_too_slow)

    def _cancel_deadline(self) -> None:
        if self._deadline is not None:
            if self._deadline.active():
                self._deadline.cancel()
            self._deadline = None

    def _headers_too_slow(self) -> None:
        self._deadline = None
        log.debug("closing a connection from {peer}: no whole request within {seconds:g} s",
                  peer=peer(self), seconds=self.deadlines.header)
        if self._begun:
            self.refuse(REQUEST_TIMEOUT, "request headers took too long")
        else:
            self._close()

    def dataReceived(self, data: bytes) -> None:
        if self._idle:
            self._expect_headers()
        if self._awaiting_headers:
            self._begun = True
        super().dataReceived(data)

    def allHeadersReceived(self) -> None:
        self._cancel_deadline()
        self._awaiting_headers = False
        super().allHeadersReceived()
        # The same deadline for each read of a body as for upstream bodies;
        # without a body, allContentReceived sets it aside at once.
        self.setTimeout(self.deadlines.body)

    def requestDone(self, request: Request) -> None:
        self._answered += 1
        answered = self._answered
        buffered = bool(self._dataBuffer)
        self._awaiting_headers = True
        super().requestDone(request)
        if answered != self._answered or not self._awaiting_headers or not self.persistent:
            # A pipelined request replayed from the buffer has been
            # answered (and decided) already, or is being answered now.
            return
        if buffered:
            self._expect_headers()  # part of the next request is here
        else:
            self._idle = True
            self.setTimeout(self.deadlines.keepalive)

    def timeoutConnection(self) -> None:
        # An idle keep-alive connection, or a body that stopped coming.
        if self._idle or not self.requests:
            log.debug("closing an idle connection from {peer}", peer=peer(self))
            self._close()
        else:
            log.debug("closing a connection from {peer}: its request body sent nothing for {seconds:g} s",
                      peer=peer(self), seconds=self.deadlines.body)
            self.refuse(REQUEST_TIMEOUT, "request body stalled")

    # A client that reads nothing holds its response: it has a deadline too.

    def pauseProducing(self) -> None:
        super().pauseProducing()
        if self._stalled is None:
            self._stalled = self.callLater(self.deadlines.send, self._send_stalled)

    def resumeProducing(self) -> None:
        if self._stalled is not None:
            if self._stalled.active():
                self._stalled.cancel()
            self._stalled = None
        super().resumeProducing()

    def _send_stalled(self) -> None:
        self._stalled = None
        log.debug("closing a connection from {peer}: it read nothing for {seconds:g} s",
                  peer=peer(self), seconds=self.deadlines.send)
        if self.transport is not None:
            cast(ITCPTransport, self.transport).abortConnection()

    # Requests that cannot be parsed, or are too large.

    def headerReceived(self, line: bytes) -> bool:
        name, colon, value = line.partition(b":")
        if colon and name.strip().lower() == b"content-length":
            value = value.strip(b" \t")
            if value.isdigit() and (
                len(value.lstrip(b"0")) > _MAX_LENGTH_DIGITS or int(value) > self.deadlines.max_body
            ):
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
        body = message.encode("utf-8") + b"\n"
        self.transport.write(
            b"HTTP/1.1 %d %s\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: %d\r\n"
            b"Connection: close\r\n\r\n%s" % (code, _REASONS.get(code) or RESPONSES.get(code, b"Error"), len(body), body)
        )
        site = getattr(self, "site", None)
        if site is not None and hasattr(site, "refused"):
            site.refused(self, code, message)
        self._close()

    def _close(self) -> None:
        self._cancel_deadline()
        self.setTimeout(None)
        if self.transport is not None:
            self.loseConnection()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._cancel_deadline()
        if self._stalled is not None:
            if self._stalled.active():
                self._stalled.cancel()
            self._stalled = None
        super().connectionLost(reason)


def peer(channel: HTTPChannel) -> str:
    transport = channel.transport
    if transport is None:
        return "-"
    peer = transport.getPeer()
    host = getattr(peer, "host", None)
    return f"{host}:{getattr(peer, 'port', '')}" if host else str(peer)
