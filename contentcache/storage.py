"""
Where the cache keeps things, as the daemon and the admin command are told:
blobs in a directory or in an S3 bucket, the index and the spool files in a
local directory, and how blobs are compressed.
"""

from __future__ import annotations

import os

from attrs import frozen

from .backend import IBackend, StorageUnavailable
from .backend.filesystem import FilesystemBackend
from .backend.s3 import DEFAULT_PART_SIZE, MAX_PART_SIZE, MIN_PART_SIZE, S3Backend, S3Location, make_client
from .compress import DEFAULT_LEVEL, Compression
from .pool import Runner
from .space import DiskSpace
from .store import Store

S3_SCHEME = "s3://"
#: The store's spool files, under the directory that holds them.
STAGING = "tmp"


@frozen
class StorageConfig:
    """
    Where blobs and the index live, and how blobs are stored.
    """

    #: An absolute directory, or L{S3Location}.
    blobs: str | S3Location
    #: The local directory of the index (and, with S3, of the spool files).
    state_dir: str
    s3_endpoint: str | None = None
    s3_region: str | None = None
    s3_part_size: int = DEFAULT_PART_SIZE
    compression: Compression = Compression(DEFAULT_LEVEL)

    @classmethod
    def parse(
        cls,
        storage: str,
        state_dir: str | None = None,
        s3_endpoint: str | None = None,
        s3_region: str | None = None,
        s3_part_size: int = DEFAULT_PART_SIZE,
        compression_level: int = DEFAULT_LEVEL,
    ) -> StorageConfig:
        """
        Check what the operator gave; raise L{ValueError} with a sentence
        that says what is wrong.
        """
        storage = storage.strip()
        if not storage:
            raise ValueError("--storage needs a directory or an s3://BUCKET/PREFIX address.")
        try:
            compression = Compression(compression_level)
        except ValueError as e:
            raise ValueError(f"--compression-level: {e}.") from None
        if s3_endpoint is not None and not s3_endpoint.startswith(("http://", "https://")):
            raise ValueError(f"--s3-endpoint must be an http or https URL, not {s3_endpoint!r}.")
        if not MIN_PART_SIZE <= s3_part_size <= MAX_PART_SIZE:
            raise ValueError(f"--s3-part-size must be from 5MiB to 5GiB, not {s3_part_size} bytes.")
        blobs: str | S3Location
        if storage.startswith(S3_SCHEME):
            try:
                blobs = S3Location.parse(storage)
            except ValueError as e:
                raise ValueError(f"--storage: {e}.") from None
            if not state_dir:
                raise ValueError(
                    f"--storage {storage} keeps blobs in S3 and the index in a local "
                    f"directory: give it with --state-dir (e.g. /var/lib/contentcache)."
                )
        else:
            if s3_endpoint or s3_region:
                raise ValueError("--s3-endpoint and --s3-region go with --storage s3://BUCKET/PREFIX.")
            blobs = _directory(storage, "--storage")
            state_dir = state_dir or blobs
        return cls(blobs, _directory(state_dir, "--state-dir"), s3_endpoint, s3_region, s3_part_size, compression)

    @property
    def staging(self) -> str:
        """
        The spool files' directory: beside the blobs on a filesystem, so a
        blob is committed with a rename; in the state directory otherwise.
        """
        base = self.blobs if isinstance(self.blobs, str) else self.state_dir
        return os.path.join(base, STAGING)

    def backend(self, disk: Runner, threads: int) -> IBackend:
        if isinstance(self.blobs, str):
            return FilesystemBackend(self.blobs, disk)
        try:
            clients = [make_client(self.s3_endpoint, self.s3_region, threads),
                       make_client(self.s3_endpoint, self.s3_region, 1, attempts=2)]
        except Exception as e:
            # A profile that does not exist, a region or endpoint botocore
            # cannot use: configuration, said in one sentence.
            raise StorageUnavailable(f"Cannot set up the S3 client for {self.blobs}: {e}.") from None
        return S3Backend(clients[0], self.blobs, disk, self.s3_part_size, clients[1])

    def store(self, disk: Runner, threads: int, space: DiskSpace | None = None) -> Store:
        """
        The store on this storage; raises L{StorageUnavailable}.
        """
        return Store(self.backend(disk, threads), self.staging, disk, self.compression,
                     space or DiskSpace(self.staging))


def _directory(path: str, option: str) -> str:
    path = os.path.abspath(os.path.expanduser(path.strip()))
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"{option} {path} exists and is not a directory.")
    return path
