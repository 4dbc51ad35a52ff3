"""
The npm adapter through the real daemon, proven with the real clients (npm,
pnpm, yarn classic, yarn berry) against a registry fixture on 127.0.0.1
built from packages the tests `npm pack` themselves.
"""

from __future__ import annotations

import gzip
import http.client
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
from typing import Any, Iterator

import blake3
import pytest

from .daemon import Backing, Daemon, concurrent_gets
from .npmpackages import (
    CLIENTS,
    LEAF,
    MIDDLE,
    PACKAGES,
    TOP,
    RegistryFixture,
    clean_env,
    pack,
)

# Both yarns call their command "yarn": run each by its own script.
BERRY = os.path.join(os.path.dirname(CLIENTS), "@yarnpkg", "cli-dist", "bin", "yarn.js")
CLASSIC = os.path.join(os.path.dirname(CLIENTS), "yarn", "bin", "yarn.js")

for tool in ("npm", "node", os.path.join(CLIENTS, "pnpm"), CLASSIC, BERRY):
    if shutil.which(tool) is None and not os.path.exists(tool):  # pragma: no cover
        pytest.fail(f"{tool} is missing: run the README's test command", pytrace=False)


@pytest.fixture(scope="module")
def packed(tmp_path_factory: pytest.TempPathFactory) -> list[tuple[Any, dict[str, Any]]]:
    work = str(tmp_path_factory.mktemp("packages"))
    return [(package, pack(package, work)) for package in PACKAGES]


@pytest.fixture
def registry(tmp_path: Any, packed: list[tuple[Any, dict[str, Any]]]) -> Iterator[RegistryFixture]:
    fixture = RegistryFixture(str(tmp_path / "registry"), packed)
    yield fixture
    fixture.stop()


@pytest.fixture
def daemons() -> Iterator[list[Daemon]]:
    started: list[Daemon] = []
    yield started
    for d in started:
        d.stop()


def start(daemons: list[Daemon], storage: str, *extra: str) -> Daemon:
    daemon = Daemon(storage, extra=list(extra))
    daemons.append(daemon)
    return daemon


def request(
    url: str, path: str, method: str = "GET", headers: dict[str, str] | None = None, body: bytes | None = None
) -> tuple[int, dict[str, str], bytes]:
    host, port = url.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=60)
    try:
        connection.putrequest(method, path, skip_host=True, skip_accept_encoding=True)
        for name, value in {"Host": f"{host}:{port}", **(headers or {})}.items():
            connection.putheader(name, value)
        if body is not None:
            connection.putheader("Content-Length", str(len(body)))
        connection.endheaders(body)
        response = connection.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        connection.close()


def blob_hashes(storage: str) -> set[str]:
    return {name for _, _, names in os.walk(os.path.join(storage, "blobs")) for name in names}


def project(directory: str, dependencies: dict[str, str]) -> str:
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "package.json"), "w") as f:
        json.dump({"name": "cc-test-project", "version": "1.0.0", "private": True,
                   "dependencies": dependencies}, f)
    return directory


def npmrc(home: str, registry: str, **settings: str) -> None:
    os.makedirs(home, exist_ok=True)
    with open(os.path.join(home, ".npmrc"), "w") as f:
        f.write(f"registry={registry}\n")
        for key, value in settings.items():
            f.write(f"{key}={value}\n")


def run(argv: list[str], cwd: str, home: str, **env: str) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(argv, cwd=cwd, env=clean_env(home, **env), capture_output=True,
                            text=True, timeout=300)
    return result


