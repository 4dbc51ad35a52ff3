"""
C{twistd contentcache}: command-line options and service wiring.
"""

from __future__ import annotations

import os
import re
import sys
from typing import Any, Mapping, Sequence

from twisted.application import strports
from twisted.application.service import IService, Service
from twisted.internet import reactor as _global_reactor
from twisted.internet.endpoints import serverFromString
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python import usage

from . import __version__, activity, metrics
from .activity import ActivityService
from .protocol.goproxy.sumdb import InvalidSumDB, parse_gosumdb
from .protocol.goproxy.sumdb import parse_flag as parse_sumdb_flag
from .units import parse_duration, parse_size
from .cache import Background, ProtocolCache
from .channel import DEFAULT_HEADER_TIMEOUT, DEFAULT_KEEPALIVE_TIMEOUT, Deadlines
from .expiry import Expiry, ExpiryService, Policy
from .discover import (
    FOUND_VARIABLE, GO_SETTINGS, choose_upstream, find_for_workers, first_proxy_url, go_env, npm_registry,
)
from .hash import Hash
from .hot import HotSet, Invalidations
from .auth import Guard, Tokens
from .config import ConfigError, ConfigFile, load as load_config
from .outbound import Outbound, OutboundError, configure as configure_outbound
from .policy import policies
from .routes import credential, go_routes, npm_routes
from .index import IndexService, make_index, make_locks, prepare as prepare_index
from .index.postgresql import STATEMENT_TIMEOUT
from .locks import EXPIRY_PASS, KeyLocks, Leadership, run_directory
from .protocol.goproxy.resource import PROTOCOL as GO
from .protocol.goproxy.resource import SUMDB_PROTOCOL as GOSUMDB
from .protocol.goproxy.resource import GoProxy, GoProxyResource
from .protocol.goproxy.service import GoProxyService
from .protocol.npm.resource import PROTOCOL as NPM
from .protocol.npm.names import PackageName
from .protocol.goproxy.paths import Module, escape
from .protocol.npm.resource import NpmRegistry, NpmResource
from .protocol.npm.service import NpmService
from . import logs
from .logs import FORMATS, LEVELS
from .lifecycle import Every, ExitCleanlyOnSIGTERM, NotifyReady, SequentialServices, StoreService
from .compress import DEFAULT_LEVEL
from .pool import DEFAULT_THREADS, DiskPool, SynchronousRunner
from .scrub import Scrub, ScrubService
from .server import CacheSite, Root
from .space import DEFAULT_MIN_FREE, DiskSpace, MinFree
from .backend import StorageUnavailable
from .storage import StorageConfig
from .tracing import TracingService
from .ui import Dashboard, Settings
from .ui.resource import resources as ui_resources
from .upstream import NegativeCache, Timeouts
from .web import AsyncResource
from .workers import AdoptedPort, NotifySupervisor, Supervisor, worker_slot

ENVIRONMENT_PREFIX = "CONTENTCACHE_"
#: Who may use a part of the daemon.
ACCESS = ("public", "token")
MAX_DISK_THREADS = 256
MAX_WORKERS = 64
#: The most workers started when --workers is not given.
DEFAULT_MAX_WORKERS = 8


def default_workers() -> int:
    """
    The CPUs this process may run on, at most L{DEFAULT_MAX_WORKERS}.
    """
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    return max(1, min(cpus, DEFAULT_MAX_WORKERS))


def environment_name(option: str) -> str:
    """
    The environment variable that carries C{--option}.
    """
    return ENVIRONMENT_PREFIX + option.upper().replace("-", "_")


_TCP_PORT = re.compile(r"(?:(?:tcp6?|ssl):)?(?:port=)?(\d+)(?::.*)?")


def normalise_port(description: str) -> str:
    """
    A bare port number means TCP on every interface.
    """
    description = description.strip()
    m = _TCP_PORT.fullmatch(description)
    if m and int(m[1]) > 65535:
        raise usage.UsageError(f"--port {description}: {m[1]} is not a port number (0-65535).")
    if description.isdigit():
        return f"tcp:{int(description)}"
    return description


def _config_path(argv: Sequence[str]) -> str | None:
    """
    The --config the command line gives, if any.
    """
    for i, arg in enumerate(argv):
        if arg == "--":
            break
        if arg == "--config" and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("--config="):
            return arg.split("=", 1)[1]
    return None


