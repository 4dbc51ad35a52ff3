"""
Packuments: parsed once when they arrive from upstream, never per request.

Arrival (L{analyse}, on the disk pool): the document is parsed, every
C{versions[*].dist.tarball} is replaced with a marker followed by the
standard tarball path, and the result is written as a I{template}; the
tarball addresses and their integrity go to a small I{dist index}.

A request (L{Renderer}): the template is streamed through a byte-level
replacement of the marker with the request's base URL (and gzip, if the
client takes it). The rendered bytes are stored as a blob of their own, so
each distinct base is rendered once per packument revision and a hit is a
plain blob read.
"""

from __future__ import annotations

import json
import posixpath
import zlib
from typing import Any
from urllib.parse import urlsplit

from ...upstream import allowed_host, host_port  # noqa: F401  (the tarball hosts' rules)

from .names import PackageName

#: Stands where the cache's base URL goes. It is JSON-escaped in the
#: template (json.dumps writes NUL as \\u0000), so it cannot be produced by
#: a document's own text except as this very escape sequence.
MARKER = "\x00contentcache-base\x00"
MARKER_BYTES = json.dumps(MARKER)[1:-1].encode("ascii")


class InvalidPackument(ValueError):
    pass


def tarball_file(name: PackageName, version: str) -> str:
    return f"{name.base}-{version}.tgz"


def tarball_path(name: PackageName, version: str) -> str:
    """
    The standard tarball path under the registry root (scoped packages
    keep their scope in the path and drop it from the file name).
    """
    return f"/{name.full}/-/{tarball_file(name, version)}"


def analyse(source: str, template: Any, name: PackageName) -> bytes:
    """
    Parse the packument in the file C{source}, write its template to the
    open file C{template}, and return the dist index (JSON): C{dist-tags},
    and for each standard tarball file name its version, upstream URL,
    integrity and shasum.
    """
    try:
        with open(source, "rb") as f:
            document = json.load(f)
    except (ValueError, UnicodeDecodeError) as e:
        raise InvalidPackument(f"upstream sent a packument that is not JSON: {e}") from None
    if not isinstance(document, dict):
        raise InvalidPackument("upstream sent a packument that is not a JSON object")
    files: dict[str, dict[str, Any]] = {}
    versions = document.get("versions")
    if isinstance(versions, dict):
        for version, manifest in versions.items():
            if not isinstance(manifest, dict) or not isinstance(manifest.get("dist"), dict):
                continue
            dist = manifest["dist"]
            url = dist.get("tarball")
            if not isinstance(url, str):
                continue
            files[tarball_file(name, version)] = {
                "version": version,
                "url": url,
                "integrity": dist.get("integrity"),
                "shasum": dist.get("shasum"),
            }
            dist["tarball"] = MARKER + tarball_path(name, version)
    template.write(json.dumps(document, ensure_ascii=True, separators=(",", ":")).encode("ascii"))
    dist_tags = document.get("dist-tags") if isinstance(document.get("dist-tags"), dict) else {}
    return json.dumps({"dist-tags": dist_tags, "files": files}, separators=(",", ":")).encode()


class Renderer:
    """
    Streaming marker replacement (and gzip): feed it the template chunk by
    chunk, then call L{finish}. Holds back at most a marker's length
    between chunks, so a marker split across two is still found.
    """

    def __init__(self, base: str, gzip: bool) -> None:
        self._base = json.dumps(base)[1:-1].encode("ascii")
        self._held = b""
        self._compress = zlib.compressobj(6, zlib.DEFLATED, 31) if gzip else None

    def _out(self, data: bytes) -> bytes:
        return self._compress.compress(data) if self._compress is not None else data

    def feed(self, chunk: bytes) -> bytes:
        data = (self._held + chunk).replace(MARKER_BYTES, self._base)
        keep = len(MARKER_BYTES) - 1
        # Only the tail that could be the start of a marker waits.
        cut = len(data)
        for n in range(min(keep, len(data)), 0, -1):
            if MARKER_BYTES.startswith(data[-n:]):
                cut = len(data) - n
                break
        self._held = data[cut:]
        return self._out(data[:cut])

    def finish(self) -> bytes:
        out = self._out(self._held)
        self._held = b""
        if self._compress is not None:
            out += self._compress.flush()
        return out


def basename(url: str) -> str:
    return posixpath.basename(urlsplit(url).path)
