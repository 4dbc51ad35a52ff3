"""
The daemon's HTTP connections on a fake clock: deadlines for slow and idle
clients, bounded request bodies, one-line answers to what cannot be parsed,
and requests whose client left, logged and counted once.
"""

from __future__ import annotations

from typing import Any, Iterator

import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import globalLogPublisher
from twisted.python.failure import Failure
from twisted.internet.error import ConnectionDone
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from contentcache import metrics
from contentcache.channel import ABORT_AFTER, BODY_MIN_RATE, CacheChannel, Deadlines
from contentcache.server import CacheSite

DEADLINES = Deadlines(header=10, keepalive=60, body=30, send=30, max_body=1000)
REQUEST = b"GET /ok HTTP/1.1\r\nHost: cache.test\r\n\r\n"


class Ok(Resource):
    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        #: Requests for /slow, unanswered until the test says.
        self.pending: list[Request] = []

    def render(self, request: Request) -> Any:
        if request.path == b"/slow":
            self.pending.append(request)
            return NOT_DONE_YET
        request.setHeader(b"content-length", b"3")
        return b"ok\n"


class Connection:
    def __init__(self, site: CacheSite, clock: Clock) -> None:
        self.clock = clock
        self.transport = StringTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", 40000))
        self.channel: CacheChannel = site.buildProtocol(None)
        self.channel.callLater = clock.callLater  # type: ignore[method-assign]
        self.channel.makeConnection(self.transport)

    def send(self, data: bytes) -> None:
        self.channel.dataReceived(data)

    def received(self) -> bytes:
        value: bytes = self.transport.value()
        self.transport.clear()
        return value

    @property
    def closed(self) -> bool:
        return bool(self.transport.disconnecting)

    def lose(self) -> None:
        self.channel.connectionLost(Failure(ConnectionDone()))


def assert_refused(c: Connection, status: int, message: bytes) -> None:
    """
    The daemon answered C{status} with the one line C{message}, and closes.
    """
    answer = c.received()
    assert answer.startswith(b"HTTP/1.1 %d " % status), answer[:200]
    assert answer.endswith(b"\r\n\r\n" + message + b"\n"), answer[-200:]
    assert c.closed


@pytest.fixture
def resource() -> Ok:
    return Ok()


@pytest.fixture
def site(resource: Ok, clock: Clock) -> CacheSite:
    site = CacheSite(resource, DEADLINES, reactor=clock)
    return site


@pytest.fixture
def connect(site: CacheSite, clock: Clock) -> Iterator[Any]:
    made: list[Connection] = []

    def make() -> Connection:
        made.append(Connection(site, clock))
        return made[-1]

    yield make
    for c in made:
        if c.channel.transport is not None:
            c.lose()


def test_headers_trickling_in_are_cut_off_at_the_deadline(connect: Any, clock: Clock) -> None:
    c = connect()
    for byte in REQUEST[:19]:  # a byte a second: the idle timeout alone never fires
        c.send(bytes([byte]))
        clock.advance(0.5)
    assert not c.closed
    clock.advance(DEADLINES.header - 19 * 0.5)
    answer = c.received()
    assert answer.startswith(b"HTTP/1.1 408 ") and answer.endswith(b"\r\n\r\nrequest headers took too long\n")
    assert c.closed


def test_a_connection_that_sends_nothing_is_closed_quietly(connect: Any, clock: Clock) -> None:
    c = connect()
    clock.advance(DEADLINES.header)
    assert c.closed and c.received() == b""


def test_a_kept_alive_connection_waits_for_the_keepalive_timeout(connect: Any, clock: Clock) -> None:
    c = connect()
    c.send(REQUEST)
    assert c.received().endswith(b"ok\n")
    clock.advance(DEADLINES.header + 1)
    assert not c.closed, "idle between requests: not the header deadline"
    c.send(REQUEST)  # a second request on the same connection
    assert c.received().endswith(b"ok\n")
    clock.advance(DEADLINES.keepalive - 1)
    assert not c.closed
    clock.advance(1)
    assert c.closed and c.received() == b""


