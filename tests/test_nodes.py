"""
Several nodes, one cache: C{twistd -n contentcache} daemons on one S3
bucket (SeaweedFS) and one PostgreSQL index, each with its own state
directory as if on its own machine, run as users run them.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from typing import Any, Iterator

import pytest
from attrs import define

from contentcache.protocol.goproxy.paths import escape

from .daemon import Daemon, concurrent_gets
from .gomodules import GREET, HELLO, build_payload_modules, build_tree, modules
from .npmpackages import PACKAGES, TOP, RegistryFixture, pack
from .postgres import PostgreSQL
from .seaweed import SeaweedS3
from .test_goproxy import go, request
from .test_npm import EXPECTED, check_installed, npmrc, project, run
from .upstream import UpstreamFixture


@define
class Cluster:
    """
    What the nodes share (a bucket prefix, a database) and the nodes.
    """

    s3: SeaweedS3
    prefix: str
    index: str
    root: str
    nodes: list[Daemon]

    @property
    def storage(self) -> list[str]:
        return ["--storage", f"s3://{self.s3.bucket}/{self.prefix}", "--s3-endpoint", self.s3.endpoint,
                "--index", self.index]

    def start(self, name: str, *extra: str) -> Daemon:
        node = Daemon(None, [*self.storage, "--state-dir", os.path.join(self.root, name), *extra],
                      env=self.s3.env())
        self.nodes.append(node)
        return node

    def command(self, name: str, *args: str) -> subprocess.CompletedProcess[str]:
        """
        C{contentcache ARGS...} on the shared cache, from a machine of its own.
        """
        return subprocess.run(
            [sys.executable, "-m", "contentcache.cli", *args, *self.storage,
             "--state-dir", os.path.join(self.root, name)],
            capture_output=True, text=True, timeout=120, env={**os.environ, **self.s3.env()},
        )


@pytest.fixture
def cluster(seaweed: SeaweedS3, pg_dsn: str, tmp_path: Any) -> Iterator[Cluster]:
    prefix = f"nodes-{os.urandom(4).hex()}"
    started = Cluster(seaweed, prefix, pg_dsn, str(tmp_path / "machines"), [])
    try:
        yield started
    finally:
        for node in started.nodes:
            node.stop()
        seaweed.empty_bucket(seaweed.bucket, prefix + "/")


@pytest.fixture
def upstream(tmp_path: Any) -> Iterator[UpstreamFixture]:
    fixture = UpstreamFixture(build_tree(str(tmp_path / "proxy"), modules()))
    yield fixture
    fixture.stop()


def go_flags(upstream: UpstreamFixture) -> list[str]:
    return ["--go-upstream", upstream.url, "--go-sumdb", "off"]


def cache_results(node: Daemon, prefix: str) -> list[str]:
    """
    The cache result of each request for C{prefix}... in the node's log.
    """
    return re.findall(rf"\] GET {re.escape(prefix)}\S* \d+ (\S+) ", node.log())


def test_what_one_node_fetched_builds_through_another_offline(
    cluster: Cluster, upstream: UpstreamFixture, tmp_path: Any
) -> None:
    a = cluster.start("a", *go_flags(upstream))
    b = cluster.start("b", *go_flags(upstream))
    project_dir = tmp_path / "project"
    project_dir.mkdir()
    (project_dir / "go.mod").write_text(f"module example.com/project\n\ngo 1.19\n\nrequire {HELLO} v1.1.0\n")
    (project_dir / "main.go").write_text(
        f'package main\n\nimport (\n\t"fmt"\n\n\t"{HELLO}"\n)\n\nfunc main() {{ fmt.Println(hello.Hello()) }}\n'
    )
    built = go(str(tmp_path / "a-client"), "build", "-o", str(tmp_path / "app"), ".", cwd=str(project_dir),
               GOPROXY=f"{a.url}/goproxy", GOSUMDB="off")
    assert built.returncode == 0, built.stderr
    assert subprocess.run([str(tmp_path / "app")], capture_output=True, text=True).stdout == "Hi, world\n"

    # The upstream goes; a new module cache builds through the other node.
    upstream.stop()
    os.remove(tmp_path / "app")
    built = go(str(tmp_path / "b-client"), "build", "-o", str(tmp_path / "app"), ".", cwd=str(project_dir),
               GOPROXY=f"{b.url}/goproxy", GOSUMDB="off")
    assert built.returncode == 0, built.stderr + b.log()[-3000:]
    assert subprocess.run([str(tmp_path / "app")], capture_output=True, text=True).stdout == "Hi, world\n"
    results = cache_results(b, "/goproxy/")
    assert results and set(results) == {"hit"}, results


def test_npm_ci_through_one_node_then_another(cluster: Cluster, tmp_path: Any) -> None:
    work = str(tmp_path / "packages")
    packed = [(package, pack(package, work)) for package in PACKAGES]
    registry = RegistryFixture(str(tmp_path / "registry"), packed)
    try:
        a = cluster.start("a", "--npm-upstream", registry.url)
        b = cluster.start("b", "--npm-upstream", registry.url)
        home = str(tmp_path / "home")
        npmrc(home, f"{a.url}/npm/")
        app = project(str(tmp_path / "app"), {TOP: "^1.0.0"})
        # A project's lockfile, then a CI job's npm ci through node A.
        assert run(["npm", "install", "--package-lock-only"], app, home).returncode == 0
        result = run(["npm", "ci"], app, home)
        assert result.returncode == 0, result.stderr
        check_installed(os.path.join(app, "node_modules"), packed, EXPECTED)
    finally:
        registry.stop()
    # Behind a load balancer both nodes have one address: the lockfile's
    # names node A, and B answers for it now.
    lock_path = os.path.join(app, "package-lock.json")
    with open(lock_path) as f:
        lock = f.read().replace(a.url, b.url)
    with open(lock_path, "w") as f:
        f.write(lock)
    shutil.rmtree(os.path.join(app, "node_modules"))
    shutil.rmtree(os.path.join(home, "npm-cache"))
    npmrc(home, f"{b.url}/npm/")
    result = run(["npm", "ci"], app, home)
    assert result.returncode == 0, result.stderr + b.log()[-3000:]
    check_installed(os.path.join(app, "node_modules"), packed, EXPECTED)
    results = cache_results(b, "/npm/")
    assert results and set(results) == {"hit"}, results


def test_concurrent_misses_over_two_nodes_make_one_upstream_request(
    cluster: Cluster, upstream: UpstreamFixture
) -> None:
    a = cluster.start("a", *go_flags(upstream))
    b = cluster.start("b", *go_flags(upstream))
    path = f"/{GREET}/@v/v1.2.0.zip"
    upstream.delay = 0.5  # all 50 arrive while the first is in flight
    turn = iter(range(50))
    lock = threading.Lock()

    def get() -> tuple[int, bytes]:
        with lock:
            node = (a, b)[next(turn) % 2]
        return request(node.url, "/goproxy" + path)[::2]

    results = concurrent_gets(get, 50)
    assert [status for status, _ in results] == [200] * 50
    assert len({body for _, body in results}) == 1
    assert upstream.count(path) == 1
    # Each node counts what it served; the store's figures are the shared
    # cache's, the same on both.
    served, stored = [], []
    for node in (a, b):
        text = request(node.url, "/metrics")[2].decode()
        served.append(sum(float(m) for m in re.findall(
            r'contentcache_requests_total\{[^}]*protocol="go"[^}]*\} (\S+)', text)))
        stored.append(re.search(r"^contentcache_store_bytes (\S+)$", text, re.M)[1])  # type: ignore[index]
    assert served == [25.0, 25.0]
    assert stored[0] == stored[1] and float(stored[0]) > 0


def test_two_gc_commands_at_once_while_both_nodes_serve(cluster: Cluster, tmp_path: Any) -> None:
    versions = [f"v1.0.{i}" for i in range(12)]
    module = "example.com/filler"
    zips = build_payload_modules(str(tmp_path / "fill"), module, versions, 100_000)
    fill = UpstreamFixture(str(tmp_path / "fill"))
    try:
        a = cluster.start("a", "--go-upstream", fill.url, "--go-sumdb", "off", "--compression-level", "0")
        b = cluster.start("b", "--go-upstream", fill.url, "--go-sumdb", "off", "--compression-level", "0")
        paths = {v: f"/goproxy/{escape(module)}/@v/{v}.zip" for v in versions}
        for i, version in enumerate(versions):
            assert request((a, b)[i % 2].url, paths[version])[0] == 200
        before = json.loads(cluster.command("admin", "stats", "--json").stdout)
        assert before["entries"] == {"go": 12}
        limit = 600_000

        stop = threading.Event()
        failures: list[Any] = []

        wanted = versions[-4:]  # what builds keep asking for: under the limit

        def serve() -> None:
            while not stop.is_set():
                for i, version in enumerate(wanted):
                    status, _, body = request((a, b)[i % 2].url, paths[version])
                    if status != 200 or body != open(zips[version], "rb").read():
                        failures.append((version, status))

        clients = [threading.Thread(target=serve) for _ in range(2)]
        for t in clients:
            t.start()
        try:
            gcs = [subprocess.Popen(
                [sys.executable, "-m", "contentcache.cli", "gc", "--max-size", str(limit), "--grace", "0s",
                 "--ttl", "0", *cluster.storage, "--state-dir", os.path.join(cluster.root, f"gc{i}")],
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, **cluster.s3.env()},
            ) for i in range(2)]
            outputs = [p.communicate(timeout=120) for p in gcs]
            assert [p.returncode for p in gcs] == [0, 0], outputs
        finally:
            stop.set()
            for t in clients:
                t.join(60)
        assert failures == []
        # One pass at a time: the first made room, the second found none to
        # make; each says what it removed, once.
        removed = [[line for line in out.splitlines() if line.startswith("removed go ")] for out, _ in outputs]
        assert sorted(len(r) for r in removed)[0] == 0, removed
        gone = {line.rsplit("/", 1)[1].removesuffix(".zip") for line in removed[0] + removed[1]}
        assert gone and not gone & set(wanted) and len(gone) == sum(len(r) for r in removed)
        after = json.loads(cluster.command("admin", "stats", "--json").stdout)
        assert after["stored_bytes"] <= limit
        verify = json.loads(cluster.command("admin", "verify", "--json").stdout)
        assert verify["missing"] == [] and verify["corrupt"] == []
        # Every entry left is a hit on either node, with its bytes.
        for version in sorted(set(versions) - gone):
            for node in (a, b):
                status, headers, body = request(node.url, paths[version])
                assert (status, headers["x-cache"]) == (200, "HIT") and body == open(zips[version], "rb").read()
    finally:
        fill.stop()


def test_a_purge_on_one_machine_reaches_every_node(cluster: Cluster, upstream: UpstreamFixture) -> None:
    a = cluster.start("a", *go_flags(upstream))
    b = cluster.start("b", *go_flags(upstream))
    info = f"/goproxy/{GREET}/@v/v1.2.0.info"
    before = request(a.url, info)[2]
    for _ in range(3):  # hot in the nodes' workers
        for node in (a, b):
            assert {r[1] for r in concurrent_gets(lambda: request(node.url, info)[::2], 10)} == {before}
    changed = before.replace(b"}", b',"Origin":{"VCS":"git"}}')
    with open(os.path.join(upstream.root, escape(GREET), "@v", "v1.2.0.info"), "wb") as f:
        f.write(changed)
    purge = cluster.command("admin", "purge", "go", GREET)
    assert purge.returncode == 0, purge.stderr
    time.sleep(2)
    for node in (a, b):
        for _ in range(10):
            assert request(node.url, info)[2] == changed


def test_the_index_down_and_back(cluster: Cluster, upstream: UpstreamFixture, postgresql: PostgreSQL) -> None:
    # One worker, so that what is hot is hot where every request lands.
    a = cluster.start("a", *go_flags(upstream), "--workers", "1")
    hot = f"/goproxy/{GREET}/@v/v1.2.0.info"
    assert request(a.url, hot)[0] == 200
    time.sleep(1.5)  # the node has seen its own write in the log of changes
    assert request(a.url, hot)[1]["x-cache"] == "HIT"  # and holds it in memory now
    postgresql.stop()
    try:
        for _ in range(5):
            status, headers, body = request(a.url, hot)
            assert (status, headers.get("x-cache")) == (200, "HIT"), (status, body, a.log()[-2000:])
        status, _, body = request(a.url, f"/goproxy/{GREET}/@v/v1.0.0.info")
        assert (status, body) == (503, b"index unavailable; try again\n")
        status, _, body = request(a.url, "/health")
        health = json.loads(body)
        assert status == 503 and health["storage"] == "ok" and "PostgreSQL" in health["index"], health
    finally:
        postgresql.start()
    deadline = time.monotonic() + 20
    while request(a.url, "/health")[0] != 200:
        assert time.monotonic() < deadline, a.log()[-3000:]
        time.sleep(0.25)
    status, headers, _ = request(a.url, f"/goproxy/{GREET}/@v/v1.0.0.info")
    assert (status, headers["x-cache"]) == (200, "MISS")
    assert "Traceback" not in a.log()
