"""
Put and get throughput of the content-addressable store.

Prints put and get throughput for 1 MiB and 64 MiB blobs on two backends:
the filesystem, next to a plain copy and a plain read of the same bytes on
the same filesystem, and S3 (a local SeaweedFS, C{weed mini} on
127.0.0.1), next to one botocore PUT and one GET of the same bytes.

Run it from the repository root::

    python bench/store.py            # full size, about half a minute
    python bench/store.py --quick    # a smoke run, about 15 seconds
    python bench/store.py --no-s3    # without SeaweedFS

Everything runs as the daemon runs it: the real reactor, and blocking file
and S3 work on the L{DiskPool} (its default size, the S3 client's
connection pool sized to it). The storage and SeaweedFS's data live in a
temporary directory that is always removed; SeaweedFS is always stopped.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from typing import Any, AsyncIterator, Awaitable, BinaryIO, Callable, Sequence

from attrs import frozen

# First: it puts the repository on the path for the tests' helpers.
from common import (
    MB, PART_SIZE, PUT_CHUNK, S3_PREFIX, MiB, Reactor, S3Server, check_dir, exact, make_store,
    print_setup, react_on_storage, start_disk_pool, store_parser,
)
from contentcache.pool import DiskPool
from contentcache.store import Blob, Store
from contentcache.web import CHUNK_SIZE

SIZES = (MiB, 64 * MiB)
QUICK_SIZES = (MiB, 8 * MiB)
#: A measurement repeats until it has taken this long (and at least
#: MIN_RUNS times) unless --repeat says how often.
TARGET_SECONDS = 1.0
QUICK_TARGET_SECONDS = 0.2
MIN_RUNS = 3


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


@frozen
class PlainFile:
    """
    The filesystem's yardstick: a plain copy of the source to C{path}, read
    back.
    """

    path: str
    put_name = "copy (read+write 1 MiB, fsync)"
    get_name = f"read (plain, {exact(CHUNK_SIZE)} reads)"

    def put(self, source: str) -> None:
        copy_file(source, self.path)

    def get(self) -> int:
        return read_file(self.path)

    def delete(self) -> None:
        os.unlink(self.path)


@frozen
class PlainS3:
    """
    S3's yardstick: the source as one object, C{key} in C{bucket}, written
    in one request and read back with botocore alone.
    """

    client: Any
    bucket: str
    key: str
    put_name = "S3 put_object (botocore, one request)"
    get_name = f"S3 get_object (botocore, {exact(CHUNK_SIZE)} reads)"

    def put(self, source: str) -> None:
        with open(source, "rb") as body:
            self.client.put_object(Bucket=self.bucket, Key=self.key, Body=body)

    def get(self) -> int:
        size = 0
        with self.client.get_object(Bucket=self.bucket, Key=self.key)["Body"] as body:
            while chunk := body.read(CHUNK_SIZE):
                size += len(chunk)
        return size

    def delete(self) -> None:
        self.client.delete_object(Bucket=self.bucket, Key=self.key)


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


async def read_blob(store: Store, blob: Blob) -> int:
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


#: The width of the operation column of the throughput table.
OPERATION = 48


def print_row(m: Measurement, yardstick: Measurement | None = None) -> None:
    share = "" if yardstick is None else f"{m.rate / yardstick.rate:8.0%}"
    print(f"  {exact(m.size):>7}  {m.operation:<{OPERATION}} {m.rate:9.1f} {len(m.times):6d}{share}")


async def noop() -> None:
    pass


@frozen
class Backend:
    """
    A store to measure, its name in the table, and the plain operations
    its put and get are compared with.
    """

    name: str
    store: Store
    plain: PlainFile | PlainS3


async def throughput(
    disk: DiskPool,
    workdir: str,
    sizes: Sequence[int],
    repeat: int | None,
    target: float,
    s3: S3Server | None,
) -> None:
    store = make_store(disk, os.path.join(workdir, "store"))
    await store.start()
    backends = [Backend("filesystem", store, PlainFile(os.path.join(workdir, "copy")))]
    if s3 is not None:
        client = s3.client()
        s3_store = make_store(disk, os.path.join(workdir, "s3-state"), s3, S3_PREFIX + "throughput/",
                              client=client)
        await s3_store.start()
        s3_plain = PlainS3(client, s3.bucket, S3_PREFIX + "plain")
        backends.append(Backend("S3", s3_store, s3_plain))
        # SeaweedFS makes its volumes on the first writes, and botocore
        # loads what it needs on its first calls of each kind: neither is
        # measured.
        warm = os.path.join(workdir, "warm-up")
        await disk.run(write_random, warm, PART_SIZE + MiB)
        for _ in range(2):
            await disk.run(s3_plain.put, warm)
            await disk.run(s3_plain.get)
            await disk.run(s3_plain.delete)
            result = await s3_store.put(file_chunks(disk, warm))
            await read_blob(s3_store, result.blob)
            await s3_store.delete(result.hash)
        await disk.run(os.unlink, warm)

    print()
    print(f"  {'blob':>7}  {'operation':<{OPERATION}} {'MB/s':>9} {'runs':>6} {'vs plain':>8}")
    for size in sizes:
        source = os.path.join(workdir, f"source-{size}")
        await disk.run(write_random, source, size)
        stored: dict[str, Blob] = {}

        for backend in backends:
            plain = backend.plain
            yardstick = await measure(
                plain.put_name, size, lambda: disk.run(plain.put, source),
                lambda: disk.run(plain.delete), repeat, target,
            )
            print_row(yardstick)

            async def put(backend: Backend = backend) -> None:
                result = await backend.store.put(file_chunks(disk, source))
                if not result.created or result.size != size:
                    raise RuntimeError(f"the put stored nothing new: {result}")
                stored[backend.name] = result.blob

            async def delete_blob(backend: Backend = backend) -> None:
                await backend.store.delete(stored[backend.name].hash)

            print_row(
                await measure(f"put {backend.name} (Store.put, 1 MiB chunks)", size, put,
                              delete_blob, repeat, target),
                yardstick,
            )
            await put()

        for backend in backends:
            plain = backend.plain
            await disk.run(plain.put, source)
            yardstick = await measure(plain.get_name, size, lambda: disk.run(plain.get), noop,
                                      repeat, target)
            await disk.run(plain.delete)
            print_row(yardstick)

            async def get(backend: Backend = backend) -> None:
                if await read_blob(backend.store, stored[backend.name]) != size:
                    raise RuntimeError("the blob read back short")

            print_row(
                await measure(f"get {backend.name} (Store.get, {exact(CHUNK_SIZE)} reads)", size,
                              get, noop, repeat, target),
                yardstick,
            )
            await backend.store.delete(stored[backend.name].hash)
        await disk.run(os.unlink, source)


# The run.


async def benchmark(reactor: Reactor, workdir: str, args: argparse.Namespace, s3: S3Server | None) -> None:
    sizes = QUICK_SIZES if args.quick else SIZES
    target = QUICK_TARGET_SECONDS if args.quick else TARGET_SECONDS
    print_setup("store throughput benchmark", workdir, args.quick, reactor, s3)
    print(f"  runs: {args.repeat if args.repeat else f'at least {MIN_RUNS} and {target:g} s'}"
          " per line; MB/s = 10^6 bytes/s at the median run")
    print("  put: every run stores new content: the blob is deleted (untimed) after each run,")
    print("       so dedup never skips a write; the source file is read on the disk pool;")
    print("       random bytes, compression off (the daemon's default level would try 64 KiB and")
    print("       store them as they came)")
    print("  copy/read: the same bytes, plain Python file I/O, one call on the disk pool")
    if s3 is not None:
        print("  S3 put_object/get_object: the same bytes, botocore alone, one request, one call on")
        print("       the disk pool; the S3 store spools to local disk first, then uploads")
        print(f"       (one PUT up to {exact(PART_SIZE)}, a multipart upload above, one part at a time)")
    disk = start_disk_pool(reactor)
    await throughput(disk, workdir, sizes, args.repeat, target, s3)


def main(argv: Sequence[str] | None = None) -> None:
    parser = store_parser(__doc__, "smaller sizes, for a smoke run",
                          "time every operation N times (default: for about 1 s each)")
    react_on_storage(benchmark, check_dir(parser, parser.parse_args(argv)))


if __name__ == "__main__":
    main()
