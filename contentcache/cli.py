"""
The C{contentcache} command: run the daemon, and look after a storage
directory (stats, gc, verify, purge) whether the daemon runs or not.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any, Coroutine, Sequence, TypeVar

from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

from . import __version__, admin, auth
from .backend import StorageUnavailable
from .backend.s3 import DEFAULT_PART_SIZE
from .expiry import DEFAULT_GRACE, DEFAULT_TTL, Expiry, Policy
from .index import INDEX_FILENAME, IIndex, IndexTooNew, IndexUnavailable, make_index, make_locks
from .index.postgresql import PostgreSQLDatabase, check_address, describe
from .index.sqlite import SQLiteDatabase
from .locks import EXPIRY_PASS, held_blocking, run_directory
from .pool import SynchronousRunner
from .space import MinFree
from .storage import StorageConfig
from .store import Store
from .units import parse_duration, parse_size

T = TypeVar("T")


def _clock() -> Any:
    # The reactor's seconds() is the wall clock; nothing here runs it.
    from twisted.internet import reactor

    return reactor


def _wait(coroutine: Coroutine[Any, Any, T]) -> T:
    """
    Run a coroutine whose disk work is synchronous (L{SynchronousRunner}):
    it completes before this returns.
    """
    results: list[Any] = []
    Deferred.fromCoroutine(coroutine).addBoth(results.append)
    assert results, "an admin operation did not complete synchronously"
    if isinstance(results[0], Failure):
        results[0].raiseException()
    return results[0]


class Progress:
    """
    Progress on stderr: a line that redraws itself on a terminal, a plain
    line every so often otherwise.
    """

    def __init__(self, what: str, every: int = 1000) -> None:
        self._what = what
        self._every = every
        self._tty = sys.stderr.isatty()
        self._last = 0.0
        self._printed = 0

    def __call__(self, done: int, total: int | None) -> None:
        if self._tty:
            now = time.monotonic()
            if now - self._last >= 0.1:
                self._last = now
                of = f"/{total}" if total else ""
                sys.stderr.write(f"\r{self._what}: {done}{of}")
                sys.stderr.flush()
        elif done // self._every > self._printed:
            self._printed = done // self._every
            print(f"{self._what}: {done}", file=sys.stderr)

    def close(self) -> None:
        if self._tty:
            sys.stderr.write("\n")


def _config(args: argparse.Namespace) -> StorageConfig:
    try:
        return StorageConfig.parse(
            args.storage, args.state_dir, args.s3_endpoint, args.s3_region, DEFAULT_PART_SIZE
        )
    except ValueError as e:
        raise SystemExit(f"contentcache: {e}") from None


def _open(args: argparse.Namespace) -> tuple[IIndex, Store]:
    config = _config(args)
    address = args.index
    if address is None and not os.path.isfile(os.path.join(config.state_dir, INDEX_FILENAME)):
        what = "storage" if isinstance(config.blobs, str) else "state"
        raise SystemExit(f"contentcache: {config.state_dir} is not a {what} directory (it has no {INDEX_FILENAME}).")
    if address is not None:
        try:
            check_address(address)
        except ValueError as e:
            raise SystemExit(f"contentcache: {e}.") from None
    disk = SynchronousRunner()
    try:
        store = config.store(disk, 1)
        store.backend.check()
    except StorageUnavailable as e:
        raise SystemExit(f"contentcache: {e}") from None
    index = make_index(address, config.state_dir, disk, _clock())
    try:
        index.open()
    except (IndexTooNew, IndexUnavailable) as e:
        raise SystemExit(f"contentcache: {e}") from None
    return index, store


def _human(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:.1f} {unit}" if unit != "B" else f"{n} B"
        size /= 1024
    return f"{n} B"


def _stats(args: argparse.Namespace) -> int:
    index, _ = _open(args)
    found = _wait(admin.stats(index))
    if args.json:
        print(json.dumps(found, indent=2, sort_keys=True))
        return 0
    for protocol, count in sorted(found["entries"].items()):
        print(f"entries ({protocol}): {count}")
    print(f"blobs: {found['blobs']} ({found['compressed_blobs']} compressed)")
    for label, name in (("logical bytes", "logical_bytes"), ("unique bytes", "unique_bytes"),
                        ("bytes stored", "stored_bytes")):
        print(f"{label}: {found[name]} ({_human(found[name])})")
    for label, name in (("dedup ratio", "dedup_ratio"), ("compression ratio", "compression_ratio"),
                        ("logical/stored ratio", "ratio")):
        print(f"{label}: {found[name] if found[name] is not None else '-'}")
    return 0


def _gc(args: argparse.Namespace) -> int:
    if args.min_free.enabled and not isinstance(_config(args).blobs, str):
        raise SystemExit("contentcache: --min-free applies to a storage directory: with s3:// storage, "
                         "evicting objects frees nothing on the local disk.")
    index, store = _open(args)
    policy = Policy(ttl=args.ttl or None, max_size=args.max_size, grace=args.grace, min_free=args.min_free)

    def removed(kind: str, name: str) -> None:
        if not args.json:
            print(f"{'would remove' if args.dry_run else 'removed'} {kind} {name}")

    progress = Progress("entries examined", every=100_000)
    # One pass at a time in the whole cache: a daemon's, or another gc's.
    space = make_locks(args.index, run_directory(_config(args).state_dir))
    expiry = Expiry(index, store, _clock(), policy, removed=removed, progress=progress,
                    exclusive=lambda: held_blocking(space, EXPIRY_PASS))
    try:
        report = _wait(expiry.run(dry_run=args.dry_run))
    finally:
        progress.close()
    if args.json:
        print(json.dumps(report.as_dict(), indent=2, sort_keys=True))
    else:
        print(report.summary())
    return 0


def _verify(args: argparse.Namespace) -> int:
    index, store = _open(args)
    progress = Progress("blobs verified")
    try:
        result = _wait(admin.verify(index, store, args.repair, progress))
    finally:
        progress.close()
    if args.json:
        print(json.dumps(result.as_dict(), indent=2, sort_keys=True))
    else:
        for label, hashes in (("corrupt", result.corrupt), ("missing", result.missing),
                              ("orphan", result.orphans)):
            for h in hashes:
                print(f"{label} blob {h}{' (repaired)' if args.repair else ''}")
        print(f"{result.blobs} blobs checked, {result.problems} problems"
              + (", repaired" if args.repair and result.problems else ""))
    return 1 if result.problems and not args.repair else 0


def _purge(args: argparse.Namespace) -> int:
    index, store = _open(args)
    try:
        removed = _wait(admin.purge(index, store, args.protocol, args.name))
    except ValueError as e:
        raise SystemExit(f"contentcache: {e}.") from None
    if args.json:
        print(json.dumps({"removed": removed}, indent=2))
    else:
        for key in removed:
            print(f"removed {args.protocol} {key}")
        print(f"{len(removed)} entries removed")
    return 0


def _token(args: argparse.Namespace) -> int:
    index, _ = _open(args)
    try:
        if args.action == "list":
            rows = _fired(index.tokens())
            if args.json:
                print(json.dumps([{"name": r.name, "created": r.created, "last_used": r.last_used} for r in rows],
                                 indent=2))
            else:
                for r in rows:
                    used = "never used" if r.last_used is None else f"last used {_when(r.last_used)}"
                    print(f"{r.name}  created {_when(r.created)}, {used}")
            return 0
        if args.name is None:
            raise SystemExit(f"contentcache: token {args.action} needs the token's NAME.")
        try:
            name = auth.check_name(args.name)
        except ValueError as e:
            raise SystemExit(f"contentcache: {e}.") from None
        if args.action == "create":
            token = auth.new_token()
            if not _fired(index.create_token(name, auth.digest(token))):
                raise SystemExit(f"contentcache: there is a token named {name!r} already "
                                 "(revoke it first, or choose another name).")
            print(token)
            print(f"token {name!r} created; this is the only time it is shown (the index keeps a digest of it)",
                  file=sys.stderr)
            return 0
        if not _fired(index.revoke_token(name)):
            raise SystemExit(f"contentcache: there is no token named {name!r}.")
        print(f"revoked token {name!r}; it stops working within 2 seconds everywhere")
        return 0
    finally:
        _fired(index.close())


def _fired(d: Deferred[T]) -> T:
    """
    What a Deferred of the synchronous admin command fired with.
    """
    results: list[Any] = []
    d.addBoth(results.append)
    assert results, "an admin operation did not complete synchronously"
    if isinstance(results[0], Failure):
        results[0].raiseException()
    return results[0]


def _warm(args: argparse.Namespace) -> int:
    from .warm import WarmError, warm

    token = None
    if args.token_file:
        try:
            with open(args.token_file, encoding="utf-8") as f:
                token = f.read().strip()
        except OSError as e:
            raise SystemExit(f"contentcache: cannot read {args.token_file}: {e.strerror}.") from None
    try:
        tally = warm(args.files, args.url, token, args.jobs)
    except WarmError as e:
        raise SystemExit(f"contentcache: {e}") from None
    return 1 if tally.failed or tally.mismatched else 0


def _when(seconds: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(seconds))


def _migrate_index(args: argparse.Namespace) -> int:
    source_path = args.source.removeprefix("sqlite:")
    if not args.source.startswith("sqlite:"):
        raise SystemExit("contentcache: --from takes sqlite:PATH (a state directory or its index.sqlite).")
    if os.path.isdir(source_path):
        source_path = os.path.join(source_path, INDEX_FILENAME)
    if not os.path.isfile(source_path):
        raise SystemExit(f"contentcache: there is no index at {source_path}.")
    try:
        check_address(args.target)
    except ValueError as e:
        raise SystemExit(f"contentcache: {e}.") from None
    progress = Progress("rows copied", every=100_000)
    try:
        source = SQLiteDatabase(source_path)
        target = PostgreSQLDatabase(args.target, 1)
        try:
            blobs, entries = admin.migrate_index(source, target, progress)
        finally:
            source.close()
            target.close()
    except (IndexTooNew, IndexUnavailable) as e:
        raise SystemExit(f"contentcache: {e}") from None
    except ValueError as e:
        raise SystemExit(f"contentcache: {e}.") from None
    finally:
        progress.close()
    print(f"copied {blobs} blobs and {entries} entries from {source_path} to {describe(args.target)}")
    return 0


def _serve(args: argparse.Namespace, rest: list[str]) -> int:
    # twistd is the one way the daemon runs; this saves typing "-n".
    twistd = os.path.join(os.path.dirname(sys.executable), "twistd")
    os.execv(twistd, [twistd, "--nodaemon", "--pidfile=", "contentcache", *rest])
    return 1  # not reached


def _duration(text: str) -> float:
    try:
        return parse_duration(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _min_free(text: str) -> MinFree:
    try:
        return MinFree.parse(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _size(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="contentcache",
        description="A pull-through cache for npm and Go modules, and its maintenance.",
    )
    parser.add_argument("--version", action="version", version=f"contentcache {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = commands.add_parser("serve", add_help=False,
                                help="run the daemon in the foreground (twistd -n contentcache)")
    serve.set_defaults(run=None)

    def command(name: str, help: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help, description=help)
        def env(option: str, default: str | None = None) -> str | None:
            return os.environ.get("CONTENTCACHE_" + option.upper().replace("-", "_"), default)

        sub.add_argument("--storage", default=env("storage", "./cache"),
                         help="the storage directory or s3://BUCKET/PREFIX, as the daemon's "
                              "(default: $CONTENTCACHE_STORAGE or ./cache)")
        sub.add_argument("--state-dir", default=env("state-dir"),
                         help="the directory of the index, as the daemon's (needed with s3://)")
        sub.add_argument("--s3-endpoint", default=env("s3-endpoint"),
                         help="the S3-compatible server's URL; credentials come from the AWS chain")
        sub.add_argument("--s3-region", default=env("s3-region"), help="the S3 region")
        sub.add_argument("--index", default=env("index"),
                         help="the shared index: postgresql://[user@]host[:port]/dbname (default: SQLite "
                              "in the state directory)")
        sub.add_argument("--json", action="store_true", help="print one JSON document")
        return sub

    stats = command("stats", "entries per protocol, blobs, logical bytes, bytes on disk, dedup ratio")
    stats.set_defaults(run=_stats)

    gc = command("gc", "run one expiry pass now and print what it removes")
    gc.add_argument("--ttl", type=_duration, default=DEFAULT_TTL,
                    help="remove entries not used for this long (default 30d; 0: never)")
    gc.add_argument("--max-size", type=_size, default=None,
                    help="evict least recently used entries until under 90%% of this (e.g. 20GiB)")
    gc.add_argument("--min-free", type=_min_free, default=MinFree(),
                    help="evict least recently used entries until this much of the filesystem is free "
                         "(a size, or a percentage like 5%%)")
    gc.add_argument("--grace", type=_duration, default=DEFAULT_GRACE,
                    help="never delete blobs younger than this (default 15m; 0 only when no daemon writes)")
    gc.add_argument("--dry-run", action="store_true", help="print what would go, change nothing")
    gc.set_defaults(run=_gc)

    verify = command("verify", "re-hash every blob; report corrupt, missing and orphan blobs")
    verify.add_argument("--repair", action="store_true",
                        help="delete corrupt and orphan blobs and the entries of corrupt and missing "
                             "ones, so the next request fetches them again")
    verify.set_defaults(run=_verify)

    purge = command("purge", "remove a Go module or an npm package, every version and its metadata")
    purge.add_argument("protocol", choices=["go", "npm"])
    purge.add_argument("name", help="a module path (example.com/m) or package name (@scope/name)")
    purge.set_defaults(run=_purge)

    token = command("token", "client tokens: create NAME (printed once), list, revoke NAME")
    token.add_argument("action", choices=["create", "list", "revoke"])
    token.add_argument("name", nargs="?", help="the token's name (create, revoke)")
    token.set_defaults(run=_token)

    warm = commands.add_parser(
        "warm", help="ask a running cache for everything lockfiles name, and check it against them",
        description="Ask a running cache for every packument, tarball, .info, .mod and .zip that "
                    "package-lock.json, npm-shrinkwrap.json, go.sum and go.mod files name, and check "
                    "tarballs against their integrity and modules against go.sum. Exits 1 on any "
                    "failure or mismatch.")
    warm.add_argument("files", nargs="+", metavar="FILE")
    warm.add_argument("--url", default=os.environ.get("CONTENTCACHE_URL", "http://localhost:8080"),
                      help="the cache's address (default http://localhost:8080)")
    warm.add_argument("--token-file", default=None, help="a file holding a client token, when the cache asks one")
    warm.add_argument("--jobs", type=int, default=8, help="requests at once (default 8)")
    warm.set_defaults(run=_warm)

    migrate = commands.add_parser(
        "migrate-index", help="copy a single node's SQLite index into an empty PostgreSQL database",
        description="Copy a single node's SQLite index into an empty PostgreSQL database, so that several "
                    "nodes share what one fetched (the blobs stay where they are: give every node the same "
                    "--storage). Refuses a target that holds anything.")
    migrate.add_argument("--from", dest="source", required=True, metavar="sqlite:PATH",
                         help="the index to copy: a state directory, or its index.sqlite")
    migrate.add_argument("--to", dest="target", required=True, metavar="postgresql://...",
                         help="the empty database (the password from PGPASSWORD, ~/.pgpass or a service file)")
    migrate.set_defaults(run=_migrate_index)

    args, rest = parser.parse_known_args(argv)
    if args.command == "serve":
        return _serve(args, rest)
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    return int(args.run(args))


if __name__ == "__main__":
    sys.exit(main())
