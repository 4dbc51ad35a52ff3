"""
Time and peak RSS of one expiry pass over a large generated index.

Generates a storage directory whose index holds 1,000,000 entries over
200,000 blobs (each blob shared by about 5 entries; go and npm keys; blob
sizes from 1 KiB to 1 MiB; last uses spread over 90 days) and picks the
size limit whose least-recently-used walk evicts 10% of the entries. Then,
in a fresh process each and from the same starting state, it runs one pass
as the admin command runs it (C{contentcache gc}: L{SynchronousRunner}, no
reactor) and one as the daemon runs it (the L{DiskPool} under the reactor),
and prints each pass's time, entries/s, what it removed, and its peak RSS
above the baseline.

Run it from the repository root::

    python bench/expiry.py            # full size, under a minute
    python bench/expiry.py --quick    # 100,000 entries over 20,000 blobs

The index is written straight through SQLite, and only the blobs the pass
deletes get a file (an empty one: the sizes a pass counts are the index's).
Generating is timed apart from the passes. The storage lives in a temporary
directory that is always removed, also on an error or Ctrl-C. Exits with
status 1 if a pass removed anything other than what the generated data says
the LRU walk must remove.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import platform
import random
import shutil
import sqlite3
import subprocess
import time
from typing import Any, Iterator, Sequence

from attrs import frozen
from twisted.internet.defer import Deferred
from twisted.internet.task import react
from twisted.python.failure import Failure

from common import (
    KiB, MiB, Reactor, add_dir_option, check_dir, filesystem_store, fresh_process, human,
    make_parser, max_rss_kib, mib, print_inherited, rss_baseline, show_warnings,
    start_disk_pool, status_kib, temporary_directory,
)
from contentcache.expiry import LOW_WATER, Expiry, Policy
from contentcache.index import INDEX_FILENAME, SQLiteIndex
from contentcache.pool import DEFAULT_THREADS, SynchronousRunner
from contentcache.store import BLOB_PREFIX
from contentcache.units import DAY, HOUR

ENTRIES = 1_000_000
BLOBS = 200_000
QUICK_ENTRIES = 100_000
QUICK_BLOBS = 20_000
#: The share of the entries the chosen size limit evicts.
EVICT_SHARE = 0.1

#: Blob sizes in the index are log-uniform between these.
MIN_BLOB_SIZE = KiB
MAX_BLOB_SIZE = MiB
#: Blobs were last used over this long, one after the other, the newest an
#: hour ago.
SPAN = 90 * DAY
#: A blob's entries were last used within this many blob spacings before
#: the blob's last use, so that neighbouring blobs interleave in LRU order.
JITTER_SPACINGS = 3
#: A blob entered the store at least a day (the grace period is minutes)
#: and up to a month before its entries' last use.
MIN_AGE = DAY
MAX_AGE = 30 * DAY
SEED = 20260509
#: Rows per transaction while generating the index.
ROWS_PER_TRANSACTION = 250_000

#: Names for generated go modules and npm packages (22^3 of each).
WORDS = (
    "acme", "async", "cloud", "core", "data", "fast", "graph", "http", "json", "kit",
    "log", "micro", "net", "parse", "query", "redis", "sql", "stream", "tiny", "util",
    "web", "yaml",
)
GO_EXTENSIONS = ("zip", "mod", "info")
#: What the adapters keep in an entry's attrs, about as long as theirs.
GO_ATTRS = {
    "zip": '{"h1":"h1:3bMOExAmPlEhAsHoFaMoDuLeZiPpEdUp7JkL0n9PqRs=","verified":true}',
    "mod": '{"h1":"h1:Zq0ExAmPlEhAsHoFaGoMoDfIlE7JkL0n9PqRsTuVwXy=","verified":true}',
    "info": '{"content_type":"application/json"}',
}
NPM_INTEGRITY = "sha512-" + "ExAmPlE0" * 11

#: How each pass runs, in the order measured.
RUNNERS = {
    "sync": "SynchronousRunner (contentcache gc)",
    "pool": "DiskPool + reactor (the daemon)",
}


def wall_clock() -> Reactor:
    # The reactor's seconds() is the wall clock, as for the admin command;
    # nothing here runs it but the daemon-style pass.
    from twisted.internet import reactor

    return reactor


# Generating the storage.


@frozen
class Generated:
    #: Every blob's hash (hex) and size as the index records it.
    blobs: dict[str, int]
    per_protocol: dict[str, int]
    index_bytes: int
    seconds: float


def blob_rows(rng: random.Random, count: int, now: float) -> Iterator[tuple[str, int, float, float]]:
    """
    (hash, size, created, last use) of C{count} blobs, least recently used
    first.
    """
    spacing = SPAN / count
    ratio = MAX_BLOB_SIZE / MIN_BLOB_SIZE
    for j in range(count):
        last_used = now - HOUR - spacing * (count - 1 - j)
        created = last_used - JITTER_SPACINGS * spacing - MIN_AGE - rng.random() * (MAX_AGE - MIN_AGE)
        size = int(MIN_BLOB_SIZE * ratio ** rng.random())
        yield rng.randbytes(32).hex(), size, created, last_used


def entry_rows(
    rng: random.Random,
    entries: int,
    blobs: list[tuple[str, int, float, float]],
) -> Iterator[tuple[str, str, str, int, str, float, float]]:
    """
    The C{entries} rows of the entries table: entry i refers to blob
    i * len(blobs) // entries, so each blob has its run of entries; each is
    a go module file or an npm tarball with a key no other entry has.
    """
    names = list(itertools.product(WORDS, repeat=3))
    jitter = JITTER_SPACINGS * SPAN / len(blobs)
    first = -1
    for i in range(entries):
        j = i * len(blobs) // entries
        hexhash, size, blob_created, last_used = blobs[j]
        accessed = last_used - rng.random() * jitter
        if j != first:
            # The blob's first entry is the one that stored it.
            first = j
            created = blob_created
        else:
            created = blob_created + rng.random() * (accessed - blob_created)
        a, b, c = names[i % len(names)]
        # Unique per name: the i-th name's n-th version.
        n = i // len(names)
        version = f"{1 + n // 10_000}.{n // 100 % 100}.{n % 100}"
        if rng.random() < 0.5:
            ext = GO_EXTENSIONS[rng.randrange(len(GO_EXTENSIONS))]
            yield ("go", f"github.com/{a}-{b}/{c}/@v/v{version}.{ext}", hexhash, size,
                   GO_ATTRS[ext], created, accessed)
        else:
            name = f"@{a}/{b}-{c}" if n % 2 else f"{a}-{b}-{c}"
            base = name.rpartition("/")[2]
            attrs = f'{{"integrity":"{NPM_INTEGRITY}","version":"{version}"}}'
            yield ("npm", f"tarball:{name}/{base}-{version}.tgz", hexhash, size,
                   attrs, created, accessed)


def generate(directory: str, entries: int, blobs: int) -> Generated:
    """
    Create the index with the real schema (as the daemon does, by opening
    it) and fill it straight through SQLite in a few big transactions.
    """
    started = time.perf_counter()
    index = SQLiteIndex(directory, SynchronousRunner(), wall_clock())
    index.open()
    index.close()

    rng = random.Random(SEED)
    now = time.time()
    rows = list(blob_rows(rng, blobs, now))
    per_protocol = {"go": 0, "npm": 0}
    path = os.path.join(directory, INDEX_FILENAME)
    db = sqlite3.connect(path, isolation_level=None)
    try:
        # Only for filling: nothing else has the file open, and a crash
        # here only loses a benchmark run.
        db.execute("PRAGMA synchronous=OFF")
        db.execute("PRAGMA journal_mode=OFF")
        db.execute(f"PRAGMA cache_size=-{256 * KiB:d}")
        db.execute("BEGIN")
        db.executemany(
            "INSERT INTO blobs (hash, size, created, stored) VALUES (?, ?, ?, ?)",
            sorted((h, size, created, size) for h, size, created, _ in rows),
        )
        db.execute("COMMIT")
        generated = entry_rows(rng, entries, rows)
        while chunk := list(itertools.islice(generated, ROWS_PER_TRANSACTION)):
            for row in chunk:
                per_protocol[row[0]] += 1
            db.execute("BEGIN")
            db.executemany(
                "INSERT INTO entries (protocol, key, hash, size, attrs, created, accessed)"
                " VALUES (?, ?, ?, ?, ?, ?, ?)",
                chunk,
            )
            db.execute("COMMIT")
        # Back to the mode the daemon set when it created the index.
        db.execute("PRAGMA journal_mode=WAL")
    finally:
        db.close()
    return Generated(
        blobs={h: size for h, size, _, _ in rows},
        per_protocol=per_protocol,
        index_bytes=os.path.getsize(path),
        seconds=time.perf_counter() - started,
    )


def make_blob_files(directory: str, hashes: Sequence[str]) -> None:
    """
    An empty file where the store keeps each of these blobs.
    """
    root = os.path.join(directory, BLOB_PREFIX)
    for shard in {h[:2] for h in hashes}:
        os.makedirs(os.path.join(root, shard))
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL
    for h in hashes:
        os.close(os.open(os.path.join(root, h[:2], h), flags, 0o644))


# What the pass must do.

#: (position, size, hash) of a blob: how many entries the LRU walk has
#: evicted when it evicts the blob's last entry, and the blob can go.
Release = tuple[int, int, str]


@frozen
class Prediction:
    max_size: int
    evicted: int
    #: The blobs deleted, in the order the walk frees them.
    freed: tuple[str, ...]
    bytes_freed: int


def lru_releases(path: str, blobs: dict[str, int]) -> list[Release]:
    """
    Every blob's release, in the order of the LRU walk.
    """
    db = sqlite3.connect(path)
    try:
        last: dict[str, int] = {}
        # The walk's own order (the index's least_recently_used).
        query = "SELECT hash FROM entries ORDER BY accessed, created, protocol, key"
        for position, (h,) in enumerate(db.execute(query), start=1):
            last[h] = position
    finally:
        db.close()
    return sorted((position, blobs[h], h) for h, position in last.items())


def walk(releases: list[Release], stored: int, max_size: int) -> Prediction:
    """
    What a pass with C{max_size} (and no TTL) removes: entries in LRU order
    while the bytes still stored are above the low-water mark.
    """
    target = int(max_size * LOW_WATER)
    freed = 0
    if stored > max_size:
        for deleted, (position, size, _) in enumerate(releases, start=1):
            freed += size
            if stored - freed <= target:
                return Prediction(max_size, position, tuple(h for _, _, h in releases[:deleted]), freed)
    return Prediction(max_size, 0, (), 0)


def low_water_limit(target: int) -> int:
    """
    The smallest size limit whose low-water mark is at least C{target}.
    """
    limit = math.ceil(target / LOW_WATER)
    while int(limit * LOW_WATER) < target:
        limit += 1
    while int((limit - 1) * LOW_WATER) >= target:
        limit -= 1
    return limit


def choose_limit(releases: list[Release], stored: int, evict: int) -> Prediction:
    """
    The size limit under which a pass evicts C{evict} entries, or the
    fewest above that it can: the walk stops only once a blob goes, and a
    pass that starts over the limit frees at least 1 - L{LOW_WATER} of the
    stored bytes.
    """
    freed = 0
    for position, size, _ in releases:
        freed += size
        limit = low_water_limit(stored - freed)
        if position >= evict and limit < stored:
            return walk(releases, stored, limit)
    raise ValueError("no size limit evicts that many entries")


# The measured pass, in a fresh process.


async def timed_pass(expiry: Expiry) -> dict[str, Any]:
    baseline, inherited = rss_baseline()
    started = time.perf_counter()
    report = await expiry.run()
    seconds = time.perf_counter() - started
    return {
        "seconds": seconds,
        "report": report.as_dict(),
        "baseline_kib": baseline,
        "inherited_kib": inherited,
        "peak_kib": max_rss_kib(),
        "high_water_kib": status_kib("VmHWM"),
    }


def sync_pass(directory: str, max_size: int) -> dict[str, Any]:
    """
    One pass as C{contentcache gc} runs it: every disk call inline, the
    reactor only as the clock.
    """
    reactor = wall_clock()
    disk = SynchronousRunner()
    index = SQLiteIndex(directory, disk, reactor)
    index.open()
    store = filesystem_store(directory, disk)
    expiry = Expiry(index, store, reactor, Policy(ttl=None, max_size=max_size))
    results: list[Any] = []
    Deferred.fromCoroutine(timed_pass(expiry)).addBoth(results.append)
    index.close()
    if not results:
        raise RuntimeError("the pass did not complete synchronously")
    if isinstance(results[0], Failure):
        results[0].raiseException()
    result: dict[str, Any] = results[0]
    return result


async def pool_pass(reactor: Reactor, directory: str, max_size: int) -> None:
    """
    One pass as the daemon runs it: every disk call on the disk pool, the
    reactor running. Prints the measurement as JSON.
    """
    disk = start_disk_pool(reactor)
    index = SQLiteIndex(directory, disk, reactor)
    index.open()
    store = filesystem_store(directory, disk)
    # Start a pool thread before the baseline.
    await index.stored_bytes()
    try:
        result = await timed_pass(Expiry(index, store, reactor, Policy(ttl=None, max_size=max_size)))
    finally:
        await index.close()
    print(json.dumps(result))


def run_child(runner: str, directory: str, max_size: int) -> dict[str, Any]:
    """
    Run one pass over C{directory} in a fresh Python process, so that the
    generating done here does not raise its peak, and return what it
    measured.
    """
    args = fresh_process(__file__, "--pass", runner, directory, str(max_size))
    done = subprocess.run(args, stdout=subprocess.PIPE, text=True)
    if done.returncode != 0:
        raise SystemExit(f"the {runner} pass exited with status {done.returncode}:\n{done.stdout}")
    result: dict[str, Any] = json.loads(done.stdout)
    return result


# The benchmark.


def prepare(directory: str, index_path: str, blob_files: Sequence[str]) -> float:
    """
    A storage directory in the state every pass starts from: a copy of the
    generated index and fresh blob files. Returns the seconds it took.
    """
    started = time.perf_counter()
    os.mkdir(directory)
    shutil.copyfile(index_path, os.path.join(directory, INDEX_FILENAME))
    make_blob_files(directory, blob_files)
    # Otherwise the pass's first checkpoint (its first fsync of the index)
    # would write back the whole fresh copy, which a real index never asks.
    os.sync()
    return time.perf_counter() - started


def outcome(
    result: dict[str, Any], directory: str, stored: int, predicted: Prediction, prepared: float
) -> str:
    """
    What the pass removed, and whether that is what the walk must remove.
    """
    report = result["report"]
    gone = len(predicted.freed) - sum(
        len(files) for _, _, files in os.walk(os.path.join(directory, BLOB_PREFIX))
    )
    text = (f"evicted {report['evicted_entries']:,} entries, deleted {report['deleted_blobs']:,}"
            f" blobs ({human(report['freed_bytes'])}), {gone:,} files gone,\n    store "
            f"{human(report['stored_bytes_before'])} -> {human(report['stored_bytes_after'])}")
    if report["expired_entries"] or report["skipped"]:
        text += f", {report['expired_entries']} expired, {report['skipped']} skipped"
    expected = (predicted.evicted, len(predicted.freed), predicted.bytes_freed, len(predicted.freed),
                stored - predicted.bytes_freed, 0, 0)
    actual = (report["evicted_entries"], report["deleted_blobs"], report["freed_bytes"], gone,
              report["stored_bytes_after"], report["expired_entries"], report["skipped"])
    verdict = "as predicted" if actual == expected else "NOT what the LRU walk must remove"
    return f"{text}: {verdict} (storage copied in {prepared:.1f} s)"


def benchmark(workdir: str, entries: int, blobs: int, quick: bool) -> int:
    print(f"contentcache expiry benchmark{' (--quick)' if quick else ''}")
    print(f"  storage: {workdir} (removed at the end)")
    print(f"  Python {platform.python_version()}, SQLite {sqlite3.sqlite_version}, "
          f"{os.cpu_count()} CPUs, disk pool of {DEFAULT_THREADS} threads")

    template = os.path.join(workdir, "template")
    os.mkdir(template)
    generated = generate(template, entries, blobs)
    index_path = os.path.join(template, INDEX_FILENAME)
    stored = sum(generated.blobs.values())
    counts = ", ".join(f"{p} {n:,}" for p, n in sorted(generated.per_protocol.items()))
    print(f"  index: {entries:,} entries ({counts}) over {blobs:,} blobs of {human(stored)},")
    print(f"    generated in {generated.seconds:.1f} s; index.sqlite {human(generated.index_bytes)}")

    started = time.perf_counter()
    releases = lru_releases(index_path, generated.blobs)
    predicted = choose_limit(releases, stored, round(entries * EVICT_SHARE))
    print(f"  --max-size {predicted.max_size:,} ({human(predicted.max_size)}), chosen in "
          f"{time.perf_counter() - started:.1f} s from the LRU order: down to {LOW_WATER:.0%}")
    print(f"    of it the walk must evict {predicted.evicted:,} entries "
          f"({predicted.evicted / entries:.1%}) and delete {len(predicted.freed):,} blobs "
          f"({human(predicted.bytes_freed)})")
    print(f"  blob files: an empty {BLOB_PREFIX}/ab/<hash> for each blob the walk deletes; the"
          " sizes")
    print("    counted are the index's, the files hold nothing")
    print("  each pass: a fresh process, no TTL, from a fresh copy of the index and files;")
    print("    baseline = VmRSS just before the pass (index open, pool started); peak = ru_maxrss")

    print()
    print(f"  {'runner':<36}{'pass':>8}{'entries/s':>11}{'baseline':>11}{'peak':>11}{'+pass':>11}")
    outcomes: list[str] = []
    for runner, title in RUNNERS.items():
        directory = os.path.join(workdir, runner)
        prepared = prepare(directory, index_path, predicted.freed)
        result = run_child(runner, directory, predicted.max_size)
        report = result["report"]
        removed = report["expired_entries"] + report["evicted_entries"]
        above = result["peak_kib"] - result["baseline_kib"]
        print(f"  {title:<36}{result['seconds']:>6.2f} s{removed / result['seconds']:>11,.0f}"
              f"{mib(result['baseline_kib']):>11}{mib(result['peak_kib']):>11}"
              f"{'+' + mib(above):>11}", flush=True)
        print_inherited(result["inherited_kib"], result["baseline_kib"], "    ")
        outcomes.append(f"  {runner}: {outcome(result, directory, stored, predicted, prepared)}")
        shutil.rmtree(directory)

    print()
    print("\n".join(outcomes))
    return 1 if any("NOT what" in line for line in outcomes) else 0


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = make_parser(__doc__)
    parser.add_argument(
        "--entries", type=int, metavar="N",
        help=f"entries in the index (default: {ENTRIES:,}; {QUICK_ENTRIES:,} with --quick)",
    )
    parser.add_argument(
        "--blobs", type=int, metavar="N",
        help=f"blobs they refer to (default: {BLOBS:,}; {QUICK_BLOBS:,} with --quick)",
    )
    parser.add_argument(
        "--quick", action="store_true",
        help=f"{QUICK_ENTRIES:,} entries over {QUICK_BLOBS:,} blobs, for a smoke run",
    )
    add_dir_option(parser, "storage directory")
    # Runs the child process that measures one pass: RUNNER DIR MAX_SIZE.
    parser.add_argument("--pass", nargs=3, dest="one_pass", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.entries is None:
        args.entries = QUICK_ENTRIES if args.quick else ENTRIES
    if args.blobs is None:
        args.blobs = QUICK_BLOBS if args.quick else BLOBS
    if args.blobs < 1:
        parser.error("--blobs needs a positive number")
    if args.entries < max(args.blobs, round(1 / EVICT_SHARE)):
        parser.error("--entries needs to be at least --blobs (every blob has an entry)"
                     f" and at least {round(1 / EVICT_SHARE)}")
    return check_dir(parser, args)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse(argv)
    show_warnings()
    if args.one_pass:
        runner, directory, max_size = args.one_pass
        if runner == "sync":
            print(json.dumps(sync_pass(directory, int(max_size))))
        else:
            react(pool_pass, (directory, int(max_size)))
        return
    with temporary_directory(args.dir) as workdir:
        status = benchmark(workdir, args.entries, args.blobs, args.quick)
    raise SystemExit(status)


if __name__ == "__main__":
    main()
