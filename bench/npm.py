"""
Requests/s and latency of cached npm registry answers, measured with wrk.

Starts the real daemon as users start it (C{twistd -n contentcache}) on
127.0.0.1 in front of an upstream fixture holding one generated package: a
packument of about 20 MiB (some thousands of versions, each a full
manifest, and a long readme at the top level), a small tarball (a real
.tgz of about 10 KiB) and a tarball of random bytes exactly as big as the
packument the daemon serves. Warms the cache with one GET of each (the
packument once with each C{Accept} variant, full and abbreviated), and
measures each with C{wrk --latency} at 1 and 32 connections. Prints
requests/s and the 50th and 99th percentile latency of each, and PASS or
FAIL for the target: a packument hit within 2x a hit of the blob of the
same size (both are one stored blob sent by the same code; the packument
is rendered once, when it is first asked for), judged by the median
latency on one connection.

Run it from the repository root, with the tests' environment::

    python bench/npm.py                   # about a minute
    python bench/npm.py --duration 1      # a smoke run

It needs wrk (Debian's C{wrk} package) and exits with status 1 on FAIL.
Every process it starts and its temporary directory are gone at the end,
also on an error or Ctrl-C.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import io
import itertools
import json
import os
import random
import tarfile
import time
from contextlib import ExitStack
from datetime import datetime, timedelta, timezone
from typing import Any, Iterator, Sequence

from attrs import frozen

# First: it puts the repository on the path for the tests' helpers.
from common import (
    BenchError, DaemonLog, KiB, MiB, Row, Wrk, WrkResult, add_dir_option, add_duration_option,
    check_dir, check_duration, describe, get, human, make_parser, measure, run_with_wrk,
    start_daemon, wrk_settings, write_file,
)
from tests.upstream import UpstreamFixture

PACKAGE = "contentcache-bench"
#: The packument's size as upstream sends it: versions are added until it
#: is this big. The biggest real packuments are 10-40 MB.
PACKUMENT_SIZE = 20 * MiB
#: The top-level readme (a version's manifest has none, as on the registry).
README_SIZE = 48 * KiB
#: Random bytes in the small tarball, so that it stays this big gzipped.
SMALL_PAYLOAD_SIZE = 9 * KiB
#: The version whose tarball is the big blob of random bytes; the small
#: one is the C{latest} version's.
BLOB_VERSION = "1.0.0"
MINORS_PER_MAJOR = 20
PATCHES_PER_MINOR = 10
#: Same seed, same packument: runs compare.
SEED = 20240102

#: The Accept headers npm sends: the full document, and the abbreviated
#: form for installs.
VARIANTS = {
    "full": "application/json",
    "abbreviated": "application/vnd.npm.install-v1+json; q=1.0, application/json; q=0.8, */*",
}

#: wrk counts a request as timed out after this long: 32 clients sharing
#: the daemon's 20 MiB answers wait their turn (about 0.5 s each here).
WRK_TIMEOUT = "10s"

#: The target: a packument hit's median latency on one connection, at most
#: this many times a hit of the blob of the same size.
TARGET_RATIO = 2.0

#: How long a GET may take: a miss fetches, parses, stores and renders a
#: 20 MiB packument.
HTTP_TIMEOUT = 60.0
#: The daemon's packuments stay fresh for the whole run: a revalidation
#: would be an upstream request in the middle of the measurement.
METADATA_TTL = "1d"

DEPENDENCIES = (
    "@babel/runtime", "axios", "chalk", "commander", "debug", "fs-extra", "glob", "js-yaml",
    "lodash", "minimatch", "mkdirp", "ms", "rimraf", "rxjs", "semver", "source-map", "tslib",
    "uuid", "ws", "yargs",
)
DEV_DEPENDENCIES = (
    "@types/node", "c8", "chai", "eslint", "mocha", "prettier", "sinon", "typescript",
)
DEPENDENCY_COUNT = 12
WORDS = (
    "cache", "registry", "install", "package", "module", "stream", "buffer", "option", "value",
    "return", "promise", "config", "version", "build", "client", "server", "request", "handler",
    "default", "export", "import", "function", "object", "string", "number", "array", "error",
    "event", "listener", "timeout", "resolve", "reject", "the", "a", "of", "to", "and", "is",
    "with", "for", "when", "this", "that", "from", "by", "on", "in", "it",
)
MAINTAINERS = [
    {"name": "ada", "email": "ada@example.com"},
    {"name": "grace", "email": "grace@example.com"},
    {"name": "linus", "email": "linus@example.com"},
]
CONTRIBUTORS = [
    {"name": name, "email": f"{name}@example.com", "url": f"https://example.com/~{name}"}
    for name in ("barbara", "donald", "edsger", "frances", "john", "ken", "margaret", "niklaus")
]
#: Subpath exports, as a modern package's manifest lists them.
ENTRY_POINTS = ("index", "cache", "client", "config", "errors", "registry", "stream", "util")
REPOSITORY_URL = f"https://git.example.org/example/{PACKAGE}"
#: The registry's signing key id (npm's public one), as in every dist.
KEY_ID = "SHA256:jl3bwswu80PjjokCgh0o2w5c2U4LhQAE57gj9cz1kzA"
FIRST_PUBLISHED = datetime(2015, 3, 1, tzinfo=timezone.utc)
BETWEEN_RELEASES = timedelta(hours=7)


def dumps(value: Any) -> bytes:
    """
    JSON as the daemon writes a packument's template: compact, ASCII. A
    document written so comes back byte for byte from the daemon, with
    only the tarball addresses changed.
    """
    return json.dumps(value, ensure_ascii=True, separators=(",", ":")).encode("ascii")


def npm_options(upstream: str) -> list[str]:
    """
    The daemon's options to fetch npm packages from C{upstream}, with no
    checksum database and packuments fresh for the whole run.
    """
    return ["--npm-upstream", upstream, "--go-sumdb", "off", "--npm-metadata-ttl", METADATA_TTL]


# The package.


def tarball_path(version: str) -> str:
    return f"/{PACKAGE}/-/{PACKAGE}-{version}.tgz"


def release_versions() -> Iterator[str]:
    """
    Versions in order of publication: each minor line has a prerelease
    first, then its patches.
    """
    for major in itertools.count(1):
        for minor in range(MINORS_PER_MAJOR):
            yield f"{major}.{minor}.0-beta.0"
            for patch in range(PATCHES_PER_MINOR):
                yield f"{major}.{minor}.{patch}"


def timestamp(when: datetime) -> str:
    return when.strftime("%Y-%m-%dT%H:%M:%S.000Z")


def sentence(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(words)).capitalize() + "."


def readme(rng: random.Random) -> str:
    parts = [f"# {PACKAGE}\n\n{sentence(rng, 20)}\n"]
    while sum(map(len, parts)) < README_SIZE:
        parts.append(f"\n## {sentence(rng, 3)[:-1]}\n\n"
                     + " ".join(sentence(rng, rng.randint(8, 24)) for _ in range(6))
                     + f"\n\n```js\nconst {{ {rng.choice(WORDS)} }} = require('{PACKAGE}');\n```\n")
    return "".join(parts)


def integrity(content: bytes) -> dict[str, str]:
    """
    A C{dist}'s digests of C{content}: the tarball's bytes for the
    versions served, stand-in bytes for the others (the digests are the
    same length either way, and so is the packument).
    """
    return {
        "integrity": "sha512-" + base64.b64encode(hashlib.sha512(content).digest()).decode("ascii"),
        "shasum": hashlib.sha1(content).hexdigest(),
    }


def dist(registry: str, version: str, rng: random.Random) -> dict[str, Any]:
    return {
        **integrity(version.encode("ascii")),
        "tarball": registry + tarball_path(version),
        "fileCount": rng.randint(20, 400),
        "unpackedSize": rng.randint(50_000, 2_000_000),
        "signatures": [{"keyid": KEY_ID, "sig": "MEUCIQ" + base64.b64encode(rng.randbytes(64)).decode("ascii")}],
    }


def manifest(registry: str, version: str, rng: random.Random) -> dict[str, Any]:
    """
    One version's manifest as the registry holds it (no readme: only the
    top-level document has one).
    """

    def ranges(names: Sequence[str]) -> dict[str, str]:
        return {name: f"^{rng.randint(1, 9)}.{rng.randint(0, 30)}.{rng.randint(0, 20)}" for name in names}

    dependencies = sorted(rng.sample(DEPENDENCIES, DEPENDENCY_COUNT))
    return {
        "name": PACKAGE,
        "version": version,
        "description": sentence(rng, 12),
        "keywords": sorted(rng.sample(WORDS[:32], 6)),
        "homepage": f"{REPOSITORY_URL}#readme",
        "bugs": {"url": f"{REPOSITORY_URL}/issues"},
        "license": "MIT",
        "author": MAINTAINERS[0],
        "main": "lib/index.js",
        "types": "lib/index.d.ts",
        "bin": {PACKAGE: "bin/cli.js"},
        "files": ["lib", "esm", "bin"],
        "exports": {
            "./package.json": "./package.json",
            **{f"./{entry}": {"types": f"./lib/{entry}.d.ts", "import": f"./esm/{entry}.mjs",
                              "require": f"./lib/{entry}.js"} for entry in ENTRY_POINTS},
        },
        "engines": {"node": f">={rng.choice((12, 14, 16, 18))}"},
        "repository": {"type": "git", "url": f"git+{REPOSITORY_URL}.git"},
        "scripts": {
            "build": "tsc -p tsconfig.build.json",
            "test": "mocha --recursive 'test/**/*.test.js'",
            "lint": "eslint --max-warnings 0 .",
            "coverage": "c8 --reporter lcov npm test",
            "prepublishOnly": "npm run build && npm test",
        },
        "dependencies": ranges(dependencies),
        "devDependencies": ranges(DEV_DEPENDENCIES),
        "gitHead": rng.randbytes(20).hex(),
        "_id": f"{PACKAGE}@{version}",
        "_nodeVersion": "18.17.1",
        "_npmVersion": "9.6.7",
        "dist": dist(registry, version, rng),
        "_npmUser": MAINTAINERS[rng.randrange(len(MAINTAINERS))],
        "directories": {},
        "maintainers": MAINTAINERS,
        "_npmOperationalInternal": {
            "host": "s3://npm-registry-packages",
            "tmp": f"tmp/{PACKAGE}_{version}_{rng.randrange(10**12)}",
        },
        "contributors": CONTRIBUTORS,
        "funding": {"type": "opencollective", "url": f"https://opencollective.com/{PACKAGE}"},
        "_hasShrinkwrap": False,
    }


def packument(registry: str) -> dict[str, Any]:
    """
    The package's full packument, with tarballs under C{registry}, grown
    version by version to about L{PACKUMENT_SIZE} bytes of JSON.
    """
    rng = random.Random(SEED)
    document: dict[str, Any] = {
        "_id": PACKAGE,
        "_rev": f"4021-{rng.randbytes(16).hex()}",
        "name": PACKAGE,
        "description": sentence(rng, 12),
        "dist-tags": {},
        "versions": {},
        "time": {},
        "maintainers": MAINTAINERS,
        "author": MAINTAINERS[0],
        "repository": {"type": "git", "url": f"git+{REPOSITORY_URL}.git"},
        "homepage": f"{REPOSITORY_URL}#readme",
        "bugs": {"url": f"{REPOSITORY_URL}/issues"},
        "keywords": ["cache", "registry", "install"],
        "license": "MIT",
        "readme": readme(rng),
        "readmeFilename": "README.md",
        "users": {f"user{n}": True for n in range(200)},
    }
    size = len(dumps(document))
    published = FIRST_PUBLISHED
    for version in release_versions():
        if size >= PACKUMENT_SIZE:
            break
        document["versions"][version] = entry = manifest(registry, version, rng)
        document["time"][version] = timestamp(published)
        document["dist-tags"]["next" if "-" in version else "latest"] = version
        # The entry in "versions", its time and the separators.
        size += len(dumps(entry)) + 2 * len(dumps(version)) + len(dumps(timestamp(published))) + 4
        published += BETWEEN_RELEASES
    document["time"] = {"created": timestamp(FIRST_PUBLISHED), "modified": timestamp(published),
                        **document["time"]}
    return document


def small_tarball(version: str) -> bytes:
    """
    A real npm tarball (gzipped tar of C{package/...}) of about 10 KiB.
    """
    rng = random.Random(SEED)
    files = {
        "package/package.json": json.dumps({"name": PACKAGE, "version": version, "main": "lib/index.js"},
                                           indent=2).encode(),
        "package/README.md": f"# {PACKAGE}\n\n{sentence(rng, 40)}\n".encode(),
        "package/lib/index.js": b"module.exports = require('fs').readFileSync(__dirname + '/data.bin');\n",
        "package/lib/data.bin": rng.randbytes(SMALL_PAYLOAD_SIZE),
    }
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w:gz") as archive:
        for name, content in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(content)
            info.mtime = int(FIRST_PUBLISHED.timestamp())
            archive.addfile(info, io.BytesIO(content))
    return out.getvalue()


def rendered(body: bytes, upstream: str, daemon: str) -> bytes:
    """
    The packument as the daemon serves it: its tarball addresses moved
    from C{upstream} to the daemon's C{/npm}.
    """
    return body.replace(b'"tarball":"%s/' % upstream.encode(), b'"tarball":"%s/npm/' % daemon.encode())


# HTTP.


@frozen
class Target:
    """
    One cached answer to measure: its path, the headers wrk sends, and the
    body it must have.
    """

    name: str
    path: str
    headers: dict[str, str]
    body: bytes


def check_get(url: str, log: DaemonLog, target: Target, x_cache: str | None = None) -> None:
    """
    GET the target from the daemon at C{url}: it must answer 200 with its
    body (and C{x_cache} in X-Cache, if given).
    """
    status, cache, received = get(url, target.path, target.headers, HTTP_TIMEOUT)
    if status != 200 or received != target.body or (x_cache is not None and cache != x_cache):
        raise BenchError(
            f"GET {url}{target.path} ({target.name}) answered {status} (X-Cache {cache}) "
            f"with {len(received)} bytes, {'the same as' if received == target.body else 'not'} "
            f"the {len(target.body)} expected; the daemon's log ends:\n{log.tail()}"
        )


class PackageRow(Row):
    # Longer names, and answers of 20 MiB counted to a tenth per second.
    WIDTH = 24
    RATE = ",.1f"


def measure_targets(
    wrk: Wrk, url: str, log: DaemonLog, targets: list[Target], seconds: int
) -> list[PackageRow]:
    """
    Measure each target on the daemon at C{url} as L{measure} does; a
    measurement in which no request finished is a L{BenchError}.
    """
    rows: list[PackageRow] = []
    for target in targets:

        def row(connections: int, result: WrkResult) -> PackageRow:
            if result.requests == 0:
                raise BenchError(f"no request for {target.name} finished in {seconds} s "
                                 f"at {connections} connections")
            return PackageRow(target.name, connections, result)

        rows += measure(wrk, url + target.path, seconds, row, headers=target.headers,
                        server="the daemon", what=target.name, log=log)
    return rows


def check_upstream(upstream: UpstreamFixture, tarballs: list[str]) -> None:
    """
    Upstream was asked for the packument once per variant and for each
    tarball once: every answer measured came from the cache.
    """
    asked = [
        next((v for k, v in headers.items() if k.lower() == "accept"), "")
        for _, path, headers in upstream.log
        if path == f"/{PACKAGE}"
    ]
    abbreviated = [a for a in asked if "application/vnd.npm.install-v1+json" in a]
    fetched = {path: upstream.count(path) for path in tarballs}
    if len(asked) != 2 or len(abbreviated) != 1 or any(n != 1 for n in fetched.values()):
        raise BenchError(
            f"upstream was asked for the packument with Accept {asked} and for the tarballs "
            f"{fetched} times, not once for each variant and each tarball: the answers "
            "measured were not all from the cache"
        )


def benchmark(wrk: Wrk, workdir: str, args: argparse.Namespace) -> bool:
    """
    Measure, print, and return whether the target was met.
    """
    root = os.path.join(workdir, "upstream")
    os.mkdir(root)

    print("contentcache npm benchmark: cached answers under wrk on 127.0.0.1")
    print(f"  workdir: {workdir} (removed at the end)")
    print(f"  machine: {os.cpu_count()} CPUs, shared by wrk and the daemon; wrk {wrk.version()}")

    with ExitStack() as stack:
        upstream = UpstreamFixture(root)
        stack.callback(upstream.stop)
        daemon, log = start_daemon(stack, os.path.join(workdir, "storage"),
                                   npm_options(upstream.url))

        document = packument(upstream.url)
        latest = document["dist-tags"]["latest"]
        small = small_tarball(latest)
        document["versions"][latest]["dist"].update(integrity(small))
        # The blob is as big as the packument served; the digests in the
        # packument are as long whatever the bytes they are of.
        blob = os.urandom(len(rendered(dumps(document), upstream.url, daemon.url)))
        document["versions"][BLOB_VERSION]["dist"].update(integrity(blob))
        body = dumps(document)
        served = rendered(body, upstream.url, daemon.url)
        if len(served) != len(blob):
            raise BenchError(f"the packument served is {len(served)} bytes, the blob {len(blob)}")
        upstream.override[f"/{PACKAGE}"] = (200, body)
        write_file(root, tarball_path(latest), small)
        write_file(root, tarball_path(BLOB_VERSION), blob)

        versions = len(document["versions"])
        print(f"  package {PACKAGE}: {versions:,} versions, each a full manifest with "
              f"{DEPENDENCY_COUNT} dependencies; a {human(len(document['readme']))} readme at the top")
        print(f"  packument: {len(body):,} bytes ({human(len(body))}) from upstream, {len(served):,} "
              "as served (tarball addresses under the daemon's /npm)")
        print(f"  tarballs: {PACKAGE}@{BLOB_VERSION} {len(blob):,} random bytes (as big as the "
              f"packument served), {PACKAGE}@{latest} a .tgz of {human(len(small))} ({len(small):,} bytes)")
        print(wrk_settings(args.duration) + "; no Accept-Encoding (identity bodies)")

        host = {"Host": daemon.url.removeprefix("http://")}
        print(f"  daemon: {describe(daemon, host)}")

        # The daemon renders a packument once per base address, which it
        # takes from Host: the warm-up sends wrk's.
        targets = [
            Target(f"packument {variant}", f"/npm/{PACKAGE}", {**host, "Accept": accept}, served)
            for variant, accept in VARIANTS.items()
        ]
        targets += [
            Target(f"tarball {human(len(blob))}", "/npm" + tarball_path(BLOB_VERSION), host, blob),
            Target(f"tarball {human(len(small))}", "/npm" + tarball_path(latest), host, small),
        ]
        for target in targets:
            started_at = time.monotonic()
            check_get(daemon.url, log, target)
            took = time.monotonic() - started_at
            check_get(daemon.url, log, target, x_cache="HIT")
            if target.name.startswith("packument"):
                print(f"  {target.name}: the miss (fetch, parse, store, render) took {took:.2f} s")
        print("  cache warmed: one GET of each (a miss), a second answered with X-Cache: HIT")
        print()
        print(PackageRow.header())
        rows = measure_targets(wrk, daemon.url, log, targets, args.duration)
        check_upstream(upstream, [tarball_path(BLOB_VERSION), tarball_path(latest)])

    print()
    print("  upstream was asked for the packument once per Accept variant and for each tarball"
          " once (the warm-up's misses)")
    by = {(row.target, row.connections): row.result for row in rows}
    blob_name = targets[2].name
    reference = by[blob_name, 1]
    ratios = {}
    for target in targets[:2]:
        result = by[target.name, 1]
        ratios[target.name] = result.p50 / reference.p50
        print(f"  {target.name} at 1 connection: p50 {result.p50 * 1000:.1f} ms, "
              f"{ratios[target.name]:.2f}x the blob's {reference.p50 * 1000:.1f} ms; "
              f"{result.requests_per_second:.1f} req/s, "
              f"{result.requests_per_second / reference.requests_per_second:.2f}x the blob's "
              f"{reference.requests_per_second:.1f}")
    passed = all(ratio <= TARGET_RATIO for ratio in ratios.values())
    worst = max(ratios, key=ratios.__getitem__)
    print(f"  {'PASS' if passed else 'FAIL'}: a packument hit ({worst}) takes {ratios[worst]:.2f}x "
          f"as long as a hit of the {blob_name.removeprefix('tarball ')} blob at the median on 1 "
          f"connection; the target is within {TARGET_RATIO:g}x (judged by p50 at 1 connection)")
    return passed


def main(argv: Sequence[str] | None = None) -> None:
    parser = make_parser(__doc__)
    add_duration_option(parser)
    add_dir_option(parser, "directory (upstream files and storage)")
    args = parser.parse_args(argv)
    check_duration(parser, args)
    check_dir(parser, args)
    run_with_wrk(benchmark, args, WRK_TIMEOUT)


if __name__ == "__main__":
    main()
