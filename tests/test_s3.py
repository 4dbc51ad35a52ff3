"""
The S3 backend against a real S3-compatible server (SeaweedFS on
127.0.0.1): multipart uploads, what an interrupted upload leaves, ranged
reads, retries, and the checks at start.
"""

from __future__ import annotations

import http.client
import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Iterator

import pytest

from contentcache.backend import NotFound, StorageUnavailable
from contentcache.backend import s3 as s3_module
from contentcache.backend.s3 import MIN_PART_SIZE, S3Backend, S3Location, make_client
from contentcache.compress import Compression
from contentcache.hash import Hasher
from contentcache.pool import SynchronousRunner
from contentcache.storage import StorageConfig
from contentcache.store import BlobNotFound, Store, blob_key

from .conftest import files_under, resolve
from .daemon import Daemon
from .gomodules import GREET, build_tree, modules
from .test_goproxy import request
from .test_workers import children, wait_for_workers
from .seaweed import SeaweedS3
from .upstream import UpstreamFixture

MiB = 1024 * 1024
TWISTD = os.path.join(os.path.dirname(sys.executable), "twistd")


@pytest.fixture
def s3(seaweed: SeaweedS3, monkeypatch: Any) -> SeaweedS3:
    for name, value in seaweed.env().items():
        monkeypatch.setenv(name, value)
    return seaweed


@pytest.fixture
def location(s3: SeaweedS3) -> Iterator[S3Location]:
    where = S3Location(s3.bucket, f"s3test-{uuid.uuid4().hex[:12]}/")
    yield where
    s3.empty_bucket(s3.bucket, where.prefix)


def backend_for(s3: SeaweedS3, location: S3Location, endpoint: str | None = None, **kwargs: Any) -> S3Backend:
    return S3Backend(make_client(endpoint or s3.endpoint, s3.region, 4), location, SynchronousRunner(), **kwargs)


def read_all(backend: S3Backend, key: str, offset: int = 0, chunk: int = MiB) -> bytes:
    reader = resolve(backend.open(key, offset))
    parts = []
    while data := resolve(reader.read(chunk)):
        parts.append(data)
    resolve(reader.close())
    return b"".join(parts)


def test_a_100_MiB_blob_goes_up_in_parts_and_streams_back(
    s3: SeaweedS3, location: S3Location, tmp_path: Any
) -> None:
    backend = backend_for(s3, location, part_size=16 * MiB)
    store = Store(backend, str(tmp_path / "tmp"), SynchronousRunner(), Compression(3))
    resolve(store.start())
    hasher = Hasher()

    def chunks() -> Iterator[bytes]:
        for _ in range(100):
            data = os.urandom(MiB)
            hasher.update(data)
            yield data

    result = resolve(store.put(chunks()))
    assert result.hash == hasher.finish() and result.size == 100 * MiB
    assert result.blob.encoding == "identity"  # random bytes do not compress
    name = location.prefix + blob_key(result.hash)
    assert s3.list_keys(s3.bucket, location.prefix) == [name]
    head = s3.client().head_object(Bucket=s3.bucket, Key=name)
    # A multipart object's ETag ends in the number of its parts.
    assert head["ETag"].strip('"').endswith(f"-{math.ceil(100 / 16)}")
    assert head["ContentLength"] == 100 * MiB

    reader = resolve(store.get(result.blob))
    assert reader.size == 100 * MiB
    check = Hasher()
    while data := resolve(reader.read(MiB)):
        check.update(data)
    resolve(reader.close())
    assert check.finish() == result.hash
    assert s3.list_multipart_uploads(s3.bucket, location.prefix) == []
    assert files_under(str(tmp_path / "tmp")) == []


def test_an_interrupted_upload_leaves_no_object_and_no_upload(s3: SeaweedS3, location: S3Location) -> None:
    backend = backend_for(s3, location)

    def chunks() -> Iterator[bytes]:
        for _ in range(2):
            yield os.urandom(MIN_PART_SIZE)  # two whole parts go up
        yield b"x" * 1000
        raise ConnectionError("upstream went away")

    with pytest.raises(ConnectionError):
        resolve(backend.write("blobs/ab/interrupted", chunks()))
    assert s3.list_keys(s3.bucket, location.prefix) == []
    assert s3.list_multipart_uploads(s3.bucket, location.prefix) == []


