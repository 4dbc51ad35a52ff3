"""
Peak RSS of the store while a big blob goes in and streams out over HTTP.

In a fresh process per backend, it puts a big blob into the store and
streams it out over HTTP on 127.0.0.1 with L{send_blob}, and checks that
the process's peak RSS stays under 64 MiB above the baseline: 1 GiB on
the filesystem, 256 MiB on S3 (a local SeaweedFS, C{weed mini} on
127.0.0.1). Exits with status 1 on a FAIL, once both are printed.

Run it from the repository root::

    python bench/streaming.py            # full size, about half a minute
    python bench/streaming.py --quick    # a smoke run, about 15 seconds
    python bench/streaming.py --no-s3    # without SeaweedFS

Everything runs as the daemon runs it: the real reactor, blocking file and
S3 work on the L{DiskPool}, and L{send_blob}'s push producer for the HTTP
stream. The storage and SeaweedFS's data live in a temporary directory
that is always removed; SeaweedFS is always stopped.
"""

from __future__ import annotations

import argparse
import itertools
import os
import subprocess
import sys
import time
from typing import Iterator, Sequence

import treq
from treq.client import HTTPClient
from twisted.internet import reactor as global_reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.task import react
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.http import NOT_FOUND, OK
from twisted.web.resource import Resource
from twisted.web.server import Request, Site

# First: it puts the repository on the path for the tests' helpers.
from common import (
    LOOPBACK, MB, PART_SIZE, PUT_CHUNK, S3_PREFIX, GiB, KiB, MiB, Reactor, S3Server, check_dir,
    exact, fresh_process, make_store, max_rss_kib, mib, print_inherited, print_setup,
    print_total_time, rss_baseline, show_warnings, start_disk_pool, status_kib, storage,
    store_parser,
)
from contentcache.hash import Hash, Hasher, InvalidHash
from contentcache.store import Blob, Store
from contentcache.web import CHUNK_SIZE, HTTPError, handle, send_blob

BIG_SIZE = GiB
QUICK_BIG_SIZE = 256 * MiB
#: Through S3 the big blob goes up part after part: 256 MiB is 16 parts,
#: enough to see whether memory stays bounded, in a few seconds.
S3_BIG_SIZE = 256 * MiB
QUICK_S3_BIG_SIZE = 64 * MiB
#: The bound on peak RSS above the baseline while a big blob goes in and out.
RSS_LIMIT = 64 * MiB

OCTET_STREAM = b"application/octet-stream"
WARM_UP = b"warm-up: load every code path before the baseline is taken\n"


# The fresh process: a big blob in and out.


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


class BlobResource(Resource):
    """
    Serve C{GET /<hash>} from the store with L{send_blob}, as the protocol
    adapters do (the blobs it knows standing in for the index), and keep
    each request's L{Request.notifyFinish}.
    """

    isLeaf = True

    def __init__(self, store: Store) -> None:
        super().__init__()
        self._store = store
        self.blobs: dict[Hash, Blob] = {}
        self.finished: list[Deferred[None]] = []

    def render_GET(self, request: Request) -> object:
        self.finished.append(request.notifyFinish())
        return handle(request, lambda: self._serve(request))

    async def _serve(self, request: Request) -> None:
        try:
            blob = self.blobs[Hash.from_hex((request.postpath or [])[0].decode("ascii"))]
        except (IndexError, UnicodeDecodeError, InvalidHash, KeyError):
            raise HTTPError(NOT_FOUND, "not found") from None
        await send_blob(request, self._store, blob, OCTET_STREAM)


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


