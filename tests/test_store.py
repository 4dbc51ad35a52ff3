"""
The store, on each backend: the filesystem, and S3 on a real S3-compatible
server (SeaweedFS on 127.0.0.1), with and without compression.
"""

from __future__ import annotations

import gzip
import json
import os
import uuid
from typing import Any, AsyncIterator, Callable, Iterator

import pytest

from contentcache.backend.filesystem import FilesystemBackend
from contentcache.backend.s3 import MIN_PART_SIZE, S3Backend, S3Location, make_client
from contentcache.compress import IDENTITY, ZSTD, Compression
from contentcache.hash import Hash
from contentcache.pool import SynchronousRunner
from contentcache.backend import NotFound, StorageUnavailable
from contentcache.space import StorageFull
from contentcache.store import Blob, BlobCorrupt, BlobNotFound, HashMismatch, Store, blob_key

from .conftest import files_under, resolve

KiB = 1024
MiB = 1024 * KiB

MakeStore = Callable[..., Store]


@pytest.fixture(params=["filesystem", "s3"])
def make_store(request: Any, tmp_path: Any, disk: SynchronousRunner, monkeypatch: Any) -> MakeStore:
    """
    Makes a store (the daemon starting) on this test's backend: a
    directory, or a prefix of its own in the session's S3 bucket.
    """
    storage = str(tmp_path / "storage")
    if request.param == "s3":
        s3 = request.getfixturevalue("seaweed")
        for name, value in s3.env().items():
            monkeypatch.setenv(name, value)
        location = S3Location(s3.bucket, f"{request.node.name[:40].strip('[]-')}-{uuid.uuid4().hex[:8]}/")

    def make(level: int = 0, part_size: int = MIN_PART_SIZE) -> Store:
        if request.param == "s3":
            backend: Any = S3Backend(make_client(s3.endpoint, s3.region, 4), location, disk, part_size)
            staging = str(tmp_path / "state" / "tmp")
        else:
            backend = FilesystemBackend(storage, disk)
            staging = os.path.join(storage, "tmp")
        backend.check()
        store = Store(backend, staging, disk, Compression(level))
        resolve(store.start())
        return store

    return make


@pytest.fixture
def store(make_store: MakeStore) -> Store:
    return make_store()


def content(size: int) -> bytes:
    return os.urandom(size)


def packument(versions: int) -> bytes:
    """
    JSON shaped like an npm packument: repetitive, as they are.
    """
    document = {
        "name": "example",
        "versions": {
            f"1.{i}.0": {
                "name": "example",
                "version": f"1.{i}.0",
                "dependencies": {"left-pad": "^1.3.0", "lodash": "^4.17.21"},
                "dist": {"tarball": f"http://registry.test/example/-/example-1.{i}.0.tgz",
                         "shasum": Hash.of(b"%d" % i).hex[:40]},
            }
            for i in range(versions)
        },
    }
    return json.dumps(document, indent=2).encode()


def chunked(data: bytes, size: int = 64 * KiB) -> Iterator[bytes]:
    for i in range(0, len(data), size):
        yield data[i : i + size]


def read_blob(store: Store, blob: Blob, offset: int = 0) -> bytes:
    reader = resolve(store.get(blob, offset))
    assert reader.size == blob.size
    parts = []
    while chunk := resolve(reader.read(64 * KiB)):
        parts.append(chunk)
    resolve(reader.close())
    return b"".join(parts)


def objects(store: Store) -> list[str]:
    """
    The keys of every blob object in the store's backend.
    """

    async def collect() -> list[str]:
        return sorted([key async for key in store.backend.keys("blobs")])

    return resolve(collect())


def leftovers(store: Store) -> list[str]:
    """
    What interrupted or finished writes left outside the blobs: spool files,
    a filesystem backend's temporary files, S3 multipart uploads.
    """
    found = files_under(store.staging)
    if isinstance(store.backend, FilesystemBackend):
        found += [f for f in files_under(store.backend.root) if not f.startswith(("blobs/", "tmp/"))]
        found += [f for f in files_under(os.path.join(store.backend.root, "blobs")) if "/." in f]
    else:
        s3 = store.backend._client
        response = s3.list_multipart_uploads(Bucket=store.backend.bucket, Prefix=store.backend.location.prefix)
        found += [u["Key"] for u in response.get("Uploads", [])]
    return found


