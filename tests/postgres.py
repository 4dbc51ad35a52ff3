"""
A real PostgreSQL server for tests: Debian's C{postgresql} package, its
cluster in a temporary directory of its own, listening on 127.0.0.1 and on
a socket in that directory, with password-less (trust) access for one
superuser. Usable without pytest, as L{start_postgresql}; the C{postgresql}
fixture runs one for a whole session and C{pg_dsn} gives each test an
empty database of its own on it.
"""

from __future__ import annotations

import os
import pwd
import re
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from contextlib import suppress
from typing import Any, Iterator, Literal

import psycopg
import pytest
from attrs import define, field
from psycopg import sql
from psycopg.abc import Params

#: Where Debian's postgresql-<major> packages put their programs, one
#: directory per major version.
DEBIAN_ROOT = "/usr/lib/postgresql"
#: The database superuser that C{initdb} creates; every connection logs in
#: as it.
SUPERUSER = "contentcache"
#: The operating-system account the server runs as when the tests run as
#: root (C{initdb} and C{pg_ctl} refuse root): Debian's own, else one made
#: for the purpose.
SERVER_ACCOUNTS = ("postgres", "contentcache-pg")
#: Several daemons, each with a connection pool, share one server.
MAX_CONNECTIONS = 200
#: Test data is small; the default (128 MB) would be multiplied by every
#: server a developer runs at once.
SHARED_BUFFERS = "32MB"
STARTUP_TIMEOUT = 60
STOP_TIMEOUT = 60
CONNECT_TIMEOUT = 10
LOG_TAIL_LINES = 40


def find_bindir() -> str:
    """
    The C{bin} directory of the highest PostgreSQL major version installed
    under L{DEBIAN_ROOT}. Not C{PATH}: Debian's wrappers there pick a
    cluster from /etc/postgresql, which these tests do not use.
    """
    majors = []
    with suppress(FileNotFoundError):
        for name in os.listdir(DEBIAN_ROOT):
            if re.fullmatch(r"\d+(\.\d+)?", name) and os.access(
                os.path.join(DEBIAN_ROOT, name, "bin", "initdb"), os.X_OK
            ):
                majors.append(name)
    if not majors:
        raise RuntimeError(
            f"PostgreSQL is not installed (no {DEBIAN_ROOT}/<major>/bin/initdb):"
            " run 'sh scripts/bootstrap --test', which installs Debian's postgresql package."
        )
    highest = max(majors, key=lambda name: tuple(int(part) for part in name.split(".")))
    return os.path.join(DEBIAN_ROOT, highest, "bin")


def server_account() -> pwd.struct_passwd | None:
    """
    The account to run the server as: None (this process's own) unless
    this process is root, then the first of L{SERVER_ACCOUNTS} that
    exists, creating the last one if none does.
    """
    if os.geteuid() != 0:
        return None
    for name in SERVER_ACCOUNTS:
        with suppress(KeyError):
            return pwd.getpwnam(name)
    name = SERVER_ACCOUNTS[-1]
    subprocess.run(
        ["useradd", "--system", "--no-create-home", "--user-group", "--shell", "/usr/sbin/nologin", name],
        check=True,
        capture_output=True,
    )
    return pwd.getpwnam(name)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _tail(path: str) -> str:
    try:
        with open(path, "rb") as f:
            lines = f.read().decode(errors="replace").splitlines()
    except FileNotFoundError:
        return "(no log)"
    return "\n".join(lines[-LOG_TAIL_LINES:])