def test_the_next_request_after_an_idle_spell_has_the_header_deadline(connect: Any, clock: Clock) -> None:
    c = connect()
    c.send(REQUEST)
    c.received()
    clock.advance(30)
    c.send(b"GET /ok HT")
    clock.advance(DEADLINES.header)
    assert c.received().startswith(b"HTTP/1.1 408 ") and c.closed


def test_a_pipelined_burst_then_idle_gets_the_keepalive_timeout(connect: Any, clock: Clock) -> None:
    c = connect()
    c.send(REQUEST * 3)
    assert c.received().count(b"ok\n") == 3
    clock.advance(DEADLINES.keepalive - 1)
    assert not c.closed
    clock.advance(1)
    assert c.closed


def test_a_slow_answer_has_no_deadline_of_the_client(connect: Any, clock: Clock, resource: Ok) -> None:
    c = connect()
    c.send(b"GET /slow HTTP/1.1\r\nHost: cache.test\r\n\r\n")
    clock.advance(DEADLINES.keepalive * 10)
    assert not c.closed
    request = resource.pending.pop()
    request.setHeader(b"content-length", b"5")
    request.write(b"late\n")
    request.finish()
    assert c.received().endswith(b"late\n")


def test_a_stalled_body_is_cut_off(connect: Any, clock: Clock) -> None:
    c = connect()
    c.send(b"POST /ok HTTP/1.1\r\nHost: cache.test\r\nContent-Length: 10\r\n\r\n12345")
    clock.advance(DEADLINES.body - 1)
    assert not c.closed
    clock.advance(1)
    assert c.received().endswith(b"\r\n\r\nrequest body stalled\n") and c.closed


def test_a_body_that_trickles_must_still_arrive_on_the_whole(connect: Any, clock: Clock) -> None:
    c = connect()
    c.send(b"POST /ok HTTP/1.1\r\nHost: cache.test\r\nContent-Length: 1000\r\n\r\n")
    clock.advance(DEADLINES.body - 1)
    c.send(b"x")  # a byte before the read's deadline
    assert not c.closed
    # 1,000 bytes at the least rate take a fraction of a second more than
    # the first read's deadline: by then the whole body is overdue.
    clock.advance(2)
    assert c.received().endswith(b"request body too slow\n") and c.closed


def large_bodies(resource: Ok, clock: Clock) -> Connection:
    """
    A connection to a site that takes bodies of up to 16 MiB.
    """
    site = CacheSite(resource, Deadlines(header=10, keepalive=60, body=30, send=30, max_body=16 << 20), reactor=clock)
    return Connection(site, clock)


def test_each_read_of_a_large_body_resets_its_deadline(resource: Ok, clock: Clock) -> None:
    c = large_bodies(resource, clock)
    c.send(b"POST /ok HTTP/1.1\r\nHost: cache.test\r\nContent-Length: 8000000\r\n\r\n")
    for _ in range(5):  # in bursts, each before the read's deadline, at the least rate
        clock.advance(29)
        c.send(b"x" * (29 * BODY_MIN_RATE))
    assert not c.closed
    clock.advance(30)
    assert c.received().endswith(b"request body stalled\n") and c.closed


def test_a_body_of_no_stated_length_must_keep_up_too(resource: Ok, clock: Clock) -> None:
    c = large_bodies(resource, clock)
    c.send(b"POST /ok HTTP/1.1\r\nHost: cache.test\r\nTransfer-Encoding: chunked\r\n\r\n")
    for _ in range(3):  # a chunk of a byte before each read's deadline
        clock.advance(DEADLINES.body - 1)
        c.send(b"1\r\nx\r\n")
    assert c.received().endswith(b"request body too slow\n") and c.closed


@pytest.mark.parametrize(
    "head",
    [
        b"Content-Length: 1001",
        b"Content-Length: " + b"9" * 5000,
        b"Transfer-Encoding: chunked",
    ],
    ids=["length", "5000-digits", "chunked"],
)
def test_a_body_too_large_is_413(connect: Any, head: bytes) -> None:
    c = connect()
    c.send(b"POST /ok HTTP/1.1\r\nHost: cache.test\r\n" + head + b"\r\n\r\n")
    if b"chunked" in head:
        for _ in range(3):
            c.send(b"200\r\n" + b"x" * 0x200 + b"\r\n")
    assert_refused(c, 413, b"request body too large")