def test_a_part_that_fails_aborts_the_upload_and_the_spool_goes(
    s3: SeaweedS3, location: S3Location, tmp_path: Any
) -> None:
    backend = backend_for(s3, location, part_size=MIN_PART_SIZE)
    store = Store(backend, str(tmp_path / "tmp"), SynchronousRunner())
    resolve(store.start())
    upload_part = backend._client.upload_part
    sent = []

    def failing(**kwargs: Any) -> Any:
        if kwargs["PartNumber"] == 2:
            raise ConnectionResetError("the connection to S3 broke")
        sent.append(kwargs["PartNumber"])
        return upload_part(**kwargs)

    backend._client.upload_part = failing
    with pytest.raises(ConnectionResetError):
        resolve(store.put([os.urandom(3 * MIN_PART_SIZE)]))
    assert sent == [1]
    assert s3.list_keys(s3.bucket, location.prefix) == []
    assert s3.list_multipart_uploads(s3.bucket, location.prefix) == []
    assert files_under(str(tmp_path / "tmp")) == []


def test_sweep_aborts_only_uploads_a_crash_left_long_ago(
    s3: SeaweedS3, location: S3Location, monkeypatch: Any
) -> None:
    backend = backend_for(s3, location)
    client = s3.client()
    client.create_multipart_upload(Bucket=s3.bucket, Key=location.prefix + "blobs/aa/crashed")
    assert resolve(backend.sweep()) == 0, "a young upload may belong to a live worker"
    assert len(s3.list_multipart_uploads(s3.bucket, location.prefix)) == 1
    monkeypatch.setattr(s3_module, "STALE_UPLOAD_AGE", -60)
    assert resolve(backend.sweep()) == 1
    assert s3.list_multipart_uploads(s3.bucket, location.prefix) == []


def test_ranged_reads(s3: SeaweedS3, location: S3Location) -> None:
    backend = backend_for(s3, location)
    data = os.urandom(100_000)
    resolve(backend.write("k", [data]))
    assert resolve(backend.read("k", 10, 10)) == data[10:20]
    assert resolve(backend.read("k", 99_990, 100)) == data[-10:]
    assert resolve(backend.read("k", 100_000, 10)) == b""
    assert read_all(backend, "k", 54_321, chunk=7000) == data[54_321:]
    reader = resolve(backend.open("k", 100_000))
    assert reader.size == 100_000 and resolve(reader.read(10)) == b""
    resolve(reader.close())
    stat = resolve(backend.stat("k"))
    assert stat is not None and stat.size == 100_000 and abs(stat.mtime - time.time()) < 300


def test_keys_and_sweep_stay_under_the_prefix(s3: SeaweedS3, location: S3Location, monkeypatch: Any) -> None:
    # Another daemon's prefix below ours, and one beside it that extends it.
    ours = backend_for(s3, location)
    below = backend_for(s3, S3Location(location.bucket, location.prefix + "team-b/"))
    beside = backend_for(s3, S3Location(location.bucket, location.prefix.rstrip("/") + "x/"))
    client = s3.client()
    try:
        for key in ["blobs/aa/1", "blobs/bb/2"]:
            resolve(ours.write(key, [key.encode()]))
        resolve(below.write("blobs/aa/3", [b"theirs"]))
        resolve(beside.write("blobs/aa/4", [b"theirs"]))
        for other in (below, beside):
            client.create_multipart_upload(Bucket=s3.bucket, Key=other.name("blobs/cc/in-flight"))

        async def collect(backend: S3Backend) -> list[str]:
            return sorted([key async for key in backend.keys("blobs")])

        assert resolve(collect(ours)) == ["blobs/aa/1", "blobs/bb/2"]
        assert resolve(collect(below)) == ["blobs/aa/3"]
        assert resolve(ours.delete("blobs/aa/1")) is True
        assert resolve(ours.delete("blobs/aa/1")) is False
        monkeypatch.setattr(s3_module, "STALE_UPLOAD_AGE", -60)
        assert resolve(ours.sweep()) == 0
        # Even with no prefix at all (a whole bucket), only blobs/ is ours.
        assert resolve(backend_for(s3, S3Location(location.bucket, "")).sweep()) == 0
        assert len(s3.list_multipart_uploads(s3.bucket, location.prefix.rstrip("/"))) == 2
    finally:
        s3.empty_bucket(s3.bucket, beside.location.prefix)


