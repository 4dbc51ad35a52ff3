"""
The S3 backend: one object per key in a bucket, under a prefix, on AWS S3
or any S3-compatible server (MinIO, Ceph RGW, SeaweedFS).

botocore is the client: it signs requests with whatever the standard AWS
credential chain finds (environment, shared config and credentials files,
instance roles), retries transient errors with exponential backoff and
jitter, and is safe to share between threads. Every call blocks, so every
call runs on the disk pool.

An object appears under its key only when it is complete: small objects go
up in one PUT, larger ones as a multipart upload that is completed only
after its last part and aborted if anything fails before. Uploads a crash
left behind are aborted by L{S3Backend.sweep} once they are a day old;
reads stream, and pick up where they stopped if a connection drops.
"""

from __future__ import annotations

import io
import os
import time
from typing import Any, AsyncIterable, AsyncIterator, BinaryIO, Callable, Iterable, TypeVar, cast
from urllib.parse import urlsplit

from attrs import define, field, frozen
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from zope.interface import implementer

from ..pool import Runner
from . import BlockingReader, IBackend, IReader, NotFound, Stat, StorageUnavailable, check_key, iterate

log = Logger()
T = TypeVar("T")

#: S3 refuses parts smaller than this, but for the last.
MIN_PART_SIZE = 5 * 1024 * 1024
#: S3 allows at most this many parts in an upload.
MAX_PARTS = 10_000
DEFAULT_PART_SIZE = 16 * 1024 * 1024
#: How old an unfinished multipart upload must be before sweep aborts it:
#: younger ones may belong to a worker still uploading.
STALE_UPLOAD_AGE = 24 * 3600
#: Attempts for each request (botocore's "standard" retry mode: backoff
#: with jitter on throttling, 5xx and connection errors).
MAX_ATTEMPTS = 5
#: How often a read that lost its connection starts again from where it was.
READ_RESUMES = 3
#: The part of the key space under the prefix that the store writes.
UPLOADS_UNDER = "blobs/"
#: S3's largest part, and largest single PUT.
MAX_PART_SIZE = 5 * 1024**3

_MISSING = {"404", "NoSuchKey", "NotFound"}
_NO_BUCKET = {"NoSuchBucket"}
_CHANGED = {"412", "PreconditionFailed"}
_REFUSED = {"403", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidToken",
            "ExpiredToken", "AuthorizationHeaderMalformed"}


@frozen
class S3Location:
    """
    A bucket and a key prefix, from C{s3://BUCKET/PREFIX}.
    """

    bucket: str
    #: Empty, or ending in C{/}.
    prefix: str = ""

    @classmethod
    def parse(cls, url: str) -> S3Location:
        parts = urlsplit(url)
        if parts.scheme != "s3" or not parts.netloc or parts.query or parts.fragment:
            raise ValueError(f"{url!r} is not an s3://BUCKET/PREFIX address")
        bucket = parts.netloc
        if not 3 <= len(bucket) <= 63 or not all(c.isalnum() or c in ".-" for c in bucket) or bucket != bucket.lower():
            raise ValueError(f"{bucket!r} is not an S3 bucket name (3-63 lower-case letters, digits, '.' and '-')")
        prefix = parts.path.strip("/")
        if prefix:
            try:
                check_key(prefix)
            except ValueError:
                raise ValueError(f"{prefix!r} is not a usable key prefix") from None
        return cls(bucket, prefix + "/" if prefix else "")

    def __str__(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}"


def _code(error: Exception) -> str:
    response = getattr(error, "response", None) or {}
    return str(response.get("Error", {}).get("Code", ""))


def make_client(endpoint: str | None, region: str | None, threads: int, attempts: int = MAX_ATTEMPTS) -> Any:
    """
    A botocore S3 client. Credentials come from the standard chain, never
    from here. With an C{endpoint} (an S3-compatible server), addresses are
    path-style, which every such server understands.
    """
    import boto3
    from botocore.config import Config

    config = Config(
        region_name=region,
        retries={"mode": "standard", "max_attempts": attempts},
        connect_timeout=10,
        read_timeout=60,
        max_pool_connections=threads + 2,
        s3={"addressing_style": "path"} if endpoint else None,
        # Checksums only where S3 requires them: S3-compatible servers
        # differ in what they accept, and every blob is hashed anyway.
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
    )
    return boto3.session.Session().client("s3", endpoint_url=endpoint, config=config)


