"""
What the benchmarks share.

All of them: sizes in words, their temporary directory and the C{--dir}
option that places it. The two that measure a peak RSS in a fresh process
(C{streaming.py}, C{expiry.py}): the memory figures, the launcher of that
process, the disk pool and the store, and the warnings-only log. The three
that measure the store on the filesystem and on S3 (C{store.py},
C{streaming.py}, C{compression.py}): their options, SeaweedFS and the
temporary directory it keeps its data in, a store wired for either
backend, and the lines that say what they ran on. The three that measure
the daemon with wrk (C{goproxy.py}, C{npm.py}, C{telemetry.py}): the
daemon and its log, GETs and their checks, wrk, the table of what it
measured, the GOPROXY module version two of them serve, and
L{run_with_wrk}, which stops every process started on an error, Ctrl-C or
SIGTERM.

A script run as C{python bench/<name>.py} has bench/ first on its path, so
it imports this as C{common}. Importing it puts the repository on the path
too: the daemon, upstream and module helpers are the end-to-end tests' own.
"""

from __future__ import annotations

import argparse
import gc
import http.client
import importlib.metadata
import itertools
import json
import os
import platform
import re
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack, contextmanager
from types import FrameType
from typing import Any, Callable, ClassVar, Coroutine, Iterator, Protocol, Sequence, TypeVar

import zstandard
from attrs import frozen
from twisted.internet.task import react
from twisted.logger import (
    FilteringLogObserver,
    LogLevel,
    LogLevelFilterPredicate,
    globalLogBeginner,
    textFileLogObserver,
)

REPOSITORY = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The daemon, upstream and module helpers are the end-to-end tests' own.
sys.path.insert(0, REPOSITORY)

from contentcache.backend.filesystem import FilesystemBackend  # noqa: E402
from contentcache.backend.s3 import DEFAULT_PART_SIZE, S3Backend, S3Location, make_client  # noqa: E402
from contentcache.compress import Compression  # noqa: E402
from contentcache.pool import DEFAULT_THREADS, DiskPool, Runner  # noqa: E402
from contentcache.protocol.goproxy.paths import escape  # noqa: E402
from contentcache.store import Store  # noqa: E402
from tests.daemon import Daemon  # noqa: E402
from tests.gomodules import build_payload_modules  # noqa: E402
from tests.upstream import UpstreamFixture  # noqa: E402

R = TypeVar("R")

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB
#: The units L{human} and L{exact} write sizes in, the largest first.
_SIZE_UNITS = ((GiB, "GiB"), (MiB, "MiB"), (KiB, "KiB"))

LOOPBACK = "127.0.0.1"
#: The temporary directory's name starts so, to say whose it is.
WORKDIR_PREFIX = "contentcache-bench-"


def human(size: float, largest: int = GiB) -> str:
    """
    C{size} bytes to a tenth of the largest unit it reaches, at most
    C{largest}.
    """
    for unit, name in _SIZE_UNITS:
        if unit <= largest and size >= unit:
            return f"{size / unit:.1f} {name}"
    return f"{size:.0f} B"


@contextmanager
def temporary_directory(parent: str | None) -> Iterator[str]:
    """
    A new directory in C{parent} (L{None}: the system's temporary
    directory), removed with all it holds however the block ends.
    """
    workdir = os.path.abspath(tempfile.mkdtemp(prefix=WORKDIR_PREFIX, dir=parent))
    try:
        yield workdir
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


# The command line.


def make_parser(doc: str) -> argparse.ArgumentParser:
    """
    A parser described by the first paragraph of C{doc}, a script's
    docstring.
    """
    return argparse.ArgumentParser(description=doc.split("\n\n")[0].strip())


def add_dir_option(parser: argparse.ArgumentParser, directory: str) -> None:
    """
    The C{--dir DIR} option: where the temporary directory is created.
    C{directory} names it in the help.
    """
    parser.add_argument(
        "--dir",
        help=f"create the temporary {directory} in DIR"
        " (default: the system's temporary directory)",
    )


