"""
The npm adapter's pure parts: integrity checks, tarball hosts, rendering.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import json
from typing import Any

import pytest

from contentcache.protocol.npm.integrity import IntegrityMismatch, check_tarball
from contentcache.protocol.npm.names import InvalidName, PackageName, check_tarball_file, split_request
from contentcache.protocol.npm.packument import MARKER_BYTES, Renderer, allowed_host, host_port

DATA = b"a tarball"
SHA512 = "sha512-" + base64.b64encode(hashlib.sha512(DATA).digest()).decode()
SHA1 = hashlib.sha1(DATA).hexdigest()
WRONG512 = "sha512-" + base64.b64encode(hashlib.sha512(b"other").digest()).decode()


@pytest.fixture
def tarball(tmp_path: Any) -> str:
    path = str(tmp_path / "t.tgz")
    open(path, "wb").write(DATA)
    return path


@pytest.mark.parametrize(
    "integrity, shasum",
    [
        (SHA512, SHA1),
        (SHA512, None),
        (None, SHA1),
        (None, SHA1.upper()),
        (None, f" {SHA1}\n"),
        (f"{WRONG512} {SHA512}", None),  # any digest of the strongest algorithm
        (f"sha1-{base64.b64encode(hashlib.sha1(DATA).digest()).decode()} {SHA512}", None),
    ],
)
def test_good_tarballs(tarball: str, integrity: str | None, shasum: str | None) -> None:
    check_tarball(tarball, integrity, shasum)


@pytest.mark.parametrize(
    "integrity, shasum",
    [
        (WRONG512, None),
        (SHA512, "0" * 40),
        (None, None),
        (12, None),
        (f"{WRONG512} sha1-{base64.b64encode(hashlib.sha1(DATA).digest()).decode()}", None),
    ],
)
def test_bad_tarballs(tarball: str, integrity: Any, shasum: str | None) -> None:
    with pytest.raises(IntegrityMismatch):
        check_tarball(tarball, integrity, shasum)


def test_tarball_hosts() -> None:
    assert host_port("https://Reg.Example/") == "reg.example:443"
    assert host_port("http://reg.example:8080/x") == "reg.example:8080"
    assert host_port("http://reg.example:99999/x") == ""
    assert host_port("ftp://reg.example/x") == ""
    hosts = {host_port("https://Reg.Example")}
    assert allowed_host("https://reg.example:443/p/-/p-1.0.0.tgz", hosts)
    assert allowed_host("https://REG.example/p/-/p-1.0.0.tgz", hosts)
    assert not allowed_host("http://reg.example/p/-/p-1.0.0.tgz", hosts)  # another port
    assert not allowed_host("https://evil.example/p/-/p-1.0.0.tgz", hosts)
    assert not allowed_host("https://reg.example:99999/p.tgz", hosts)
    assert allowed_host("https://cdn.example:8443/p.tgz", {"cdn.example"})


def test_renderer_replaces_markers_split_anywhere() -> None:
    document = json.dumps({"a": "\x00contentcache-base\x00/p/-/p-1.tgz", "b": ["x" * 50] * 3}).encode()
    assert MARKER_BYTES in document
    for size in (1, 2, 7, 13, len(document)):
        renderer = Renderer("http://cache:8080/npm", gzip=False)
        out = b"".join(renderer.feed(document[i : i + size]) for i in range(0, len(document), size))
        out += renderer.finish()
        assert json.loads(out)["a"] == "http://cache:8080/npm/p/-/p-1.tgz"
    renderer = Renderer("http://cache:8080/npm", gzip=True)
    out = renderer.feed(document) + renderer.finish()
    assert json.loads(gzip.decompress(out))["a"] == "http://cache:8080/npm/p/-/p-1.tgz"


@pytest.mark.parametrize(
    "segments, name, rest",
    [
        (["left-pad"], "left-pad", []),
        (["@scope/pkg"], "@scope/pkg", []),
        (["@scope", "pkg", "-", "pkg-1.0.0.tgz"], "@scope/pkg", ["-", "pkg-1.0.0.tgz"]),
        (["@scope/pkg", "-", "pkg-1.0.0.tgz"], "@scope/pkg", ["-", "pkg-1.0.0.tgz"]),
        (["JSONStream"], "JSONStream", []),
    ],
)
def test_request_names(segments: list[str], name: str, rest: list[str]) -> None:
    parsed, tail = split_request(segments)
    assert parsed.full == name and tail == rest


@pytest.mark.parametrize("segments", [[".."], ["a/b"], ["@scope"], ["_x"], [".x"], [""], ["a" * 215], ["@/x"]])
def test_invalid_request_names(segments: list[str]) -> None:
    with pytest.raises(InvalidName):
        split_request(segments)


def test_tarball_file_names() -> None:
    name = PackageName.parse("@scope/pkg")
    assert check_tarball_file(name, "pkg-1.0.0.tgz") == "pkg-1.0.0.tgz"
    assert name.path == "@scope%2Fpkg"
    for bad in ("other-1.0.0.tgz", "pkg-.tgz", "pkg-1.0.0.zip", "pkg-../x.tgz"):
        with pytest.raises(InvalidName):
            check_tarball_file(name, bad)