def test_bad_client_settings_are_one_sentence(tmp_path: Any, monkeypatch: Any) -> None:
    monkeypatch.setenv("AWS_PROFILE", "no-such-profile")
    config = StorageConfig.parse("s3://bucket/prefix", str(tmp_path), "http://127.0.0.1:1")
    with pytest.raises(StorageUnavailable, match=r"^Cannot set up the S3 client for s3://bucket/prefix/: .*no-such-profile.*\.$"):
        config.backend(SynchronousRunner(), 1)


class FlakyProxy:
    """
    An HTTP proxy in front of the S3 server that answers 503 to the first
    C{fail} requests, and cuts the first GET body with more than
    C{cut_after} bytes short.
    """

    def __init__(self, target: str, fail: int = 0, cut_after: int | None = None) -> None:
        self.fail = fail
        self.cut_after = cut_after
        #: Drop every connection, kept-alive ones too, as a dead server would.
        self.down = False
        self.requests: list[str] = []
        host, port = target.split("//")[1].split(":")
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def _forward(self) -> None:
                if proxy.down:
                    self.close_connection = True
                    self.connection.shutdown(2)
                    return
                proxy.requests.append(f"{self.command} {self.path}")
                length = int(self.headers.get("content-length") or 0)
                body = self.rfile.read(length) if length else None
                if proxy.fail > 0:
                    proxy.fail -= 1
                    message = b"<Error><Code>SlowDown</Code><Message>busy</Message></Error>"
                    self.send_response(503)
                    self.send_header("content-length", str(len(message)))
                    self.end_headers()
                    self.wfile.write(message)
                    return
                upstream = http.client.HTTPConnection(host, int(port), timeout=30)
                upstream.request(self.command, self.path, body=body, headers=dict(self.headers.items()))
                response = upstream.getresponse()
                data = response.read()
                self.send_response(response.status)
                for name, value in response.getheaders():
                    if name.lower() not in ("transfer-encoding", "connection"):
                        self.send_header(name, value)
                self.end_headers()
                if self.command == "GET" and proxy.cut_after is not None and len(data) > proxy.cut_after:
                    self.wfile.write(data[: proxy.cut_after])
                    proxy.cut_after = None
                    self.wfile.flush()
                    self.close_connection = True
                    self.connection.shutdown(2)
                    return
                if self.command != "HEAD":
                    self.wfile.write(data)
                upstream.close()

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _forward

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        if self._thread.is_alive():
            self._server.shutdown()
            self._server.server_close()
            self._thread.join()


def test_transient_errors_are_retried(s3: SeaweedS3, location: S3Location) -> None:
    proxy = FlakyProxy(s3.endpoint, fail=2)
    try:
        backend = backend_for(s3, location, endpoint=proxy.endpoint)
        resolve(backend.write("k", [b"worth the wait"]))
        assert len(proxy.requests) == 3
        assert resolve(backend.read("k", 0, 100)) == b"worth the wait"
    finally:
        proxy.stop()


def test_a_read_whose_connection_breaks_resumes_where_it_stopped(
    s3: SeaweedS3, location: S3Location, clean_reactor: list[Any]
) -> None:
    data = os.urandom(3 * MiB)
    resolve(backend_for(s3, location).write("k", [data]))
    proxy = FlakyProxy(s3.endpoint, cut_after=MiB)
    try:
        backend = backend_for(s3, location, endpoint=proxy.endpoint)
        assert read_all(backend, "k", 100, chunk=256 * 1024) == data[100:]
        gets = [r for r in proxy.requests if r.startswith("GET")]
        assert len(gets) == 2, gets
    finally:
        proxy.stop()


def test_a_resume_never_joins_another_objects_bytes(s3: SeaweedS3, location: S3Location, tmp_path: Any) -> None:
    direct = backend_for(s3, location)
    resolve(direct.write("k", [os.urandom(3 * MiB)]))
    proxy = FlakyProxy(s3.endpoint, cut_after=2 * MiB)
    try:
        reader = resolve(backend_for(s3, location, endpoint=proxy.endpoint).open("k"))
        assert len(resolve(reader.read(MiB))) == MiB
        # Another worker writes other bytes under the key meanwhile.
        resolve(direct.write("k", [os.urandom(3 * MiB)]))
        with pytest.raises(NotFound):
            while resolve(reader.read(MiB)):
                pass
        resolve(reader.close())

        # Through the store, a blob deleted while it is read is missing.
        store = Store(backend_for(s3, location, endpoint=proxy.endpoint), str(tmp_path / "tmp"), SynchronousRunner())
        writer = Store(direct, str(tmp_path / "tmp"), SynchronousRunner())
        resolve(writer.start())
        blob = resolve(writer.put([os.urandom(3 * MiB)])).blob
        proxy.cut_after = 2 * MiB
        reader = resolve(store.get(blob))
        assert len(resolve(reader.read(MiB))) == MiB
        resolve(direct.delete(blob_key(blob.hash)))
        with pytest.raises(BlobNotFound):
            while resolve(reader.read(MiB)):
                pass
        resolve(reader.close())
    finally:
        proxy.stop()


