"""
The GOPROXY adapter's pure parts: paths, versions, zip rules, h1 hashes.
"""

from __future__ import annotations

import os
import stat
import zipfile
from typing import Any

import pytest

from contentcache.protocol.goproxy.modzip import ZipRuleError, check_and_hash_zip, hash1, hash_go_mod
from contentcache.protocol.goproxy.paths import InvalidPath, Module, Version, escape, is_canonical, unescape
from contentcache.protocol.goproxy.sumdb import (
    InvalidSumDB,
    SumDB,
    Tile,
    check_tile,
    parse_flag,
    parse_gosumdb,
    parse_record,
    parse_tile,
    tile_prefix,
)


@pytest.mark.parametrize(
    "escaped, decoded",
    [
        ("github.com/!burnt!sushi/toml", "github.com/BurntSushi/toml"),
        ("example.com/!upper/!case", "example.com/Upper/Case"),
        ("golang.org/x/mod", "golang.org/x/mod"),
    ],
)
def test_case_encoding_round_trip(escaped: str, decoded: str) -> None:
    assert unescape(escaped) == decoded
    assert escape(decoded) == escaped
    assert Module.parse(escaped).path == decoded


@pytest.mark.parametrize(
    "escaped",
    [
        "github.com/BurntSushi/toml",  # upper case without "!"
        "example.com/!",  # dangling "!"
        "example.com/!1",  # "!" before a non-letter
        "example.com//double",
        "example.com/./x",
        "example.com/../x",
        "example.com/.hidden",
        "example.com/trailing.",
        "example.com/a b",
        "example.com/a\x00b",
        "example.com/a\\b",
        "nodot/x",
        "-example.com/x",
        "example.com/con",
        "example.com/" + "a" * 2000,
        "",
    ],
)
def test_invalid_module_paths(escaped: str) -> None:
    with pytest.raises(InvalidPath):
        Module.parse(escaped)


@pytest.mark.parametrize(
    "version, canonical",
    [
        ("v1.0.0", True),
        ("v0.0.0-20240102030405-abcdefabcdef", True),
        ("v2.0.0+incompatible", True),
        ("v1.2.3-rc.1", True),
        ("v1.2", False),
        ("v1", False),
        ("master", False),
        ("v1.0.0+build", False),
        ("v01.0.0", False),
        ("1.0.0", False),
    ],
)
def test_canonical_versions(version: str, canonical: bool) -> None:
    assert is_canonical(version) is canonical


@pytest.mark.parametrize("escaped", ["..", ".", "", "v1/2", "v1.0.0\x00", "v1!", "V1.0.0"])
def test_invalid_versions(escaped: str) -> None:
    with pytest.raises(InvalidPath):
        Version.parse(escaped)


def test_version_case_encoding() -> None:
    assert Version.parse("v1.0.0-!r!c1").name == "v1.0.0-RC1"


def make_zip(path: str, entries: dict[str, bytes], symlink: str | None = None) -> None:
    with zipfile.ZipFile(path, "w") as z:
        for name, content in entries.items():
            z.writestr(name, content)
        if symlink is not None:
            info = zipfile.ZipInfo(symlink)
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
            z.writestr(info, "/etc/passwd")


def test_h1_matches_the_documented_algorithm(tmp_path: Any) -> None:
    import base64
    import hashlib

    zip_path = str(tmp_path / "m.zip")
    files = {"example.com/m@v1.0.0/go.mod": b"module example.com/m\n",
             "example.com/m@v1.0.0/a.go": b"package m\n"}
    make_zip(zip_path, files)
    lines = "".join(
        f"{hashlib.sha256(files[name]).hexdigest()}  {name}\n" for name in sorted(files)
    )
    expected = "h1:" + base64.b64encode(hashlib.sha256(lines.encode()).digest()).decode()
    assert check_and_hash_zip(zip_path, "example.com/m", "v1.0.0") == expected

    mod = str(tmp_path / "go.mod")
    with open(mod, "wb") as f:
        f.write(b"module example.com/m\n")
    line = f"{hashlib.sha256(b'module example.com/m' + bytes([10])).hexdigest()}  go.mod\n"
    assert hash_go_mod(mod) == "h1:" + base64.b64encode(hashlib.sha256(line.encode()).digest()).decode()


