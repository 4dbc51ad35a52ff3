"""
The status page, /-/stats, the package views and the search, through the
root resource (StubTreq): figures computed as the issue defines them,
every worker's activity merged, names escaped, only cached versions
listed, and the token the pages need with --ui-access token. The real
browser's view is in test_ui_browser.py.
"""

from __future__ import annotations

import base64
import json
import os
import struct
import time
from typing import Any

import pytest
from treq.testing import StubTreq
from twisted.internet.task import Clock

from contentcache import activity as activity_module
from contentcache.activity import ERRORS_KEPT, NAMES_PER_MINUTE, Activity, merge
from contentcache.auth import Guard, Tokens, digest
from contentcache.index import SQLiteIndex
from contentcache.pool import SynchronousRunner
from contentcache.server import Root
from contentcache.store import Store
from contentcache.tap import Options
from contentcache.ui import Dashboard, Settings
from contentcache.ui.figures import compute, history_points
from contentcache.ui.resource import resources

from .conftest import resolve

XSS = "<script>alert(1)</script>"
NOW = 1_800_000_000.0


def get(client: StubTreq, path: str, headers: dict[str, str] | None = None) -> tuple[Any, bytes]:
    response = resolve(client.get("http://cache.test" + path, headers=headers))
    body = resolve(response.content())
    client.flush()
    return response, body


def sample(name: str, value: float, **labels: str) -> tuple[tuple[str, tuple[tuple[str, str], ...]], float]:
    return (name, tuple(sorted(labels.items()))), value


def requests(protocol: str, result: str, count: float, status: str = "2xx") -> Any:
    return sample("contentcache_requests_total", count, protocol=protocol, status_class=status, cache_result=result)


SETTINGS = Settings(version="9.9", workers=2, storage="/srv/cache", index="SQLite /srv/cache/index.sqlite",
                    max_size=1000, purge_options=("--storage", "/srv/cache"))


# The figures.


def test_hit_ratio_counts_stale_and_revalidated_as_hits_and_errors_as_neither() -> None:
    # Revalidated answers are counted with the label hit already; stale
    # ones are upstream's failures (stale-if-error) and those revalidated
    # in the background (stale-while-revalidate).
    values = dict([
        requests("go", "hit", 4), requests("go", "revalidating", 2), requests("go", "stale", 2),
        requests("go", "miss", 2),
        requests("go", "error", 50, "5xx"), requests("npm", "miss", 3), requests("npm", "bypass", 7),
    ])
    figures = compute(values, merge([], NOW), {}, None, False, SETTINGS, NOW)
    assert figures["requests"]["go"]["hit_ratio"] == 0.8
    assert figures["requests"]["npm"]["hit_ratio"] == 0.0
    assert figures["requests"]["all"]["hit_ratio"] == 8 / 13
    assert figures["requests"]["all"]["total"] == 70


def test_bandwidth_saved_is_what_the_store_served_less_what_was_fetched() -> None:
    values = dict([
        sample("contentcache_response_bytes_total", 900, protocol="go", cache_result="hit"),
        sample("contentcache_response_bytes_total", 100, protocol="go", cache_result="miss"),
        sample("contentcache_response_bytes_total", 5000, protocol="other", cache_result="bypass"),
        sample("contentcache_upstream_bytes_total", 100, protocol="go"),
        sample("contentcache_upstream_bytes_total", 20, protocol="gosumdb"),
    ])
    bandwidth = compute(values, merge([], NOW), {}, None, False, SETTINGS, NOW)["bandwidth"]
    assert bandwidth["all"]["served_from_store_bytes"] == 1000
    assert bandwidth["all"]["fetched_upstream_bytes"] == 120
    assert bandwidth["all"]["saved_bytes"] == 880
    assert bandwidth["all"]["saved_ratio"] == 0.88
    assert bandwidth["go"]["fetched_upstream_bytes"] == 120  # the checksum database's is Go's
    assert bandwidth["npm"]["saved_ratio"] is None


