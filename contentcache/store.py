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

import errno
import os
from functools import partial
from typing import AsyncIterable, AsyncIterator, Awaitable, BinaryIO, Callable, Iterable, TypeVar

from attrs import Factory, define, field, frozen
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from . import metrics, tempfiles
from .backend import IBackend, IReader, NotFound, Stat, StorageUnavailable, iterate
from .compress import IDENTITY, SUFFIXES, Compression, DecodeError, decode, decoder
from .hash import Hash, Hasher
from .pool import Runner
from .space import DiskSpace, Room, StorageFull, guarded, is_full
from .tracing import child_span

log = Logger()
T = TypeVar("T")

BLOB_PREFIX = "blobs"
#: A compressed blob up to this size is read whole to serve a slice of it.
MAX_DECODED_READ = 1 << 20
#: A blob up to this size is read whole, and checked, to serve any part of it.
MAX_WHOLE_READ = 256 * 1024
SPOOL_PREFIX = "spool-"

#: What the background scrub hashes in one trip to the disk pool.
REHASH_STEP = 8 << 20
#: Where damage was found, for the metric: a blob read in one piece, one
#: streamed, the background scrub.
FOUND_READING, FOUND_STREAMING, FOUND_SCRUBBING = "read", "stream", "scrub"
#: Read errors that mean the stored bytes are lost (a bad sector): damage,
#: fetched again, not an error to answer...
LOST = frozenset({errno.EIO})
#: ...unless reads fail this many times in a row: then the disk (a soft
#: mount, a failing controller), not a blob, is failing, and deleting what
#: it cannot read would lose what upstream may no longer have.
MAX_LOST_IN_A_ROW = 3


class BlobNotFound(KeyError):
    """
    The store holds no (good) blob with that hash.
    """

    def __init__(self, h: Hash) -> None:
        super().__init__(h.hex)
        self.hash = h

    def __str__(self) -> str:
        return self.hash.hex


class BlobCorrupt(BlobNotFound):
    """
    The blob's stored bytes are not what its hash says: it has been
    deleted (with its entries), to be fetched again.
    """


class _Damaged(Exception):
    """
    Raised on the disk pool: what was read does not hash to the blob's name,
    or ends early; the reactor side deletes it.
    """


def _unreadable(error: BaseException) -> bool:
    return isinstance(error, OSError) and error.errno in LOST


class HashMismatch(ValueError):
    """
    Content did not hash to the value it was expected to have.
    """

    def __init__(self, expected: Hash, actual: Hash) -> None:
        super().__init__(f"expected content {expected.hex}, got {actual.hex}")
        self.expected = expected
        self.actual = actual


@frozen
class Blob:
    """
    A blob as the index records it: its hash and size (both of the
    original bytes) and how the backend holds it.
    """

    hash: Hash
    size: int
    encoding: str = IDENTITY
    #: Bytes in the backend; L{None} when not known (then C{size}).
    stored: int | None = None


@frozen
class PutResult:
    """
    The outcome of adding content to the store.
    """

    blob: Blob
    #: False when the blob was already present and nothing new was written.
    created: bool

    @property
    def hash(self) -> Hash:
        return self.blob.hash

    @property
    def size(self) -> int:
        return self.blob.size


def blob_key(h: Hash, encoding: str = IDENTITY) -> str:
    """
    Where the backend keeps the blob C{h} stored in C{encoding}: the key
    says the encoding too, so the store can be walked and checked without
    the index.
    """
    return f"{BLOB_PREFIX}/{h.shard}/{h.hex}{SUFFIXES[encoding]}"


