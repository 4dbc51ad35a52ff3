"""
Requests/s and latency of cached GOPROXY answers, measured with wrk.

Starts the real daemon as users start it (C{twistd -n contentcache}) on
127.0.0.1 in front of an upstream fixture holding one module version whose
zip is 1 MiB of random bytes, warms the cache with one GET of the version's
C{.info} and C{.zip}, and measures both with C{wrk --latency} at 1 and 32
connections. For a same-machine reference it then measures the same bytes
served by Twisted's C{static.File} in a process of its own (C{twist web
--path}). Prints requests/s and the 50th and 99th percentile latency of
each, and PASS or FAIL for the target: a cached C{.info} answered in under
1 ms at the median on one connection.

Run it from the repository root, with the tests' environment::

    python bench/goproxy.py                   # about a minute
    python bench/goproxy.py --no-baseline     # without static.File, half as long
    python bench/goproxy.py --duration 1      # a smoke run

It needs wrk (Debian's C{wrk} package) and exits with status 1 on FAIL.
Every process it starts and its temporary directory are gone at the end,
also on an error or Ctrl-C.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from contextlib import ExitStack
from functools import partial
from typing import IO, Sequence

# First: it puts the repository on the path for the tests' helpers.
from common import (
    EXTENSIONS, LOG_TAIL, LOOPBACK, PROXY_PATHS, START_TIMEOUT, STOP_TIMEOUT, VERSION,
    BenchError, KiB, MiB, Row, ServerLog, Wrk, add_dir_option, add_duration_option,
    build_module, check_dir, check_duration, check_get, describe, goproxy_options, make_parser,
    measure, run_with_wrk, start_daemon, stop, wrk_settings,
)
from contentcache.protocol.goproxy.paths import escape
from tests.upstream import UpstreamFixture

#: Random bytes in the module zip, so that it is 1 MiB however it is stored.
PAYLOAD_SIZE = MiB

#: The target: a cached .info's median latency on one connection.
TARGET_P50 = 0.001

TWIST = os.path.join(os.path.dirname(sys.executable), "twist")
_SITE_STARTING = re.compile(rb"Site starting on (\d+)")


class LogDrain:
    """
    Reads a server's log as it is written and keeps its tail: both servers
    log every request, and a server whose log pipe is full stops answering.
    """

    def __init__(self, stream: IO[bytes], start: bytes = b"") -> None:
        self._fd = stream.fileno()
        self._tail = bytearray(start[-LOG_TAIL:])
        self._ended = False
        self._changed = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="log-drain", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            while chunk := os.read(self._fd, 64 * KiB):
                with self._changed:
                    self._tail += chunk
                    del self._tail[:-LOG_TAIL]
                    self._changed.notify_all()
        except OSError:
            # The pipe was closed under us: the process is gone anyway.
            pass
        with self._changed:
            self._ended = True
            self._changed.notify_all()

    def tail(self) -> str:
        with self._changed:
            return self._tail.decode("utf-8", "replace")

    def wait_for(self, pattern: re.Pattern[bytes], timeout: float) -> re.Match[bytes]:
        deadline = time.monotonic() + timeout
        with self._changed:
            while (found := pattern.search(bytes(self._tail))) is None:
                remaining = deadline - time.monotonic()
                if self._ended or remaining <= 0:
                    raise BenchError(
                        f"the server never logged {pattern.pattern.decode()!r}; its log:\n"
                        + self._tail.decode("utf-8", "replace")
                    )
                self._changed.wait(remaining)
        return found

    def join(self) -> None:
        """
        Wait for the end of the log (the process has exited).
        """
        self._thread.join(STOP_TIMEOUT)


def start_static(stack: ExitStack, directory: str) -> tuple[str, LogDrain]:
    """
    Twisted's C{static.File} over C{directory} on 127.0.0.1, in a process
    of its own that logs as the daemon does (text, every request); stopped
    when C{stack} closes. Returns its URL.
    """
    process = subprocess.Popen(
        [TWIST, "--log-format=text", "web", "--path", directory,
         "--listen", f"tcp:0:interface={LOOPBACK}"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    assert process.stdout is not None
    stack.callback(process.stdout.close)
    drain = LogDrain(process.stdout)
    stack.callback(stop, process, drain, "twist web")
    port = int(drain.wait_for(_SITE_STARTING, START_TIMEOUT)[1])
    return f"http://{LOOPBACK}:{port}", drain


def measure_server(
    wrk: Wrk, server: str, url: str, paths: dict[str, str], log: ServerLog, seconds: int
) -> list[Row]:
    """
    Measure each of C{paths} as L{measure} does, in rows named after
    C{server} and the file's extension.
    """
    rows: list[Row] = []
    for ext, path in paths.items():
        rows += measure(wrk, url + path, seconds, partial(Row, f"{server} .{ext}"),
                        server=server, what=path, log=log)
    return rows


def benchmark(wrk: Wrk, workdir: str, args: argparse.Namespace) -> bool:
    """
    Measure, print, and return whether the target was met.
    """
    module = build_module(os.path.join(workdir, "upstream"), PAYLOAD_SIZE)

    print("contentcache GOPROXY benchmark: cached answers under wrk on 127.0.0.1")
    print(f"  workdir: {workdir} (removed at the end)")
    print(f"  machine: {os.cpu_count()} CPUs, shared by wrk and the server; wrk {wrk.version()}")
    print(module)
    print(wrk_settings(args.duration))

    with ExitStack() as stack:
        upstream = UpstreamFixture(os.path.join(workdir, "upstream"))
        stack.callback(upstream.stop)
        daemon, log = start_daemon(stack, os.path.join(workdir, "storage"),
                                   goproxy_options(upstream.url))
        print(f"  daemon: {describe(daemon)}")
        module.warm(daemon.url, log, server="the server")
        print("  cache warmed: one GET of each (a miss), a second answered with X-Cache: HIT")
        print()
        print(Row.header())
        rows = measure_server(wrk, "contentcache", daemon.url, PROXY_PATHS, log, args.duration)
        fetched = module.fetched(upstream)
    if any(n != 1 for n in fetched.values()):
        raise BenchError(f"upstream was asked for the files {fetched} times, not once each: "
                         "the answers measured were not all from the cache")

    if not args.no_baseline:
        static = os.path.join(workdir, "static")
        os.mkdir(static)
        for file in module.files.values():
            shutil.copy(file, static)
        with ExitStack() as stack:
            url, static_log = start_static(stack, static)
            static_paths = {ext: f"/{escape(VERSION)}.{ext}" for ext in EXTENSIONS}
            for ext, path in static_paths.items():
                check_get(url, path, module.bodies[ext], static_log, server="the server")
            rows += measure_server(wrk, "static.File", url, static_paths, static_log, args.duration)

    print()
    print("  contentcache: upstream was asked once for each file (the warm-up's miss)")
    if args.no_baseline:
        print("  static.File: skipped (--no-baseline)")
    else:
        print("  static.File: twist web --path over the same bytes, one process, same Python,"
              " logging every request as the daemon does")
    info = next(row for row in rows if row.target == "contentcache .info" and row.connections == 1)
    passed = info.result.p50 < TARGET_P50
    print(f"  {'PASS' if passed else 'FAIL'}: cached .info p50 at 1 connection is "
          f"{info.result.p50 * 1000:.3f} ms; the target is under {TARGET_P50 * 1000:g} ms")
    return passed


def main(argv: Sequence[str] | None = None) -> None:
    parser = make_parser(__doc__)
    add_duration_option(parser)
    parser.add_argument(
        "--no-baseline", action="store_true",
        help="do not measure Twisted's static.File serving the same bytes",
    )
    add_dir_option(parser, "directory (module tree and storage)")
    args = parser.parse_args(argv)
    check_duration(parser, args)
    check_dir(parser, args)
    run_with_wrk(benchmark, args)


if __name__ == "__main__":
    main()
