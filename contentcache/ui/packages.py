"""
What the cache holds for one npm package or Go module, read from the
index by key prefix (a range of one package's keys, never a scan), and
the search of cached names by prefix. Read-only.
"""

from __future__ import annotations

import re
from typing import Any, Sequence

from attrs import frozen

from ..index import Entry, IIndex
from ..protocol.goproxy.paths import InvalidPath, Module, escape, is_canonical, unescape
from ..protocol.goproxy.resource import PROTOCOL as GO
from ..protocol.npm.names import InvalidName, PackageName
from ..protocol.npm.resource import ABBR, FULL
from ..protocol.npm.resource import PROTOCOL as NPM

#: Keys read for one package at most (versions and metadata).
MAX_KEYS = 5000
#: Names a search answers at most, per protocol.
SEARCH_LIMIT = 50


class NotAName(ValueError):
    """
    What was asked for is not a package name or module path.
    """


@frozen
class VersionRow:
    """
    One cached version: what of it is cached, and how it was checked.
    """

    version: str
    #: What of it the cache holds ("tarball"; ".info", ".mod", ".zip").
    files: tuple[str, ...]
    size: int
    fetched: float
    last_used: float
    #: The digest it was checked against: npm's integrity, the zip's h1:.
    digest: str | None
    #: How it was checked before it was stored.
    verified: str
    #: A second digest (a Go version's go.mod h1:).
    other_digest: str | None = None
    #: Why a policy hides it from clients (minimum release age, deny rule).
    hidden: str | None = None


@frozen
class MetadataRow:
    """
    A cached document about the package (a packument, a version list).
    """

    what: str
    size: int
    fetched: float
    last_used: float


@frozen
class PackageView:
    protocol: str
    name: str
    versions: list[VersionRow]
    metadata: list[MetadataRow]
    #: Whether more keys were cached than were read.
    truncated: bool = False


def _version_key(version: str) -> tuple[Any, ...]:
    """
    Semantic-version order, well enough to list versions: numbers as
    numbers, a pre-release before its release.
    """
    core, dash, pre = version.lstrip("v").split("+", 1)[0].partition("-")
    numbers = [int(p) if p.isdigit() else -1 for p in core.split(".")]
    return (numbers, not dash, [(0, int(p), "") if p.isdigit() else (1, 0, p) for p in pre.split(".")], version)


async def _entries(index: IIndex, protocol: str, keys: Sequence[str]) -> list[Entry]:
    rows = await index.lookup(protocol, [(key, None) for key in keys])
    return [row[0] for row in rows if row is not None]


def npm_name(text: str) -> PackageName:
    try:
        return PackageName.parse(text)
    except InvalidName as e:
        raise NotAName(f"not an npm package name ({e})") from None


def go_module(text: str) -> Module:
    """
    A module path as written (upper case and all) or as the GOPROXY
    protocol escapes it.
    """
    try:
        return Module.parse(escape(text))
    except InvalidPath as e:
        raise NotAName(f"not a Go module path ({e})") from None


async def npm_rows(index: IIndex, name: PackageName) -> PackageView:
    """
    The tarballs cached of an npm package, by version, and its packuments.
    """
    full = name.full
    tarballs = await index.keys(NPM, f"tarball:{full}/", MAX_KEYS)
    versions = []
    for entry in await _entries(index, NPM, tarballs):
        file = entry.key.rsplit("/", 1)[1]
        version = str(entry.attrs.get("version") or file[len(name.base) + 1:-len(".tgz")])
        integrity = entry.attrs.get("integrity")
        versions.append(VersionRow(
            version, ("tarball",), entry.size, entry.created, entry.accessed,
            str(integrity) if integrity else None,
            "integrity checked" if integrity else "shasum checked",
        ))
    versions.sort(key=lambda row: _version_key(row.version))
    metadata = []
    labels = {f"packument:{FULL}:{full}": "packument (full)", f"packument:{ABBR}:{full}": "packument (abbreviated)",
              f"dist:{full}": "tarball index (from the packument)"}
    for entry in await _entries(index, NPM, list(labels)):
        metadata.append(MetadataRow(labels[entry.key], entry.size, entry.created, entry.accessed))
    for variant, label in ((FULL, "full"), (ABBR, "abbreviated")):
        renders = await _entries(index, NPM, await index.keys(NPM, f"render:packument:{variant}:{full}:", MAX_KEYS))
        for entry in renders:
            metadata.append(MetadataRow(f"packument ({label}) as served", entry.size, entry.created, entry.accessed))
    return PackageView(NPM, full, versions, metadata, truncated=len(tarballs) >= MAX_KEYS)


