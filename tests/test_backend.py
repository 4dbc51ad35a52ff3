from __future__ import annotations

import os
from typing import Iterator

import pytest

from contentcache import tempfiles
from contentcache.backend import InvalidKey, NotFound, check_key
from contentcache.backend.filesystem import FilesystemBackend
from contentcache.pool import SynchronousRunner

from .conftest import files_under, resolve


@pytest.fixture
def backend(tmp_path: object, disk: SynchronousRunner) -> FilesystemBackend:
    root = os.path.join(str(tmp_path), "root")
    os.makedirs(root)
    return FilesystemBackend(root, disk)


def read_all(backend: FilesystemBackend, key: str, offset: int = 0) -> bytes:
    reader = resolve(backend.open(key, offset))
    chunks = []
    while chunk := resolve(reader.read(7)):
        chunks.append(chunk)
    resolve(reader.close())
    return b"".join(chunks)


def test_write_read_stat_delete(backend: FilesystemBackend) -> None:
    resolve(backend.write("a/b/c", [b"hello ", b"world"]))
    assert read_all(backend, "a/b/c") == b"hello world"
    assert read_all(backend, "a/b/c", offset=6) == b"world"
    stat = resolve(backend.stat("a/b/c"))
    assert stat is not None and stat.size == 11
    assert resolve(backend.delete("a/b/c")) is True
    assert resolve(backend.delete("a/b/c")) is False
    assert resolve(backend.stat("a/b/c")) is None
    with pytest.raises(NotFound):
        resolve(backend.open("a/b/c"))


def test_write_replaces_atomically(backend: FilesystemBackend) -> None:
    resolve(backend.write("k", [b"old"]))
    resolve(backend.write("k", [b"new content"]))
    assert read_all(backend, "k") == b"new content"
    assert files_under(backend.root) == ["k"]


def test_interrupted_write_leaves_nothing(backend: FilesystemBackend) -> None:
    def chunks() -> Iterator[bytes]:
        yield b"x" * 1000
        raise ConnectionError("upstream went away")

    with pytest.raises(ConnectionError):
        resolve(backend.write("ab/key", chunks()))
    assert resolve(backend.stat("ab/key")) is None
    assert files_under(backend.root) == []


def test_sweep_removes_abandoned_temp_files_only(backend: FilesystemBackend) -> None:
    directory = os.path.join(backend.root, "ab")
    os.makedirs(directory)
    # A crashed writer: its file remains, its lock died with it.
    path, handle = tempfiles.create(directory)
    handle.write(b"partial")
    handle.close()
    # A live writer (another worker) still holds its lock.
    live_path, live = tempfiles.create(directory)
    live.write(b"in flight")
    assert resolve(backend.sweep()) == 1
    assert not os.path.exists(path)
    assert os.path.exists(live_path)
    live.close()
    assert resolve(backend.sweep()) == 1
    assert files_under(backend.root) == []


def test_keys_lists_objects_not_temp_files(backend: FilesystemBackend) -> None:
    for key in ["b/2", "a/1", "a/3", "c"]:
        resolve(backend.write(key, [key.encode()]))
    tempfiles.create(os.path.join(backend.root, "a"))[1].close()

    async def collect(prefix: str) -> list[str]:
        return [k async for k in backend.keys(prefix)]

    assert resolve(collect("")) == ["c", "a/1", "a/3", "b/2"]
    assert resolve(collect("a")) == ["a/1", "a/3"]


def test_write_file_moves_a_local_file(backend: FilesystemBackend, tmp_path: object) -> None:
    source = os.path.join(backend.root, "incoming")
    with open(source, "wb") as f:
        f.write(b"spooled")
    resolve(backend.write_file("x/y", source))
    assert not os.path.exists(source)
    assert read_all(backend, "x/y") == b"spooled"


@pytest.mark.parametrize(
    "key",
    [
        "",
        "/etc/passwd",
        "../outside",
        "a/../../outside",
        "a/./b",
        "a//b",
        "a/",
        ".hidden",
        "a/.tmp-123",
        "..",
        ".",
        "a\\..\\b",
        "a\x00b",
        "é",
        "a" * 1025,
        "a b",
    ],
)
def test_key_escape_attempts_are_rejected(
    backend: FilesystemBackend, key: str, tmp_path: object
) -> None:
    with pytest.raises(InvalidKey):
        check_key(key)
    with pytest.raises(InvalidKey):
        resolve(backend.write(key, [b"x"]))
    with pytest.raises(InvalidKey):
        resolve(backend.open(key))
    with pytest.raises(InvalidKey):
        resolve(backend.delete(key))
    assert files_under(os.path.dirname(backend.root)) == []
    assert os.listdir(os.path.dirname(backend.root)) == ["root"]


def test_read_a_range_in_one_call(backend: FilesystemBackend) -> None:
    resolve(backend.write("k", [b"0123456789"]))
    assert resolve(backend.read("k", 3, 4)) == b"3456"
    assert resolve(backend.read("k", 8, 100)) == b"89"
    with pytest.raises(NotFound):
        resolve(backend.read("missing", 0, 1))