def test_history_is_per_interval_and_ends_now() -> None:
    history = [
        {"t": NOW - 120, "requests": {"go": [0, 0, 0]}},
        {"t": NOW - 60, "requests": {"go": [30, 30, 60]}},
    ]
    points = history_points(history, {"requests": {"go": [90, 30, 150]}}, NOW)
    assert [p["t"] for p in points] == [NOW - 60, NOW]
    assert [p["rps"]["go"] for p in points] == [1.0, 1.5]
    assert [p["hit_ratio"]["go"] for p in points] == [0.5, 1.0]


# Every worker's activity.


def test_top_names_are_bounded_and_keep_the_most_requested() -> None:
    recorder = Activity(clock=lambda: NOW)
    for _ in range(50):
        recorder.requested("npm", "popular")
    for i in range(NAMES_PER_MINUTE * 3):
        recorder.requested("npm", f"once-{i}")
    assert len(recorder.names) == NAMES_PER_MINUTE
    top = merge([recorder.snapshot()], NOW)["top"]
    assert top[0] == {"protocol": "npm", "name": "popular", "requests": 50}


def test_merge_is_the_whole_daemons() -> None:
    one = Activity(clock=lambda: NOW - 30, started=NOW - 500)
    two = Activity(clock=lambda: NOW - 10, started=NOW - 400)
    for recorder in (one, two):
        recorder.requested("go", "example.com/m")
        key = recorder.upstream("go", "https://user:secret@proxy.example/")
        recorder.fetched(key, 0.25)
    one.fetched(("go", "https://proxy.example"), 0.5, "upstream refused the connection\nand more")
    for i in range(ERRORS_KEPT):
        one.error("npm", "GET", f"/npm/old-{i}", 404, "invalid package name")
    two.error("go", "GET", "/goproxy/x/@v/list", 502, "upstream failure: upstream answered 500")
    two.sampled({"requests": {}})
    merged = merge([one.snapshot(), two.snapshot()], NOW)
    assert merged["started"] == NOW - 500
    assert merged["top"] == [{"protocol": "go", "name": "example.com/m", "requests": 2}]
    [upstream] = merged["upstreams"]
    assert upstream["url"] == "https://proxy.example"  # never the password
    assert (upstream["requests"], upstream["errors"]) == (3, 1)
    assert upstream["last_success"] == NOW - 10
    assert (upstream["last_failure"], upstream["reason"]) == (NOW - 30, "upstream refused the connection")
    assert upstream["median_seconds"] == 0.25
    assert len(merged["errors"]) == ERRORS_KEPT
    assert merged["errors"][0]["status"] == 502  # the latest first
    assert len(merged["history"]) == 1


def test_a_replacement_worker_goes_on_from_the_last_ones_file(tmp_path: Any) -> None:
    first = Activity(clock=lambda: NOW, started=NOW - 100)
    first.error("go", "GET", "/goproxy/x", 502, "upstream failure")
    directory = str(tmp_path)
    activity_module._write(directory, 3, json.dumps(first.snapshot()).encode())
    second = Activity(clock=lambda: NOW + 5)
    found = activity_module.read_snapshots_of(directory, 3)
    assert found is not None
    second.restore(found)
    assert second.started == NOW - 100
    assert [e["path"] for e in second.errors] == ["/goproxy/x"]
    assert activity_module.read_snapshots(directory, skip=3) == []
    assert len(activity_module.read_snapshots(directory)) == 1


# The pages, served.


@pytest.fixture
def recorder(clock: Clock) -> Activity:
    clock.advance(time.time())
    return Activity(clock=clock.seconds)


@pytest.fixture
def dashboard(store: Store, index: SQLiteIndex, clock: Clock, recorder: Activity) -> Dashboard:
    return Dashboard(index, store, SynchronousRunner(), clock, SETTINGS, activity=recorder)


@pytest.fixture
def client(store: Store, index: SQLiteIndex, dashboard: Dashboard) -> StubTreq:
    return StubTreq(Root(store, index, ui=resources(dashboard)))


