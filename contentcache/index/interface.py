"""
What the rest of the daemon may ask of the index, and the values it
answers with. Nothing outside the engine modules (L{contentcache.index.sqlite},
L{contentcache.index.postgresql}) knows which database holds it.

Two layers: L{IDatabase} is an engine's blocking connection to its
database (every method runs on one of the daemon's own threads);
L{IIndex} is what the daemon uses, the same methods as Deferreds run on
the disk pool, with access times gathered in memory and written in
batches.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence, TypeVar

from attrs import frozen
from twisted.internet.defer import Deferred
from zope.interface import Attribute, Interface

from ..compress import IDENTITY
from ..hash import Hash
from ..store import Blob

T = TypeVar("T")

#: How long the rows of the log of changes are kept: a process that has
#: not looked for longer than this drops its whole hot set.
CHANGES_KEPT = 60.0
#: Changes read at once; more than this, and a hot set is dropped whole.
CHANGES_LIMIT = 10_000


class IndexTooNew(Exception):
    """
    The index was written by a newer contentcache than this one.
    """


class IndexUnavailable(Exception):
    """
    The index cannot be reached now (its server is down or refuses us):
    a request that needs it is answered 503, and the next one tries again.
    The message is one line that names no secret.
    """


@frozen
class Entry:
    """
    One index entry: C{(protocol, key)} answered by the blob C{hash}.
    """

    protocol: str
    key: str
    hash: Hash
    size: int
    attrs: Mapping[str, Any]
    created: float
    accessed: float
    #: How the store holds the blob (see L{contentcache.compress}).
    encoding: str = IDENTITY

    @property
    def blob(self) -> Blob:
        """
        What the store needs to read the blob.
        """
        return Blob(self.hash, self.size, self.encoding)


@frozen
class Changes:
    """
    The keys whose entries changed after a position in the index's log of
    changes, and the position to look from next. C{keys} is L{None} when
    they cannot be told (too many, or some were pruned unseen): then
    everything held may be out of date.
    """

    keys: list[tuple[str, str]] | None
    position: int


@frozen
class Used:
    """
    An entry as expiry walks them, least recently used first.
    """

    accessed: float
    created: float
    protocol: str
    key: str
    hash: str

    @property
    def position(self) -> tuple[float, float, str, str]:
        """
        Where a walk that stopped here goes on from.
        """
        return (self.accessed, self.created, self.protocol, self.key)


@frozen
class BlobRow:
    """
    A blob as the index knows it: its stored size (after compression) and
    when it entered the store (or was last about to be referenced again).
    """

    hash: str
    stored: int
    created: float


@frozen
class Removed:
    """
    An entry a purge removed: its key and the blob it pointed at.
    """

    key: str
    hash: str


@frozen
class StoredBlob:
    """
    A blob's whole row, as migrate-index copies it.
    """

    hash: str
    size: int
    created: float
    encoding: str
    stored: int | None


@frozen
class TokenRow:
    """
    A client token as the index keeps it: its name, never the token.
    """

    name: str
    created: float
    last_used: float | None


@frozen
class StoreStats:
    """
    What the store holds, from counters the index keeps as entries and
    blobs change (never a scan of the tables).
    """

    #: Entries per protocol.
    entries: Mapping[str, int]
    blobs: int
    compressed_blobs: int
    #: What clients get: every entry counted.
    logical_bytes: int
    #: Each blob once.
    unique_bytes: int
    #: After compression.
    stored_bytes: int

    @classmethod
    def from_counters(cls, counters: Mapping[str, int]) -> StoreStats:
        """
        The figures from an engine's counters by name (C{entries:<protocol>}
        for each protocol's entries).
        """
        return cls(
            entries={name[8:]: value for name, value in counters.items() if name.startswith("entries:") and value},
            blobs=counters.get("blobs", 0),
            compressed_blobs=counters.get("compressed_blobs", 0),
            logical_bytes=counters.get("logical_bytes", 0),
            unique_bytes=counters.get("unique_bytes", 0),
            stored_bytes=counters.get("stored_bytes", 0),
        )


class IDatabase(Interface):
    """
    One engine's connection to the index, blocking: every method is
    called on one of the daemon's threads (or in the admin command), any
    of them at once. Hashes are hex strings here.
    """

    def get(protocol: str, key: str) -> Entry | None:
        """
        The entry for C{(protocol, key)}, or L{None}.
        """

    def lookup(
        protocol: str, wanted: Sequence[tuple[str, Callable[[Entry], Any] | None]]
    ) -> list[tuple[Entry, Any] | None]:
        """
        The entries of C{protocol} for several keys, each with what its
        function (run on this same thread: reading a small blob) makes of it.
        """

    def put(protocol: str, key: str, blob: Blob, attrs: Mapping[str, Any], now: float) -> Entry:
        """
        Create or replace the entry, answered by C{blob} as the store
        reported it, and record the blob.
        """

    def delete(protocol: str, key: str) -> bool:
        """
        Remove the entry; whether there was one.
        """

    def keys(protocol: str, prefix: str, limit: int) -> list[str]:
        """
        The keys of C{protocol} that start with C{prefix}, in order.
        """

    def references(hexhash: str) -> int:
        """
        How many entries point at the blob.
        """

    def touch(accesses: Mapping[tuple[str, str], float]) -> int:
        """
        Record uses (never moving an access time back); how many entries
        they touched.
        """

    def claim_blob(hexhash: str, now: float) -> bool:
        """
        A blob is about to be referenced (a miss found it in the store):
        make it young again, so that no expiry deletes it before its entry
        is written, waiting for a deletion of it under way to finish first.
        Whether the index knew it.
        """

    def delete_blob(hexhash: str, cutoff: float | None, remove: Callable[[], object]) -> bool:
        """
        Delete a blob if nothing references it (and, with C{cutoff}, it
        entered the store before then): the check, C{remove} (a blocking
        removal of its bytes from the store) and dropping its row in one
        transaction that holds the blob's row, so that no put can reuse it
        in between. Whether it went.
        """

    def forget_entries_of(hexhash: str, now: float) -> int:
        """
        The blob is gone from the store: remove every entry that points at
        it, keep its row (young again) for expiry; how many went.
        """

    def delete_where_hash(hexhash: str) -> int:
        """
        Remove every entry of the blob and its row (verify's repair).
        """

    def delete_prefixes(protocol: str, prefixes: Sequence[str]) -> list[Removed]:
        """
        Remove every entry of C{protocol} whose key starts with one of
        C{prefixes}.
        """

    def set_blob_storage(hexhash: str, encoding: str, stored: int) -> None:
        """
        Record how a blob is stored now.
        """

    def stats() -> StoreStats:
        """
        The store's figures, from the counters.
        """

    def least_recently_used(limit: int, after: tuple[float, float, str, str] | None) -> list[Used]:
        """
        Up to C{limit} entries in LRU order (ties: older first), after the
        position C{after}.
        """

    def reference_counts(hexhashes: Sequence[str]) -> dict[str, int]:
        """
        How many entries point at each of the blobs (absent: none).
        """

    def blob_rows(hexhashes: Sequence[str]) -> dict[str, BlobRow]:
        """
        The rows of those blobs the index knows.
        """

    def evict(entries: Sequence[tuple[str, str, str]]) -> list[BlobRow]:
        """
        Remove the given (protocol, key, hash) entries if they still point
        at that hash; the blobs nothing references any more.
        """

    def unreferenced_blobs(
        cutoff: float, limit: int, after: tuple[float, str] | None
    ) -> tuple[list[BlobRow], tuple[float, str] | None]:
        """
        Look at up to C{limit} blobs that entered the store before
        C{cutoff}, in order of age, after C{after}; the unreferenced ones,
        and where to go on from (L{None} at the end).
        """

    def recount() -> StoreStats:
        """
        Count the store's figures again from the tables (verify's repair).
        """

    def referenced_hashes() -> set[str]:
        """
        Every blob some entry points at.
        """

    def adopt_blob(blob: StoredBlob) -> bool:
        """
        Record a blob the store holds and the index does not know (an
        orphan verify found), so that deleting it is decided with its row
        held, as any other; whether it was unknown.
        """

    def empty() -> bool:
        """
        Whether the index holds no entry and no blob.
        """

    def create_token(name: str, digest: str, now: float) -> bool:
        """
        Record a client token by the digest of it; whether C{name} was free.
        """

    def token_named_by(digest: str) -> str | None:
        """
        The name of the token with this digest, if it is one.
        """

    def tokens() -> list[TokenRow]:
        """
        Every token, by name.
        """

    def revoke_token(name: str) -> bool:
        """
        Forget a token; whether there was one of that name.
        """

    def tokens_used(uses: Mapping[str, float]) -> None:
        """
        Record when tokens (by name) were last used, batched as entries' uses.
        """

    def entry_rows(after: tuple[str, str] | None, limit: int) -> list[Entry]:
        """
        Up to C{limit} entries in key order after C{after} (protocol, key).
        """

    def blob_records(after: str | None, limit: int) -> list[StoredBlob]:
        """
        Up to C{limit} blobs' rows in hash order after C{after}.
        """

    def load(blobs: Sequence[StoredBlob], entries: Sequence[Entry]) -> None:
        """
        Insert rows copied from another index, as they are (access times
        included), in one transaction.
        """

    def changes_since(position: int | None) -> Changes:
        """
        The keys changed after C{position} (L{None}: only where the log is
        now).
        """

    def prune_changes(keep: float) -> int:
        """
        Forget the changes older than C{keep} seconds (by the database's
        clock), and tidy what else the engine keeps as it goes (PostgreSQL:
        fold the counters' deltas in).
        """

    def nodes() -> int | None:
        """
        How many machines run daemons on this index now (L{None}: the
        engine cannot say, an index of one machine).
        """

    def writable() -> bool:
        """
        Whether the index answers and accepts writes now (raises if not).
        """

    def close() -> None:
        """
        Close every connection.
        """


class IIndex(Interface):
    """
    The metadata index as the daemon uses it. Every method but L{touch}
    returns a Deferred and does its work off the reactor thread; a
    database out of reach fails it with L{IndexUnavailable}.
    """

    description = Attribute("Where the index is, for a log line and C{/health} (no password).")

    def open() -> None:
        """
        Connect (creating or migrating the schema). Blocks: called once,
        before the reactor runs, so that an index that cannot be used stops
        startup in one sentence.
        """

    def get(protocol: str, key: str) -> Deferred[Entry | None]:
        """
        The entry for C{(protocol, key)}, or L{None}.
        """

    def lookup(
        protocol: str, wanted: Sequence[tuple[str, Callable[[Entry], T] | None]]
    ) -> Deferred[list[tuple[Entry, T | None] | None]]:
        """
        Several entries in one trip, each with what its function (a
        blocking read of its blob, say) makes of it in that trip.
        """

    def put(protocol: str, key: str, blob: Blob, attrs: Mapping[str, Any]) -> Deferred[Entry]:
        """
        Create or replace the entry for C{(protocol, key)}.
        """

    def delete(protocol: str, key: str) -> Deferred[bool]:
        """
        Remove the entry; fire with whether there was one.
        """

    def keys(protocol: str, prefix: str, limit: int) -> Deferred[list[str]]:
        """
        The keys of C{protocol} that start with C{prefix}, in order.
        """

    def references(hash: Hash) -> Deferred[int]:
        """
        How many entries point at the blob.
        """

    def touch(protocol: str, key: str) -> None:
        """
        Record a use of the entry now; written with the next batch.
        """

    def flush() -> Deferred[int]:
        """
        Write the recorded uses; fire with how many entries they touched.
        """

    def claim_blob(hash: Hash) -> Deferred[bool]:
        """
        See L{IDatabase.claim_blob}.
        """

    def delete_blob(hexhash: str, cutoff: float | None, remove: Callable[[], object]) -> Deferred[bool]:
        """
        See L{IDatabase.delete_blob}.
        """

    def forget_entries(hash: Hash) -> Deferred[int]:
        """
        The blob is gone from the store: remove every entry that points at
        it (its row stays for expiry).
        """

    def delete_where_hash(hexhash: str) -> Deferred[int]:
        """
        See L{IDatabase.delete_where_hash}.
        """

    def delete_prefixes(protocol: str, prefixes: Sequence[str]) -> Deferred[list[Removed]]:
        """
        See L{IDatabase.delete_prefixes}.
        """

    def set_blob_storage(hexhash: str, encoding: str, stored: int) -> Deferred[None]:
        """
        See L{IDatabase.set_blob_storage}.
        """

    def stats() -> Deferred[StoreStats]:
        """
        The store's figures.
        """

    def stored_bytes() -> Deferred[int]:
        """
        The bytes the store holds, after compression.
        """

    def least_recently_used(limit: int, after: tuple[float, float, str, str] | None) -> Deferred[list[Used]]:
        """
        See L{IDatabase.least_recently_used}.
        """

    def reference_counts(hexhashes: Sequence[str]) -> Deferred[dict[str, int]]:
        """
        See L{IDatabase.reference_counts}.
        """

    def blob_rows(hexhashes: Sequence[str]) -> Deferred[dict[str, BlobRow]]:
        """
        See L{IDatabase.blob_rows}.
        """

    def evict(entries: Sequence[tuple[str, str, str]]) -> Deferred[list[BlobRow]]:
        """
        See L{IDatabase.evict}.
        """

    def unreferenced_blobs(
        cutoff: float, limit: int, after: tuple[float, str] | None
    ) -> Deferred[tuple[list[BlobRow], tuple[float, str] | None]]:
        """
        See L{IDatabase.unreferenced_blobs}.
        """

    def recount() -> Deferred[StoreStats]:
        """
        See L{IDatabase.recount}.
        """

    def adopt_blob(blob: StoredBlob) -> Deferred[bool]:
        """
        See L{IDatabase.adopt_blob}.
        """

    def token_named_by(digest: str) -> Deferred[str | None]:
        """
        See L{IDatabase.token_named_by}.
        """

    def create_token(name: str, digest: str) -> Deferred[bool]:
        """
        See L{IDatabase.create_token}.
        """

    def tokens() -> Deferred[list[TokenRow]]:
        """
        See L{IDatabase.tokens}.
        """

    def revoke_token(name: str) -> Deferred[bool]:
        """
        See L{IDatabase.revoke_token}.
        """

    def token_used(name: str) -> None:
        """
        Record a use of a token now; written with the next batch.
        """

    def referenced_hashes() -> Deferred[set[str]]:
        """
        See L{IDatabase.referenced_hashes}.
        """

    def changes_since(position: int | None) -> Deferred[Changes]:
        """
        See L{IDatabase.changes_since}.
        """

    def prune_changes(keep: float) -> Deferred[int]:
        """
        See L{IDatabase.prune_changes}.
        """

    def nodes() -> Deferred[int | None]:
        """
        See L{IDatabase.nodes}.
        """

    def writable() -> Deferred[bool]:
        """
        Whether the index answers and accepts writes now.
        """

    def close() -> Deferred[None]:
        """
        Close the connections (L{flush} first: uses not written are lost).
        """