def test_a_chunked_body_too_large_is_never_answered(connect: Any, resource: Ok) -> None:
    c = connect()
    chunk = b"%x\r\n%s\r\n" % (1500, b"x" * 1500)
    c.send(b"POST /slow HTTP/1.1\r\nHost: cache.test\r\nTransfer-Encoding: chunked\r\n\r\n" + chunk + b"0\r\n\r\n")
    assert c.received().startswith(b"HTTP/1.1 413 ")
    assert resource.pending == [], "the handler never saw the truncated body"


UNPARSABLE = b"bad request: not a request this server can parse"


@pytest.mark.parametrize(
    "sent, status, message",
    [
        (b"GET\r\n\r\n", 400, UNPARSABLE),
        (b"GET / HTTP/1.1 extra\r\n\r\n", 400, UNPARSABLE),
        (b"G\x00T / HTTP/1.1\r\n\r\n", 400, UNPARSABLE),
        (b"GET / HTTP/1.1\r\nno colon here\r\n\r\n", 400, UNPARSABLE),
        (b"GET / HTTP/1.1\r\nX: " + b"a" * 9000 + b"\r\nY: " + b"b" * 9000 + b"\r\n\r\n", 400, UNPARSABLE),
        (b"GET /" + b"a" * 20_000 + b" HTTP/1.1\r\n\r\n", 431, b"request line or header too long"),
        # Twisted's own int() of it would have been a traceback.
        (b"POST /ok HTTP/1.1\r\nHost: cache.test\r\nContent-Length: " + b"0" * 5000 + b"1\r\n\r\nx", 400,
         b"bad request: a Content-Length of too many digits"),
    ],
    ids=["no-target", "extra", "nul", "no-colon", "headers-too-large", "line-too-long", "zeros"],
)
def test_what_cannot_be_taken_is_refused_in_one_line(connect: Any, sent: bytes, status: int, message: bytes) -> None:
    c = connect()
    c.send(sent)
    assert_refused(c, status, message)


def test_a_client_that_reads_nothing_is_dropped(connect: Any, clock: Clock) -> None:
    c = connect()
    c.send(b"GET /slow HTTP/1.1\r\nHost: cache.test\r\n\r\n")
    c.channel.pauseProducing()  # the transport's buffer is full
    clock.advance(DEADLINES.send - 1)
    c.channel.resumeProducing()
    c.channel.pauseProducing()
    clock.advance(DEADLINES.send - 1)
    assert not c.closed
    clock.advance(1)
    assert c.closed


def test_a_client_that_reads_slowly_is_not_dropped(connect: Any, clock: Clock) -> None:
    c = connect()
    c.send(b"GET /slow HTTP/1.1\r\nHost: cache.test\r\n\r\n")
    # Twisted's own buffers, as a TCP transport holds them: 256 KiB waiting.
    c.transport.dataBuffer, c.transport.offset, c.transport._tempDataLen = b"x" * 262144, 0, 0
    c.channel.pauseProducing()
    for _ in range(10):
        c.transport.offset += 1000  # a few bytes taken each time
        clock.advance(DEADLINES.send - 1)
    assert not c.closed
    clock.advance(DEADLINES.send + 1)  # then nothing
    assert c.closed


@pytest.mark.parametrize("after", [b"", b"\r\n"], ids=["nothing", "a-stray-crlf"])
def test_after_a_request_with_a_body_the_connection_is_idle(connect: Any, clock: Clock, after: bytes) -> None:
    c = connect()
    c.send(b"POST /ok HTTP/1.1\r\nHost: cache.test\r\nContent-Length: 3\r\n\r\nabc" + after)
    assert c.received().endswith(b"ok\n")
    clock.advance(DEADLINES.header + 1)
    assert not c.closed and c.received() == b"", "kept alive, not a 408"
    clock.advance(DEADLINES.keepalive)
    assert c.closed