def put(store: Store, index: SQLiteIndex, protocol: str, key: str, body: bytes, **attrs: Any) -> None:
    blob = resolve(store.put([body])).blob
    resolve(index.put(protocol, key, blob, attrs))


def test_status_page_is_html_with_a_strict_policy(
    client: StubTreq, store: Store, index: SQLiteIndex, dashboard: Dashboard, recorder: Activity, clock: Clock
) -> None:
    put(store, index, "npm", "tarball:left-pad/left-pad-1.3.0.tgz", b"x" * 300, version="1.3.0")
    recorder.sampled(resolve(dashboard.sample()))  # as the service does at start
    clock.advance(30)
    response, body = get(client, "/")
    assert response.code == 200
    assert response.headers.getRawHeaders("content-type") == ["text/html; charset=utf-8"]
    policy = response.headers.getRawHeaders("content-security-policy")[0]
    assert "script-src 'self'" in policy and "unsafe-inline" not in policy
    assert response.headers.getRawHeaders("cache-control") == ["no-store"]
    page = body.decode()
    assert "<script>" not in page.replace('<script src="/-/ui/refresh.js" defer></script>', "")
    assert 'data-stored="300"' in page and 'data-max="1000"' in page
    assert 'id="chart-rps"' in page and 'id="chart-hit-ratio"' in page
    assert "<circle" in page  # a first point: the sample at start, ending now


def test_every_string_on_the_status_page_is_escaped(client: StubTreq, recorder: Activity) -> None:
    recorder.error("npm", "GET", f"/npm/{XSS}", 404, f"invalid package name {XSS}")
    recorder.requested("npm", XSS)
    key = recorder.upstream("npm", "http://upstream.test/")
    recorder.fetched(key, 0.1, 'upstream failed ("><img src=x onerror=alert(1)>)')
    page = get(client, "/")[1].decode()
    assert XSS not in page and "<img" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "&quot;&gt;&lt;img src=x onerror=alert(1)&gt;" in page


def test_stats_is_the_same_figures_as_json(client: StubTreq, store: Store, index: SQLiteIndex) -> None:
    put(store, index, "go", "example.com/m/@v/v1.0.0.info", b'{"Version":"v1.0.0"}')
    response, body = get(client, "/-/stats")
    assert response.headers.getRawHeaders("content-type") == ["application/json"]
    figures = json.loads(body)
    assert figures["store"]["entries"] == {"go": 1}
    assert figures["store"]["blobs"] == 1
    assert figures["version"] == "9.9" and figures["workers"] == 2
    for part in ("requests", "bandwidth", "history", "upstreams", "expiry", "scrub", "top", "errors"):
        assert part in figures


def test_npm_view_lists_exactly_the_cached_versions(client: StubTreq, store: Store, index: SQLiteIndex) -> None:
    for version in ("1.0.0", "1.10.0", "1.2.0-beta.1", "1.2.0"):
        put(store, index, "npm", f"tarball:@scope/pkg/pkg-{version}.tgz", version.encode() * 10,
            version=version, integrity=f"sha512-{version}")
    put(store, index, "npm", "tarball:@scope/pkg-other/pkg-other-9.9.9.tgz", b"other", version="9.9.9")
    put(store, index, "npm", "packument:full:@scope/pkg", b'{"versions": {"7.0.0": {}}}')
    for path in ("/-/ui/npm/@scope/pkg", "/-/ui/npm/@scope%2fpkg"):
        response, body = get(client, path)
        assert response.code == 200
        page = body.decode()
        listed = [chunk.split('"', 1)[0] for chunk in page.split('data-version="')[1:]]
        assert listed == ["1.0.0", "1.2.0-beta.1", "1.2.0", "1.10.0"]
        assert "7.0.0" not in page and "9.9.9" not in page
        assert "sha512-1.2.0" in page
        assert "contentcache purge --storage /srv/cache npm @scope/pkg" in page
        assert "packument (full)" in page


