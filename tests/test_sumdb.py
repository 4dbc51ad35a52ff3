"""
Checksum-database tiles answered from the tiles the cache holds: a partial
tile cut from a wider one at the same coordinates, and the tiles that
prove a stored lookup fetched ahead of the go clients, through the GOPROXY
resource, with a scripted checksum database upstream.
"""

from __future__ import annotations

import base64
import hashlib
import itertools
import random
import subprocess
from types import SimpleNamespace
from typing import Any, Iterator

import pytest
from treq.testing import StubTreq
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.logger import LogLevel, globalLogPublisher
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from contentcache import metrics
from contentcache import upstream as upstream_module
from contentcache.backend import StorageUnavailable
from contentcache.cache import STOP_PATIENCE, Background, ProtocolCache
from contentcache.index import SQLiteIndex
from contentcache.pool import SynchronousRunner
from contentcache.protocol.goproxy import resource
from contentcache.protocol.goproxy.paths import Module, Version
from contentcache.protocol.goproxy.resource import PREFETCH_FETCHES, PREFETCH_INTERVAL, PREFETCH_RETRY, GoProxy, GoProxyResource
from contentcache.protocol.goproxy.sumdb import (
    GO_TILE_HEIGHT, MAX_TREE_SIZE, InvalidSumDB, SumDB, Tile, client_tiles, lookup_places, parse_lookup,
    parse_tile, proof_tiles, tile_prefix, tree_hash_tiles,
)
from contentcache.space import StorageFull
from contentcache.store import Spool, Store
from contentcache.upstream import NegativeCache, Upstream

from .conftest import resolve
from .gomodules import build_go_program

NAME = "sum.test"
HASH = 32


def hashes(count: int, seed: int = 0) -> bytes:
    """
    C{count} distinct 32-byte "hashes", the same for the same seed.
    """
    return b"".join(bytes([(seed + i) % 256]) * HASH for i in range(count))


def records(start: int, count: int) -> bytes:
    """
    A data tile's records as the sumdb server writes them (id, the go.sum
    lines, a blank line).
    """
    return b"".join(
        b"%d\nexample.com/m%d v1.0.0 h1:zip%d=\nexample.com/m%d v1.0.0/go.mod h1:mod%d=\n\n" % ((start + i,) + (i,) * 4)
        for i in range(count)
    )


class Database(Resource):
    """
    The checksum database upstream: what it serves by path, the requests
    it saw, and whether it is gone (every request a 503). With C{hold},
    tile requests wait in C{held} until L{release}.
    """

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.files: dict[str, bytes] = {}
        self.requests: list[str] = []
        self.gone = False
        self.hold = False
        self.held: list[Request] = []

    def render_GET(self, request: Request) -> bytes | int:
        path = request.path.decode()
        self.requests.append(path)
        if self.hold and path.startswith("/tile/"):
            self.held.append(request)
            return NOT_DONE_YET
        return self._answer(request, path)

    def release(self) -> None:
        held, self.held = self.held, []
        for request in held:
            request.write(self._answer(request, request.path.decode()))
            request.finish()

    def _answer(self, request: Request, path: str) -> bytes:
        if self.gone:
            request.setResponseCode(503)
            return b"gone\n"
        if path not in self.files:
            request.setResponseCode(404)
            return b"not found\n"
        request.setHeader(b"content-type", b"application/octet-stream")
        return self.files[path]


class Requests(GoProxyResource):
    """
    The GOPROXY resource, keeping the requests it was given.
    """

    def __init__(self, proxy: GoProxy) -> None:
        super().__init__(proxy)
        self.seen: list[Request] = []

    def render(self, request: Request) -> object:
        self.seen.append(request)
        return super().render(request)


class Harness:
    def __init__(self, store: Store, index: SQLiteIndex, disk: SynchronousRunner, clock: Clock) -> None:
        self.database = Database()
        self._upstream_client = StubTreq(self.database)
        upstream = Upstream("http://sumdb.test", self._upstream_client, clock)  # type: ignore[arg-type]
        # The daemon's caches share one, stopped with the daemon.
        self.background = Background(clock)
        self.proxy = GoProxy(
            store,
            ProtocolCache("go", index, store, clock, NegativeCache(clock, 60), background=self.background),
            ProtocolCache("gosumdb", index, store, clock, NegativeCache(clock, 60), background=self.background),
            disk,
            clock,
            None,
            sumdbs={NAME: (SumDB(NAME, "http://sumdb.test"), upstream)},
            verifier=NAME,
        )
        self.resource = Requests(self.proxy)
        self._client = StubTreq(self.resource)

    def get(self, tile: str) -> tuple[int, str | None, bytes]:
        """
        GET C{/sumdb/sum.test/tile/<tile>}: the status, X-Cache, the body.
        """
        return self.get_path(f"tile/{tile}")

    def get_path(self, path: str) -> tuple[int, str | None, bytes]:
        return self.get_url(f"sumdb/{NAME}/{path}")

    def get_url(self, path: str) -> tuple[int, str | None, bytes]:
        """
        GET C{/<path>} of the GOPROXY resource, the database answering
        what it is asked on the way (tiles fetched ahead too, unless held).
        """
        return self.finish(self.start(path))

    def start(self, path: str) -> Deferred[Any]:
        """
        Send GET C{/<path>}, not waiting for the answer (L{finish}).
        """
        return self._client.get(f"http://cache.test/{path}")

    def finish(self, d: Deferred[Any]) -> tuple[int, str | None, bytes]:
        """
        The status, X-Cache and body of the answer to a request sent.
        """
        answered: list[bool] = []

        def answer(result: object) -> object:
            answered.append(True)
            return result

        d.addBoth(answer)
        for _ in range(100):
            if answered:
                break
            self.flush()
        response = resolve(d)
        content = response.content()
        self._client.flush()
        result = response.code, (response.headers.getRawHeaders("x-cache") or [None])[0], resolve(content)
        self.flush()
        return result

    def flush(self) -> None:
        for _ in range(20):
            self._upstream_client.flush()
            self._client.flush()

    def upstream_asked(self, tile: str) -> int:
        return self.database.requests.count(f"/tile/{tile}")


