"""
--log-format json: every line the daemon writes is one JSON object.
"""

from __future__ import annotations

import json
from typing import Any

from .daemon import Daemon, free_port
from .gomodules import GREET, build_tree, modules
from .test_goproxy import request
from .upstream import UpstreamFixture


def test_every_line_is_json_with_the_request_fields(tmp_path: Any) -> None:
    upstream = UpstreamFixture(build_tree(str(tmp_path / "proxy"), modules()))
    daemon = Daemon(str(tmp_path / "storage"), ["--go-upstream", upstream.url, "--go-sumdb", "off",
                                                "--log-format", "json"])
    try:
        request(daemon.url, f"/goproxy/{GREET}/@v/v1.0.0.info")
        request(daemon.url, f"/goproxy/{GREET}/@v/v1.0.0.info")
        upstream.stop()
        request(daemon.url, f"/goproxy/{GREET}/@v/v1.1.0.info")  # upstream gone: 502, a warning
        assert daemon.terminate() == 0
    finally:
        daemon.stop()
        upstream.stop()
    lines = daemon.output.decode().splitlines()
    events = [json.loads(line) for line in lines]  # every line parses
    assert len(events) == len(lines) > 5
    messages = [e["message"] for e in events]
    assert any("starting up" in m for m in messages)  # twistd's own line
    assert any("Server Shut Down" in m for m in messages)
    served = [e for e in events if e.get("log_namespace") == "contentcache.access"]
    assert [(e["method"], e["status"], e["cache_result"]) for e in served] == [
        ("GET", 200, "miss"), ("GET", 200, "hit"), ("GET", 502, "-")
    ]
    for e in served:
        assert e["path"].startswith("/goproxy/") and e["bytes"] > 0 and e["duration"] >= 0
        assert e["level"] == "info"
    miss, hit, failed = served
    assert 0 < miss["upstream_time"] <= miss["duration"]
    assert hit["upstream_time"] == 0
    assert any(e["level"] == "warn" and "upstream" in e["message"] for e in events)


def test_log_level_filters(tmp_path: Any) -> None:
    daemon = Daemon(str(tmp_path / "storage"), ["--log-level", "warn"], port=free_port())
    try:
        request(daemon.url, "/health")
        assert daemon.terminate() == 0
    finally:
        daemon.stop()
    assert "/health" not in daemon.output.decode()
