"""
Checksum databases: how they are configured, reading a C{lookup} record to
check a module's C{h1:} hashes against it, cutting a tile out of a wider
one, and which tiles the go command reads to check lookup answers' records
and trees (golang.org/x/mod/sumdb/tlog's layout).
"""

from __future__ import annotations

import re
from typing import Iterable

from attrs import frozen

#: A hash tile's entries: SHA-256 hashes (tlog.HashSize).
HASH_SIZE = 32
#: tlog's limit on a tile's height.
MAX_TILE_HEIGHT = 30
#: The height of the tiles the go command reads (sumdb.Client's default,
#: which the go command never changes).
GO_TILE_HEIGHT = 8
#: The largest tree tlog's arithmetic holds (it overflows past 2**62):
#: far beyond any real log, so a larger size is a bad answer.
MAX_TREE_SIZE = (1 << 62) - 1
#: The longest data tile record used (its id, go.sum lines and blank
#: line): the go.sum database's are a few hundred bytes. A held data tile
#: longer than this for each of its records is not cut.
MAX_RECORD_SIZE = 4096
#: tlog's digits per path element of a tile's index (pathBase).
_PATH_BASE = 1000

_NAME = re.compile(r"[A-Za-z0-9.-]+")
_TILE = re.compile(r"[0-9]+(?:/(?:[0-9]+|data))(?:/x[0-9]{3})*/[0-9]{3}(?:\.p/[0-9]+)?")


class InvalidSumDB(ValueError):
    pass


@frozen
class SumDB:
    """
    A checksum database: its name (what the go command puts in
    C{/sumdb/<name>/}) and where to fetch from.
    """

    name: str
    url: str


def parse_flag(value: str) -> SumDB:
    """
    C{--go-sumdb NAME=URL}.
    """
    name, sep, url = value.partition("=")
    if not sep or not _NAME.fullmatch(name) or not url.startswith(("http://", "https://")):
        raise InvalidSumDB(
            f"--go-sumdb takes NAME=URL (an http or https URL) or off, not {value!r}"
        )
    return SumDB(name, url.rstrip("/"))


def parse_gosumdb(value: str) -> SumDB | None:
    """
    The go command's GOSUMDB setting: C{off}, C{name}, C{name+key} or
    C{name+key url}. Without a URL the database is fetched over https from
    its name, as the go command does.
    """
    fields = value.split()
    if not fields or fields[0] == "off":
        return None
    name = fields[0].split("+", 1)[0]
    if not _NAME.fullmatch(name):
        raise InvalidSumDB(f"GOSUMDB names an invalid checksum database: {value!r}")
    url = fields[1] if len(fields) > 1 else f"https://{name}"
    if "://" not in url:
        url = f"https://{url}"
    return SumDB(name, url.rstrip("/"))


def check_tile(path: str) -> str:
    if _TILE.fullmatch(path) is None:
        raise InvalidSumDB("invalid tile path")
    return path


@frozen
class Tile:
    """
    A tile's coordinates (tlog.Tile): height H, level L (C{"data"} for the
    record data of level 0), index N as its path spells it (C{x001/234}),
    and width W, the number of hashes or records it holds (2**H when full).
    """

    height: int
    level: str
    index: str
    width: int

    @property
    def full_width(self) -> int:
        return 1 << self.height

    @property
    def is_data(self) -> bool:
        return self.level == "data"

    def path(self, width: int | None = None) -> str:
        """
        C{tile/H/L/N} and, for a partial tile, C{.p/W}: this tile's, or
        that of the tile at the same coordinates with C{width} entries.
        """
        width = self.width if width is None else width
        base = f"tile/{self.height}/{self.level}/{self.index}"
        return base if width == self.full_width else f"{base}.p/{width}"

    def width_of(self, suffix: str) -> int | None:
        """
        The width of the tile at these coordinates whose path is this
        tile's full path followed by C{suffix} (C{""} or C{".p/W"}).
        """
        if suffix == "":
            return self.full_width
        digits = suffix.removeprefix(".p/")
        if digits == suffix or not digits.isdigit() or digits != str(int(digits)):
            return None
        width = int(digits)
        return width if 0 < width < self.full_width else None


