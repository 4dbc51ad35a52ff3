"""
zstd as a storage encoding. The store asks L{Compression.encode} what to do
with a spooled blob; content that does not shrink by a tenth in a trial on
its first chunk (tarballs, zips, anything already compressed) is stored as
it came. The encoding is recorded, never guessed from the stored bytes.

Every function here blocks: run it on the disk pool.
"""

from __future__ import annotations

from typing import BinaryIO

import zstandard
from attrs import frozen

IDENTITY = "identity"
ZSTD = "zstd"
#: Every encoding, with the suffix its stored objects' keys carry.
SUFFIXES = {IDENTITY: "", ZSTD: ".zst"}

#: How much of a blob the trial compresses.
TRIAL_SIZE = 64 * 1024
#: Below this, a zstd frame's overhead eats most of what compression
#: saves (bench/store.py: Go .info files, 50-220 bytes, came out 2%
#: smaller), and every read would still pay for decoding.
MIN_SIZE = 256
#: How much the trial must save for the blob to be stored compressed.
MIN_SAVING = 0.10
#: Levels allowed, fast (negative) to slow. zstd goes to 22, but above 19
#: its window, which every reader must hold, grows to 64 MiB and more.
MIN_LEVEL, MAX_LEVEL = -7, 19
DEFAULT_LEVEL = 3

_COPY_SIZE = 1 << 20

#: How formats that are compressed already begin: gzip (.tgz), zip, zstd,
#: xz, bzip2. Such content is stored as it came without a trial: the odd
#: small zip whose headers would shrink a little is not worth decoding on
#: every read.
COMPRESSED_MAGIC = (b"\x1f\x8b", b"PK\x03\x04", b"PK\x05\x06", b"\x28\xb5\x2f\xfd", b"\xfd7zXZ\x00", b"BZh")


@frozen
class Compression:
    """
    The store's compression policy: zstd at C{level}, or none when C{level}
    is 0.
    """

    level: int = DEFAULT_LEVEL

    def __attrs_post_init__(self) -> None:
        if not MIN_LEVEL <= self.level <= MAX_LEVEL:
            raise ValueError(f"the compression level is 0 (off) or from {MIN_LEVEL} to {MAX_LEVEL}, not {self.level}")

    @property
    def enabled(self) -> bool:
        return self.level != 0

    def _compressor(self) -> zstandard.ZstdCompressor:
        # The checksum makes a damaged object fail to decode instead of
        # decoding into other bytes.
        return zstandard.ZstdCompressor(level=self.level, write_content_size=True, write_checksum=True)

    def trial(self, sample: bytes) -> bytes | None:
        """
        C{sample}, the start of some content, compressed, if compressing
        the content is worth it; L{None} otherwise.
        """
        if not self.enabled or len(sample) < MIN_SIZE or sample.startswith(COMPRESSED_MAGIC):
            return None
        compressed: bytes = self._compressor().compress(sample)
        return compressed if len(compressed) <= len(sample) * (1 - MIN_SAVING) else None

    def encode(self, source: BinaryIO, size: int, target: BinaryIO) -> str:
        """
        Decide on a blob of C{size} bytes read from C{source} (a file at its
        start): either compress it into C{target} and return L{ZSTD}, or
        write nothing and return L{IDENTITY}.
        """
        sample = source.read(TRIAL_SIZE)
        compressed = self.trial(sample)
        if compressed is None:
            return IDENTITY
        if len(sample) == size:
            # The trial was the whole blob.
            target.write(compressed)
        else:
            source.seek(0)
            self._compressor().copy_stream(source, target, size=size, read_size=_COPY_SIZE, write_size=_COPY_SIZE)
        return ZSTD


#: What decoding a damaged object raises.
DecodeError = zstandard.ZstdError


def decoder(stream: BinaryIO, encoding: str) -> BinaryIO:
    """
    A blocking reader of the original bytes of C{stream}, stored in
    C{encoding}; closing it closes C{stream}.
    """
    if encoding == IDENTITY:
        return stream
    if encoding == ZSTD:
        reader: BinaryIO = zstandard.ZstdDecompressor().stream_reader(stream, read_size=_COPY_SIZE, closefd=True)
        return reader
    raise ValueError(f"unknown storage encoding {encoding!r}")


def decode(data: bytes, encoding: str, size: int | None = None) -> bytes:
    """
    The original bytes of a whole stored object held in memory (a small
    blob), expected to be C{size} bytes: a damaged frame header that says
    more is an error, not an allocation of that much.
    """
    if encoding == IDENTITY:
        return data
    if encoding == ZSTD:
        if size is not None and zstandard.frame_content_size(data) not in (size, -1):
            raise DecodeError(f"the frame says {zstandard.frame_content_size(data):,} bytes, not {size:,}")
        return zstandard.ZstdDecompressor().decompress(data, max_output_size=size or 0)
    raise ValueError(f"unknown storage encoding {encoding!r}")