def parse_blob_key(key: str) -> tuple[Hash, str] | None:
    """
    The hash and encoding a backend key holds, or L{None} for a key that is
    not a blob's.
    """
    name = key.rsplit("/", 1)[-1]
    for encoding, suffix in SUFFIXES.items():
        if suffix and name.endswith(suffix):
            name, found = name[: -len(suffix)], encoding
            break
    else:
        found = IDENTITY
    try:
        return Hash.from_hex(name), found
    except ValueError:
        return None


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
        Append C{data} from code already running on the disk pool; a full
        disk raises L{StorageFull}.
        """
        guarded(self._store.space, self._handle.write, data)
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
            on_disk = await self._store._run_writing(tempfiles.finish, self._handle)
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
            if self._store.claim is not None:
                await self._store.claim(h)
            existing = await self._store.find(h)
            if existing is not None:
                encoding, stat = existing
                await self.abort()
                if (marked := self._store.space.wrote()) is not None:
                    await marked
                return PutResult(Blob(h, self.size, encoding, stat.size), created=False)
            disk = self._store._disk
            encoding, path, handle, stored = await self._store._run_writing(
                self._store._encode, self.path, self._handle, self.size
            )
            try:
                await self._store.backend.write_file(blob_key(h, encoding), path)
            except BaseException as e:
                await disk.run(tempfiles.discard, path, handle)
                if is_full(e):
                    raise self._store.space.failed(e) from e
                raise
            # The file stays locked until it is in place, out of a
            # starting worker's sweep.
            await disk.run(handle.close)
            if path != self.path:
                await self.abort()
        except BaseException:
            await self.abort()
            raise
        if (marked := self._store.space.wrote()) is not None:
            await marked
        return PutResult(Blob(h, self.size, encoding, stored), created=True)

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
    compression: Compression = field(factory=lambda: Compression(0))
    #: Whether the staging filesystem has room, as writes find it.
    space: DiskSpace = field(default=Factory(lambda self: DiskSpace(self.staging), takes_self=True))
    #: Called with a blob's hash when damage to it was found and no good
    #: copy is left, once the damaged object is deleted: the cache forgets
    #: every entry that points at it, so the next request fetches it again.
    damaged: Callable[[Hash], Awaitable[object]] | None = None
    #: Called with a blob's hash before a put looks for it in the store:
    #: the index makes it young again (after any deletion of it under way),
    #: so that expiry leaves it alone until the entry that reuses it is
    #: written, on any worker or node.
    claim: Callable[[Hash], Awaitable[object]] | None = None
    #: Reads that failed with a LOST error since the last that did not.
    lost_in_a_row: int = field(default=0, init=False)

    def room(self) -> Deferred[Room]:
        """
        The staging filesystem's size and free bytes, measured now.
        """
        return self._disk.run(self.space.measure)

    async def probe(self) -> None:
        """
        Whether the store can be written: a file created and removed in the
        staging directory, and a round trip to the backend (S3: a HEAD
        that finds nothing). L{StorageFull} while a write has found no
        room and none has succeeded since.
        """
        # One trip: a client that leaves between two would leave the file.
        await self._run_writing(_probe_directory, self.staging)
        await self.backend.stat(BLOB_PREFIX)
        if await self._disk.run(self.space.full_now):
            raise StorageFull(f"the storage is full ({self.space.reason or 'as another worker found'})")

    def _run_writing(self, f: Callable[..., T], *args: object) -> Deferred[T]:
        """
        Run a blocking write on the disk pool; a full disk is L{StorageFull}.
        """
        return self._disk.run(guarded, self.space, f, *args)

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
        path, handle = await self._run_writing(tempfiles.create, self.staging, SPOOL_PREFIX)
        return Spool(self, path, handle)

    def _encode(self, path: str, handle: BinaryIO, size: int) -> tuple[str, str, BinaryIO, int]:
        """
        Prepare a closed spool for the backend: (encoding, the file to
        store, its locked handle, its size). A compressed copy goes beside
        the spool; otherwise the spool itself is stored.
        """
        if self.space.min_free.enabled:
            # How much room this blob leaves, for expiry (a statvfs).
            self.space.measure()
        if not self.compression.enabled:
            return IDENTITY, path, handle, size
        with open(path, "rb") as source:
            target, compressed = tempfiles.create(self.staging, SPOOL_PREFIX)
            try:
                encoding = self.compression.encode(source, size, compressed)
                if encoding == IDENTITY:
                    tempfiles.discard(target, compressed)
                    return IDENTITY, path, handle, size
                return encoding, target, compressed, tempfiles.finish(compressed)
            except BaseException:
                tempfiles.discard(target, compressed)
                raise

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

    async def find(self, h: Hash) -> tuple[str, Stat] | None:
        """
        How the blob C{h} is stored (its encoding and the stored object's
        L{Stat}), or L{None} if it is not here.
        """
        for encoding in SUFFIXES:
            stat = await self.backend.stat(blob_key(h, encoding))
            if stat is not None:
                return encoding, stat
        return None

    async def _open(self, h: Hash, candidates: list[str], offset: int) -> tuple[IReader, str]:
        """
        Open the stored object in the first of C{candidates} it is stored
        in. An object stored as it came is opened at C{offset}.
        """
        for candidate in candidates:
            try:
                raw = await self.backend.open(blob_key(h, candidate), offset if candidate == IDENTITY else 0)
            except NotFound:
                continue
            return raw, candidate
        raise BlobNotFound(h)

    def _decoding(self, raw: IReader, encoding: str, offset: int) -> BinaryIO:
        stream = decoder(raw.stream, encoding)
        try:
            # Forward only: zstd decodes and drops what comes before.
            stream.seek(offset)
        except BaseException:
            stream.close()
            raise
        return stream

    async def get(self, blob: Blob, offset: int = 0) -> IReader:
        """
        Open a blob for streaming reads of its original bytes from
        C{offset}; the reader's C{size} is the blob's. It is stored as the
        index says or, if that is not there (another worker stored it
        otherwise), in another encoding. Read from the start to the end,
        the bytes are checked against the hash: the last read fails with
        L{BlobCorrupt} instead of returning the end of a damaged blob.
        """
        candidates = _candidates(blob.encoding)
        damaged = False
        while True:
            try:
                raw, encoding = await self._open(blob.hash, candidates, offset)
            except BlobNotFound:
                raise (BlobCorrupt if damaged else BlobNotFound)(blob.hash) from None
            if encoding == IDENTITY:
                return _BlobReader(self, blob.hash, encoding, raw, None, blob.size, offset)
            try:
                stream = await self._disk.run(self._decoding, raw, encoding, offset)
            except (DecodeError, OSError) as e:
                await self._damage(blob.hash, encoding, e, FOUND_STREAMING)
                damaged = True
                candidates.remove(encoding)
                continue
            return _BlobReader(self, blob.hash, encoding, raw, stream, blob.size, offset)

    async def _damage(self, h: Hash, encoding: str, error: Exception, found: str) -> None:
        """
        What reading the object found: a read error that loses its bytes
        (L{_lost}), or bytes that do not decode or match (deleted). Any other
        read error is raised again.
        """
        if isinstance(error, OSError):
            if not _unreadable(error):
                raise error
            await self._lost(h, encoding, error, found)
        else:
            await self._discard_damaged(h, encoding, error, found)

    async def _lost(self, h: Hash, encoding: str, error: OSError, found: str) -> None:
        """
        An object could not be read (EIO): damage, deleted as such, unless
        reads have failed L{MAX_LOST_IN_A_ROW} times in a row: then nothing
        is deleted and the storage is unavailable (503), for now.
        """
        self.lost_in_a_row += 1
        if self.lost_in_a_row >= MAX_LOST_IN_A_ROW:
            raise StorageUnavailable(
                f"the storage fails reads ({self.lost_in_a_row} in a row, the last: {error.strerror}); "
                "nothing is deleted"
            ) from error
        await self._discard_damaged(h, encoding, error, found)

    async def _discard_damaged(self, h: Hash, encoding: str, error: object, found: str) -> None:
        """
        Delete a stored object that does not decode or hash to its name, so
        that the blob is read from another copy, or, when none is left, its
        entries are forgotten and it is fetched again.
        """
        log.warn(
            "blob {hash} is damaged ({error}), found {found}; deleting it to fetch it again",
            hash=h.hex, error=error, found={FOUND_READING: "reading it", FOUND_STREAMING: "streaming it",
                                             FOUND_SCRUBBING: "by the scrub"}.get(found, found),
        )
        metrics.corrupt_blobs.labels(found).inc()
        await self.backend.delete(blob_key(h, encoding))
        if self.damaged is not None and await self.find(h) is None:
            await self.damaged(h)

    async def read(self, blob: Blob, offset: int, length: int) -> bytes:
        """
        C{length} bytes of a blob from C{offset} (fewer past its end), in one
        trip to the disk pool. A blob of at most L{MAX_WHOLE_READ} bytes (or
        any read of a whole blob) is read whole and checked against its
        hash in that trip; a damaged one is deleted and the blob read from
        another copy, or it is missing (L{BlobCorrupt}): fetched again.
        """
        damaged = False
        whole = blob.size <= MAX_WHOLE_READ or (offset == 0 and length >= blob.size)
        for encoding in _candidates(blob.encoding):
            key = blob_key(blob.hash, encoding)
            try:
                if encoding == IDENTITY:
                    if whole:
                        then = partial(_checked, blob, offset, length)
                        try:
                            data = await self.backend.read(key, 0, blob.size, then)
                        except OSError as e:
                            if not _unreadable(e):
                                raise
                            # Once more before it counts as lost.
                            data = await self.backend.read(key, 0, blob.size, then)
                        self.lost_in_a_row = 0
                        return data
                    # A part of a large blob: its bytes are checked only
                    # when it is streamed whole, and by the scrub.
                    data = await self.backend.read(key, offset, length)
                    if len(data) < min(length, blob.size - offset):
                        raise _Damaged(f"it ends before byte {offset + length:,} of {blob.size:,}")
                    return data
                if blob.size > MAX_DECODED_READ:
                    return await self._read_streamed(Blob(blob.hash, blob.size, encoding), offset, length)
                # The whole object (a small blob compressed is smaller
                # still), decoded and checked in the same trip.
                return await self.backend.read(
                    key, 0, blob.size + (blob.size >> 6) + 1024,
                    partial(_slice_decoded, encoding, blob, offset, length),
                )
            except NotFound:
                continue
            except BlobNotFound as e:
                # Streamed: not there, or damaged (and deleted already).
                damaged = damaged or isinstance(e, BlobCorrupt)
                continue
            except (DecodeError, _Damaged, OSError) as e:
                await self._damage(blob.hash, encoding, e, FOUND_READING)
                damaged = True
        raise (BlobCorrupt if damaged else BlobNotFound)(blob.hash)

    def read_now(self, blob: Blob, limit: int) -> bytes | None:
        """
        On the disk pool: a blob of at most C{limit} bytes, whole and
        checked, read as the index says it is stored, if the backend reads
        on the calling thread (the filesystem does). L{None} when it cannot
        be read that way (too large, S3, not there, damaged): L{read} then
        reads it, and deals with what it finds.
        """
        read = getattr(self.backend, "read_blocking", None)
        if read is None or blob.size > limit:
            return None
        try:
            if blob.encoding == IDENTITY:
                data = read(blob_key(blob.hash), 0, blob.size)
            else:
                raw = read(blob_key(blob.hash, blob.encoding), 0, blob.size + (blob.size >> 6) + 1024)
                data = decode(raw, blob.encoding, blob.size)
        except Exception:
            return None
        if _check(blob.hash, blob.size, data) is not None:
            return None
        self.lost_in_a_row = 0
        return data

    async def _read_streamed(self, blob: Blob, offset: int, length: int) -> bytes:
        reader = await self.get(blob, offset)
        try:
            parts = []
            while length > 0 and (chunk := await reader.read(length)):
                parts.append(chunk)
                length -= len(chunk)
            return b"".join(parts)
        finally:
            await reader.close()

    async def _rehash(self, h: Hash, encoding: str) -> tuple[Hash | None, int]:
        """
        What the object decodes to hashes to (L{None} if it does not decode),
        and the bytes it takes; read in steps of L{REHASH_STEP}, so that a
        large blob does not hold a disk thread for long.
        """
        try:
            raw = await self.backend.open(blob_key(h, encoding))
        except NotFound:
            raise BlobNotFound(h) from None
        stream = decoder(raw.stream, encoding)
        hasher = Hasher()
        try:
            while await self._disk.run(_hash_some, stream, hasher, REHASH_STEP):
                pass
        except DecodeError:
            return None, raw.size
        except NotFound:
            raise BlobNotFound(h) from None
        finally:
            await self._disk.run(stream.close)
        return hasher.finish(), raw.size

    async def rehash(self, h: Hash, encoding: str) -> Hash | None:
        """
        The hash of what the object holding C{h} in C{encoding} decodes to:
        C{h} itself unless it is corrupt; L{None} if it does not decode.
        Fails with L{BlobNotFound}.
        """
        return (await self._rehash(h, encoding))[0]

    async def scrub(self, h: Hash, encoding: str) -> tuple[bool, int]:
        """
        Check one stored object as a read would: one that does not decode or
        hash to its name, or cannot be read twice over, is deleted (and,
        with no good copy left, its entries forgotten). Fires with whether
        it was sound and the bytes it takes; fails with L{BlobNotFound}, or
        L{StorageUnavailable} when reads fail in a row.
        """
        for attempt in (1, 2):
            try:
                actual, stored = await self._rehash(h, encoding)
                break
            except OSError as e:
                if not _unreadable(e):
                    raise
                if attempt == 2:
                    await self._lost(h, encoding, e, FOUND_SCRUBBING)
                    return False, 0
        self.lost_in_a_row = 0
        if actual == h:
            return True, stored
        why = "it does not decode" if actual is None else f"its bytes hash to {actual.hex[:16]}..."
        await self._discard_damaged(h, encoding, why, FOUND_SCRUBBING)
        return False, stored

    async def has(self, h: Hash) -> bool:
        return await self.find(h) is not None

    async def delete(self, h: Hash, encoding: str | None = None) -> bool:
        """
        Remove the blob as stored in C{encoding}, or in every encoding it is
        stored in; whether there was one.
        """
        deleted = False
        for encoding in SUFFIXES if encoding is None else [encoding]:
            deleted = await self.backend.delete(blob_key(h, encoding)) or deleted
        return deleted

    def delete_now(self, h: Hash) -> bool:
        """
        Remove the blob in every encoding it is stored in, blocking: on
        the index's thread, inside the transaction that decided it goes.
        """
        deleted = False
        for encoding in SUFFIXES:
            deleted = self.backend.delete_now(blob_key(h, encoding)) or deleted
        return deleted

    async def stored(self) -> AsyncIterator[tuple[Hash, str]]:
        """
        Every stored blob object: its hash and encoding.
        """
        async for key in self.backend.keys(BLOB_PREFIX):
            parsed = parse_blob_key(key)
            if parsed is not None:
                yield parsed


def _candidates(encoding: str) -> list[str]:
    """
    The encodings to look for a blob in: the recorded one first.
    """
    return [encoding, *(e for e in SUFFIXES if e != encoding)]


@implementer(IReader)
@define
class _BlobReader:
    """
    A blob's original bytes from the object the backend holds, decoded on
    the disk pool if it is compressed. Read from its start, the bytes are
    hashed on the disk pool as they go, and the read that reaches the end
    returns only if the hash matches: a damaged blob never comes out whole.
    An object that is gone comes out as L{BlobNotFound}; one that turns out
    damaged (it does not decode or hash to its name, or ends early) is
    deleted and comes out as L{BlobCorrupt}.
    """

    _store: Store
    _hash: Hash
    _encoding: str
    _raw: IReader
    #: The decoding stream; L{None} for an object stored as it came.
    _decoded: BinaryIO | None
    size: int
    _position: int
    _hasher: Hasher | None = None

    def __attrs_post_init__(self) -> None:
        if self._position == 0:
            self._hasher = Hasher()

    @property
    def stream(self) -> BinaryIO:
        return self._raw.stream if self._decoded is None else self._decoded

    def _next(self, size: int) -> bytes:
        # On the disk pool: one trip reads, hashes and, at the end, checks.
        data = self.stream.read(size)
        self._store.lost_in_a_row = 0
        if not data and size > 0 and self._position < self.size:
            raise _Damaged(f"it ends after {self._position:,} of {self.size:,} bytes")
        self._position += len(data)
        if self._hasher is not None:
            self._hasher.update(data)
            if self._position >= self.size:
                error = _check(self._hash, self.size, None, self._hasher)
                if error is not None:
                    raise _Damaged(error)
        return data

    async def _discard(self, error: Exception) -> bytes:
        await self._store._damage(self._hash, self._encoding, error, FOUND_STREAMING)
        raise BlobCorrupt(self._hash)

    def _failed(self, failure: Failure) -> Deferred[bytes]:
        if failure.check(NotFound):
            raise BlobNotFound(self._hash)
        if not failure.check(_Damaged, DecodeError) and not _unreadable(failure.value):
            failure.raiseException()
        return Deferred.fromCoroutine(self._discard(failure.value))

    def read(self, size: int) -> Deferred[bytes]:
        # The hot path of a large hit: one trip to the pool, no coroutine.
        return self._store._disk.run(self._next, size).addErrback(self._failed)

    def close(self) -> Deferred[None]:
        if self._decoded is None:
            return self._raw.close()
        return self._store._disk.run(self._decoded.close)


def _check(h: Hash, size: int, data: bytes | None, hasher: Hasher | None = None) -> str | None:
    """
    Why C{data} (or what C{hasher} saw) is not the blob C{h} of C{size}
    bytes, or L{None} if it is.
    """
    if hasher is None:
        assert data is not None
        if len(data) == size and h.matches(data):
            return None
        hasher = Hasher()
        hasher.update(data)
    if hasher.size != size:
        return f"it holds {hasher.size:,} bytes, not {size:,}"
    actual = hasher.finish()
    if actual != h:
        return f"its bytes hash to {actual.hex[:16]}..."
    return None


def _probe_directory(directory: str) -> None:
    path, handle = tempfiles.create(directory, "probe-")
    tempfiles.discard(path, handle)


def _hash_some(stream: BinaryIO, hasher: Hasher, size: int) -> int:
    """
    Hash up to C{size} more bytes of C{stream}; how many there were.
    """
    done = 0
    while done < size and (chunk := stream.read(min(1 << 20, size - done))):
        hasher.update(chunk)
        done += len(chunk)
    return done


def _checked(blob: Blob, offset: int, length: int, data: bytes) -> bytes:
    """
    A slice of a blob read whole, once it is checked (on the disk pool).
    """
    error = _check(blob.hash, blob.size, data)
    if error is not None:
        raise _Damaged(error)
    return data[offset : offset + length]


def _slice_decoded(encoding: str, blob: Blob, offset: int, length: int, data: bytes) -> bytes:
    """
    A slice of a small compressed blob, decoded and checked whole.
    """
    return _checked(blob, offset, length, decode(data, encoding, blob.size))