@define
class PostgreSQL:
    """
    A PostgreSQL cluster in L{directory}: its data in C{data/}, its log in
    C{postgresql.log}, its socket beside them. L{start} and L{stop} may
    alternate any number of times on the same data and port; L{close} stops
    it for good and removes the directory.
    """

    directory: str
    bindir: str
    port: int
    #: The account the server's processes run as; None for this process's.
    account: pwd.struct_passwd | None = field(repr=False)
    user: str = SUPERUSER

    @classmethod
    def initialize(cls) -> PostgreSQL:
        """
        Create a new cluster (C{initdb}) in a new temporary directory,
        not started. Not under pytest's C{tmp_path}: when the tests run as
        root, that is inside a directory only root may enter, and the
        server runs as another account.
        """
        bindir = find_bindir()
        account = server_account()
        directory = tempfile.mkdtemp(prefix="contentcache-pg-")
        server = cls(directory=directory, bindir=bindir, port=_free_port(), account=account)
        try:
            if account is not None:
                os.chown(directory, account.pw_uid, account.pw_gid)
            result = server._run(
                "initdb",
                "-D",
                server.data,
                "-U",
                server.user,
                "--auth=trust",
                "--encoding=UTF8",
                "--locale=C",
                # Its data is thrown away with the directory.
                "--no-sync",
                timeout=STARTUP_TIMEOUT,
            )
            if result.returncode != 0:
                raise RuntimeError(f"initdb failed in {directory}:\n{result.stdout}")
        except BaseException:
            shutil.rmtree(directory, ignore_errors=True)
            raise
        return server

    @property
    def data(self) -> str:
        return os.path.join(self.directory, "data")

    @property
    def log(self) -> str:
        """
        The file the server writes its log to, kept across restarts.
        """
        return os.path.join(self.directory, "postgresql.log")

    @property
    def name(self) -> str:
        """
        The server's C{cluster_name}, which every one of its processes
        shows in its title, so C{pgrep -f NAME} finds them all.
        """
        return os.path.basename(self.directory)

    @property
    def running(self) -> bool:
        return self._postmaster() is not None

    def dsn(self, dbname: str = "postgres") -> str:
        return f"postgresql://{self.user}@127.0.0.1:{self.port}/{dbname}"

    def start(self) -> None:
        """
        Start the server and return once it accepts connections; nothing
        if it is running already.
        """
        if self.running:
            return
        # What a killed server leaves behind would stop this one starting.
        self._clear()
        options = [
            "-h",
            "127.0.0.1",
            "-p",
            str(self.port),
            "-k",
            self.directory,
            "-c",
            f"cluster_name={self.name}",
            "-c",
            f"max_connections={MAX_CONNECTIONS}",
            "-c",
            f"shared_buffers={SHARED_BUFFERS}",
            # Committed data still reaches the kernel before the commit
            # returns, so it survives the server's crash (what tests
            # simulate), not the machine's (what they do not).
            "-c",
            "fsync=off",
        ]
        result = self._run(
            "pg_ctl",
            "start",
            "-D",
            self.data,
            "-l",
            self.log,
            "-w",
            "-t",
            str(STARTUP_TIMEOUT),
            # pg_ctl hands these to the server through /bin/sh.
            "-o",
            shlex.join(options),
            timeout=STARTUP_TIMEOUT + 10,
        )
        if result.returncode != 0:
            # It may have started after pg_ctl stopped waiting.
            self.stop(mode="immediate")
            raise RuntimeError(
                f"PostgreSQL did not start on port {self.port}:\n{result.stdout}\n"
                f"{self.log} ends:\n{_tail(self.log)}"
            )

    def stop(self, mode: Literal["smart", "fast", "immediate"] = "fast") -> None:
        """
        Stop the server, keeping its data; nothing if it is not running.
        C{mode} is C{pg_ctl}'s: C{fast} (roll back open transactions, end
        sessions, checkpoint) or C{immediate} (exit at once, as in a crash;
        the next start recovers from the WAL). Whatever C{pg_ctl} says, no
        process of the server is left on return.
        """
        if self._postmaster() is not None:
            # Whatever is left when pg_ctl gives up is killed below.
            with suppress(subprocess.TimeoutExpired):
                self._run(
                    "pg_ctl",
                    "stop",
                    "-D",
                    self.data,
                    "-m",
                    mode,
                    "-w",
                    "-t",
                    str(STOP_TIMEOUT),
                    timeout=STOP_TIMEOUT + 10,
                )
        self._clear()

    def close(self) -> None:
        """
        Stop the server and remove its directory, data and log with it.
        Closing again does nothing.
        """
        if os.path.isdir(self.directory):
            self.stop()
            shutil.rmtree(self.directory)

    def execute(
        self, query: str | sql.SQL | sql.Composed, dbname: str = "postgres", params: Params | None = None
    ) -> list[Any]:
        """
        Run one statement as the superuser, outside any transaction (so
        C{CREATE DATABASE} and C{VACUUM} work), and return the rows it
        returns, if any.
        """
        with psycopg.connect(self.dsn(dbname), autocommit=True, connect_timeout=CONNECT_TIMEOUT) as conn:
            cursor = conn.execute(query, params)
            return cursor.fetchall() if cursor.description is not None else []

    def create_database(self, name: str) -> str:
        """
        Create an empty database C{name} and return its DSN.
        """
        self.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        return self.dsn(name)

    def drop_database(self, name: str) -> None:
        """
        Drop database C{name} if it exists, ending the sessions still
        connected to it.
        """
        self.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))

    def _postmaster(self) -> int | None:
        """
        The process id of this server's postmaster if it is running.
        """
        try:
            with open(os.path.join(self.data, "postmaster.pid")) as f:
                pid = int(f.readline())
        except (FileNotFoundError, ValueError):
            return None
        return pid if self._works_here(pid) else None

    def _processes(self) -> list[int]:
        """
        The process ids of every live process of this server.
        """
        return [int(pid) for pid in os.listdir("/proc") if pid.isdigit() and self._works_here(int(pid))]

    def _works_here(self, pid: int) -> bool:
        """
        Whether C{pid} is a live process of this server: the postmaster and
        its children work in the data directory. A stale pid file's process
        id may belong to anything by now; a zombie has no directory.
        """
        try:
            return os.path.samefile(f"/proc/{pid}/cwd", self.data)
        except OSError:
            return False

    def _clear(self) -> None:
        """
        Kill whatever is left of a server that did not stop (or was
        killed), and remove the lock files it leaves. The server checks
        them itself, but takes a zombie for a live process, and init may
        be slow to reap one.
        """
        deadline = time.monotonic() + STOP_TIMEOUT
        while leftover := self._processes():
            if time.monotonic() > deadline:
                raise RuntimeError(f"PostgreSQL processes {leftover} outlived SIGKILL for {STOP_TIMEOUT} s")
            for pid in leftover:
                with suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.05)
        for path in (
            os.path.join(self.data, "postmaster.pid"),
            os.path.join(self.directory, f".s.PGSQL.{self.port}"),
            os.path.join(self.directory, f".s.PGSQL.{self.port}.lock"),
        ):
            with suppress(FileNotFoundError):
                os.unlink(path)

    def _run(self, program: str, *args: str, timeout: float) -> subprocess.CompletedProcess[str]:
        """
        Run one of the server's programs as L{account}, its output
        (stdout and stderr) in the result.
        """
        env = {key: value for key, value in os.environ.items() if not key.startswith("PG")}
        env.update(HOME=self.directory, LC_ALL="C")
        account = self.account
        return subprocess.run(
            [os.path.join(self.bindir, program), *args],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            errors="replace",
            env=env,
            cwd=self.directory,
            timeout=timeout,
            user=None if account is None else account.pw_uid,
            group=None if account is None else account.pw_gid,
            extra_groups=None if account is None else [],
        )


def start_postgresql() -> PostgreSQL:
    """
    A new cluster in a new temporary directory, started.
    """
    server = PostgreSQL.initialize()
    try:
        server.start()
    except BaseException:
        server.close()
        raise
    return server


def unique_database_name() -> str:
    return "test_" + secrets.token_hex(6)


def fresh_database(postgresql: PostgreSQL) -> str:
    """
    Create an empty database with a name of its own on C{postgresql} and
    return its DSN.
    """
    return postgresql.create_database(unique_database_name())


@pytest.fixture(scope="session")
def postgresql() -> Iterator[PostgreSQL]:
    """
    One PostgreSQL for the whole session: tests keep to databases of their
    own (L{pg_dsn}). A test that stops it starts it again before it ends
    (and if it fails first, the next C{pg_dsn} does).
    """
    server = start_postgresql()
    yield server
    server.close()


@pytest.fixture
def pg_dsn(postgresql: PostgreSQL) -> Iterator[str]:
    """
    The DSN of an empty database for this test alone, dropped after it.
    """
    # A test that stopped the server and failed before starting it again
    # would otherwise take every later test down with it.
    postgresql.start()
    name = unique_database_name()
    yield postgresql.create_database(name)
    if postgresql.running:
        postgresql.drop_database(name)