@pytest.fixture
def harness(store: Store, index: SQLiteIndex, disk: SynchronousRunner, clock: Clock) -> Harness:
    return Harness(store, index, disk, clock)


def derived(kind: str = "hash") -> float:
    value = metrics.REGISTRY.get_sample_value("contentcache_sumdb_derived_tiles_total", {"kind": kind})
    assert value is not None  # the series exists from the start
    return value


def test_a_partial_tile_is_cut_from_a_wider_one_and_kept(harness: Harness) -> None:
    harness.database.files["/tile/8/0/000.p/7"] = hashes(7)
    assert harness.get("8/0/000.p/7") == (200, "MISS", hashes(7))
    before = derived()

    # The tree the client checks has 3 records: the first 3 hashes, never
    # asked of the database (it is gone now).
    harness.database.gone = True
    assert harness.get("8/0/000.p/3") == (200, "HIT", hashes(3))
    assert harness.upstream_asked("8/0/000.p/3") == 0
    assert derived() == before + 1
    # Kept as an entry of its own: the next request is a plain hit.
    entry = resolve(harness.proxy.sumdb_cache.lookup(f"{NAME}/tile/8/0/000.p/3"))
    assert entry is not None and entry.attrs["derived_from"] == "tile/8/0/000.p/7"
    assert entry.size == 3 * HASH
    assert harness.get("8/0/000.p/3") == (200, "HIT", hashes(3))
    assert derived() == before + 1


def test_derived_before_upstream_is_asked(harness: Harness) -> None:
    # The database would answer, with the same bytes: it is not asked.
    harness.database.files["/tile/8/0/000.p/9"] = hashes(9)
    harness.database.files["/tile/8/0/000.p/4"] = hashes(4)
    harness.get("8/0/000.p/9")
    assert harness.get("8/0/000.p/4") == (200, "HIT", hashes(4))
    assert harness.upstream_asked("8/0/000.p/4") == 0


def test_cut_from_the_full_tile_and_from_the_widest_held(harness: Harness) -> None:
    full = hashes(256, seed=5)
    harness.database.files["/tile/8/1/x001/234"] = full
    harness.database.files["/tile/8/1/x001/234.p/200"] = full[:200 * HASH]
    harness.get("8/1/x001/234.p/200")
    harness.get("8/1/x001/234")
    harness.database.gone = True
    status, outcome, body = harness.get("8/1/x001/234.p/255")
    assert (status, outcome, body) == (200, "HIT", full[:255 * HASH])
    entry = resolve(harness.proxy.sumdb_cache.lookup(f"{NAME}/tile/8/1/x001/234.p/255"))
    assert entry is not None and entry.attrs["derived_from"] == "tile/8/1/x001/234"


def test_data_tiles_are_cut_at_record_boundaries(harness: Harness) -> None:
    harness.database.files["/tile/8/data/000.p/5"] = records(0, 5)
    harness.get("8/data/000.p/5")
    before = derived("data")
    harness.database.gone = True
    assert harness.get("8/data/000.p/2") == (200, "HIT", records(0, 2))
    assert harness.get("8/data/000.p/4") == (200, "HIT", records(0, 4))
    assert derived("data") == before + 2


@pytest.mark.parametrize(
    "held, held_tile, wanted",
    [
        # Shorter than the wanted tile: never served.
        (hashes(2), "8/0/000.p/7", "8/0/000.p/3"),
        # Long enough for the wanted tile, yet not a tile of its own width.
        (hashes(6), "8/0/000.p/7", "8/0/000.p/3"),
        (hashes(7) + b"x", "8/0/000.p/7", "8/0/000.p/3"),
        (b"", "8/0/000", "8/0/000.p/3"),
        # Narrower than the wanted tile.
        (hashes(2), "8/0/000.p/2", "8/0/000.p/3"),
        # Other coordinates: another N, another level, another height.
        (hashes(7), "8/0/001.p/7", "8/0/000.p/3"),
        (hashes(7), "8/1/000.p/7", "8/0/000.p/3"),
        (hashes(16), "4/0/000", "8/0/000.p/3"),
        (hashes(7), "8/0/x001/000.p/7", "8/0/000.p/3"),
        # Data tiles: records, not hashes, at the same N.
        (records(0, 7), "8/data/000.p/7", "8/0/000.p/3"),
        (hashes(7), "8/0/000.p/7", "8/data/000.p/3"),
        # A data tile holding fewer records than its width, or more, or a
        # record that does not end.
        (records(0, 6), "8/data/000.p/7", "8/data/000.p/3"),
        (records(0, 8), "8/data/000.p/7", "8/data/000.p/3"),
        (records(0, 7)[:-1], "8/data/000.p/7", "8/data/000.p/3"),
        # Framing that cannot be told apart: a record text opening with a
        # newline.
        (records(0, 6) + b"6\n\nexample.com/x v1.0.0 h1:x=\n\n", "8/data/000.p/7", "8/data/000.p/3"),
    ],
)
def test_what_is_not_a_wider_tile_is_never_used(
    harness: Harness, held: bytes, held_tile: str, wanted: str
) -> None:
    harness.database.files[f"/tile/{held_tile}"] = held
    assert harness.get(held_tile)[0] == 200
    before = derived("data") + derived("hash")
    # The database would answer: the request goes there, and gets its bytes.
    harness.database.files[f"/tile/{wanted}"] = b"from upstream"
    assert harness.get(wanted) == (200, "MISS", b"from upstream")
    assert harness.upstream_asked(wanted) == 1
    assert derived("data") + derived("hash") == before


