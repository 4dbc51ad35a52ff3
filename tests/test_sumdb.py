"""
Checksum-database tiles answered from the tiles the cache holds: a partial
tile cut from a wider one at the same coordinates, through the GOPROXY
resource, with a scripted checksum database upstream.
"""

from __future__ import annotations

import pytest
from treq.testing import StubTreq
from twisted.internet.task import Clock
from twisted.web.resource import Resource
from twisted.web.server import Request

from contentcache import metrics
from contentcache.cache import ProtocolCache
from contentcache.index import SQLiteIndex
from contentcache.pool import SynchronousRunner
from contentcache.protocol.goproxy.resource import GoProxy, GoProxyResource
from contentcache.protocol.goproxy.sumdb import SumDB
from contentcache.store import Store
from contentcache.upstream import NegativeCache, Upstream

from .conftest import resolve

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
    it saw, and whether it is gone (every request a 503).
    """

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.files: dict[str, bytes] = {}
        self.requests: list[str] = []
        self.gone = False

    def render_GET(self, request: Request) -> bytes:
        path = request.path.decode()
        self.requests.append(path)
        if self.gone:
            request.setResponseCode(503)
            return b"gone\n"
        if path not in self.files:
            request.setResponseCode(404)
            return b"not found\n"
        request.setHeader(b"content-type", b"application/octet-stream")
        return self.files[path]


class Harness:
    def __init__(self, store: Store, index: SQLiteIndex, disk: SynchronousRunner, clock: Clock) -> None:
        self.database = Database()
        self._upstream_client = StubTreq(self.database)
        upstream = Upstream("http://sumdb.test", self._upstream_client, clock)  # type: ignore[arg-type]
        self.proxy = GoProxy(
            store,
            ProtocolCache("go", index, store, clock, NegativeCache(clock, 60)),
            ProtocolCache("gosumdb", index, store, clock, NegativeCache(clock, 60)),
            disk,
            clock,
            None,
            sumdbs={NAME: (SumDB(NAME, "http://sumdb.test"), upstream)},
            verifier=NAME,
        )
        self._client = StubTreq(GoProxyResource(self.proxy))

    def get(self, tile: str) -> tuple[int, str | None, bytes]:
        """
        GET C{/sumdb/sum.test/tile/<tile>}: the status, X-Cache, the body.
        """
        return self.get_path(f"tile/{tile}")

    def get_path(self, path: str) -> tuple[int, str | None, bytes]:
        d = self._client.get(f"http://cache.test/sumdb/{NAME}/{path}")
        for _ in range(100):
            if d.called:
                break
            self._upstream_client.flush()
            self._client.flush()
        response = resolve(d)
        content = response.content()
        self._client.flush()
        return response.code, (response.headers.getRawHeaders("x-cache") or [None])[0], resolve(content)

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