@pytest.mark.parametrize(
    "entries, symlink, message",
    [
        ({"other.com/m@v1.0.0/go.mod": b""}, None, "is not under"),
        ({"example.com/m@v1.0.1/go.mod": b""}, None, "is not under"),
        ({"example.com/m@v1.0.0/A.go": b"", "example.com/m@v1.0.0/a.go": b""}, None, "differ only in case"),
        ({"example.com/m@v1.0.0/../escape": b""}, None, "invalid file path"),
        ({"example.com/m@v1.0.0/go.mod": b""}, "example.com/m@v1.0.0/link", "symbolic link"),
    ],
)
def test_zip_rules(tmp_path: Any, entries: dict[str, bytes], symlink: str | None, message: str) -> None:
    zip_path = str(tmp_path / "m.zip")
    make_zip(zip_path, entries, symlink)
    with pytest.raises(ZipRuleError, match=message):
        check_and_hash_zip(zip_path, "example.com/m", "v1.0.0")


def test_not_a_zip(tmp_path: Any) -> None:
    path = str(tmp_path / "m.zip")
    with open(path, "wb") as f:
        f.write(b"<html>upstream error page</html>")
    with pytest.raises(ZipRuleError, match="not a zip"):
        check_and_hash_zip(path, "example.com/m", "v1.0.0")


def test_zip_that_lies_about_its_content(tmp_path: Any) -> None:
    path = str(tmp_path / "m.zip")
    make_zip(path, {"example.com/m@v1.0.0/f": b"A" * 1000})
    data = bytearray(open(path, "rb").read())
    data[data.index(b"A" * 100)] = ord("B")  # the CRC no longer matches
    open(path, "wb").write(bytes(data))
    with pytest.raises(ZipRuleError, match="unreadable"):
        check_and_hash_zip(path, "example.com/m", "v1.0.0")


def test_newline_in_a_name_is_refused() -> None:
    with pytest.raises(ZipRuleError):
        hash1(["a\nb"], lambda _: open(os.devnull, "rb"))


def test_sumdb_settings() -> None:
    assert parse_flag("sum.test=http://127.0.0.1:9/") == SumDB("sum.test", "http://127.0.0.1:9")
    for bad in ("sum.test", "=http://x", "sum.test=ftp://x", "a b=http://x"):
        with pytest.raises(InvalidSumDB):
            parse_flag(bad)
    assert parse_gosumdb("off") is None
    assert parse_gosumdb("") is None
    assert parse_gosumdb("db.test") == SumDB("db.test", "https://db.test")
    assert parse_gosumdb("db.test+abcd+KEY") == SumDB("db.test", "https://db.test")
    assert parse_gosumdb("db.test+abcd+KEY http://127.0.0.1:8/db") == SumDB("db.test", "http://127.0.0.1:8/db")


def test_tiles() -> None:
    assert check_tile("8/0/000") == "8/0/000"
    assert check_tile("8/1/x001/234.p/5")
    assert check_tile("8/data/000.p/3")
    for bad in ("../x", "8/0/../../etc", "8/0/0001", "8/0/abc", ""):
        with pytest.raises(InvalidSumDB):
            check_tile(bad)


@pytest.mark.parametrize(
    "path, tile",
    [
        ("tile/8/0/000", Tile(8, "0", "000", 256)),
        ("tile/8/0/000.p/5", Tile(8, "0", "000", 5)),
        ("tile/8/1/x001/234.p/255", Tile(8, "1", "x001/234", 255)),
        ("tile/8/data/x002/x000/017.p/3", Tile(8, "data", "x002/x000/017", 3)),
        ("tile/30/63/000", Tile(30, "63", "000", 1 << 30)),
        # What tlog.ParseTilePath refuses, or would write otherwise.
        ("tile/8/0/000.p/256", None),
        ("tile/8/0/000.p/0", None),
        ("tile/8/0/000.p/05", None),
        ("tile/08/0/000", None),
        ("tile/8/00/000", None),
        ("tile/0/0/000", None),
        ("tile/31/0/000", None),
        ("tile/8/0/x000/001", None),
        ("tile/8/0", None),
    ],
)
def test_tile_coordinates(path: str, tile: Tile | None) -> None:
    assert parse_tile(path) == tile
    if tile is not None:
        assert tile.path() == path


