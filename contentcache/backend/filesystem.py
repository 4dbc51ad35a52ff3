"""
The filesystem backend: one file per key under a root directory.

Writes go to a locked temporary file in the target directory, are fsynced,
and are renamed into place, so a crash never leaves a partial object under a
real name; L{FilesystemBackend.sweep} removes the temporary files a crash
left behind.
"""

from __future__ import annotations

import errno
import os
from typing import AsyncIterable, AsyncIterator, BinaryIO, Callable, Iterable

from attrs import define, field
from twisted.internet.defer import Deferred
from zope.interface import implementer

from .. import tempfiles
from ..pool import Runner
from . import BlockingReader, IBackend, IReader, NotFound, Stat, StorageUnavailable, check_key, iterate

# How many keys one thread-pool round trip of keys() collects.
KEYS_BATCH = 1000


def _absolute(path: str) -> str:
    return os.path.abspath(path)


@implementer(IBackend)
@define
class FilesystemBackend:
    """
    Store objects as files below C{root}.
    """

    root: str = field(converter=_absolute)
    _disk: Runner

    def path(self, key: str) -> str:
        """
        The file that holds C{key}. Raises L{InvalidKey} for a key that is
        not valid, so no key ever resolves outside C{root}.
        """
        path = os.path.join(self.root, *check_key(key).split("/"))
        # check_key already forbids "..", absolute paths and empty parts;
        # this is a second, independent guard.
        if os.path.commonpath([self.root, path]) != self.root:
            raise AssertionError(f"key {key!r} escaped {self.root!r}")
        return path

    def check(self) -> None:
        try:
            os.makedirs(self.root, exist_ok=True)
        except OSError as e:
            raise StorageUnavailable(f"Cannot use the storage directory: {e}.") from None
        if not os.access(self.root, os.W_OK | os.X_OK):
            raise StorageUnavailable(f"Cannot use the storage directory {self.root}: it is not writable.")

    def sweep(self) -> Deferred[int]:
        return self._disk.run(tempfiles.sweep, self.root, tempfiles.TEMP_PREFIX, True)

    def _begin(self, key: str) -> tuple[str, str, BinaryIO]:
        target = self.path(key)
        directory = os.path.dirname(target)
        os.makedirs(directory, exist_ok=True)
        temp, handle = tempfiles.create(directory)
        return target, temp, handle

    def _commit(self, temp: str, handle: BinaryIO, target: str) -> None:
        tempfiles.finish(handle)
        os.replace(temp, target)
        handle.close()
        tempfiles.fsync_directory(os.path.dirname(target))

    async def _write(self, key: str, chunks: AsyncIterable[bytes] | Iterable[bytes]) -> None:
        target, temp, handle = await self._disk.run(self._begin, key)
        try:
            async for chunk in iterate(chunks):
                await self._disk.run(handle.write, chunk)
            await self._disk.run(self._commit, temp, handle, target)
        except BaseException:
            await self._disk.run(tempfiles.discard, temp, handle)
            raise

    def write(self, key: str, chunks: AsyncIterable[bytes] | Iterable[bytes]) -> Deferred[None]:
        return Deferred.fromCoroutine(self._write(key, chunks))

    def _adopt(self, key: str, path: str) -> None:
        target = self.path(key)
        directory = os.path.dirname(target)
        os.makedirs(directory, exist_ok=True)
        try:
            os.replace(path, target)
        except OSError as e:
            if e.errno != errno.EXDEV:
                raise
            # Another filesystem: copy beside the target, then rename.
            temp, handle = tempfiles.create(directory)
            try:
                with open(path, "rb") as source:
                    while chunk := source.read(1 << 20):
                        handle.write(chunk)
                tempfiles.finish(handle)
                os.replace(temp, target)
                handle.close()
            except BaseException:
                tempfiles.discard(temp, handle)
                raise
            os.unlink(path)
        tempfiles.fsync_directory(directory)

    def write_file(self, key: str, path: str) -> Deferred[None]:
        return self._disk.run(self._adopt, key, path)

    def _open(self, key: str, offset: int) -> BlockingReader:
        try:
            handle = open(self.path(key), "rb")
        except FileNotFoundError:
            raise NotFound(key) from None
        size = os.fstat(handle.fileno()).st_size
        if offset:
            handle.seek(offset)
        return BlockingReader(self._disk, handle, size)

    def open(self, key: str, offset: int = 0) -> Deferred[IReader]:
        return self._disk.run(self._open, key, offset)

    def _read(self, key: str, offset: int, length: int, then: Callable[[bytes], bytes] | None) -> bytes:
        try:
            with open(self.path(key), "rb") as handle:
                handle.seek(offset)
                data = handle.read(length)
        except FileNotFoundError:
            raise NotFound(key) from None
        return data if then is None else then(data)

    def read_blocking(self, key: str, offset: int, length: int) -> bytes:
        """
        L{read} on the calling thread, for a caller already on the disk
        pool (a cold hit reads its entry and its blob in one trip).
        """
        return self._read(key, offset, length, None)

    def read(self, key: str, offset: int, length: int, then: Callable[[bytes], bytes] | None = None) -> Deferred[bytes]:
        return self._disk.run(self._read, key, offset, length, then)

    def _stat(self, key: str) -> Stat | None:
        try:
            st = os.stat(self.path(key))
        except FileNotFoundError:
            return None
        return Stat(size=st.st_size, mtime=st.st_mtime)

    def stat(self, key: str) -> Deferred[Stat | None]:
        return self._disk.run(self._stat, key)

    def _delete(self, key: str) -> bool:
        try:
            os.unlink(self.path(key))
        except FileNotFoundError:
            return False
        return True

    def delete(self, key: str) -> Deferred[bool]:
        return self._disk.run(self._delete, key)

    def delete_now(self, key: str) -> bool:
        return self._delete(key)

    def _walk(self, prefix: str) -> Iterable[str]:
        start = self.path(prefix) if prefix else self.root
        for directory, dirs, files in os.walk(start):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            relative = os.path.relpath(directory, self.root)
            for name in sorted(files):
                if not name.startswith("."):
                    yield name if relative == "." else f"{relative}/{name}".replace(os.sep, "/")

    async def keys(self, prefix: str = "") -> AsyncIterator[str]:
        walker = iter(self._walk(prefix))

        def batch() -> list[str]:
            return [key for _, key in zip(range(KEYS_BATCH), walker)]

        while keys := await self._disk.run(batch):
            for key in keys:
                yield key
