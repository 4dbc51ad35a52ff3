"""
Module zip rules and the go.sum C{h1:} hash (golang.org/x/mod/sumdb/dirhash
Hash1), computed on a spooled file. These functions block: run them on the
disk pool.
"""

from __future__ import annotations

import base64
import hashlib
import posixpath
import stat
import zipfile
from typing import BinaryIO, Callable, Iterable

#: golang.org/x/mod/zip's limits.
MAX_ZIP_SIZE = 500 << 20
MAX_UNZIPPED_SIZE = 500 << 20
MAX_GO_MOD_SIZE = 16 << 20
_READ = 1 << 20


class ZipRuleError(ValueError):
    """
    A module zip that breaks the module zip rules.
    """


def hash1(names: Iterable[str], open_file: Callable[[str], BinaryIO]) -> str:
    """
    dirhash.Hash1: for each file in byte order of its name, the line
    C{hex(sha256(content)) + "  " + name + "\\n"}; the SHA-256 of those
    lines, base64, prefixed C{h1:}.
    """
    summary = hashlib.sha256()
    for name in sorted(names, key=lambda n: n.encode("utf-8")):
        if "\n" in name:
            raise ZipRuleError(f"file name with a newline: {name!r}")
        digest = hashlib.sha256()
        with open_file(name) as f:
            while chunk := f.read(_READ):
                digest.update(chunk)
        summary.update(f"{digest.hexdigest()}  {name}\n".encode("utf-8"))
    return "h1:" + base64.b64encode(summary.digest()).decode("ascii")


def hash_go_mod(path: str) -> str:
    """
    The C{h1:} of a go.mod: Hash1 of one file named C{go.mod}.
    """
    return hash1(["go.mod"], lambda _: open(path, "rb"))


def check_and_hash_zip(path: str, module: str, version: str) -> str:
    """
    Check a module zip against the rules and return its C{h1:} hash (the
    value go.sum and the checksum database record for it).
    """
    try:
        return _check_and_hash_zip(path, module, version)
    except ZipRuleError:
        raise
    except Exception as e:
        # zipfile has many ways to fail on hostile input (encrypted
        # entries, undecodable names, bad compression): all are a bad zip.
        raise ZipRuleError(f"unreadable zip: {e!r}") from None


def _check_and_hash_zip(path: str, module: str, version: str) -> str:
    prefix = f"{module}@{version}/"
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as e:
        raise ZipRuleError(f"not a zip file: {e}") from None
    with archive:
        names: list[str] = []
        folded: dict[str, str] = {}
        unzipped = 0
        for info in archive.infolist():
            name = info.filename
            if not name.startswith(prefix):
                raise ZipRuleError(f"{name!r} is not under {prefix!r}")
            relative = name[len(prefix):].removesuffix("/")
            if relative and (
                posixpath.normpath(relative) != relative
                or relative.startswith(("/", "../"))
                or relative == ".."
                or "\\" in relative
                or "\x00" in relative
            ):
                raise ZipRuleError(f"invalid file path {name!r}")
            mode = info.external_attr >> 16
            if stat.S_ISLNK(mode):
                raise ZipRuleError(f"{name!r} is a symbolic link")
            key = name.casefold()
            if key in folded:
                raise ZipRuleError(f"{name!r} and {folded[key]!r} differ only in case")
            folded[key] = name
            unzipped += info.file_size
            if unzipped > MAX_UNZIPPED_SIZE:
                raise ZipRuleError(f"more than {MAX_UNZIPPED_SIZE} bytes unzipped")
            names.append(name)
        try:
            # Reading every file also checks each CRC and size against the
            # central directory: a zip that lies about them fails here.
            return hash1(names, lambda n: archive.open(n))  # type: ignore[arg-type, return-value]
        except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError, NotImplementedError) as e:
            raise ZipRuleError(f"unreadable zip: {e}") from None
