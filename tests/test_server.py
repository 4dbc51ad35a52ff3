from __future__ import annotations

import json
import os
from typing import Any

import pytest
from treq.testing import StubTreq
from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.web.resource import Resource
from twisted.web.server import Request

from contentcache.hash import Hash
from contentcache.index import SQLiteIndex
from contentcache.server import Root
from contentcache.store import Blob, Store
from contentcache.web import CHUNK_SIZE, STREAM_CHUNK, AsyncResource, _BlobProducer, send_blob

from .conftest import resolve

BLOB = bytes(range(256)) * 2400  # 600 KiB: streamed in several chunks


def request(
    client: StubTreq, method: str, path: str, headers: dict[str, str] | None = None
) -> tuple[Any, bytes]:
    response = resolve(client.request(method, "http://cache.test" + path, headers=headers))
    body = resolve(response.content())
    client.flush()
    return response, body


class BlobResource(AsyncResource):
    def __init__(self, store: Store, blob: Hash, size: int) -> None:
        super().__init__()
        self._store, self._blob, self._size = store, blob, size

    async def render_async(self, request: Request) -> None:
        await send_blob(request, self._store, Blob(self._blob, self._size), b"application/zip")


@pytest.fixture
def root(store: Store, index: SQLiteIndex) -> Root:
    return Root(store, index)


@pytest.fixture
def client(root: Root) -> StubTreq:
    return StubTreq(root)


@pytest.fixture
def blob_client(store: Store) -> tuple[StubTreq, Hash]:
    h = resolve(store.put([BLOB])).hash
    top = Resource()
    top.putChild(b"blob", BlobResource(store, h, len(BLOB)))
    return StubTreq(top), h


def test_health_ok(client: StubTreq) -> None:
    response, body = request(client, "GET", "/health")
    assert response.code == 200
    assert response.headers.getRawHeaders("content-type") == ["application/json"]
    document = json.loads(body)
    assert document["status"] == "ok"
    assert document["storage"] == "ok" and document["index"] == "ok"


def test_health_unavailable_when_storage_is_not_writable(
    client: StubTreq, store: Store, clean_reactor: list[Any]
) -> None:
    os.rmdir(store.staging)
    with open(store.staging, "w"):
        pass  # a file where the directory should be
    response, body = request(client, "GET", "/health")
    assert response.code == 503
    document = json.loads(body)
    assert document["status"] == "unavailable"
    assert document["storage"].startswith("error")
    assert document["index"] == "ok"


def test_health_unavailable_when_index_is_closed(client: StubTreq, index: SQLiteIndex) -> None:
    resolve(index.close())
    response, body = request(client, "GET", "/health")
    assert response.code == 503
    assert json.loads(body)["index"].startswith("error")


@pytest.mark.parametrize(
    "path",
    [
        "/nothing-here",
        "/../../etc/passwd",
        "/%2e%2e/%2e%2e/etc/passwd",
        "/..%2f..%2fetc%2fpasswd",
        "/health/../../etc/passwd",
        "//etc/passwd",
        "/%00",
        "/" + "a" * 10_000,
    ],
)
def test_unknown_paths_are_404_text(client: StubTreq, path: str) -> None:
    response, body = request(client, "GET", path)
    assert response.code == 404
    assert response.headers.getRawHeaders("content-type") == ["text/plain; charset=utf-8"]
    assert body == b"not found\n"
    # And the server keeps serving.
    assert request(client, "GET", "/health")[0].code == 200


def test_blob_full(blob_client: tuple[StubTreq, Hash]) -> None:
    client, h = blob_client
    response, body = request(client, "GET", "/blob")
    assert response.code == 200
    assert body == BLOB
    assert response.length == len(BLOB)  # Content-Length
    assert response.headers.getRawHeaders("etag") == [f'"{h.hex}"']
    assert response.headers.getRawHeaders("content-type") == ["application/zip"]
    assert response.headers.getRawHeaders("accept-ranges") == ["bytes"]


def test_blob_head(blob_client: tuple[StubTreq, Hash]) -> None:
    client, h = blob_client
    response, body = request(client, "HEAD", "/blob")
    assert response.code == 200
    assert body == b""
    assert response.headers.getRawHeaders("content-length") == [str(len(BLOB))]
    assert response.headers.getRawHeaders("etag") == [f'"{h.hex}"']


@pytest.mark.parametrize(
    "header", ['"{hex}"', 'W/"{hex}"', '"other", "{hex}"', "*"]
)
def test_blob_if_none_match(blob_client: tuple[StubTreq, Hash], header: str) -> None:
    client, h = blob_client
    response, body = request(client, "GET", "/blob", {"If-None-Match": header.format(hex=h.hex)})
    assert response.code == 304
    assert body == b""
    assert response.headers.getRawHeaders("etag") == [f'"{h.hex}"']