class _ObjectStream(io.RawIOBase):
    """
    An object's body from an offset, read as a blocking stream. If the
    connection breaks part-way, the rest is asked for again with a ranged
    GET, up to L{READ_RESUMES} times.
    """

    def __init__(self, backend: S3Backend, key: str, response: dict[str, Any], position: int, size: int) -> None:
        super().__init__()
        self._backend = backend
        self._key = key
        self._body = response["Body"]
        #: The object read: a resume must not join another one's bytes.
        self._etag = response.get("ETag")
        self._position = position
        self._size = size
        self._resumes = 0

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        from botocore.exceptions import BotoCoreError, ClientError
        from urllib3.exceptions import HTTPError

        if size < 0:
            size = self._size - self._position
        while True:
            try:
                data: bytes = self._body.read(size) if self._position < self._size else b""
                break
            except (BotoCoreError, HTTPError, OSError) as e:
                if self._resumes >= READ_RESUMES:
                    raise StorageUnavailable(f"reading {self._key} from S3 failed: {e}") from e
                self._resumes += 1
                log.warn("reading {key} from S3 failed at byte {position} ({error}); resuming",
                         key=self._key, position=self._position, error=e)
                self._body.close()
                try:
                    self._body = self._backend._get(self._key, self._position, if_match=self._etag)["Body"]
                except ClientError as gone:
                    # Deleted, or replaced by another object, meanwhile.
                    if _code(gone) in _MISSING or _code(gone) in _CHANGED:
                        raise NotFound(self._key) from None
                    raise StorageUnavailable(f"reading {self._key} from S3 failed: {gone}") from gone
                except (BotoCoreError, HTTPError, OSError) as down:
                    raise StorageUnavailable(f"reading {self._key} from S3 failed: {down}") from down
        self._position += len(data)
        return data

    def close(self) -> None:
        if not self.closed:
            self._body.close()
        super().close()


