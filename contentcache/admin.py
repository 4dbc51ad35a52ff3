"""
What the operator's command does to a storage directory, running or not:
statistics, verifying every blob, and purging a package.
"""

from __future__ import annotations

import time
from functools import partial
from typing import Any, Callable

from attrs import define, field

from .expiry import DEFAULT_GRACE
from .hash import Hash
from .index import IDatabase, IIndex, Removed, StoredBlob
from .protocol.goproxy.paths import InvalidPath, Module, escape
from .protocol.goproxy.resource import PROTOCOL as GO
from .protocol.npm.names import InvalidName, PackageName
from .protocol.npm.resource import ABBR, FULL
from .protocol.npm.resource import PROTOCOL as NPM
from .store import BlobNotFound, Store

Progress = Callable[[int, int | None], None]


def _ratio(a: int, b: int) -> float | None:
    return round(a / b, 3) if b else None


async def stats(index: IIndex) -> dict[str, Any]:
    """
    What the store holds: entries per protocol, blobs, and bytes three
    ways: logical (what clients get, every entry counted), unique (each
    blob once) and stored (after compression), with the ratios between.
    """
    figures = await index.stats()
    found: dict[str, Any] = {
        "entries": dict(figures.entries),
        "blobs": figures.blobs,
        "compressed_blobs": figures.compressed_blobs,
        "logical_bytes": figures.logical_bytes,
        "unique_bytes": figures.unique_bytes,
        "stored_bytes": figures.stored_bytes,
    }
    logical, unique, stored = figures.logical_bytes, figures.unique_bytes, figures.stored_bytes
    found["dedup_ratio"] = _ratio(logical, unique)
    found["compression_ratio"] = _ratio(unique, stored)
    found["ratio"] = _ratio(logical, stored)
    return found


@define
class Verification:
    blobs: int = 0
    corrupt: list[str] = field(factory=list)
    missing: list[str] = field(factory=list)
    orphans: list[str] = field(factory=list)
    repaired: bool = False

    @property
    def problems(self) -> int:
        return len(self.corrupt) + len(self.missing) + len(self.orphans)

    def as_dict(self) -> dict[str, Any]:
        return {
            "blobs": self.blobs,
            "corrupt": self.corrupt,
            "missing": self.missing,
            "orphans": self.orphans,
            "problems": self.problems,
            "repaired": self.repaired,
        }


async def verify(
    index: IIndex,
    store: Store,
    repair: bool,
    progress: Progress | None = None,
    grace: float = DEFAULT_GRACE,
) -> Verification:
    """
    Re-hash every blob; find corrupt blobs (content does not match the
    name), missing ones (an entry points at nothing) and orphans (no entry
    points at them, and they are older than C{grace}). With C{repair}: delete corrupt blobs and orphans, and
    the entries of corrupt and missing blobs, so the next request fetches
    them again.
    """
    result = Verification()
    good: set[str] = set()
    #: Each damaged object: a blob stored twice (two workers, two
    #: encodings) may have one good copy.
    damaged: list[tuple[str, str]] = []
    async for h, encoding in store.stored():
        try:
            actual = await store.rehash(h, encoding)
        except BlobNotFound:
            continue  # expiry deleted it while we walked
        if h.hex not in good and all(d[0] != h.hex for d in damaged):
            result.blobs += 1
            if progress is not None:
                progress(result.blobs, None)
        if actual == h:
            good.add(h.hex)
        else:
            damaged.append((h.hex, encoding))
    result.corrupt = sorted({hexhash for hexhash, _ in damaged})
    # A blob with no good copy at all is corrupt, not also missing.
    present = good | set(result.corrupt)
    referenced = await index.referenced_hashes()
    # A running daemon stores new blobs while the walk goes on: missing
    # means missing now, not only from the walk.
    result.missing = [h for h in sorted(referenced - present) if not await store.has(Hash.from_hex(h))]
    # A blob a running daemon has just stored has no entry for a moment.
    young_from = time.time() - grace
    # A damaged blob is corrupt, not also an orphan.
    for hexhash in sorted(present - referenced - set(result.corrupt)):
        found = await store.find(Hash.from_hex(hexhash))
        if found is not None and found[1].mtime < young_from:
            result.orphans.append(hexhash)
    if repair:
        # Entries go only where no good copy is left; a damaged copy beside
        # a good one goes alone.
        for hexhash in [h for h in result.corrupt if h not in good] + result.missing:
            await index.delete_where_hash(hexhash)
        for hexhash, encoding in damaged:
            await store.delete(Hash.from_hex(hexhash), encoding)
        for hexhash in [h for h in result.corrupt if h in good]:
            # The index now points reads at the copy that is left.
            found = await store.find(Hash.from_hex(hexhash))
            if found is not None:
                await index.set_blob_storage(hexhash, found[0], found[1].size)
        for hexhash in result.orphans:
            # Only if still nothing refers to it and no miss is about to (a
            # daemon may have since): decided with its row held, as expiry
            # decides, the index told of it first if it never knew it.
            h = Hash.from_hex(hexhash)
            found = await store.find(h)
            if found is None:
                continue
            encoding, stat = found
            await index.adopt_blob(StoredBlob(hexhash, stat.size, stat.mtime, encoding, stat.size))
            await index.delete_blob(hexhash, young_from, partial(store.delete_now, h))
        # What the counters drifted by (a worker of an older version), gone.
        await index.recount()
        result.repaired = True
    return result