def test_go_view_groups_files_by_version(client: StubTreq, store: Store, index: SQLiteIndex) -> None:
    base = "example.com/!upper/@v/"
    put(store, index, "go", base + "v1.0.0.info", b"{}")
    put(store, index, "go", base + "v1.0.0.zip", b"zip", h1="h1:zip=", verified=True)
    put(store, index, "go", base + "v1.0.0.mod", b"module", h1="h1:mod=", verified=True)
    put(store, index, "go", base + "v2.0.0+incompatible.mod", b"module 2", h1="h1:two=", verified=False)
    put(store, index, "go", base + "master.info", b"{}")
    put(store, index, "go", base + "list", b"v1.0.0\n")
    for path in ("/-/ui/go/example.com/Upper", "/-/ui/go/example.com/!upper"):
        page = get(client, path)[1].decode()
        listed = [chunk.split('"', 1)[0] for chunk in page.split('data-version="')[1:]]
        assert listed == ["v1.0.0", "v2.0.0+incompatible"]
        assert ".info .mod .zip" in page and "h1:zip=" in page and "checksum database" in page
        assert "query master.info" in page and "@v/list" in page
        assert "contentcache purge --storage /srv/cache go example.com/Upper" in page


def test_a_name_that_is_none_is_a_404_page_escaped(client: StubTreq) -> None:
    for path in (f"/-/ui/npm/{XSS}", "/-/ui/npm/%3Cscript%3Ealert(1)%3C%2Fscript%3E", f"/-/ui/go/{XSS}"):
        response, body = get(client, path)
        assert response.code == 404
        page = body.decode()
        assert XSS not in page and "&lt;script&gt;" in page


def test_search_finds_cached_names_by_prefix(client: StubTreq, store: Store, index: SQLiteIndex) -> None:
    put(store, index, "npm", "packument:abbr:cc-one", b"{}")
    put(store, index, "npm", "tarball:cc-two/cc-two-1.0.0.tgz", b"t", version="1.0.0")
    put(store, index, "npm", "tarball:other/other-1.0.0.tgz", b"o", version="1.0.0")
    put(store, index, "go", "cc.example/Mod/@v/v1.0.0.info".replace("M", "!m"), b"{}")
    page = get(client, "/-/ui/search?q=cc")[1].decode()
    assert 'href="/-/ui/npm/cc-one"' in page and 'href="/-/ui/npm/cc-two"' in page
    assert 'href="/-/ui/go/cc.example/Mod"' in page
    assert "other" not in page.split('id="results"')[1]
    page = get(client, "/-/ui/search?q=" + XSS.replace("<", "%3C").replace(">", "%3E"))[1].decode()
    assert XSS not in page and 'value="&lt;script&gt;alert(1)&lt;/script&gt;"' in page
    assert 'id="no-results"' in page


def test_assets(client: StubTreq) -> None:
    response, icon = get(client, "/favicon.ico")
    assert response.code == 200
    assert response.headers.getRawHeaders("content-type") == ["image/x-icon"]
    reserved, kind, count = struct.unpack("<HHH", icon[:6])
    assert (reserved, kind, count) == (0, 1, 1)
    width, height, _, _, _, _, size, offset = struct.unpack("<BBBBHHII", icon[6:22])
    assert (width, height) == (32, 32) and icon[offset:offset + 8] == b"\x89PNG\r\n\x1a\n"
    assert size == len(icon) - offset
    for path, kind in (("/-/ui/style.css", "text/css"), ("/-/ui/refresh.js", "text/javascript")):
        response, body = get(client, path)
        assert response.headers.getRawHeaders("content-type")[0].startswith(kind) and body
    assert get(client, "/-/ui/nothing")[0].code == 404
    assert get(client, "/-/")[0].code == 404


