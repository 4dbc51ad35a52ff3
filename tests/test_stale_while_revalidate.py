"""
Stale-while-revalidate through the real daemon with two workers: past the
metadata TTL, a packument and a version list are answered from the cache at
once while an upstream that takes 3 seconds revalidates them, once for the
whole daemon; then the next requests get what upstream says now.
"""

from __future__ import annotations

import json
import threading
import time
from typing import Any, Iterator

import pytest

from .daemon import Daemon
from .gomodules import GREET, build_tree, modules
from .npmpackages import LEAF, Package, RegistryFixture, pack
from .test_npm import request
from .test_workers import per_worker, wait_for_workers
from .upstream import UpstreamFixture

#: Long enough that a copy revalidated in the background is still fresh
#: when the workers have all seen it (they look once a second).
TTL = 3.0
SLOW = 3.0
FAST_ENOUGH = 0.05
#: What npm asks for when it installs.
ABBREVIATED = {"Accept": "application/vnd.npm.install-v1+json; q=1.0, application/json; q=0.8, */*"}
PACKUMENT = f"/npm/{LEAF}"
LIST = f"/goproxy/{GREET}/@v/list"
NEWER = "1.2.0"


@pytest.fixture(scope="module")
def packed(tmp_path_factory: pytest.TempPathFactory) -> list[tuple[Any, dict[str, Any]]]:
    work = str(tmp_path_factory.mktemp("packages"))
    return [(package, pack(package, work)) for package in
            (Package(LEAF, "1.0.0", {}), Package(LEAF, "1.1.0", {}), Package(LEAF, NEWER, {}))]


@pytest.fixture
def upstreams(tmp_path: Any, packed: list[tuple[Any, dict[str, Any]]]) -> Iterator[tuple[RegistryFixture, UpstreamFixture]]:
    registry = RegistryFixture(str(tmp_path / "registry"), packed)
    proxy = UpstreamFixture(build_tree(str(tmp_path / "proxy"), modules()))
    try:
        yield registry, proxy
    finally:
        registry.stop()
        proxy.stop()


def timed(url: str, path: str, headers: dict[str, str] | None = None) -> tuple[float, str, str, bytes]:
    """
    One request on a connection of its own: the seconds it took (connecting
    included), X-Cache, Warning and the body.
    """
    started = time.monotonic()
    status, got, body = request(url, path, headers=headers)
    took = time.monotonic() - started
    assert status == 200, (path, status, body)
    return took, got["x-cache"], got.get("warning", ""), body


def at_once(url: str, count: int) -> list[tuple[str, float, str, str, bytes]]:
    """
    C{count} requests for the packument and as many for the list, all let go
    together, each on its own thread and connection.
    """
    wanted = [(PACKUMENT, ABBREVIATED)] * count + [(LIST, None)] * count
    gate = threading.Barrier(len(wanted))
    results: list[tuple[str, float, str, str, bytes]] = []
    lock = threading.Lock()

    def one(path: str, headers: dict[str, str] | None) -> None:
        gate.wait()
        result = (path, *timed(url, path, headers))
        with lock:
            results.append(result)

    threads = [threading.Thread(target=one, args=w) for w in wanted]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(results) == len(wanted)
    return results


def versions(body: bytes) -> list[str]:
    return sorted(json.loads(body)["versions"])


def test_stale_answers_at_once_and_one_revalidation_for_both_workers(
    tmp_path: Any, upstreams: tuple[RegistryFixture, UpstreamFixture]
) -> None:
    registry, proxy = upstreams
    # The newest version is not published yet.
    document = registry.packuments[LEAF]
    newest = document["versions"].pop(NEWER)
    published = document["time"].pop(NEWER)
    document["dist-tags"] = {"latest": "1.1.0"}
    registry.publish(LEAF)
    upstream_list = f"/{GREET}/@v/list"
    storage = str(tmp_path / "storage")
    daemon = Daemon(storage, ["--workers", "2", "--npm-upstream", registry.url, "--go-upstream", proxy.url,
                              "--go-sumdb", "off", "--npm-metadata-ttl", f"{TTL:g}s",
                              "--go-metadata-ttl", f"{TTL:g}s"])
    try:
        wait_for_workers(daemon, 2)
        _, outcome, _, body = timed(daemon.url, PACKUMENT, ABBREVIATED)
        assert outcome == "MISS" and versions(body) == ["1.0.0", "1.1.0"]
        _, outcome, _, old_list = timed(daemon.url, LIST)
        assert outcome == "MISS" and old_list == b"v1.0.0\nv1.2.0\n"
        assert (registry.count(f"/{LEAF}"), proxy.count(upstream_list)) == (1, 1)

        # Upstream changes, and from now on takes 3 seconds to answer.
        document["versions"][NEWER] = newest
        document["time"][NEWER] = published
        document["dist-tags"] = {"latest": NEWER}
        registry.publish(LEAF)
        proxy.override[upstream_list] = (200, b"v1.0.0\nv1.2.0\nv1.3.0\n")
        registry.delay = proxy.delay = SLOW
        time.sleep(TTL + 0.2)  # past the TTL

        started = time.monotonic()
        stale = at_once(daemon.url, 4)
        while time.monotonic() - started < SLOW - 1:  # more while the revalidations run
            stale += at_once(daemon.url, 2)
            time.sleep(0.1)
        latencies = sorted(took for _, took, _, _, _ in stale)
        print(f"\n{len(stale)} stale answers: median {latencies[len(latencies) // 2] * 1000:.1f} ms, "
              f"slowest {latencies[-1] * 1000:.1f} ms")
        for path, took, outcome, warning, body in stale:
            assert (outcome, warning) == ("STALE", '110 - "Response is Stale"'), path
            assert took < FAST_ENOUGH, f"{path} took {took * 1000:.1f} ms"
            if path == LIST:
                assert body == old_list
            else:
                assert versions(body) == ["1.0.0", "1.1.0"]
        answered = per_worker(storage, "counter", "contentcache_requests_total", '"revalidating"')
        assert len(answered) == 2 and all(answered.values()), answered  # both workers answered some

        # Once upstream has answered (and each worker has read the index's
        # changes), the new content, and no further revalidation.
        time.sleep(SLOW + 1.3 - (time.monotonic() - started))
        for _ in range(10):
            _, outcome, _, body = timed(daemon.url, PACKUMENT, ABBREVIATED)
            assert outcome in ("HIT", "MISS") and versions(body) == ["1.0.0", "1.1.0", NEWER]
            assert json.loads(body)["dist-tags"]["latest"] == NEWER
            _, outcome, _, body = timed(daemon.url, LIST)
            assert outcome == "HIT" and body == b"v1.0.0\nv1.2.0\nv1.3.0\n"
        assert registry.count(f"/{LEAF}") == 2, "one revalidation of the packument"
        assert proxy.count(upstream_list) == 2, "one revalidation of the list"

        # Stopped while a revalidation waits for upstream: a clean exit.
        time.sleep(TTL + 0.2)
        assert timed(daemon.url, LIST)[1] == "STALE"
        deadline = time.monotonic() + 2
        while proxy.count(upstream_list) < 3 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert proxy.count(upstream_list) == 3
        assert daemon.terminate(timeout=5) == 0
        log = daemon.log()
        for sign in ("Traceback", "Unhandled", "failed"):
            assert sign not in log, log[-3000:]
    finally:
        daemon.stop()