def test_blob_if_none_match_other(blob_client: tuple[StubTreq, Hash]) -> None:
    client, _ = blob_client
    response, body = request(client, "GET", "/blob", {"If-None-Match": '"different"'})
    assert response.code == 200 and body == BLOB


@pytest.mark.parametrize(
    "header, start, end",
    [
        ("bytes=0-0", 0, 0),
        ("bytes=100-199", 100, 199),
        ("bytes=200000-", 200000, len(BLOB) - 1),
        ("bytes=-500", len(BLOB) - 500, len(BLOB) - 1),
        ("bytes=1000-99999999", 1000, len(BLOB) - 1),
        ("bytes=-99999999", 0, len(BLOB) - 1),
    ],
)
def test_blob_range(
    blob_client: tuple[StubTreq, Hash], header: str, start: int, end: int
) -> None:
    client, _ = blob_client
    response, body = request(client, "GET", "/blob", {"Range": header})
    assert response.code == 206
    assert body == BLOB[start : end + 1]
    assert response.headers.getRawHeaders("content-range") == [f"bytes {start}-{end}/{len(BLOB)}"]
    assert response.length == end - start + 1


@pytest.mark.parametrize("header", [f"bytes={len(BLOB)}-", f"bytes={len(BLOB) + 10}-{len(BLOB) + 20}", "bytes=-0"])
def test_blob_range_not_satisfiable(blob_client: tuple[StubTreq, Hash], header: str) -> None:
    client, _ = blob_client
    response, body = request(client, "GET", "/blob", {"Range": header})
    assert response.code == 416
    assert response.headers.getRawHeaders("content-range") == [f"bytes */{len(BLOB)}"]
    assert body == b"range not satisfiable\n"


@pytest.mark.parametrize(
    "header, start, end",
    [
        ("bytes=0-" + "9" * 5000, 0, len(BLOB) - 1),
        ("bytes=-" + "9" * 5000, 0, len(BLOB) - 1),
        ("bytes=" + "0" * 5000 + "7-" + "0" * 5000 + "9", 7, 9),
    ],
    ids=["end", "suffix", "leading-zeros"],
)
def test_blob_range_numbers_of_thousands_of_digits(
    blob_client: tuple[StubTreq, Hash], header: str, start: int, end: int
) -> None:
    client, _ = blob_client
    response, body = request(client, "GET", "/blob", {"Range": header})
    assert response.code == 206 and body == BLOB[start : end + 1]


def test_blob_range_starting_past_any_size_is_416(blob_client: tuple[StubTreq, Hash]) -> None:
    client, _ = blob_client
    response, body = request(client, "GET", "/blob", {"Range": "bytes=" + "9" * 5000 + "-"})
    assert response.code == 416 and body == b"range not satisfiable\n"


@pytest.mark.parametrize(
    "header",
    ["Sun, 06 Nov 99999999999 08:49:37 GMT", "Sun, 06 Nov " + "9" * 5000 + " 08:49:37 GMT",
     "yesterday", "Sun, 06 Nov 1994", "\xff\xfe", ""],
)
def test_unusable_if_modified_since_is_ignored(store: Store, header: str) -> None:
    h = resolve(store.put([b"{}"])).hash

    class Dated(AsyncResource):
        async def render_async(self, request: Request) -> None:
            await send_blob(request, store, Blob(h, 2), b"application/json", last_modified=784111777)

    top = Resource()
    top.putChild(b"blob", Dated())
    response, body = request(StubTreq(top), "GET", "/blob", {"If-Modified-Since": header})
    assert response.code == 200 and body == b"{}"


@pytest.mark.parametrize("header", ["bytes=0-1,5-6", "items=0-5", "bytes=5-1", "bytes=x-y", "bytes=--5", "bytes=\u0661-"])
def test_blob_ranges_we_ignore_get_the_whole_blob(
    blob_client: tuple[StubTreq, Hash], header: str
) -> None:
    client, _ = blob_client
    response, body = request(client, "GET", "/blob", {"Range": header})
    assert response.code == 200 and body == BLOB


def test_blob_if_range(blob_client: tuple[StubTreq, Hash]) -> None:
    client, h = blob_client
    response, body = request(
        client, "GET", "/blob", {"Range": "bytes=0-9", "If-Range": f'"{h.hex}"'}
    )
    assert response.code == 206 and body == BLOB[:10]
    response, body = request(client, "GET", "/blob", {"Range": "bytes=0-9", "If-Range": '"old"'})
    assert response.code == 200 and body == BLOB


