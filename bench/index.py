"""
The index on SQLite against the index on PostgreSQL, in the daemon as users
start it: the latency of a miss and of a cold hit with each, and the
cold-hit throughput of two nodes on one PostgreSQL database against one.

    .venv/bin/python bench/index.py [--seconds N] [--requests N] [--dir DIR]

Each daemon runs one worker with the in-memory hot set off
(C{--memory-cache 0}), so that every hit asks the index: what is measured
is the index, not memory. A miss fetches a small C{.info} from an upstream
fixture on 127.0.0.1, stores it and records it; a cold hit asks the index
for the entry and reads the blob from disk. The blobs are on the local
filesystem in every case (S3 would measure S3). The two nodes share one
storage directory and one database, as several daemons on one machine may;
they and wrk share this machine's cores, so the throughput ratio says how
much the shared database holds them back here, not what two machines give.

PostgreSQL is Debian's, started by the tests' own fixture in a temporary
directory (fsync off, as for tests: commits here cost no disk flush, which
a production server would add to a miss).
"""

from __future__ import annotations

import http.client
import os
import shutil
import statistics
import sys
import threading
import time
from contextlib import ExitStack

from common import (
    LOOPBACK,
    Wrk,
    add_dir_option,
    human,
    make_parser,
    start_daemon,
    temporary_directory,
)

from contentcache.protocol.goproxy.paths import escape
from tests.gomodules import build_payload_modules
from tests.postgres import start_postgresql
from tests.upstream import UpstreamFixture

MODULE = "example.com/indexbench"
DAEMON = ["--workers", "1", "--memory-cache", "0", "--go-sumdb", "off"]


class Client:
    """
    One keep-alive connection to a daemon, timing each GET.
    """

    def __init__(self, url: str) -> None:
        self.connection = http.client.HTTPConnection(LOOPBACK, int(url.rsplit(":", 1)[1]), timeout=30)

    def get(self, path: str, expect: str) -> float:
        started = time.perf_counter()
        self.connection.request("GET", path)
        response = self.connection.getresponse()
        response.read()
        took = time.perf_counter() - started
        cache = response.getheader("x-cache")
        if response.status != 200 or cache != expect:
            raise SystemExit(f"GET {path}: {response.status} {cache}, not 200 {expect}")
        return took

    def close(self) -> None:
        self.connection.close()


def info_path(version: str) -> str:
    return f"/goproxy/{escape(MODULE)}/@v/{version}.info"


def latencies(url: str, versions: list[str]) -> tuple[list[float], list[float]]:
    """
    Each version's miss, then each version's cold hit, one at a time.
    """
    client = Client(url)
    try:
        misses = [client.get(info_path(v), "MISS") for v in versions]
        hits = [client.get(info_path(v), "HIT") for v in versions]
    finally:
        client.close()
    return misses, hits


def ms(values: list[float]) -> str:
    ordered = sorted(values)
    return (f"p50 {statistics.median(ordered) * 1000:7.3f} ms   "
            f"p90 {ordered[int(len(ordered) * 0.9)] * 1000:7.3f} ms")


def throughput(wrk: Wrk, urls: list[str], path: str, seconds: int) -> float:
    """
    Requests a second over every daemon at once, one wrk each (32
    connections each), after a second of warming up.
    """
    results: list[float] = []
    for url in urls:
        wrk.run(url + path, 32, 1)

    def one(url: str) -> None:
        results.append(wrk.run(url + path, 32, seconds).requests_per_second)

    threads = [threading.Thread(target=one, args=(url,)) for url in urls]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(results)


def main() -> None:
    parser = make_parser(__doc__ or "")
    add_dir_option(parser, "the upstream tree and the daemons' storage")
    parser.add_argument("--seconds", type=int, default=5, help="seconds per throughput line (default 5)")
    parser.add_argument("--requests", type=int, default=200, help="misses and cold hits timed (default 200)")
    args = parser.parse_args()
    wrk_path = shutil.which("wrk")
    if wrk_path is None:
        raise SystemExit("wrk is missing: apt-get install wrk")
    wrk = Wrk(wrk_path)
    started = time.monotonic()
    with temporary_directory(args.dir) as workdir, ExitStack() as stack:
        server = start_postgresql()
        stack.callback(server.close)
        versions = [f"v1.0.{i}" for i in range(args.requests)]
        root = os.path.join(workdir, "upstream")
        build_payload_modules(root, MODULE, versions, 16)
        upstream = UpstreamFixture(root)
        stack.callback(upstream.stop)
        print(f"contentcache index bench: {args.requests} misses and cold hits of a "
              f"{human(os.path.getsize(os.path.join(root, escape(MODULE), '@v', 'v1.0.0.info')))} .info "
              f"each, one worker, --memory-cache 0; PostgreSQL {server.bindir.split('/')[-2]} on 127.0.0.1")
        print(f"  {os.cpu_count()} CPUs; {sys.version.split()[0]}")
        print()
        print(f"  {'index':<12} {'miss':<36} {'cold hit':<36}")
        cold = {}
        for engine in ("SQLite", "PostgreSQL"):
            storage = os.path.join(workdir, f"storage-{engine}")
            extra = [*DAEMON, "--go-upstream", upstream.url]
            if engine == "PostgreSQL":
                extra += ["--index", server.create_database("bench")]
            daemon, _ = start_daemon(stack, storage, extra)
            misses, hits = latencies(daemon.url, versions)
            cold[engine] = (daemon, storage, extra)
            print(f"  {engine:<12} {ms(misses):<36} {ms(hits):<36}", flush=True)
        print()

        # Throughput of cold hits: one node, then two on the same database.
        path = info_path(versions[0])
        one_pg, storage, extra = cold["PostgreSQL"]
        single = throughput(wrk, [one_pg.url], path, args.seconds)
        second, _ = start_daemon(stack, storage, extra)
        Client(second.url).get(path, "HIT")
        double = throughput(wrk, [one_pg.url, second.url], path, args.seconds)
        sqlite_single = throughput(wrk, [cold["SQLite"][0].url], path, args.seconds)
        print("  cold hits/s (wrk, 32 connections per node, 1 worker each)")
        print(f"    SQLite, one node:      {sqlite_single:>10,.0f}")
        print(f"    PostgreSQL, one node:  {single:>10,.0f}   ({single / sqlite_single:.2f}x SQLite)")
        print(f"    PostgreSQL, two nodes: {double:>10,.0f}   ({double / single:.2f}x one node)")
    print(f"\n  total {time.monotonic() - started:.0f} s")


if __name__ == "__main__":
    main()
