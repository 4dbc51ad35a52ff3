"""
Run the real daemon as users do, C{twistd -n contentcache ...}, for tests.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from typing import Any, Callable, Sequence

from attrs import define

from contentcache.tap import default_workers

TWISTD = os.path.join(os.path.dirname(sys.executable), "twistd")
_LISTENING = re.compile(rb"Site starting on (\d+)")
# With workers, the supervisor's line once every one of them accepts.
_WORKERS_LISTENING = re.compile(rb"\d+ workers serving on port (\d+)")


def _quiet(extra: Sequence[str]) -> bool:
    """
    Whether the daemon logs no info lines (so none says it serves).
    """
    return any(a == "--log-level" and b in ("warn", "error", "critical") for a, b in zip(extra, extra[1:]))


def worker_count(extra: Sequence[str], env: dict[str, str]) -> int:
    """
    How many workers the daemon started with C{extra} and C{env} runs.
    """
    for i, arg in enumerate(extra):
        if arg == "--workers" and i + 1 < len(extra):
            return int(extra[i + 1])
        if arg.startswith("--workers="):
            return int(arg.split("=", 1)[1])
    if "CONTENTCACHE_WORKERS" in env:
        return int(env["CONTENTCACHE_WORKERS"])
    return default_workers()


class Daemon:
    """
    The daemon in a subprocess, its output collected by a thread (so a
    busy test never fills the pipe and stalls it).
    """

    def __init__(
        self,
        storage: str | None,
        extra: Sequence[str] = (),
        env: dict[str, str] | None = None,
        cwd: str | None = None,
        port: int | None = None,
    ) -> None:
        self._output = bytearray()
        self._lock = threading.Lock()
        self.process = subprocess.Popen(
            [
                TWISTD,
                "-n",
                "--pidfile=",
                "contentcache",
                "--port",
                f"tcp:{port or 0}:interface=127.0.0.1",
                *(["--storage", storage] if storage is not None else []),
                *extra,
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            # Never the machine's own Go settings: they name public servers.
            env={**os.environ, "GOPROXY": "off", "GOSUMDB": "off", **(env or {})},
            cwd=cwd,
        )
        self._reader = threading.Thread(target=self._collect, daemon=True)
        self._reader.start()
        try:
            if worker_count(extra, {**os.environ, **(env or {})}) > 1 and not (port and _quiet(extra)):
                # The supervisor holds the port from the start: a connection
                # is accepted there before any worker serves it.
                self.port = int(self.wait_for(_WORKERS_LISTENING)[1])
            else:
                self.port = port if port else int(self.wait_for(_LISTENING)[1])
                if port:
                    self._wait_for_connection(port)
        except BaseException:
            self.stop()
            raise
        self.url = f"http://127.0.0.1:{self.port}"

    def _wait_for_connection(self, port: int, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.process.poll() is None:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                return
            except OSError:
                time.sleep(0.05)
        raise AssertionError(f"daemon never listened on {port}; output:\n{self.output.decode(errors='replace')}")

    def _collect(self) -> None:
        assert self.process.stdout is not None
        while chunk := os.read(self.process.stdout.fileno(), 65536):
            with self._lock:
                self._output += chunk

    @property
    def output(self) -> bytes:
        with self._lock:
            return bytes(self._output)

    def log(self) -> str:
        """
        Everything the daemon has written so far.
        """
        time.sleep(0.5)  # let the last lines arrive (workers write theirs 4 times a second)
        return self.output.decode(errors="replace")

    def wait_for(self, pattern: re.Pattern[bytes], timeout: float = 30) -> re.Match[bytes]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            m = pattern.search(self.output)
            if m:
                return m
            if self.process.poll() is not None:
                self._reader.join(5)
                m = pattern.search(self.output)
                if m:
                    return m
                break
            time.sleep(0.02)
        raise AssertionError(
            f"daemon never logged {pattern.pattern!r}; output:\n{self.output.decode(errors='replace')}"
        )

    def terminate(self, timeout: float = 5) -> int:
        """
        SIGTERM, then the exit status (fails if it takes longer than C{timeout}).
        """
        self.process.send_signal(signal.SIGTERM)
        try:
            code = self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.stop()
            raise AssertionError(f"daemon still running {timeout} s after SIGTERM") from None
        self._reader.join(5)
        return code

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self._reader.join(5)
        if self.process.stdout is not None:
            self.process.stdout.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def concurrent_gets(get: Callable[[], tuple[int, bytes]], count: int) -> list[tuple[int, bytes]]:
    """
    C{count} calls of C{get} at once, each on its own thread: their
    (status, body) results.
    """
    results: list[tuple[int, bytes]] = []
    lock = threading.Lock()

    def one() -> None:
        result = get()
        with lock:
            results.append(result)

    threads = [threading.Thread(target=one) for _ in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return results


@define
class Backing:
    """
    Where a test daemon keeps its blobs: a directory, or a prefix of its own
    in the session's S3 bucket (with the index in a local state directory).
    """

    kind: str
    #: The local directory that holds the index.
    state_dir: str
    #: The daemon's (and the admin command's) storage options.
    args: list[str]
    #: The environment it needs (S3 credentials).
    env: dict[str, str]
    _s3: Any = None
    _prefix: str = ""

    @classmethod
    def directory(cls, path: str) -> Backing:
        return cls("filesystem", path, ["--storage", path], {})

    @classmethod
    def bucket(cls, s3: Any, prefix: str, state_dir: str) -> Backing:
        args = ["--storage", f"s3://{s3.bucket}/{prefix}", "--state-dir", state_dir, "--s3-endpoint", s3.endpoint]
        return cls("s3", state_dir, args, s3.env(), s3, prefix + "/")

    def blob_names(self) -> set[str]:
        """
        The names of the blob objects stored (the hash, and C{.zst} for a
        compressed one).
        """
        if self._s3 is None:
            root = os.path.join(self.state_dir, "blobs")
            return {name for _, _, names in os.walk(root) for name in names}
        return {key.rsplit("/", 1)[1] for key in self._s3.list_keys(self._s3.bucket, self._prefix + "blobs/")}

    def _path(self, key: str) -> str:
        return os.path.join(self.state_dir, *key.split("/"))

    def read(self, key: str) -> bytes:
        """
        The stored object C{key} (a blob's, say), as the backend holds it.
        """
        if self._s3 is None:
            with open(self._path(key), "rb") as f:
                return f.read()
        body = self._s3.client().get_object(Bucket=self._s3.bucket, Key=self._prefix + key)["Body"]
        with body:
            data: bytes = body.read()
        return data

    def write(self, key: str, data: bytes) -> None:
        if self._s3 is None:
            with open(self._path(key), "wb") as f:
                f.write(data)
        else:
            self._s3.client().put_object(Bucket=self._s3.bucket, Key=self._prefix + key, Body=data)

    def remove(self, key: str) -> None:
        if self._s3 is None:
            os.unlink(self._path(key))
        else:
            self._s3.client().delete_object(Bucket=self._s3.bucket, Key=self._prefix + key)

    def stored(self) -> dict[str, tuple[str, str, int, int]]:
        """
        Each entry's key with its blob's hash, encoding, size and bytes stored,
        as the index records them.
        """
        db = sqlite3.connect(f"file:{os.path.join(self.state_dir, 'index.sqlite')}?mode=ro", uri=True)
        try:
            rows = db.execute(
                "SELECT e.key, b.hash, b.encoding, b.size, b.stored FROM entries AS e JOIN blobs AS b ON b.hash = e.hash"
            ).fetchall()
        finally:
            db.close()
        return {key: (h, encoding, size, stored) for key, h, encoding, size, stored in rows}