def test_blob_missing_from_store_is_404(
    blob_client: tuple[StubTreq, Hash], store: Store
) -> None:
    client, h = blob_client
    resolve(store.delete(h))
    response, body = request(client, "GET", "/blob")
    assert response.code == 404
    assert body == b"not found\n"


def test_empty_blob(store: Store) -> None:
    h = resolve(store.put([])).hash
    top = Resource()
    top.putChild(b"blob", BlobResource(store, h, 0))
    response, body = request(StubTreq(top), "GET", "/blob")
    assert response.code == 200 and body == b""
    assert response.length == 0


def test_methods_other_than_get_and_head(blob_client: tuple[StubTreq, Hash]) -> None:
    client, _ = blob_client
    response, body = request(client, "POST", "/blob")
    assert response.code == 405
    assert response.headers.getRawHeaders("allow") == ["GET, HEAD"]
    assert body == b"method not allowed\n"


class PausingRequest:
    """
    Just enough of a request to watch backpressure: it pauses its producer
    after every write, as a transport with a full buffer does.
    """

    def __init__(self) -> None:
        self.written: list[bytes] = []
        self.producer: Any = None
        self.finished = False
        self.channel = object()  # until the client leaves

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        assert streaming
        self.producer = producer

    def unregisterProducer(self) -> None:
        self.producer = None

    def write(self, data: bytes) -> None:
        self.written.append(data)
        self.producer.pauseProducing()


class CountingReader:
    def __init__(self, data: bytes) -> None:
        self.data, self.reads, self.closed = data, 0, False

    def read(self, size: int) -> Any:
        self.reads += 1
        chunk, self.data = self.data[:size], self.data[size:]
        return succeed(chunk)

    def close(self) -> Any:
        self.closed = True
        return succeed(None)


def test_producer_reads_only_while_the_client_keeps_up() -> None:
    data = os.urandom(STREAM_CHUNK * 3 + 5)
    request, reader = PausingRequest(), CountingReader(data)
    done = Deferred.fromCoroutine(_BlobProducer(request, reader, len(data)).run())  # type: ignore[arg-type]
    assert reader.reads == 1 and len(request.written) == 1  # paused after one chunk
    for expected in (2, 3, 4):
        request.producer.resumeProducing()
        assert reader.reads == expected
    assert resolve(done) is None
    assert b"".join(request.written) == data
    assert request.producer is None  # unregistered


def test_producer_stops_when_the_client_goes_away() -> None:
    request, reader = PausingRequest(), CountingReader(b"x" * STREAM_CHUNK * 3)
    done = Deferred.fromCoroutine(_BlobProducer(request, reader, STREAM_CHUNK * 3).run())  # type: ignore[arg-type]
    request.producer.stopProducing()
    with pytest.raises(CancelledError):
        resolve(done)
    assert reader.reads == 1


def test_small_blob_in_one_read(store: Store) -> None:
    h = resolve(store.put([b'{"Version":"v1.0.0"}'])).hash
    top = Resource()
    top.putChild(b"blob", BlobResource(store, h, 20))
    client = StubTreq(top)
    response, body = request(client, "GET", "/blob")
    assert response.code == 200 and body == b'{"Version":"v1.0.0"}'
    response, body = request(client, "GET", "/blob", {"Range": "bytes=2-8"})
    assert response.code == 206 and body == b"Version"


def test_health_says_full_until_a_write_succeeds(client: StubTreq, store: Store) -> None:
    store.space.failed(OSError(28, "No space left on device"))
    response, body = request(client, "GET", "/health")
    assert response.code == 200, "hits are still served"
    document = json.loads(body)
    assert document["storage"] == "full" and document["status"] == "degraded"
    resolve(store.put([b"room again"]))
    response, body = request(client, "GET", "/health")
    assert json.loads(body)["storage"] == "ok" and json.loads(body)["status"] == "ok"


def test_a_full_disk_is_507_with_one_line(store: Store) -> None:
    from .test_store import FullDisk

    class Filling(AsyncResource):
        async def render_async(self, request: Request) -> None:
            spool = await store.spool()
            spool._handle = FullDisk(spool._handle, 10)  # type: ignore[assignment]
            try:
                await spool.write(b"more than ten bytes")
            finally:
                await spool.abort()

    top = Resource()
    top.putChild(b"fill", Filling())
    response, body = request(StubTreq(top), "GET", "/fill")
    assert response.code == 507
    assert body.count(b"\n") == 1 and body.startswith(b"storage full: ")
    assert os.listdir(store.staging) == []