@implementer(IBackend)
@define
class S3Backend:
    """
    Store objects in C{location} through C{client}.
    """

    _client: Any
    location: S3Location
    _disk: Runner
    part_size: int = field(default=DEFAULT_PART_SIZE)
    #: A client with fewer retries, for the check at start.
    _check_client: Any = None

    @part_size.validator
    def _valid_part_size(self, attribute: object, value: int) -> None:
        if not MIN_PART_SIZE <= value <= MAX_PART_SIZE:
            raise ValueError(f"the S3 part size must be from 5MiB to 5GiB, not {value} bytes")

    @property
    def bucket(self) -> str:
        return self.location.bucket

    def _run(self, f: Callable[..., T], *args: object) -> Deferred[T]:
        """
        Run a blocking S3 call on the disk pool. Errors it does not handle
        itself (S3 down after the retries, throttling that does not stop)
        become L{StorageUnavailable}: 503 for a client, one log line.
        """
        return self._disk.run(self._guarded, f, *args)

    def _guarded(self, f: Callable[..., T], *args: object) -> T:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return f(*args)
        except (BotoCoreError, ClientError) as e:
            raise StorageUnavailable(f"S3 at {self._client.meta.endpoint_url} failed: {e}") from e

    def name(self, key: str) -> str:
        """
        The S3 key of C{key}.
        """
        return self.location.prefix + check_key(key)

    def check(self) -> None:
        """
        Blocking, at start: raise L{StorageUnavailable} if the bucket is
        missing, the credentials are refused or the endpoint is out of
        reach.
        """
        from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError, PartialCredentialsError

        client = self._check_client or self._client
        where = client.meta.endpoint_url
        try:
            client.head_bucket(Bucket=self.bucket)
        except (NoCredentialsError, PartialCredentialsError) as e:
            found = "were found" if isinstance(e, NoCredentialsError) else "are incomplete"
            raise StorageUnavailable(
                f"No usable AWS credentials {found} for {self.location}: set AWS_ACCESS_KEY_ID and "
                f"AWS_SECRET_ACCESS_KEY, AWS_PROFILE, or run with an instance role."
            ) from None
        except ClientError as e:
            code = _code(e)
            if code in _MISSING or code in _NO_BUCKET:
                raise StorageUnavailable(f"The S3 bucket {self.bucket!r} does not exist at {where}.") from None
            if code in _REFUSED:
                raise StorageUnavailable(
                    f"S3 at {where} refused the credentials for bucket {self.bucket!r} ({code}): "
                    f"check the AWS credentials and the bucket's permissions."
                ) from None
            raise StorageUnavailable(f"S3 at {where} answered {code or e} for bucket {self.bucket!r}.") from None
        except BotoCoreError as e:
            raise StorageUnavailable(f"Cannot reach S3 at {where}: {e}.") from None

    # Writes.

    def _put(self, key: str, body: BinaryIO | bytes) -> None:
        self._client.put_object(Bucket=self.bucket, Key=key, Body=body)

    def _begin(self, key: str) -> str:
        upload: str = self._client.create_multipart_upload(Bucket=self.bucket, Key=key)["UploadId"]
        return upload

    def _part(self, key: str, upload: str, number: int, data: bytes) -> dict[str, Any]:
        if number > MAX_PARTS:
            raise ValueError(f"{key} needs more than {MAX_PARTS} parts: raise the part size")
        # A file object, not bytes: http.client would join bytes to the
        # request's headers, a second copy of the part in memory.
        response = self._client.upload_part(
            Bucket=self.bucket, Key=key, UploadId=upload, PartNumber=number, Body=io.BytesIO(data)
        )
        return {"PartNumber": number, "ETag": response["ETag"]}

    def _complete(self, key: str, upload: str, parts: list[dict[str, Any]]) -> None:
        self._client.complete_multipart_upload(
            Bucket=self.bucket, Key=key, UploadId=upload, MultipartUpload={"Parts": parts}
        )

    def _abort(self, key: str, upload: str) -> None:
        try:
            self._client.abort_multipart_upload(Bucket=self.bucket, Key=key, UploadId=upload)
        except Exception as e:
            # sweep() aborts it later; the original error matters more.
            log.warn("could not abort the upload of {key}: {error}", key=key, error=e)

    async def _multipart(self, key: str, parts: AsyncIterator[bytes]) -> None:
        # (Parts are numbered from 1; _part refuses number 10,001.)
        upload = await self._run(self._begin, key)
        try:
            done: list[dict[str, Any]] = []
            async for data in parts:
                done.append(await self._run(self._part, key, upload, len(done) + 1, data))
                # Let the part go before the next one is read: one in memory.
                del data
            await self._run(self._complete, key, upload, done)
        except BaseException:
            await self._run(self._abort, key, upload)
            raise

    async def _write(self, key: str, chunks: AsyncIterable[bytes] | Iterable[bytes]) -> None:
        name = self.name(key)
        source = iterate(chunks).__aiter__()
        buffer = bytearray()
        ended = False
        while len(buffer) < self.part_size:
            try:
                buffer += await source.__anext__()
            except StopAsyncIteration:
                ended = True
                break
        if ended:
            await self._run(self._put, name, io.BytesIO(buffer))
            return

        async def parts() -> AsyncIterator[bytes]:
            nonlocal buffer
            async for chunk in source:
                buffer += chunk
                while len(buffer) >= self.part_size:
                    yield bytes(buffer[: self.part_size])
                    del buffer[: self.part_size]
            if buffer:
                yield bytes(buffer)

        await self._multipart(name, parts())

    def write(self, key: str, chunks: AsyncIterable[bytes] | Iterable[bytes]) -> Deferred[None]:
        return Deferred.fromCoroutine(self._write(key, chunks))

    async def _write_file(self, key: str, path: str) -> None:
        name = self.name(key)
        size = await self._disk.run(os.path.getsize, path)
        if size <= self.part_size:
            await self._run(self._put_file, name, path)
        else:
            # Larger parts for a blob that would need more than S3 allows.
            part_size = max(self.part_size, -(-size // MAX_PARTS))
            handle: BinaryIO = await self._disk.run(open, path, "rb")
            try:
                await self._multipart(name, self._file_parts(handle, part_size))
            finally:
                await self._disk.run(handle.close)
        await self._disk.run(os.unlink, path)

    def _put_file(self, key: str, path: str) -> None:
        with open(path, "rb") as body:
            self._put(key, body)

    async def _file_parts(self, handle: BinaryIO, part_size: int) -> AsyncIterator[bytes]:
        # One part in memory at a time, read on the pool.
        while data := await self._disk.run(handle.read, part_size):
            yield data

    def write_file(self, key: str, path: str) -> Deferred[None]:
        return Deferred.fromCoroutine(self._write_file(key, path))

    # Reads.

    def _get(self, name: str, offset: int, end: int | None = None, if_match: str | None = None) -> dict[str, Any]:
        arguments: dict[str, Any] = {"Bucket": self.bucket, "Key": name}
        if if_match:
            arguments["IfMatch"] = if_match
        if offset or end is not None:
            arguments["Range"] = f"bytes={offset}-{'' if end is None else end}"
        response: dict[str, Any] = self._client.get_object(**arguments)
        return response

    def _open(self, key: str, offset: int) -> BlockingReader:
        from botocore.exceptions import ClientError

        name = self.name(key)
        try:
            response = self._get(name, offset)
        except ClientError as e:
            if _code(e) in _MISSING:
                raise NotFound(key) from None
            if _code(e) != "InvalidRange":
                raise
            # At or past the end: nothing to read.
            stat = self._stat(key)
            if stat is None:
                raise NotFound(key) from None
            return BlockingReader(self._disk, io.BytesIO(), stat.size)
        content_range = response.get("ContentRange")
        size = int(content_range.rsplit("/", 1)[1]) if content_range else int(response["ContentLength"])
        stream = _ObjectStream(self, name, response, offset, size)
        return BlockingReader(self._disk, cast(BinaryIO, stream), size)

    def open(self, key: str, offset: int = 0) -> Deferred[IReader]:
        return self._run(self._open, key, offset)

    def _read(self, key: str, offset: int, length: int, then: Callable[[bytes], bytes] | None) -> bytes:
        from botocore.exceptions import ClientError

        if length <= 0:
            if self._stat(key) is None:
                raise NotFound(key)
            return b"" if then is None else then(b"")
        try:
            response = self._get(self.name(key), offset, offset + length - 1)
        except ClientError as e:
            if _code(e) in _MISSING:
                raise NotFound(key) from None
            if _code(e) == "InvalidRange":
                return b"" if then is None else then(b"")
            raise
        with response["Body"] as body:
            data: bytes = body.read()
        return data if then is None else then(data)

    def read(self, key: str, offset: int, length: int, then: Callable[[bytes], bytes] | None = None) -> Deferred[bytes]:
        return self._run(self._read, key, offset, length, then)

    def read_blocking(self, key: str, offset: int, length: int) -> bytes:
        """
        L{read} on the calling thread, for a caller already on the disk
        pool (a cold hit reads its entry and its small blob in one trip,
        so the hot set holds S3 blobs' bytes too).
        """
        return self._guarded(self._read, key, offset, length, None)

    def _stat(self, key: str) -> Stat | None:
        from botocore.exceptions import ClientError

        try:
            response = self._client.head_object(Bucket=self.bucket, Key=self.name(key))
        except ClientError as e:
            if _code(e) in _MISSING:
                return None
            raise
        return Stat(size=int(response["ContentLength"]), mtime=response["LastModified"].timestamp())

    def stat(self, key: str) -> Deferred[Stat | None]:
        return self._run(self._stat, key)

    def _delete(self, key: str) -> bool:
        # S3 deletes answer the same whether or not there was an object.
        if self._stat(key) is None:
            return False
        self._client.delete_object(Bucket=self.bucket, Key=self.name(key))
        return True

    def delete(self, key: str) -> Deferred[bool]:
        return self._run(self._delete, key)

    def delete_now(self, key: str) -> bool:
        return self._guarded(self._delete, key)

    def _list(self, prefix: str, token: str | None) -> tuple[list[str], str | None]:
        arguments: dict[str, Any] = {"Bucket": self.bucket, "Prefix": prefix}
        if token:
            arguments["ContinuationToken"] = token
        response = self._client.list_objects_v2(**arguments)
        strip = len(self.location.prefix)
        keys = [item["Key"][strip:] for item in response.get("Contents", [])]
        return keys, response.get("NextContinuationToken") if response.get("IsTruncated") else None

    async def keys(self, prefix: str = "") -> AsyncIterator[str]:
        # A prefix names a directory, as on the filesystem.
        start = self.location.prefix + (check_key(prefix) + "/" if prefix else "")
        token: str | None = None
        while True:
            keys, token = await self._run(self._list, start, token)
            for key in keys:
                if not any(part.startswith(".") for part in key.split("/")):
                    yield key
            if token is None:
                return

    # Leftovers.

    def _sweep(self) -> int:
        """
        Abort the multipart uploads under the prefix that a crash left
        behind: those older than L{STALE_UPLOAD_AGE}.
        """
        cutoff = time.time() - STALE_UPLOAD_AGE
        aborted = 0
        # Only where this backend writes: the prefix may be a whole bucket,
        # or hold another daemon's prefix below it.
        arguments: dict[str, Any] = {"Bucket": self.bucket, "Prefix": self.location.prefix + UPLOADS_UNDER}
        while True:
            response = self._client.list_multipart_uploads(**arguments)
            for upload in response.get("Uploads", []):
                if upload["Initiated"].timestamp() < cutoff:
                    self._abort(upload["Key"], upload["UploadId"])
                    aborted += 1
            if not response.get("IsTruncated"):
                return aborted
            arguments["KeyMarker"] = response.get("NextKeyMarker")
            arguments["UploadIdMarker"] = response.get("NextUploadIdMarker")

    def sweep(self) -> Deferred[int]:
        return self._run(self._sweep)
