"""
Cached hits against the serving limit and the peer to beat, measured with wrk.

Starts everything on 127.0.0.1: one upstream fixture, the real daemon as
users start it (C{twistd -n contentcache}, default options) in front of
it, nginx (Debian's C{nginx-light}: 2 worker processes, C{sendfile on},
C{access_log off}) serving the same Go files from disk, and Verdaccio
6.8.0 with the same fixture as its uplink. Warms every server with the
same requests and checks every answer (status 200, C{X-Cache: HIT} from
the daemon, the same bytes from both where they must be the same), then
measures each line with C{wrk -t1}, the daemon and its peer one after the
other, in several rounds, and prints the median of the rounds:

  - a Go C{.info} (about 150 bytes) at 32 connections, against nginx;
  - a Go C{.zip} of 1.5 MB at 32 connections, against nginx;
  - an npm tarball shaped like lodash 4.17.21 (a .tgz of 540 KB) at 32
    connections, against Verdaccio;
  - the abbreviated packument (npm's install C{Accept}) of a package
    shaped like express (280 versions) at 32 connections, against
    Verdaccio;
  - the Go C{.info}'s median latency at 1 connection (nginx's beside it);
  - memory: a second daemon with C{--memory-cache} set to the bound is
    filled with three times as many distinct cached tarballs, each asked
    for three times, and the resident memory of its whole process tree
    (the supervisor and its workers) is held against the bound plus 100
    MiB per worker.

Each line says PASS or FAIL against its target; the exit status is 1 if
any failed. C{--source DIR} runs the daemon of another checkout (a git
worktree of an older commit, say) with this one's environment, for the
table before a change.

Run it from the repository root, with the tests' environment::

    python bench/hits.py                          # about three minutes
    python bench/hits.py --quick                  # a smoke run, under a minute
    python bench/hits.py --source /tmp/baseline   # the daemon of another tree
    python bench/hits.py --daemon-args "--workers 1"

It needs wrk and nginx (Debian's C{wrk} and C{nginx-light}) and, unless
C{--no-verdaccio}, Node.js with npm: Verdaccio is installed once under
C{~/.cache/contentcache-bench/verdaccio} and reused. Every process it
starts and its temporary directory are gone at the end, also on an error,
Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import random
import shlex
import shutil
import socket
import statistics
import subprocess
import sys
import tarfile
import time
from contextlib import ExitStack
from typing import Any, Sequence

from attrs import evolve, frozen

# First: it puts the repository on the path for the tests' helpers.
from common import (
    LOOPBACK, PROXY_PATHS, REPOSITORY, START_TIMEOUT, WARM_UP_SECONDS, BenchError, DaemonLog,
    GoModule, KiB, MiB, ServerLog, Wrk, WrkResult, add_dir_option, build_module, check_dir,
    get, goproxy_options, make_parser, parse_wrk, run_with_wrk, stop, write_file,
)
from contentcache.units import parse_size
from goproxy import LogDrain
from npm import (
    BETWEEN_RELEASES, FIRST_PUBLISHED, SEED, VARIANTS, dumps, integrity, manifest,
    release_versions, rendered, timestamp,
)
from tests.daemon import Daemon, free_port
from tests.upstream import UpstreamFixture

DEFAULT_DURATION = 5
DEFAULT_ROUNDS = 3
#: wrk counts a request as timed out after this long: Verdaccio answers a
#: packument at 32 connections in a second or more.
WRK_TIMEOUT = "10s"
CONNECTIONS = 32
HTTP_TIMEOUT = 60.0

#: Random bytes in the module zip, so that it is 1.5 MB however it is stored.
ZIP_PAYLOAD_SIZE = 1_500_000
#: What a public proxy's .info says of where a version came from: it makes
#: the file as big as theirs (about 150 bytes).
INFO_ORIGIN = {"VCS": "git", "URL": "https://example.com/bench",
               "Hash": "2f5a6c1d0e9b8a7f6e5d4c3b2a1908f7e6d5c4b3"}

#: The package shaped like lodash 4.17.21: one .tgz of this many bytes.
LODASH = "bench-lodash"
LODASH_VERSION = "4.17.21"
TARBALL_SIZE = 540_000
#: The package shaped like express: this many versions in its packument.
EXPRESS = "bench-express"
EXPRESS_VERSIONS = 280
#: What npm's abbreviated packument keeps of a version (the registry's list).
ABBREVIATED_FIELDS = (
    "name", "version", "deprecated", "dependencies", "optionalDependencies", "devDependencies",
    "bundleDependencies", "peerDependencies", "peerDependenciesMeta", "bin", "directories",
    "dist", "engines", "_hasShrinkwrap", "hasInstallScript", "cpu", "os",
)
ABBREVIATED = "application/vnd.npm.install-v1+json"
#: The daemon's packuments stay fresh for the whole run, and so do
#: Verdaccio's (its uplink's C{maxage}): a revalidation would be an
#: upstream request in the middle of a measurement.
METADATA_TTL = "1d"

#: The memory line: the daemon's hot-set bound, how many times over it the
#: distinct tarballs add up to, how big each is, and how often each is asked.
DEFAULT_MEMORY_BOUND = "64MiB"
MEMORY_OPTION = "--memory-cache"
HOT = "bench-hot"
HOT_TARBALL_SIZE = 300_000
HOT_FILL = 3
HOT_GETS = 3
#: The target: the whole process tree's RSS under the bound plus this much
#: per worker (the supervisor counts in the first worker's share).
PER_WORKER = 100 * MiB

#: The targets: the daemon's req/s at least this much of the peer's.
TARGET_INFO = 0.25
TARGET_ZIP = 0.5
TARGET_TARBALL = 1.5
TARGET_PACKUMENT = 10.0
#: The target: a cached .info's median latency at 1 connection.
TARGET_INFO_P50 = 0.0005

NGINX_PROGRAMS = ("nginx", "/usr/sbin/nginx")
VERDACCIO_VERSION = "6.8.0"
#: Verdaccio 6.8.0 runs on Node 20 only with node-fetch pinned.
VERDACCIO_PACKAGE = {
    "private": True,
    "dependencies": {"verdaccio": VERDACCIO_VERSION},
    "overrides": {"node-fetch": "2.7.0"},
}
CACHE_HOME = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
VERDACCIO_DIR = os.path.join(CACHE_HOME, "contentcache-bench", "verdaccio")
INSTALL_TIMEOUT = 600.0


# The fixtures.


def build_go(root: str) -> GoModule:
    """
    The module version in C{root}: a zip of 1.5 MB and an C{.info} with an
    C{Origin}, as a public proxy serves it.
    """
    module = build_module(root, ZIP_PAYLOAD_SIZE)
    info = json.loads(module.bodies["info"])
    body = json.dumps({**info, "Origin": INFO_ORIGIN}, separators=(",", ":")).encode()
    with open(module.files["info"], "wb") as f:
        f.write(body)
    return evolve(module, bodies={**module.bodies, "info": body})


def tarball_path(name: str, version: str) -> str:
    return f"/{name}/-/{name}-{version}.tgz"


def tgz(name: str, version: str, size: int) -> bytes:
    """
    A real npm tarball of about C{size} bytes: a package.json and random
    bytes (so that gzip keeps it this big).
    """
    rng = random.Random(SEED)
    files = {
        "package/package.json": json.dumps({"name": name, "version": version, "main": "index.js"},
                                           indent=2).encode(),
        "package/index.js": rng.randbytes(size - 2 * KiB),
    }
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w:gz") as archive:
        for path, content in files.items():
            info = tarfile.TarInfo(path)
            info.size = len(content)
            info.mtime = int(FIRST_PUBLISHED.timestamp())
            archive.addfile(info, io.BytesIO(content))
    return out.getvalue()


def small_packument(name: str, registry: str, tarballs: dict[str, bytes]) -> dict[str, Any]:
    """
    A packument of C{name} holding a version for each of C{tarballs}, with
    their digests.
    """
    versions = {
        version: {"name": name, "version": version, "main": "index.js",
                  "dist": {**integrity(body), "tarball": registry + tarball_path(name, version)}}
        for version, body in tarballs.items()
    }
    latest = list(tarballs)[-1]
    when = timestamp(FIRST_PUBLISHED)
    return {"_id": name, "name": name, "dist-tags": {"latest": latest}, "versions": versions,
            "time": {"created": when, "modified": when, **{v: when for v in tarballs}}}


def express_packument(registry: str) -> dict[str, Any]:
    """
    A full packument shaped like express's: L{EXPRESS_VERSIONS} versions,
    each a full manifest (npm.py's generator, renamed).
    """
    rng = random.Random(SEED)
    versions: dict[str, Any] = {}
    times = {"created": timestamp(FIRST_PUBLISHED)}
    published = FIRST_PUBLISHED
    for version in release_versions():
        if len(versions) == EXPRESS_VERSIONS:
            break
        entry = manifest(registry, version, rng)
        entry.update(name=EXPRESS, _id=f"{EXPRESS}@{version}")
        entry["dist"]["tarball"] = registry + tarball_path(EXPRESS, version)
        versions[version] = entry
        times[version] = timestamp(published)
        published += BETWEEN_RELEASES
    times["modified"] = timestamp(published)
    releases = [v for v in versions if "-" not in v]
    return {"_id": EXPRESS, "name": EXPRESS, "description": "Fast, unopinionated web framework",
            "dist-tags": {"latest": releases[-1], "next": list(versions)[-1]},
            "versions": versions, "time": times, "license": "MIT",
            "readme": f"# {EXPRESS}\n\n" + "A benchmark's stand-in for a web framework. " * 200}


def abbreviate(document: dict[str, Any]) -> dict[str, Any]:
    """
    The abbreviated packument the registry serves for C{document}.
    """
    return {
        "name": document["name"],
        "modified": document["time"]["modified"],
        "dist-tags": document["dist-tags"],
        "versions": {
            version: {k: entry[k] for k in ABBREVIATED_FIELDS if k in entry}
            for version, entry in document["versions"].items()
        },
    }


class Upstream(UpstreamFixture):
    """
    The upstream fixture, answering a packument asked for with npm's
    abbreviated C{Accept} with the abbreviated document, as the registry
    does (the fixture alone answers every C{Accept} with one body).
    """

    def __init__(self, root: str) -> None:
        #: path -> the abbreviated packument's bytes.
        self.abbreviated: dict[str, bytes] = {}
        super().__init__(root)

    def _answer(self, handler: Any, head: bool) -> None:
        path = handler.path.split("?", 1)[0]
        if path in self.abbreviated and ABBREVIATED in handler.headers.get("Accept", ""):
            with self._lock:
                self.requests[path] += 1
                self.log.append((handler.command, path, dict(handler.headers)))
            self._send(handler, 200, self.abbreviated[path], head)
            return
        super()._answer(handler, head)

    def publish(self, document: dict[str, Any]) -> tuple[bytes, bytes]:
        """
        Serve C{document} as its package's packument, full and abbreviated;
        both bodies.
        """
        full, short = dumps(document), dumps(abbreviate(document))
        path = f"/{document['name']}"
        self.override[path] = (200, full)
        self.abbreviated[path] = short
        return full, short


@frozen
class Fixtures:
    """
    What upstream at C{url} holds: the Go module version, the lodash-shaped
    tarball and its packument, and the express-shaped packument, each
    packument as upstream sends it abbreviated.
    """

    url: str
    go: GoModule
    tarball: bytes
    lodash: bytes
    express: bytes

    def __str__(self) -> str:
        return "\n".join([
            str(self.go),
            f"  npm {LODASH}@{LODASH_VERSION}: a .tgz of {len(self.tarball):,} bytes "
            "(random content: gzip keeps it this big)",
            f"  npm {EXPRESS}: {EXPRESS_VERSIONS} versions, each a full manifest with a dozen "
            f"dependencies; abbreviated packument {len(self.express):,} bytes from upstream",
        ])


def build_fixtures(root: str, upstream: Upstream) -> Fixtures:
    go = build_go(root)
    tarball = tgz(LODASH, LODASH_VERSION, TARBALL_SIZE)
    write_file(root, tarball_path(LODASH, LODASH_VERSION), tarball)
    _, lodash = upstream.publish(small_packument(LODASH, upstream.url, {LODASH_VERSION: tarball}))
    _, express = upstream.publish(express_packument(upstream.url))
    return Fixtures(upstream.url, go, tarball, lodash, express)


# The servers.


@frozen
class Endpoint:
    """
    A server as wrk asks it: its name, its address, the headers sent with
    every request, and its log for errors.
    """

    server: str
    url: str
    headers: dict[str, str]
    log: ServerLog


def host(url: str) -> dict[str, str]:
    """
    The Host header wrk sends to C{url}: a server that writes its own
    address into an answer (tarball addresses in a packument) is warmed
    with it.
    """
    return {"Host": url.removeprefix("http://")}


def wait_for_port(port: int, process: subprocess.Popen[bytes], log: ServerLog, name: str) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline and process.poll() is None:
        try:
            socket.create_connection((LOOPBACK, port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.1)
    raise BenchError(f"{name} never listened on {LOOPBACK}:{port}; its log:\n{log.tail()}")


def start_process(
    stack: ExitStack, command: list[str], name: str, port: int, env: dict[str, str] | None = None
) -> LogDrain:
    """
    C{command}, listening on C{port}, its output drained; stopped when
    C{stack} closes.
    """
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               stdin=subprocess.DEVNULL, env=env)
    assert process.stdout is not None
    stack.callback(process.stdout.close)
    log = LogDrain(process.stdout)
    stack.callback(stop, process, log, name)
    wait_for_port(port, process, log, name)
    return log


def nginx_program() -> str:
    for program in NGINX_PROGRAMS:
        if (path := shutil.which(program)) is not None:
            return path
    raise BenchError("nginx is not installed: it is the serving limit measured against "
                     "(on Debian: apt-get install nginx-light)")


def nginx_version(program: str) -> str:
    result = subprocess.run([program, "-v"], capture_output=True, text=True, timeout=HTTP_TIMEOUT)
    return (result.stderr + result.stdout).strip().removeprefix("nginx version: ")


NGINX_CONFIG = """\
{user}worker_processes 2;
daemon off;
pid {directory}/nginx.pid;
error_log stderr warn;
events {{
    worker_connections 1024;
}}
http {{
    access_log off;
    sendfile on;
    default_type application/octet-stream;
    client_body_temp_path {directory}/client_body;
    proxy_temp_path {directory}/proxy;
    fastcgi_temp_path {directory}/fastcgi;
    uwsgi_temp_path {directory}/uwsgi;
    scgi_temp_path {directory}/scgi;
    server {{
        listen {host}:{port};
        root {root};
    }}
}}
"""


def start_nginx(stack: ExitStack, program: str, directory: str, root: str) -> tuple[str, LogDrain]:
    """
    nginx serving C{root} on 127.0.0.1, its configuration and state in
    C{directory}; stopped when C{stack} closes. Returns its URL.
    """
    port = free_port()
    config = os.path.join(directory, "nginx.conf")
    with open(config, "w") as f:
        # As root, nginx's workers would run as nobody, who cannot read
        # the temporary directory.
        f.write(NGINX_CONFIG.format(user="user root;\n" if os.geteuid() == 0 else "",
                                    directory=directory, host=LOOPBACK, port=port, root=root))
    log = start_process(stack, [program, "-p", directory, "-c", config, "-e", "stderr"],
                        "nginx", port)
    return f"http://{LOOPBACK}:{port}", log


def verdaccio_program() -> tuple[str, str]:
    """
    Verdaccio's program under L{VERDACCIO_DIR}, installed with npm first if
    it is not there, and words saying which.
    """
    installed = os.path.join(VERDACCIO_DIR, "node_modules", "verdaccio")
    program = os.path.join(installed, "bin", "verdaccio")

    def version() -> str | None:
        try:
            with open(os.path.join(installed, "package.json")) as f:
                return str(json.load(f)["version"])
        except (OSError, ValueError, KeyError):
            return None

    if version() == VERDACCIO_VERSION and os.path.exists(program):
        return program, f"reused from {VERDACCIO_DIR}"
    npm = shutil.which("npm")
    if npm is None:
        raise BenchError("npm is not on PATH: Verdaccio is installed with it "
                         "(or leave Verdaccio out with --no-verdaccio)")
    os.makedirs(VERDACCIO_DIR, exist_ok=True)
    with open(os.path.join(VERDACCIO_DIR, "package.json"), "w") as f:
        json.dump(VERDACCIO_PACKAGE, f, indent=2)
    started = time.monotonic()
    result = subprocess.run([npm, "install", "--no-audit", "--no-fund"], cwd=VERDACCIO_DIR,
                            capture_output=True, text=True, timeout=INSTALL_TIMEOUT)
    if result.returncode != 0 or version() != VERDACCIO_VERSION:
        raise BenchError(f"npm install of Verdaccio {VERDACCIO_VERSION} in {VERDACCIO_DIR} "
                         f"failed (status {result.returncode}):\n{result.stdout}{result.stderr}")
    return program, f"installed in {VERDACCIO_DIR} ({time.monotonic() - started:.0f} s)"


def node_version() -> str:
    node = shutil.which("node") or "node"
    return subprocess.run([node, "--version"], capture_output=True, text=True,
                          timeout=HTTP_TIMEOUT).stdout.strip()


def start_verdaccio(
    stack: ExitStack, program: str, directory: str, upstream: str
) -> tuple[str, LogDrain]:
    """
    Verdaccio on 127.0.0.1 with C{upstream} as its only uplink, its
    storage in C{directory}; stopped when C{stack} closes. Returns its URL.
    """
    port = free_port()
    config = {
        "storage": os.path.join(directory, "storage"),
        "plugins": os.path.join(directory, "plugins"),
        "web": {"enable": False},
        "auth": {"htpasswd": {"file": os.path.join(directory, "htpasswd"), "max_users": -1}},
        "uplinks": {"fixture": {"url": upstream + "/", "maxage": METADATA_TTL, "cache": True}},
        "packages": {"**": {"access": "$all", "publish": "$authenticated", "proxy": "fixture"}},
        "log": {"type": "stdout", "format": "pretty", "level": "warn"},
        "listen": f"{LOOPBACK}:{port}",
    }
    path = os.path.join(directory, "config.yaml")
    with open(path, "w") as f:
        # JSON is YAML.
        json.dump(config, f, indent=2)
    node = shutil.which("node") or "node"
    log = start_process(stack, [node, program, "--config", path], "Verdaccio", port,
                        env={**os.environ, "NODE_ENV": "production"})
    return f"http://{LOOPBACK}:{port}", log


# The daemon.


@frozen
class Source:
    """
    Which checkout's daemon runs: its directory, the environment and
    working directory that make this environment's twistd run it, and
    what its options say.
    """

    directory: str
    env: dict[str, str]
    cwd: str
    commit: str
    knows_memory_cache: bool


def find_source(directory: str | None, cwd: str) -> Source:
    """
    The daemon of C{directory} (L{None}: this checkout's). Another tree's
    C{contentcache} and plugin come first on C{PYTHONPATH}, and the daemon
    runs in C{cwd}, which holds no package: a working directory that did
    could come first on a worker's path. Checked by asking that interpreter
    where it imports them from.
    """
    directory = os.path.abspath(directory or REPOSITORY)
    env = {} if directory == REPOSITORY else {
        "PYTHONPATH": os.pathsep.join(filter(None, [directory, os.environ.get("PYTHONPATH")]))}
    full_env = {**os.environ, **env}
    probe = subprocess.run(
        [sys.executable, "-c",
         "import contentcache.tap, twisted.plugins.contentcache_plugin as p;"
         "print(contentcache.tap.__file__); print(p.__file__)"],
        capture_output=True, text=True, env=full_env, cwd=cwd, timeout=HTTP_TIMEOUT,
    )
    files = probe.stdout.split()
    if probe.returncode != 0 or len(files) != 2 or not all(
            os.path.realpath(f).startswith(os.path.realpath(directory) + os.sep) for f in files):
        raise BenchError(f"{sys.executable} with {env or 'no PYTHONPATH'} does not run the daemon "
                         f"of {directory}: it imports {files or 'nothing'}\n{probe.stderr}")
    twistd = os.path.join(os.path.dirname(sys.executable), "twistd")
    usage = subprocess.run([twistd, "contentcache", "--help"], capture_output=True, text=True,
                           env=full_env, cwd=cwd, timeout=HTTP_TIMEOUT)
    if usage.returncode != 0:
        raise BenchError(f"twistd contentcache --help failed:\n{usage.stdout}{usage.stderr}")
    return Source(directory, env, cwd, commit(directory), MEMORY_OPTION in usage.stdout)


def commit(directory: str) -> str:
    """
    The commit checked out in C{directory}, and whether its files differ.
    """
    def git(*words: str) -> str:
        return subprocess.run(["git", "-C", directory, *words], capture_output=True, text=True,
                              timeout=HTTP_TIMEOUT).stdout.strip()

    head = git("log", "-1", "--format=%h %s")
    if not head:
        return "(not a git checkout)"
    changed = git("status", "--porcelain", "--untracked-files=no", "--", "contentcache", "twisted")
    return head + (", with uncommitted changes to the daemon" if changed else "")


def start_daemon(
    stack: ExitStack, source: Source, storage: str, options: Sequence[str]
) -> tuple[Daemon, DaemonLog]:
    """
    C{twistd -n contentcache} of C{source} on 127.0.0.1 with C{options};
    stopped when C{stack} closes.
    """
    try:
        daemon = Daemon(storage, options, env=source.env, cwd=source.cwd)
    except AssertionError as e:
        raise BenchError(str(e)) from None
    log = DaemonLog(daemon)
    stack.callback(daemon.stop)
    stack.callback(stop, daemon.process, log, "the daemon")
    return daemon, log


def daemon_options(upstream: str) -> list[str]:
    """
    The daemon's options: both protocols from C{upstream}, no checksum
    database, packuments fresh for the whole run.
    """
    return [*goproxy_options(upstream), "--npm-upstream", upstream,
            "--npm-metadata-ttl", METADATA_TTL]


def describe(daemon: Daemon, source: Source, options: Sequence[str]) -> str:
    _, _, health = get(daemon.url, "/health", host(daemon.url))
    version = json.loads(health).get("version", "?")
    return (f"  daemon: twistd -n contentcache {shlex.join(options)} (contentcache {version}, "
            f"{source.directory} at {source.commit})")


# Checks.


def check(
    endpoint: Endpoint, path: str, body: bytes | None = None, x_cache: str | None = None
) -> bytes:
    """
    GET C{path} with the endpoint's headers: it must answer 200 (with
    C{body} and C{x_cache} in X-Cache, if given). Returns the body.
    """
    status, cache, received = get(endpoint.url, path, endpoint.headers, HTTP_TIMEOUT)
    if status != 200 or (body is not None and received != body) or (
            x_cache is not None and cache != x_cache):
        same = "" if body is None else (
            f", {'the same as' if received == body else 'not'} the {len(body):,} expected")
        raise BenchError(f"GET {endpoint.url}{path} answered {status} (X-Cache {cache}) with "
                         f"{len(received):,} bytes{same}; {endpoint.server}'s log ends:\n"
                         f"{endpoint.log.tail()}")
    return received


def check_packument(endpoint: Endpoint, path: str, expected: bytes) -> bytes:
    """
    A peer's packument: JSON, the same versions with the same digests as
    upstream's, tarballs under the peer's own address.
    """
    received = check(endpoint, path)
    try:
        document = json.loads(received)
        ours = json.loads(expected)
        same = (document["versions"].keys() == ours["versions"].keys() and all(
            entry["dist"]["integrity"] == ours["versions"][v]["dist"]["integrity"]
            and entry["dist"]["tarball"].startswith(endpoint.url + "/")
            for v, entry in document["versions"].items()))
    except (ValueError, KeyError, TypeError, AttributeError):
        same = False
    if not same:
        raise BenchError(f"GET {endpoint.url}{path} answered a packument that is not upstream's "
                         f"versions under its own address:\n{received[:500]!r}")
    return received


# Measuring.


def run_wrk(wrk: Wrk, endpoint: Endpoint, path: str, connections: int, seconds: int) -> WrkResult:
    """
    C{wrk --latency -t1} on C{path} of C{endpoint}; an error answer or no
    answer at all is a L{BenchError}.
    """
    # wrk sends a Host of its own, the endpoint's.
    headers = [f"{k}: {v}" for k, v in endpoint.headers.items() if k != "Host"]
    command = [
        wrk.path, "--latency", "--threads", "1", "--connections", str(connections),
        "--duration", f"{seconds}s", "--timeout", wrk.timeout,
        *[word for header in headers for word in ("--header", header)],
        endpoint.url + path,
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=seconds + START_TIMEOUT)
    if result.returncode != 0:
        raise BenchError(f"{shlex.join(command)} exited with status {result.returncode}:\n"
                         f"{result.stdout}{result.stderr}")
    measured = parse_wrk(result.stdout)
    if measured.non_2xx or measured.requests == 0:
        raise BenchError(f"{endpoint.server} answered {measured.non_2xx} of {measured.requests} "
                         f"requests for {path} with an error; its log ends:\n{endpoint.log.tail()}")
    return measured


@frozen
class Target:
    """
    A line's target: the daemon's req/s at least C{minimum} times the
    peer's, or (C{latency}) its p50 under C{maximum} seconds.
    """

    minimum: float = 0.0
    maximum: float = 0.0

    @property
    def latency(self) -> bool:
        return self.maximum > 0

    def __str__(self) -> str:
        return f"< {self.maximum * 1000:g} ms" if self.latency else f">= {self.minimum:g}"


@frozen
class Line:
    """
    One line of the table: the daemon's answer and the peer's copy of it,
    measured at C{connections}, judged against C{target}.
    """

    name: str
    path: str
    peer_path: str
    connections: int
    target: Target
    ours: Endpoint
    #: The peer's name, and its endpoint (L{None}: left out).
    peer_name: str
    peer: Endpoint | None


@frozen
class Median:
    """
    The median over the rounds of one server's measurements of a line.
    """

    requests_per_second: float
    p50: float
    socket_errors: int

    @classmethod
    def of(cls, results: list[WrkResult]) -> Median:
        return cls(statistics.median(r.requests_per_second for r in results),
                   statistics.median(r.p50 for r in results),
                   sum(r.socket_errors for r in results))


def progress(round_: int, rounds: int, line: Line, endpoint: Endpoint, result: WrkResult) -> None:
    errors = f", {result.socket_errors} socket errors" if result.socket_errors else ""
    print(f"  round {round_}/{rounds}  {line.name:<36} {endpoint.server:<13}"
          f" {result.requests_per_second:>10,.0f} req/s  p50 {result.p50 * 1000:8.3f} ms"
          f"  p99 {result.p99 * 1000:8.3f} ms{errors}", flush=True)


def measure_lines(
    wrk: Wrk, lines: list[Line], seconds: int, rounds: int
) -> dict[str, tuple[Median, Median | None]]:
    """
    Each line's daemon and peer, one after the other, in C{rounds} rounds
    (every other round the peer first, so a drift weighs on both), after
    L{WARM_UP_SECONDS} of load on each; the medians by line name.
    """
    for line in lines:
        for endpoint, path in ((line.ours, line.path), (line.peer, line.peer_path)):
            if endpoint is not None:
                run_wrk(wrk, endpoint, path, CONNECTIONS, WARM_UP_SECONDS)
    results: dict[tuple[str, str], list[WrkResult]] = {}
    for round_ in range(1, rounds + 1):
        for line in lines:
            pairs = [(line.ours, line.path), (line.peer, line.peer_path)]
            for endpoint, path in pairs if round_ % 2 else pairs[::-1]:
                if endpoint is None:
                    continue
                result = run_wrk(wrk, endpoint, path, line.connections, seconds)
                progress(round_, rounds, line, endpoint, result)
                results.setdefault((line.name, endpoint.server), []).append(result)
    return {
        line.name: (Median.of(results[line.name, line.ours.server]),
                    None if line.peer is None else Median.of(results[line.name, line.peer.server]))
        for line in lines
    }


# The memory line.


def process_tree(root: int) -> list[int]:
    """
    C{root} and every process descended from it, from /proc.
    """
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        # The command name, in parentheses, may hold spaces: the parent
        # is the second field after it.
        parent = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(parent, []).append(int(entry))
    tree, pending = [], [root]
    while pending:
        pid = pending.pop()
        tree.append(pid)
        pending += children.get(pid, [])
    return tree


def status_field(pid: int, name: str) -> int:
    """
    A size field of /proc/C{pid}/status (VmRSS, VmHWM), in bytes.
    """
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(name + ":"):
                return int(line.split()[1]) * KiB
    raise BenchError(f"/proc/{pid}/status has no {name}")


@frozen
class Memory:
    """
    The daemon's process tree once its hot set was filled: each process's
    RSS and peak RSS, how many distinct bytes were cached, and how long
    asking for them took.
    """

    rss: dict[int, int]
    peak: dict[int, int]
    filled: int
    took: float

    @property
    def total(self) -> int:
        return sum(self.rss.values())

    @property
    def workers(self) -> int:
        # The supervisor alone is one worker.
        return max(1, len(self.rss) - 1)

    def budget(self, bound: int) -> int:
        return bound + self.workers * PER_WORKER


def fill_hot_set(
    source: Source, workdir: str, bound_text: str, bound: int, extra: Sequence[str]
) -> Memory:
    """
    A daemon with C{--memory-cache} at C{bound}, filled with L{HOT_FILL}
    times as many distinct cached tarballs, each asked for L{HOT_GETS}
    times; its process tree's memory.
    """
    count = math.ceil(HOT_FILL * bound / HOT_TARBALL_SIZE)
    root = os.path.join(workdir, "hot-upstream")
    with ExitStack() as stack:
        upstream = Upstream(root)
        stack.callback(upstream.stop)
        tarballs = {f"1.0.{n}": os.urandom(HOT_TARBALL_SIZE) for n in range(count)}
        for version, body in tarballs.items():
            write_file(root, tarball_path(HOT, version), body)
        upstream.publish(small_packument(HOT, upstream.url, tarballs))
        # Ours last: the bound judged is the bound the daemon was given.
        options = [*daemon_options(upstream.url), *extra, MEMORY_OPTION, bound_text]
        daemon, log = start_daemon(stack, source, os.path.join(workdir, "hot-storage"), options)
        print(f"  memory: {count} distinct tarballs of {HOT_TARBALL_SIZE:,} bytes "
              f"({mib(count * HOT_TARBALL_SIZE)}), each asked {HOT_GETS} times, through a "
              "second daemon:")
        print(describe(daemon, source, options), flush=True)
        endpoint = Endpoint("contentcache", daemon.url, host(daemon.url), log)
        abbreviated = evolve(endpoint, headers={**endpoint.headers, "Accept": VARIANTS["abbreviated"]})
        started = time.monotonic()
        check(abbreviated, f"/npm/{HOT}")
        for version, body in tarballs.items():
            path = "/npm" + tarball_path(HOT, version)
            check(endpoint, path, body)
            for _ in range(HOT_GETS - 1):
                check(endpoint, path, body, x_cache="HIT")
        took = time.monotonic() - started
        tree = process_tree(daemon.process.pid)
        memory = Memory({pid: status_field(pid, "VmRSS") for pid in tree},
                        {pid: status_field(pid, "VmHWM") for pid in tree},
                        count * HOT_TARBALL_SIZE, took)
    return memory


# The table.


@frozen
class Verdict:
    """
    A row of the table, as printed, and whether it passed (L{None}: not
    judged).
    """

    name: str
    ours: str
    peer: str
    ratio: str
    target: str
    passed: bool | None

    @property
    def result(self) -> str:
        return "n/a" if self.passed is None else "PASS" if self.passed else "FAIL"

    def cells(self) -> list[str]:
        return [self.name, self.ours, self.peer, self.ratio, self.target, self.result]


TABLE_HEADER = ["cached answer", "contentcache req/s", "peer req/s", "ratio", "target", "PASS/FAIL"]


def verdict(line: Line, ours: Median, peer: Median | None) -> Verdict:
    name = f"{line.name} vs {line.peer_name}"
    if line.target.latency:
        passed = ours.p50 < line.target.maximum
        return Verdict(name, f"p50 {ours.p50 * 1000:.3f} ms",
                       f"p50 {peer.p50 * 1000:.3f} ms" if peer else "skipped",
                       "-", str(line.target), passed)
    if peer is None:
        return Verdict(name, f"{ours.requests_per_second:,.0f}", "skipped", "-",
                       str(line.target), None)
    ratio = ours.requests_per_second / peer.requests_per_second
    return Verdict(name, f"{ours.requests_per_second:,.0f}", f"{peer.requests_per_second:,.0f}",
                   f"{ratio:.2f}", str(line.target), ratio >= line.target.minimum)


def memory_verdict(memory: Memory | None, bound: int) -> Verdict:
    name = "memory: hot set filled 3x past its bound"
    if memory is None:
        return Verdict(name, "n/a", "-", "-", f"< bound + {mib(PER_WORKER)} per worker", None)
    budget = memory.budget(bound)
    return Verdict(name, f"RSS {mib(memory.total)}", "-", "-",
                   f"< {mib(budget)} ({mib(bound)} + {memory.workers} x {mib(PER_WORKER)})",
                   memory.total < budget)


def mib(size: int) -> str:
    return f"{size / MiB:.0f} MiB"


def print_table(rows: list[Verdict]) -> None:
    cells = [TABLE_HEADER] + [row.cells() for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(TABLE_HEADER))]
    for n, row in enumerate(cells):
        print("| " + " | ".join(cell.ljust(w) for cell, w in zip(row, widths)) + " |")
        if n == 0:
            print("|" + "|".join("-" * (w + 2) for w in widths) + "|")


# The benchmark.


def warm(
    fixtures: Fixtures, daemon: Endpoint, nginx: Endpoint, nginx_root: str,
    verdaccio: Endpoint | None,
) -> dict[str, int]:
    """
    Fill every server's cache the same way and check its answers: from the
    daemon a miss, then a hit; nginx gets the daemon's bytes on its disk.
    Returns the size of the abbreviated packument each npm server answers.
    """
    abbreviated = {"Accept": VARIANTS["abbreviated"]}
    for ext, path in PROXY_PATHS.items():
        check(daemon, path, fixtures.go.bodies[ext])
        body = check(daemon, path, fixtures.go.bodies[ext], x_cache="HIT")
        write_file(nginx_root, f"/{os.path.basename(path)}", body)
        check(nginx, f"/{os.path.basename(path)}", body)
    packument = rendered(fixtures.express, fixtures.url, daemon.url)
    express = evolve(daemon, headers={**daemon.headers, **abbreviated})
    check(express, f"/npm/{EXPRESS}", packument)
    sizes = {daemon.server: len(check(express, f"/npm/{EXPRESS}", packument, x_cache="HIT"))}
    tarball = "/npm" + tarball_path(LODASH, LODASH_VERSION)
    check(evolve(daemon, headers={**daemon.headers, **abbreviated}), f"/npm/{LODASH}")
    check(daemon, tarball, fixtures.tarball)
    check(daemon, tarball, fixtures.tarball, x_cache="HIT")
    if verdaccio is not None:
        # Verdaccio finds a tarball's uplink in its packument: that first.
        peer = evolve(verdaccio, headers={**verdaccio.headers, **abbreviated})
        check_packument(peer, f"/{EXPRESS}", fixtures.express)
        sizes[verdaccio.server] = len(check_packument(peer, f"/{EXPRESS}", fixtures.express))
        check_packument(peer, f"/{LODASH}", fixtures.lodash)
        for _ in range(2):
            check(verdaccio, tarball_path(LODASH, LODASH_VERSION), fixtures.tarball)
    return sizes


def make_lines(daemon: Endpoint, nginx: Endpoint, verdaccio: Endpoint | None) -> list[Line]:
    abbreviated = {"Accept": VARIANTS["abbreviated"]}
    go = {ext: (path, f"/{os.path.basename(path)}") for ext, path in PROXY_PATHS.items()}
    express = evolve(daemon, headers={**daemon.headers, **abbreviated})
    express_peer = (None if verdaccio is None
                    else evolve(verdaccio, headers={**verdaccio.headers, **abbreviated}))
    tarball = tarball_path(LODASH, LODASH_VERSION)
    return [
        Line("Go .info, 32 conns", *go["info"], CONNECTIONS, Target(minimum=TARGET_INFO),
             daemon, "nginx", nginx),
        Line("Go 1.5 MB .zip, 32 conns", *go["zip"], CONNECTIONS, Target(minimum=TARGET_ZIP),
             daemon, "nginx", nginx),
        Line("npm 540 KB tarball, 32 conns", "/npm" + tarball, tarball, CONNECTIONS,
             Target(minimum=TARGET_TARBALL), daemon, "Verdaccio", verdaccio),
        Line("npm abbreviated packument, 32 conns", f"/npm/{EXPRESS}", f"/{EXPRESS}",
             CONNECTIONS, Target(minimum=TARGET_PACKUMENT), express, "Verdaccio", express_peer),
        Line("Go .info p50, 1 conn", *go["info"], 1, Target(maximum=TARGET_INFO_P50),
             daemon, "nginx", nginx),
    ]


def check_upstream(upstream: Upstream, fixtures: Fixtures, warmed: int) -> None:
    """
    Upstream was asked for each Go file once (the daemon's miss), and for
    nothing after the first C{warmed} requests (the warm-up's): every
    answer measured came from a cache.
    """
    go = fixtures.go.fetched(upstream)
    later = [f"{method} {path}" for method, path, _ in upstream.log[warmed:]]
    if any(n != 1 for n in go.values()) or later:
        raise BenchError(f"upstream was asked for the Go files {go} times, and for {later} while "
                         "measuring: the answers measured were not all from a cache")


def benchmark(wrk: Wrk, workdir: str, args: argparse.Namespace) -> bool:
    """
    Measure, print, and return whether every target was met.
    """
    started = time.monotonic()
    extra = shlex.split(args.daemon_args)
    source = find_source(args.source, workdir)
    nginx_path = nginx_program()
    verdaccio_path, verdaccio_note = (None, "") if args.no_verdaccio else verdaccio_program()
    root = os.path.join(workdir, "upstream")
    os.mkdir(root)

    print("contentcache cached hits against nginx and Verdaccio, under wrk on 127.0.0.1")
    print(f"  workdir: {workdir} (removed at the end)")
    print(f"  machine: {os.cpu_count()} CPUs (usable: {len(os.sched_getaffinity(0))}), shared by "
          f"wrk and the servers; wrk {wrk.version()}")
    print(f"  wrk --latency -t1: {args.duration} s per measurement, {args.rounds} rounds, the "
          f"median printed; {WARM_UP_SECONDS} s at {CONNECTIONS} connections per URL first")

    with ExitStack() as stack:
        upstream = Upstream(root)
        stack.callback(upstream.stop)
        fixtures = build_fixtures(root, upstream)
        print(fixtures)
        options = [*daemon_options(upstream.url), *extra]
        daemon, daemon_log = start_daemon(stack, source, os.path.join(workdir, "storage"), options)
        print(describe(daemon, source, options))
        ours = Endpoint("contentcache", daemon.url, host(daemon.url), daemon_log)
        nginx_dir = os.path.join(workdir, "nginx")
        nginx_root = os.path.join(nginx_dir, "root")
        os.makedirs(nginx_root)
        nginx_url, nginx_log = start_nginx(stack, nginx_path, nginx_dir, nginx_root)
        nginx = Endpoint("nginx", nginx_url, host(nginx_url), nginx_log)
        print(f"  nginx {nginx_version(nginx_path)}: 2 worker processes, sendfile on, access_log "
              "off, the daemon's answers as files")
        verdaccio = None
        if verdaccio_path is not None:
            verdaccio_dir = os.path.join(workdir, "verdaccio")
            os.mkdir(verdaccio_dir)
            url, log = start_verdaccio(stack, verdaccio_path, verdaccio_dir, upstream.url)
            verdaccio = Endpoint("Verdaccio", url, host(url), log)
            print(f"  Verdaccio {VERDACCIO_VERSION} ({verdaccio_note}), Node {node_version()}:"
                  f" the fixture as its uplink (maxage {METADATA_TTL}), NODE_ENV=production")
        else:
            print("  Verdaccio: skipped (--no-verdaccio)")
        sizes = warm(fixtures, ours, nginx, nginx_root, verdaccio)
        warmed = len(upstream.log)
        print("  warmed: the daemon answered a miss, then X-Cache: HIT, for each; nginx serves "
              "its bytes; Verdaccio asked for each packument, then the tarball twice")
        print(f"  {EXPRESS}'s abbreviated packument as answered: " + ", ".join(
            f"{server} {size:,} bytes" for server, size in sizes.items()))
        print()
        lines = make_lines(ours, nginx, verdaccio)
        medians = measure_lines(wrk, lines, args.duration, args.rounds)
        check_upstream(upstream, fixtures, warmed)

    bound = parse_size(args.memory_bound)
    memory = None
    if source.knows_memory_cache:
        print()
        memory = fill_hot_set(source, workdir, args.memory_bound, bound, extra)
    print()
    rows = [verdict(line, *medians[line.name]) for line in lines]
    rows.append(memory_verdict(memory, bound))
    print_table(rows)
    print()
    errors = {(name, i): m.socket_errors for name, pair in medians.items()
              for i, m in enumerate(pair) if m is not None and m.socket_errors}
    if errors:
        print(f"  socket errors (all rounds): {errors}")
    print("  upstream was asked for each Go file once (the daemon's miss) and for nothing "
          "while measuring")
    if memory is None:
        print("  memory: n/a, this daemon has no --memory-cache option")
    else:
        print(f"  memory: {mib(memory.filled)} of distinct tarballs against --memory-cache "
              f"{args.memory_bound}, asked in {memory.took:.0f} s; the process tree, "
              f"{memory.workers} worker(s): "
              + ", ".join(f"pid {pid} RSS {mib(rss)} (peak {mib(memory.peak[pid])})"
                          for pid, rss in memory.rss.items()))
    print(f"  took {time.monotonic() - started:.0f} s")
    return all(row.passed is not False for row in rows)


def main(argv: Sequence[str] | None = None) -> None:
    parser = make_parser(__doc__)
    parser.add_argument(
        "--duration", type=int, default=DEFAULT_DURATION, metavar="SECONDS",
        help=f"how long wrk loads each measurement (default: {DEFAULT_DURATION})",
    )
    parser.add_argument(
        "--rounds", type=int, default=DEFAULT_ROUNDS, metavar="N",
        help=f"how many times each line is measured; the median is printed "
        f"(default: {DEFAULT_ROUNDS})",
    )
    parser.add_argument("--quick", action="store_true",
                        help="a smoke run: --duration 1 --rounds 1")
    parser.add_argument(
        "--daemon-args", default="", metavar="ARGS",
        help="more options for the daemon, as one string (e.g. '--workers 1')",
    )
    parser.add_argument(
        "--source", metavar="DIR",
        help="run the daemon of the checkout in DIR (a git worktree of another commit) with "
        "this environment (default: this checkout)",
    )
    parser.add_argument(
        "--memory-bound", default=DEFAULT_MEMORY_BOUND, metavar="SIZE",
        help=f"the daemon's --memory-cache for the memory line (default: {DEFAULT_MEMORY_BOUND})",
    )
    parser.add_argument("--no-verdaccio", action="store_true",
                        help="leave Verdaccio out: the npm lines are not judged")
    add_dir_option(parser, "directory (upstream files, storage, peers' state)")
    args = parser.parse_args(argv)
    if args.quick:
        args.duration, args.rounds = 1, 1
    if args.duration < 1 or args.rounds < 1:
        parser.error("--duration and --rounds need whole numbers, at least 1")
    try:
        if parse_size(args.memory_bound) < MiB:
            parser.error("--memory-bound needs at least 1MiB")
    except ValueError as e:
        parser.error(str(e))
    if args.source is not None and not os.path.isdir(os.path.join(args.source, "contentcache")):
        parser.error(f"--source {args.source}: no contentcache package in it")
    check_dir(parser, args)
    run_with_wrk(benchmark, args, WRK_TIMEOUT)


if __name__ == "__main__":
    main()
