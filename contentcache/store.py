"""
The content-addressable store (CAFS): blobs named by the BLAKE3-256 hash of
their content, kept in a backend under C{blobs/ab/<64 hex>}.

Content enters through a L{Spool}: a locked temporary file in the store's
local staging directory, hashed as it is written. A protocol adapter can
check the spooled file (a zip's rules, an npm tarball's integrity) before it
commits it; only then does it become a blob. Content already present is not
written again.
"""

from __future__ import annotations

import os
from typing import AsyncIterable, BinaryIO, Iterable

from attrs import define, field, frozen
from twisted.internet.defer import Deferred

from . import tempfiles
from .pool import Runner
from .backend import IBackend, IReader, NotFound, iterate
from .hash import Hash, Hasher
from .tracing import child_span

BLOB_PREFIX = "blobs"
SPOOL_PREFIX = "spool-"


class BlobNotFound(KeyError):
    """
    The store holds no blob with that hash.
    """


class HashMismatch(ValueError):
    """
    Content did not hash to the value it was expected to have.
    """

    def __init__(self, expected: Hash, actual: Hash) -> None:
        super().__init__(f"expected content {expected.hex}, got {actual.hex}")
        self.expected = expected
        self.actual = actual


@frozen
class PutResult:
    """
    The outcome of adding content to the store.
    """

    hash: Hash
    size: int
    #: False when the blob was already present and nothing new was written.
    created: bool


def blob_key(h: Hash) -> str:
    return f"{BLOB_PREFIX}/{h.shard}/{h.hex}"


@define
class Spool:
    """
    Content on its way into the store: written to a local temporary file and
    hashed as it goes. Finish with exactly one of L{commit} or L{abort}.
    """

    _store: Store
    #: The local file being written; adapters may inspect it after close().
    path: str
    _handle: BinaryIO
    _hasher: Hasher = field(factory=Hasher)
    _closed: bool = False

    @property
    def size(self) -> int:
        return self._hasher.size

    def write_blocking(self, data: bytes) -> None:
        """
        Append C{data} from code already running on the disk pool.
        """
        self._handle.write(data)
        self._hasher.update(data)

    def write(self, data: bytes) -> Deferred[None]:
        """
        Append C{data}. Wait for each write before the next.
        """
        return self._store._disk.run(self.write_blocking, data)

    async def close(self) -> Hash:
        """
        Make the content durable and fire with its hash. The file stays at
        C{path} (and locked) for inspection until L{commit} or L{abort}.
        """
        if not self._closed:
            on_disk = await self._store._disk.run(tempfiles.finish, self._handle)
            if on_disk != self._hasher.size:
                raise OSError(f"spool {self.path} holds {on_disk} bytes of {self._hasher.size} written")
            self._closed = True
        return self._hasher.finish()

    async def commit(self, expected: Hash | None = None) -> PutResult:
        """
        Turn the spooled content into a blob. With C{expected}, content that
        hashes to anything else is discarded and L{HashMismatch} raised.
        """
        with child_span("store put", **{"contentcache.bytes": self.size}) as span:
            result = await self._commit(expected)
            if span is not None:
                span.set_attribute("contentcache.blob", result.hash.hex)
                span.set_attribute("contentcache.created", result.created)
            return result

    async def _commit(self, expected: Hash | None) -> PutResult:
        try:
            h = await self.close()
            if expected is not None and h != expected:
                raise HashMismatch(expected, h)
            key = blob_key(h)
            if await self._store.backend.stat(key) is not None:
                await self.abort()
                return PutResult(h, self.size, created=False)
            await self._store.backend.write_file(key, self.path)
        except BaseException:
            await self.abort()
            raise
        await self._store._disk.run(self._handle.close)
        return PutResult(h, self.size, created=True)

    def abort(self) -> Deferred[None]:
        """
        Throw the spooled content away.
        """
        return self._store._disk.run(tempfiles.discard, self.path, self._handle)


@define
class Store:
    """
    The content-addressable store.

    @ivar staging: a local directory for spool files; on the same filesystem
        as a filesystem backend, so committing a blob is a rename.
    """

    backend: IBackend
    staging: str
    _disk: Runner

    def _prepare(self) -> int:
        os.makedirs(self.staging, exist_ok=True)
        return tempfiles.sweep(self.staging, SPOOL_PREFIX)

    async def start(self) -> int:
        """
        Create the staging directory and remove what interrupted writes left
        behind, here and in the backend. Fires with how many were removed.
        """
        removed = await self._disk.run(self._prepare)
        return removed + await self.backend.sweep()

    async def spool(self) -> Spool:
        """
        Begin adding content; see L{Spool}.
        """
        path, handle = await self._disk.run(tempfiles.create, self.staging, SPOOL_PREFIX)
        return Spool(self, path, handle)

    async def put(
        self,
        chunks: AsyncIterable[bytes] | Iterable[bytes],
        expected: Hash | None = None,
    ) -> PutResult:
        """
        Add a stream of content and fire with its hash. If the stream raises
        or the content does not match C{expected}, nothing is stored.
        """
        spool = await self.spool()
        try:
            async for chunk in iterate(chunks):
                await spool.write(chunk)
        except BaseException:
            await spool.abort()
            raise
        return await spool.commit(expected)

    async def get(self, h: Hash, offset: int = 0) -> IReader:
        """
        Open a blob for streaming reads from C{offset}.
        """
        try:
            return await self.backend.open(blob_key(h), offset)
        except NotFound:
            raise BlobNotFound(h.hex) from None

    async def read(self, h: Hash, offset: int, length: int) -> bytes:
        """
        Up to C{length} bytes of a small blob from C{offset}, in one trip.
        """
        try:
            return await self.backend.read(blob_key(h), offset, length)
        except NotFound:
            raise BlobNotFound(h.hex) from None

    async def size(self, h: Hash) -> int | None:
        """
        The blob's size in bytes, or L{None} if it is not here.
        """
        stat = await self.backend.stat(blob_key(h))
        return None if stat is None else stat.size

    async def has(self, h: Hash) -> bool:
        return await self.size(h) is not None

    def delete(self, h: Hash) -> Deferred[bool]:
        return self.backend.delete(blob_key(h))

    async def hashes(self) -> AsyncIterable[Hash]:
        """
        Every blob in the store.
        """
        async for key in self.backend.keys(BLOB_PREFIX):
            yield Hash.from_hex(key.rsplit("/", 1)[-1])