async def go_rows(index: IIndex, module: Module) -> PackageView:
    """
    The versions cached of a Go module (each with its .info, .mod and
    .zip as far as they are cached), its list and its queries.
    """
    prefix = f"{module.escaped}/@v/"
    keys = await index.keys(GO, prefix, MAX_KEYS)
    by_version: dict[str, dict[str, Entry]] = {}
    metadata = []
    for entry in await _entries(index, GO, [*keys, f"{module.escaped}/@latest"]):
        rest = entry.key[len(prefix):] if entry.key.startswith(prefix) else None
        if rest is None:
            metadata.append(MetadataRow("@latest", entry.size, entry.created, entry.accessed))
            continue
        if rest == "list":
            metadata.append(MetadataRow("@v/list", entry.size, entry.created, entry.accessed))
            continue
        stem, _, ext = rest.rpartition(".")
        try:
            version = unescape(stem, "version")
        except InvalidPath:
            continue
        if ext not in ("info", "mod", "zip"):
            continue
        if ext == "info" and not is_canonical(version):
            # A query (a branch, a commit): not a version.
            metadata.append(MetadataRow(f"query {version}.info", entry.size, entry.created, entry.accessed))
            continue
        by_version.setdefault(version, {})[ext] = entry
    versions = []
    for version, files in by_version.items():
        entries = list(files.values())
        checked = [e for e in (files.get("zip"), files.get("mod")) if e is not None]
        verified = [bool(e.attrs.get("verified")) for e in checked]
        versions.append(VersionRow(
            version,
            tuple(f".{ext}" for ext in ("info", "mod", "zip") if ext in files),
            sum(e.size for e in entries),
            min(e.created for e in entries),
            max(e.accessed for e in entries),
            _h1(files.get("zip")),
            ("checksum database" if verified and all(verified) else
             "not verified (no checksum database, or no record in it)" if checked else "-"),
            _h1(files.get("mod")),
        ))
    versions.sort(key=lambda row: _version_key(row.version))
    return PackageView(GO, module.path, versions, metadata, truncated=len(keys) >= MAX_KEYS)


def _h1(entry: Entry | None) -> str | None:
    if entry is None:
        return None
    h1 = entry.attrs.get("h1")
    return str(h1) if h1 else None


_NPM_KEY = re.compile(r"(?:packument:(?:full|abbr):|tarball:)((?:@[^/]+/)?[^/]+)")


async def search(index: IIndex, text: str) -> list[tuple[str, str]]:
    """
    The cached npm packages and Go modules whose names start with C{text}:
    (protocol, name) pairs, at most L{SEARCH_LIMIT} of each.
    """
    text = text.strip()
    found: list[tuple[str, str]] = []
    npm: set[str] = set()
    for prefix in (f"packument:{FULL}:", f"packument:{ABBR}:", "tarball:"):
        for key in await index.keys(NPM, prefix + text, SEARCH_LIMIT * 20):
            m = _NPM_KEY.match(key)
            if m is not None:
                npm.add(m[1])
    found += [(NPM, name) for name in sorted(npm)[:SEARCH_LIMIT]]
    go: set[str] = set()
    for key in await index.keys(GO, escape(text), SEARCH_LIMIT * 20):
        escaped = key.split("/@v/", 1)[0] if "/@v/" in key else key.removesuffix("/@latest")
        try:
            go.add(unescape(escaped))
        except InvalidPath:
            continue
    found += [(GO, name) for name in sorted(go)[:SEARCH_LIMIT]]
    return found