class Options(usage.Options):
    """
    Options for C{twistd contentcache}. Each can also be set in the
    environment as C{CONTENTCACHE_<OPTION>} (C{--disk-threads} as
    C{CONTENTCACHE_DISK_THREADS}); a flag on the command line wins.
    """

    synopsis = "[options]"
    longdesc = (
        "A pull-through cache for the npm registry and the Go module proxy. "
        "Every option can also be set in the environment as "
        "CONTENTCACHE_<OPTION>, e.g. CONTENTCACHE_STORAGE; a flag wins."
    )

    optFlags: list[list[object]] = [
        ["no-metrics", None, "Do not count requests for /metrics (to measure what counting costs)."],
    ]

    optParameters: list[list[object]] = [
        ["config", None, None, "A TOML file of settings: any option by its long name, [npm] and [go] "
         "tables for theirs (a flag or environment variable wins over the file)."],
        ["port", "p", "8080", "Where to listen: a port number or an endpoint description "
         "(tcp:8080:interface=127.0.0.1, systemd:domain=INET6:name=contentcache)."],
        ["storage", "s", "./cache", "Where blobs are kept: a directory (created if missing; the "
         "index goes there too), or s3://BUCKET/PREFIX."],
        ["state-dir", None, None, "The local directory of the index (and, with S3, of spool "
         "files); needed with s3:// storage. Default: the storage directory."],
        ["index", None, None, "The index: postgresql://[user@]host[:port]/dbname, one database for "
         "several nodes (the password from PGPASSWORD, ~/.pgpass or a service file); default: SQLite "
         "in the state directory."],
        ["s3-endpoint", None, None, "The S3-compatible server's URL (MinIO, Ceph, ...); default: "
         "AWS S3. Credentials come from the AWS chain: environment, ~/.aws files, instance role."],
        ["s3-region", None, None, "The S3 region (default: the AWS configuration's)."],
        ["ca-file", None, None, "A PEM file of certificate authorities to trust for upstreams, besides the "
         "system's (SSL_CERT_FILE too). Verification is always on."],
        ["s3-part-size", None, "16MiB", "Blobs larger than this go to S3 in parts of this size "
         "(at least 5MiB)."],
        ["compression-level", None, str(DEFAULT_LEVEL), "zstd level for blobs that compress "
         "(JSON metadata, go.mod); 0 stores everything as it came."],
        ["disk-threads", None, str(DEFAULT_THREADS), "Threads for disk and index work (in each worker)."],
        ["workers", None, None, "Worker processes serving the port (default: the CPUs this process may "
         "run on, at most 8; 1: one process)."],
        ["memory-cache", None, "256MiB", "Keep index entries and small blobs (metadata, small tarballs) "
         "in memory, this much for the whole daemon, shared out among the workers; 0: off."],
        ["go-upstream", None, None, "The Go module proxy to fetch from (default: the first "
         "URL in `go env GOPROXY`; none: cache-only)."],
        ["go-nosumdb", None, None, "Comma-separated module path patterns never looked up in "
         "the checksum database (private modules), as GONOSUMDB (default: go env "
         "GONOSUMDB, else GOPRIVATE)."],
        ["go-metadata-ttl", None, "10m", "How long @v/list, @latest and version queries are "
         "served before they are revalidated upstream."],
        ["go-min-age", None, "0", "Serve only Go module versions published at least this long ago (their "
         ".info Time): younger ones leave @v/list and @latest and are refused with 403 (0: off; "
         "exemptions in the --config file's [policy.min_age])."],
        ["npm-upstream", None, None, "The npm registry to fetch from (default: `npm config get "
         "registry`; none: cache-only)."],
        ["npm-metadata-ttl", None, "5m", "How long packuments are served before they are "
         "revalidated upstream."],
        ["npm-min-age", None, "0", "Serve only npm versions published at least this long ago (the "
         "packument's time): younger ones leave packuments and dist-tags and their tarballs are refused "
         "with 403 (0: off; exemptions in the --config file's [policy.min_age])."],
        ["stale-while-revalidate", None, "1d", "For this long past its metadata TTL, a packument, list or "
         "query is answered from the cache at once while it is revalidated in the background (0: the "
         "revalidation is waited for)."],
        ["public-url", None, None, "This cache's address as clients reach it, for the tarball "
         "addresses in packuments (default: each request's Host and X-Forwarded-Proto)."],
        ["negative-ttl", None, "1m", "How long an upstream 404 is remembered."],
        ["ttl", None, "30d", "Remove an entry this long after its last use (0: never)."],
        ["max-size", None, None, "Keep the store under this size (e.g. 20GiB): above it, the "
         "least recently used entries go first, down to 90%."],
        ["grace", None, "15m", "Never delete a blob younger than this."],
        ["expiry-interval", None, "10m", "How often expiry runs."],
        ["min-free", None, DEFAULT_MIN_FREE, "Keep this much of the storage's filesystem free (a size, "
         "or a percentage of the filesystem; with S3, of the spool directory's): expiry evicts the "
         "least recently used entries below it, and at once when a write finds the disk full. 0: off."],
        ["scrub-interval", None, "7d", "Re-hash the whole store in the background about once in "
         "this long, deleting damaged blobs so they are fetched again (0: off)."],
        ["log-format", None, "text", "text, or json: one JSON object per line (every line, "
         "twistd's own included), on standard output."],
        ["access", None, "public", "Who may use /goproxy and /npm: public (anyone who reaches the port) or "
         "token (a client token, from `contentcache token create NAME`)."],
        ["metrics-access", None, "public", "Who may read /metrics: public or token. /health is always open."],
        ["ui-access", None, None, "Who may see the status page (/), /-/stats and the package views: public or "
         "token (default: token when --access is token or a route's content needs one, else as "
         "--metrics-access)."],
        ["log-level", None, "info", "The least severe events logged: debug, info, warn, error "
         "or critical."],
        ["connect-timeout", None, "10s", "Timeout for connecting to an upstream."],
        ["upstream-timeout", None, "30s", "Timeout for an upstream's response headers."],
        ["idle-timeout", None, "30s", "Give up on an upstream body that sends nothing for this long "
         "(and on a client's request body, or a client that reads nothing of its response)."],
        ["header-timeout", None, f"{DEFAULT_HEADER_TIMEOUT:g}s", "Close a connection that has not sent a "
         "whole request line and headers within this long."],
        ["keepalive-timeout", None, f"{DEFAULT_KEEPALIVE_TIMEOUT:g}s", "Close a connection idle between "
         "requests for this long."],
    ]

    #: Options that may be given several times; in the environment their
    #: values are separated by white space.
    repeatable = ["go-sumdb", "npm-tarball-host"]

    def opt_npm_tarball_host(self, value: str) -> None:
        """
        Another host (host or host:port) npm tarballs may be fetched from, besides the npm upstream's (repeatable).
        """
        if not re.fullmatch(r"[A-Za-z0-9.-]+(?::[0-9]{1,5})?", value):
            raise usage.UsageError(f"--npm-tarball-host takes a host or host:port, not {value!r}.")
        self.setdefault("npm-tarball-host", [])
        self["npm-tarball-host"].append(value)

    def opt_go_sumdb(self, value: str) -> None:
        """
        A checksum database to proxy and verify against, NAME=URL (repeatable; the first verifies downloads), or off. Default: the go command's GOSUMDB.
        """
        if value == "off":
            self["go-sumdb"] = "off"
            return
        try:
            entry = parse_sumdb_flag(value)
        except InvalidSumDB as e:
            raise usage.UsageError(f"{e}.") from None
        if not isinstance(self.get("go-sumdb"), list):
            self["go-sumdb"] = []
        self["go-sumdb"].append(entry)

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        super().__init__()
        self._environ = os.environ if environ is None else environ

    def _long_names(self) -> list[str]:
        return [str(p[0]) for p in self.optParameters] + self.repeatable

    def _given(self, argv: Sequence[str]) -> set[str]:
        """
        The long names of the options C{argv} sets.
        """
        short = {str(p[1]): str(p[0]) for p in self.optParameters if p[1]}
        given = set()
        for arg in argv:
            if arg == "--":
                break
            if arg.startswith("--"):
                given.add(arg[2:].split("=", 1)[0])
            elif arg.startswith("-") and len(arg) > 1 and arg[1] in short:
                given.add(short[arg[1]])
        return given

    def parseOptions(self, options: Sequence[str] | None = None) -> None:
        argv = list(sys.argv[1:] if options is None else options)
        given = self._given(argv)
        from_environment = []
        for name in self._long_names():
            value = self._environ.get(environment_name(name))
            if name in given or value is None:
                continue
            values = value.split() if name in self.repeatable else [value]
            from_environment += [f"--{name}={v}" for v in values]
            given.add(name)
        for flag in (str(f[0]) for f in self.optFlags):
            value = self._environ.get(environment_name(flag), "")
            if flag not in given and value.lower() in ("1", "true", "yes", "on"):
                from_environment.append(f"--{flag}")
                given.add(flag)
        # The file, for what neither the command line nor the environment says.
        from_file: list[str] = []
        filed: set[str] = set()
        self.config: ConfigFile | None = None
        path = _config_path(argv) or self._environ.get(environment_name("config"))
        if path:
            try:
                self.config = load_config(path, [n for n in self._long_names() if n != "config"],
                                          self.repeatable, [str(f[0]) for f in self.optFlags])
            except ConfigError as e:
                raise usage.UsageError(str(e)) from None
            for setting in self.config.settings:
                if setting.option not in given:
                    from_file += [f"--{setting.option}={v}" for v in setting.values] or [f"--{setting.option}"]
                    given.add(setting.option)
                    filed.add(setting.option)
        #: The options set on the command line, in the environment or in the
        #: configuration file.
        self.explicit = given
        #: As given, for the workers (which see the same environment and file).
        self.argv = argv
        try:
            super().parseOptions(from_file + from_environment + argv)
        except usage.UsageError as e:
            # A value the file gave: say where it is.
            m = re.match(r"--([a-z0-9-]+)", str(e))
            if m is not None and m[1] in filed and self.config is not None:
                raise usage.UsageError(f"{self.config.where(m[1])}: {e}") from None
            raise

    def postOptions(self) -> None:
        self["port"] = normalise_port(str(self["port"]))
        try:
            if worker_slot() is None:  # a worker is given the supervisor's socket
                serverFromString(_global_reactor, self["port"])
        except Exception as e:  # any endpoint it cannot make: refused, in a sentence
            raise usage.UsageError(
                f"--port {self['port']!r} is not an endpoint this daemon can listen on ({e})."
            )

        workers = self["workers"]
        if workers is None:
            self["workers"] = default_workers()
        elif not str(workers).isdigit() or not 1 <= int(str(workers)) <= MAX_WORKERS:
            raise usage.UsageError(f"--workers must be a whole number from 1 to {MAX_WORKERS}, not {workers!r}.")
        else:
            self["workers"] = int(str(workers))
        if self["workers"] > 1 and not re.match(r"(tcp6?|unix|systemd|ssl):", self["port"]):
            # Workers accept on the bare socket, and wrap TLS themselves
            # only for an ssl: port.
            raise usage.UsageError(
                f"--port {self['port']!r}: with more than one worker the port must be tcp:, tcp6:, unix:, "
                "ssl: or systemd: (or use --workers 1)."
            )
        if self["port"].startswith("ssl:"):
            try:
                tls_options(self["port"])
            except ValueError as e:
                raise usage.UsageError(f"--port: {e}.") from None
        try:
            self["memory-cache"] = parse_size(str(self["memory-cache"]))
        except ValueError as e:
            raise usage.UsageError(f"--memory-cache: {e}.") from None

        threads = str(self["disk-threads"])
        if not threads.isdigit() or not 1 <= int(threads) <= MAX_DISK_THREADS:
            raise usage.UsageError(
                f"--disk-threads must be a whole number from 1 to {MAX_DISK_THREADS}, not {threads!r}."
            )
        self["disk-threads"] = int(threads)

        try:
            part_size = parse_size(str(self["s3-part-size"]))
        except ValueError as e:
            raise usage.UsageError(f"--s3-part-size: {e}.") from None
        level = str(self["compression-level"]).strip()
        if not level.lstrip("-").isdigit():
            raise usage.UsageError(f"--compression-level must be a whole number, not {level!r}.")
        if self["index"] is not None:
            from .index.postgresql import check_address

            try:
                check_address(str(self["index"]))
            except ValueError as e:
                raise usage.UsageError(f"{e}.") from None
        try:
            self["storage"] = StorageConfig.parse(
                str(self["storage"]), self["state-dir"], self["s3-endpoint"], self["s3-region"],
                part_size, int(level),
            )
        except ValueError as e:
            raise usage.UsageError(str(e)) from None

        for name in ("ttl", "grace", "expiry-interval", "go-metadata-ttl", "npm-metadata-ttl",
                     "stale-while-revalidate", "negative-ttl",
                     "connect-timeout", "upstream-timeout", "idle-timeout", "header-timeout",
                     "keepalive-timeout", "scrub-interval", "npm-min-age", "go-min-age"):
            try:
                self[name] = parse_duration(str(self[name]))
            except ValueError as e:
                raise usage.UsageError(f"--{name}: {e}.") from None
        if self["expiry-interval"] <= 0:
            raise usage.UsageError("--expiry-interval must be more than 0.")
        for name in ("header-timeout", "keepalive-timeout", "idle-timeout"):
            if self[name] <= 0:
                raise usage.UsageError(f"--{name} must be more than 0.")
        try:
            self["min-free"] = MinFree.parse(str(self["min-free"]))
        except ValueError as e:
            raise usage.UsageError(f"--min-free: {e}.") from None
        if ("min-free" in getattr(self, "explicit", ()) and self["min-free"].enabled
                and not isinstance(self["storage"].blobs, str)):
            raise usage.UsageError(
                "--min-free applies to a storage directory: with s3:// storage, evicting objects "
                "frees nothing on the state directory's disk (a full one still answers 507)."
            )
        if self["max-size"] is not None:
            try:
                self["max-size"] = parse_size(str(self["max-size"]))
            except ValueError as e:
                raise usage.UsageError(f"--max-size: {e}.") from None
        if self["log-format"] not in FORMATS:
            raise usage.UsageError(f"--log-format is text or json, not {self['log-format']!r}.")
        if self["ui-access"] is None:
            # The pages name packages and versions: private as soon as any
            # package is (--access token, or a route's content).
            routes = [*self.config.npm_routes, *self.config.go_routes] if self.config is not None else []
            private = self["access"] == "token" or any(r.access == "token" for r in routes)
            self["ui-access"] = "token" if private else self["metrics-access"]
        for name in ("access", "metrics-access", "ui-access"):
            if self[name] not in ACCESS:
                raise usage.UsageError(f"--{name} is public or token, not {self[name]!r}.")
        if self["log-level"] not in LEVELS:
            raise usage.UsageError(f"--log-level is one of {', '.join(LEVELS)}, not {self['log-level']!r}.")
        parent = getattr(self, "parent", None)
        if parent is not None and _own_logging(parent):
            # twistd reads its --logger after parsing our options and before
            # it starts logging: the one place every line's form and level
            # are decided (without it, even debug lines would be written).
            logfile = parent.get("logfile") or (None if parent.get("nodaemon") else "twistd.log")
            logs.configured = (self["log-format"], self["log-level"], logfile)
            parent["logger"] = "contentcache.logs.configured_observer"
        for name in ("go-upstream", "npm-upstream", "public-url"):
            url = self[name]
            if url is not None and not str(url).startswith(("http://", "https://")):
                raise usage.UsageError(f"--{name} must be an http or https URL, not {url!r}.")
        self.setdefault("go-sumdb", None)
        self.setdefault("npm-tarball-host", [])


