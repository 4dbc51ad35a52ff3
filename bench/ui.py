"""
What the status page costs cached hits, measured with wrk.

Starts the real daemon as users start it (C{twistd -n contentcache},
default options: a worker per CPU) on 127.0.0.1 in front of an upstream
fixture holding one module version, warms its cache with the version's
C{.info} (a miss, then a hit), and measures that C{.info} with C{wrk
--latency} at 32 connections, in rounds: "without", nothing else asking;
"with", a browser-like client asking for C{/} every second all the while
(what an open status page refreshing once a second costs: the whole
daemon's metrics read, every worker's activity merged, the store's
counters asked, the page rendered). Each round runs both in mirrored order
(without, with, then with, without), so that a drift over the run weighs
on both alike. Prints every measurement, the medians, with against
without, the spread of the rounds (the noise), and how the page answered
(count and median time); PASS when the median with the page is within
5% of the median without.

Run it from the repository root, with the tests' environment::

    python bench/ui.py                        # about a minute
    python bench/ui.py --duration 2 --rounds 2    # a smoke run

It needs wrk (Debian's C{wrk} package) and exits with status 1 on FAIL.
Every process it starts and its temporary directory are gone at the end,
also on an error or Ctrl-C.
"""

from __future__ import annotations

import argparse
import os
import statistics
import threading
import time
from contextlib import ExitStack
from typing import Sequence

# First: it puts the repository on the path for the tests' helpers.
from common import (
    PROXY_PATHS, BenchError, KiB, Wrk, WrkResult, add_dir_option, add_duration_option, build_module,
    check_dir, check_duration, check_get, describe, get, goproxy_options, make_parser, run_with_wrk, start_daemon,
    table_header, table_row,
)
from tests.upstream import UpstreamFixture

WITHOUT = "without"
WITH = "with"
SETTINGS = (WITHOUT, WITH)
CONNECTIONS = 32
DEFAULT_ROUNDS = 5
#: How often the browser-like client asks for the page.
PAGE_INTERVAL = 1.0
#: The target: hits with the page open keep at least this share of their requests/s.
TARGET = 0.95


class PageClient:
    """
    Asks for C{/} every L{PAGE_INTERVAL} seconds from a thread, as an open
    status page refreshing itself would, and keeps how long each took.
    """

    def __init__(self, url: str) -> None:
        self._url = url
        self._stop = threading.Event()
        self.seconds: list[float] = []
        self.failures: list[str] = []
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                status, _, body = get(self._url, "/")
                if status != 200 or b'id="chart-rps"' not in body:
                    self.failures.append(f"GET / answered {status}")
            except BenchError as e:
                self.failures.append(str(e))
            self.seconds.append(time.monotonic() - started)
            self._stop.wait(max(0.0, PAGE_INTERVAL - (time.monotonic() - started)))

    def __enter__(self) -> PageClient:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(30)


def order(rounds: int) -> list[tuple[int, str]]:
    runs = []
    for round in range(1, rounds + 1):
        settings = SETTINGS if round % 2 else tuple(reversed(SETTINGS))
        runs += [(round, setting) for setting in settings]
    return runs


def spread(values: list[float]) -> float:
    return (max(values) - min(values)) / statistics.median(values)


def benchmark(wrk: Wrk, workdir: str, args: argparse.Namespace) -> bool:
    root = os.path.join(workdir, "upstream")
    os.mkdir(root)
    module = build_module(root, 16 * KiB)
    results: dict[str, list[WrkResult]] = {s: [] for s in SETTINGS}
    pages: list[float] = []
    with ExitStack() as stack:
        upstream = UpstreamFixture(root)
        stack.callback(upstream.stop)
        daemon, log = start_daemon(stack, os.path.join(workdir, "storage"), goproxy_options(upstream.url))
        path = PROXY_PATHS["info"]
        check_get(daemon.url, path, module.bodies["info"], log)
        check_get(daemon.url, path, module.bodies["info"], log, x_cache="HIT")
        url = daemon.url + path
        print("contentcache: cached hits with and without a status page refreshing every second")
        print(f"  daemon: {describe(daemon)}, default options")
        print(f"  target: a cached .info ({len(module.bodies['info'])} bytes), X-Cache: HIT, wrk --latency "
              f"at {CONNECTIONS} connections, {args.duration} s per run, {args.rounds} rounds in mirrored order")
        print(f"  with: another client GETs / every {PAGE_INTERVAL:g} s during the run")
        print()
        print(table_header(f"{'round':>5} {'setting':<8}"), flush=True)
        wrk.run(url, CONNECTIONS, 1)  # warm-up
        for round, setting in order(args.rounds):
            if setting == WITH:
                with PageClient(daemon.url) as client:
                    result = wrk.run(url, CONNECTIONS, args.duration)
                if client.failures:
                    raise BenchError(f"the status page failed: {client.failures[:3]}; the log ends:\n{log.tail()}")
                if not client.seconds:
                    raise BenchError("the status page was never asked for")
                pages += client.seconds
            else:
                result = wrk.run(url, CONNECTIONS, args.duration)
            if result.non_2xx:
                raise BenchError(f"{result.non_2xx} of {result.requests} hits were answered with an error")
            results[setting].append(result)
            print(table_row(f"{round:>5} {setting:<8}", CONNECTIONS, result), flush=True)
    median = {s: statistics.median(r.requests_per_second for r in results[s]) for s in SETTINGS}
    ratio = median[WITH] / median[WITHOUT]
    noise = (max(spread([r.requests_per_second for r in results[s]]) for s in SETTINGS)
             if args.rounds > 1 else None)
    print()
    print(f"  median req/s: without {median[WITHOUT]:,.0f}, with the page {median[WITH]:,.0f}: "
          f"ratio {ratio:.3f} ({(ratio - 1) * 100:+.1f}%)")
    if noise is not None:
        print(f"  noise (widest spread of req/s over the rounds, either setting): {noise * 100:.1f}%")
    print(f"  the page: {len(pages)} answers, median {statistics.median(pages) * 1000:.1f} ms, "
          f"slowest {max(pages) * 1000:.1f} ms")
    passed = ratio >= TARGET
    print(f"  {'PASS' if passed else 'FAIL'}: with the page open, hits keep {ratio * 100:.1f}% of their "
          f"requests/s (target: at least {TARGET * 100:g}%)")
    return passed


def main(argv: Sequence[str] | None = None) -> None:
    parser = make_parser(__doc__)
    add_duration_option(parser)
    parser.add_argument("--rounds", type=int, default=DEFAULT_ROUNDS, metavar="N",
                        help=f"how many times each setting is measured (default: {DEFAULT_ROUNDS})")
    add_dir_option(parser, "directory (module tree and storage)")
    args = parser.parse_args(argv)
    check_duration(parser, args)
    if args.rounds < 1:
        parser.error("--rounds needs a whole number, at least 1")
    check_dir(parser, args)
    run_with_wrk(benchmark, args)


if __name__ == "__main__":
    main()