def check_installed(
    node_modules: str, packed: list[tuple[Any, dict[str, Any]]], expect: dict[str, str], pnpm: bool = False
) -> None:
    """
    The installed files are the packed ones, for each package@version.
    """
    for name, version in expect.items():
        report = next(r for p, r in packed if p.name == name and p.version == version)
        installed = os.path.join(node_modules, *name.split("/"))
        if pnpm:
            # pnpm keeps each package in its own store layout.
            installed = os.path.join(
                node_modules, ".pnpm", f"{name.replace('/', '+')}@{version}", "node_modules", *name.split("/")
            )
        with tarfile.open(report["path"]) as archive:
            for member in archive.getmembers():
                if not member.isfile():
                    continue
                relative = member.name.split("/", 1)[1]
                extracted = archive.extractfile(member)
                assert extracted is not None
                with open(os.path.join(installed, relative), "rb") as f:
                    assert f.read() == extracted.read(), f"{name}@{version}/{relative}"


EXPECTED = {TOP: "1.0.0", MIDDLE: "1.0.1", LEAF: "1.1.0"}


@pytest.mark.parametrize("omit_resolved", [False, True])
def test_npm_install_then_offline_ci(
    tmp_path: Any, registry: RegistryFixture, packed: Any, daemons: list[Daemon], omit_resolved: bool,
    backing: Backing,
) -> None:
    daemon = Daemon(None, [*backing.args, "--npm-upstream", registry.url], env=backing.env)
    daemons.append(daemon)
    settings = {"omit-lockfile-registry-resolved": "true"} if omit_resolved else {}
    home = str(tmp_path / "home")
    npmrc(home, f"{daemon.url}/npm/", **settings)
    app = project(str(tmp_path / "app"), {TOP: "^1.0.0"})
    result = run(["npm", "install"], app, home)
    assert result.returncode == 0, result.stderr
    check_installed(os.path.join(app, "node_modules"), packed, EXPECTED)
    cli = run([os.path.join(app, "node_modules", ".bin", "cc-fixture-top")], app, home)
    assert cli.stdout.strip() == f"{TOP} 1.0.0"
    lock = json.load(open(os.path.join(app, "package-lock.json")))
    resolved = lock["packages"]["node_modules/cc-fixture-top"].get("resolved")
    if omit_resolved:
        assert resolved is None
    else:
        assert resolved == f"{daemon.url}/npm/{TOP}/-/{TOP}-1.0.0.tgz"

    # Every tarball is a blob in the store (a bucket object, with S3).
    names = backing.blob_names()
    for package, report in packed:
        if EXPECTED.get(package.name) == package.version:
            with open(report["path"], "rb") as f:
                assert blake3.blake3(f.read()).hexdigest() in names, package.name

    # The registry goes away; a fresh client cache installs from the lockfile.
    registry.stop()
    shutil.rmtree(os.path.join(app, "node_modules"))
    shutil.rmtree(os.path.join(home, "npm-cache"))
    result = run(["npm", "ci"], app, home)
    assert result.returncode == 0, result.stderr + daemon.log()[-5000:]
    check_installed(os.path.join(app, "node_modules"), packed, EXPECTED)


def test_npm_ci_against_a_cold_cache(
    tmp_path: Any, registry: RegistryFixture, packed: Any, daemons: list[Daemon]
) -> None:
    # A lockfile made through one daemon...
    first = start(daemons, str(tmp_path / "first"), "--npm-upstream", registry.url)
    home = str(tmp_path / "home")
    npmrc(home, f"{first.url}/npm/")
    app = project(str(tmp_path / "app"), {TOP: "^1.0.0"})
    assert run(["npm", "install", "--package-lock-only"], app, home).returncode == 0
    # ...installed with `npm ci` through another that has nothing cached:
    # npm asks for the tarballs without asking for the packuments.
    second = start(daemons, str(tmp_path / "second"), "--npm-upstream", registry.url)
    lock_path = os.path.join(app, "package-lock.json")
    lock = open(lock_path).read().replace(first.url, second.url)
    open(lock_path, "w").write(lock)
    npmrc(home, f"{second.url}/npm/")
    result = run(["npm", "ci"], app, home)
    assert result.returncode == 0, result.stderr
    check_installed(os.path.join(app, "node_modules"), packed, EXPECTED)