@pytest.mark.parametrize("size", [0, 1, 64 * KiB, 12 * MiB])
def test_put_get_has_delete_round_trip(store: Store, size: int) -> None:
    data = content(size)
    result = resolve(store.put(chunked(data)))
    assert result.hash == Hash.of(data)
    assert result.size == size
    assert result.created
    assert result.blob == Blob(result.hash, size, IDENTITY, size)
    h = result.hash
    assert objects(store) == [blob_key(h)]
    assert resolve(store.has(h))
    found = resolve(store.find(h))
    assert found is not None and found == (IDENTITY, found[1]) and found[1].size == size
    assert read_blob(store, result.blob) == data
    assert resolve(store.delete(h)) is True
    assert not resolve(store.has(h))
    assert resolve(store.find(h)) is None
    with pytest.raises(BlobNotFound):
        resolve(store.get(result.blob))
    with pytest.raises(BlobNotFound):
        resolve(store.read(result.blob, 0, 1))
    assert resolve(store.delete(h)) is False
    assert leftovers(store) == []


def test_layout(store: Store) -> None:
    h = resolve(store.put([b"hello"])).hash
    assert blob_key(h) == f"blobs/{h.hex[:2]}/{h.hex}"
    assert objects(store) == [blob_key(h)]
    if isinstance(store.backend, FilesystemBackend):
        with open(os.path.join(store.backend.root, "blobs", h.hex[:2], h.hex), "rb") as f:
            assert f.read() == b"hello"
    else:
        s3 = store.backend._client
        body = s3.get_object(Bucket=store.backend.bucket, Key=store.backend.location.prefix + blob_key(h))["Body"]
        assert body.read() == b"hello"


def test_get_from_offset_and_read_a_range(store: Store) -> None:
    data = content(300 * KiB)
    blob = resolve(store.put(chunked(data))).blob
    assert read_blob(store, blob, 100_000)[:10] == data[100_000:100_010]
    assert read_blob(store, blob, 100_000) == data[100_000:]
    assert resolve(store.read(blob, 1000, 5000)) == data[1000:6000]
    assert resolve(store.read(blob, len(data) - 3, 100)) == data[-3:]
    assert resolve(store.read(blob, len(data), 10)) == b""
    assert read_blob(store, blob, len(data)) == b""


def test_put_accepts_async_streams(store: Store) -> None:
    async def stream() -> AsyncIterator[bytes]:
        yield b"part one, "
        yield b"part two"

    assert read_blob(store, resolve(store.put(stream())).blob) == b"part one, part two"


def test_dedup_writes_nothing_new(store: Store) -> None:
    data = content(100 * KiB)
    first = resolve(store.put(chunked(data)))
    before = resolve(store.find(first.hash))
    second = resolve(store.put(chunked(data, 1000)))
    assert second.hash == first.hash
    assert not second.created
    assert resolve(store.find(first.hash)) == before
    assert objects(store) == [blob_key(first.hash)]
    assert leftovers(store) == []


def test_expected_hash_match(store: Store) -> None:
    result = resolve(store.put([b"abc"], expected=Hash.of(b"abc")))
    assert result.hash == Hash.of(b"abc")


def test_expected_hash_mismatch_leaves_nothing(store: Store) -> None:
    with pytest.raises(HashMismatch) as e:
        resolve(store.put([b"tampered"], expected=Hash.of(b"original")))
    assert e.value.actual == Hash.of(b"tampered")
    assert objects(store) == [] and leftovers(store) == []
    assert not resolve(store.has(Hash.of(b"tampered")))


def test_interrupted_put_leaves_nothing(store: Store) -> None:
    def stream() -> Iterator[bytes]:
        yield b"x" * (256 * KiB)
        raise ConnectionError("upstream went away")

    with pytest.raises(ConnectionError):
        resolve(store.put(stream()))
    assert objects(store) == [] and leftovers(store) == []


def test_crash_mid_put_is_swept_at_restart(store: Store, make_store: MakeStore) -> None:
    # A crash: the spool was written part-way and never committed or
    # aborted; the dead process's lock is gone with it.
    spool = resolve(store.spool())
    resolve(spool.write(b"y" * (256 * KiB)))
    spool._handle.close()
    assert len(leftovers(store)) == 1
    assert objects(store) == []

    make_store()  # the daemon starting again
    assert leftovers(store) == []


def test_spool_can_be_inspected_before_commit(store: Store) -> None:
    spool = resolve(store.spool())
    resolve(spool.write(b"PK\x03\x04 a zip, say"))
    h = resolve(spool.close())
    with open(spool.path, "rb") as f:
        assert f.read() == b"PK\x03\x04 a zip, say"
    assert not resolve(store.has(h))
    assert resolve(spool.commit()).hash == h
    assert resolve(store.has(h))
    assert not os.path.exists(spool.path)


