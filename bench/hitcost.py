"""
What a cached hit costs the daemon itself, counted in instructions.

Throughput on a shared 2-core machine drifts by a factor of two within an
hour; the work one hit does does not. This replays cached GOPROXY hits (a
version's C{.info}, and a 1 MiB C{.zip} of random bytes) through the
daemon's own site, channel and resources on one connection, with the disk
pool's calls run at once on the same thread (C{SynchronousRunner}) and no
reactor, so that everything a hit does happens in the counted thread: the
HTTP parsing, the index lookup, the read and the check of the blob, the
response, the access log line (formatted as the daemon does, written to
/dev/null) and the metrics.

With C{--callgrind} it runs itself under valgrind twice, with the requests
and with none, and prints the instructions per request (the difference over
the count): repeatable to a fraction of a per cent, whatever else the
machine does. Without it, it prints the CPU time per request, which is not.
Compare two checkouts by running each one's copy. BLAKE3's vector code
counts as more instructions than it takes time, so a large blob's hashing
weighs more here than in seconds (about 0.12 ms a MiB at 8 GB/s here).

    python bench/hitcost.py --callgrind            # under a minute
    python bench/hitcost.py --what zip --requests 50 --callgrind
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Any, Sequence

import common  # noqa: F401  (puts the repository on the path)
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import globalLogBeginner

from contentcache.backend.filesystem import FilesystemBackend
from contentcache.cache import ProtocolCache
from contentcache.hot import DEFAULT_SIZE, HotSet
from contentcache.units import parse_size
from contentcache.channel import Deadlines
from contentcache.index import SQLiteIndex
from contentcache.logs import observer_factory
from contentcache.pool import SynchronousRunner
from contentcache.protocol.goproxy.resource import GoProxy, GoProxyResource
from contentcache.server import CacheSite, Root
from contentcache.store import Store
from contentcache.upstream import NegativeCache

KEY = "example.com/bench/@v/v1.0.0"
INFO = b'{"Version":"v1.0.0","Time":"2024-01-02T03:04:05Z"}'


def _resolve(d: Deferred[Any]) -> Any:
    results: list[Any] = []
    d.addBoth(results.append)
    return results[0]


def replay(what: str, requests: int, directory: str, memory: int = DEFAULT_SIZE) -> float:
    """
    Serve C{requests} cached hits of C{what}; the CPU seconds they took.
    """
    # The daemon's own observer, as twistd builds it, writing to /dev/null.
    observer = observer_factory("text", "info", stream=open(os.devnull, "w"))()
    globalLogBeginner.beginLoggingTo([observer], redirectStandardIO=False)
    disk, clock = SynchronousRunner(), Clock()
    store = Store(FilesystemBackend(directory, disk), os.path.join(directory, "tmp"), disk)
    _resolve(Deferred.fromCoroutine(store.start()))
    index = SQLiteIndex(directory, disk, clock)
    index.open()
    body = INFO if what == "info" else os.urandom(1 << 20)
    put = _resolve(Deferred.fromCoroutine(store.put([body])))
    _resolve(index.put("go", f"{KEY}.{what}", put.blob, {}))
    hot = HotSet(memory)  # the daemon's default, or --memory-cache
    proxy = GoProxy(
        store, ProtocolCache("go", index, store, clock, NegativeCache(clock, 60), hot),
        ProtocolCache("gosumdb", index, store, clock, NegativeCache(clock, 60), hot), disk, clock, upstream=None,
    )
    site = CacheSite(Root(store, index, {b"goproxy": GoProxyResource(proxy)}), Deadlines(), reactor=clock)
    site.startFactory()
    channel = site.buildProtocol(None)
    transport = StringTransport(
        peerAddress=IPv4Address("TCP", "127.0.0.1", 40000), hostAddress=IPv4Address("TCP", "127.0.0.1", 8080)
    )
    channel.makeConnection(transport)
    request = f"GET /goproxy/{KEY}.{what} HTTP/1.1\r\nHost: 127.0.0.1:8080\r\n\r\n".encode()
    started = time.process_time()
    for i in range(requests):
        channel.dataReceived(request)
        if i == 0 and not (transport.value().startswith(b"HTTP/1.1 200 ") and transport.value().endswith(body)):
            raise SystemExit(f"the first hit was not the blob: {transport.value()[:200]!r}")
        transport.clear()
    site.access.flush()
    return time.process_time() - started


def instructions(what: str, requests: int, memory: int) -> int:
    """
    The instructions callgrind counts for the whole process.
    """
    handle, out = tempfile.mkstemp(prefix="hitcost-callgrind-")
    os.close(handle)
    try:
        done = subprocess.run(
            ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", sys.executable,
             os.path.abspath(__file__), "--what", what, "--requests", str(requests), "--memory-cache", str(memory)],
            capture_output=True, text=True, env={**os.environ, "PYTHONMALLOC": "malloc"},
        )
    finally:
        if os.path.exists(out):
            os.unlink(out)
    m = re.search(r"Collected : (\d+)", done.stderr)
    if done.returncode != 0 or m is None:
        raise SystemExit(f"valgrind failed:\n{done.stderr[-2000:]}")
    return int(m[1])


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--what", choices=["info", "zip"], default="info", help="the cached file (default info)")
    parser.add_argument("--requests", type=int, default=None,
                        help="hits to replay (default: 400 for .info, 40 for .zip; 5,000 and 300 without --callgrind)")
    parser.add_argument("--callgrind", action="store_true", help="count instructions under valgrind")
    parser.add_argument("--memory-cache", type=parse_size, default=DEFAULT_SIZE,
                        help="the in-memory hot set's size, as the daemon's option (default 256MiB; 0: off)")
    args = parser.parse_args(argv)
    if args.callgrind and shutil.which("valgrind") is None:
        parser.error("--callgrind needs valgrind (Debian: apt-get install valgrind)")
    if args.callgrind:
        requests = args.requests or (400 if args.what == "info" else 40)
        memory = args.memory_cache
        per_request = (instructions(args.what, requests, memory) - instructions(args.what, 0, memory)) / requests
        print(f"cached .{args.what} hit: {per_request:,.0f} instructions a request "
              f"(callgrind, {requests} requests, less the same run with none)")
        return
    requests = args.requests if args.requests is not None else (5000 if args.what == "info" else 300)
    with tempfile.TemporaryDirectory(prefix="contentcache-hitcost-") as directory:
        seconds = replay(args.what, requests, directory, args.memory_cache)
    if requests:
        print(f"cached .{args.what} hit: {seconds / requests * 1e6:.1f} us of CPU a request ({requests} requests)")


if __name__ == "__main__":
    main()