def test_ui_access_token(store: Store, index: SQLiteIndex, dashboard: Dashboard, clock: Clock) -> None:
    client = StubTreq(Root(store, index, ui=resources(dashboard, Guard(Tokens(index, clock)))))
    token = "cc_test-token"
    assert resolve(index.create_token("browser", digest(token)))
    for path in ("/", "/-/stats", "/-/ui/npm/left-pad", "/-/ui/go/example.com/m", "/-/ui/search?q=x"):
        response, body = get(client, path)
        assert response.code == 401, path
        assert any(c.startswith("Basic") for c in response.headers.getRawHeaders("www-authenticate"))
        # A browser sends it as the password of Basic (any user name).
        basic = "Basic " + base64.b64encode(f"me:{token}".encode()).decode()
        assert get(client, path, {"Authorization": basic})[0].code in (200, 404), path
    for path in ("/favicon.ico", "/-/ui/style.css", "/-/ui/refresh.js"):
        assert get(client, path)[0].code == 200, path


@pytest.mark.parametrize("argv, expected", [
    ([], "public"),
    (["--metrics-access", "token"], "token"),
    (["--metrics-access", "token", "--ui-access", "public"], "public"),
    (["--ui-access", "token"], "token"),
    # The pages name packages: private when they are.
    (["--access", "token"], "token"),
    (["--access", "token", "--ui-access", "public"], "public"),
    (["--config", "ROUTED"], "token"),
])
def test_ui_access_defaults_to_metrics_access(argv: list[str], expected: str, tmp_path: Any) -> None:
    config = tmp_path / "routed.toml"
    config.write_text('[[npm.routes]]\npackages = ["@corp/*"]\nupstream = "http://127.0.0.1:9/"\n')
    options = Options(environ={})
    options.parseOptions([str(config) if a == "ROUTED" else a for a in argv])
    assert options["ui-access"] == expected


def test_ui_access_is_public_or_token() -> None:
    from twisted.python.usage import UsageError

    with pytest.raises(UsageError, match="--ui-access is public or token, not 'everyone'"):
        Options(environ={}).parseOptions(["--ui-access", "everyone"])


def test_the_hours_part_is_written_once_a_minute(tmp_path: Any) -> None:
    from twisted.internet.task import Clock

    from contentcache.activity import ActivityService
    from contentcache.pool import SynchronousRunner

    clock = Clock()
    clock.advance(NOW - NOW % 60)
    recorder = Activity(clock=clock.seconds)

    async def sample() -> dict[str, Any]:
        return {"requests": 1}

    directory = str(tmp_path)
    service = ActivityService(recorder, clock, SynchronousRunner(), sample, directory, 1)
    service.startService()
    hour_file = os.path.join(directory, "activity-1.hour.json")
    try:
        recorder.requested("npm", "left-pad")
        clock.advance(1)
        written = os.stat(hour_file).st_mtime_ns
        os.utime(hour_file, ns=(0, 0))
        for _ in range(30):  # requests every second, within one minute
            recorder.requested("npm", "left-pad")
            clock.advance(1)
        assert os.stat(hour_file).st_mtime_ns == 0 and written > 0
        current = activity_module.read_snapshots_of(directory, 1)
        assert current is not None and current["names"] == [[recorder.minute, [["npm", "left-pad", 31]]]]
        clock.advance(30)  # the minute turns: its names join the hour's part
        assert os.stat(hour_file).st_mtime_ns != 0
        merged = merge(activity_module.read_snapshots(directory), clock.seconds())
        assert merged["top"][0]["name"] == "left-pad" and merged["top"][0]["requests"] == 31
    finally:
        service.stopService()


def test_the_two_parts_never_count_a_minute_twice() -> None:
    recorder = Activity(clock=lambda: NOW)
    for _ in range(5):
        recorder.requested("npm", "left-pad")
    old_now, _ = recorder.snapshot_parts()
    recorder.clock = lambda: NOW + 60
    recorder.tick()  # the minute turns: its names go to the hour's part
    _, new_hour = recorder.snapshot_parts()
    # Read between the writes of the new hour's part and the new rest.
    snapshot = activity_module.combined(old_now, new_hour)
    assert merge([snapshot], NOW + 60)["top"] == [{"protocol": "npm", "name": "left-pad", "requests": 5}]