def test_pipelined_bytes_are_not_read_without_end_while_answering(connect: Any, resource: Ok) -> None:
    c = connect()
    c.send(b"GET /slow HTTP/1.1\r\nHost: cache.test\r\n\r\n")
    c.channel.pauseProducing()  # the client reads nothing of the answer
    c.transport.producerState = "producing"
    for _ in range(10):
        c.send(b"GET /ok HTTP/1.1\r\nHost: cache.test\r\nX: " + b"y" * 8000 + b"\r\n\r\n")
    assert c.transport.producerState == "paused", "it stops reading what it cannot answer yet"


def test_a_pipelined_partial_request_has_the_header_deadline(connect: Any, clock: Clock) -> None:
    c = connect()
    c.send(REQUEST + b"GET /o")  # answered at once; the rest waits in the line buffer
    assert c.received().endswith(b"ok\n")
    clock.advance(DEADLINES.header)
    assert c.received().startswith(b"HTTP/1.1 408 ") and c.closed


def test_every_close_is_cut_if_the_client_stops_reading(connect: Any, clock: Clock) -> None:
    c = connect()
    c.send(b"GET /ok HTTP/1.1\r\nHost: cache.test\r\nConnection: close\r\n\r\n")
    assert c.closed and not c.transport.disconnected  # closing, waiting to send the rest
    clock.advance(ABORT_AFTER)
    assert c.transport.disconnected, "aborted"


def test_a_slow_reader_finishes_its_download_before_the_keepalive_timeout(connect: Any, clock: Clock) -> None:
    c = connect()
    c.send(REQUEST)
    c.transport.dataBuffer, c.transport.offset, c.transport._tempDataLen = b"x" * 262144, 0, 0
    for _ in range(10):  # reading the end of the response, slowly, for 300 s
        c.transport.offset += 1000
        clock.advance(DEADLINES.keepalive / 2)
    assert not c.closed
    clock.advance(DEADLINES.keepalive)  # then it reads no more
    assert c.closed


def test_a_connection_with_a_partial_request_line_gets_408(connect: Any, clock: Clock) -> None:
    c = connect()
    c.send(b"GET /o")
    clock.advance(DEADLINES.header)
    assert c.received().startswith(b"HTTP/1.1 408 ") and c.closed


@pytest.fixture
def access() -> Iterator[list[dict[str, Any]]]:
    lines: list[dict[str, Any]] = []

    def observe(event: dict[str, Any]) -> None:
        if event.get("log_namespace") == "contentcache.access":
            lines.append(event)

    globalLogPublisher.addObserver(observe)
    yield lines
    globalLogPublisher.removeObserver(observe)


def aborts() -> float:
    return metrics.REGISTRY.get_sample_value("contentcache_client_aborts_total", {"protocol": "other"}) or 0.0


@pytest.mark.parametrize(
    "announced, written, aborted", [(100, 10, True), (4, 4, False)], ids=["cut-short", "all-sent"]
)
def test_a_client_that_leaves_is_logged_and_counted_once(
    connect: Any, resource: Ok, access: list[dict[str, Any]], announced: int, written: int, aborted: bool
) -> None:
    # Cut short, or gone right after the last byte, before the handler
    # finished: logged once either way, an abort only in the first case.
    before = aborts()
    c = connect()
    c.send(b"GET /slow HTTP/1.1\r\nHost: cache.test\r\n\r\n")
    request = resource.pending.pop()
    request.setHeader(b"content-length", b"%d" % announced)
    request.write(b"x" * written)
    c.lose()
    request.unregisterProducer()  # the handler, unaware, cleans up and finishes:
    request.finish()  # nothing more happens
    assert [(e["status"], e["bytes"], e["aborted"]) for e in access] == [(200, written, aborted)]
    assert aborts() == before + aborted


def test_a_client_gone_before_the_answer_is_499(connect: Any, resource: Ok, access: list[dict[str, Any]]) -> None:
    c = connect()
    c.send(b"GET /slow HTTP/1.1\r\nHost: cache.test\r\n\r\n")
    request = resource.pending.pop()
    gone: list[Failure] = []
    request.notifyFinish().addErrback(gone.append)
    c.lose()
    assert gone and [(e["status"], e["aborted"]) for e in access] == [(499, True)]