def purge_keys(protocol: str, name: str) -> tuple[list[str], list[str]]:
    """
    The exact keys and key prefixes of everything cached for a Go module or
    an npm package, all versions and metadata.
    """
    if protocol in ("go", "goproxy"):
        module = Module.parse(escape(name))
        return [], [f"{module.escaped}/@v/", f"{module.escaped}/@latest"]
    if protocol == "npm":
        package = PackageName.parse(name)
        full = package.full
        exact = [f"packument:{FULL}:{full}", f"packument:{ABBR}:{full}", f"dist:{full}", f"times:{full}",
                 f"filtered:packument:{FULL}:{full}", f"filtered:packument:{ABBR}:{full}"]
        prefixes = [f"render:packument:{v}:{full}:" for v in (FULL, ABBR)] + [f"tarball:{full}/"]
        return exact, prefixes
    raise ValueError(f"unknown protocol {protocol!r}: go or npm")


async def purge(index: IIndex, store: Store, protocol: str, name: str) -> list[str]:
    """
    Remove a Go module or npm package: every entry, and the blobs nothing
    else references. Returns the removed keys.
    """
    try:
        exact, prefixes = purge_keys(protocol, name)
    except (InvalidPath, InvalidName) as e:
        raise ValueError(str(e)) from None
    proto = GO if protocol in ("go", "goproxy") else NPM
    started = time.time()
    removed = await index.delete_prefixes(proto, prefixes)
    for key in exact:
        entry = await index.get(proto, key)
        if entry is not None and await index.delete(proto, key):
            removed.append(Removed(key, entry.hash.hex))
    for hexhash in {r.hash for r in removed}:
        # Not one a miss has claimed since the purge began (made young
        # again, its entry about to be written).
        await index.delete_blob(hexhash, started, partial(store.delete_now, Hash.from_hex(hexhash)))
    return sorted(r.key for r in removed)


#: Rows copied at once by migrate-index.
MIGRATE_BATCH = 5000


def migrate_index(source: IDatabase, target: IDatabase, progress: Progress | None = None) -> tuple[int, int]:
    """
    Copy every blob's row and every entry of C{source} into C{target},
    which must be empty (L{ValueError} otherwise); how many blobs and
    entries were copied. Blocking: the admin command runs no reactor.
    """
    if not target.empty():
        raise ValueError("the target index is not empty: give an empty database")
    blobs = entries = 0
    after_blob: str | None = None
    while batch := source.blob_records(after_blob, MIGRATE_BATCH):
        target.load(batch, [])
        blobs += len(batch)
        after_blob = batch[-1].hash
        if progress is not None:
            progress(blobs + entries, None)
    after_entry: tuple[str, str] | None = None
    while rows := source.entry_rows(after_entry, MIGRATE_BATCH):
        target.load([], rows)
        entries += len(rows)
        after_entry = (rows[-1].protocol, rows[-1].key)
        if progress is not None:
            progress(blobs + entries, None)
    return blobs, entries
