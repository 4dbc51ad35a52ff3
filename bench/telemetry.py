"""
What metrics and tracing cost cached GOPROXY answers, measured with wrk.

Starts the real daemon as users start it (C{twistd -n contentcache}) on
127.0.0.1 in front of an upstream fixture holding one module version whose
zip holds 16 KiB of random bytes, twice per round, one at a time: "off",
with C{--no-metrics} and no OTEL_* variables (tracing's API does nothing),
and "on", counting requests for C{/metrics} and exporting spans over OTLP
to a fake collector on 127.0.0.1. Each daemon gets a fresh storage, warmed
with one GET of the version's C{.info} and C{.zip}, and both are measured
with C{wrk --latency} at 1 and 32 connections. Each setting runs once per
round, in mirrored order (off, on, then on, off), so that a drift over the
run weighs on both alike. Prints every measurement, then off against on
(the median over the rounds) with the relative change, and PASS or FAIL
for the target: with both on, a cached C{.info} at 32 connections loses
under 10% of its requests/s.

Run it from the repository root, with the tests' environment::

    python bench/telemetry.py                 # about a minute and a half
    python bench/telemetry.py --duration 1 --rounds 1    # a smoke run

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
import statistics
import subprocess
import sys
import tempfile
import zipfile
from contextlib import ExitStack
from types import FrameType
from typing import Sequence

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
#: Random bytes in the module zip: a small artifact, read in one trip to
#: the disk pool.
PAYLOAD_SIZE = 16 * KiB
EXTENSIONS = ("info", "zip")

OFF = "off"
ON = "on"
SETTINGS = (OFF, ON)
#: Where the fake collector takes spans, as OTLP over HTTP posts them.
TRACES_PATH = "/v1/traces"
SERVICE_NAME = "contentcache-bench"

CONNECTIONS = (1, 32)
#: wrk threads per connection count: the machines this runs on have 2 cores.
WRK_THREADS = {1: 1, 32: 2}
DEFAULT_DURATION = 5
DEFAULT_ROUNDS = 2
#: The share of requests traced when on, as a busy cache would be set up.
DEFAULT_SAMPLE = 0.1
#: Each URL gets this many seconds of load at the most connections before
#: it is measured: the daemon's disk pool starts its threads on demand.
WARM_UP_SECONDS = 1
#: wrk counts a request as timed out after this long.
WRK_TIMEOUT = "5s"

#: The target: with metrics and tracing on, a cached .info at 32
#: connections keeps more than this share of its requests/s.
TARGET_LOSS = 0.10
TARGET_EXT = "info"
TARGET_CONNECTIONS = 32

START_TIMEOUT = 30.0
STOP_TIMEOUT = 10.0
HTTP_TIMEOUT = 30.0
#: How much of the daemon's log is kept for an error message.
LOG_TAIL = 16 * KiB

_TWISTD_STARTING = re.compile(r"twistd (\S+) \((\S+) (\S+)\) starting up")
_TRACING_ON = re.compile(rb"tracing: exporting spans with (\S+)")
#: The SDK's warning for each span it drops, its queue being full.
_SPANS_DROPPED = b"Queue full, dropping"
#: The requests the daemon counted, one sample per label set.
_REQUESTS_COUNTED = re.compile(r"^contentcache_requests_total\{[^}]*\} ([0-9.e+]+)$", re.M)

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
    why, with the daemon's last log lines where they help.
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


def stop(daemon: Daemon) -> None:
    """
    SIGTERM, and SIGKILL if the daemon is still running L{STOP_TIMEOUT}
    seconds later; a warning on stderr if it did not stop cleanly.
    """
    process = daemon.process
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
            print(f"warning: the daemon was still running {STOP_TIMEOUT:g} s after SIGTERM; killed",
                  file=sys.stderr)
    # Status 0, or killed by our SIGTERM or by the terminal's Ctrl-C.
    if process.returncode not in (0, -signal.SIGTERM, -signal.SIGINT):
        # Daemon.log waits for the last lines to arrive.
        print(f"warning: the daemon exited with status {process.returncode}; its log ends:\n"
              f"{daemon.log()[-LOG_TAIL:]}", file=sys.stderr)


def log_tail(daemon: Daemon) -> str:
    return daemon.output[-LOG_TAIL:].decode("utf-8", "replace")


def clear_otel_environment() -> list[str]:
    """
    Remove every OTEL_* variable from this process's environment, which
    the daemons inherit: "off" must run with tracing's API alone. Returns
    the names removed.
    """
    names = sorted(name for name in os.environ if name.startswith("OTEL_"))
    for name in names:
        del os.environ[name]
    return names


def tracing_environment(collector: UpstreamFixture, sample: float) -> dict[str, str]:
    """
    The standard settings that make the daemon export its spans over OTLP
    (HTTP and protobuf) to C{collector}, tracing a share C{sample} of the
    requests, as a busy production cache is configured.
    """
    return {
        "OTEL_TRACES_EXPORTER": "otlp",
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": f"{collector.url}{TRACES_PATH}",
        "OTEL_SERVICE_NAME": SERVICE_NAME,
        "OTEL_TRACES_SAMPLER": "parentbased_traceidratio",
        "OTEL_TRACES_SAMPLER_ARG": f"{sample:g}",
    }


def start_daemon(
    stack: ExitStack, storage: str, upstream: str, setting: str, collector: UpstreamFixture, sample: float
) -> Daemon:
    """
    C{twistd -n contentcache} on 127.0.0.1, fetching from C{upstream}, with
    no checksum database, and with metrics and tracing as C{setting} says;
    stopped when C{stack} closes.
    """
    extra = ["--go-upstream", upstream, "--go-sumdb", "off"]
    if setting == OFF:
        daemon = Daemon(storage, [*extra, "--no-metrics"])
    else:
        daemon = Daemon(storage, extra, env=tracing_environment(collector, sample))
    stack.callback(daemon.stop)
    stack.callback(stop, daemon)
    return daemon


def check_tracing(daemon: Daemon, setting: str) -> None:
    """
    The daemon, once it has answered, must have said that it exports spans
    with otlp if C{setting} is on, and nothing of tracing if it is off
    (twistd listens before it starts the services, so the line comes after
    the one L{Daemon} waits for).
    """
    tracing = _TRACING_ON.search(daemon.output)
    if setting == ON and (tracing is None or tracing[1] != b"otlp"):
        raise BenchError("the daemon started with OTEL_TRACES_EXPORTER=otlp but did not log "
                         f"that it exports spans with otlp; its log:\n{log_tail(daemon)}")
    if setting == OFF and tracing is not None:
        raise BenchError("the daemon started with no OTEL_* variables but exports spans; "
                         f"its log:\n{log_tail(daemon)}")


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


def check_get(daemon: Daemon, path: str, body: bytes, x_cache: str | None = None) -> None:
    """
    GET C{path}: it must answer 200 with C{body} (and C{x_cache} in
    X-Cache, if given).
    """
    status, cache, received = get(daemon.url, path)
    if status != 200 or received != body or (x_cache is not None and cache != x_cache):
        raise BenchError(
            f"GET {daemon.url}{path} answered {status} (X-Cache {cache}) with {len(received)} "
            f"bytes, {'the same as' if received == body else 'not'} the upstream's {len(body)}; "
            f"the daemon's log ends:\n{log_tail(daemon)}"
        )


def counted_requests(daemon: Daemon) -> int:
    """
    The requests the daemon's C{/metrics} says it has answered.
    """
    status, _, body = get(daemon.url, "/metrics")
    if status != 200:
        raise BenchError(f"GET {daemon.url}/metrics answered {status}; "
                         f"the daemon's log ends:\n{log_tail(daemon)}")
    return sum(int(float(m[1])) for m in _REQUESTS_COUNTED.finditer(body.decode("utf-8")))


def exported_bytes(collector: UpstreamFixture) -> int:
    """
    The bytes of spans the collector has been sent so far.
    """
    total = 0
    for method, path, headers in list(collector.log):
        if method == "POST" and path == TRACES_PATH:
            lengths = [v for k, v in headers.items() if k.lower() == "content-length"]
            total += int(lengths[0]) if lengths else 0
    return total


@frozen
class Row:
    round: int
    setting: str
    ext: str
    connections: int
    result: WrkResult

    def __str__(self) -> str:
        r = self.result
        errors = f"  {r.socket_errors} socket errors" if r.socket_errors else ""
        return (f"  {self.round:>5} {self.setting:<7} {'.' + self.ext:<6} {self.connections:>5}"
                f" {r.requests_per_second:>10,.0f} {r.p50 * 1000:>9.3f} {r.p99 * 1000:>9.3f}{errors}")


HEADER = (f"  {'round':>5} {'setting':<7} {'target':<6} {'conns':>5} {'req/s':>10}"
          f" {'p50 ms':>9} {'p99 ms':>9}")


def measure(
    wrk: str, daemon: Daemon, paths: dict[str, str], round: int, setting: str, seconds: int
) -> list[Row]:
    """
    Load each of C{paths} for L{WARM_UP_SECONDS}, then measure it at each
    of L{CONNECTIONS}; print the rows as they come.
    """
    rows = []
    for ext, path in paths.items():
        run_wrk(wrk, daemon.url + path, max(CONNECTIONS), WARM_UP_SECONDS)
        for connections in CONNECTIONS:
            result = run_wrk(wrk, daemon.url + path, connections, seconds)
            if result.non_2xx:
                raise BenchError(
                    f"the daemon answered {result.non_2xx} of {result.requests} requests for "
                    f"{path} with an error; its log ends:\n{log_tail(daemon)}"
                )
            row = Row(round, setting, ext, connections, result)
            print(row, flush=True)
            rows.append(row)
    return rows


@frozen
class Run:
    """
    One daemon's measurements, and what it counted and exported meanwhile.
    """

    round: int
    setting: str
    rows: list[Row]
    #: The requests /metrics counted, measured or not.
    counted: int
    #: Posts of spans the collector received during the measurements.
    posts: int
    #: Their bytes.
    exported: int
    #: The spans the SDK dropped, its queue being full.
    dropped: int

    @property
    def measured(self) -> int:
        return sum(row.result.requests for row in self.rows)


def describe(daemon: Daemon) -> str:
    """
    What the daemon runs on, as its log and C{/health} say.
    """
    started = _TWISTD_STARTING.search(daemon.output.decode("utf-8", "replace"))
    _, _, health = get(daemon.url, "/health")
    version = json.loads(health).get("version", "?")
    if started is None:
        return f"twistd -n contentcache, contentcache {version}"
    twisted_version, python, python_version = started.groups()
    return (f"twistd -n contentcache, contentcache {version}, Twisted {twisted_version}, "
            f"Python {python_version} ({python})")


def run_setting(
    wrk: str,
    workdir: str,
    upstream: UpstreamFixture,
    collector: UpstreamFixture,
    bodies: dict[str, bytes],
    round: int,
    setting: str,
    args: argparse.Namespace,
    first: bool,
) -> Run:
    """
    Start a daemon with C{setting} over a storage of its own, warm its
    cache, measure it, check that it counted and exported as C{setting}
    says, and stop it. The C{first} prints what the daemon runs on and the
    table's header.
    """
    escaped = f"{escape(MODULE)}/@v/{escape(VERSION)}"
    paths = {ext: f"/goproxy/{escaped}.{ext}" for ext in EXTENSIONS}
    with ExitStack() as stack:
        storage = os.path.join(workdir, f"storage-{round}-{setting}")
        daemon = start_daemon(stack, storage, upstream.url, setting, collector, args.sample)
        for ext, path in paths.items():
            check_get(daemon, path, bodies[ext])
            check_get(daemon, path, bodies[ext], x_cache="HIT")
        check_tracing(daemon, setting)
        if first:
            print(f"  daemon: {describe(daemon)}")
            print("  cache warmed per daemon: one GET of each (a miss), a second answered with"
                  " X-Cache: HIT")
            print()
            print(HEADER, flush=True)
        posts, exported = collector.count(TRACES_PATH), exported_bytes(collector)
        rows = measure(wrk, daemon, paths, round, setting, args.duration)
        # Before the daemon stops: at its stop the SDK sends what is left.
        run = Run(
            round, setting, rows, counted_requests(daemon), collector.count(TRACES_PATH) - posts,
            exported_bytes(collector) - exported, daemon.output.count(_SPANS_DROPPED),
        )
    if setting == ON:
        if run.posts < 1:
            raise BenchError("the collector received no spans while the daemon exported to it")
        if run.counted < run.measured:
            raise BenchError(f"/metrics counted {run.counted:,} requests, fewer than the "
                             f"{run.measured:,} wrk measured")
    else:
        if run.posts:
            raise BenchError(f"the collector received {run.posts} posts of spans from a daemon "
                             "with tracing off")
        if run.counted:
            raise BenchError(f"/metrics counted {run.counted:,} requests with --no-metrics")
    return run


def order(rounds: int) -> list[tuple[int, str]]:
    """
    Each round runs both settings; every other round mirrors the order, so
    that off and on take turns going first (off, on, on, off, ...).
    """
    runs = []
    for round in range(1, rounds + 1):
        settings = SETTINGS if round % 2 else tuple(reversed(SETTINGS))
        runs += [(round, setting) for setting in settings]
    return runs


def change(off: float, on: float) -> str:
    return f"{(on - off) / off * 100:+.1f}%"


def spread(values: list[float]) -> float:
    """
    How far apart repeats of one measurement are, relative to their median.
    """
    return (max(values) - min(values)) / statistics.median(values)


@frozen
class Comparison:
    ext: str
    connections: int
    #: Per setting, one result per round.
    results: dict[str, list[WrkResult]]

    def median(self, setting: str, field: str) -> float:
        return statistics.median(getattr(r, field) for r in self.results[setting])

    @property
    def noise(self) -> float | None:
        """
        The widest spread of requests/s over the rounds, either setting;
        L{None} with one round.
        """
        if min(len(results) for results in self.results.values()) < 2:
            return None
        return max(spread([r.requests_per_second for r in self.results[s]]) for s in SETTINGS)

    def __str__(self) -> str:
        rate = {s: self.median(s, "requests_per_second") for s in SETTINGS}
        p50 = {s: self.median(s, "p50") for s in SETTINGS}
        p99 = {s: self.median(s, "p99") for s in SETTINGS}
        return (
            f"  {'.' + self.ext:<6} {self.connections:>5}"
            f" {rate[OFF]:>10,.0f} {rate[ON]:>10,.0f} {change(rate[OFF], rate[ON]):>7}"
            f" {p50[OFF] * 1000:>8.3f} {p50[ON] * 1000:>8.3f} {change(p50[OFF], p50[ON]):>7}"
            f" {p99[OFF] * 1000:>8.3f} {p99[ON] * 1000:>8.3f}"
            + (f" {self.noise * 100:>6.1f}%" if self.noise is not None else f" {'-':>7}")
        )


COMPARISON_HEADER = (
    f"  {'target':<6} {'conns':>5} {'off req/s':>10} {'on req/s':>10} {'change':>7}"
    f" {'off p50':>8} {'on p50':>8} {'change':>7} {'off p99':>8} {'on p99':>8} {'noise':>7}"
)


def compare(rows: list[Row]) -> list[Comparison]:
    comparisons = []
    for ext in EXTENSIONS:
        for connections in CONNECTIONS:
            results = {
                setting: [
                    row.result for row in rows
                    if (row.ext, row.connections, row.setting) == (ext, connections, setting)
                ]
                for setting in SETTINGS
            }
            comparisons.append(Comparison(ext, connections, results))
    return comparisons


def benchmark(wrk: str, workdir: str, args: argparse.Namespace) -> bool:
    """
    Measure, print, and return whether the target was met.
    """
    cleared = clear_otel_environment()
    files = build_module(os.path.join(workdir, "upstream"))
    bodies = {}
    for ext, file in files.items():
        with open(file, "rb") as f:
            bodies[ext] = f.read()
    escaped = f"{escape(MODULE)}/@v/{escape(VERSION)}"
    schedule = order(args.rounds)

    print("contentcache telemetry benchmark: cached GOPROXY answers with metrics and tracing"
          " off and on, under wrk on 127.0.0.1")
    print(f"  workdir: {workdir} (removed at the end)")
    print(f"  machine: {os.cpu_count()} CPUs, shared by wrk, the daemon and the fake collector;"
          f" wrk {wrk_version(wrk)}")
    print(f"  module {MODULE} {VERSION}: .info {human(len(bodies['info']))}, "
          f".zip {human(len(bodies['zip']))} ({len(bodies['zip']):,} bytes: a go.mod and "
          f"{human(PAYLOAD_SIZE)} of random bytes, stored)")
    print("  off: --no-metrics, no OTEL_* variables"
          + (f" (removed from this environment: {', '.join(cleared)})" if cleared else ""))
    print("  on: metrics counted (the default); OTEL_TRACES_EXPORTER=otlp,"
          f" OTEL_EXPORTER_OTLP_TRACES_ENDPOINT=http://{LOOPBACK}:<port>{TRACES_PATH}"
          f" (a fake collector answering 200), OTEL_SERVICE_NAME={SERVICE_NAME},"
          f" OTEL_TRACES_SAMPLER=parentbased_traceidratio with OTEL_TRACES_SAMPLER_ARG={args.sample:g}"
          f" ({args.sample:.0%} of requests traced); the SDK's default batching")
    print(f"  {args.rounds} round{'s' if args.rounds != 1 else ''}, one daemon at a time, each"
          " with a fresh storage: " + ", ".join(setting for _, setting in schedule)
          + (" (mirrored, so that a drift over the run weighs on both alike)"
             if args.rounds > 1 else ""))
    print(f"  wrk --latency: {args.duration} s per line, after {WARM_UP_SECONDS} s at "
          f"{max(CONNECTIONS)} connections per URL; wrk threads: "
          + ", ".join(f"{WRK_THREADS[c]} for {c}" for c in CONNECTIONS) + " connections")

    runs: list[Run] = []
    with ExitStack() as stack:
        upstream = UpstreamFixture(os.path.join(workdir, "upstream"))
        stack.callback(upstream.stop)
        collector_root = os.path.join(workdir, "collector")
        os.mkdir(collector_root)
        collector = UpstreamFixture(collector_root)
        collector.override[TRACES_PATH] = (200, b"")
        stack.callback(collector.stop)
        for round, setting in schedule:
            runs.append(run_setting(wrk, workdir, upstream, collector, bodies, round, setting,
                                    args, first=not runs))
        fetched = {ext: upstream.count(f"/{escaped}.{ext}") for ext in EXTENSIONS}
    if any(n != len(schedule) for n in fetched.values()):
        raise BenchError(f"upstream was asked for the files {fetched} times, not once per "
                         f"daemon ({len(schedule)}): the answers measured were not all from the "
                         "cache")
    return report(runs)


def report(runs: list[Run]) -> bool:
    """
    Print off against on and the verdict; return whether the target was met.
    """
    comparisons = compare([row for run in runs for row in run.rows])
    rounds = len(runs) // len(SETTINGS)
    print()
    print(f"  off against on, the median of {rounds} round{'s' if rounds != 1 else ''}"
          " (noise: the widest spread of req/s between rounds of one setting):")
    print(COMPARISON_HEADER)
    for comparison in comparisons:
        print(comparison)
    print()
    print("  upstream was asked once for each file per daemon (the warm-up's miss)")
    on = [run for run in runs if run.setting == ON]
    print("  off: /metrics counted no requests and the collector received nothing")
    for run in on:
        print(f"  on, round {run.round}: /metrics counted {run.counted:,} requests ({run.measured:,}"
              " measured, the rest warm-up and checks); while wrk loaded it, the collector"
              f" received {run.posts} posts, {human(run.exported)} of spans")
    dropped = sum(run.dropped for run in on)
    if dropped:
        print(f"  on: the SDK dropped {dropped:,} spans, its queue being full: those were never"
              " exported, so on costs more where the export keeps up")
    else:
        print("  on: the SDK dropped no span (it never said its queue was full)")
    judged = next(c for c in comparisons
                  if (c.ext, c.connections) == (TARGET_EXT, TARGET_CONNECTIONS))
    off_rate = judged.median(OFF, "requests_per_second")
    on_rate = judged.median(ON, "requests_per_second")
    loss = (off_rate - on_rate) / off_rate
    passed = loss < TARGET_LOSS
    noise = (f"; repeats of one setting differed by up to {judged.noise * 100:.1f}%"
             if judged.noise is not None else "; one round, so no measure of the noise")
    print(f"  {'PASS' if passed else 'FAIL'}: cached .{TARGET_EXT} at {TARGET_CONNECTIONS}"
          f" connections serves {on_rate:,.0f} req/s with metrics and tracing on, against"
          f" {off_rate:,.0f} off: {loss * 100:.1f}% lower (the target is under"
          f" {TARGET_LOSS * 100:g}% lower){noise}")
    if judged.noise is not None and judged.noise >= abs(loss):
        print("  the difference is within the noise: measure longer (--duration) or more often"
              " (--rounds) before trusting it")
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
        "--rounds", type=int, default=DEFAULT_ROUNDS, metavar="N",
        help=f"how many times each setting is measured (default: {DEFAULT_ROUNDS})",
    )
    parser.add_argument(
        "--sample", type=float, default=DEFAULT_SAMPLE, metavar="RATIO",
        help=f"the share of requests traced when on (default: {DEFAULT_SAMPLE:g}; 1 traces every one)",
    )
    parser.add_argument(
        "--dir",
        help="create the temporary directory (module tree and storage) in DIR"
        " (default: the system's temporary directory)",
    )
    args = parser.parse_args(argv)
    if args.duration < 1:
        parser.error("--duration needs a whole number of seconds, at least 1")
    if args.rounds < 1:
        parser.error("--rounds needs a whole number, at least 1")
    if not 0 < args.sample <= 1:
        parser.error("--sample needs a ratio above 0, at most 1")

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