def test_tampered_tarball_is_refused(
    tmp_path: Any, registry: RegistryFixture, daemons: list[Daemon]
) -> None:
    path = f"/{LEAF}/-/{LEAF}-1.1.0.tgz"
    file = os.path.join(registry.root, *path.lstrip("/").split("/"))
    data = bytearray(open(file, "rb").read())
    data[-10] ^= 0xFF
    open(file, "wb").write(bytes(data))
    tampered = blake3.blake3(bytes(data)).hexdigest()
    storage = str(tmp_path / "storage")
    daemon = start(daemons, storage, "--npm-upstream", registry.url)
    status, headers, body = request(daemon.url, "/npm" + path)
    assert status == 502
    assert headers["content-type"] == "text/plain; charset=utf-8"
    assert b"integrity" in body
    assert tampered not in blob_hashes(storage)
    assert "INTEGRITY MISMATCH" in daemon.log()

    home = str(tmp_path / "home")
    npmrc(home, f"{daemon.url}/npm/")
    app = project(str(tmp_path / "app"), {LEAF: "1.1.0"})
    result = run(["npm", "install"], app, home)
    assert result.returncode != 0
    assert tampered not in blob_hashes(storage)


def test_npm_audit_reaches_the_bulk_endpoint(
    tmp_path: Any, registry: RegistryFixture, daemons: list[Daemon]
) -> None:
    bulk = "/-/npm/v1/security/advisories/bulk"
    registry.override[bulk] = (200, b"{}")
    daemon = start(daemons, str(tmp_path / "storage"), "--npm-upstream", registry.url)
    home = str(tmp_path / "home")
    npmrc(home, f"{daemon.url}/npm/")
    app = project(str(tmp_path / "app"), {LEAF: "1.1.0"})
    assert run(["npm", "install"], app, home).returncode == 0
    result = run(["npm", "audit", "--audit=true"], app, home)
    assert result.returncode == 0, result.stderr + result.stdout
    assert registry.count(bulk) == 1
    method, _, headers = next(entry for entry in registry.log if entry[1] == bulk)
    assert method == "POST"
    assert headers.get("Content-Encoding") == "gzip"


def test_pnpm_and_yarn_install_then_offline(
    tmp_path: Any, registry: RegistryFixture, packed: Any, daemons: list[Daemon], backing: Backing
) -> None:
    daemon = Daemon(None, [*backing.args, "--npm-upstream", registry.url], env=backing.env)
    daemons.append(daemon)
    base = f"{daemon.url}/npm/"
    clients = {
        "pnpm": [os.path.join(CLIENTS, "pnpm"), "install", "--reporter=append-only"],
        "yarn-classic": ["node", CLASSIC, "install", "--non-interactive", "--no-progress"],
        "yarn-berry": ["node", BERRY, "install"],
    }
    apps = {}
    for client, argv in clients.items():
        home = str(tmp_path / client / "home")
        npmrc(home, base)
        app = project(str(tmp_path / client / "app"), {TOP: "^1.0.0"})
        if client == "yarn-classic":
            with open(os.path.join(app, ".yarnrc"), "w") as f:
                f.write(f'registry "{base}"\n')
        if client == "yarn-berry":
            with open(os.path.join(app, ".yarnrc.yml"), "w") as f:
                f.write(
                    f'npmRegistryServer: "{base}"\n'
                    f'unsafeHttpWhitelist: ["127.0.0.1"]\n'
                    "nodeLinker: node-modules\n"
                    "enableGlobalCache: false\n"
                    "enableTelemetry: false\n"
                )
        env = {"YARN_ENABLE_IMMUTABLE_INSTALLS": "false", "YARN_CACHE_FOLDER": os.path.join(home, "yarn-cache"),
               "npm_config_store_dir": os.path.join(home, "pnpm-store")}
        result = run(argv, app, home, **env)
        assert result.returncode == 0, f"{client}: {result.stdout}\n{result.stderr}"
        check_installed(os.path.join(app, "node_modules"), packed, EXPECTED, pnpm=client == "pnpm")
        apps[client] = (app, home, argv, env)

    registry.stop()
    for client, (app, home, argv, env) in apps.items():
        shutil.rmtree(os.path.join(app, "node_modules"))
        for cache in ("yarn-cache", "pnpm-store", "npm-cache", ".cache"):
            shutil.rmtree(os.path.join(home, cache), ignore_errors=True)
        shutil.rmtree(os.path.join(app, ".yarn", "cache"), ignore_errors=True)
        result = run(argv, app, home, **env)
        assert result.returncode == 0, f"{client} offline: {result.stdout}\n{result.stderr}"
        check_installed(os.path.join(app, "node_modules"), packed, EXPECTED, pnpm=client == "pnpm")