def check_dir(parser: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.Namespace:
    """
    C{args}, once their C{--dir} is found to be a directory (or not
    given); checked last, after the script's own options.
    """
    if args.dir is not None and not os.path.isdir(args.dir):
        parser.error(f"--dir {args.dir} is not a directory")
    return args


# The peak RSS of a fresh process.

#: The global reactor: it provides every reactor interface used here.
Reactor = Any

#: Starts the measuring process from a small one. On Linux a process
#: spawned with vfork (as posix_spawn and subprocess do) starts with the
#: spawner's peak RSS as its ru_maxrss; the benchmark's own peak (it made
#: its data first) would hide the peak being measured.
LAUNCHER = "import subprocess, sys; sys.exit(subprocess.call(sys.argv[1:]))"


def fresh_process(script: str, *args: str) -> list[str]:
    """
    The command that runs C{script} with C{args} in a fresh Python process
    started by L{LAUNCHER}.
    """
    return [sys.executable, "-c", LAUNCHER, sys.executable, script, *args]


def mib(kib: int) -> str:
    return f"{kib / KiB:.1f} MiB"


def status_kib(field: str, path: str = "/proc/self/status") -> int:
    """
    A memory figure in KiB from C{/proc/self/status} (C{VmRSS}, C{VmHWM})
    or another file of that form (C{/proc/meminfo}: C{MemTotal}).
    """
    with open(path) as status:
        for line in status:
            name, _, value = line.partition(":")
            if name == field:
                return int(value.split()[0])
    raise LookupError(f"{field} is not in {path}")


def max_rss_kib() -> int:
    # ru_maxrss is in KiB on Linux.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def rss_baseline() -> tuple[int, int]:
    """
    After a garbage collection: the resident set (C{VmRSS}) and the peak
    so far (C{ru_maxrss}), both in KiB.
    """
    gc.collect()
    return status_kib("VmRSS"), max_rss_kib()


def print_inherited(inherited_kib: int, baseline_kib: int, indent: str) -> None:
    """
    Say so if the peak was already above the baseline when it was taken:
    the peak may then be the spawning process's (see L{LAUNCHER}).
    """
    if inherited_kib > baseline_kib:
        print(f"{indent}note: ru_maxrss was already {mib(inherited_kib)} at the baseline")


def show_warnings() -> None:
    """
    Print warnings and logged failures (a request that failed inside a
    resource, an item a pass skipped) to stderr, and nothing else.
    """
    predicate = LogLevelFilterPredicate(defaultLogLevel=LogLevel.warn)
    observer = FilteringLogObserver(textFileLogObserver(sys.stderr), [predicate])
    globalLogBeginner.beginLoggingTo([observer], redirectStandardIO=False)


def start_disk_pool(reactor: Reactor) -> DiskPool:
    """
    A started disk pool, as the daemon's; it stops when the reactor does,
    however it stops.
    """
    disk = DiskPool(reactor)
    disk.startService()
    reactor.addSystemEventTrigger("during", "shutdown", disk.stopService)
    return disk


def filesystem_store(directory: str, disk: Runner) -> Store:
    """
    A store of blob files in C{directory}, wired as C{makeService} wires
    it.
    """
    return Store(FilesystemBackend(directory, disk), os.path.join(directory, "tmp"), disk)


# The store on the filesystem and on S3.

#: Throughput is reported in decimal megabytes per second.
MB = 1000 * 1000
#: How much one piece of a put holds: an upstream body arrives in pieces
#: of about this size once spooled.
PUT_CHUNK = MiB
#: Where the benchmarks' objects go in the bucket: one prefix per store.
S3_PREFIX = "bench/"
#: The daemon's default part size: a blob above it is a multipart upload.
PART_SIZE = DEFAULT_PART_SIZE


def exact(size: int) -> str:
    """
    C{size} bytes in the largest unit that divides it: the sizes measured
    are chosen round, and a line says exactly how big its blob is.
    """
    for unit, name in _SIZE_UNITS:
        if size >= unit and size % unit == 0:
            return f"{size // unit} {name}"
    return f"{size} B"


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("needs a positive number")
    return value


def store_parser(doc: str, quick: str, repeat: str | None = None) -> argparse.ArgumentParser:
    """
    A parser (see L{make_parser}) with C{--dir}, C{--quick} (C{quick} is
    its help), C{--no-s3} and, if C{repeat} is its help, C{--repeat N}.
    """
    parser = make_parser(doc)
    add_dir_option(parser, "storage directory")
    parser.add_argument("--quick", action="store_true", help=quick)
    if repeat is not None:
        parser.add_argument("--repeat", type=_positive, metavar="N", help=repeat)
    parser.add_argument("--no-s3", action="store_true",
                        help="measure the filesystem only, without SeaweedFS")
    return parser


@frozen
class S3Server:
    """
    Where the benchmark's S3 is; the credentials are in the environment,
    where the AWS credential chain finds them.
    """

    endpoint: str
    bucket: str
    region: str

    def client(self) -> Any:
        """
        A botocore client made as the daemon makes its own, with a
        connection for each thread of the disk pool.
        """
        return make_client(self.endpoint, self.region, DEFAULT_THREADS)


@contextmanager
def seaweed(workdir: str, wanted: bool) -> Iterator[S3Server | None]:
    """
    SeaweedFS running with its data in C{workdir} and its credentials in
    this process's environment (and so in the fresh processes'), stopped
    however the block ends; L{None} if not C{wanted}.
    """
    if not wanted:
        yield None
        return
    # Imported here: it brings boto3 and pytest, which a process measuring
    # its own RSS is better without.
    from tests.seaweed import start_seaweed

    server = start_seaweed(os.path.join(workdir, "seaweed"))
    try:
        os.environ.update(server.env())
        yield S3Server(server.endpoint, server.bucket, server.region)
    finally:
        server.stop()


@contextmanager
def storage(args: argparse.Namespace) -> Iterator[tuple[str, S3Server | None]]:
    """
    A temporary directory in C{args.dir} and, unless C{args.no_s3},
    SeaweedFS keeping its data there: both gone however the block ends,
    also on SIGTERM.
    """
    # Unwind as Ctrl-C does, so that SeaweedFS is stopped (the reactor
    # handles SIGTERM itself while it runs).
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    with temporary_directory(args.dir) as workdir, seaweed(workdir, not args.no_s3) as s3:
        yield workdir, s3


def make_store(
    disk: Runner,
    directory: str,
    s3: S3Server | None = None,
    prefix: str = S3_PREFIX,
    compression: Compression = Compression(0),
    client: Any = None,
) -> Store:
    """
    A store wired as C{makeService} wires it: blobs in C{directory}, or in
    C{s3} under C{prefix} with the spool files in C{directory}.
    """
    if s3 is None:
        if not compression.enabled:
            return filesystem_store(directory, disk)
        return Store(FilesystemBackend(directory, disk), os.path.join(directory, "tmp"), disk, compression)
    backend = S3Backend(client or s3.client(), S3Location(s3.bucket, prefix), disk, PART_SIZE)
    return Store(backend, os.path.join(directory, "tmp"), disk, compression)


def machine(workdir: str) -> list[str]:
    """
    Lines that say what the numbers were measured on.
    """
    model = "unknown CPU"
    with open("/proc/cpuinfo") as cpuinfo:
        for line in cpuinfo:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    memory = status_kib("MemTotal", "/proc/meminfo")
    filesystem = "?"
    best = ""
    with open("/proc/mounts") as mounts:
        for line in mounts:
            _, point, kind, *_ = line.split()
            if (workdir == point or workdir.startswith(point.rstrip("/") + "/")) and len(point) >= len(best):
                best, filesystem = point, kind
    return [
        f"  machine: {model}, {os.cpu_count()} CPUs, {mib(memory)} RAM, "
        f"{platform.system()} {platform.release()} {platform.machine()}",
        f"  Python {platform.python_version()}, zstandard {zstandard.__version__} ({zstandard.backend}), "
        # From its metadata: naming it needs no import of it.
        f"botocore {importlib.metadata.version('botocore')}",
        f"  storage: {workdir} ({filesystem} mounted at {best}; removed at the end)",
    ]


def weed_version() -> str:
    """
    The version of SeaweedFS's C{weed}, as it says.
    """
    from tests.seaweed import find_weed  # for the reason in seaweed()

    result = subprocess.run([find_weed(), "version"], capture_output=True, text=True, timeout=30)
    words = result.stdout.split()
    return " ".join(words[1:3]) if len(words) > 2 else "?"


def print_setup(title: str, workdir: str, quick: bool, reactor: Reactor, s3: S3Server | None) -> None:
    """
    The benchmark's title, then what it runs on: the machine, the
    C{reactor}, the disk pool, and S3 if it measures it.
    """
    print(f"contentcache {title}{' (--quick)' if quick else ''}")
    for line in machine(workdir):
        print(line)
    print(f"  reactor {type(reactor).__name__}, disk pool of {DEFAULT_THREADS} threads")
    if s3 is None:
        print("  S3: skipped (--no-s3)")
    else:
        print(f"  S3: SeaweedFS {weed_version()} (weed mini, data on the same disk) at {s3.endpoint}, "
              f"bucket {s3.bucket}; botocore client with {DEFAULT_THREADS + 2} connections, "
              f"{exact(PART_SIZE)} parts")


#: A benchmark of the store run under the reactor: it measures with the
#: options given, in the temporary directory, on S3 if not L{None}.
StoreBenchmark = Callable[[Reactor, str, argparse.Namespace, S3Server | None], Coroutine[Any, Any, None]]


def print_total_time(started: float) -> None:
    print()
    print(f"total time: {time.perf_counter() - started:.0f} s")


async def _timed(
    reactor: Reactor, benchmark: StoreBenchmark, workdir: str, args: argparse.Namespace,
    s3: S3Server | None,
) -> None:
    started = time.perf_counter()
    await benchmark(reactor, workdir, args, s3)
    print_total_time(started)


def react_on_storage(benchmark: StoreBenchmark, args: argparse.Namespace) -> None:
    """
    Run C{benchmark} under the reactor with the L{storage} of C{args},
    showing only warnings and failures of the log, then print how long it
    took; exit with status 0 when it is done, 1 if it raised.
    """
    show_warnings()
    with storage(args) as (workdir, s3):
        react(_timed, (benchmark, workdir, args, s3))


# The daemon under wrk.

CONNECTIONS = (1, 32)
#: wrk threads per connection count: the machines this runs on have 2 cores.
WRK_THREADS = {1: 1, 32: 2}
DEFAULT_DURATION = 5
#: Each URL gets this many seconds of load at the most connections before
#: it is measured: the daemon's disk pool starts its threads on demand.
WARM_UP_SECONDS = 1
#: wrk counts a request as timed out after this long.
WRK_TIMEOUT = "5s"

START_TIMEOUT = 30.0
STOP_TIMEOUT = 10.0
HTTP_TIMEOUT = 30.0
#: How much of a server's log is kept for an error message.
LOG_TAIL = 16 * KiB

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


def add_duration_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--duration", type=int, default=DEFAULT_DURATION, metavar="SECONDS",
        help=f"how long wrk loads each line (default: {DEFAULT_DURATION})",
    )