def _own_logging(twistd: Mapping[str, object]) -> bool:
    """
    Whether the daemon's observer should be twistd's: unless twistd was
    given a --logger or --syslog of its own, or --logfile - for a daemon in
    the background (which twistd refuses, in a sentence).
    """
    if twistd.get("logger") or twistd.get("syslog"):
        return False
    return not (twistd.get("logfile") == "-" and not twistd.get("nodaemon"))


def listening_port(description: str) -> int | None:
    """
    The TCP port an endpoint description listens on, if it names one.
    """
    m = _TCP_PORT.fullmatch(description)
    return int(m[1]) if m else None


def makeService(options: Options) -> IService:
    """
    The daemon: with more than one worker, the supervisor that starts them
    (each worker builds the daemon itself); else the daemon in this process.
    """
    if options["workers"] > 1 and worker_slot() is None:
        return _supervisor(options)
    return _daemon(options)


def _supervisor(options: Options) -> IService:
    """
    Check what every worker will open, bind the port, and start the workers.
    """
    reactor = _global_reactor
    storage: StorageConfig = options["storage"]
    top = SequentialServices()
    Preflight(options).setServiceParent(top)
    supervisor = Supervisor(reactor, options["port"], options["workers"], options.argv,
                            run_directory(storage.state_dir), {FOUND_VARIABLE: find_for_workers})
    supervisor.setServiceParent(top)
    ExitCleanlyOnSIGTERM(reactor).setServiceParent(top)
    NotifyReady(reactor, supervisor.when_ready).setServiceParent(top)
    return top