def test_packument_addresses_headers_and_variants(
    tmp_path: Any, registry: RegistryFixture, daemons: list[Daemon]
) -> None:
    daemon = start(daemons, str(tmp_path / "storage"), "--npm-upstream", registry.url)
    original = registry.packuments[MIDDLE]
    for path in ("/npm/@cc-fixture%2fmiddle", "/npm/@cc-fixture%2Fmiddle", "/npm/@cc-fixture/middle"):
        status, headers, body = request(daemon.url, path)
        assert status == 200, path
        document = json.loads(body)
        dist = document["versions"]["1.0.0"]["dist"]
        assert dist["tarball"] == f"{daemon.url}/npm/{MIDDLE}/-/middle-1.0.0.tgz"
        for field in ("integrity", "shasum", "signatures"):
            assert dist[field] == original["versions"]["1.0.0"]["dist"][field]
        assert headers["vary"] == "Accept, Accept-Encoding"
        assert headers["content-type"].startswith("application/json")
    assert registry.count("/@cc-fixture%2Fmiddle") == 1  # one fetch, three spellings

    # Another Host, behind a TLS proxy: its own addresses, never the first one's.
    status, headers, body = request(daemon.url, f"/npm/{LEAF}",
                                    headers={"Host": "cache.example:8443", "X-Forwarded-Proto": "https"})
    tarball = json.loads(body)["versions"]["1.0.0"]["dist"]["tarball"]
    assert tarball == f"https://cache.example:8443/npm/{LEAF}/-/{LEAF}-1.0.0.tgz"
    status, headers, body = request(daemon.url, f"/npm/{LEAF}")
    assert json.loads(body)["versions"]["1.0.0"]["dist"]["tarball"].startswith(daemon.url)

    # Conditional requests.
    etag, modified = headers["etag"], headers["last-modified"]
    assert request(daemon.url, f"/npm/{LEAF}", headers={"If-None-Match": etag})[0] == 304
    assert request(daemon.url, f"/npm/{LEAF}", headers={"If-Modified-Since": modified})[0] == 304

    # gzip for clients that take it.
    status, headers, body = request(daemon.url, f"/npm/{LEAF}", headers={"Accept-Encoding": "gzip"})
    assert headers["content-encoding"] == "gzip"
    assert json.loads(gzip.decompress(body))["name"] == LEAF

    # The abbreviated variant is its own upstream request and entry.
    abbreviated = "application/vnd.npm.install-v1+json; q=1.0, application/json; q=0.8, */*"
    status, headers, body = request(daemon.url, f"/npm/{LEAF}", headers={"Accept": abbreviated})
    assert status == 200 and json.loads(body)["name"] == LEAF
    assert registry.count(f"/{LEAF}") == 2
    accepts = [h.get("Accept", "") for m, p, h in registry.log if p == f"/{LEAF}"]
    assert any("application/vnd.npm.install-v1+json" in a for a in accepts)

    # dist-tags and ping.
    status, _, body = request(daemon.url, f"/npm/-/package/{LEAF}/dist-tags")
    assert status == 200 and json.loads(body) == {"latest": "1.1.0", "next": "2.0.0-beta.1"}
    status, _, body = request(daemon.url, f"/npm/-/package/{MIDDLE.replace('/', '%2f')}/dist-tags")
    assert status == 200 and json.loads(body) == {"latest": "1.0.1"}
    assert request(daemon.url, "/npm/-/ping")[0] == 200