def tile_at(height: int, level: int, n: int, width: int) -> Tile:
    """
    The tile at height C{height}, level C{level} (-1 for data), index
    C{n} with C{width} entries, its index spelt as tlog.Tile.Path does.
    """
    index = f"{n % _PATH_BASE:03d}"
    while n >= _PATH_BASE:
        n //= _PATH_BASE
        index = f"x{n % _PATH_BASE:03d}/{index}"
    return Tile(height, "data" if level == -1 else str(level), index, width)


def parse_tile(path: str) -> Tile | None:
    """
    The coordinates in C{tile/...}, or L{None} for a path tlog would not
    write (as tlog.ParseTilePath: a height of 1 to 30, a partial width
    below 2**H, canonical numbers).
    """
    fields = path.split("/")
    if len(fields) < 4 or fields[0] != "tile" or _TILE.fullmatch("/".join(fields[1:])) is None:
        return None
    height, level = fields[1], fields[2]
    if height != str(int(height)) or not 1 <= int(height) <= MAX_TILE_HEIGHT:
        return None
    if level != "data" and level != str(int(level)):
        return None
    width = 1 << int(height)
    if fields[-2].endswith(".p"):
        if fields[-1] != str(int(fields[-1])) or not 0 < int(fields[-1]) < width:
            return None
        width = int(fields[-1])
        fields = fields[:-2] + [fields[-2].removesuffix(".p")]
    index = fields[3:]
    # One number, three digits at a time, without leading "x000"s.
    if len(index) > 1 and index[0] == "x000":
        return None
    return Tile(int(height), level, "/".join(index), width)


def tile_prefix(held: bytes, held_width: int, width: int, data: bool) -> int | None:
    """
    How many leading bytes of C{held}, a tile of C{held_width} entries, are
    the tile of the same coordinates with C{width} entries (the log only
    grows: its first entries never change), or L{None} when C{held} is not
    a tile of that width (then it is not used).

    A hash tile is C{width} 32-byte hashes. A data tile is records one after
    the other, as the sumdb server writes them (tlog.FormatRecord: the
    record id, its text, a blank line), and record text never holds a blank
    line (tlog's isValidRecordText), so each record ends at the first
    C{"\n\n"} after its start. A record whose text began with a newline
    would make that ambiguous: such a tile is not used.
    """
    if not 0 < width <= held_width:
        return None
    if not data:
        return width * HASH_SIZE if len(held) == held_width * HASH_SIZE else None
    ends = _record_ends(held, held_width)
    if ends is None or len(ends) != held_width:
        return None
    return ends[width - 1]


def _record_ends(data: bytes, most: int) -> list[int] | None:
    """
    Where each record in C{data} ends, if it holds at most C{most}.
    """
    ends: list[int] = []
    start = 0
    while start < len(data):
        if len(ends) == most:
            return None  # more records than that
        end = data.find(b"\n\n", start)
        if end < 0:
            return None  # bytes after the last record that are no record
        end += 2
        if data[end:end + 1] == b"\n":
            return None
        ends.append(end)
        start = end
    return ends


def parse_record(body: bytes) -> dict[str, str]:
    """
    The go.sum lines of a C{lookup} answer, as C{{"<module> <version>":
    "h1:..."}} (the version with C{/go.mod} for the go.mod line). The
    answer is the record number, the lines, a blank line, then the signed
    tree note, which is the go command's to verify.
    """
    lines = body.decode("utf-8", errors="replace").split("\n")
    records: dict[str, str] = {}
    for line in lines[1:]:
        if not line:
            break
        fields = line.split(" ")
        if len(fields) == 3:
            records[f"{fields[0]} {fields[1]}"] = fields[2]
    return records


def parse_lookup(body: bytes) -> tuple[int, int]:
    """
    The record number of a C{lookup} answer and the size of the tree its
    signed note names (tlog.ParseRecord, then the note's text as
    tlog.ParseTree reads it; the signature is the go command's to check).
    """
    first, _, rest = body.partition(b"\n")
    _, blank, note = rest.partition(b"\n\n")
    lines = note.split(b"\n", 3)
    if not blank or len(lines) < 4 or lines[0] != b"go.sum database tree":
        raise InvalidSumDB("a lookup answer without a record and a tree note")
    record, size = _number(first), _number(lines[1])
    if record is None or size is None or record >= size:
        raise InvalidSumDB(
            f"a lookup answer whose record {first.decode(errors='replace')!r} is not in a tree of "
            f"{lines[1].decode(errors='replace')!r} records"
        )
    return record, size


