"""
Byte storage under string keys: the interface the content-addressable store
is written against, so that the filesystem and object storage are
interchangeable.

A key is a relative, slash-separated path whose components consist of ASCII
letters, digits, C{.}, C{_} and C{-} and do not start with C{.}. No key can
name anything outside the backend's root, and names starting with C{.} stay
free for the backend's own temporary objects.
"""

from __future__ import annotations

import re
from typing import AsyncIterable, AsyncIterator, BinaryIO, Callable, Iterable

from attrs import define, frozen
from twisted.internet.defer import Deferred
from zope.interface import Attribute, Interface, implementer

from ..pool import Runner

MAX_KEY_LENGTH = 1024
_KEY = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]*(?:/[A-Za-z0-9_-][A-Za-z0-9._-]*)*")


class InvalidKey(ValueError):
    """
    A key that could name something outside the backend's root.
    """


class StorageUnavailable(Exception):
    """
    The storage cannot be used; the message is one sentence for the
    operator.
    """


class NotFound(KeyError):
    """
    Nothing is stored under the key.
    """


def check_key(key: str) -> str:
    """
    Return C{key} if it is a valid key; raise L{InvalidKey} otherwise.
    """
    if (
        not isinstance(key, str)
        or len(key) > MAX_KEY_LENGTH
        or _KEY.fullmatch(key) is None
    ):
        raise InvalidKey(f"not a valid storage key: {key!r:.80}")
    return key


async def iterate(source: AsyncIterable[bytes] | Iterable[bytes]) -> AsyncIterator[bytes]:
    """
    Iterate asynchronously over a stream of chunks given either way.
    """
    if isinstance(source, AsyncIterable):
        async for chunk in source:
            yield chunk
    else:
        for chunk in source:
            yield chunk


@frozen
class Stat:
    """
    What the backend knows of a stored object.
    """

    size: int
    mtime: float


class IReader(Interface):
    """
    A stored object open for streaming reads.
    """

    size = Attribute("The object's total size in bytes.")
    stream = Attribute(
        "The blocking file-like object underneath, for code that runs on "
        "the disk pool (the store's decoder): read it nowhere else."
    )

    def read(size: int) -> Deferred[bytes]:
        """
        Read up to C{size} bytes; C{b""} at the end.
        """

    def close() -> Deferred[None]:
        """
        Release the object.
        """


@implementer(IReader)
@define
class BlockingReader:
    """
    A blocking stream (a file, an HTTP response body) read on the disk
    pool, one trip per read.
    """

    _disk: Runner
    stream: BinaryIO
    size: int

    def read(self, size: int) -> Deferred[bytes]:
        return self._disk.run(self.stream.read, size)

    def close(self) -> Deferred[None]:
        return self._disk.run(self.stream.close)


class IBackend(Interface):
    """
    Atomic, streaming storage of byte objects under keys.

    Every method returns a L{Deferred} (or is an async iterator) and does its
    blocking work off the reactor thread.
    """

    def check() -> None:
        """
        Blocking, once at start before anything else runs: raise
        L{StorageUnavailable} if the storage cannot be used.
        """

    def sweep() -> Deferred[int]:
        """
        Remove what interrupted writes left behind; run once at start.
        Fires with how many leftovers were removed.
        """

    def write(key: str, chunks: AsyncIterable[bytes] | Iterable[bytes]) -> Deferred[None]:
        """
        Store the stream under C{key} atomically: readers see the previous
        object or the complete new one, never a part. If the stream raises,
        nothing is stored and the error propagates.
        """

    def write_file(key: str, path: str) -> Deferred[None]:
        """
        Store a complete local file under C{key} atomically, consuming it
        (the file at C{path} is gone afterwards). For a backend on the same
        filesystem this is a rename.
        """

    def open(key: str, offset: int = 0) -> Deferred[IReader]:
        """
        Open C{key} for reading from C{offset}; fails with L{NotFound}.
        """

    def read(key: str, offset: int, length: int, then: Callable[[bytes], bytes] | None = None) -> Deferred[bytes]:
        """
        Up to C{length} bytes of C{key} from C{offset}, in one call: for
        small objects, where open, read and close as three trips would cost
        more than the bytes. C{then}, a blocking function, gets them in the
        same trip (the store checks them there) and returns what this fires
        with. Fails with L{NotFound}.
        """

    def stat(key: str) -> Deferred[Stat | None]:
        """
        Fire with the object's L{Stat}, or L{None} if there is none.
        """

    def delete(key: str) -> Deferred[bool]:
        """
        Remove C{key}; fire with whether there was an object to remove.
        """

    def delete_now(key: str) -> bool:
        """
        L{delete}, blocking: for a caller already off the reactor thread
        (the index, deciding in one transaction that a blob goes).
        """

    def keys(prefix: str = "") -> AsyncIterator[str]:
        """
        Iterate over every stored key under C{prefix}, in batches read off
        the reactor thread.
        """
