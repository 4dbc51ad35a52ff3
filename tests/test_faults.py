"""
Faults and hostile clients against the real daemon (C{twistd -n
contentcache}), over raw sockets, with a misbehaving upstream fixture on
127.0.0.1: no request gets a 5xx or a traceback, clients that leave are
normal, slow clients have deadlines, a full disk is a state, and damaged
blobs are never served.

Most tests share one daemon; the scrub and the full disk have their own.
"""

from __future__ import annotations

import http.client
import json
import os
import random
import re
import socket
import sqlite3
import struct
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Iterator

import pytest

from contentcache.protocol.goproxy.paths import escape

from .daemon import Daemon
from .gomodules import GREET, HELLO, build_payload_modules, build_tree, modules
from .test_goproxy import request
from .upstream import UpstreamFixture

KiB = 1024
MiB = 1024 * KiB
HEADER_TIMEOUT = 3.0
BIG = "example.com/big"  # 8 MiB: more than any socket buffer holds
ROT = "example.com/rot"  # 2 MiB, for flipped bytes
FILL = "example.com/fill"  # 1 MiB a version, to fill a small disk
FILL_VERSIONS = [f"v1.0.{i}" for i in range(16)]
#: What a healthy daemon's log never holds.
TROUBLE = re.compile(r"Traceback|CRITICAL|#critical|Unhandled Error|Request\.finish called|NoneType")


def path_of(module: str, version: str, ext: str) -> str:
    return f"/goproxy/{escape(module)}/@v/{escape(version)}.{ext}"


def upstream_path(module: str, version: str, ext: str) -> str:
    return path_of(module, version, ext).removeprefix("/goproxy")


class Logged:
    """
    What a daemon logs from now on.
    """

    def __init__(self, daemon: Daemon) -> None:
        self._daemon = daemon
        self._start = len(daemon.output)

    def text(self) -> str:
        return self._daemon.log()[self._start :]

    def wait_for(self, pattern: str, count: int = 1, timeout: float = 10) -> list[str]:
        """
        The lines matching C{pattern}, once there are C{count} of them (the
        access log is written in batches, every second).
        """
        deadline = time.monotonic() + timeout
        while True:
            found = [line for line in self.text().splitlines() if re.search(pattern, line)]
            if len(found) >= count or time.monotonic() > deadline:
                return found
            time.sleep(0.2)

    def assert_no_trouble(self) -> None:
        trouble = [line for line in self.text().splitlines() if TROUBLE.search(line)]
        assert not trouble, "\n".join(trouble[:20])


def metric(daemon: Daemon, name: str, **labels: str) -> float:
    _, _, body = request(daemon.url, "/metrics")
    wanted = name + ("{" + ",".join(f'{k}="{v}"' for k, v in sorted(labels.items())) + "}" if labels else "")
    for line in body.decode().splitlines():
        if line.startswith(wanted + " "):
            return float(line.split()[-1])
    return 0.0


def exchange(port: int, data: bytes, timeout: float = 15, half_close: bool = False) -> bytes:
    """
    Send raw bytes and read whatever comes back until the daemon closes.
    """
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        try:
            s.sendall(data)
            if half_close:
                s.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # it may close on us before we are done: fine
        received = b""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                chunk = s.recv(65536)
            except (socket.timeout, OSError):
                break
            if not chunk:
                break
            received += chunk
    return received


def statuses(response: bytes) -> list[int]:
    return [int(code) for code in re.findall(rb"(?:^|\r\n)HTTP/1\.[01] (\d{3}) ", response)]


def snapshot(root: str, skip: str) -> set[str]:
    found = set()
    for directory, dirs, files in os.walk(root):
        if os.path.abspath(directory).startswith(os.path.abspath(skip)):
            continue
        found.update(os.path.join(directory, name) for name in files + dirs)
    return found