def test_aborted_spool_leaves_nothing(store: Store) -> None:
    spool = resolve(store.spool())
    resolve(spool.write(b"rejected by a protocol check"))
    resolve(spool.close())
    resolve(spool.abort())
    assert objects(store) == [] and leftovers(store) == []


def test_stored_lists_blobs(store: Store) -> None:
    expected = {resolve(store.put([bytes([i])])).hash for i in range(5)}

    async def collect() -> set[Hash]:
        return {h async for h, _ in store.stored()}

    assert resolve(collect()) == expected


def test_a_finished_spool_awaiting_its_check_survives_another_workers_start(
    store: Store, make_store: MakeStore
) -> None:
    spool = resolve(store.spool())
    resolve(spool.write(b"a zip being checked"))
    h = resolve(spool.close())
    make_store()  # a second worker starts and sweeps
    assert os.path.exists(spool.path)
    result = resolve(spool.commit())
    assert result.hash == h
    assert read_blob(store, result.blob) == b"a zip being checked"


# Compression.


@pytest.mark.parametrize("versions", [50, 6000], ids=["small", "over-1MiB"])
def test_json_is_stored_compressed_and_read_back_unchanged(make_store: MakeStore, versions: int) -> None:
    store = make_store(level=3)
    data = packument(versions)
    result = resolve(store.put(chunked(data)))
    blob = result.blob
    assert blob.encoding == ZSTD
    assert blob.hash == Hash.of(data), "the hash is the original bytes'"
    assert blob.size == len(data)
    assert blob.stored is not None and blob.stored < len(data) / 4
    assert objects(store) == [blob_key(blob.hash, ZSTD)]
    found = resolve(store.find(blob.hash))
    assert found is not None and found[0] == ZSTD and found[1].size == blob.stored
    assert read_blob(store, blob) == data
    assert read_blob(store, blob, len(data) // 3) == data[len(data) // 3 :]
    assert resolve(store.read(blob, 1000, 2000)) == data[1000:3000]
    assert resolve(store.rehash(blob.hash, ZSTD)) == blob.hash
    # The same content again: found compressed, nothing written.
    again = resolve(store.put([data]))
    assert not again.created and again.blob == blob
    assert resolve(store.delete(blob.hash)) is True
    assert objects(store) == [] and leftovers(store) == []


@pytest.mark.parametrize("kind", ["random", "gzip", "tiny"])
def test_what_does_not_compress_is_stored_as_it_came(make_store: MakeStore, kind: str) -> None:
    store = make_store(level=3)
    data = {
        "random": content(300 * KiB),
        "gzip": gzip.compress(packument(500)),
        "tiny": b'{"Version":"v1.0.0"}',
    }[kind]
    blob = resolve(store.put(chunked(data))).blob
    assert blob.encoding == IDENTITY
    assert blob.stored == len(data)
    assert objects(store) == [blob_key(blob.hash)]
    assert read_blob(store, blob) == data
    assert leftovers(store) == []


def test_a_blob_stored_otherwise_than_recorded_is_still_read(make_store: MakeStore) -> None:
    # Another worker, with compression off, stored it as it came.
    data = packument(300)
    plain = resolve(make_store(level=0).put([data])).blob
    compressing = make_store(level=3)
    assert read_blob(compressing, Blob(plain.hash, plain.size, ZSTD)) == data
    assert resolve(compressing.read(Blob(plain.hash, plain.size, ZSTD), 5, 10)) == data[5:15]
    result = resolve(compressing.put([data]))
    assert not result.created and result.blob.encoding == IDENTITY


@pytest.mark.parametrize("versions", [50, 6000], ids=["read-whole", "streamed"])
def test_a_damaged_compressed_blob_is_deleted_and_missing(make_store: MakeStore, versions: int) -> None:
    store = make_store(level=3)
    data = packument(versions)
    blob = resolve(store.put([data])).blob
    key = blob_key(blob.hash, ZSTD)
    stored = bytearray(resolve(store.backend.read(key, 0, len(data))))
    stored[len(stored) // 2] ^= 0x01  # one bit: the frame's checksum catches it
    resolve(store.backend.write(key, [bytes(stored)]))
    assert resolve(store.rehash(blob.hash, ZSTD)) is None
    with pytest.raises(BlobNotFound):
        if versions == 50:
            resolve(store.read(blob, 0, 100))
        else:
            read_blob(store, blob)
    assert objects(store) == [], "deleted, so that the next request fetches it again"
    again = resolve(store.put([data]))
    assert again.created and read_blob(store, again.blob) == data


@pytest.mark.parametrize("versions", [50, 6000], ids=["read-whole", "streamed"])
def test_a_damaged_copy_gives_way_to_a_good_one(make_store: MakeStore, versions: int) -> None:
    # Two workers stored the blob, one compressing; the compressed copy broke.
    data = packument(versions)
    store = make_store(level=3)
    blob = resolve(store.put([data])).blob
    resolve(store.backend.write(blob_key(blob.hash), [data]))
    key = blob_key(blob.hash, ZSTD)
    stored = bytes(resolve(store.backend.read(key, 0, len(data))))
    resolve(store.backend.write(key, [stored[:100] + bytes(len(stored) - 100)]))
    if versions == 50:
        assert resolve(store.read(blob, 10, 20)) == data[10:30]
    else:
        assert read_blob(store, blob, 10) == data[10:]
    assert objects(store) == [blob_key(blob.hash)]


def test_a_truncated_compressed_blob_is_deleted_and_missing(make_store: MakeStore) -> None:
    store = make_store(level=3)
    data = packument(6000)
    blob = resolve(store.put([data])).blob
    key = blob_key(blob.hash, ZSTD)
    stored = bytes(resolve(store.backend.read(key, 0, len(data))))
    resolve(store.backend.write(key, [stored[: len(stored) // 2]]))
    with pytest.raises(BlobNotFound):
        read_blob(store, blob)
    assert objects(store) == []


def test_compression_level_is_checked() -> None:
    with pytest.raises(ValueError, match="compression level"):
        Compression(20)


def flip(store: Store, blob: Blob, at: int, encoding: str = IDENTITY) -> None:
    """
    Change one byte of the stored object, as bit rot or an operator would.
    """
    key = blob_key(blob.hash, encoding)
    stored = bytearray(resolve(store.backend.read(key, 0, blob.size + 1024)))
    stored[at] ^= 0x40
    resolve(store.backend.write(key, [bytes(stored)]))


@pytest.mark.parametrize("size", [200, 256 * KiB, 2 * MiB], ids=["tiny", "one-piece", "streamed"])
@pytest.mark.parametrize("where", ["start", "end"])
def test_a_damaged_blob_is_never_read_whole(make_store: MakeStore, size: int, where: str) -> None:
    store = make_store()
    forgotten: list[Hash] = []

    async def damaged(h: Hash) -> None:
        forgotten.append(h)

    store.damaged = damaged
    data = content(size)
    blob = resolve(store.put([data])).blob
    flip(store, blob, 0 if where == "start" else size - 1)
    with pytest.raises(BlobCorrupt):
        if size <= 256 * KiB:
            resolve(store.read(blob, 0, size))
        else:
            reader = resolve(store.get(blob))
            received = 0
            try:
                while chunk := resolve(reader.read(64 * KiB)):
                    received += len(chunk)
            finally:
                resolve(reader.close())
    if size > 256 * KiB:
        assert received < size, "the end of a damaged blob is held back"
    assert objects(store) == [] and forgotten == [blob.hash]
    again = resolve(store.put([data]))
    assert again.created and read_blob(store, again.blob) == data


def test_a_part_of_a_large_blob_is_read_unchecked_and_a_truncated_one_is_damaged(make_store: MakeStore) -> None:
    store = make_store()
    data = content(2 * MiB)
    blob = resolve(store.put([data])).blob
    flip(store, blob, 10)
    # A range of a large blob is not checked (only streaming it whole, or
    # the scrub, reads all of it), but a short file is damage.
    assert resolve(store.read(blob, 100, 100)) == data[100:200]
    resolve(store.backend.write(blob_key(blob.hash), [data[: MiB]]))
    with pytest.raises(BlobCorrupt):
        resolve(store.read(blob, MiB + 10, 100))
    assert objects(store) == []


def test_a_small_compressed_blob_is_checked_after_decoding(make_store: MakeStore) -> None:
    # A valid zstd frame of other content (an operator copied files around):
    # the frame's own checksum is fine, the hash is not.
    store = make_store(level=3)
    one, other = packument(40), packument(41)
    blob = resolve(store.put([one])).blob
    replacement = resolve(store.put([other])).blob
    key = blob_key(replacement.hash, ZSTD)
    resolve(store.backend.write(blob_key(blob.hash, ZSTD), [resolve(store.backend.read(key, 0, len(other)))]))
    with pytest.raises(BlobCorrupt):
        resolve(store.read(blob, 0, 10))
    assert objects(store) == [key]


def test_scrub_finds_and_deletes_damage(make_store: MakeStore) -> None:
    store = make_store(level=3)
    good, bad, squashed = content(1000), content(300 * KiB), packument(60)
    blobs = [resolve(store.put([data])).blob for data in (good, bad, squashed)]
    flip(store, blobs[1], 5)
    flip(store, blobs[2], 20, ZSTD)
    results = {}

    async def walk() -> None:
        async for h, encoding in store.stored():
            results[h] = resolve(store.scrub(h, encoding))

    resolve(walk())
    assert results[blobs[0].hash] == (True, 1000)
    assert results[blobs[1].hash] == (False, 300 * KiB)
    assert results[blobs[2].hash][0] is False
    assert objects(store) == [blob_key(blobs[0].hash)]


class FullDisk:
    """
    A file that takes C{room} bytes and then fails as a full disk does.
    """

    def __init__(self, handle: Any, room: int) -> None:
        self._handle, self._room = handle, room

    def write(self, data: bytes) -> int:
        if len(data) > self._room:
            raise OSError(28, "No space left on device")
        self._room -= len(data)
        return int(self._handle.write(data))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._handle, name)


def test_a_full_disk_is_storage_full_and_leaves_nothing(store: Store) -> None:
    spool = resolve(store.spool())
    spool._handle = FullDisk(spool._handle, 1000)  # type: ignore[assignment]
    resolve(spool.write(b"x" * 600))
    with pytest.raises(StorageFull, match="No space left on device"):
        resolve(spool.write(b"x" * 600))
    assert store.space.full
    resolve(spool.abort())
    assert leftovers(store) == [] and objects(store) == []
    resolve(store.put([b"it fits now"]))
    assert not store.space.full, "a write that succeeds ends the full state"


def test_a_blob_that_cannot_be_read_is_damaged(tmp_path: Any, disk: SynchronousRunner, monkeypatch: Any) -> None:
    # A bad sector on the filesystem: the read fails with EIO. Fetched
    # again, not a 500. (S3 that fails is StorageUnavailable: a 503.)
    store = Store(FilesystemBackend(str(tmp_path / "fs"), disk), str(tmp_path / "fs" / "tmp"), disk)
    resolve(store.start())
    small, large = content(1000), content(2 * MiB)
    blobs = [resolve(store.put([data])).blob for data in (small, large)]

    def unreadable(backend: Any, key: str, *args: Any) -> bytes:
        if not os.path.exists(backend.path(key)):
            raise NotFound(key)
        raise OSError(5, "Input/output error")

    with monkeypatch.context() as patched:
        patched.setattr(FilesystemBackend, "_read", unreadable)
        with pytest.raises(BlobCorrupt):
            resolve(store.read(blobs[0], 0, 1000))
    assert objects(store) == [blob_key(blobs[1].hash)]

    class BadSector:
        @staticmethod
        def read(size: int) -> bytes:
            raise OSError(5, "Input/output error")

        def close(self) -> None:
            pass

    reader = resolve(store.get(blobs[1]))
    reader._raw.stream.close()
    reader._raw.stream = BadSector()
    with pytest.raises(BlobCorrupt):
        resolve(reader.read(64 * KiB))
    assert objects(store) == []


def test_reads_failing_in_a_row_are_the_disk_not_the_blobs(tmp_path: Any, disk: SynchronousRunner, monkeypatch: Any) -> None:
    store = Store(FilesystemBackend(str(tmp_path / "fs"), disk), str(tmp_path / "fs" / "tmp"), disk)
    resolve(store.start())
    blobs = [resolve(store.put([content(1000)])).blob for _ in range(4)]

    def unreadable(backend: Any, key: str, *args: Any) -> bytes:
        if not os.path.exists(backend.path(key)):
            raise NotFound(key)
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(FilesystemBackend, "_read", unreadable)
    for blob in blobs[:2]:
        with pytest.raises(BlobCorrupt):
            resolve(store.read(blob, 0, 1000))
    for blob in blobs[2:]:  # the third in a row, and on: nothing more deleted
        with pytest.raises(StorageUnavailable, match="fails reads"):
            resolve(store.read(blob, 0, 1000))
    assert objects(store) == sorted(blob_key(b.hash) for b in blobs[2:])
