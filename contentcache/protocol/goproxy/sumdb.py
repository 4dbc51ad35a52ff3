"""
Checksum databases: how they are configured, reading a C{lookup} record to
check a module's C{h1:} hashes against it, cutting a tile out of a wider
one, and which tiles the go command reads to check a record
(golang.org/x/mod/sumdb/tlog's layout).
"""

from __future__ import annotations

import re

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
    ends = _record_ends(held)
    if ends is None or len(ends) != held_width:
        return None
    return ends[width - 1]


def _record_ends(data: bytes) -> list[int] | None:
    ends = []
    start = 0
    while start < len(data):
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


# Which tiles the go command reads to check that record R is in a tree of
# size N: sumdb.Client.checkRecord reads the stored hash of R through
# tlog.TileHashReader, whose ReadHashes asks for the tiles that rebuild
# the tree's hash, then the tile holding R's hash and the parents that
# authenticate it. A port of tlog.go and tile.go, kept close to them.


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


def proof_tiles(record: int, size: int, height: int = GO_TILE_HEIGHT) -> list[Tile]:
    """
    The hash tiles, in the order it asks for them, that the go command
    reads to check record C{record} against a tree of C{size} records
    (tlog.tileHashReader.ReadHashes for the record's stored hash).
    """
    if not 0 <= record < size <= MAX_TREE_SIZE:
        raise InvalidSumDB(f"record {record} is not in a tree of size {size}")
    tiles: list[_Coordinates] = []
    # The tiles that rebuild the tree's hash: they authenticate the rest.
    for x in sub_tree_index(0, size):
        tile = _tile_parent(height, _tile_for_index(height, x), 0, size)
        if tile is not None and tile not in tiles:
            tiles.append(tile)
    # The record's tile, and its parents up to one already read.
    tile = _tile_for_index(height, stored_hash_index(0, record))
    chain = []
    for k in range(64):
        parent = _tile_parent(height, tile, k, size)
        if parent is None:
            raise AssertionError(f"no tile above record {record} in a tree of size {size}")
        if parent in tiles:
            break
        chain.append(parent)
    tiles.extend(reversed(chain))
    return [tile_at(height, level, n, width) for level, n, width in tiles]