@pytest.fixture(scope="module")
def place(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(tmp_path_factory.mktemp("faults"))


@pytest.fixture(scope="module")
def upstream(place: str) -> Iterator[UpstreamFixture]:
    tree = build_tree(os.path.join(place, "tree"), modules())
    build_payload_modules(tree, BIG, ["v1.0.0"], 8 * MiB)
    build_payload_modules(tree, ROT, ["v1.0.0"], 2 * MiB)
    fixture = UpstreamFixture(tree)
    yield fixture
    fixture.stop()


@pytest.fixture(scope="module")
def daemon(place: str, upstream: UpstreamFixture) -> Iterator[Daemon]:
    cwd = os.path.join(place, "cwd")
    os.mkdir(cwd)
    d = Daemon(
        os.path.join(place, "storage"),
        [
            "--go-upstream", upstream.url, "--go-sumdb", "off", "--npm-upstream", upstream.url,
            "--header-timeout", f"{HEADER_TIMEOUT:g}s", "--keepalive-timeout", "5s",
            "--idle-timeout", "2s", "--upstream-timeout", "5s",
        ],
        cwd=cwd,
    )
    yield d
    d.stop()
    assert os.listdir(cwd) == [], "the daemon wrote into its working directory"


def stored_blobs(place: str) -> list[str]:
    return [name for _, _, names in os.walk(os.path.join(place, "storage", "blobs")) for name in names]


def read_file(upstream: UpstreamFixture, path: str) -> bytes:
    with open(os.path.join(upstream.root, *path.lstrip("/").split("/")), "rb") as f:
        return f.read()


# Hostile requests.

INFO = path_of(GREET, "v1.0.0", "info")
PATHS = [
    "/", "/health", "/metrics", "/goproxy/", "/npm/", INFO, path_of(GREET, "v1.0.0", "zip"),
    "/goproxy/../../etc/passwd", "/goproxy/%2e%2e/%2e%2e/etc/passwd", "/goproxy/..%2f..%2fetc%2fpasswd",
    "/goproxy/%252e%252e/etc/passwd", "/goproxy/%c0%ae%c0%ae/etc/passwd", "/goproxy/example.com/%ff%fe/@v/list",
    "/goproxy/example.com/greet/@v/v1.0.0%00.info", "/goproxy/example.com/greet/@v/v1.0.0.info%00",
    "/goproxy/example.com\\..\\..\\etc\\passwd/@v/list", "/goproxy//example.com//greet/@v/list",
    "/goproxy/example.com/greet/@v/list?x=" + "%" * 50, "/goproxy/example.com/greet/@v/list;param",
    "/goproxy/example.com/" + "a" * 16_000 + "/@v/list", "/goproxy/example.com/greet/@v/" + "v1." * 3000 + "info",
    "/goproxy/sumdb/sum.test/supported", "/goproxy/sumdb/x/../../../etc", "/goproxy/example.com/greet/@latest",
    "/goproxy/example.com/!!/@v/list", "/goproxy/" + "%00" * 100,
    "/npm/%40scope%2f..%2f..%2fetc", "/npm/@scope/../../etc/passwd", "/npm/" + "a" * 16_000, "/npm/-/ping",
    "/npm/-/v1/search?text=" + "x" * 5000, "/npm/left-pad/-/left-pad-1.3.0.tgz", "/npm/left-pad/-/../../../etc/passwd",
    "/npm/%2e%2e%2f", "/npm/-/package/%40x%2fy/dist-tags", "/npm/left-pad?write=true", "/npm/%40%40/x",
    "/npm/-/npm/v1/security/advisories/bulk", "*", "http://example.evil/goproxy/x", "/%", "/%%%",
    INFO + "?" + "a=b&" * 2000,
]
METHODS = ["GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS", "TRACE", "PATCH", "PROPFIND", "get", "X" * 1000]
HEADERS: list[list[str]] = [
    [],
    ["Range: bytes=" + "9" * 5000 + "-"], ["Range: bytes=0-" + "9" * 5000], ["Range: bytes=-" + "9" * 5000],
    ["Range: bytes=" + "1-2," * 1000 + "3-4"], ["Range: bytes=5-1"], ["Range: bytes=-0"], ["Range: items=0-1"],
    ["Range: bytes=\xff-"], ["Range:"], ["Range: bytes=0-1", "Range: bytes=2-3"],
    ['If-Range: "x"', "Range: bytes=0-1"], ["If-Range: " + "9" * 5000, "Range: bytes=0-1"],
    ["If-Range: Sun, 06 Nov 1994 08:49:37 GMT", "Range: bytes=0-1"],
    ["If-None-Match: " + '"a",' * 2000], ["If-None-Match: *"], ["If-None-Match: W/"], ['If-None-Match: "\xff"'],
    ["If-Modified-Since: " + "9" * 5000], ["If-Modified-Since: Sun, 06 Nov 99999999999 08:49:37 GMT"],
    ["If-Modified-Since: Mon, 32 Foo 1994 25:61:61 GMT"], ["If-Modified-Since: Sun, 06 Nov " + "9" * 5000 + " 08:49:37 GMT"],
    ["Accept: " + "application/vnd.npm.install-v1+json;" * 300], ["Accept: \xff\xfe"], ["Accept: */*;q=" + "9" * 5000],
    ["Accept-Encoding: gzip;q=" + "9" * 5000], ["Accept-Encoding: gzip;q=nan"], ["Accept-Encoding: gzip;q=-1"],
    ["Accept-Encoding: " + "gzip," * 2000], ["Accept-Encoding: \xff"],
    ["Host: " + "a" * 10_000], ["Host:"], ["Host: [::1"], ["Host: x:99999"], ["Host: x:" + "9" * 5000],
    ["Host: a", "Host: b"], ["Host: \xff"], ["Host: evil.example/../x"],
    ["X-Forwarded-Proto: " + "https," * 2000], ["X-Forwarded-Proto: \xff"], ["X-Forwarded-Proto: javascript"],
    ["Content-Length: " + "9" * 5000], ["Content-Length: -1"], ["Content-Length: abc"],
    ["Content-Length: 5", "Content-Length: 6"], ["Content-Length: 0x10"], ["Content-Length: 3"],
    ["Transfer-Encoding: chunked"], ["Transfer-Encoding: gzip"], ["Transfer-Encoding: chunked", "Content-Length: 3"],
    ["Expect: 100-continue"], ["Connection: " + "close," * 2000], ["Content-Encoding: gzip"],
    [f"X-Many-{i}: v" for i in range(600)], ["X: " + "a" * 20_000], ["no colon"], [" continued"],
    ["Cookie: " + "a=b; " * 2000], ["Authorization: Basic " + "=" * 5000], ["X-Nul: a\x00b"],
]
#: Bodies sent after some of the header sets (by their first header).
BODIES = {
    "Transfer-Encoding: chunked": b"zzz\r\nnot hex\r\n0\r\n\r\n",
    "Content-Length: 3": b"abc",
    "Content-Encoding: gzip": b"\x1f\x8b\x08\x00garbage",
}
#: The paths every header set is tried on.
HEADER_PATHS = [INFO, path_of(GREET, "v1.0.0", "zip"), "/npm/left-pad", "/npm/left-pad/-/left-pad-1.3.0.tgz",
                "/npm/-/npm/v1/security/advisories/bulk", "/health", "/goproxy/sumdb/sum.test/supported",
                "/goproxy/example.com/greet/@v/list", "/npm/-/ping", "/metrics", "/nothing", "/goproxy/x/@v/list",
                "/npm/@scope%2fname", "/npm/-/v1/search?text=x", "/"]
RAW: list[tuple[bytes, bool]] = [
    (b"", False), (b"\r\n\r\n", False), (b"GET /\r\n", False), (b"GET / HTTP/9.9\r\n\r\n", False),
    (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", False), (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + os.urandom(64), False),
    (b"GET /\xff\xfe HTTP/1.1\r\nHost: x\r\n\r\n", False), (b"GET / HTTP/1.1\nHost: x\n\n", False),
    (b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n" * 20, False), (os.urandom(4096), False), (b"\x00" * 1000, False),
    (b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n", True), (("GET " + INFO + " HTTP/1.1\r\nHost: x\r\n\r\n").encode() * 5, True),
    (b"GET /health HTTP/1.1\r\nHost: x\r\n", True), (b"POST /npm/-/npm/v1/security/advisories/bulk HTTP/1.1\r\n"
                                                    b"Host: x\r\nContent-Length: 100\r\n\r\nabc", True),
    (b"GET /health HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n" + b"f" * 5000 + b"\r\n", False),
    (b"GET /health HTTP/1.0\r\n\r\nGET /health HTTP/1.0\r\n\r\n", False),
]


def hostile_requests() -> list[tuple[bytes, bool]]:
    requests: list[tuple[bytes, bool]] = []

    def build(method: str, path: str, headers: list[str], body: bytes = b"") -> bytes:
        lines = [f"{method} {path} HTTP/1.1", *headers]
        if not any(h.lower().startswith("host:") for h in headers):
            lines.append("Host: 127.0.0.1")
        lines.append("Connection: close")
        return "\r\n".join(lines).encode("latin-1") + b"\r\n\r\n" + body

    for headers in HEADERS:
        body = BODIES.get(headers[0], b"") if headers else b""
        for path in HEADER_PATHS:
            method = "POST" if body and "bulk" in path else "GET"
            requests.append((build(method, path, headers, body), False))
    for method in METHODS:
        for path in PATHS:
            requests.append((build(method, path, []), False))
    requests += RAW
    return requests


def test_hostile_requests_never_get_a_5xx_or_a_traceback(
    daemon: Daemon, upstream: UpstreamFixture, place: str
) -> None:
    logged = Logged(daemon)
    before = snapshot(place, os.path.join(place, "storage"))
    passwd = os.stat("/etc/passwd")
    requests = hostile_requests()
    assert len(requests) >= 1000
    with ThreadPoolExecutor(48) as pool:
        answers = list(pool.map(lambda r: exchange(daemon.port, r[0], half_close=r[1]), requests))

    answered = [(r, a) for r, a in zip(requests, answers) if statuses(a)]
    assert len(answered) > 0.9 * len(requests), "most get an answer, even if a refusal"
    for (sent, _), answer in answered:
        codes = statuses(answer)
        assert max(codes) < 500, (sent[:200], answer[:300])
        head, _, body = answer.partition(b"\r\n\r\n")
        if len(codes) == 1 and codes[0] >= 400 and not sent.startswith(b"HEAD ") and b"text/plain" in head:
            assert body.count(b"\n") == 1 and body.endswith(b"\n"), (sent[:200], answer[:300])

    logged.assert_no_trouble()
    assert request(daemon.url, "/health")[0] == 200
    assert request(daemon.url, INFO)[0] == 200
    assert snapshot(place, os.path.join(place, "storage")) == before
    assert os.stat("/etc/passwd").st_mtime == passwd.st_mtime
    storage = os.path.join(place, "storage")
    assert os.listdir(os.path.join(storage, "tmp")) == [], "nothing left behind by requests cut short"
    assert set(os.listdir(storage)) <= {"blobs", "tmp", "index.sqlite", "index.sqlite-wal", "index.sqlite-shm",
                                        "scrub.position", "run"}
    for directory, _, files in os.walk(os.path.join(storage, "blobs")):
        for name in files:
            assert re.fullmatch(r"[0-9a-f]{64}(\.zst)?", name), name
            assert name.startswith(os.path.basename(directory))


# A misbehaving upstream.

@pytest.mark.parametrize(
    "fault, status, message",
    [
        ("half", 502, "upstream failure: upstream closed the connection after {half} of {whole} bytes"),
        ("reset", 502, "upstream failure: upstream reset the connection after {half} of {whole} bytes"),
        ("stall", 504, "upstream timeout: upstream sent nothing for 2 s after {half} of {whole} bytes"),
        ("500", 502, "upstream failure: upstream answered 500 for example.com/hello/@v/v1.0.0.zip"),
        ("garbage", 502, "upstream failure: upstream sent a malformed response before answering"),
        ("slow-too", 504, "upstream timeout: no response from upstream within 5 s"),
    ],
)
def test_a_misbehaving_upstream_is_a_clear_status_and_nothing_stored(
    daemon: Daemon, upstream: UpstreamFixture, place: str, fault: str, status: int, message: str
) -> None:
    logged = Logged(daemon)
    path = upstream_path(HELLO, "v1.0.0", "zip")
    whole = len(read_file(upstream, path))
    upstream.faults[path] = "slow" if fault == "slow-too" else fault
    upstream.slow_seconds = 6.0
    blobs = set(stored_blobs(place))
    try:
        code, headers, body = request(daemon.url, "/goproxy" + path)
    finally:
        upstream.faults.clear()
        upstream.slow_seconds = 3.0
    assert code == status
    assert headers["content-type"] == "text/plain; charset=utf-8"
    assert body.decode() == message.format(half=f"{whole // 2:,}", whole=f"{whole:,}") + "\n"
    assert set(stored_blobs(place)) == blobs
    assert os.listdir(os.path.join(place, "storage", "tmp")) == []
    logged.assert_no_trouble()


def test_a_slow_upstream_within_its_timeout_is_waited_for(daemon: Daemon, upstream: UpstreamFixture) -> None:
    path = upstream_path(HELLO, "v1.1.0", "zip")
    upstream.faults[path] = "slow"
    upstream.slow_seconds = 1.0
    try:
        code, headers, body = request(daemon.url, "/goproxy" + path)
    finally:
        upstream.faults.clear()
        upstream.slow_seconds = 3.0
    assert code == 200 and body == read_file(upstream, path) and headers["x-cache"] == "MISS"


# Clients that leave.

def leave_after(port: int, data: bytes, at: int, reset: bool) -> int:
    """
    Send C{data}, read C{at} bytes of the answer (at least its first), and
    close, or reset, the connection. Returns how many bytes were read.
    """
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.settimeout(30)
    try:
        s.connect(("127.0.0.1", port))
        s.sendall(data)
        got = 0
        while got < at:
            chunk = s.recv(min(65536, at - got))
            if not chunk:
                break
            got += len(chunk)
        if reset:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        return got
    finally:
        s.close()


def test_clients_that_leave_mid_download_are_counted_not_tracebacks(
    daemon: Daemon, upstream: UpstreamFixture
) -> None:
    path = path_of(BIG, "v1.0.0", "zip")
    code, _, body = request(daemon.url, path)
    assert code == 200 and len(body) > 8 * MiB
    aborts = metric(daemon, "contentcache_client_aborts_total", protocol="go")
    served = metric(daemon, "contentcache_requests_total", protocol="go", status_class="2xx", cache_result="hit")
    logged = Logged(daemon)
    rng = random.Random(11)
    get = f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode()
    cuts = [(rng.randrange(1, 256 * KiB), rng.random() < 0.5) for _ in range(1000)]
    with ThreadPoolExecutor(32) as pool:
        read = list(pool.map(lambda cut: leave_after(daemon.port, get, *cut), cuts))
        # HEADs abandoned, and pipelined requests whose client is gone.
        head = f"HEAD {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode()
        health = b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n" * 5
        list(pool.map(lambda i: leave_after(daemon.port, head if i % 2 else health, 1, bool(i % 3)), range(200)))
    assert all(n >= 1 for n in read), "each request was answered before its client left"

    time.sleep(1)
    assert metric(daemon, "contentcache_client_aborts_total", protocol="go") - aborts == 1000
    # Counted and logged once each, as hits whose client left.
    after = metric(daemon, "contentcache_requests_total", protocol="go", status_class="2xx", cache_result="hit")
    assert after - served >= 1000
    lines = logged.wait_for(f"GET {re.escape(path)} 200 hit ", 1000)
    assert len(lines) == 1000 and all(line.endswith("client left") for line in lines)
    logged.assert_no_trouble()
    code, _, again = request(daemon.url, path)
    assert code == 200 and again == body


def test_a_fetch_goes_on_for_the_others_when_one_client_leaves(daemon: Daemon, upstream: UpstreamFixture) -> None:
    logged = Logged(daemon)
    path = upstream_path(GREET, "v1.2.0", "zip")
    upstream.faults[path] = "slow"
    upstream.slow_seconds = 1.5
    results: list[tuple[int, dict[str, str], bytes]] = []
    try:
        waiter = threading.Thread(target=lambda: results.append(request(daemon.url, "/goproxy" + path)))
        with socket.create_connection(("127.0.0.1", daemon.port)) as leaver:
            leaver.sendall(f"GET /goproxy{path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            time.sleep(0.3)
            waiter.start()
            time.sleep(0.3)
        waiter.join(30)
    finally:
        upstream.faults.clear()
        upstream.slow_seconds = 3.0
    [(code, headers, body)] = results
    assert code == 200 and body == read_file(upstream, path)
    assert upstream.count(path) == 1
    assert request(daemon.url, "/goproxy" + path)[1]["x-cache"] == "HIT"
    logged.assert_no_trouble()


# Slow clients.

def test_slow_headers_are_cut_off_while_hits_go_on(daemon: Daemon) -> None:
    import selectors

    logged = Logged(daemon)
    trickle = b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: " + b"a" * 100
    sockets = []
    for _ in range(200):
        s = socket.create_connection(("127.0.0.1", daemon.port))
        s.setblocking(False)
        sockets.append((s, time.monotonic()))
    closed: dict[int, float] = {}
    hits: list[tuple[int, float]] = []
    stop = threading.Event()

    def hit() -> None:
        while not stop.is_set():
            started = time.monotonic()
            code = request(daemon.url, INFO)[0]
            hits.append((code, time.monotonic() - started))
            time.sleep(0.05)

    hitter = threading.Thread(target=hit)
    hitter.start()
    selector = selectors.DefaultSelector()
    for i, (s, _) in enumerate(sockets):
        selector.register(s, selectors.EVENT_READ, i)
    sent = 0
    next_byte = time.monotonic()
    deadline = time.monotonic() + HEADER_TIMEOUT + 5
    try:
        while len(closed) < len(sockets) and time.monotonic() < deadline:
            if time.monotonic() >= next_byte and sent < len(trickle):
                for i, (s, _) in enumerate(sockets):
                    if i not in closed:
                        try:
                            s.send(trickle[sent : sent + 1])
                        except OSError:
                            pass
                sent += 1
                next_byte += 0.5
            for key, _ in selector.select(timeout=0.05):
                i = key.data
                try:
                    data = key.fileobj.recv(4096)  # type: ignore[union-attr]
                except BlockingIOError:
                    continue
                except OSError:
                    data = b""
                if not data:
                    closed[i] = time.monotonic() - sockets[i][1]
                    selector.unregister(key.fileobj)
    finally:
        stop.set()
        hitter.join(30)
        selector.close()
        for s, _ in sockets:
            s.close()
    assert len(closed) == 200, f"{200 - len(closed)} slow connections still open"
    assert max(closed.values()) <= HEADER_TIMEOUT + 2
    assert min(closed.values()) >= HEADER_TIMEOUT - 0.5
    assert len(hits) >= 10 and all(code == 200 for code, _ in hits)
    # Hits as fast as ever while the slow ones trickle (the bound on the
    # slowest allows for a busy machine).
    assert sorted(seconds for _, seconds in hits)[len(hits) // 2] < 0.25
    assert max(seconds for _, seconds in hits) < 3.0
    logged.assert_no_trouble()


# Damaged blobs.

def blob_file(storage: str, key: str) -> str:
    db = sqlite3.connect(f"file:{os.path.join(storage, 'index.sqlite')}?mode=ro", uri=True)
    try:
        (hexhash,) = db.execute("SELECT hash FROM entries WHERE protocol = 'go' AND key = ?", (key,)).fetchone()
    finally:
        db.close()
    return os.path.join(storage, "blobs", hexhash[:2], hexhash)


def flip(file: str, at: int) -> None:
    with open(file, "r+b") as f:
        f.seek(at)
        byte = f.read(1)
        f.seek(at)
        f.write(bytes([byte[0] ^ 0x20]))


def test_flipped_bytes_are_never_served(daemon: Daemon, upstream: UpstreamFixture, place: str) -> None:
    logged = Logged(daemon)
    storage = os.path.join(place, "storage")
    info, archive = path_of(ROT, "v1.0.0", "info"), path_of(ROT, "v1.0.0", "zip")
    expected = {p: read_file(upstream, p.removeprefix("/goproxy")) for p in (info, archive)}
    for p in (info, archive):
        assert request(daemon.url, p)[2] == expected[p]
    read = metric(daemon, "contentcache_corrupt_blobs_total", found_by="read")
    streamed = metric(daemon, "contentcache_corrupt_blobs_total", found_by="stream")
    aborts = metric(daemon, "contentcache_client_aborts_total", protocol="go")
    for p, at in ((info, 5), (archive, len(expected[archive]) // 2)):
        flip(blob_file(storage, p.removeprefix("/goproxy/")), at)

    # The small one: checked before it is sent, and fetched again at once.
    code, headers, body = request(daemon.url, info)
    assert code == 200 and body == expected[info] and headers["x-cache"] == "MISS"
    assert upstream.count(info.removeprefix("/goproxy")) == 2

    # The large one: streamed, and cut off before its end.
    connection = http.client.HTTPConnection("127.0.0.1", daemon.port, timeout=30)
    try:
        connection.request("GET", archive)
        response = connection.getresponse()
        assert response.status == 200
        with pytest.raises(http.client.IncompleteRead) as cut:
            response.read()
        assert len(cut.value.partial) < len(expected[archive])
    finally:
        connection.close()
    code, headers, body = request(daemon.url, archive)
    assert code == 200 and body == expected[archive] and headers["x-cache"] == "MISS"
    assert upstream.count(archive.removeprefix("/goproxy")) == 2

    assert metric(daemon, "contentcache_corrupt_blobs_total", found_by="read") == read + 1
    assert metric(daemon, "contentcache_corrupt_blobs_total", found_by="stream") == streamed + 1
    assert logged.text().count("is damaged") == 2
    assert metric(daemon, "contentcache_client_aborts_total", protocol="go") == aborts, "the daemon cut it"
    assert logged.wait_for(rf"GET {re.escape(archive)} 200 hit \d+ .* cut off$")
    logged.assert_no_trouble()


def test_the_scrub_finds_damage_on_its_own(tmp_path: Any, upstream: UpstreamFixture) -> None:
    storage = str(tmp_path / "storage")
    daemon = Daemon(storage, ["--go-upstream", upstream.url, "--go-sumdb", "off", "--scrub-interval", "2s"])
    try:
        paths = [path_of(HELLO, "v1.0.0", ext) for ext in ("info", "mod", "zip")]
        for p in paths:
            assert request(daemon.url, p)[0] == 200
        logged = Logged(daemon)
        flip(blob_file(storage, paths[1].removeprefix("/goproxy/")), 3)
        deadline = time.monotonic() + 20
        while "found by the scrub" not in logged.text() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert "found by the scrub" in logged.text()
        assert metric(daemon, "contentcache_corrupt_blobs_total", found_by="scrub") == 1
        mod = read_file(upstream, paths[1].removeprefix("/goproxy"))
        code, headers, body = request(daemon.url, paths[1])
        assert code == 200 and body == mod and headers["x-cache"] == "MISS"
        assert request(daemon.url, paths[0])[1]["x-cache"] == "HIT"
        logged.assert_no_trouble()
    finally:
        daemon.stop()


# A full disk.

@pytest.fixture
def small_disk(tmp_path: Any) -> Iterator[str]:
    """
    An 8 MiB tmpfs (CI runs as root; elsewhere, sudo without a password).
    """
    mountpoint = str(tmp_path / "disk")
    os.mkdir(mountpoint)
    command = ["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", mountpoint]
    if os.geteuid() != 0:
        command = ["sudo", "-n", *command]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        pytest.fail(f"cannot mount a tmpfs for the full-disk test (run as root): {done.stderr.strip()}")
    yield mountpoint
    subprocess.run([*command[: command.index("mount")], "umount", "-l", mountpoint], check=False)


@pytest.fixture
def filler_upstream(tmp_path: Any) -> Iterator[tuple[UpstreamFixture, dict[str, str]]]:
    zips = build_payload_modules(str(tmp_path / "tree"), FILL, FILL_VERSIONS, MiB)
    fixture = UpstreamFixture(str(tmp_path / "tree"))
    yield fixture, zips
    fixture.stop()


def free_bytes(path: str) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def test_a_full_disk_is_507_until_there_is_room(
    small_disk: str, filler_upstream: tuple[UpstreamFixture, dict[str, str]]
) -> None:
    upstream, zips = filler_upstream
    storage = os.path.join(small_disk, "storage")
    filler = os.path.join(small_disk, "filler")
    with open(filler, "wb") as f:
        f.write(os.urandom(2 * MiB))
    body = {v: open(z, "rb").read() for v, z in zips.items()}
    options = ["--go-upstream", upstream.url, "--go-sumdb", "off", "--compression-level", "0"]
    daemon = Daemon(storage, [*options, "--min-free", "0"])
    try:
        logged = Logged(daemon)
        first = path_of(FILL, FILL_VERSIONS[0], "zip")
        assert request(daemon.url, first)[2] == body[FILL_VERSIONS[0]]
        failed = None
        for version in FILL_VERSIONS[1:10]:
            code, headers, answer = request(daemon.url, path_of(FILL, version, "zip"))
            if code == 507:
                failed = version
                break
            assert code == 200 and answer == body[version]
        assert failed is not None, "the disk never filled"
        assert headers["content-type"] == "text/plain; charset=utf-8"
        assert answer == (b"storage full: nothing new can be stored until there is room; "
                          b"cached content is still served\n")
        assert os.listdir(os.path.join(storage, "tmp")) == []
        assert not [n for _, _, names in os.walk(os.path.join(storage, "blobs")) for n in names if n.startswith(".")]

        code, headers, answer = request(daemon.url, first)
        assert code == 200 and answer == body[FILL_VERSIONS[0]] and headers["x-cache"] == "HIT"
        code, _, health = request(daemon.url, "/health")
        assert code == 200 and json.loads(health)["storage"] == "full"
        assert metric(daemon, "contentcache_storage_full") == 1
        assert metric(daemon, "contentcache_storage_free_bytes") < MiB

        os.unlink(filler)
        code, _, answer = request(daemon.url, path_of(FILL, failed, "zip"))
        assert code == 200 and answer == body[failed]
        assert json.loads(request(daemon.url, "/health")[2])["storage"] == "ok"
        assert metric(daemon, "contentcache_storage_full") == 0
        text = logged.text()
        assert text.count("storage is full (") == 1, "one warning, not one per failure"
        assert "storage has room again" in text
        logged.assert_no_trouble()
        assert daemon.terminate() == 0
    finally:
        daemon.stop()

    # With --min-free, expiry makes room by itself: at once when a write
    # finds the disk full, least recently used first.
    daemon = Daemon(storage, [*options, "--min-free", "3MiB", "--grace", "0s"])
    try:
        logged = Logged(daemon)
        served = 0
        for version in FILL_VERSIONS:
            for attempt in range(20):
                code, _, answer = request(daemon.url, path_of(FILL, version, "zip"))
                if code != 507:
                    break
                time.sleep(0.5)  # the pass that the full disk started
            assert code == 200 and answer == body[version], (version, code, answer[:100])
            served += 1
        assert served == len(FILL_VERSIONS)
        assert "starting an expiry pass now" in logged.text()
        assert free_bytes(small_disk) >= MiB
        # The oldest went first; the newest are still there. (A worker
        # that finds the disk full asks the one that runs expiry, which
        # looks a few times a second: its retries may fetch again.)
        fetched = upstream.count(upstream_path(FILL, FILL_VERSIONS[-1], "zip"))
        code, headers, _ = request(daemon.url, path_of(FILL, FILL_VERSIONS[-1], "zip"))
        assert code == 200 and headers["x-cache"] == "HIT"
        assert upstream.count(upstream_path(FILL, FILL_VERSIONS[-1], "zip")) == fetched
        logged.assert_no_trouble()
    finally:
        daemon.stop()
