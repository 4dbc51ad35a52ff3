"""
Throughput and memory of the content-addressable store.

Prints put and get throughput for 1 MiB and 64 MiB blobs next to a plain
copy and a plain read of the same bytes on the same filesystem, then puts a
1 GiB blob and streams it out over HTTP on 127.0.0.1 in a fresh process and
checks that its peak RSS stays under 64 MiB above the baseline.

Run it from the repository root::

    python bench/store.py            # full size, under half a minute
    python bench/store.py --quick    # a smoke run

Everything runs as the daemon runs it: the real reactor, blocking file work
on the L{DiskPool}, and L{send_blob}'s push producer for the HTTP stream.
The storage lives in a temporary directory that is always removed.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from typing import AsyncIterator, Awaitable, BinaryIO, Callable, Iterator, Sequence

import treq
from attrs import frozen
from treq.client import HTTPClient
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.task import react
from twisted.internet.utils import getProcessOutputAndValue
from twisted.python.failure import Failure
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.http import OK
from twisted.web.resource import Resource
from twisted.web.server import Request, Site

from common import (
    LOOPBACK, GiB, KiB, MiB, Reactor, add_dir_option, check_dir, filesystem_store,
    fresh_process, make_parser, max_rss_kib, mib, print_inherited, rss_baseline, show_warnings,
    start_disk_pool, status_kib, temporary_directory,
)
from contentcache.hash import Hash, Hasher, InvalidHash
from contentcache.pool import DEFAULT_THREADS, DiskPool
from contentcache.store import Store
from contentcache.web import CHUNK_SIZE, handle, not_found, send_blob

#: Throughput is reported in decimal megabytes per second.
MB = 1000 * 1000

SIZES = (MiB, 64 * MiB)
QUICK_SIZES = (MiB, 8 * MiB)
BIG_SIZE = GiB
QUICK_BIG_SIZE = 256 * MiB
#: The bound on peak RSS above the baseline while a big blob goes in and out.
RSS_LIMIT = 64 * MiB

#: How much one read of the source takes while putting: an upstream body
#: arrives in pieces of about this size once spooled.
PUT_CHUNK = MiB
#: A measurement repeats until it has taken this long (and at least
#: MIN_RUNS times) unless --repeat says how often.
TARGET_SECONDS = 1.0
QUICK_TARGET_SECONDS = 0.2
MIN_RUNS = 3

OCTET_STREAM = b"application/octet-stream"
WARM_UP = b"warm-up: load every code path before the baseline is taken\n"


def human(size: int) -> str:
    """
    C{size} bytes in the largest unit that divides it: the sizes here are
    chosen round, and a line says exactly how big its blob is.
    """
    for unit, name in ((GiB, "GiB"), (MiB, "MiB"), (KiB, "KiB")):
        if size >= unit and size % unit == 0:
            return f"{size // unit} {name}"
    return f"{size} B"


async def open_store(reactor: Reactor, directory: str) -> tuple[DiskPool, Store]:
    """
    A disk pool and a filesystem store wired as C{makeService} wires them.
    The pool stops when the reactor does, however it stops.
    """
    disk = start_disk_pool(reactor)
    store = filesystem_store(directory, disk)
    await store.start()
    return disk, store


# Plain file operations, the yardstick: each runs as one call on the pool.


def write_random(path: str, size: int) -> None:
    with open(path, "wb") as target:
        for offset in range(0, size, PUT_CHUNK):
            target.write(os.urandom(min(PUT_CHUNK, size - offset)))


def copy_file(source: str, target: str) -> None:
    """
    Copy as a careful program would: 1 MiB reads and writes, then fsync,
    since a put makes its blob durable too.
    """
    with open(source, "rb") as src, open(target, "xb") as dst:
        while chunk := src.read(PUT_CHUNK):
            dst.write(chunk)
        dst.flush()
        os.fsync(dst.fileno())


def read_file(path: str) -> int:
    size = 0
    with open(path, "rb") as src:
        while chunk := src.read(CHUNK_SIZE):
            size += len(chunk)
    return size


def open_for_reading(path: str) -> BinaryIO:
    return open(path, "rb")


async def file_chunks(disk: DiskPool, path: str) -> AsyncIterator[bytes]:
    """
    A file's content in L{PUT_CHUNK} pieces, every read on the disk pool.
    """
    handle = await disk.run(open_for_reading, path)
    try:
        while chunk := await disk.run(handle.read, PUT_CHUNK):
            yield chunk
    finally:
        await disk.run(handle.close)


def generated_chunks(size: int) -> Iterator[bytes]:
    """
    C{size} bytes of incompressible content in L{PUT_CHUNK} pieces without
    ever holding more than two of them: one random block, each chunk
    prefixed with its index so no two chunks are equal.
    """
    block = memoryview(os.urandom(PUT_CHUNK))
    for index, offset in enumerate(range(0, size, PUT_CHUNK)):
        length = min(PUT_CHUNK, size - offset)
        yield index.to_bytes(8, "big") + block[8:length]


async def read_blob(store: Store, blob: Hash) -> int:
    """
    Read a blob to its end in the chunks that L{send_blob} reads.
    """
    reader = await store.get(blob)
    size = 0
    try:
        while chunk := await reader.read(CHUNK_SIZE):
            size += len(chunk)
    finally:
        await reader.close()
    return size


@frozen
class Measurement:
    operation: str
    size: int
    #: Seconds per run.
    times: tuple[float, ...]

    @property
    def rate(self) -> float:
        """
        Megabytes per second at the median run time.
        """
        return self.size / statistics.median(self.times) / MB


async def measure(
    operation: str,
    size: int,
    run: Callable[[], Awaitable[object]],
    reset: Callable[[], Awaitable[object]],
    repeat: int | None,
    target: float,
) -> Measurement:
    """
    Time C{run} again and again, calling C{reset} (untimed) after each run:
    C{repeat} times, or until C{target} seconds have passed.
    """
    times: list[float] = []
    started = time.perf_counter()
    while True:
        before = time.perf_counter()
        await run()
        times.append(time.perf_counter() - before)
        await reset()
        if repeat is not None:
            if len(times) >= repeat:
                break
        elif len(times) >= MIN_RUNS and time.perf_counter() - started >= target:
            break
    return Measurement(operation, size, tuple(times))


def print_row(m: Measurement, yardstick: Measurement | None = None) -> None:
    share = "" if yardstick is None else f"{m.rate / yardstick.rate:8.0%}"
    print(f"  {human(m.size):>7}  {m.operation:<40} {m.rate:9.1f} {len(m.times):6d}{share}")


async def noop() -> None:
    pass


async def throughput(
    reactor: Reactor, workdir: str, sizes: Sequence[int], repeat: int | None, target: float
) -> None:
    disk, store = await open_store(reactor, os.path.join(workdir, "store"))
    copy = os.path.join(workdir, "copy")

    async def remove_copy() -> None:
        await disk.run(os.unlink, copy)

    print()
    print(f"  {'blob':>7}  {'operation':<40} {'MB/s':>9} {'runs':>6} {'vs plain':>8}")
    for size in sizes:
        source = os.path.join(workdir, f"source-{size}")
        await disk.run(write_random, source, size)
        stored: list[Hash] = []

        async def put() -> None:
            result = await store.put(file_chunks(disk, source))
            if not result.created or result.size != size:
                raise RuntimeError(f"the put stored nothing new: {result}")
            stored.append(result.hash)

        async def delete_blob() -> None:
            await store.delete(stored[-1])

        async def get() -> None:
            if await read_blob(store, stored[-1]) != size:
                raise RuntimeError("the blob read back short")

        plain_copy = await measure(
            "copy (read+write 1 MiB, fsync)", size,
            lambda: disk.run(copy_file, source, copy), remove_copy, repeat, target,
        )
        print_row(plain_copy)
        print_row(
            await measure("put (Store.put, 1 MiB chunks)", size, put, delete_blob, repeat, target),
            plain_copy,
        )
        await put()
        plain_read = await measure(
            f"read (plain, {human(CHUNK_SIZE)} reads)", size,
            lambda: disk.run(read_file, source), noop, repeat, target,
        )
        print_row(plain_read)
        got = await measure(
            f"get (Store.get, {human(CHUNK_SIZE)} reads)", size, get, noop, repeat, target
        )
        print_row(got, plain_read)
        await delete_blob()
        await disk.run(os.unlink, source)


class BlobResource(Resource):
    """
    Serve C{GET /<hash>} from the store with L{send_blob}, as the protocol
    adapters do, and keep each request's L{Request.notifyFinish}.
    """

    isLeaf = True

    def __init__(self, store: Store) -> None:
        super().__init__()
        self._store = store
        self.finished: list[Deferred[None]] = []

    def render_GET(self, request: Request) -> object:
        self.finished.append(request.notifyFinish())
        return handle(request, lambda: self._serve(request))

    async def _serve(self, request: Request) -> None:
        try:
            blob = Hash.from_hex((request.postpath or [])[0].decode("ascii"))
        except (IndexError, UnicodeDecodeError, InvalidHash):
            raise not_found() from None
        size = await self._store.size(blob)
        if size is None:
            raise not_found()
        await send_blob(request, self._store, blob, size, OCTET_STREAM)


async def fetch(client: HTTPClient, url: str, served: BlobResource) -> tuple[int, Hash]:
    """
    GET C{url} and read the body as it arrives, keeping only its size and
    hash; fire once the server has finished the response too.
    """
    response = await client.get(url, unbuffered=True)
    if response.code != OK:
        raise RuntimeError(f"GET {url} answered {response.code}")
    hasher = Hasher()
    await treq.collect(response, hasher.update)
    await served.finished[-1]
    return hasher.size, hasher.finish()


async def big_blob(reactor: Reactor, workdir: str, size: int) -> None:
    """
    In a fresh process: put a blob of C{size} bytes, stream it out over
    HTTP, and report the peak RSS above the baseline. Exits with status 1
    when the peak is over the bound.
    """
    _, store = await open_store(reactor, workdir)
    served = BlobResource(store)
    port = await TCP4ServerEndpoint(reactor, 0, interface=LOOPBACK).listen(Site(served))
    connections = HTTPConnectionPool(reactor)
    client = HTTPClient(Agent(reactor, pool=connections))
    base = f"http://{LOOPBACK}:{port.getHost().port}/"
    try:
        warm = await store.put([WARM_UP])
        await fetch(client, base + warm.hash.hex, served)
        baseline, inherited = rss_baseline()

        started = time.perf_counter()
        put = await store.put(generated_chunks(size))
        put_seconds = time.perf_counter() - started

        started = time.perf_counter()
        received, digest = await fetch(client, base + put.hash.hex, served)
        get_seconds = time.perf_counter() - started

        peak = max_rss_kib()
        high_water = status_kib("VmHWM")
    finally:
        await connections.closeCachedConnections()
        await port.stopListening()

    if received != size or digest != put.hash:
        raise RuntimeError(f"served {received} bytes hashing to {digest}, not the blob put")
    above = peak - baseline
    passed = above * KiB < RSS_LIMIT
    print("  baseline RSS (after imports, reactor, pool, store, server, one warm-up GET):",
          mib(baseline))
    print(f"  put    {human(size)} (Store.put, generated 1 MiB chunks): "
          f"{put_seconds:6.2f} s {size / put_seconds / MB:8.1f} MB/s")
    print(f"  stream {human(size)} (send_blob -> treq unbuffered, {LOOPBACK}): "
          f"{get_seconds:6.2f} s {size / get_seconds / MB:8.1f} MB/s, content verified")
    print(f"  peak RSS (ru_maxrss): {mib(peak)} = baseline + {mib(above)}"
          f" (VmHWM {mib(high_water)})")
    print_inherited(inherited, baseline, "  ")
    verdict = "PASS" if passed else "FAIL"
    print(f"  {verdict}: {mib(above)} above the baseline, the bound is {human(RSS_LIMIT)}")
    if not passed:
        raise SystemExit(1)


async def run_child(reactor: Reactor, workdir: str, quick: bool) -> int:
    """
    Run L{big_blob} in a fresh Python process, so that the measurements
    made here do not raise its peak, and print what it printed.
    """
    quick_args = ["--quick"] if quick else []
    command = fresh_process(__file__, "--big-blob", workdir, *quick_args)
    ran: Deferred[tuple[bytes, bytes, int]] = getProcessOutputAndValue(
        command[0], command[1:], env=os.environ, reactor=reactor
    )
    ran.addErrback(killed)
    out, err, code = await ran
    sys.stdout.write(out.decode("utf-8", "replace"))
    sys.stderr.write(err.decode("utf-8", "replace"))
    return int(code)


def killed(failure: Failure) -> tuple[bytes, bytes, int]:
    # getProcessOutputAndValue fails with a bare tuple, not an exception,
    # when the process dies of a signal.
    out, err, signal = failure.value
    return out, err + b"the measuring process was killed by signal %d\n" % signal, 1


async def benchmark(reactor: Reactor, workdir: str, args: argparse.Namespace) -> None:
    sizes = QUICK_SIZES if args.quick else SIZES
    big = QUICK_BIG_SIZE if args.quick else BIG_SIZE
    target = QUICK_TARGET_SECONDS if args.quick else TARGET_SECONDS
    print(f"contentcache store benchmark{' (--quick)' if args.quick else ''}")
    print(f"  storage: {workdir} (removed at the end)")
    print(f"  Python {platform.python_version()}, {os.cpu_count()} CPUs, "
          f"disk pool of {DEFAULT_THREADS} threads, reactor {type(reactor).__name__}")
    print(f"  runs: {args.repeat if args.repeat else f'at least {MIN_RUNS} and {target:g} s'}"
          " per line; MB/s = 10^6 bytes/s at the median run")
    print("  put: every run stores new content: the blob is deleted (untimed) after each run,")
    print("       so dedup never skips a write; the source file is read on the disk pool")
    print("  copy/read: the same bytes, plain Python file I/O, one call on the disk pool")
    await throughput(reactor, workdir, sizes, args.repeat, target)

    print()
    print(f"{human(big)} blob in a fresh process:")
    code = await run_child(reactor, os.path.join(workdir, "big"), args.quick)
    if code:
        raise SystemExit(code)


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = make_parser(__doc__)
    add_dir_option(parser, "storage directory")
    parser.add_argument("--quick", action="store_true", help="smaller sizes, for a smoke run")
    parser.add_argument(
        "--repeat", type=int, metavar="N",
        help="time every operation N times (default: for about 1 s each)",
    )
    # Runs the child process that measures memory, storing under DIR.
    parser.add_argument("--big-blob", metavar="DIR", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.repeat is not None and args.repeat < 1:
        parser.error("--repeat needs a positive number")
    return check_dir(parser, args)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse(argv)
    show_warnings()
    if args.big_blob:
        size = QUICK_BIG_SIZE if args.quick else BIG_SIZE
        react(big_blob, (args.big_blob, size))
    else:
        with temporary_directory(args.dir) as workdir:
            react(benchmark, (workdir, args))


if __name__ == "__main__":
    main()
