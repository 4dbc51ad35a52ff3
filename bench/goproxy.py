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
    python bench/goproxy.py --duration 1      # a smoke run

It needs wrk (Debian's C{wrk} package) and exits with status 1 on FAIL.
Every process it starts and its temporary directory are gone at the end,
also on an error or Ctrl-C.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
from contextlib import ExitStack
from types import FrameType
from typing import IO, Sequence

from attrs import frozen

REPOSITORY = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The daemon, upstream and module helpers are the end-to-end tests' own.
sys.path.insert(0, REPOSITORY)

from contentcache.protocol.goproxy.paths import escape  # noqa: E402
from tests.daemon import Daemon  # noqa: E402
from tests.gomodules import ModuleVersion, build_tree  # noqa: E402
from tests.upstream import UpstreamFixture  # noqa: E402

KiB = 1024
MiB = 1024 * KiB

LOOPBACK = "127.0.0.1"
MODULE = "example.com/bench"
VERSION = "v1.0.0"
#: Random bytes in the module zip, so that it is 1 MiB however it is stored.
PAYLOAD_SIZE = MiB
EXTENSIONS = ("info", "zip")

CONNECTIONS = (1, 32)
#: wrk threads per connection count: the machines this runs on have 2 cores.
WRK_THREADS = {1: 1, 32: 2}
DEFAULT_DURATION = 5
#: Each URL gets this many seconds of load at the most connections before
#: it is measured: the daemon's disk pool starts its threads on demand.
WARM_UP_SECONDS = 1
#: wrk counts a request as timed out after this long.
WRK_TIMEOUT = "5s"

#: The target: a cached .info's median latency on one connection.
TARGET_P50 = 0.001

START_TIMEOUT = 30.0
STOP_TIMEOUT = 10.0
HTTP_TIMEOUT = 30.0
#: How much of a server's log is kept for an error message.
LOG_TAIL = 16 * KiB

TWIST = os.path.join(os.path.dirname(sys.executable), "twist")
_SITE_STARTING = re.compile(rb"Site starting on (\d+)")
_TWISTD_STARTING = re.compile(r"twistd (\S+) \((\S+) (\S+)\) starting up")

_REQUESTS_PER_SECOND = re.compile(r"^Requests/sec:\s+([\d.]+)\s*$", re.M)
_PERCENTILE = re.compile(r"^\s*(\d+(?:\.\d+)?)%\s+([\d.]+)(us|ms|s|m|h)\s*$", re.M)
_REQUESTS = re.compile(r"^\s*(\d+) requests in ", re.M)
_NON_2XX = re.compile(r"Non-2xx or 3xx responses: (\d+)")
_SOCKET_ERRORS = re.compile(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)")
#: wrk's time units, in seconds.
_UNITS = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


class BenchError(Exception):
    """
    The benchmark could not measure what it set out to; the message says
    why, with the server's last log lines where they help.
    """


def human(size: int) -> str:
    if size >= MiB:
        return f"{size / MiB:.1f} MiB"
    if size >= KiB:
        return f"{size / KiB:.1f} KiB"
    return f"{size} B"


@frozen
class WrkResult:
    requests: int
    requests_per_second: float
    #: Seconds.
    p50: float
    p99: float
    non_2xx: int
    socket_errors: int


def parse_wrk(output: str) -> WrkResult:
    """
    The figures of C{wrk --latency}'s report.
    """
    rate = _REQUESTS_PER_SECOND.search(output)
    requests = _REQUESTS.search(output)
    percentiles = {
        float(m[1]): float(m[2]) * _UNITS[m[3]] for m in _PERCENTILE.finditer(output)
    }
    if rate is None or requests is None or 50.0 not in percentiles or 99.0 not in percentiles:
        raise BenchError(f"cannot read wrk's report:\n{output}")
    non_2xx = _NON_2XX.search(output)
    socket_errors = _SOCKET_ERRORS.search(output)
    return WrkResult(
        requests=int(requests[1]),
        requests_per_second=float(rate[1]),
        p50=percentiles[50.0],
        p99=percentiles[99.0],
        non_2xx=int(non_2xx[1]) if non_2xx else 0,
        socket_errors=sum(map(int, socket_errors.groups())) if socket_errors else 0,
    )


def wrk_version(wrk: str) -> str:
    # "wrk debian/4.1.0-3+b2 [epoll] Copyright (C) 2012 Will Glozer"
    result = subprocess.run([wrk, "-v"], capture_output=True, text=True, timeout=HTTP_TIMEOUT)
    words = (result.stdout + result.stderr).split()
    return words[1] if len(words) > 1 else "(unknown version)"


def run_wrk(wrk: str, url: str, connections: int, seconds: int) -> WrkResult:
    command = [
        wrk, "--latency", "--threads", str(WRK_THREADS[connections]),
        "--connections", str(connections), "--duration", f"{seconds}s",
        "--timeout", WRK_TIMEOUT, url,
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=seconds + START_TIMEOUT)
    if result.returncode != 0:
        raise BenchError(f"{' '.join(command)} exited with status {result.returncode}:\n"
                         f"{result.stdout}{result.stderr}")
    return parse_wrk(result.stdout)



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


def stop(process: subprocess.Popen[bytes], drain: LogDrain | DaemonLog, name: str) -> None:
    """
    SIGTERM, and SIGKILL if C{process} is still running L{STOP_TIMEOUT}
    seconds later; a warning on stderr if it did not stop cleanly.
    """
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
            print(f"warning: {name} was still running {STOP_TIMEOUT:g} s after SIGTERM; killed",
                  file=sys.stderr)
    drain.join()
    # Status 0, or killed by our SIGTERM or by the terminal's Ctrl-C.
    if process.returncode not in (0, -signal.SIGTERM, -signal.SIGINT):
        print(f"warning: {name} exited with status {process.returncode}; its log ends:\n"
              f"{drain.tail()}", file=sys.stderr)


class DaemonLog:
    """
    The daemon's log as the tests' L{Daemon} collects it, with
    L{LogDrain}'s C{tail} and C{join}.
    """

    def __init__(self, daemon: Daemon) -> None:
        self._daemon = daemon

    def tail(self) -> str:
        return self._daemon.output[-LOG_TAIL:].decode("utf-8", "replace")

    def join(self) -> None:
        self._daemon._reader.join(STOP_TIMEOUT)


def start_daemon(stack: ExitStack, storage: str, upstream: str) -> tuple[Daemon, DaemonLog]:
    """
    C{twistd -n contentcache} on 127.0.0.1, fetching from C{upstream}, with
    no checksum database; stopped when C{stack} closes.
    """
    daemon = Daemon(storage, ["--go-upstream", upstream, "--go-sumdb", "off"])
    log = DaemonLog(daemon)
    stack.callback(daemon.stop)
    stack.callback(stop, daemon.process, log, "the daemon")
    return daemon, log


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


def build_module(root: str) -> dict[str, str]:
    """
    A GOPROXY tree under C{root} holding one module version whose zip is a
    go.mod and L{PAYLOAD_SIZE} random bytes. Returns the paths of the
    version's files by extension.
    """
    go_mod = f"module {MODULE}\n\ngo 1.19\n"
    build_tree(root, [ModuleVersion(MODULE, VERSION, {"go.mod": go_mod})])
    base = os.path.join(root, *escape(MODULE).split("/"), "@v", escape(VERSION))
    # Written again with the payload: a ModuleVersion's files are text.
    prefix = f"{MODULE}@{VERSION}/"
    with zipfile.ZipFile(base + ".zip", "w") as archive:
        for name, content, method in (
            ("go.mod", go_mod.encode("utf-8"), zipfile.ZIP_DEFLATED),
            ("payload.bin", os.urandom(PAYLOAD_SIZE), zipfile.ZIP_STORED),
        ):
            info = zipfile.ZipInfo(prefix + name, date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = method
            archive.writestr(info, content)
    return {ext: f"{base}.{ext}" for ext in EXTENSIONS}


def get(url: str, path: str) -> tuple[int, str | None, bytes]:
    """
    GET C{path} from the server at C{url}: status, X-Cache and body.
    """
    port = int(url.rsplit(":", 1)[1])
    connection = http.client.HTTPConnection(LOOPBACK, port, timeout=HTTP_TIMEOUT)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        return response.status, response.getheader("X-Cache"), response.read()
    except (OSError, http.client.HTTPException) as e:
        raise BenchError(f"GET {url}{path} failed: {e}") from None
    finally:
        connection.close()


def check_get(url: str, path: str, body: bytes, drain: LogDrain | DaemonLog, x_cache: str | None = None) -> None:
    """
    GET C{path}: it must answer 200 with C{body} (and C{x_cache} in
    X-Cache, if given).
    """
    status, cache, received = get(url, path)
    if status != 200 or received != body or (x_cache is not None and cache != x_cache):
        raise BenchError(
            f"GET {url}{path} answered {status} (X-Cache {cache}) with {len(received)} bytes, "
            f"{'the same as' if received == body else 'not'} the upstream's {len(body)}; "
            f"the server's log ends:\n{drain.tail()}"
        )


@frozen
class Row:
    target: str
    connections: int
    result: WrkResult

    def __str__(self) -> str:
        r = self.result
        errors = f"  {r.socket_errors} socket errors" if r.socket_errors else ""
        return (f"  {self.target:<20} {self.connections:>5} {r.requests_per_second:>10,.0f}"
                f" {r.p50 * 1000:>9.3f} {r.p99 * 1000:>9.3f}{errors}")


HEADER = f"  {'target':<20} {'conns':>5} {'req/s':>10} {'p50 ms':>9} {'p99 ms':>9}"


def measure(
    wrk: str, server: str, url: str, paths: dict[str, str], drain: LogDrain | DaemonLog, seconds: int
) -> list[Row]:
    """
    Load each of C{paths} for L{WARM_UP_SECONDS}, then measure it at each
    of L{CONNECTIONS}; print the rows as they come.
    """
    rows = []
    for ext, path in paths.items():
        run_wrk(wrk, url + path, max(CONNECTIONS), WARM_UP_SECONDS)
        for connections in CONNECTIONS:
            result = run_wrk(wrk, url + path, connections, seconds)
            if result.non_2xx:
                raise BenchError(
                    f"{server} answered {result.non_2xx} of {result.requests} requests for "
                    f"{path} with an error; its log ends:\n{drain.tail()}"
                )
            row = Row(f"{server} .{ext}", connections, result)
            print(row, flush=True)
            rows.append(row)
    return rows


def benchmark(wrk: str, workdir: str, args: argparse.Namespace) -> bool:
    """
    Measure, print, and return whether the target was met.
    """
    files = build_module(os.path.join(workdir, "upstream"))
    bodies = {}
    for ext, file in files.items():
        with open(file, "rb") as f:
            bodies[ext] = f.read()
    escaped = f"{escape(MODULE)}/@v/{escape(VERSION)}"

    print("contentcache GOPROXY benchmark: cached answers under wrk on 127.0.0.1")
    print(f"  workdir: {workdir} (removed at the end)")
    print(f"  machine: {os.cpu_count()} CPUs, shared by wrk and the server; wrk {wrk_version(wrk)}")
    print(f"  module {MODULE} {VERSION}: .info {human(len(bodies['info']))}, "
          f".zip {human(len(bodies['zip']))} ({len(bodies['zip']):,} bytes: a go.mod and "
          f"{human(PAYLOAD_SIZE)} of random bytes, stored)")
    print(f"  wrk --latency: {args.duration} s per line, after {WARM_UP_SECONDS} s at "
          f"{max(CONNECTIONS)} connections per URL; wrk threads: "
          + ", ".join(f"{WRK_THREADS[c]} for {c}" for c in CONNECTIONS) + " connections")

    with ExitStack() as stack:
        upstream = UpstreamFixture(os.path.join(workdir, "upstream"))
        stack.callback(upstream.stop)
        daemon, drain = start_daemon(stack, os.path.join(workdir, "storage"), upstream.url)
        started = _TWISTD_STARTING.search(daemon.output.decode("utf-8", "replace"))
        _, _, health = get(daemon.url, "/health")
        version = json.loads(health).get("version", "?")
        if started is not None:
            twisted_version, python, python_version = started.groups()
            print(f"  daemon: twistd -n contentcache, contentcache {version}, Twisted "
                  f"{twisted_version}, Python {python_version} ({python})")
        else:
            print(f"  daemon: twistd -n contentcache, contentcache {version}")

        paths = {ext: f"/goproxy/{escaped}.{ext}" for ext in EXTENSIONS}
        for ext, path in paths.items():
            check_get(daemon.url, path, bodies[ext], drain)
            check_get(daemon.url, path, bodies[ext], drain, x_cache="HIT")
        print("  cache warmed: one GET of each (a miss), a second answered with X-Cache: HIT")
        print()
        print(HEADER)
        rows = measure(wrk, "contentcache", daemon.url, paths, drain, args.duration)
        fetched = {ext: upstream.count(f"/{escaped}.{ext}") for ext in EXTENSIONS}
    if any(n != 1 for n in fetched.values()):
        raise BenchError(f"upstream was asked for the files {fetched} times, not once each: "
                         "the answers measured were not all from the cache")

    if not args.no_baseline:
        static = os.path.join(workdir, "static")
        os.mkdir(static)
        for file in files.values():
            shutil.copy(file, static)
        with ExitStack() as stack:
            url, static_log = start_static(stack, static)
            static_paths = {ext: f"/{escape(VERSION)}.{ext}" for ext in EXTENSIONS}
            for ext, path in static_paths.items():
                check_get(url, path, bodies[ext], static_log)
            rows += measure(wrk, "static.File", url, static_paths, static_log, args.duration)

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


def _terminated(signum: int, frame: FrameType | None) -> None:
    # Unwind as Ctrl-C does, so that every process started here is stopped.
    raise KeyboardInterrupt


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip())
    parser.add_argument(
        "--duration", type=int, default=DEFAULT_DURATION, metavar="SECONDS",
        help=f"how long wrk loads each line (default: {DEFAULT_DURATION})",
    )
    parser.add_argument(
        "--no-baseline", action="store_true",
        help="do not measure Twisted's static.File serving the same bytes",
    )
    parser.add_argument(
        "--dir",
        help="create the temporary directory (module tree and storage) in DIR"
        " (default: the system's temporary directory)",
    )
    args = parser.parse_args(argv)
    if args.duration < 1:
        parser.error("--duration needs a whole number of seconds, at least 1")
    if args.dir is not None and not os.path.isdir(args.dir):
        parser.error(f"--dir {args.dir} is not a directory")
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = parse(argv)
    wrk = shutil.which("wrk")
    if wrk is None:
        print("wrk is not on PATH: this benchmark measures with it "
              "(on Debian: apt-get install wrk).", file=sys.stderr)
        raise SystemExit(1)
    signal.signal(signal.SIGTERM, _terminated)
    workdir = os.path.abspath(tempfile.mkdtemp(prefix="contentcache-bench-", dir=args.dir))
    try:
        passed = benchmark(wrk, workdir, args)
    except BenchError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(1) from None
    except KeyboardInterrupt:
        print("interrupted; every process started was stopped", file=sys.stderr)
        raise SystemExit(130) from None
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    if not passed:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
