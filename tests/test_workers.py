"""
The daemon as several worker processes on one port (C{--workers 2}), run
as users run it: one cache whichever worker a request lands on.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from typing import Any, Iterator

import pytest
from prometheus_client.mmap_dict import MmapedDict

from contentcache.protocol.goproxy.paths import escape

from .daemon import Daemon, concurrent_gets
from .gomodules import GREET
from .test_goproxy import request, tree, upstream  # noqa: F401  # the same fixtures
from .upstream import UpstreamFixture

ZIP = f"/{GREET}/@v/v1.2.0.zip"
INFO = f"/{GREET}/@v/v1.2.0.info"


@pytest.fixture
def daemon(tmp_path: Any, upstream: UpstreamFixture) -> Iterator[Daemon]:
    started = Daemon(str(tmp_path / "storage"), ["--workers", "2", "--go-upstream", upstream.url,
                                                 "--go-sumdb", "off"])
    started.storage = str(tmp_path / "storage")  # type: ignore[attr-defined]
    try:
        wait_for_workers(started, 2)
        yield started
    finally:
        started.stop()


def children(pid: int) -> set[int]:
    """
    The processes whose parent is C{pid}.
    """
    found = set()
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid and fields[0] != "Z":
                found.add(int(name))
    return found


def wait_for_workers(daemon: Daemon, count: int, other_than: set[int] = set(), timeout: float = 10) -> set[int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        workers = children(daemon.process.pid) - other_than
        if len(workers) >= count and (other_than or re.search(rb"%d workers serving" % count, daemon.output)):
            return workers
        time.sleep(0.02)
    raise AssertionError(f"no {count} workers; output:\n{daemon.log()}")


def per_worker(storage: str, kind: str, metric: str, label: str = "") -> dict[int, float]:
    """
    Each worker's own figure for C{metric} (summed over label sets that
    contain C{label}), from prometheus-client's files under run/.
    """
    figures: dict[int, float] = {}
    files = [(d, n) for d, _, names in os.walk(os.path.join(storage, "run", "metrics")) for n in names]
    for directory, name in files:
        m = re.fullmatch(rf"{kind}_(\d+)\.db", name)
        if m is None:
            continue
        for key, value, *_ in MmapedDict.read_all_values_from_file(os.path.join(directory, name)):
            sample, labels = json.loads(key)[1], json.loads(key)[2]
            if sample == metric and label in json.dumps(labels):
                figures[int(m[1])] = figures.get(int(m[1]), 0) + value
    return figures


def test_concurrent_misses_on_both_workers_make_one_upstream_request(
    daemon: Daemon, upstream: UpstreamFixture
) -> None:
    upstream.delay = 0.5  # all 50 arrive while the first is in flight
    results = concurrent_gets(lambda: request(daemon.url, "/goproxy" + ZIP)[::2], 50)
    assert [status for status, _ in results] == [200] * 50
    assert len({body for _, body in results}) == 1
    assert upstream.count(ZIP) == 1
    served = per_worker(daemon.storage, "counter", "contentcache_requests_total", '"go"')  # type: ignore[attr-defined]
    assert len(served) == 2 and all(served.values()), served
    assert sum(served.values()) == 50


def test_metrics_count_each_request_once(daemon: Daemon, upstream: UpstreamFixture) -> None:
    assert request(daemon.url, "/goproxy" + INFO)[1]["x-cache"] == "MISS"
    for _ in range(200):
        status, headers, _ = request(daemon.url, "/goproxy" + INFO)
        assert (status, headers["x-cache"]) == (200, "HIT")
    hits = per_worker(daemon.storage, "counter", "contentcache_requests_total", '"hit"')  # type: ignore[attr-defined]
    assert len(hits) == 2, hits  # both answered some
    text = request(daemon.url, "/metrics")[2].decode()
    counted = {m[1]: float(m[2]) for m in re.finditer(
        r'contentcache_requests_total\{cache_result="(\w+)",protocol="go",status_class="2xx"\} (\S+)', text)}
    # (Every cache result is in /metrics from the start, at 0 until it happens.)
    assert {result: n for result, n in counted.items() if n} == {"hit": 200.0, "miss": 1.0}
    assert upstream.count(INFO) == 1


def test_purge_reaches_every_workers_memory(daemon: Daemon, upstream: UpstreamFixture, tree: str) -> None:
    _, _, before = request(daemon.url, "/goproxy" + INFO)
    for _ in range(10):  # until it is hot in both workers
        assert {r[1] for r in concurrent_gets(lambda: request(daemon.url, "/goproxy" + INFO)[::2], 20)} == {before}
        time.sleep(1.1)  # the gauges are written once a second
        held = per_worker(daemon.storage, "gauge_livesum", "contentcache_memory_cache_entries")  # type: ignore[attr-defined]
        if len(held) == 2 and all(held.values()):
            break
    assert len(held) == 2 and all(held.values()), held

    # Upstream now says otherwise (as if the version had been re-tagged):
    # only a worker that fetches again can know.
    changed = before.replace(b"}", b',"Origin":{"VCS":"git"}}')
    with open(os.path.join(tree, escape(GREET), "@v", "v1.2.0.info"), "wb") as f:
        f.write(changed)
    purge = subprocess.run(
        [sys.executable, "-m", "contentcache.cli", "purge", "--storage", daemon.storage,  # type: ignore[attr-defined]
         "go", GREET], capture_output=True, text=True, timeout=60,
    )
    assert purge.returncode == 0, purge.stderr
    time.sleep(2)
    outcomes = []
    for _ in range(20):
        status, headers, body = request(daemon.url, "/goproxy" + INFO)
        assert (status, body) == (200, changed)
        outcomes.append(headers["x-cache"])
    assert outcomes[0] == "MISS" and set(outcomes[1:]) == {"HIT"}
    assert upstream.count(INFO) == 2


def test_a_killed_worker_is_replaced(daemon: Daemon) -> None:
    assert request(daemon.url, "/goproxy" + INFO)[0] == 200
    workers = children(daemon.process.pid)
    victim = min(workers)
    os.kill(victim, signal.SIGKILL)
    killed = time.monotonic()
    replaced = wait_for_workers(daemon, 1, other_than=workers, timeout=5)
    assert time.monotonic() - killed < 1.5
    assert children(daemon.process.pid) == (workers - {victim}) | replaced
    daemon.wait_for(re.compile(rb"worker \d \(pid %d\) was killed by SIGKILL; starting another" % victim))
    time.sleep(0.5)  # the new worker listens
    results = concurrent_gets(lambda: request(daemon.url, "/goproxy" + INFO)[::2], 50)
    assert [status for status, _ in results] == [200] * 50


def test_sigterm_stops_every_worker(daemon: Daemon) -> None:
    workers = children(daemon.process.pid)
    assert len(workers) == 2
    started = time.monotonic()
    assert daemon.terminate(timeout=5) == 0
    assert time.monotonic() - started < 5
    assert not any(os.path.exists(f"/proc/{pid}") for pid in workers)


def test_workers_leave_when_the_supervisor_is_killed(daemon: Daemon) -> None:
    workers = children(daemon.process.pid)
    daemon.process.kill()
    daemon.process.wait()
    deadline = time.monotonic() + 5
    while any(os.path.exists(f"/proc/{pid}") for pid in workers) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(os.path.exists(f"/proc/{pid}") for pid in workers)


def test_log_lines_of_both_workers_arrive_whole(daemon: Daemon) -> None:
    paths = [f"/goproxy/{GREET}/@v/v9.{i}.{'x' * 300}.info" for i in range(300)]
    concurrent_gets(lambda: request(daemon.url, paths.pop())[::2], 300)
    daemon.terminate()
    lines = [line for line in daemon.output.decode().splitlines() if "/goproxy/" in line]
    whole = re.compile(r"\S+ \[contentcache\.access#info\] GET /goproxy/\S+ 404 - \d+ [\d.]+ [\d.]+")
    assert len(lines) == 300 and all(whole.fullmatch(line) for line in lines), lines[:3]