class Preflight(Service):
    """
    Before the supervisor binds the port and starts workers: what every
    worker would refuse to start with stops the daemon in one sentence
    here, once (an index it cannot open, migrated once; a storage it
    cannot use; an upstream that is the daemon itself).
    """

    def __init__(self, options: Options) -> None:
        self._options = options

    def startService(self) -> None:
        # Not privilegedStartService: with twistd --uid, what is created
        # here belongs to the user the daemon runs as.
        options = self._options
        storage: StorageConfig = options["storage"]
        prepare_index(options["index"], storage.state_dir)
        run = run_directory(storage.state_dir)
        try:
            os.makedirs(run, exist_ok=True)
        except OSError as e:
            raise SystemExit(f"Cannot create the run directory {run}: {e.strerror}.") from None
        # A disk full in one worker is full for /health in every one.
        DiskSpace(storage.staging, shared=run).prepare_marks()
        try:
            storage.store(SynchronousRunner(), 1).backend.check()
        except StorageUnavailable as e:
            raise SystemExit(str(e)) from None
        try:
            Outbound.from_settings([options["ca-file"]] if options["ca-file"] else [])
        except OutboundError as e:
            raise SystemExit(str(e)) from None
        # A route's credential that cannot be read stops the daemon here,
        # once, not in every worker.
        config: ConfigFile | None = getattr(options, "config", None)
        try:
            for route in [*config.npm_routes, *config.go_routes] if config is not None else []:
                credential(route, os.environ)
        except ConfigError as e:
            raise SystemExit(str(e)) from None
        port = listening_port(options["port"])
        find_for_workers()  # asked once: what follows and the workers reuse it
        settings = go_env(*GO_SETTINGS) or {}
        choose_upstream(options["go-upstream"], lambda: first_proxy_url(settings.get("GOPROXY", "")),
                        port, "/goproxy", "go env GOPROXY", "--go-upstream", quiet=True)
        choose_upstream(options["npm-upstream"], npm_registry, port, "/npm", "npm config get registry",
                        "--npm-upstream", quiet=True)
        if options["go-sumdb"] is None:
            try:
                parse_gosumdb(settings.get("GOSUMDB", ""))
            except InvalidSumDB as e:
                raise SystemExit(f"{e}; pass --go-sumdb NAME=URL or --go-sumdb off.") from None
        super().startService()