def test_packuments_are_stored_compressed_and_everything_served_the_same(
    tmp_path: Any, registry: RegistryFixture, daemons: list[Daemon]
) -> None:
    public = ["--npm-upstream", registry.url, "--public-url", "http://cache.test/npm"]
    compressed = Backing.directory(str(tmp_path / "compressed"))
    plain = Backing.directory(str(tmp_path / "plain"))
    urls = [start(daemons, compressed.state_dir, *public).url,
            start(daemons, plain.state_dir, *public, "--compression-level", "0").url]
    paths = [f"/npm/{LEAF}", f"/npm/{MIDDLE}", f"/npm/{LEAF}/-/{LEAF}-1.0.0.tgz",
             f"/npm/{MIDDLE}/-/middle-1.0.1.tgz"]
    variants = [{}, {"Accept-Encoding": "gzip"},
                {"Accept": "application/vnd.npm.install-v1+json"}, {"Range": "bytes=20-99"}]
    for path in paths:
        for headers in variants:
            answers = [request(url, path, headers=headers) for url in urls]
            assert answers[0][0] in (200, 206), (path, headers)
            assert answers[0][0] == answers[1][0] and answers[0][2] == answers[1][2], (path, headers)

    for key, (_, encoding, size, stored) in compressed.stored().items():
        if key.startswith(("packument:", "render:packument:")) and ":gzip:" not in key:
            assert encoding == "zstd" and stored < size, key
        if key.startswith("tarball:") or ":gzip:" in key:
            assert encoding == "identity" and stored == size, key
    assert any(k.startswith("packument:") for k in compressed.stored())
    assert {encoding for _, encoding, _, _ in plain.stored().values()} == {"identity"}
    stats = json.loads(subprocess.run(
        [os.path.join(os.path.dirname(sys.executable), "contentcache"), "stats", "--json", *compressed.args],
        capture_output=True, text=True, check=True,
    ).stdout)
    assert stats["stored_bytes"] < stats["unique_bytes"] and stats["compression_ratio"] > 1


