"""
The `contentcache` admin command on a storage directory: stats, gc,
verify (and repair), purge; and an end-to-end run against a live daemon.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any, Iterator

import pytest
from twisted.internet.task import Clock

from contentcache import admin as admin_module
from contentcache.backend.filesystem import FilesystemBackend
from contentcache.compress import Compression
from contentcache.hash import Hash
from contentcache.index import SQLiteIndex
from contentcache.store import Blob, Store, blob_key

from .conftest import resolve
from .daemon import Backing, Daemon
from .gomodules import GREET, HELLO, build_tree, modules
from .npmpackages import LEAF, PACKAGES, RegistryFixture, pack
from .test_goproxy import request
from .upstream import UpstreamFixture

COMMAND = os.path.join(os.path.dirname(sys.executable), "contentcache")


def admin(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([COMMAND, *args], capture_output=True, text=True, timeout=120,
                          env={**os.environ, **(env or {})})


@pytest.fixture
def filled(index: SQLiteIndex, store: Store, storage: str, clock: Clock) -> dict[str, Hash]:
    clock.advance(1_000_000)
    hashes = {}
    for protocol, key, content in [
        ("go", "example.com/m/@v/v1.0.0.zip", b"zip" * 1000),
        ("go", "example.com/m/@v/v1.0.0.mod", b"module example.com/m\n"),
        ("go", "example.com/other/@v/v1.0.0.mod", b"module example.com/m\n"),  # same bytes
        ("npm", "tarball:left-pad/left-pad-1.0.0.tgz", b"tgz" * 500),
        ("npm", "packument:full:left-pad", b'{"name":"left-pad"}'),
    ]:
        h = resolve(store.put([content])).hash
        resolve(index.put(protocol, key, Blob(h, len(content)), {}))
        hashes[key] = h
    resolve(index.close())  # the command opens it on its own
    return hashes


def test_stats(filled: dict[str, Hash], storage: str) -> None:
    result = admin("stats", "--storage", storage, "--json")
    assert result.returncode == 0, result.stderr
    found = json.loads(result.stdout)
    assert found["entries"] == {"go": 3, "npm": 2}
    assert found["blobs"] == 4
    logical = 3000 + 21 + 21 + 1500 + 19
    assert found["logical_bytes"] == logical and found["unique_bytes"] == logical - 21
    assert found["stored_bytes"] == logical - 21, "this store does not compress"
    assert found["dedup_ratio"] == round(logical / (logical - 21), 3)
    assert found["compression_ratio"] == 1.0 and found["compressed_blobs"] == 0
    text = admin("stats", "--storage", storage).stdout
    assert "entries (go): 3" in text and "dedup ratio" in text and "compression ratio: 1.0" in text


def test_verify_finds_and_repairs_corrupt_and_missing_blobs(filled: dict[str, Hash], storage: str) -> None:
    assert admin("verify", "--storage", storage).returncode == 0
    corrupt = filled["example.com/m/@v/v1.0.0.zip"]
    path = os.path.join(storage, blob_key(corrupt))
    data = bytearray(open(path, "rb").read())
    data[100] ^= 0x01  # one flipped bit
    open(path, "wb").write(bytes(data))
    missing = filled["tarball:left-pad/left-pad-1.0.0.tgz"]
    os.unlink(os.path.join(storage, blob_key(missing)))

    result = admin("verify", "--storage", storage, "--json")
    assert result.returncode == 1
    found = json.loads(result.stdout)
    assert found["corrupt"] == [corrupt.hex] and found["missing"] == [missing.hex]
    assert found["problems"] == 2

    result = admin("verify", "--storage", storage, "--repair")
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"corrupt blob {corrupt.hex} (repaired)" in result.stdout
    assert not os.path.exists(path)
    again = json.loads(admin("verify", "--storage", storage, "--json").stdout)
    assert again["problems"] == 0 and again["blobs"] == 2
    entries = json.loads(admin("stats", "--storage", storage, "--json").stdout)["entries"]
    assert entries == {"go": 2, "npm": 1}  # the damaged entries are gone: refetched on next request


def test_gc_dry_run_then_for_real(filled: dict[str, Hash], storage: str) -> None:
    result = admin("gc", "--storage", storage, "--ttl", "0", "--max-size", "2KB", "--grace", "0", "--dry-run")
    assert result.returncode == 0, result.stderr
    assert "would remove go example.com/m/@v/v1.0.0.zip" in result.stdout
    assert json.loads(admin("stats", "--storage", storage, "--json").stdout)["blobs"] == 4
    result = admin("gc", "--storage", storage, "--ttl", "0", "--max-size", "2KB", "--grace", "0", "--json")
    report = json.loads(result.stdout)
    assert report["stored_bytes_after"] <= 1800 and report["evicted_entries"] >= 1
    assert json.loads(admin("verify", "--storage", storage, "--json").stdout)["problems"] == 0


def test_gc_min_free(filled: dict[str, Hash], storage: str) -> None:
    # Nothing this store holds frees 99.9% of the filesystem: all of it goes.
    result = admin("gc", "--storage", storage, "--ttl", "0", "--min-free", "99.9%", "--grace", "0", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["evicted_entries"] == 5 and report["deleted_blobs"] == 4
    assert report["free_bytes_before"] > 0 and report["free_bytes_after"] > 0
    bad = admin("gc", "--storage", storage, "--min-free", "lots")
    assert bad.returncode != 0 and "percentage like 5%" in bad.stderr


def test_purge(filled: dict[str, Hash], storage: str) -> None:
    result = admin("purge", "--storage", storage, "go", "example.com/m")
    assert result.returncode == 0, result.stderr
    assert "removed go example.com/m/@v/v1.0.0.zip" in result.stdout
    assert not os.path.exists(os.path.join(storage, blob_key(filled["example.com/m/@v/v1.0.0.zip"])))
    # The go.mod bytes are shared with another module: they stay.
    assert os.path.exists(os.path.join(storage, blob_key(filled["example.com/m/@v/v1.0.0.mod"])))
    result = admin("purge", "--storage", storage, "npm", "left-pad", "--json")
    assert sorted(json.loads(result.stdout)["removed"]) == [
        "packument:full:left-pad", "tarball:left-pad/left-pad-1.0.0.tgz"
    ]
    assert json.loads(admin("stats", "--storage", storage, "--json").stdout)["entries"] == {"go": 1}
    assert admin("verify", "--storage", storage).returncode == 0
    bad = admin("purge", "--storage", storage, "npm", "../etc")
    assert bad.returncode != 0 and "invalid" in bad.stderr


def test_verify_removes_a_damaged_copy_and_keeps_the_good_one(
    index: SQLiteIndex, storage: str, disk: Any
) -> None:
    # Two workers stored the same packument at once, one compressing.
    data = json.dumps({"versions": {str(i): {"name": "p", "i": i} for i in range(500)}}).encode()
    plain = Store(FilesystemBackend(storage, disk), os.path.join(storage, "tmp"), disk)
    squeezed = Store(plain.backend, plain.staging, disk, Compression(3))
    resolve(squeezed.start())
    h = Hash.of(data)
    compressed = resolve(squeezed.put([data])).blob
    assert compressed.encoding == "zstd"
    resolve(plain.backend.write(blob_key(h), [data]))
    resolve(index.put("npm", "packument:full:p", compressed, {}))
    path = os.path.join(storage, blob_key(h, "zstd"))
    damaged = bytearray(open(path, "rb").read())
    damaged[len(damaged) // 2] ^= 0x01
    open(path, "wb").write(bytes(damaged))

    found = resolve(admin_module.verify(index, plain, repair=False))
    assert found.blobs == 1 and found.corrupt == [h.hex] and found.missing == []
    repaired = resolve(admin_module.verify(index, plain, repair=True))
    assert repaired.corrupt == [h.hex]
    assert not os.path.exists(path) and os.path.exists(os.path.join(storage, blob_key(h)))
    entry = resolve(index.get("npm", "packument:full:p"))
    assert entry is not None and entry.encoding == "identity", "a good copy is left, and recorded"
    assert resolve(admin_module.verify(index, plain, repair=False)).problems == 0


def test_missing_storage_is_one_sentence(tmp_path: Any) -> None:
    result = admin("stats", "--storage", str(tmp_path / "nothing"))
    assert result.returncode != 0
    assert "is not a storage directory" in result.stderr


@pytest.fixture
def live(tmp_path: Any, tmp_path_factory: pytest.TempPathFactory, backing: Backing) -> Iterator[dict[str, Any]]:
    """
    A daemon with go and npm upstreams, on each backend, and the admin
    command with the same storage options.
    """
    go_upstream = UpstreamFixture(build_tree(str(tmp_path / "proxy"), modules()))
    work = str(tmp_path_factory.mktemp("packages"))
    npm_upstream = RegistryFixture(str(tmp_path / "registry"), [(p, pack(p, work)) for p in PACKAGES])
    daemon = Daemon(None, [*backing.args, "--go-upstream", go_upstream.url, "--go-sumdb", "off",
                           "--npm-upstream", npm_upstream.url], env=backing.env)

    def command(*args: str) -> subprocess.CompletedProcess[str]:
        return admin(*args, *backing.args, env=backing.env)

    yield {"daemon": daemon, "go": go_upstream, "npm": npm_upstream, "backing": backing, "admin": command}
    daemon.stop()
    go_upstream.stop()
    npm_upstream.stop()


def test_gc_on_a_live_daemon_then_refetch(live: dict[str, Any]) -> None:
    daemon, command = live["daemon"], live["admin"]
    go_paths = [f"/goproxy/{GREET}/@v/v1.0.0.zip", f"/goproxy/{GREET}/@v/v1.0.0.mod",
                f"/goproxy/{HELLO}/@v/v1.1.0.zip", f"/goproxy/{GREET}/@v/list"]
    npm_paths = [f"/npm/{LEAF}", f"/npm/{LEAF}/-/{LEAF}-1.0.0.tgz", f"/npm/{LEAF}/-/{LEAF}-1.1.0.tgz"]
    for path in go_paths + npm_paths:
        assert request(daemon.url, path)[0] == 200, path
    before = json.loads(command("stats", "--json").stdout)
    assert before["entries"]["go"] == 4 and before["entries"]["npm"] >= 4
    limit = before["stored_bytes"] // 2

    result = command("gc", "--ttl", "0", "--max-size", str(limit), "--grace", "0")
    assert result.returncode == 0, result.stderr
    after = json.loads(command("stats", "--json").stdout)
    assert after["stored_bytes"] <= limit
    assert json.loads(command("verify", "--json").stdout)["problems"] == 0

    # The least recently used went first: the first go zip fetched.
    assert f"removed go {GREET}/@v/v1.0.0.zip" in result.stdout
    upstream_path = f"/{GREET}/@v/v1.0.0.zip"
    assert live["go"].count(upstream_path) == 1
    status, headers, body = request(daemon.url, go_paths[0])
    assert status == 200 and headers["x-cache"] == "MISS" and body[:2] == b"PK"
    assert live["go"].count(upstream_path) == 2


def test_verify_repair_on_a_live_daemon_then_refetch(live: dict[str, Any]) -> None:
    daemon, go, backing, command = live["daemon"], live["go"], live["backing"], live["admin"]
    corrupt_path, deleted_path = f"/{GREET}/@v/v1.0.0.zip", f"/{HELLO}/@v/v1.1.0.zip"
    bodies = {}
    for path in (corrupt_path, deleted_path):
        status, _, bodies[path] = request(daemon.url, "/goproxy" + path)
        assert status == 200
    corrupt = Hash.of(bodies[corrupt_path])
    deleted = Hash.of(bodies[deleted_path])
    data = bytearray(backing.read(blob_key(corrupt)))
    data[len(data) // 2] ^= 0x80
    backing.write(blob_key(corrupt), bytes(data))
    backing.remove(blob_key(deleted))

    found = json.loads(command("verify", "--json").stdout)
    assert found["corrupt"] == [corrupt.hex] and found["missing"] == [deleted.hex]
    assert command("verify", "--repair").returncode == 0
    assert json.loads(command("verify", "--json").stdout)["problems"] == 0

    for path in (corrupt_path, deleted_path):
        status, headers, body = request(daemon.url, "/goproxy" + path)
        assert status == 200 and headers["x-cache"] == "MISS" and body == bodies[path]
        assert go.count(path) == 2


def test_migrate_index_copies_a_node_into_postgresql(
    filled: dict[str, Hash], storage: str, pg_dsn: str, clock: Clock
) -> None:
    from contentcache.index.postgresql import PostgreSQLIndex
    from contentcache.pool import SynchronousRunner

    before = json.loads(admin("stats", "--storage", storage, "--json").stdout)
    result = admin("migrate-index", "--from", f"sqlite:{storage}", "--to", pg_dsn)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("copied 4 blobs and 5 entries from ")
    assert json.loads(admin("stats", "--storage", storage, "--index", pg_dsn, "--json").stdout) == before

    copied = PostgreSQLIndex(pg_dsn, SynchronousRunner(), clock)
    copied.open()
    original = SQLiteIndex(storage, SynchronousRunner(), clock)
    original.open()
    try:
        for key in filled:
            protocol = "npm" if key.startswith(("tarball:", "packument:")) else "go"
            assert resolve(copied.get(protocol, key)) == resolve(original.get(protocol, key))
    finally:
        resolve(copied.close())
        resolve(original.close())

    # Never over what a cache already holds.
    again = admin("migrate-index", "--from", f"sqlite:{storage}", "--to", pg_dsn)
    assert again.returncode != 0 and again.stdout == ""
    assert again.stderr.strip().splitlines() == [
        "contentcache: the target index is not empty: give an empty database."]
    missing = admin("migrate-index", "--from", f"sqlite:{storage}/nowhere", "--to", pg_dsn)
    assert missing.returncode != 0 and "there is no index at" in missing.stderr
    secret = admin("migrate-index", "--from", f"sqlite:{storage}", "--to", "postgresql://ci:hunter2@db/cache")
    assert secret.returncode != 0 and "hunter2" not in secret.stderr + secret.stdout


def test_a_migrated_cache_is_served_without_fetching_again(tmp_path: Any, pg_dsn: str) -> None:
    upstream = UpstreamFixture(build_tree(str(tmp_path / "proxy"), modules()))
    storage = str(tmp_path / "storage")
    zip_path = f"/goproxy/{GREET}/@v/v1.2.0.zip"
    try:
        daemon = Daemon(storage, ["--go-upstream", upstream.url, "--go-sumdb", "off"])
        try:
            assert request(daemon.url, zip_path)[1]["x-cache"] == "MISS"
            assert daemon.terminate() == 0
        finally:
            daemon.stop()
        assert admin("migrate-index", "--from", f"sqlite:{storage}", "--to", pg_dsn).returncode == 0
        daemon = Daemon(storage, ["--index", pg_dsn, "--go-upstream", upstream.url, "--go-sumdb", "off"])
        try:
            status, headers, _ = request(daemon.url, zip_path)
            assert (status, headers["x-cache"]) == (200, "HIT")
        finally:
            daemon.stop()
        assert upstream.count(f"/{GREET}/@v/v1.2.0.zip") == 1
    finally:
        upstream.stop()