def test_a_bad_held_tile_without_upstream_is_a_502_not_its_bytes(harness: Harness) -> None:
    harness.database.files["/tile/8/0/000.p/7"] = hashes(2)  # short
    harness.get("8/0/000.p/7")
    harness.database.gone = True
    status, _, body = harness.get("8/0/000.p/3")
    assert status == 502
    assert body.startswith(b"upstream failure")
    assert resolve(harness.proxy.sumdb_cache.lookup(f"{NAME}/tile/8/0/000.p/3")) is None


def test_a_bad_widest_tile_gives_way_to_the_next(harness: Harness) -> None:
    harness.database.files["/tile/8/0/000.p/9"] = hashes(8)  # one hash short
    harness.database.files["/tile/8/0/000.p/6"] = hashes(6)
    harness.get("8/0/000.p/9")
    harness.get("8/0/000.p/6")
    harness.database.gone = True
    assert harness.get("8/0/000.p/5") == (200, "HIT", hashes(5))
    entry = resolve(harness.proxy.sumdb_cache.lookup(f"{NAME}/tile/8/0/000.p/5"))
    assert entry is not None and entry.attrs["derived_from"] == "tile/8/0/000.p/6"


def test_a_held_tile_whose_blob_is_gone_is_forgotten(harness: Harness, store: Store) -> None:
    harness.database.files["/tile/8/0/000.p/7"] = hashes(7)
    harness.get("8/0/000.p/7")
    entry = resolve(harness.proxy.sumdb_cache.lookup(f"{NAME}/tile/8/0/000.p/7"))
    assert entry is not None
    harness.proxy.sumdb_cache.hot.drop_blob(entry.hash)
    resolve(store.delete(entry.hash))
    harness.database.files["/tile/8/0/000.p/3"] = hashes(3)
    assert harness.get("8/0/000.p/3") == (200, "MISS", hashes(3))
    assert resolve(harness.proxy.sumdb_cache.lookup(f"{NAME}/tile/8/0/000.p/7")) is None


def test_latest_is_served_stale_when_the_database_is_gone(harness: Harness) -> None:
    note = b"go.sum database tree\n7\nhash=\n\n- sum.test sig\n"
    harness.database.files["/latest"] = note
    harness.proxy.metadata_ttl = 0  # revalidated on every request
    assert harness.get_path("latest") == (200, "MISS", note)
    harness.database.gone = True
    assert harness.get_path("latest") == (200, "STALE", note)


def test_a_partial_tile_missing_upstream_is_cut_from_the_full_one_held_since(harness: Harness) -> None:
    # The tile is complete: the database keeps only the full one, and the
    # go command asks for that one when the partial one is missing.
    harness.database.files["/tile/8/0/000"] = hashes(256)
    assert harness.get("8/0/000.p/200")[0] == 404
    assert harness.get("8/0/000") == (200, "MISS", hashes(256))
    # Its miss remembered, yet the tile is cut from the full one now.
    harness.database.gone = True
    assert harness.get("8/0/000.p/200") == (200, "HIT", hashes(200))
    assert harness.upstream_asked("8/0/000.p/200") == 1


