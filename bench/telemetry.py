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
import os
import re
import statistics
from contextlib import ExitStack
from functools import partial
from typing import Sequence

from attrs import frozen

# First: it puts the repository on the path for the tests' helpers.
from common import (
    CONNECTIONS, EXTENSIONS, LOOPBACK, PROXY_PATHS, BenchError, DaemonLog, GoModule, KiB, MiB,
    Wrk, WrkResult, add_dir_option, add_duration_option, build_module, check_dir,
    check_duration, describe, get, goproxy_options, human, log_tail, make_parser, measure,
    run_with_wrk, start_daemon, table_header, table_row, wrk_settings,
)
from tests.daemon import Daemon
from tests.upstream import UpstreamFixture

#: Random bytes in the module zip: a small artifact, read in one trip to
#: the disk pool.
PAYLOAD_SIZE = 16 * KiB

OFF = "off"
ON = "on"
SETTINGS = (OFF, ON)
#: Where the fake collector takes spans, as OTLP over HTTP posts them.
TRACES_PATH = "/v1/traces"
SERVICE_NAME = "contentcache-bench"

DEFAULT_ROUNDS = 2
#: The share of requests traced when on, as a busy cache would be set up.
DEFAULT_SAMPLE = 0.1

#: The target: with metrics and tracing on, a cached .info at 32
#: connections keeps more than this share of its requests/s.
TARGET_LOSS = 0.10
TARGET_EXT = "info"
TARGET_CONNECTIONS = 32

_TRACING_ON = re.compile(rb"tracing: exporting spans with (\S+)")
#: The SDK's warning for each span it drops, its queue being full.
_SPANS_DROPPED = b"Queue full, dropping"
#: The requests the daemon counted, one sample per label set.
_REQUESTS_COUNTED = re.compile(r"^contentcache_requests_total\{[^}]*\} ([0-9.e+]+)$", re.M)

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


def start_setting(
    stack: ExitStack, storage: str, upstream: str, setting: str, collector: UpstreamFixture, sample: float
) -> tuple[Daemon, DaemonLog]:
    """
    C{twistd -n contentcache} on 127.0.0.1, fetching from C{upstream}, with
    no checksum database, and with metrics and tracing as C{setting} says;
    stopped when C{stack} closes.
    """
    if setting == OFF:
        return start_daemon(stack, storage, [*goproxy_options(upstream), "--no-metrics"])
    return start_daemon(stack, storage, goproxy_options(upstream),
                        tracing_environment(collector, sample))


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
        label = f"{self.round:>5} {self.setting:<7} {'.' + self.ext:<6}"
        return table_row(label, self.connections, self.result)


HEADER = table_header(f"{'round':>5} {'setting':<7} {'target':<6}")


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


def run_setting(
    wrk: Wrk,
    workdir: str,
    upstream: UpstreamFixture,
    collector: UpstreamFixture,
    module: GoModule,
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
    with ExitStack() as stack:
        storage = os.path.join(workdir, f"storage-{round}-{setting}")
        daemon, log = start_setting(stack, storage, upstream.url, setting, collector, args.sample)
        module.warm(daemon.url, log)
        check_tracing(daemon, setting)
        if first:
            print(f"  daemon: {describe(daemon)}")
            print("  cache warmed per daemon: one GET of each (a miss), a second answered with"
                  " X-Cache: HIT")
            print()
            print(HEADER, flush=True)
        posts, exported = collector.count(TRACES_PATH), exported_bytes(collector)
        rows: list[Row] = []
        for ext, path in PROXY_PATHS.items():
            rows += measure(wrk, daemon.url + path, args.duration, partial(Row, round, setting, ext),
                            server="the daemon", what=path, log=log)
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


def benchmark(wrk: Wrk, workdir: str, args: argparse.Namespace) -> bool:
    """
    Measure, print, and return whether the target was met.
    """
    cleared = clear_otel_environment()
    module = build_module(os.path.join(workdir, "upstream"), PAYLOAD_SIZE)
    schedule = order(args.rounds)

    print("contentcache telemetry benchmark: cached GOPROXY answers with metrics and tracing"
          " off and on, under wrk on 127.0.0.1")
    print(f"  workdir: {workdir} (removed at the end)")
    print(f"  machine: {os.cpu_count()} CPUs, shared by wrk, the daemon and the fake collector;"
          f" wrk {wrk.version()}")
    print(module)
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
    print(wrk_settings(args.duration))

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
            runs.append(run_setting(wrk, workdir, upstream, collector, module, round, setting,
                                    args, first=not runs))
        fetched = module.fetched(upstream)
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
              f" received {run.posts} posts, {human(run.exported, largest=MiB)} of spans")
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


def main(argv: Sequence[str] | None = None) -> None:
    parser = make_parser(__doc__)
    add_duration_option(parser)
    parser.add_argument(
        "--rounds", type=int, default=DEFAULT_ROUNDS, metavar="N",
        help=f"how many times each setting is measured (default: {DEFAULT_ROUNDS})",
    )
    parser.add_argument(
        "--sample", type=float, default=DEFAULT_SAMPLE, metavar="RATIO",
        help=f"the share of requests traced when on (default: {DEFAULT_SAMPLE:g}; 1 traces every one)",
    )
    add_dir_option(parser, "directory (module tree and storage)")
    args = parser.parse_args(argv)
    check_duration(parser, args)
    if args.rounds < 1:
        parser.error("--rounds needs a whole number, at least 1")
    if not 0 < args.sample <= 1:
        parser.error("--sample needs a ratio above 0, at most 1")
    check_dir(parser, args)
    run_with_wrk(benchmark, args)


if __name__ == "__main__":
    main()