def test_a_damaged_dist_index_is_fetched_again(
    tmp_path: Any, registry: RegistryFixture, daemons: list[Daemon]
) -> None:
    backing = Backing.directory(str(tmp_path / "storage"))
    daemon = start(daemons, backing.state_dir, "--npm-upstream", registry.url)
    assert request(daemon.url, f"/npm/{LEAF}")[0] == 200
    h, encoding, _, _ = backing.stored()[f"dist:{LEAF}"]
    key = f"blobs/{h[:2]}/{h}" + (".zst" if encoding == "zstd" else "")
    damaged = bytearray(backing.read(key))
    damaged[len(damaged) // 2] ^= 0x01
    backing.write(key, bytes(damaged))

    status, _, body = request(daemon.url, f"/npm/{LEAF}/-/{LEAF}-1.0.0.tgz")
    assert status == 200
    assert body == open(os.path.join(registry.root, LEAF, "-", f"{LEAF}-1.0.0.tgz"), "rb").read()


def test_public_url(tmp_path: Any, registry: RegistryFixture, daemons: list[Daemon]) -> None:
    daemon = start(daemons, str(tmp_path / "storage"), "--npm-upstream", registry.url,
                   "--public-url", "https://npm.cache.example/")
    _, _, body = request(daemon.url, f"/npm/{MIDDLE}")
    assert json.loads(body)["versions"]["1.0.1"]["dist"]["tarball"] == (
        "https://npm.cache.example/npm/@cc-fixture/middle/-/middle-1.0.1.tgz"
    )


def test_concurrent_tarball_misses_make_one_upstream_request(
    tmp_path: Any, registry: RegistryFixture, daemons: list[Daemon]
) -> None:
    daemon = start(daemons, str(tmp_path / "storage"), "--npm-upstream", registry.url)
    path = f"/{TOP}/-/{TOP}-1.0.0.tgz"
    registry.delay = 0.3
    results = concurrent_gets(lambda: request(daemon.url, "/npm" + path)[::2], 50)
    assert [status for status, _ in results] == [200] * 50
    assert len({body for _, body in results}) == 1
    assert registry.count(path) == 1


HOSTILE = [
    "/npm/../../etc/passwd",
    "/npm/%2e%2e/%2e%2e/etc/passwd",
    "/npm/.hidden",
    "/npm/_private",
    "/npm/@scope",
    "/npm/@/x",
    "/npm/a%00b",
    "/npm/" + "a" * 300,
    "/npm/cc-fixture-leaf/-/other-1.0.0.tgz",
    "/npm/cc-fixture-leaf/-/cc-fixture-leaf-1.0.0.exe",
    "/npm/cc-fixture-leaf/-/..%2f..%2fetc%2fpasswd",
    "/npm/cc-fixture-leaf/1.0.0/extra",
    "/npm/-/nothing",
]


def test_hostile_names_are_404(
    tmp_path: Any, registry: RegistryFixture, daemons: list[Daemon]
) -> None:
    daemon = start(daemons, str(tmp_path / "storage"), "--npm-upstream", registry.url)
    for path in HOSTILE:
        status, headers, body = request(daemon.url, path)
        assert status == 404, (path, body)
        assert headers["content-type"] == "text/plain; charset=utf-8"
        assert request(daemon.url, f"/npm/{LEAF}")[0] == 200


def test_writes_are_refused(tmp_path: Any, registry: RegistryFixture, daemons: list[Daemon]) -> None:
    daemon = start(daemons, str(tmp_path / "storage"), "--npm-upstream", registry.url)
    for method, path in [("PUT", f"/npm/{LEAF}"), ("DELETE", f"/npm/{LEAF}/-/{LEAF}-1.0.0.tgz/-rev/1"),
                         ("PUT", "/npm/-/user/org.couchdb.user:me"), ("POST", f"/npm/{LEAF}")]:
        status, _, body = request(daemon.url, path, method=method, body=b"{}")
        assert status == 405, (method, path)
        assert b"read-through cache" in body
    assert registry.count(f"/{LEAF}") == 0


def test_stale_packument_when_upstream_fails(
    tmp_path: Any, registry: RegistryFixture, daemons: list[Daemon]
) -> None:
    # Revalidated before every answer (never in the background): stale only if upstream fails.
    daemon = start(daemons, str(tmp_path / "storage"), "--npm-upstream", registry.url,
                   "--npm-metadata-ttl", "0s", "--stale-while-revalidate", "0")
    status, headers, body = request(daemon.url, f"/npm/{LEAF}")
    assert headers["x-cache"] == "MISS"
    registry.override[f"/{LEAF}"] = (503, b"down for maintenance\n")
    status, headers, stale = request(daemon.url, f"/npm/{LEAF}")
    assert status == 200 and stale == body
    assert headers["x-cache"] == "STALE" and "Revalidation Failed" in headers["warning"]
    # A tarball nobody fetched before needs the packument: upstream down,
    # the stale packument still names it, the fetch itself fails: 502.
    registry.stop()
    status, headers, body = request(daemon.url, f"/npm/{LEAF}/-/{LEAF}-1.0.0.tgz")
    assert status == 502


REAL = {"is-number": "7.0.0", "@isaacs/string-locale-compare": "1.1.0"}


def test_real_registry_then_offline(tmp_path: Any, daemons: list[Daemon]) -> None:
    """
    The one test that leaves 127.0.0.1: the npm client's own configured
    registry is the upstream, found as users' daemons find it (npm config
    get registry), never named here.
    """
    storage = str(tmp_path / "storage")
    daemon = start(daemons, storage)
    # Found at start by running npm, which may answer after the port listens.
    daemon.wait_for(re.compile(rb"from npm config get registry"))
    home = str(tmp_path / "home")
    npmrc(home, f"{daemon.url}/npm/")
    app = project(str(tmp_path / "app"), dict(REAL))
    result = run(["npm", "install"], app, home)
    assert result.returncode == 0, result.stderr + daemon.log()[-3000:]
    for name, version in REAL.items():
        installed = json.load(open(os.path.join(app, "node_modules", *name.split("/"), "package.json")))
        assert installed["version"] == version
    assert daemon.terminate() == 0

    # Restarted with an upstream that cannot be reached, every packument
    # due for revalidation: the cache alone, stale.
    offline = start(daemons, storage, "--npm-upstream", "http://127.0.0.1:9", "--npm-metadata-ttl", "0s",
                    "--stale-while-revalidate", "0")
    npmrc(home, f"{offline.url}/npm/")
    shutil.rmtree(os.path.join(app, "node_modules"))
    shutil.rmtree(os.path.join(home, "npm-cache"))
    os.unlink(os.path.join(app, "package-lock.json"))
    result = run(["npm", "install"], app, home)
    assert result.returncode == 0, result.stderr + offline.log()[-3000:]
    for name, version in REAL.items():
        installed = json.load(open(os.path.join(app, "node_modules", *name.split("/"), "package.json")))
        assert installed["version"] == version
    assert "serving stale npm packument:" in offline.log()


def test_host_headers_cannot_fill_the_disk(
    tmp_path: Any, registry: RegistryFixture, daemons: list[Daemon]
) -> None:
    import sqlite3

    storage = str(tmp_path / "storage")
    daemon = start(daemons, storage, "--npm-upstream", registry.url)
    for i in range(12):
        status, headers, body = request(daemon.url, f"/npm/{LEAF}", headers={"Host": f"h{i}.example:80"})
        assert status == 200 and headers["x-cache"] == "MISS"  # a new base renders
        assert f"http://h{i}.example:80/npm/" in json.loads(body)["versions"]["1.0.0"]["dist"]["tarball"]
    status, headers, _ = request(daemon.url, f"/npm/{LEAF}", headers={"Host": "h11.example:80"})
    assert headers["x-cache"] == "HIT"
    db = sqlite3.connect(os.path.join(storage, "index.sqlite"))
    (copies,) = db.execute(
        "SELECT count(*) FROM entries WHERE key LIKE ?", (f"render:packument:full:{LEAF}:%",)
    ).fetchone()
    db.close()
    assert copies == 8
    assert registry.count(f"/{LEAF}") == 1


def test_missing_host_header_is_400_and_dist_index_loss_heals(
    tmp_path: Any, registry: RegistryFixture, daemons: list[Daemon]
) -> None:
    import socket
    import sqlite3

    storage = str(tmp_path / "storage")
    daemon = start(daemons, storage, "--npm-upstream", registry.url)
    with socket.create_connection(("127.0.0.1", daemon.port), timeout=10) as s:
        s.sendall(f"GET /npm/{LEAF} HTTP/1.0\r\n\r\n".encode())
        reply = b""
        while chunk := s.recv(65536):
            reply += chunk
    assert reply.startswith(b"HTTP/1.0 400") or reply.startswith(b"HTTP/1.1 400"), reply[:100]

    assert request(daemon.url, f"/npm/{LEAF}")[0] == 200
    # Expiry removed the dist index (it is read only on tarball misses):
    # a tarball miss must still find its upstream address.
    db = sqlite3.connect(os.path.join(storage, "index.sqlite"))
    db.execute("DELETE FROM entries WHERE key = ?", (f"dist:{LEAF}",))
    db.commit()
    db.close()
    status, _, body = request(daemon.url, f"/npm/{LEAF}/-/{LEAF}-1.0.0.tgz")
    assert status == 200 and body[:2] == b"\x1f\x8b"