def check_duration(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.duration < 1:
        parser.error("--duration needs a whole number of seconds, at least 1")


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


@frozen
class Wrk:
    """
    The wrk program at C{path}, counting a request as timed out after
    C{timeout}.
    """

    path: str
    timeout: str = WRK_TIMEOUT

    def version(self) -> str:
        # "wrk debian/4.1.0-3+b2 [epoll] Copyright (C) 2012 Will Glozer"
        result = subprocess.run([self.path, "-v"], capture_output=True, text=True,
                                timeout=HTTP_TIMEOUT)
        words = (result.stdout + result.stderr).split()
        return words[1] if len(words) > 1 else "(unknown version)"

    def run(
        self, url: str, connections: int, seconds: int, headers: dict[str, str] | None = None
    ) -> WrkResult:
        """
        Load C{url} for C{seconds} at C{connections} connections, sending
        C{headers} with every request.
        """
        command = [
            self.path, "--latency", "--threads", str(WRK_THREADS[connections]),
            "--connections", str(connections), "--duration", f"{seconds}s",
            "--timeout", self.timeout,
            *itertools.chain.from_iterable(
                ("--header", f"{k}: {v}") for k, v in (headers or {}).items()
            ),
            url,
        ]
        result = subprocess.run(command, capture_output=True, text=True,
                                timeout=seconds + START_TIMEOUT)
        if result.returncode != 0:
            raise BenchError(f"{' '.join(command)} exited with status {result.returncode}:\n"
                             f"{result.stdout}{result.stderr}")
        return parse_wrk(result.stdout)


def wrk_settings(duration: int) -> str:
    """
    The line of the preamble that says how wrk measures.
    """
    return (f"  wrk --latency: {duration} s per line, after {WARM_UP_SECONDS} s at "
            f"{max(CONNECTIONS)} connections per URL; wrk threads: "
            + ", ".join(f"{WRK_THREADS[c]} for {c}" for c in CONNECTIONS) + " connections")


def table_header(columns: str) -> str:
    """
    The header of the table of measurements; C{columns} name what a row
    measured.
    """
    return f"  {columns} {'conns':>5} {'req/s':>10} {'p50 ms':>9} {'p99 ms':>9}"


def table_row(label: str, connections: int, result: WrkResult, rate: str = ",.0f") -> str:
    """
    A row of the table: C{label} says what was measured, C{rate} is the
    format of its requests/s.
    """
    errors = f"  {result.socket_errors} socket errors" if result.socket_errors else ""
    return (f"  {label} {connections:>5} {result.requests_per_second:>10{rate}}"
            f" {result.p50 * 1000:>9.3f} {result.p99 * 1000:>9.3f}{errors}")


@frozen
class Row:
    """
    A row of the table: the target measured, at how many connections, and
    what wrk measured.
    """

    target: str
    connections: int
    result: WrkResult
    #: The width of the target column, and the format of requests/s.
    WIDTH: ClassVar[int] = 20
    RATE: ClassVar[str] = ",.0f"

    def __str__(self) -> str:
        return table_row(f"{self.target:<{self.WIDTH}}", self.connections, self.result, self.RATE)

    @classmethod
    def header(cls) -> str:
        return table_header(f"{'target':<{cls.WIDTH}}")


class ServerLog(Protocol):
    """
    A server's log as it is written: its tail, for error messages, and its
    end.
    """

    def tail(self) -> str:
        ...

    def join(self) -> None:
        """
        Wait for the end of the log (the process has exited).
        """


def measure(
    wrk: Wrk,
    url: str,
    seconds: int,
    row: Callable[[int, WrkResult], R],
    *,
    headers: dict[str, str] | None = None,
    server: str,
    what: str,
    log: ServerLog,
) -> list[R]:
    """
    Load C{url} for L{WARM_UP_SECONDS}, then measure it at each of
    L{CONNECTIONS}; make each measurement a C{row} and print it as it
    comes. C{server} answering a request for C{what} with an error is a
    L{BenchError}.
    """
    wrk.run(url, max(CONNECTIONS), WARM_UP_SECONDS, headers)
    rows = []
    for connections in CONNECTIONS:
        result = wrk.run(url, connections, seconds, headers)
        if result.non_2xx:
            raise BenchError(
                f"{server} answered {result.non_2xx} of {result.requests} requests for "
                f"{what} with an error; its log ends:\n{log.tail()}"
            )
        measured = row(connections, result)
        print(measured, flush=True)
        rows.append(measured)
    return rows


def stop(process: subprocess.Popen[bytes], log: ServerLog, name: str) -> None:
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
    log.join()
    # Status 0, or killed by our SIGTERM or by the terminal's Ctrl-C.
    if process.returncode not in (0, -signal.SIGTERM, -signal.SIGINT):
        print(f"warning: {name} exited with status {process.returncode}; its log ends:\n"
              f"{log.tail()}", file=sys.stderr)


def log_tail(daemon: Daemon) -> str:
    return daemon.output[-LOG_TAIL:].decode("utf-8", "replace")


class DaemonLog:
    """
    The daemon's log as the tests' L{Daemon} collects it, as a
    L{ServerLog}.
    """

    def __init__(self, daemon: Daemon) -> None:
        self._daemon = daemon

    def tail(self) -> str:
        return log_tail(self._daemon)

    def join(self) -> None:
        self._daemon._reader.join(STOP_TIMEOUT)


def start_daemon(
    stack: ExitStack, storage: str, extra: Sequence[str], env: dict[str, str] | None = None
) -> tuple[Daemon, DaemonLog]:
    """
    C{twistd -n contentcache} on 127.0.0.1 with the options C{extra} and
    the variables C{env} added to the environment; stopped when C{stack}
    closes.
    """
    daemon = Daemon(storage, extra, env=env)
    log = DaemonLog(daemon)
    stack.callback(daemon.stop)
    stack.callback(stop, daemon.process, log, "the daemon")
    return daemon, log


def get(
    url: str, path: str, headers: dict[str, str] | None = None, timeout: float = HTTP_TIMEOUT
) -> tuple[int, str | None, bytes]:
    """
    GET C{path} from the server at C{url}: status, X-Cache and body. The
    request has exactly C{headers} if given (as wrk sends them: no
    Accept-Encoding), else http.client's (Host, Accept-Encoding: identity).
    """
    port = int(url.rsplit(":", 1)[1])
    connection = http.client.HTTPConnection(LOOPBACK, port, timeout=timeout)
    try:
        if headers is None:
            connection.request("GET", path)
        else:
            connection.putrequest("GET", path, skip_host=True, skip_accept_encoding=True)
            for name, value in headers.items():
                connection.putheader(name, value)
            connection.endheaders()
        response = connection.getresponse()
        return response.status, response.getheader("X-Cache"), response.read()
    except (OSError, http.client.HTTPException) as e:
        raise BenchError(f"GET {url}{path} failed: {e}") from None
    finally:
        connection.close()


def check_get(
    url: str,
    path: str,
    body: bytes,
    log: ServerLog,
    x_cache: str | None = None,
    server: str = "the daemon",
) -> None:
    """
    GET C{path}: it must answer 200 with C{body} (and C{x_cache} in
    X-Cache, if given); if not, the error ends with C{server}'s log.
    """
    status, cache, received = get(url, path)
    if status != 200 or received != body or (x_cache is not None and cache != x_cache):
        raise BenchError(
            f"GET {url}{path} answered {status} (X-Cache {cache}) with {len(received)} bytes, "
            f"{'the same as' if received == body else 'not'} the upstream's {len(body)}; "
            f"{server}'s log ends:\n{log.tail()}"
        )


def describe(daemon: Daemon, headers: dict[str, str] | None = None) -> str:
    """
    What the daemon runs on, as its log and C{/health} say.
    """
    started = _TWISTD_STARTING.search(daemon.output.decode("utf-8", "replace"))
    _, _, health = get(daemon.url, "/health", headers)
    version = json.loads(health).get("version", "?")
    if started is None:
        return f"twistd -n contentcache, contentcache {version}"
    twisted_version, python, python_version = started.groups()
    return (f"twistd -n contentcache, contentcache {version}, Twisted {twisted_version}, "
            f"Python {python_version} ({python})")


def _terminated(signum: int, frame: FrameType | None) -> None:
    # Unwind as Ctrl-C does, so that every process started here is stopped.
    raise KeyboardInterrupt


def run_with_wrk(
    benchmark: Callable[[Wrk, str, argparse.Namespace], bool],
    args: argparse.Namespace,
    timeout: str = WRK_TIMEOUT,
) -> None:
    """
    Run C{benchmark} with wrk (C{timeout} per request) in a temporary
    directory, and exit with status 1 if it missed its target or could not
    measure, 130 on Ctrl-C or SIGTERM: each once every process it started
    has stopped.
    """
    path = shutil.which("wrk")
    if path is None:
        print("wrk is not on PATH: this benchmark measures with it "
              "(on Debian: apt-get install wrk).", file=sys.stderr)
        raise SystemExit(1)
    signal.signal(signal.SIGTERM, _terminated)
    try:
        with temporary_directory(args.dir) as workdir:
            passed = benchmark(Wrk(path, timeout), workdir, args)
    except BenchError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(1) from None
    except KeyboardInterrupt:
        print("interrupted; every process started was stopped", file=sys.stderr)
        raise SystemExit(130) from None
    if not passed:
        raise SystemExit(1)


# The GOPROXY module version.

MODULE = "example.com/bench"
VERSION = "v1.0.0"
EXTENSIONS = ("info", "zip")
#: The version's files, without their extension, under a GOPROXY's root.
_VERSION_PATH = f"{escape(MODULE)}/@v/{escape(VERSION)}"
#: Where the daemon serves the version's files, by extension.
PROXY_PATHS = {ext: f"/goproxy/{_VERSION_PATH}.{ext}" for ext in EXTENSIONS}


def goproxy_options(upstream: str) -> list[str]:
    """
    The daemon's options to fetch modules from C{upstream}, with no
    checksum database.
    """
    return ["--go-upstream", upstream, "--go-sumdb", "off"]


@frozen
class GoModule:
    """
    The module version in an upstream's tree: its files and their bytes,
    by extension, and how many random bytes its zip holds.
    """

    files: dict[str, str]
    bodies: dict[str, bytes]
    payload_size: int

    def __str__(self) -> str:
        info, archive = len(self.bodies["info"]), len(self.bodies["zip"])
        return (f"  module {MODULE} {VERSION}: .info {human(info)}, .zip {human(archive)} "
                f"({archive:,} bytes: a go.mod and {human(self.payload_size)} of random bytes,"
                " stored)")

    def fetched(self, upstream: UpstreamFixture) -> dict[str, int]:
        """
        How many times C{upstream} was asked for each file.
        """
        return {ext: upstream.count(f"/{_VERSION_PATH}.{ext}") for ext in EXTENSIONS}

    def warm(self, url: str, log: ServerLog, server: str = "the daemon") -> None:
        """
        GET each file from the daemon at C{url} twice: a miss, then a hit
        (L{check_get} checks both).
        """
        for ext, path in PROXY_PATHS.items():
            check_get(url, path, self.bodies[ext], log, server=server)
            check_get(url, path, self.bodies[ext], log, x_cache="HIT", server=server)


def build_module(root: str, payload_size: int) -> GoModule:
    """
    A GOPROXY tree under C{root} holding one module version whose zip is a
    go.mod and C{payload_size} random bytes.
    """
    build_payload_modules(root, MODULE, [VERSION], payload_size)
    base = os.path.join(root, *escape(MODULE).split("/"), "@v", escape(VERSION))
    files = {ext: f"{base}.{ext}" for ext in EXTENSIONS}
    bodies = {}
    for ext, file in files.items():
        with open(file, "rb") as f:
            bodies[ext] = f.read()
    return GoModule(files, bodies, payload_size)


def write_file(root: str, path: str, content: bytes) -> None:
    """
    Write C{content} at the URL path C{path} under C{root} (an upstream
    fixture's tree).
    """
    file = os.path.join(root, *path.lstrip("/").split("/"))
    os.makedirs(os.path.dirname(file), exist_ok=True)
    with open(file, "wb") as f:
        f.write(content)