def _number(text: bytes) -> int | None:
    """
    A record number or tree size as tlog writes it (decimal, canonical).
    """
    if not text.isdigit() or text != b"%d" % int(text) or int(text) > MAX_TREE_SIZE:
        return None
    return int(text)


# Which tiles the go command reads to check a lookup answer (sumdb.Client):
# checkRecord reads the stored hash of record R through tlog.TileHashReader
# of the newest tree the client has seen (its lookups' trees, merged), and
# checkTrees reads tlog.TreeHash of the older of two trees through a
# TileHashReader of the newer. ReadHashes asks for the tiles that rebuild
# the reader's tree hash, then the tile holding each hash it reads and the
# parents that authenticate it. A port of tlog.go and tile.go, kept close
# to them.


def stored_hash_index(level: int, n: int) -> int:
    """
    tlog.StoredHashIndex: where level C{level}'s C{n}th hash is stored.
    """
    for _ in range(level):
        n = 2 * n + 1
    i = 0
    while n > 0:
        i += n
        n >>= 1
    return i + level


def split_stored_hash_index(index: int) -> tuple[int, int]:
    """
    tlog.SplitStoredHashIndex: the level and number of the hash stored
    at C{index}.
    """
    n = index // 2
    index_n = stored_hash_index(0, n)
    assert index_n <= index
    while True:
        # Each new record n adds 1 + trailingZeros(n) hashes.
        x = index_n + 1 + _trailing_zeros(n + 1)
        if x > index:
            break
        n += 1
        index_n = x
    level = index - index_n
    return level, n >> level


def _trailing_zeros(n: int) -> int:
    return (n & -n).bit_length() - 1


def _maxpow2(n: int) -> tuple[int, int]:
    """
    tlog.maxpow2: the largest power of two below C{n}, and its log.
    """
    level = 0
    while 1 << (level + 1) < n:
        level += 1
    return 1 << level, level


def sub_tree_index(lo: int, hi: int) -> list[int]:
    """
    tlog.subTreeIndex: the stored hashes that make the hash of the
    subtree of records [lo, hi).
    """
    need = []
    while lo < hi:
        k, level = _maxpow2(hi - lo + 1)
        assert lo & (k - 1) == 0
        need.append(stored_hash_index(level, lo >> level))
        lo += k
    return need


#: A tile's coordinates in numbers: level, index, width (tlog.Tile
#: without its height).
_Coordinates = tuple[int, int, int]


def _tile_for_index(height: int, index: int) -> _Coordinates:
    """
    tlog.tileForIndex: the tile that stores hash C{index}, as wide as
    that hash needs.
    """
    level, n = split_stored_hash_index(index)
    tile_level = level // height
    level -= tile_level * height  # the level within the tile
    tile_n = n << level >> height
    n -= tile_n << height >> level  # n within the tile at that level
    return tile_level, tile_n, (n + 1) << level


def _tile_parent(height: int, tile: _Coordinates, k: int, size: int) -> _Coordinates | None:
    """
    tlog.tileParent: the tile C{k} tile levels above C{tile}, as wide as
    a tree of C{size} records has it; L{None} beyond the tree.
    """
    level, n, _ = tile
    level += k
    n >>= k * height
    width = 1 << height
    top = size >> (level * height)
    if (n << height) + width >= top:
        if n << height >= top:
            return None
        width = top - (n << height)
    return level, n, width


