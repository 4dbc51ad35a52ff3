"""
The daemon as users run it: C{twistd -n contentcache} in a subprocess.
"""

from __future__ import annotations

import http.client
import json
import os
import sqlite3
import subprocess
import sys
import time
from typing import Iterator

import pytest

from contentcache.index import INDEX_FILENAME, SCHEMA_VERSION

from .daemon import TWISTD, Daemon


@pytest.fixture
def daemon(tmp_path: object) -> Iterator[Daemon]:
    d = Daemon(os.path.join(str(tmp_path), "storage"))
    yield d
    d.stop()


def get(port: int, path: str) -> tuple[int, dict[str, str], bytes]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        # skip_host and a raw path: nothing between us and the daemon
        # normalises the hostile paths.
        connection.putrequest("GET", path, skip_host=True)
        connection.putheader("Host", "127.0.0.1")
        connection.endheaders()
        response = connection.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        connection.close()


def test_health_then_sigterm_exits_zero(daemon: Daemon) -> None:
    status, headers, body = get(daemon.port, "/health")
    assert status == 200
    assert headers["Content-Type"] == "application/json"
    assert json.loads(body)["status"] == "ok"
    started = time.monotonic()
    assert daemon.terminate(timeout=5) == 0
    assert time.monotonic() - started < 5


@pytest.mark.parametrize(
    "path",
    [
        "/../../etc/passwd",
        "/%2e%2e/%2e%2e/etc/passwd",
        "/..%2f..%2f..%2fetc%2fpasswd",
        "/health/../../../etc/passwd",
        "//etc/passwd",
        "/%00/etc/passwd",
        "/" + "x" * 10_000,
    ],
)
def test_hostile_paths_are_404(daemon: Daemon, path: str) -> None:
    status, headers, body = get(daemon.port, path)
    assert status == 404
    assert headers["Content-Type"] == "text/plain; charset=utf-8"
    assert b"root:" not in body
    assert get(daemon.port, "/health")[0] == 200


def test_storage_from_environment(tmp_path: object) -> None:
    storage = os.path.join(str(tmp_path), "env-storage")
    d = Daemon(None, env={"CONTENTCACHE_STORAGE": storage}, cwd=str(tmp_path))
    try:
        assert get(d.port, "/health")[0] == 200
        assert os.path.exists(os.path.join(storage, INDEX_FILENAME))
        assert not os.path.exists(os.path.join(str(tmp_path), "cache"))
        assert d.terminate() == 0
    finally:
        d.stop()


def test_flag_wins_over_environment(tmp_path: object) -> None:
    # The environment's port is unusable; the flag's is not.
    d = Daemon(
        os.path.join(str(tmp_path), "storage"),
        env={"CONTENTCACHE_PORT": "tcp:99999", "CONTENTCACHE_DISK_THREADS": "2"},
    )
    try:
        assert get(d.port, "/health")[0] == 200
    finally:
        d.stop()


def test_bad_environment_value_is_one_sentence(tmp_path: object) -> None:
    process = subprocess.run(
        [TWISTD, "-n", "--pidfile=", "contentcache"],
        env={**os.environ, "CONTENTCACHE_DISK_THREADS": "lots"},
        capture_output=True,
        timeout=60,
        cwd=str(tmp_path),
    )
    assert process.returncode != 0
    last = (process.stdout + process.stderr).decode().strip().splitlines()[-1]
    assert last.endswith("--disk-threads must be a whole number from 1 to 256, not 'lots'.")


def test_bad_option_is_one_sentence_and_nonzero(tmp_path: object) -> None:
    process = subprocess.run(
        [TWISTD, "-n", "--pidfile=", "contentcache", "--disk-threads", "none"],
        capture_output=True,
        timeout=60,
        cwd=str(tmp_path),
    )
    assert process.returncode != 0
    last = (process.stdout + process.stderr).decode().strip().splitlines()[-1]
    assert last.endswith("--disk-threads must be a whole number from 1 to 256, not 'none'.")


def test_newer_index_is_refused_with_one_sentence(tmp_path: object) -> None:
    storage = os.path.join(str(tmp_path), "storage")
    os.makedirs(storage)
    db = sqlite3.connect(os.path.join(storage, INDEX_FILENAME))
    db.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    db.close()
    process = subprocess.run(
        [TWISTD, "-n", "--pidfile=", "contentcache", "--port", "tcp:0", "--storage", storage],
        capture_output=True,
        timeout=60,
    )
    assert process.returncode != 0
    output = (process.stdout + process.stderr).decode()
    assert "newer than" in output and "upgrade contentcache" in output
    assert "Traceback" not in output


def test_plugin_is_listed_from_any_directory(tmp_path: object) -> None:
    process = subprocess.run(
        [TWISTD, "--help"], capture_output=True, timeout=60, cwd=str(tmp_path), check=True
    )
    assert b"contentcache" in process.stdout


def test_plugin_is_found_after_a_regular_install(tmp_path: object) -> None:
    # The suite itself runs from an editable install (see above); this is
    # the other way users install: a built wheel's files in site-packages.
    repository = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    target = os.path.join(str(tmp_path), "site")
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", target, repository],
        check=True,
        capture_output=True,
        timeout=300,
    )
    assert os.path.exists(os.path.join(target, "twisted", "plugins", "contentcache_plugin.py"))
    assert not os.path.exists(os.path.join(target, "twisted", "plugins", "__init__.py"))
    env = {**os.environ, "PYTHONPATH": target}
    where = subprocess.run(
        [sys.executable, "-c", "import contentcache; print(contentcache.__file__)"],
        env=env, cwd=str(tmp_path), capture_output=True, text=True, check=True,
    )
    assert where.stdout.startswith(target)
    listed = subprocess.run(
        [TWISTD, "--help"], env=env, cwd=str(tmp_path), capture_output=True, check=True, timeout=60
    )
    assert b"contentcache" in listed.stdout
    # The whole daemon imports from the installed files, every subpackage.
    installed = subprocess.run(
        [TWISTD, "contentcache", "--help"], env=env, cwd=str(tmp_path), capture_output=True, timeout=60
    )
    assert installed.returncode == 0, installed.stdout + installed.stderr
    assert b"--go-upstream" in installed.stdout
    packages = {os.path.relpath(d, target) for d, _, files in os.walk(os.path.join(target, "contentcache"))
                if "__init__.py" in files}
    assert {"contentcache", "contentcache/backend", "contentcache/protocol",
            "contentcache/protocol/goproxy", "contentcache/protocol/npm"} <= packages
