"""
L{IIndex} for any engine: each call on the disk pool, uses gathered in
memory and written in batches, writes guarded against a full disk.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence, TypeVar

from attrs import define, field
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from ..hash import Hash
from ..pool import Runner
from ..space import DiskSpace, StorageFull, guarded
from ..store import Blob
from ..tracing import traced_call
from .interface import (
    BlobRow,
    Changes,
    Entry,
    IDatabase,
    IIndex,
    IndexUnavailable,
    Removed,
    StoredBlob,
    StoreStats,
    TokenRow,
    Used,
)

T = TypeVar("T")

#: Write the recorded accesses early once this many are waiting.
DEFAULT_FLUSH_THRESHOLD = 1000


class _NotOpen:
    """
    The database of an index not open (yet, or any more).
    """

    def __getattr__(self, name: str) -> Callable[..., Any]:
        def closed(*args: object) -> Any:
            raise IndexUnavailable("the index is not open")

        closed.__name__ = name
        return closed


_NOT_OPEN: Any = _NotOpen()


@implementer(IIndex)
@define
class PooledIndex:
    """
    An engine's L{IDatabase}, opened by C{connect}, used from the reactor
    thread: every call runs on C{disk}.
    """

    log = Logger()

    #: Where the index is, for log lines and /health (no password).
    description: str
    _connect: Callable[[], IDatabase]
    _disk: Runner
    _clock: IReactorTime
    flush_threshold: int = DEFAULT_FLUSH_THRESHOLD
    #: Told when the index cannot grow because the disk is full (an index
    #: on the local disk only).
    space: DiskSpace | None = None
    _database: IDatabase | None = None
    _pending: dict[tuple[str, str], float] = field(factory=dict)
    _token_uses: dict[str, float] = field(factory=dict)

    def open(self) -> None:
        self._database = self._connect()

    @property
    def database(self) -> IDatabase:
        """
        The engine's blocking connection (for the admin command's and the
        tests' synchronous use); before L{open} and after L{close}, one
        whose every call fails with L{IndexUnavailable}.
        """
        return self._database if self._database is not None else _NOT_OPEN

    def _read(self, call: Callable[..., T], *args: object) -> Deferred[T]:
        # What every hit asks: it writes nothing (so needs no full-disk
        # guard) and is not worth a span of its own.
        return self._disk.run(call, *args)

    def _write(self, name: str, call: Callable[..., T], *args: object) -> Deferred[T]:
        d = self._disk.run(call, *args) if self.space is None else self._disk.run(guarded, self.space, call, *args)
        return traced_call(f"index {name}", d)

    def get(self, protocol: str, key: str) -> Deferred[Entry | None]:
        return self._read(self.database.get, protocol, key)

    def lookup(
        self, protocol: str, wanted: Sequence[tuple[str, Callable[[Entry], T] | None]]
    ) -> Deferred[list[tuple[Entry, T | None] | None]]:
        return self._read(self.database.lookup, protocol, wanted)

    def put(self, protocol: str, key: str, blob: Blob, attrs: Mapping[str, Any]) -> Deferred[Entry]:
        self._pending.pop((protocol, key), None)
        return self._write("put", self.database.put, protocol, key, blob, attrs, self._clock.seconds())

    def delete(self, protocol: str, key: str) -> Deferred[bool]:
        self._pending.pop((protocol, key), None)
        return self._write("delete", self.database.delete, protocol, key)

    def keys(self, protocol: str, prefix: str, limit: int = 10_000) -> Deferred[list[str]]:
        return self._read(self.database.keys, protocol, prefix, limit)

    def references(self, hash: Hash) -> Deferred[int]:
        return self._read(self.database.references, hash.hex)

    def touch(self, protocol: str, key: str) -> None:
        self._pending[protocol, key] = self._clock.seconds()
        if len(self._pending) >= self.flush_threshold:
            self.flush().addErrback(self._flush_failed)

    def _flush_failed(self, failure: Failure) -> None:
        if failure.check(StorageFull):  # said already, once a minute
            return
        if failure.check(IndexUnavailable):
            self.log.warn("writing access times to the index failed: {error}", error=failure.value)
            return
        self.log.failure("writing access times to the index failed", failure)

    def flush(self) -> Deferred[int]:
        batch, self._pending = self._pending, {}
        tokens, self._token_uses = self._token_uses, {}
        if self._database is None or not (batch or tokens):
            return succeed(0)
        if tokens:
            d = self._write("tokens used", self._database.tokens_used, tokens)
            if not batch:
                return d.addCallback(lambda _: 0)
            d.addErrback(self._flush_failed)
        return self._write("touch", self._database.touch, batch)

    def claim_blob(self, hash: Hash) -> Deferred[bool]:
        return self._write("claim blob", self.database.claim_blob, hash.hex, self._clock.seconds())

    def delete_blob(self, hexhash: str, cutoff: float | None, remove: Callable[[], object]) -> Deferred[bool]:
        return self._write("delete blob", self.database.delete_blob, hexhash, cutoff, remove)

    def forget_entries(self, hash: Hash) -> Deferred[int]:
        return self._write("forget entries", self.database.forget_entries_of, hash.hex, self._clock.seconds())

    def delete_where_hash(self, hexhash: str) -> Deferred[int]:
        return self._write("delete where hash", self.database.delete_where_hash, hexhash)

    def delete_prefixes(self, protocol: str, prefixes: Sequence[str]) -> Deferred[list[Removed]]:
        return self._write("delete prefixes", self.database.delete_prefixes, protocol, prefixes)

    def set_blob_storage(self, hexhash: str, encoding: str, stored: int) -> Deferred[None]:
        return self._write("set blob storage", self.database.set_blob_storage, hexhash, encoding, stored)

    def stats(self) -> Deferred[StoreStats]:
        return self._read(self.database.stats)

    def stored_bytes(self) -> Deferred[int]:
        return self._read(lambda: self.database.stats().stored_bytes)

    def least_recently_used(self, limit: int, after: tuple[float, float, str, str] | None) -> Deferred[list[Used]]:
        return self._read(self.database.least_recently_used, limit, after)

    def reference_counts(self, hexhashes: Sequence[str]) -> Deferred[dict[str, int]]:
        return self._read(self.database.reference_counts, hexhashes)

    def blob_rows(self, hexhashes: Sequence[str]) -> Deferred[dict[str, BlobRow]]:
        return self._read(self.database.blob_rows, hexhashes)

    def evict(self, entries: Sequence[tuple[str, str, str]]) -> Deferred[list[BlobRow]]:
        return self._write("evict", self.database.evict, entries)

    def unreferenced_blobs(
        self, cutoff: float, limit: int, after: tuple[float, str] | None
    ) -> Deferred[tuple[list[BlobRow], tuple[float, str] | None]]:
        return self._read(self.database.unreferenced_blobs, cutoff, limit, after)

    def recount(self) -> Deferred[StoreStats]:
        return self._write("recount", self.database.recount)

    def adopt_blob(self, blob: StoredBlob) -> Deferred[bool]:
        return self._write("adopt blob", self.database.adopt_blob, blob)

    def token_named_by(self, digest: str) -> Deferred[str | None]:
        return self._read(self.database.token_named_by, digest)

    def create_token(self, name: str, digest: str) -> Deferred[bool]:
        return self._write("create token", self.database.create_token, name, digest, self._clock.seconds())

    def tokens(self) -> Deferred[list[TokenRow]]:
        return self._read(self.database.tokens)

    def revoke_token(self, name: str) -> Deferred[bool]:
        return self._write("revoke token", self.database.revoke_token, name)

    def token_used(self, name: str) -> None:
        self._token_uses[name] = self._clock.seconds()

    def referenced_hashes(self) -> Deferred[set[str]]:
        return self._read(self.database.referenced_hashes)

    def changes_since(self, position: int | None) -> Deferred[Changes]:
        return self._read(self.database.changes_since, position)

    def prune_changes(self, keep: float) -> Deferred[int]:
        return self._write("prune changes", self.database.prune_changes, keep)

    def nodes(self) -> Deferred[int | None]:
        return self._read(self.database.nodes)

    def writable(self) -> Deferred[bool]:
        return self._write("writable", self.database.writable)

    def close(self) -> Deferred[None]:
        db, self._database = self._database, None
        if db is None:
            return succeed(None)
        return self._disk.run(db.close)