def _read_hashes(indexes: list[int], size: int, height: int) -> list[_Coordinates]:
    """
    The tiles tlog.tileHashReader.ReadHashes asks for, in order, to read
    the stored hashes C{indexes} of a tree of C{size} records.
    """
    # (An ordered set.)
    tiles: dict[_Coordinates, None] = {}
    # The tiles that rebuild the tree's hash: they authenticate the rest.
    for x in sub_tree_index(0, size):
        tile = _tile_parent(height, _tile_for_index(height, x), 0, size)
        assert tile is not None
        tiles.setdefault(tile)
    # Each hash's tile, and its parents up to one already read.
    for x in indexes:
        tile = _tile_for_index(height, x)
        chain = []
        for k in range(64):
            parent = _tile_parent(height, tile, k, size)
            if parent is None:
                raise AssertionError(f"no tile above hash {x} in a tree of size {size}")
            if parent in tiles:
                break
            chain.append(parent)
        for parent in reversed(chain):
            tiles[parent] = None
    return list(tiles)


def proof_tiles(record: int, size: int, height: int = GO_TILE_HEIGHT) -> list[Tile]:
    """
    The hash tiles, in the order it asks for them, that the go command
    reads to check record C{record} against a tree of C{size} records
    (tlog.tileHashReader.ReadHashes for the record's stored hash).
    """
    if not 0 <= record < size <= MAX_TREE_SIZE:
        raise InvalidSumDB(f"record {record} is not in a tree of size {size}")
    tiles = _read_hashes([stored_hash_index(0, record)], size, height)
    return [tile_at(height, level, n, width) for level, n, width in tiles]


def tree_hash_tiles(tree: int, size: int, height: int = GO_TILE_HEIGHT) -> list[Tile]:
    """
    The hash tiles, in the order it asks for them, that the go command
    reads to check a tree of C{tree} records against a tree of C{size}
    (tlog.TreeHash through a tlog.TileHashReader of the larger tree).
    """
    if not 0 <= tree <= size <= MAX_TREE_SIZE:
        raise InvalidSumDB(f"a tree of size {tree} is not within a tree of size {size}")
    if tree == 0:
        return []  # the empty tree's hash is known
    tiles = _read_hashes(sub_tree_index(0, tree), size, height)
    return [tile_at(height, level, n, width) for level, n, width in tiles]


#: Where a tile is, without its width: its level and index.
Place = tuple[int, int]


def lookup_places(record: int, tree: int, height: int = GO_TILE_HEIGHT) -> set[Place]:
    """
    The tiles holding the hashes a go client reads for a lookup answer of
    record C{record} in a tree of C{tree} records, whichever larger tree
    it reads them in: the record's own hash, and the hashes of the
    subtrees that make the tree's hash (those at each tile level the
    tree's size has bits at, all in the tile at the tree's edge).
    """
    places = {(0, record >> height)}
    level = 0
    while tree >> (level * height):
        if (tree >> (level * height)) & ((1 << height) - 1):
            places.add((level, tree >> ((level + 1) * height)))
        level += 1
    return places


def client_tiles(places: Iterable[Place], size: int, height: int = GO_TILE_HEIGHT) -> list[Tile]:
    """
    The tiles of a tree of C{size} records a go client reads for lookup
    answers whose L{lookup_places} are C{places} (each answer's tree at
    most C{size}), as that tree has them: those that prove each answer's
    record in the tree of C{size} and give each answer's tree hash in it
    (the union of L{proof_tiles} and L{tree_hash_tiles}), parents before
    their children. Whatever smaller tree a client reads a tile in (the
    largest of the trees it has seen so far), that tile is the first
    entries of one of these.
    """
    if not 0 < size <= MAX_TREE_SIZE:
        raise InvalidSumDB(f"no tiles in a tree of size {size}")
    planned: dict[Place, int] = {}
    for x in sub_tree_index(0, size):
        tile = _tile_parent(height, _tile_for_index(height, x), 0, size)
        assert tile is not None
        planned.setdefault(tile[:2], tile[2])
    # Each place and its parents, up to one planned already: the tiles
    # ReadHashes reads for a hash there (the one it stops at has its own
    # parents planned, up to the tiles of the tree's hash).
    for level, n in sorted(places):
        chain = []
        k = 0
        while (level + k, n >> (k * height)) not in planned:
            tile = _tile_parent(height, (level, n, 0), k, size)
            if tile is None or k > 64:
                raise InvalidSumDB(f"tile {level}/{n} is not in a tree of size {size}")
            chain.append(tile)
            k += 1
        for parent in reversed(chain):
            planned[parent[:2]] = parent[2]
    return [tile_at(height, level, n, width) for (level, n), width in planned.items()]