def test_a_cut_is_counted_once_however_many_clients_wait_for_it(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    harness.database.files["/tile/8/0/000.p/7"] = hashes(7)
    harness.get("8/0/000.p/7")
    gate: Deferred[None] = Deferred()
    cut = GoProxy._derived_tile

    async def slow(self: GoProxy, name: str, tile: Tile) -> Any:
        await gate
        return await cut(self, name, tile)

    monkeypatch.setattr(GoProxy, "_derived_tile", slow)
    before = derived()
    # Two clients ask at once: the second waits for the first one's cut.
    waiting = [harness.start(f"sumdb/{NAME}/tile/8/0/000.p/3") for _ in range(2)]
    harness.flush()
    gate.callback(None)
    for d in waiting:
        assert harness.finish(d) == (200, "HIT", hashes(3))
    assert derived() == before + 1


class Searched(bytes):
    """
    Bytes that count the searches made in them.
    """

    searches = 0

    def find(self, *args: Any) -> int:
        self.searches += 1
        return super().find(*args)


def test_a_data_tile_is_read_no_further_than_its_width() -> None:
    # Far more records than the tile's width: not a tile of that width,
    # found out at the record past it.
    held = Searched(records(0, 7) + records(7, 50_000))
    assert tile_prefix(held, 7, 3, True) is None
    assert held.searches == 7  # its own records, no further
    held = Searched(records(0, 7))
    assert tile_prefix(held, 7, 3, True) == len(records(0, 3))


@pytest.mark.parametrize(
    "held, held_tile, wanted",
    [
        # Hashes past the tile's width.
        (hashes(7) * 2000, "8/0/000.p/7", "8/0/000.p/3"),
        # Seven records, too long to be the database's.
        (b"".join(b"%d\nexample.com/m%s v1.0.0 h1:x=\n\n" % (i, b"x" * 40_000) for i in range(7)),
         "8/data/000.p/7", "8/data/000.p/3"),
    ],
)
def test_a_held_tile_larger_than_its_width_allows_is_not_read(
    harness: Harness, monkeypatch: pytest.MonkeyPatch, warnings: list[str], held: bytes, held_tile: str, wanted: str
) -> None:
    harness.database.files[f"/tile/{held_tile}"] = held
    assert harness.get(held_tile)[0] == 200
    read = []
    whole = resource.read_blob

    async def reading(store: Store, blob: Any, limit: int) -> bytes:
        read.append(blob)
        return await whole(store, blob, limit)

    monkeypatch.setattr(resource, "read_blob", reading)
    harness.database.files[f"/tile/{wanted}"] = b"from upstream"
    assert harness.get(wanted) == (200, "MISS", b"from upstream")
    assert read == []
    assert warnings == [
        f"{NAME} tile/{held_tile} as cached ({len(held)} bytes) is not a tile of width 7; not used for tile/{wanted}"
    ]


def lookup_answer(record: int, size: int, module: str = "example.com/m", version: str = "v1.0.0",
                  mod_h1: str = "h1:mod=") -> bytes:
    """
    A C{lookup} answer as the sumdb server writes it: the record number,
    its go.sum lines, a blank line, the signed note of a tree of C{size}.
    """
    return (
        f"{record}\n{module} {version} h1:zip=\n{module} {version}/go.mod {mod_h1}\n\n"
        f"go.sum database tree\n{size}\nhash=\n\n\u2014 {NAME} sig\n"
    ).encode()


def h1_of_go_mod(go_mod: bytes) -> str:
    """
    The go.sum hash of a go.mod file (dirhash Hash1 of one file named go.mod).
    """
    line = b"%s  go.mod\n" % hashlib.sha256(go_mod).hexdigest().encode()
    return "h1:" + base64.b64encode(hashlib.sha256(line).digest()).decode()


def prefetched() -> float:
    value = metrics.REGISTRY.get_sample_value("contentcache_sumdb_prefetched_tiles_total")
    assert value is not None  # the series exists from the start
    return value


@pytest.fixture
def warnings() -> Iterator[list[str]]:
    """
    The text of every warning logged during the test.
    """
    said: list[str] = []

    def observe(event: dict[str, Any]) -> None:
        if event.get("log_level") == LogLevel.warn:
            said.append(event["log_format"].format(**event))

    globalLogPublisher.addObserver(observe)
    yield said
    globalLogPublisher.removeObserver(observe)


#: Record 200 of a tree of 300: the full first tile holds its hash, the
#: first tile of level 1 and the partial second tile of level 0 (records
#: 256 to 299) make the tree's hash.
PROOF_200_OF_300 = ["8/1/000.p/1", "8/0/001.p/44", "8/0/000"]


def test_the_tiles_that_prove_a_stored_lookup_are_fetched_ahead(harness: Harness) -> None:
    harness.database.files["/lookup/example.com/m@v1.0.0"] = lookup_answer(200, 300)
    harness.database.files["/lookup/example.com/n@v1.0.0"] = lookup_answer(201, 300, "example.com/n")
    tiles = {"8/1/000.p/1": hashes(1), "8/0/001.p/44": hashes(44, 1), "8/0/000": hashes(256, 2)}
    for tile, body in tiles.items():
        harness.database.files[f"/tile/{tile}"] = body
    before = prefetched()

    # A go client looks the module up (or the cache does, to verify a
    # download): the answer, then the tiles, each asked for once.
    assert harness.get_path("lookup/example.com/m@v1.0.0") == (200, "MISS", lookup_answer(200, 300))
    assert [harness.upstream_asked(tile) for tile in PROOF_200_OF_300] == [1, 1, 1]
    assert prefetched() == before + 3
    # Another record of the same tree: nothing more to fetch.
    assert harness.get_path("lookup/example.com/n@v1.0.0")[0] == 200
    assert [harness.upstream_asked(tile) for tile in PROOF_200_OF_300] == [1, 1, 1]
    assert prefetched() == before + 3

    # The database gone: a new go client's tiles, from the cache.
    harness.database.gone = True
    for tile, body in tiles.items():
        assert harness.get(tile) == (200, "HIT", body)
    # A lookup answered from the cache again fetches nothing.
    assert harness.get_path("lookup/example.com/m@v1.0.0") == (200, "HIT", lookup_answer(200, 300))
    assert len(harness.database.requests) == 5


def test_a_tile_held_wider_is_not_fetched_ahead(harness: Harness) -> None:
    # A client asked for the grown tree's tile; a lookup stored now names
    # an older tree (the database answered it from a lagging replica).
    harness.database.files["/tile/8/0/000.p/9"] = hashes(9)
    harness.get("8/0/000.p/9")
    harness.database.files["/lookup/example.com/m@v1.0.0"] = lookup_answer(3, 6)
    before, derived_before = prefetched(), derived()
    assert harness.get_path("lookup/example.com/m@v1.0.0")[0] == 200
    assert harness.upstream_asked("8/0/000.p/6") == 0
    assert (prefetched(), derived()) == (before, derived_before)
    # Cut when a client asks for it.
    harness.database.gone = True
    assert harness.get("8/0/000.p/6") == (200, "HIT", hashes(6))
    assert derived() == derived_before + 1


def test_a_verified_download_fetches_its_tiles_ahead(harness: Harness, clock: Clock) -> None:
    # The cache looks a download up itself (a client with go.sum asks the
    # database nothing): the tiles of that lookup come too.
    go_mod = b"module example.com/m\n"
    harness.proxy.upstream = Upstream("http://proxy.test", harness._upstream_client, clock)  # type: ignore[arg-type]
    harness.database.files["/example.com/m/@v/v1.0.0.mod"] = go_mod
    harness.database.files["/lookup/example.com/m@v1.0.0"] = lookup_answer(200, 300, mod_h1=h1_of_go_mod(go_mod))
    for tile in PROOF_200_OF_300:
        harness.database.files[f"/tile/{tile}"] = b"tile " + tile.encode()
    assert harness.get_url("example.com/m/@v/v1.0.0.mod") == (200, "MISS", go_mod)
    entry = resolve(harness.proxy.cache.lookup("example.com/m/@v/v1.0.0.mod"))
    assert entry is not None and entry.attrs["verified"] is True
    assert [harness.upstream_asked(tile) for tile in PROOF_200_OF_300] == [1, 1, 1]


def test_a_download_refused_for_a_checksum_mismatch_fetches_no_tiles(harness: Harness, clock: Clock) -> None:
    harness.proxy.upstream = Upstream("http://proxy.test", harness._upstream_client, clock)  # type: ignore[arg-type]
    harness.database.files["/example.com/m/@v/v1.0.0.mod"] = b"module example.com/m\n"
    harness.database.files["/lookup/example.com/m@v1.0.0"] = lookup_answer(
        200, 300, mod_h1=h1_of_go_mod(b"module example.com/other\n")
    )
    for tile in PROOF_200_OF_300:
        harness.database.files[f"/tile/{tile}"] = b"tile " + tile.encode()
    assert harness.get_url("example.com/m/@v/v1.0.0.mod")[0] == 502
    assert not [r for r in harness.database.requests if r.startswith("/tile/")]


def two_lookups(harness: Harness, first_tree: int) -> None:
    """
    A database of 300 records, its tiles, and two lookups: record 200 of a
    tree of C{first_tree}, record 290 of the tree of 300.
    """
    full = hashes(256)
    harness.database.files.update({
        "/tile/8/0/000.p/210": full[:210 * HASH], "/tile/8/0/000": full,
        "/tile/8/1/000.p/1": hashes(1, 7), "/tile/8/0/001.p/44": hashes(44, 9),
        "/lookup/example.com/m@v1.0.0": lookup_answer(200, first_tree),
        "/lookup/example.com/n@v1.0.0": lookup_answer(290, 300, "example.com/n"),
    })


def test_lookups_either_side_of_a_tile_boundary_are_proved_in_the_larger_tree(harness: Harness, clock: Clock) -> None:
    # The database grew past 256 records between two of the cache's
    # lookups: record 200 of a tree of 210, then record 290 of 300.
    two_lookups(harness, first_tree=210)
    assert harness.get_path("lookup/example.com/m@v1.0.0")[0] == 200
    assert harness.get_path("lookup/example.com/n@v1.0.0")[0] == 200
    # The second lookup's round waits for PREFETCH_INTERVAL after the first.
    assert "/tile/8/0/000" not in harness.database.requests
    clock.advance(PREFETCH_INTERVAL)
    assert "/tile/8/0/000" in harness.database.requests

    # A new go client sees both trees, in either order: before it sees the
    # larger, it checks record 200 in the smaller; then each record in the
    # larger, and the smaller tree's hash in the larger (the full first
    # tile, which the smaller tree's own proof does not read).
    harness.database.gone = True
    reads = [*proof_tiles(200, 210), *tree_hash_tiles(210, 300), *proof_tiles(200, 300), *proof_tiles(290, 300)]
    assert "tile/8/0/000" in {tile.path() for tile in reads}
    for tile in reads:
        assert harness.get(tile.path().removeprefix("tile/")) == (200, "HIT", harness.database.files[f"/{tile.path()}"])


def test_lookups_stored_before_are_proved_when_one_is_served(
    harness: Harness, store: Store, index: SQLiteIndex, disk: SynchronousRunner, clock: Clock
) -> None:
    two_lookups(harness, first_tree=210)
    # A lookup stored without its tiles (before they were fetched ahead).
    resolve(harness.proxy.sumdb_lookup(NAME, Module.parse("example.com/m"), Version.parse("v1.0.0"), prefetch=False))
    assert not [r for r in harness.database.requests if r.startswith("/tile/")]
    # Served from the cache: its tiles are fetched now.
    assert harness.get_path("lookup/example.com/m@v1.0.0")[1] == "HIT"
    assert harness.upstream_asked("8/0/000.p/210") == 1

    # The daemon restarted, the database has grown: the lookup the new
    # process stores names the larger tree, and the one it never served
    # is proved in that tree too.
    restarted = Harness(store, index, disk, clock)
    restarted.database.files = harness.database.files
    assert restarted.get_path("lookup/example.com/n@v1.0.0")[1] == "MISS"
    assert restarted.upstream_asked("8/0/000") == 1
    restarted.database.gone = True
    for tile in [*tree_hash_tiles(210, 300), *proof_tiles(200, 300), *proof_tiles(290, 300)]:
        assert restarted.get(tile.path().removeprefix("tile/"))[0] == 200, tile.path()
    # Nothing more to fetch for a lookup served again.
    asked = len(restarted.database.requests)
    assert restarted.get_path("lookup/example.com/m@v1.0.0")[1] == "HIT"
    assert len(restarted.database.requests) == asked


def test_a_prefetch_that_fell_short_is_tried_again_by_a_lookup_served_later(
    harness: Harness, clock: Clock, warnings: list[str]
) -> None:
    harness.database.files["/lookup/example.com/m@v1.0.0"] = lookup_answer(200, 300)
    # The database answers the lookup, not yet its tiles.
    assert harness.get_path("lookup/example.com/m@v1.0.0")[1] == "MISS"
    assert len([w for w in warnings if "prefetch" in w]) == 1
    for tile in PROOF_200_OF_300:
        harness.database.files[f"/tile/{tile}"] = b"tile " + tile.encode()
    asked = len(harness.database.requests)
    clock.advance(PREFETCH_RETRY - 1)
    assert harness.get_path("lookup/example.com/m@v1.0.0")[1] == "HIT"
    assert len(harness.database.requests) == asked  # too soon
    before = prefetched()
    clock.advance(1)
    assert harness.get_path("lookup/example.com/m@v1.0.0")[1] == "HIT"
    assert prefetched() == before + 3
    harness.database.gone = True
    for tile in PROOF_200_OF_300:
        assert harness.get(tile)[:2] == (200, "HIT")


def test_an_answer_never_waits_for_its_tiles_and_few_are_fetched_at_once(harness: Harness) -> None:
    record, size = 0, MAX_TREE_SIZE  # 15 tiles
    tiles = [tile.path().removeprefix("tile/") for tile in proof_tiles(record, size)]
    assert len(tiles) > 2 * PREFETCH_FETCHES
    harness.database.files["/lookup/example.com/m@v1.0.0"] = lookup_answer(record, size)
    for tile in tiles:
        harness.database.files[f"/tile/{tile}"] = b"tile " + tile.encode()
    harness.database.hold = True
    before = prefetched()
    assert harness.get_path("lookup/example.com/m@v1.0.0") == (200, "MISS", lookup_answer(record, size))
    # While the tiles are on their way: a few at a time, in one piece of
    # the daemon's background work (the rest of it is not kept waiting).
    assert len(harness.database.held) == PREFETCH_FETCHES
    assert len(harness.background) == 1
    while harness.database.held:
        harness.database.release()
        harness.flush()
        assert len(harness.database.held) <= PREFETCH_FETCHES
    assert [harness.upstream_asked(tile) for tile in tiles] == [1] * len(tiles)
    assert prefetched() == before + len(tiles)
    assert len(harness.background) == 0


def test_fetching_ahead_ends_with_the_daemon(harness: Harness) -> None:
    harness.database.files["/lookup/example.com/m@v1.0.0"] = lookup_answer(0, MAX_TREE_SIZE)
    for tile in proof_tiles(0, MAX_TREE_SIZE):
        harness.database.files[f"/{tile.path()}"] = b"a tile"
    harness.database.hold = True
    harness.get_path("lookup/example.com/m@v1.0.0")
    assert len(harness.database.held) == PREFETCH_FETCHES
    stopped = harness.background.stopService()
    # What is on its way when the daemon stops may finish; nothing more
    # is asked for.
    assert not stopped.called
    harness.database.release()
    harness.flush()
    assert stopped.called
    assert len([r for r in harness.database.requests if r.startswith("/tile/")]) == PREFETCH_FETCHES
    # Nor by a lookup served while the daemon stops.
    harness.database.files["/lookup/example.com/n@v1.0.0"] = lookup_answer(1, MAX_TREE_SIZE)
    assert harness.get_path("lookup/example.com/n@v1.0.0")[0] == 200
    assert len([r for r in harness.database.requests if r.startswith("/tile/")]) == PREFETCH_FETCHES


def test_fetching_ahead_is_given_up_when_the_daemon_has_waited_enough(harness: Harness, clock: Clock) -> None:
    harness.database.files["/lookup/example.com/m@v1.0.0"] = lookup_answer(0, MAX_TREE_SIZE)
    harness.database.hold = True
    harness.get_path("lookup/example.com/m@v1.0.0")
    stopped = harness.background.stopService()
    clock.advance(STOP_PATIENCE)
    assert stopped.called
    assert len(harness.background) == 0


def test_the_tiles_fetched_ahead_are_no_part_of_the_lookup_request(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A second of upstream time for every request upstream.
    ticks = itertools.count()
    monkeypatch.setattr(upstream_module, "time", SimpleNamespace(monotonic=lambda: float(next(ticks))))
    harness.database.files["/lookup/example.com/m@v1.0.0"] = lookup_answer(200, 300)
    for tile in PROOF_200_OF_300:
        harness.database.files[f"/tile/{tile}"] = b"tile " + tile.encode()
    harness.database.hold = True
    assert harness.get_path("lookup/example.com/m@v1.0.0")[0] == 200
    (request,) = harness.resource.seen
    spent = request.upstream_time[0]  # type: ignore[attr-defined]
    assert spent == 1
    while harness.database.held:
        harness.database.release()
        harness.flush()
    assert [harness.upstream_asked(tile) for tile in PROOF_200_OF_300] == [1, 1, 1]
    # The access log's upstream time of the lookup: its own fetch alone.
    assert request.upstream_time[0] == spent  # type: ignore[attr-defined]


def test_a_tile_a_client_is_fetching_is_not_counted_as_fetched_ahead(harness: Harness) -> None:
    harness.database.files["/lookup/example.com/m@v1.0.0"] = lookup_answer(200, 300)
    for tile in PROOF_200_OF_300:
        harness.database.files[f"/tile/{tile}"] = b"tile " + tile.encode()
    harness.database.hold = True
    client = harness.start(f"sumdb/{NAME}/tile/8/0/000")
    harness.flush()
    assert len(harness.database.held) == 1
    before = prefetched()
    # The prefetch waits for the client's fetch of that tile, and fetches
    # the other two.
    assert harness.get_path("lookup/example.com/m@v1.0.0")[0] == 200
    while harness.database.held:
        harness.database.release()
        harness.flush()
    assert harness.finish(client) == (200, "MISS", b"tile 8/0/000")
    assert [harness.upstream_asked(tile) for tile in PROOF_200_OF_300] == [1, 1, 1]
    assert prefetched() == before + 2


@pytest.mark.parametrize("error, said", [
    (StorageFull("the storage is full (no space left on the device)"), None),
    (StorageUnavailable("The S3 bucket answers 500 to writes."), "The S3 bucket answers 500 to writes."),
])
def test_storage_trouble_while_fetching_ahead_is_said_without_a_traceback(
    harness: Harness, warnings: list[str], monkeypatch: pytest.MonkeyPatch, error: Exception, said: str | None
) -> None:
    harness.database.files["/lookup/example.com/m@v1.0.0"] = lookup_answer(200, 300)
    for tile in PROOF_200_OF_300:
        harness.database.files[f"/tile/{tile}"] = b"tile " + tile.encode()
    harness.database.hold = True
    assert harness.get_path("lookup/example.com/m@v1.0.0")[0] == 200

    async def failing(spool: Spool, expected: Any = None) -> Any:
        await spool.abort()
        raise error

    monkeypatch.setattr(Spool, "commit", failing)
    while harness.database.held:
        harness.database.release()
        harness.flush()
    # (A logged failure would fail the test.) A full storage says so
    # itself, once a minute.
    expected = [] if said is None else [
        f"could not prefetch {NAME} tiles (tile/{tile}: {said}); go clients fetch them when they ask"
        for tile in PROOF_200_OF_300
    ]
    said_here = [w for w in warnings if "prefetch" in w]
    assert len(said_here) == len(expected[:1]) and set(said_here) <= set(expected)


def test_prefetch_failures_are_logged_once_and_never_reach_a_client(
    harness: Harness, warnings: list[str]
) -> None:
    harness.database.files["/lookup/example.com/m@v1.0.0"] = lookup_answer(200, 300)
    harness.database.files["/lookup/example.com/n@v1.0.0"] = lookup_answer(201, 300, "example.com/n")
    # The database answers lookups, but has none of the tiles.
    assert harness.get_path("lookup/example.com/m@v1.0.0") == (200, "MISS", lookup_answer(200, 300))
    assert harness.get_path("lookup/example.com/n@v1.0.0")[0] == 200
    said = [w for w in warnings if "prefetch" in w]
    assert said == [
        f"could not prefetch {NAME} tiles (tile/8/1/000.p/1: the database does not have it); "
        "go clients fetch them when they ask"
    ]
    # A partial tile missing: the full one (complete since) was tried.
    assert harness.upstream_asked("8/0/001.p/44") == 1
    assert harness.upstream_asked("8/0/001") == 1


def test_each_database_says_it_could_not_prefetch(harness: Harness, warnings: list[str]) -> None:
    sumdb, upstream = harness.proxy.sumdbs[NAME]
    harness.proxy.sumdbs["other.test"] = (SumDB("other.test", sumdb.url), upstream)
    harness.database.files["/lookup/example.com/m@v1.0.0"] = lookup_answer(200, 300)
    assert harness.get_path("lookup/example.com/m@v1.0.0")[0] == 200
    assert harness.get_url("sumdb/other.test/lookup/example.com/m@v1.0.0")[0] == 200
    assert [w.split(" tiles ")[0] for w in warnings if "prefetch" in w] == [
        f"could not prefetch {NAME}", "could not prefetch other.test"
    ]


def test_a_lookup_that_names_no_tree_is_answered_without_prefetching(
    harness: Harness, warnings: list[str]
) -> None:
    harness.database.files["/lookup/example.com/m@v1.0.0"] = b"7\nexample.com/m v1.0.0 h1:zip=\n\n"
    assert harness.get_path("lookup/example.com/m@v1.0.0")[0] == 200
    assert harness.get_path("lookup/example.com/m@v1.0.0")[0] == 200
    assert not [r for r in harness.database.requests if r.startswith("/tile/")]
    assert [w for w in warnings if "lookup/" in w] == [
        f"{NAME} lookup/example.com/m@v1.0.0: a lookup answer without a record and a tree note; "
        "no tiles are fetched ahead for it"
    ]


def test_parse_lookup() -> None:
    assert parse_lookup(lookup_answer(200, 300)) == (200, 300)
    assert parse_lookup(lookup_answer(0, MAX_TREE_SIZE)) == (0, MAX_TREE_SIZE)
    for bad in [
        b"",
        b"200\nexample.com/m v1.0.0 h1:zip=\n",  # no note
        lookup_answer(300, 300),  # not in the tree
        lookup_answer(0, MAX_TREE_SIZE + 1),
        lookup_answer(200, 300).replace(b"go.sum database tree", b"another tree"),
        lookup_answer(200, 300).replace(b"\n300\n", b"\n0300\n"),
        lookup_answer(200, 300).replace(b"200\n", b"-200\n", 1),
    ]:
        with pytest.raises(InvalidSumDB):
            parse_lookup(bad)


@pytest.fixture(scope="module")
def tlogtiles(tmp_path_factory: pytest.TempPathFactory) -> str:
    return build_go_program(str(tmp_path_factory.mktemp("tlogtiles")), "tlogtiles")


def test_the_tiles_are_those_tlog_reads(tlogtiles: str) -> None:
    """
    The tiles computed for a record and a tree size are, in order, those
    golang.org/x/mod/sumdb/tlog asks for: every record of every small tree
    at small heights, and records of trees up to the largest tlog handles.
    """
    queries = [(height, record, size) for height in (1, 2, 3, GO_TILE_HEIGHT)
               for size in range(1, 120) for record in range(size)]
    rng = random.Random(15)
    for _ in range(2000):
        size = rng.randrange(1, 1 << rng.choice([10, 20, 30, 40, 62]))
        queries.append((GO_TILE_HEIGHT, rng.randrange(size), size))
    queries += [(GO_TILE_HEIGHT, 0, MAX_TREE_SIZE), (GO_TILE_HEIGHT, MAX_TREE_SIZE - 1, MAX_TREE_SIZE),
                (GO_TILE_HEIGHT, 255, 256), (GO_TILE_HEIGHT, 256, 257), (GO_TILE_HEIGHT, 0, 65536),
                (GO_TILE_HEIGHT, 65535, 65537)]
    out = subprocess.run(
        [tlogtiles], input="".join(f"{h} {r} {n}\n" for h, r, n in queries),
        capture_output=True, text=True, check=True, timeout=120,
    ).stdout.splitlines()
    assert len(out) == len(queries)
    for (height, record, size), expected in zip(queries, out):
        got = " ".join(tile.path() for tile in proof_tiles(record, size, height))
        assert got == expected, (height, record, size)


def test_tree_hashes_are_read_from_the_tiles_tlog_reads(tlogtiles: str) -> None:
    """
    The tiles computed for a tree's hash read in a larger tree are, in
    order, those tlog.TreeHash asks a TileHashReader of the larger tree
    for: every pair of small trees at small heights, and trees up to the
    largest tlog handles.
    """
    queries = [(height, tree, size) for height in (1, 2, 3, GO_TILE_HEIGHT)
               for size in range(1, 70) for tree in range(size + 1)]
    rng = random.Random(5)
    for _ in range(2000):
        size = rng.randrange(1, 1 << rng.choice([10, 20, 30, 40, 62]))
        queries.append((GO_TILE_HEIGHT, rng.randrange(size + 1), size))
    queries += [(GO_TILE_HEIGHT, 210, 300), (GO_TILE_HEIGHT, 256, 257), (GO_TILE_HEIGHT, 1, MAX_TREE_SIZE),
                (GO_TILE_HEIGHT, MAX_TREE_SIZE - 1, MAX_TREE_SIZE)]
    out = run_tlogtiles(tlogtiles, [f"tree {h} {t} {n}" for h, t, n in queries])
    for (height, tree, size), expected in zip(queries, out):
        got = " ".join(tile.path() for tile in tree_hash_tiles(tree, size, height))
        assert got == expected, (height, tree, size)


def run_tlogtiles(tlogtiles: str, queries: list[str]) -> list[str]:
    out = subprocess.run(
        [tlogtiles], input="".join(f"{q}\n" for q in queries),
        capture_output=True, text=True, check=True, timeout=120,
    ).stdout.splitlines()
    assert len(out) == len(queries)
    return out


def test_a_new_client_reads_no_tile_the_planned_ones_do_not_hold(tlogtiles: str) -> None:
    """
    For stored lookups naming trees of several sizes, a new go client
    reads, through tlog, each record's proof in any of those trees at
    least as large as its own, and each tree's hash in any larger one
    (whichever order it sees them in): every tile it reads is the first
    entries of one planned in the largest tree (and the plan is those
    that prove the records and trees in the largest tree, no more).
    """
    rng = random.Random(16)
    cases = [[(0, 1)], [(200, 210), (290, 300)], [(255, 256), (256, 257)], [(0, 65536), (70000, 70001)]]
    for _ in range(300):
        scale = 1 << rng.choice([4, 9, 12, 17, 20, 26, 40, 62])
        trees = [rng.randrange(1, scale) for _ in range(rng.randrange(1, 6))]
        cases.append([(rng.randrange(tree), tree) for tree in trees])

    def reads(lookups: list[tuple[int, int]]) -> list[str]:
        trees = {tree for _, tree in lookups}
        return [f"tree 8 {a} {b}" for a in trees for b in trees if a <= b] + [
            f"8 {record} {b}" for record, tree in lookups for b in trees if b >= tree
        ]

    queries = sorted({query for lookups in cases for query in reads(lookups)})
    read = dict(zip(queries, run_tlogtiles(tlogtiles, queries)))
    for lookups in cases:
        size = max(tree for _, tree in lookups)
        places = set().union(*(lookup_places(record, tree) for record, tree in lookups))
        planned = client_tiles(places, size)
        exact = {tile.path() for record, tree in lookups
                 for tile in [*proof_tiles(record, size), *tree_hash_tiles(tree, size)]}
        assert {tile.path() for tile in planned} == exact, lookups
        widths = {(tile.level, tile.index): tile.width for tile in planned}
        for query in reads(lookups):
            for path in read[query].split():
                tile = parse_tile(path)
                assert tile is not None
                assert widths.get((tile.level, tile.index), 0) >= tile.width, (lookups, query, path)


def test_a_nosumdb_module_is_never_looked_up_for_a_client(harness: Harness) -> None:
    # Its name is private (GONOSUMDB/GOPRIVATE, --go-nosumdb): a client
    # that asks anyway is not answered from the public database.
    harness.proxy.nosumdb = "corp.example,*.internal.example"
    for module in ("corp.example/tool", "git.internal.example/x"):
        status, _, body = harness.get_path(f"lookup/{module}@v1.0.0")
        assert status == 404 and b"--go-nosumdb" in body
    assert not [r for r in harness.database.requests if r.startswith("/lookup/")]


def test_a_lookup_gone_from_the_index_is_proved_no_more(harness: Harness, clock: Clock) -> None:
    two_lookups(harness, first_tree=300)
    assert harness.get_path("lookup/example.com/m@v1.0.0")[0] == 200
    proofs = harness.proxy._proofs[NAME]
    assert set(proofs.lookups) == {f"{NAME}/lookup/example.com/m@v1.0.0"}
    # Expiry (or a purge) removes it; the next round forgets it.
    assert resolve(Deferred.fromCoroutine(harness.proxy.sumdb_cache.remove(f"{NAME}/lookup/example.com/m@v1.0.0")))
    clock.advance(PREFETCH_INTERVAL)
    assert harness.get_path("lookup/example.com/n@v1.0.0")[0] == 200
    clock.advance(PREFETCH_INTERVAL)
    assert set(proofs.lookups) == {f"{NAME}/lookup/example.com/n@v1.0.0"}
