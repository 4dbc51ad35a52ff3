"""
The GOPROXY adapter through the real daemon, proven with the real go
command against an upstream fixture and a real checksum database, all on
127.0.0.1.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from typing import Any, Iterator

import blake3
import pytest
from prometheus_client.parser import text_string_to_metric_families

from contentcache.hash import Hash
from contentcache.protocol.goproxy.paths import escape
from contentcache.protocol.goproxy.sumdb import client_tiles, lookup_places, parse_lookup, proof_tiles

from .daemon import TWISTD, Backing, Daemon, concurrent_gets
from .gomodules import (
    GREET,
    HELLO,
    LEGACY,
    PSEUDO,
    UPPER,
    ModuleVersion,
    SumDBFixture,
    build_gosumdb,
    build_tree,
    go_env,
    modules,
    write_zip,
)
from .upstream import UpstreamFixture

SUMDB_NAME = "sum.test"
DOWNLOADS = [
    f"{GREET}@v1.0.0",
    f"{GREET}@v1.2.0",
    f"{GREET}@{PSEUDO}",
    f"{HELLO}@v1.1.0",
    f"{UPPER}@v0.2.0",
    f"{LEGACY}@v2.0.0+incompatible",
]

if shutil.which("go") is None:  # pragma: no cover - the test command installs it
    pytest.fail("the go command is missing: run the README's test command", pytrace=False)


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> str:
    return build_tree(str(tmp_path_factory.mktemp("proxy")), modules())


@pytest.fixture(scope="module")
def gosumdb_binary(tmp_path_factory: pytest.TempPathFactory) -> str:
    return build_gosumdb(str(tmp_path_factory.mktemp("gosumdb")))


@pytest.fixture
def upstream(tree: str) -> Iterator[UpstreamFixture]:
    fixture = UpstreamFixture(tree)
    yield fixture
    fixture.stop()


@pytest.fixture
def sumdb(gosumdb_binary: str, tree: str) -> Iterator[SumDBFixture]:
    fixture = SumDBFixture(gosumdb_binary, SUMDB_NAME, tree)
    yield fixture
    fixture.stop()


@pytest.fixture
def storage(tmp_path: Any) -> str:
    return str(tmp_path / "storage")


def start(storage: str, *extra: str, env: dict[str, str] | None = None) -> Daemon:
    return Daemon(storage, extra=list(extra), env=env)


@pytest.fixture
def daemons() -> Iterator[list[Daemon]]:
    started: list[Daemon] = []
    yield started
    for d in started:
        d.stop()


def request(url: str, path: str, method: str = "GET") -> tuple[int, dict[str, str], bytes]:
    host, port = url.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=60)
    try:
        connection.putrequest(method, path, skip_host=True, skip_accept_encoding=True)
        connection.putheader("Host", f"{host}:{port}")
        connection.endheaders()
        response = connection.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        connection.close()


def go(home: str, *args: str, cwd: str | None = None, **env: str) -> subprocess.CompletedProcess[str]:
    os.makedirs(home, exist_ok=True)
    return subprocess.run(
        ["go", *args],
        env=go_env(home, **env),
        cwd=cwd or home,
        capture_output=True,
        text=True,
        timeout=300,
    )


def download(
    home: str, proxy: str, gosumdb: str = "off", downloads: list[str] = DOWNLOADS
) -> dict[str, dict[str, Any]]:
    result = go(home, "mod", "download", "-json", *downloads, GOPROXY=proxy, GOSUMDB=gosumdb)
    assert result.returncode == 0, result.stderr + result.stdout
    documents = [json.loads(d) for d in re.split(r"(?<=\n})\n(?={)", result.stdout.strip())]
    found = {f"{d['Path']}@{d['Version']}": d for d in documents}
    for d in found.values():
        assert "Error" not in d, d
    assert set(found) == set(downloads)
    return found


def restarted(daemon: Daemon, storage: str, args: list[str], daemons: list[Daemon]) -> Daemon:
    daemon.stop()
    daemon = start(storage, *args)
    daemons.append(daemon)
    return daemon


def fresh_client(daemon: Daemon, home: str, sumdb: SumDBFixture, direct: dict[str, dict[str, Any]]) -> set[str]:
    """
    A new go client (empty GOPATH and module cache, the same GOSUMDB)
    downloads every module through the daemon, with direct's hashes; the
    tiles it asked for.
    """
    offline = download(home, f"{daemon.url}/goproxy", sumdb.vkey)
    for key in DOWNLOADS:
        assert offline[key]["Sum"] == direct[key]["Sum"], key
        assert offline[key]["GoModSum"] == direct[key]["GoModSum"], key
    return set(re.findall(rf"GET /goproxy/sumdb/{re.escape(SUMDB_NAME)}/(tile/\S+)", daemon.log()))


def blob_hashes(storage: str) -> set[str]:
    root = os.path.join(storage, "blobs")
    return {name for _, _, names in os.walk(root) for name in names}


def test_downloads_match_direct_and_survive_upstream_loss(
    tmp_path: Any, backing: Backing, upstream: UpstreamFixture, sumdb: SumDBFixture, daemons: list[Daemon]
) -> None:
    direct = download(str(tmp_path / "direct"), upstream.url, sumdb.gosumdb)

    daemon = Daemon(
        None, [*backing.args, "--go-upstream", upstream.url, "--go-sumdb", f"{SUMDB_NAME}={sumdb.url}"],
        env=backing.env,
    )
    daemons.append(daemon)
    proxy = f"{daemon.url}/goproxy"
    # Given no URL for the checksum database, the go command asks the proxy
    # (/goproxy/sumdb/sum.test/supported) and verifies through it.
    through = download(str(tmp_path / "through"), proxy, sumdb.vkey)
    for key in DOWNLOADS:
        assert through[key]["Sum"] == direct[key]["Sum"], key
        assert through[key]["GoModSum"] == direct[key]["GoModSum"], key
    log = daemon.log()
    assert f"GET /goproxy/sumdb/{SUMDB_NAME}/supported" in log
    assert f"GET /goproxy/sumdb/{SUMDB_NAME}/lookup/{GREET}@v1.0.0" in log
    assert request(daemon.url, f"/goproxy/sumdb/{SUMDB_NAME}/supported")[0] == 200
    assert request(daemon.url, "/goproxy/sumdb/other.test/supported")[0] == 404

    # Everything the daemon stored was verified against the database.
    assert "unverified" not in daemon.log()
    # Each zip is a blob in the store (a bucket object, with S3), stored as
    # it came: zips do not compress.
    stored = backing.stored()
    names = backing.blob_names()
    for key in DOWNLOADS:
        with open(through[key]["Zip"], "rb") as f:
            h = Hash.of(f.read())
        path, version = key.split("@")
        assert h.hex in names, key
        assert stored[f"{escape(path)}/@v/{version}.zip"][:2] == (h.hex, "identity")

    # The list and version queries, then get @latest in a module of our own.
    home = str(tmp_path / "client")
    listed = go(home, "list", "-m", "-versions", GREET, GOPROXY=proxy, GOSUMDB=sumdb.vkey)
    assert listed.returncode == 0, listed.stderr
    assert listed.stdout.split() == [GREET, "v1.0.0", "v1.2.0"]
    project = tmp_path / "project"
    project.mkdir()
    (project / "go.mod").write_text("module example.com/project\n\ngo 1.19\n")
    got = go(home, "get", f"{HELLO}@latest", cwd=str(project), GOPROXY=proxy, GOSUMDB=sumdb.vkey)
    assert got.returncode == 0, got.stderr
    go_mod = (project / "go.mod").read_text()
    assert f"{HELLO} v1.1.0" in go_mod and f"{GREET} v1.2.0" in go_mod

    # Upstream and checksum database gone, caches empty: still served. (The
    # go command's own checksum-database state went with its cache, and it
    # would ask for tree tiles nobody fetched before; the sums it computes
    # from the bytes it gets are compared with the direct ones instead.)
    upstream.stop()
    sumdb.stop()
    offline = download(str(tmp_path / "offline"), proxy, "off")
    for key in DOWNLOADS:
        assert offline[key]["Sum"] == direct[key]["Sum"], key
    status, headers, body = request(daemon.url, f"/goproxy/{GREET}/@v/list")
    assert status == 200
    assert body.split() == [b"v1.0.0", b"v1.2.0"]
    assert headers["x-cache"] in ("HIT", "STALE")


def derived_tiles(daemon: Daemon) -> dict[str, float]:
    """
    contentcache_sumdb_derived_tiles_total by kind, from /metrics.
    """
    status, _, body = request(daemon.url, "/metrics")
    assert status == 200
    return {
        sample.labels["kind"]: sample.value
        for family in text_string_to_metric_families(body.decode())
        for sample in family.samples
        if sample.name == "contentcache_sumdb_derived_tiles_total"
    }


def tree_size(note: bytes) -> int:
    """
    The size of the tree a signed tree note (C{latest}) names.
    """
    assert note.startswith(b"go.sum database tree\n"), note
    return int(note.split(b"\n")[1])


def test_a_new_client_verifies_against_the_checksum_database_offline(
    tmp_path: Any, gosumdb_binary: str, daemons: list[Daemon]
) -> None:
    """
    A go command that finds a module's hashes in go.sum asks the database
    nothing, while the cache looks every download up itself: the tree
    those lookups name is one no client asked the tiles of. A new client
    (no go.sum, an empty module cache) checks each lookup against the
    tiles of that tree; offline, the cache has the hash tile (fetched
    ahead when it stored the lookups) and cuts the data tile a log
    auditor reads from the wider one of the grown tree.
    """
    # A tree of its own: a version is published during the test.
    root = build_tree(str(tmp_path / "proxy"), modules())
    upstream = UpstreamFixture(root)
    sumdb = SumDBFixture(gosumdb_binary, SUMDB_NAME, root)
    try:
        # The modules are public: a developer got them straight from the
        # module proxy and the database (recording them there), and the
        # project's go.sum holds their hashes.
        direct = download(str(tmp_path / "direct"), upstream.url, sumdb.gosumdb)
        project = tmp_path / "project"
        project.mkdir()
        (project / "go.mod").write_text("module example.com/project\n\ngo 1.19\n")
        (project / "go.sum").write_text("".join(
            f"{key.replace('@', ' ')} {d['Sum']}\n{key.replace('@', ' ')}/go.mod {d['GoModSum']}\n"
            for key, d in direct.items()
        ))

        storage = str(tmp_path / "storage")
        # latest revalidated at every request, waited for.
        args = ["--go-upstream", upstream.url, "--go-sumdb", f"{SUMDB_NAME}={sumdb.url}",
                "--go-metadata-ttl", "0s", "--stale-while-revalidate", "0"]
        daemon = start(storage, *args)
        daemons.append(daemon)
        proxy = f"{daemon.url}/goproxy"
        sumdb_path = f"/goproxy/sumdb/{SUMDB_NAME}"

        # CI builds the project through the cache with GOSUMDB on: the go
        # command checks every download against go.sum, the cache checks
        # it against the database (and keeps its lookups).
        ci = go(str(tmp_path / "ci"), "mod", "download", "-json", *DOWNLOADS, cwd=str(project),
                GOPROXY=proxy, GOSUMDB=sumdb.vkey)
        assert ci.returncode == 0, ci.stderr
        assert "unverified" not in daemon.log()
        status, _, latest = request(daemon.url, f"{sumdb_path}/latest")
        assert status == 200 and tree_size(latest) == len(DOWNLOADS)

        # A new version is published; a developer downloads it through the
        # cache, and the go command verifies it there: the tree has grown.
        new = ModuleVersion(GREET, "v1.3.0", {
            "go.mod": f"module {GREET}\n\ngo 1.19\n",
            "greet.go": 'package greet\n\nfunc Word() string { return "Hey" }\n',
        })
        build_tree(root, [*modules(), new])
        dev = go(str(tmp_path / "dev"), "mod", "download", "-json", f"{GREET}@v1.3.0",
                 GOPROXY=proxy, GOSUMDB=sumdb.vkey)
        assert dev.returncode == 0, dev.stderr
        status, _, grown = request(daemon.url, f"{sumdb_path}/latest")
        assert status == 200 and tree_size(grown) == len(DOWNLOADS) + 1
        # A log auditor reads the records through the cache.
        assert request(daemon.url, f"{sumdb_path}/tile/8/data/000.p/7")[0] == 200
        # What the database itself serves for the tree CI's lookups name:
        # no client asked for these.
        hash_tile = request(sumdb.url, "/tile/8/0/000.p/6")[2]
        data_tile = request(sumdb.url, "/tile/8/data/000.p/6")[2]
        assert f"{sumdb_path}/tile/8/0/000.p/6" not in daemon.log()
        assert len(hash_tile) == 6 * 32
    finally:
        upstream.stop()
        sumdb.stop()

    # Offline: every upstream gone (connection refused), the daemon
    # restarted.
    # A new machine, empty GOPATH and module cache, the same GOSUMDB: the
    # go command looks every module up through the cache, and checks each
    # lookup against the tiles of the tree it names.
    daemon = restarted(daemon, storage, args, daemons)
    proxy = f"{daemon.url}/goproxy"
    assert derived_tiles(daemon) == {"hash": 0, "data": 0}
    status, headers, body = request(daemon.url, f"{sumdb_path}/latest")
    assert (status, headers["x-cache"], body) == (200, "STALE", grown)
    home = str(tmp_path / "new")
    fresh_client(daemon, home, sumdb, direct)
    again = go(home, "mod", "download", "-json", f"{GREET}@v1.3.0", GOPROXY=proxy, GOSUMDB=sumdb.vkey)
    assert again.returncode == 0, again.stderr
    # The go command verified them: it keeps the tile it authenticated,
    # the database's own bytes, and the newest tree it saw.
    tiles = os.path.join(home, "modcache", "cache", "download", "sumdb", SUMDB_NAME, "tile", "8", "0")
    with open(os.path.join(tiles, "000.p", "6"), "rb") as f:
        assert f.read() == hash_tile
    with open(os.path.join(home, "gopath", "pkg", "sumdb", SUMDB_NAME, "latest"), "rb") as f:
        assert tree_size(f.read()) == len(DOWNLOADS) + 1
    # The records as the database wrote them, cut from the wider tile.
    status, headers, body = request(daemon.url, f"{sumdb_path}/tile/8/data/000.p/6")
    assert (status, headers["x-cache"], body) == (200, "HIT", data_tile)
    # The data tile, whichever worker answered; the hash tile was held.
    assert derived_tiles(daemon) == {"hash": 0, "data": 1}


def prefetched_tiles(daemon: Daemon) -> float:
    """
    contentcache_sumdb_prefetched_tiles_total, from /metrics.
    """
    status, _, body = request(daemon.url, "/metrics")
    assert status == 200
    return next(
        sample.value
        for family in text_string_to_metric_families(body.decode())
        for sample in family.samples
        if sample.name == "contentcache_sumdb_prefetched_tiles_total"
    )


#: Another module's versions the checksum database records besides the
#: test's, so that its tree spans tiles and tile levels (2**8 records a
#: tile): 200 before the test's 6, 94 after.
FILLER = "example.com/filler"
FILLERS_BEFORE, FILLERS_AFTER = 200, 94


@pytest.mark.parametrize("fill", ["go.sum", "warm"])
def test_a_new_client_verifies_offline_what_the_cache_verified(
    tmp_path: Any, gosumdb_binary: str, daemons: list[Daemon], fill: str
) -> None:
    """
    A cache filled by go clients that had go.sum (they ask the database
    nothing), or by C{contentcache warm go.sum}, looked every download up
    itself and fetched ahead the tiles that prove those records: cut off
    from every upstream, it serves a new go client (no go.sum, an empty
    module cache) every tile that client checks the lookups against.
    """
    filler = [ModuleVersion(FILLER, f"v0.0.{i}", {"go.mod": f"module {FILLER}\n", "f.go": "package filler\n"})
              for i in range(FILLERS_BEFORE + FILLERS_AFTER)]
    root = build_tree(str(tmp_path / "proxy"), [*modules(), *filler])
    upstream = UpstreamFixture(root)
    sumdb = SumDBFixture(gosumdb_binary, SUMDB_NAME, root)
    try:
        # The database records the test's modules among others (its test
        # server adds a record at its first lookup).
        for mv in filler[:FILLERS_BEFORE]:
            assert request(sumdb.url, f"/lookup/{FILLER}@{mv.version}")[0] == 200
        direct = download(str(tmp_path / "direct"), upstream.url, sumdb.gosumdb)
        for mv in filler[FILLERS_BEFORE:]:
            assert request(sumdb.url, f"/lookup/{FILLER}@{mv.version}")[0] == 200
        project = tmp_path / "project"
        project.mkdir()
        (project / "go.mod").write_text("module example.com/project\n\ngo 1.19\n")
        (project / "go.sum").write_text("".join(
            f"{key.replace('@', ' ')} {d['Sum']}\n{key.replace('@', ' ')}/go.mod {d['GoModSum']}\n"
            for key, d in direct.items()
        ))

        storage = str(tmp_path / "storage")
        args = ["--go-upstream", upstream.url, "--go-sumdb", f"{SUMDB_NAME}={sumdb.url}"]
        daemon = start(storage, *args)
        daemons.append(daemon)
        proxy = f"{daemon.url}/goproxy"
        sumdb_path = f"/goproxy/sumdb/{SUMDB_NAME}"
        if fill == "go.sum":
            ci = go(str(tmp_path / "ci"), "mod", "download", "-json", *DOWNLOADS, cwd=str(project),
                    GOPROXY=proxy, GOSUMDB=sumdb.vkey)
            assert ci.returncode == 0, ci.stderr
        else:
            warmed = subprocess.run(
                [sys.executable, "-m", "contentcache.cli", "warm", "--url", daemon.url, str(project / "go.sum")],
                capture_output=True, text=True, timeout=300,
            )
            assert warmed.returncode == 0, warmed.stderr
        assert "unverified" not in daemon.log()
        assert f"{sumdb_path}/" not in daemon.log()  # no client asked the database anything

        # The cache's lookups (its own, to verify the downloads): records
        # 200 to 205 of a tree of 300. Each one's proof: the full first
        # tile, and the tiles of both levels that make the tree's hash.
        lookups = {}
        for key in DOWNLOADS:
            path, version = key.split("@")
            status, headers, body = request(daemon.url, f"{sumdb_path}/lookup/{escape(path)}@{escape(version)}")
            assert (status, headers["x-cache"]) == (200, "HIT"), key
            lookups[key] = parse_lookup(body)
        assert sorted(lookups.values()) == [(FILLERS_BEFORE + i, 300) for i in range(len(DOWNLOADS))]
        proofs = {tile.path() for record, size in lookups.values() for tile in proof_tiles(record, size)}
        assert proofs == {"tile/8/0/000", "tile/8/1/000.p/1", "tile/8/0/001.p/44"}
        # Fetched ahead, in the background.
        deadline = time.monotonic() + 30
        while prefetched_tiles(daemon) < len(proofs) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert prefetched_tiles(daemon) == len(proofs)
    finally:
        upstream.stop()
        sumdb.stop()

    # Offline, restarted.
    daemon = restarted(daemon, storage, args, daemons)
    asked = fresh_client(daemon, str(tmp_path / "new"), sumdb, direct)
    # The tiles the go command asked for are those computed, and it
    # verified with them: it keeps the tiles it authenticated.
    assert asked == proofs
    kept = os.path.join(str(tmp_path / "new"), "modcache", "cache", "download", "sumdb", SUMDB_NAME)
    assert {
        os.path.relpath(os.path.join(d, f), kept) for d, _, files in os.walk(kept) for f in files
    } >= proofs
    assert prefetched_tiles(daemon) == 0
    assert derived_tiles(daemon) == {"hash": 0, "data": 0}


def go_sum(downloaded: dict[str, dict[str, Any]]) -> str:
    """
    The go.sum lines of what C{download} got.
    """
    return "".join(
        f"{key.replace('@', ' ')} {d['Sum']}\n{key.replace('@', ' ')}/go.mod {d['GoModSum']}\n"
        for key, d in downloaded.items()
    )


def test_a_new_client_verifies_offline_lookups_the_cache_made_either_side_of_a_tile_boundary(
    tmp_path: Any, gosumdb_binary: str, daemons: list[Daemon]
) -> None:
    """
    The checksum database grows past 256 records between two of the
    cache's lookups. A new go client checks the older lookups' tree
    against the newer one, and their records in it: the full first tile
    of the newer tree, which neither lookup's own proof reads. The cache
    fetched ahead every tile as the newer tree has them.
    """
    first, second = DOWNLOADS[:3], DOWNLOADS[3:]
    filler = [ModuleVersion(FILLER, f"v0.0.{i}", {"go.mod": f"module {FILLER}\n", "f.go": "package filler\n"})
              for i in range(300)]
    root = build_tree(str(tmp_path / "proxy"), [*modules(), *filler])
    upstream = UpstreamFixture(root)
    sumdb = SumDBFixture(gosumdb_binary, SUMDB_NAME, root)
    storage = str(tmp_path / "storage")
    args = ["--go-upstream", upstream.url, "--go-sumdb", f"{SUMDB_NAME}={sumdb.url}"]
    sumdb_path = f"/goproxy/sumdb/{SUMDB_NAME}"
    try:
        daemon = start(storage, *args)
        daemons.append(daemon)
        proxy = f"{daemon.url}/goproxy"
        project = tmp_path / "project"
        project.mkdir()
        (project / "go.mod").write_text("module example.com/project\n\ngo 1.19\n")
        direct: dict[str, dict[str, Any]] = {}
        lookups: dict[str, tuple[int, int]] = {}
        # Records 0 to 199 are others'; the first modules are published
        # (records 200 to 202) and CI builds them through the cache with
        # go.sum (the cache looks them up itself: a tree of 203). Then 100
        # more records, the second modules (303 to 305), and CI again: a
        # tree of 306.
        for before, some in [(filler[:200], first), (filler[200:], second)]:
            for mv in before:
                assert request(sumdb.url, f"/lookup/{FILLER}@{mv.version}")[0] == 200
            direct.update(download(str(tmp_path / "direct"), upstream.url, sumdb.gosumdb, some))
            (project / "go.sum").write_text(go_sum(direct))
            ci = go(str(tmp_path / "ci"), "mod", "download", "-json", *some, cwd=str(project),
                    GOPROXY=proxy, GOSUMDB=sumdb.vkey)
            assert ci.returncode == 0, ci.stderr
            # No client asked the database anything (but this test).
            assert daemon.log().count(f"GET {sumdb_path}/") == len(lookups)
            for key in some:
                path, version = key.split("@")
                status, _, body = request(daemon.url, f"{sumdb_path}/lookup/{escape(path)}@{escape(version)}")
                assert status == 200
                lookups[key] = parse_lookup(body)
        assert "unverified" not in daemon.log()
        assert sorted(lookups.values()) == [(200, 203), (201, 203), (202, 203), (303, 306), (304, 306), (305, 306)]
        # Fetched ahead: the first lookups' tile in their own tree, then
        # the tiles of both trees' lookups in the larger.
        places = set().union(*(lookup_places(record, tree) for record, tree in lookups.values()))
        larger = {tile.path() for tile in client_tiles(places, 306)}
        assert larger == {"tile/8/0/000", "tile/8/1/000.p/1", "tile/8/0/001.p/50"}
        ahead = larger | {"tile/8/0/000.p/203"}
        deadline = time.monotonic() + 30
        while prefetched_tiles(daemon) < len(ahead) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert prefetched_tiles(daemon) == len(ahead)
    finally:
        upstream.stop()
        sumdb.stop()

    # Offline, restarted: a new machine, no go.sum, an empty module cache.
    daemon = restarted(daemon, storage, args, daemons)
    home = str(tmp_path / "new")
    asked = fresh_client(daemon, home, sumdb, direct)
    # It checked the smaller tree in the larger, with the full first tile.
    assert "tile/8/0/000" in asked and asked <= ahead
    kept = os.path.join(home, "modcache", "cache", "download", "sumdb", SUMDB_NAME)
    assert os.path.exists(os.path.join(kept, "tile", "8", "0", "000"))
    with open(os.path.join(home, "gopath", "pkg", "sumdb", SUMDB_NAME, "latest"), "rb") as f:
        assert tree_size(f.read()) == 306


def test_concurrent_misses_make_one_upstream_request(
    storage: str, upstream: UpstreamFixture, daemons: list[Daemon]
) -> None:
    daemon = start(storage, "--go-upstream", upstream.url, "--go-sumdb", "off")
    daemons.append(daemon)
    path = f"/{GREET}/@v/v1.2.0.zip"
    upstream.delay = 0.5  # all 50 arrive while the first is in flight
    results = concurrent_gets(lambda: request(daemon.url, "/goproxy" + path)[::2], 50)
    assert len(results) == 50
    assert {status for status, _ in results} == {200}
    assert len({body for _, body in results}) == 1
    assert upstream.count(path) == 1


def test_unreachable_default_sumdb_stores_unverified_and_warns_once(
    tmp_path: Any, storage: str, upstream: UpstreamFixture, daemons: list[Daemon]
) -> None:
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    # No --go-sumdb: the default comes from go env GOSUMDB.
    daemon = start(
        storage, "--go-upstream", upstream.url, "--workers", "1",  # the warning is once per process
        env={"GOSUMDB": f"unreachable.test+00000000+AAAA http://127.0.0.1:{closed}"},
    )
    daemons.append(daemon)
    download(str(tmp_path / "client"), f"{daemon.url}/goproxy")
    assert request(daemon.url, "/goproxy/sumdb/unreachable.test/supported")[0] == 200
    assert daemon.terminate() == 0
    assert daemon.output.decode().count("checksum database unreachable.test is unreachable") == 1


def test_checksum_mismatch_is_refused_and_not_stored(
    tmp_path: Any, storage: str, tree: str, sumdb: SumDBFixture, daemons: list[Daemon]
) -> None:
    # Upstream serves a zip that differs from what the database recorded.
    tampered = str(tmp_path / "tampered")
    shutil.copytree(tree, tampered)
    greet = next(mv for mv in modules() if mv.path == GREET and mv.version == "v1.0.0")
    zip_path = os.path.join(tampered, *escape(GREET).split("/"), "@v", "v1.0.0.zip")
    write_zip(zip_path, greet, {"backdoor.go": "package greet\n"})
    with open(zip_path, "rb") as f:
        tampered_hash = blake3.blake3(f.read()).hexdigest()
    evil = UpstreamFixture(tampered)
    try:
        daemon = start(storage, "--go-upstream", evil.url, "--go-sumdb", f"{SUMDB_NAME}={sumdb.url}")
        daemons.append(daemon)
        path = f"/goproxy/{GREET}/@v/v1.0.0.zip"
        for attempt in (1, 2):
            status, headers, body = request(daemon.url, path)
            assert status == 502
            assert headers["content-type"] == "text/plain; charset=utf-8"
            assert b"checksum mismatch" in body
            assert tampered_hash not in blob_hashes(storage)
            assert evil.count(path.removeprefix("/goproxy")) == attempt  # refetched, refused again
        assert "CHECKSUM MISMATCH" in daemon.log()
        assert os.listdir(os.path.join(storage, "tmp")) == []
        # The untampered go.mod of the same version is fine.
        assert request(daemon.url, f"/goproxy/{GREET}/@v/v1.0.0.mod")[0] == 200
    finally:
        evil.stop()


def test_zip_breaking_the_rules_is_refused(
    tmp_path: Any, storage: str, tree: str, daemons: list[Daemon]
) -> None:
    bad = str(tmp_path / "bad")
    shutil.copytree(tree, bad)
    zip_path = os.path.join(bad, *escape(GREET).split("/"), "@v", "v1.2.0.zip")
    import zipfile

    with zipfile.ZipFile(zip_path, "w") as z:
        z.writestr(f"{GREET}@v1.2.0/go.mod", "module example.com/greet\n")
        z.writestr(f"{GREET}@v1.2.0/README", "a")
        z.writestr(f"{GREET}@v1.2.0/readme", "b")  # collides under case folding
    evil = UpstreamFixture(bad)
    try:
        daemon = start(storage, "--go-upstream", evil.url, "--go-sumdb", "off")
        daemons.append(daemon)
        status, _, body = request(daemon.url, f"/goproxy/{GREET}/@v/v1.2.0.zip")
        assert status == 502
        assert b"differ only in case" in body
        assert blob_hashes(storage) == set()
    finally:
        evil.stop()


def test_stalled_upstream_times_out_and_leaves_nothing(
    storage: str, upstream: UpstreamFixture, daemons: list[Daemon]
) -> None:
    daemon = start(storage, "--go-upstream", upstream.url, "--go-sumdb", "off", "--idle-timeout", "1s")
    daemons.append(daemon)
    path = f"/{HELLO}/@v/v1.0.0.zip"
    upstream.stall.add(path)
    started = time.monotonic()
    status, _, body = request(daemon.url, "/goproxy" + path)
    assert status == 504
    assert b"upstream timeout" in body
    assert time.monotonic() - started < 10
    assert blob_hashes(storage) == set()
    assert os.listdir(os.path.join(storage, "tmp")) == []

    upstream.stall.clear()
    status, _, body = request(daemon.url, "/goproxy" + path)
    assert status == 200 and body[:2] == b"PK"
    assert upstream.count(path) == 2


HOSTILE = [
    "/goproxy/example.com/../../etc/passwd/@v/list",
    "/goproxy/%2e%2e/%2e%2e/etc/passwd",
    "/goproxy/example.com%2fgreet/@v/list",
    "/goproxy/example.com/greet/@v/v1.0.0%00.zip",
    "/goproxy/example.com/" + "a" * 10_000 + "/@v/list",
    "/goproxy/example.com/Upper/Case/@v/list",
    "/goproxy/example.com/greet/@v/V1.0.0.zip",
    "/goproxy/example.com/greet/@v/v1.0.0.exe",
    "/goproxy/example.com/greet/@v/master.zip",
    "/goproxy/noDot/@v/list",
    "/goproxy/example.com/!/@v/list",
    "/goproxy/sumdb/sum.test/lookup/../../etc/passwd",
    "/goproxy/sumdb/sum.test/tile/../../x",
    "/goproxy/",
]


def test_hostile_paths_are_404(
    storage: str, upstream: UpstreamFixture, daemons: list[Daemon]
) -> None:
    daemon = start(storage, "--go-upstream", upstream.url, "--go-sumdb", "off")
    daemons.append(daemon)
    for path in HOSTILE:
        status, headers, body = request(daemon.url, path)
        assert status == 404, (path, body)
        assert headers["content-type"] == "text/plain; charset=utf-8"
        assert body.count(b"\n") == 1
        assert request(daemon.url, f"/goproxy/{GREET}/@v/list")[0] == 200


def test_upstream_404_is_404_and_remembered(
    storage: str, upstream: UpstreamFixture, daemons: list[Daemon]
) -> None:
    # A 404 is remembered by the process that saw it: one worker here.
    daemon = start(storage, "--go-upstream", upstream.url, "--go-sumdb", "off", "--workers", "1")
    daemons.append(daemon)
    for _ in range(3):
        status, _, body = request(daemon.url, "/goproxy/example.com/@v/list")
        assert status == 404 and body.startswith(b"not found")
    assert upstream.count("/example.com/@v/list") == 1
    upstream.override[f"/{GREET}/@v/v1.0.0.info"] = (410, b"gone\n")
    assert request(daemon.url, f"/goproxy/{GREET}/@v/v1.0.0.info")[0] == 404


def test_an_upstream_304_to_an_unconditional_request_is_502(
    storage: str, upstream: UpstreamFixture, daemons: list[Daemon]
) -> None:
    # As for npm: upstream's mistake, said in a sentence (it was a 500).
    daemon = start(storage, "--go-upstream", upstream.url, "--go-sumdb", "off")
    daemons.append(daemon)
    upstream.override[f"/{GREET}/@v/v1.0.0.zip"] = (304, b"")
    status, headers, body = request(daemon.url, f"/goproxy/{GREET}/@v/v1.0.0.zip")
    assert status == 502 and headers["content-type"] == "text/plain; charset=utf-8"
    assert body == (b"upstream failure: upstream answered 304 to an unconditional request for "
                    b"example.com/greet/@v/v1.0.0.zip\n")


def test_stale_if_error_and_502_without_a_copy(
    storage: str, upstream: UpstreamFixture, daemons: list[Daemon]
) -> None:
    # Revalidated before every answer (never in the background): stale only if upstream fails.
    daemon = start(storage, "--go-upstream", upstream.url, "--go-sumdb", "off", "--go-metadata-ttl", "0s",
                   "--stale-while-revalidate", "0")
    daemons.append(daemon)
    status, headers, body = request(daemon.url, f"/goproxy/{GREET}/@v/list")
    assert status == 200 and headers["x-cache"] == "MISS"
    status, headers, _ = request(daemon.url, f"/goproxy/{GREET}/@latest")
    assert status == 200
    upstream.override[f"/{GREET}/@v/list"] = (500, b"broken\n")
    status, headers, stale = request(daemon.url, f"/goproxy/{GREET}/@v/list")
    assert status == 200 and stale == body
    assert headers["x-cache"] == "STALE" and "Revalidation Failed" in headers["warning"]

    upstream.stop()
    status, headers, _ = request(daemon.url, f"/goproxy/{GREET}/@latest")
    assert status == 200 and headers["x-cache"] == "STALE"
    status, headers, body = request(daemon.url, f"/goproxy/{HELLO}/@v/v1.0.0.info")
    assert status == 502
    assert headers["content-type"] == "text/plain; charset=utf-8"
    assert body.startswith(b"upstream failure")


def test_list_from_cache_when_upstream_never_answered(
    storage: str, upstream: UpstreamFixture, daemons: list[Daemon]
) -> None:
    daemon = start(storage, "--go-upstream", upstream.url, "--go-sumdb", "off")
    daemons.append(daemon)
    for version in ("v1.0.0", "v1.2.0"):
        assert request(daemon.url, f"/goproxy/{GREET}/@v/{version}.mod")[0] == 200
    upstream.stop()
    status, headers, body = request(daemon.url, f"/goproxy/{GREET}/@v/list")
    assert status == 200
    assert body == b"v1.0.0\nv1.2.0\n"
    assert headers["x-cache"] == "STALE"


def test_upstream_from_go_env(
    tmp_path: Any, storage: str, upstream: UpstreamFixture, daemons: list[Daemon]
) -> None:
    daemon = start(storage, env={"GOPROXY": f"{upstream.url},direct", "GOSUMDB": "off"})
    daemons.append(daemon)
    assert request(daemon.url, f"/goproxy/{GREET}/@v/list")[0] == 200
    assert upstream.count(f"/{GREET}/@v/list") == 1
    assert "from go env GOPROXY" in daemon.log()


def test_go_env_pointing_at_the_daemon_is_refused(tmp_path: Any, storage: str) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    process = subprocess.run(
        [TWISTD, "-n", "--pidfile=", "contentcache", "--port", f"tcp:{port}:interface=127.0.0.1",
         "--storage", storage],
        env={**os.environ, "GOPROXY": f"http://localhost:{port}/goproxy,direct", "GOSUMDB": "off"},
        capture_output=True,
        timeout=60,
    )
    assert process.returncode != 0
    output = (process.stdout + process.stderr).decode()
    assert "points at this daemon; pass --go-upstream" in output
    assert "Traceback" not in output


def test_cache_only_without_any_upstream(
    storage: str, upstream: UpstreamFixture, daemons: list[Daemon]
) -> None:
    daemon = start(storage)  # GOPROXY=off in the daemon's environment
    daemons.append(daemon)
    assert "serves only what is cached" in daemon.log()
    status, _, body = request(daemon.url, f"/goproxy/{GREET}/@v/v1.0.0.info")
    assert status == 404
    assert upstream.count(f"/{GREET}/@v/v1.0.0.info") == 0
