"""
GET /metrics after a miss, a hit, a stale answer and an integrity failure:
each counter moves by what happened, no more.
"""

from __future__ import annotations

import os
import time
import zipfile
from typing import Any, Iterator

import pytest
from prometheus_client.parser import text_string_to_metric_families

from contentcache.protocol.goproxy.paths import escape

from .daemon import Daemon
from .gomodules import GREET, build_tree, modules
from .test_goproxy import request
from .upstream import UpstreamFixture


def scrape(daemon: Daemon) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    status, headers, body = request(daemon.url, "/metrics")
    assert status == 200
    assert headers["content-type"].startswith("text/plain; version=")
    samples = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def delta(before: dict[Any, float], after: dict[Any, float], name: str, **labels: str) -> float:
    key = (name, tuple(sorted(labels.items())))
    return after.get(key, 0.0) - before.get(key, 0.0)


@pytest.fixture
def setup(tmp_path: Any) -> Iterator[tuple[Daemon, UpstreamFixture]]:
    tree = build_tree(str(tmp_path / "proxy"), modules())
    # One zip that breaks the module zip rules.
    bad = os.path.join(tree, *escape(GREET).split("/"), "@v", "v1.2.0.zip")
    with zipfile.ZipFile(bad, "w") as z:
        z.writestr("elsewhere/go.mod", "module x\n")
    upstream = UpstreamFixture(tree)
    # Every list revalidated before it is answered (never in the background).
    daemon = Daemon(str(tmp_path / "storage"), ["--go-upstream", upstream.url, "--go-sumdb", "off",
                                                "--go-metadata-ttl", "0s", "--stale-while-revalidate", "0"])
    yield daemon, upstream
    daemon.stop()
    upstream.stop()


def test_counters_move_by_what_happened(setup: tuple[Daemon, UpstreamFixture]) -> None:
    daemon, upstream = setup
    before = scrape(daemon)
    go2xx = {"protocol": "go", "status_class": "2xx"}

    assert request(daemon.url, f"/goproxy/{GREET}/@v/v1.0.0.info")[1]["x-cache"] == "MISS"
    assert request(daemon.url, f"/goproxy/{GREET}/@v/v1.0.0.info")[1]["x-cache"] == "HIT"
    assert request(daemon.url, f"/goproxy/{GREET}/@v/list")[1]["x-cache"] == "MISS"
    upstream.override[f"/{GREET}/@v/list"] = (500, b"down\n")
    assert request(daemon.url, f"/goproxy/{GREET}/@v/list")[1]["x-cache"] == "STALE"
    assert request(daemon.url, f"/goproxy/{GREET}/@v/v1.2.0.zip")[0] == 502
    assert request(daemon.url, "/goproxy/example.com/Bad/@v/list")[0] == 404

    after = scrape(daemon)
    total = "contentcache_requests_total"
    assert delta(before, after, total, cache_result="miss", **go2xx) == 2
    assert delta(before, after, total, cache_result="hit", **go2xx) == 1
    assert delta(before, after, total, cache_result="stale", **go2xx) == 1
    assert delta(before, after, total, cache_result="error", protocol="go", status_class="5xx") == 1
    assert delta(before, after, total, cache_result="error", protocol="go", status_class="4xx") == 1
    assert delta(before, after, "contentcache_integrity_failures_total", protocol="go") == 1
    # The miss, the list twice (the second failing), the bad zip.
    assert delta(before, after, "contentcache_upstream_requests_total", protocol="go") == 4
    # The list's 500 is upstream's failure (a 404 would be an answer).
    assert delta(before, after, "contentcache_upstream_errors_total", protocol="go") == 1
    assert delta(before, after, "contentcache_request_duration_seconds_count", protocol="go") == 6
    assert delta(before, after, "contentcache_response_bytes_total", protocol="go", cache_result="hit") > 0
    # Store gauges (refreshed at most every 30 s) and the pool's queue.
    for gauge in ("contentcache_store_blobs", "contentcache_store_bytes",
                  "contentcache_store_logical_bytes", "contentcache_disk_pool_queue_depth"):
        assert (gauge, ()) in after

    upstream.stop()
    request(daemon.url, f"/goproxy/{GREET}/@v/v1.1.0.info")  # nothing cached, upstream gone
    final = scrape(daemon)
    assert delta(after, final, "contentcache_upstream_errors_total", protocol="go") == 1


def test_a_revalidation_in_the_background_is_counted_upstream(tmp_path: Any) -> None:
    upstream = UpstreamFixture(build_tree(str(tmp_path / "proxy"), modules()))
    daemon = Daemon(str(tmp_path / "storage"), ["--go-upstream", upstream.url, "--go-sumdb", "off",
                                                "--go-metadata-ttl", "1s", "--workers", "1"])
    try:
        path = f"/goproxy/{GREET}/@v/list"
        assert request(daemon.url, path)[1]["x-cache"] == "MISS"
        time.sleep(1.2)
        before = scrape(daemon)
        upstream.override[f"/{GREET}/@v/list"] = (200, b"v1.0.0\nv1.2.0\nv1.3.0\n")
        status, headers, body = request(daemon.url, path)
        assert (status, headers["x-cache"], body) == (200, "STALE", b"v1.0.0\nv1.2.0\n")
        deadline = time.monotonic() + 10
        while request(daemon.url, path)[2] != b"v1.0.0\nv1.2.0\nv1.3.0\n":
            assert time.monotonic() < deadline, "the revalidated list never came"
            time.sleep(0.1)
        after = scrape(daemon)
        assert upstream.count(f"/{GREET}/@v/list") == 2
        assert delta(before, after, "contentcache_upstream_requests_total", protocol="go") == 1
        assert delta(before, after, "contentcache_upstream_fetch_duration_seconds_count", protocol="go") == 1
        assert delta(before, after, "contentcache_upstream_errors_total", protocol="go") == 0
        # Counted apart from stale-if-error's answers (upstream failed).
        assert delta(before, after, "contentcache_requests_total", cache_result="revalidating", protocol="go",
                     status_class="2xx") >= 1
        assert delta(before, after, "contentcache_requests_total", cache_result="stale", protocol="go",
                     status_class="2xx") == 0
    finally:
        daemon.stop()
        upstream.stop()
