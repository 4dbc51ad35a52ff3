"""
Checksum databases: how they are configured, and reading a C{lookup}
record to check a module's C{h1:} hashes against it.
"""

from __future__ import annotations

import re

from attrs import frozen

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