async def big_blob(reactor: Reactor, workdir: str, size: int, s3: S3Server | None) -> None:
    """
    In a fresh process: put a blob of C{size} bytes, stream it out over
    HTTP, and report the peak RSS above the baseline. Exits with status 1
    when the peak is over the bound.
    """
    store = make_store(start_disk_pool(reactor), workdir, s3, S3_PREFIX + "big/")
    await store.start()
    served = BlobResource(store)
    port = await TCP4ServerEndpoint(reactor, 0, interface=LOOPBACK).listen(Site(served))
    connections = HTTPConnectionPool(reactor)
    client = HTTPClient(Agent(reactor, pool=connections))
    base = f"http://{LOOPBACK}:{port.getHost().port}/"
    try:
        # A warm-up as big as a part: the first multipart upload and the
        # first streamed read load their code (and botocore its models).
        warm_up = generated_chunks(PART_SIZE + CHUNK_SIZE) if s3 else ()
        warm = await store.put(itertools.chain([WARM_UP], warm_up))
        served.blobs[warm.hash] = warm.blob
        await fetch(client, base + warm.hash.hex, served)
        await store.delete(warm.hash)
        baseline, inherited = rss_baseline()

        started = time.perf_counter()
        put = await store.put(generated_chunks(size))
        put_seconds = time.perf_counter() - started
        served.blobs[put.hash] = put.blob

        started = time.perf_counter()
        received, digest = await fetch(client, base + put.hash.hex, served)
        get_seconds = time.perf_counter() - started

        peak = max_rss_kib()
        high_water = status_kib("VmHWM")
        await store.delete(put.hash)
    finally:
        await connections.closeCachedConnections()
        await port.stopListening()

    if received != size or digest != put.hash:
        raise RuntimeError(f"served {received} bytes hashing to {digest}, not the blob put")
    above = peak - baseline
    passed = above * KiB < RSS_LIMIT
    where = "filesystem" if s3 is None else f"S3, {exact(PART_SIZE)} parts"
    print("  baseline RSS (after imports, reactor, pool, store, server, one warm-up GET):",
          mib(baseline))
    print(f"  put    {exact(size)} (Store.put, generated 1 MiB chunks, {where}): "
          f"{put_seconds:6.2f} s {size / put_seconds / MB:8.1f} MB/s")
    print(f"  stream {exact(size)} (send_blob -> treq unbuffered, {LOOPBACK}): "
          f"{get_seconds:6.2f} s {size / get_seconds / MB:8.1f} MB/s, content verified")
    print(f"  peak RSS (ru_maxrss): {mib(peak)} = baseline + {mib(above)}"
          f" (VmHWM {mib(high_water)})")
    print_inherited(inherited, baseline, "  ")
    verdict = "PASS" if passed else "FAIL"
    print(f"  {verdict}: {mib(above)} above the baseline, the bound is {exact(RSS_LIMIT)}")
    if not passed:
        raise SystemExit(1)


def run_child(workdir: str, quick: bool, s3: S3Server | None) -> bool:
    """
    Run L{big_blob} in a fresh Python process (see L{LAUNCHER}), so that
    the peak it measures is its own, and say whether it passed.
    """
    extra = ["--quick"] if quick else []
    if s3 is not None:
        extra += ["--s3-endpoint", s3.endpoint, "--s3-bucket", s3.bucket, "--s3-region", s3.region]
    sys.stdout.flush()
    code = subprocess.call(fresh_process(__file__, "--big-blob", workdir, *extra))
    if code < 0:
        print(f"the measuring process was killed by signal {-code}", file=sys.stderr)
    return code == 0


# The run.


def benchmark(workdir: str, args: argparse.Namespace, s3: S3Server | None) -> int:
    big = QUICK_BIG_SIZE if args.quick else BIG_SIZE
    s3_big = QUICK_S3_BIG_SIZE if args.quick else S3_BIG_SIZE
    started = time.perf_counter()
    # The reactor each fresh process runs.
    print_setup("streaming benchmark", workdir, args.quick, global_reactor, s3)
    print()
    print(f"{exact(big)} blob in a fresh process, filesystem:")
    passed = run_child(os.path.join(workdir, "big"), args.quick, None)
    if s3 is not None:
        print()
        print(f"{exact(s3_big)} blob in a fresh process, S3:")
        passed = run_child(os.path.join(workdir, "big-s3"), args.quick, s3) and passed
    print_total_time(started)
    return 0 if passed else 1


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = store_parser(__doc__, "smaller blobs, for a smoke run")
    # Run the child process that measures memory, storing under DIR (and
    # in S3 at the endpoint, with the credentials in the environment).
    parser.add_argument("--big-blob", metavar="DIR", help=argparse.SUPPRESS)
    parser.add_argument("--s3-endpoint", help=argparse.SUPPRESS)
    parser.add_argument("--s3-bucket", help=argparse.SUPPRESS)
    parser.add_argument("--s3-region", help=argparse.SUPPRESS)
    return check_dir(parser, parser.parse_args(argv))


def main(argv: Sequence[str] | None = None) -> None:
    args = parse(argv)
    show_warnings()
    if args.big_blob:
        s3 = None
        if args.s3_endpoint:
            s3 = S3Server(args.s3_endpoint, args.s3_bucket, args.s3_region)
            size = QUICK_S3_BIG_SIZE if args.quick else S3_BIG_SIZE
        else:
            size = QUICK_BIG_SIZE if args.quick else BIG_SIZE
        react(big_blob, (args.big_blob, size, s3))
    with storage(args) as (workdir, s3):
        status = benchmark(workdir, args, s3)
    raise SystemExit(status)


if __name__ == "__main__":
    main()
