from __future__ import annotations

import os
from typing import AsyncIterator, Callable, Iterator

import pytest

from contentcache.hash import Hash
from contentcache.store import BlobNotFound, HashMismatch, Store, blob_key

from .conftest import files_under, resolve

KiB = 1024
MiB = 1024 * KiB


def content(size: int) -> bytes:
    return os.urandom(size)


def chunked(data: bytes, size: int = 64 * KiB) -> Iterator[bytes]:
    for i in range(0, len(data), size):
        yield data[i : i + size]


def read_blob(store: Store, h: Hash, offset: int = 0) -> bytes:
    reader = resolve(store.get(h, offset))
    parts = []
    while chunk := resolve(reader.read(64 * KiB)):
        parts.append(chunk)
    resolve(reader.close())
    return b"".join(parts)


def blobs(storage: str) -> list[str]:
    return files_under(os.path.join(storage, "blobs"))


@pytest.mark.parametrize("size", [0, 1, 64 * KiB, 10 * MiB])
def test_put_get_has_delete_round_trip(store: Store, storage: str, size: int) -> None:
    data = content(size)
    result = resolve(store.put(chunked(data)))
    assert result.hash == Hash.of(data)
    assert result.size == size
    assert result.created
    h = result.hash
    assert blobs(storage) == [f"{h.shard}/{h.hex}"]
    assert resolve(store.has(h))
    assert resolve(store.size(h)) == size
    assert read_blob(store, h) == data
    assert resolve(store.delete(h)) is True
    assert not resolve(store.has(h))
    assert resolve(store.size(h)) is None
    with pytest.raises(BlobNotFound):
        resolve(store.get(h))
    assert resolve(store.delete(h)) is False


def test_layout_on_disk(store: Store, storage: str) -> None:
    h = resolve(store.put([b"hello"])).hash
    path = os.path.join(storage, "blobs", h.hex[:2], h.hex)
    with open(path, "rb") as f:
        assert f.read() == b"hello"
    assert blob_key(h) == f"blobs/{h.hex[:2]}/{h.hex}"


def test_get_from_offset(store: Store) -> None:
    data = content(300 * KiB)
    h = resolve(store.put(chunked(data))).hash
    assert read_blob(store, h, 100_000) == data[100_000:]


def test_put_accepts_async_streams(store: Store) -> None:
    async def stream() -> AsyncIterator[bytes]:
        yield b"part one, "
        yield b"part two"

    assert read_blob(store, resolve(store.put(stream())).hash) == b"part one, part two"


def test_dedup_writes_nothing_new(store: Store, storage: str) -> None:
    data = content(100 * KiB)
    first = resolve(store.put(chunked(data)))
    path = os.path.join(storage, blob_key(first.hash))
    inode = os.stat(path).st_ino
    second = resolve(store.put(chunked(data, 1000)))
    assert second.hash == first.hash
    assert not second.created
    assert os.stat(path).st_ino == inode
    assert blobs(storage) == [f"{first.hash.shard}/{first.hash.hex}"]
    assert os.listdir(os.path.join(storage, "tmp")) == []


def test_expected_hash_match(store: Store) -> None:
    result = resolve(store.put([b"abc"], expected=Hash.of(b"abc")))
    assert result.hash == Hash.of(b"abc")


def test_expected_hash_mismatch_leaves_nothing(store: Store, storage: str) -> None:
    with pytest.raises(HashMismatch) as e:
        resolve(store.put([b"tampered"], expected=Hash.of(b"original")))
    assert e.value.actual == Hash.of(b"tampered")
    assert files_under(storage) == []
    assert not resolve(store.has(Hash.of(b"tampered")))


def test_interrupted_put_leaves_nothing(store: Store, storage: str) -> None:
    def stream() -> Iterator[bytes]:
        yield b"x" * (256 * KiB)
        raise ConnectionError("upstream went away")

    with pytest.raises(ConnectionError):
        resolve(store.put(stream()))
    assert files_under(storage) == []


def test_crash_mid_put_is_swept_at_restart(
    store: Store, storage: str, make_store: Callable[[], Store]
) -> None:
    # A crash: the spool was written part-way and never committed or
    # aborted; the dead process's lock is gone with it.
    spool = resolve(store.spool())
    resolve(spool.write(b"y" * (256 * KiB)))
    spool._handle.close()
    assert len(files_under(storage)) == 1
    assert blobs(storage) == []

    make_store()  # the daemon starting again
    assert files_under(storage) == []


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


def test_aborted_spool_leaves_nothing(store: Store, storage: str) -> None:
    spool = resolve(store.spool())
    resolve(spool.write(b"rejected by a protocol check"))
    resolve(spool.close())
    resolve(spool.abort())
    assert files_under(storage) == []


def test_hashes_lists_blobs(store: Store) -> None:
    expected = {resolve(store.put([bytes([i])])).hash for i in range(5)}

    async def collect() -> set[Hash]:
        return {h async for h in store.hashes()}

    assert resolve(collect()) == expected


def test_a_finished_spool_awaiting_its_check_survives_another_workers_start(
    store: Store, make_store: Callable[[], Store]
) -> None:
    spool = resolve(store.spool())
    resolve(spool.write(b"a zip being checked"))
    h = resolve(spool.close())
    make_store()  # a second worker starts and sweeps
    assert os.path.exists(spool.path)
    assert resolve(spool.commit()).hash == h
    assert read_blob(store, h) == b"a zip being checked"