def test_tile_widths_at_the_same_coordinates() -> None:
    tile = Tile(8, "0", "x001/234", 3)
    assert tile.path(256) == "tile/8/0/x001/234"
    assert tile.path(7) == "tile/8/0/x001/234.p/7"
    assert tile.width_of("") == 256
    assert tile.width_of(".p/7") == 7
    for other in (".p/256", ".p/0", ".p/07", ".p/", "/5", ".p/7/1", ".q/7"):
        assert tile.width_of(other) is None


def test_hash_tile_prefix() -> None:
    held = bytes(range(7)) * 32
    assert tile_prefix(held, 7, 3, data=False) == 96
    assert tile_prefix(held, 7, 7, data=False) == 7 * 32
    assert tile_prefix(held[:95], 7, 3, data=False) is None  # shorter than the wanted tile
    assert tile_prefix(held[:-1], 7, 3, data=False) is None  # not a tile of its own width
    assert tile_prefix(held + b"x", 7, 3, data=False) is None
    assert tile_prefix(held, 7, 8, data=False) is None
    assert tile_prefix(held, 7, 0, data=False) is None


def test_data_tile_prefix() -> None:
    # As golang.org/x/mod/sumdb's server writes them: tlog.FormatRecord
    # for each record (id, text, blank line), one after the other.
    one = b"5\nexample.com/a v1.0.0 h1:a=\nexample.com/a v1.0.0/go.mod h1:b=\n\n"
    two = b"6\nexample.com/b v1.1.0 h1:c=\nexample.com/b v1.1.0/go.mod h1:d=\n\n"
    three = b"7\nexample.com/c v0.1.0 h1:e=\n\n"
    held = one + two + three
    assert tile_prefix(held, 3, 1, data=True) == len(one)
    assert tile_prefix(held, 3, 2, data=True) == len(one + two)
    assert tile_prefix(held, 3, 3, data=True) == len(held)
    assert tile_prefix(held, 4, 2, data=True) is None  # fewer records than its width
    assert tile_prefix(held, 2, 1, data=True) is None  # more
    assert tile_prefix(held[:-1], 3, 1, data=True) is None  # a record that does not end
    assert tile_prefix(held + b"8\n", 4, 1, data=True) is None
    # A record text that opens with a newline (tlog allows it) makes the
    # framing ambiguous: not cut.
    assert tile_prefix(one + b"6\n\nexample.com/b v1.1.0 h1:c=\n\n", 2, 1, data=True) is None
    assert tile_prefix(one + b"\nexample.com/b v1.1.0 h1:c=\n\n", 2, 1, data=True) is None


def test_lookup_record() -> None:
    body = (b"42\nexample.com/m v1.0.0 h1:zip=\nexample.com/m v1.0.0/go.mod h1:mod=\n\n"
            b"go.sum database tree\n43\nhash=\n\n- sig\n")
    assert parse_record(body) == {
        "example.com/m v1.0.0": "h1:zip=",
        "example.com/m v1.0.0/go.mod": "h1:mod=",
    }


@pytest.mark.parametrize(
    "patterns, path, private",
    [
        ("corp.example", "corp.example/secret", True),
        ("corp.example", "corp.example", True),
        ("*.corp.example", "git.corp.example/team/x", True),
        ("corp.example/team", "corp.example/other", False),
        ("corp.example/*/internal", "corp.example/a/internal/x", True),
        ("other.example,corp.example", "corp.example/x", True),
        ("", "corp.example/x", False),
        ("corp.example", "corp.example.evil/x", False),
    ],
)
def test_private_module_patterns(patterns: str, path: str, private: bool) -> None:
    from contentcache.protocol.goproxy.paths import match_prefix_patterns

    assert match_prefix_patterns(patterns, path) is private