def test_missing_bucket_and_refused_credentials_are_one_sentence(
    s3: SeaweedS3, location: S3Location, monkeypatch: Any
) -> None:
    with pytest.raises(StorageUnavailable, match=r"^The S3 bucket 'no-such-bucket' does not exist at http://127\.0\.0\.1:\d+\.$"):
        backend_for(s3, S3Location("no-such-bucket", "")).check()
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong")
    with pytest.raises(StorageUnavailable, match=r"refused the credentials for bucket 'contentcache-test'"):
        backend_for(s3, location).check()
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent")
    with pytest.raises(StorageUnavailable, match=r"^No usable AWS credentials were found"):
        backend_for(s3, location).check()


def test_the_daemon_refuses_to_start_on_a_missing_bucket(s3: SeaweedS3, tmp_path: Any) -> None:
    process = subprocess.run(
        [TWISTD, "-n", "--pidfile=", "contentcache", "--port", "tcp:0:interface=127.0.0.1",
         "--storage", "s3://no-such-bucket/cache", "--state-dir", str(tmp_path / "state"),
         "--s3-endpoint", s3.endpoint],
        env={**os.environ, **s3.env()}, capture_output=True, timeout=60, cwd=str(tmp_path),
    )
    assert process.returncode != 0
    last = (process.stdout + process.stderr).decode().strip().splitlines()[-1]
    assert last.endswith(f"The S3 bucket 'no-such-bucket' does not exist at {s3.endpoint}."), last


def test_health_and_requests_follow_the_bucket(s3: SeaweedS3, tmp_path: Any) -> None:
    proxy = FlakyProxy(s3.endpoint)
    upstream = UpstreamFixture(build_tree(str(tmp_path / "proxy"), modules()))
    daemon = Daemon(None, ["--storage", f"s3://{s3.bucket}/health", "--state-dir", str(tmp_path / "state"),
                           "--s3-endpoint", proxy.endpoint, "--go-upstream", upstream.url, "--go-sumdb", "off",
                           "--workers", "2"],
                    env=s3.env())
    zip_path = f"/goproxy/{GREET}/@v/v1.0.0.zip"
    try:
        status, _, body = request(daemon.url, "/health")
        assert status == 200 and json.loads(body)["storage"] == "ok"
        status, headers, _ = request(daemon.url, zip_path)
        assert status == 200 and headers["x-cache"] == "MISS"

        proxy.down = True
        proxy.stop()
        status, _, body = request(daemon.url, "/health")
        assert status == 503 and json.loads(body)["storage"].startswith("error")
        # Cached, but the bucket does not answer: 503, one line, no traceback.
        status, headers, body = request(daemon.url, zip_path)
        assert status == 503 and body == b"storage unavailable; try again\n"
        log = daemon.log()
        assert "storage unavailable for" in log and "Traceback" not in log

        # A worker started while the bucket is away (to replace one that
        # died) serves what it can instead of leaving at once.
        workers = children(daemon.process.pid)
        os.kill(min(workers), signal.SIGKILL)
        (replacement,) = wait_for_workers(daemon, 1, other_than=workers, timeout=5)
        time.sleep(2)
        assert daemon.process.poll() is None and replacement in children(daemon.process.pid)
        for _ in range(6):
            status, _, body = request(daemon.url, "/health")
            assert status == 503 and json.loads(body)["storage"].startswith("error")
    finally:
        daemon.stop()
        proxy.stop()
        upstream.stop()


def test_s3_storage_needs_a_state_dir(tmp_path: Any) -> None:
    process = subprocess.run(
        [TWISTD, "-n", "--pidfile=", "contentcache", "--storage", "s3://bucket/prefix"],
        capture_output=True, timeout=60, cwd=str(tmp_path),
    )
    assert process.returncode != 0
    last = (process.stdout + process.stderr).decode().strip().splitlines()[-1]
    assert "give it with --state-dir" in last