def _daemon(options: Options) -> IService:
    """
    Wire the daemon: the disk pool first (stopped last), then the index and
    the store, and the listening port last, so that a failed bind stops
    startup and no request arrives before what serves it is ready; then
    the note to systemd (or to the supervisor of workers) that it is.
    """
    reactor = _global_reactor
    storage: StorageConfig = options["storage"]
    slot = worker_slot()
    run = run_directory(storage.state_dir)
    top = SequentialServices()
    # Trusted roots and outbound proxies, before any upstream is made.
    try:
        configure_outbound([options["ca-file"]] if options["ca-file"] else [])
    except OutboundError as e:
        raise SystemExit(str(e)) from None

    TracingService().setServiceParent(top)
    disk = DiskPool(reactor, options["disk-threads"])
    disk.setServiceParent(top)

    # One view of the disk's room, shared by what writes to it. With S3,
    # evicting frees nothing on the local disk: --min-free would empty the
    # cache for nothing, and only the full state is kept.
    min_free = options["min-free"] if isinstance(storage.blobs, str) else MinFree()
    space = DiskSpace(storage.staging, reactor, min_free, shared=run if slot is not None else None, runner=disk)
    index = make_index(options["index"], storage.state_dir, disk, reactor, space, options["disk-threads"],
                       STATEMENT_TIMEOUT)
    IndexService(index, reactor).setServiceParent(top)
    # Per-key locks and the leader's: files on this machine, or advisory
    # locks on the shared index's server for every node.
    lock_space = make_locks(options["index"], run)

    try:
        store = storage.store(disk, options["disk-threads"], space)
    except StorageUnavailable as e:
        raise SystemExit(str(e)) from None
    StoreService(store, sweep=slot in (None, 0), check=slot is None).setServiceParent(top)

    # The hot set: the daemon's --memory-cache, shared out among workers.
    hot = HotSet(options["memory-cache"] // options["workers"] if slot is not None else options["memory-cache"])
    invalidations = Invalidations(hot, index, reactor, prune=False)
    invalidations.setServiceParent(top)
    locks = KeyLocks(lock_space, disk, reactor)

    async def damaged(h: Hash) -> None:
        # Damage found in a blob: every entry that points at it goes with it.
        hot.drop_blob(h)
        await index.forget_entries(h)

    store.damaged = damaged
    store.claim = index.claim_blob

    def gauges() -> None:
        metrics.disk_queue.set(disk.pending)
        metrics.hot_bytes.set(hot.size)
        metrics.hot_entries.set(len(hot))

    if metrics.MULTIPROCESS_DIRECTORY is not None:
        # Each worker's own figures, in its file, for whichever answers.
        Every(reactor, 1.0, gauges).setServiceParent(top)

    # Expiry and the scrub run in one process of the cache at a time (one
    # worker; one node of several; one daemon beside a second by mistake).
    leadership = Leadership(lock_space, run, disk, reactor,
                            on_change=lambda leading: setattr(invalidations, "prune", leading))
    policy = Policy(
        ttl=options["ttl"] or None, max_size=options["max-size"], grace=options["grace"],
        min_free=min_free,
    )
    expiry = ExpiryService(
        Expiry(index, store, reactor, policy, exclusive=lambda: locks.hold(EXPIRY_PASS)),
        reactor, options["expiry-interval"],
    )
    expiry.setServiceParent(leadership)
    leadership.when_short(expiry.make_room)
    space.when_short(leadership.short)
    if options["scrub-interval"] > 0:
        scrub = Scrub(store, index, reactor, disk, storage.state_dir, options["scrub-interval"])
        ScrubService(scrub, reactor).setServiceParent(leadership)
    leadership.setServiceParent(top)

    if slot is None:
        ExitCleanlyOnSIGTERM(reactor).setServiceParent(top)

    timeouts = Timeouts(options["connect-timeout"], options["upstream-timeout"], options["idle-timeout"])
    negative_ttl = options["negative-ttl"]
    # Revalidations after a stale answer: one set for the daemon, stopped
    # before the upstreams, the index and the disk pool they use.
    background = Background(reactor)

    def protocol_cache(protocol: str) -> ProtocolCache:
        return ProtocolCache(protocol, index, store, reactor, NegativeCache(reactor, negative_ttl), hot, locks,
                             stale_while_revalidate=options["stale-while-revalidate"], background=background)

    goproxy = GoProxy(
        store,
        protocol_cache(GO),
        protocol_cache(GOSUMDB),
        disk,
        reactor,
        upstream=None,
        metadata_ttl=options["go-metadata-ttl"],
    )
    port = listening_port(options["port"])
    GoProxyService(
        goproxy, reactor, timeouts, options["go-upstream"], options["go-sumdb"], port,
        options["go-nosumdb"],
    ).setServiceParent(top)

    npm = NpmRegistry(
        store,
        protocol_cache(NPM),
        disk,
        reactor,
        upstream=None,
        tarball_hosts=set(options["npm-tarball-host"]),
        public_url=options["public-url"],
        metadata_ttl=options["npm-metadata-ttl"],
    )
    config: ConfigFile | None = getattr(options, "config", None)
    try:
        npm.routes = npm_routes(config.npm_routes if config is not None else [], reactor, timeouts)
        goproxy.routes = go_routes(config.go_routes if config is not None else [], reactor, timeouts)
    except ConfigError as e:
        raise SystemExit(str(e)) from None
    rules = policies(options["npm-min-age"], options["go-min-age"],
                     config.exempt if config is not None else [], config.deny if config is not None else [])
    npm.policy, goproxy.policy = rules[NPM], rules[GO]
    NpmService(npm, reactor, timeouts, options["npm-upstream"], port).setServiceParent(top)
    background.setServiceParent(top)

    deadlines = Deadlines(
        header=options["header-timeout"], keepalive=options["keepalive-timeout"],
        body=options["idle-timeout"], send=options["idle-timeout"],
    )
    guard = Guard(Tokens(index, reactor))
    # Each decides per package or module: a route says for its own,
    # --access for the rest.
    go_resource = GoProxyResource(goproxy, options["access"], guard)
    npm_resource = NpmResource(npm, options["access"], guard)
    protocols: dict[bytes, AsyncResource] = {b"goproxy": go_resource, b"npm": npm_resource}
    # The status page: the whole daemon's figures whichever worker answers.
    activity_directory = metrics.MULTIPROCESS_DIRECTORY if slot is not None else None
    dashboard = Dashboard(index, store, disk, reactor, ui_settings(options, index.description),
                          directory=activity_directory, slot=slot)
    dashboard.verdicts = {
        NPM: lambda name, versions: npm.held_verdicts(PackageName.parse(name), versions),
        GO: lambda name, versions: goproxy.held_verdicts(Module.parse(escape(name)), versions),
    }
    ActivityService(activity.current, reactor, disk, dashboard.sample, activity_directory, slot).setServiceParent(top)
    metrics.store_max_bytes.set(options["max-size"] or 0)
    ui = ui_resources(dashboard, guard if options["ui-access"] == "token" else None)
    root = Root(store, index, protocols, disk, gauges, ui)
    if options["metrics-access"] == "token":
        root.metrics.guard = guard
    site = CacheSite(root, deadlines, reactor=reactor)
    site.count_requests = not options["no-metrics"]
    if slot is None:
        strports.service(options["port"], site).setServiceParent(top)
        NotifyReady(reactor).setServiceParent(top)
    else:
        # The supervisor's socket is bare TCP: an ssl: port's TLS is the
        # worker's to wrap.
        factory: Any = site
        if options["port"].startswith("ssl:"):
            factory = TLSMemoryBIOFactory(tls_options(options["port"]), False, site)
        AdoptedPort(reactor, factory).setServiceParent(top)
        NotifySupervisor(reactor).setServiceParent(top)
    return top


def ui_settings(options: Options, index_description: str) -> Settings:
    """
    What the status page says of the configuration, and the storage
    options a C{contentcache purge} of this daemon's storage needs.
    """
    storage: StorageConfig = options["storage"]
    purge: list[str] = ["--storage", str(storage.blobs)]
    if not isinstance(storage.blobs, str) or storage.state_dir != storage.blobs:
        purge += ["--state-dir", storage.state_dir]
    for flag, value in (("--s3-endpoint", storage.s3_endpoint), ("--s3-region", storage.s3_region),
                        ("--index", options["index"])):
        if value:
            purge += [flag, str(value)]
    return Settings(
        version=__version__, workers=options["workers"], storage=str(storage.blobs), index=index_description,
        shared_index=options["index"] is not None, max_size=options["max-size"],
        expiry_interval=options["expiry-interval"], scrub_interval=options["scrub-interval"],
        purge_options=tuple(purge),
    )


def tls_options(description: str) -> Any:
    """
    The certificate of an ssl: endpoint description (privateKey=,
    certKey=, extraCertChain=), as Twisted's ssl: endpoint reads them, for
    a worker wrapping TLS on the socket it adopts.
    """
    from twisted.internet import ssl

    parts: dict[str, str] = {}
    for item in re.split(r"(?<!\\):", description)[1:]:
        key, eq, value = item.partition("=")
        if eq:
            parts[key] = value.replace("\\:", ":")
    unknown = set(parts) - {"privateKey", "certKey", "extraCertChain", "interface", "backlog"}
    if unknown:
        # What Twisted's endpoint would honour and a worker would not.
        raise ValueError(f"{description!r}: with workers, an ssl: port takes privateKey, certKey, "
                         f"extraCertChain, interface and backlog, not {', '.join(sorted(unknown))}")
    if "privateKey" not in parts:
        raise ValueError(f"{description!r} names no privateKey=")
    try:
        with open(parts["privateKey"], "rb") as f:
            key = f.read()
        with open(parts.get("certKey", parts["privateKey"]), "rb") as f:
            cert = f.read()
        chain = []
        if "extraCertChain" in parts:
            with open(parts["extraCertChain"], "rb") as f:
                chain = [ssl.Certificate.loadPEM(block).original
                         for block in re.findall(rb"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----",
                                                 f.read(), re.S)]
    except OSError as e:
        raise ValueError(f"cannot read {e.filename}: {e.strerror}") from None
    try:
        certificate = ssl.PrivateCertificate.loadPEM(key + b"\n" + cert)
    except Exception:
        raise ValueError("its privateKey and certKey are not a PEM key and certificate that match") from None
    return ssl.CertificateOptions(privateKey=certificate.privateKey.original,
                                  certificate=certificate.original, extraCertChain=chain)
