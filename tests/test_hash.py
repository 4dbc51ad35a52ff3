from __future__ import annotations

import blake3
import pytest

from contentcache.hash import Hash, Hasher, InvalidHash

HELLO = blake3.blake3(b"hello").hexdigest()


def test_from_hex_round_trip() -> None:
    h = Hash.from_hex(HELLO)
    assert h.hex == HELLO
    assert h.digest == bytes.fromhex(HELLO)
    assert h.shard == HELLO[:2]
    assert str(h) == HELLO


def test_of_matches_blake3() -> None:
    assert Hash.of(b"hello") == Hash.from_hex(HELLO)
    assert Hash.of(b"") == Hash.from_hex(blake3.blake3(b"").hexdigest())


@pytest.mark.parametrize(
    "text",
    [
        "",
        HELLO[:-1],  # 63 characters
        HELLO + "0",  # 65 characters
        HELLO.upper(),
        HELLO[:-1] + "g",
        " " + HELLO[1:],
        HELLO[:-1] + "\n",
        "../" + HELLO[3:],
        "é" * 64,
    ],
)
def test_from_hex_rejects(text: str) -> None:
    with pytest.raises(InvalidHash):
        Hash.from_hex(text)


def test_from_hex_rejects_non_strings() -> None:
    with pytest.raises(InvalidHash):
        Hash.from_hex(HELLO.encode())  # type: ignore[arg-type]


@pytest.mark.parametrize("digest", [b"", b"\x00" * 31, b"\x00" * 33])
def test_raw_digest_must_be_32_bytes(digest: bytes) -> None:
    with pytest.raises(InvalidHash):
        Hash(digest)


def test_hashes_are_values() -> None:
    assert Hash.from_hex(HELLO) == Hash.of(b"hello")
    assert len({Hash.from_hex(HELLO), Hash.of(b"hello")}) == 1
    assert Hash.of(b"a") != Hash.of(b"b")


def test_streaming_hasher_equals_one_shot() -> None:
    data = bytes(range(256)) * 5000
    hasher = Hasher()
    for i in range(0, len(data), 4097):
        hasher.update(data[i : i + 4097])
    assert hasher.size == len(data)
    assert hasher.finish() == Hash.of(data)
