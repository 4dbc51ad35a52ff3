"""
The BLAKE3-256 content hash that names every blob in the store.
"""

from __future__ import annotations

import re

import blake3
from attrs import field, frozen

DIGEST_SIZE = 32
_HEX = re.compile(r"[0-9a-f]{64}")


class InvalidHash(ValueError):
    """
    A value that is not a BLAKE3-256 digest in the form this store uses.
    """


def _check_digest(instance: Hash, attribute: object, value: bytes) -> None:
    if not isinstance(value, bytes) or len(value) != DIGEST_SIZE:
        raise InvalidHash(f"a BLAKE3-256 digest is {DIGEST_SIZE} bytes")


@frozen
class Hash:
    """
    A BLAKE3-256 digest of a blob's uncompressed content.
    """

    digest: bytes = field(validator=_check_digest)

    @classmethod
    def from_hex(cls, text: str) -> Hash:
        """
        Parse the canonical form: exactly 64 lowercase hexadecimal characters.
        """
        if not isinstance(text, str) or _HEX.fullmatch(text) is None:
            raise InvalidHash(
                "a blob hash is exactly 64 lowercase hexadecimal characters"
            )
        return cls(bytes.fromhex(text))

    @classmethod
    def of(cls, data: bytes) -> Hash:
        """
        Hash a complete byte string (for small values; stream large ones
        through L{Hasher}).
        """
        return cls(blake3.blake3(data).digest())

    def matches(self, data: bytes) -> bool:
        """
        Whether C{data} hashes to this (one call, for small blobs).
        """
        return bool(blake3.blake3(data).digest() == self.digest)

    @property
    def hex(self) -> str:
        return self.digest.hex()

    @property
    def shard(self) -> str:
        """
        The directory a blob lives in: the first two hex characters.
        """
        return self.hex[:2]

    def __str__(self) -> str:
        return self.hex

    def __repr__(self) -> str:
        return f"Hash({self.hex!r})"


class Hasher:
    """
    Hash a stream incrementally and count its bytes.
    """

    def __init__(self) -> None:
        self._state = blake3.blake3()
        self.size = 0

    def update(self, data: bytes) -> None:
        self._state.update(data)
        self.size += len(data)

    def finish(self) -> Hash:
        return Hash(self._state.digest())
