"""
--log-format json: every line the daemon writes is one JSON object.
"""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import time
from typing import Any

from twisted.internet.task import Clock
from twisted.logger import LogLevel

from contentcache import logs
from contentcache.logs import AccessLog, observer_factory

from .daemon import TWISTD, Daemon, free_port
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
    # Workers write their lines in batches: whole, not necessarily in order.
    assert sorted((e["method"], e["status"], e["cache_result"]) for e in served) == [
        ("GET", 200, "hit"), ("GET", 200, "miss"), ("GET", 502, "-")
    ]
    for e in served:
        assert e["path"].startswith("/goproxy/") and e["bytes"] > 0 and e["duration"] >= 0
        assert e["level"] == "info"
    [miss] = [e for e in served if e["cache_result"] == "miss"]
    [hit] = [e for e in served if e["cache_result"] == "hit"]
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


def test_sigusr1_reopens_the_log_file(tmp_path: Any, monkeypatch: Any) -> None:
    from twisted.internet import reactor

    previous = signal.signal(signal.SIGUSR1, signal.SIG_DFL)
    try:
        path = str(tmp_path / "contentcache.log")
        observer = observer_factory("text", "info", logfile=path)()
        handler = signal.getsignal(signal.SIGUSR1)
        assert callable(handler), "the daemon would end on SIGUSR1"
        later: list[Any] = []
        monkeypatch.setattr(reactor, "callFromThread", lambda f, *args: later.append(f))
        os.rename(path, path + ".1")  # logrotate moved it
        handler(signal.SIGUSR1, None)
        [reopen] = later
        reopen()
        observer({"log_format": "after the rotation", "log_level": LogLevel.info, "log_time": time.time(),
                  "log_namespace": "test"})
        assert "after the rotation" in open(path).read()
    finally:
        signal.signal(signal.SIGUSR1, previous)


def test_a_daemon_in_the_background_cannot_log_to_stdout(tmp_path: Any) -> None:
    pidfile = str(tmp_path / "twistd.pid")
    try:
        done = subprocess.run(
            [TWISTD, "--logfile", "-", f"--pidfile={pidfile}", "contentcache", "--port", "tcp:0",
             "--storage", str(tmp_path / "storage")],
            capture_output=True, text=True, timeout=60, cwd=str(tmp_path),
        )
        assert done.returncode != 0
        assert "Daemons cannot log to stdout" in done.stdout + done.stderr
    finally:
        if os.path.exists(pidfile):  # it went to the background after all: stop it
            os.kill(int(open(pidfile).read()), signal.SIGTERM)


FIELDS = dict(method="GET", path="/goproxy/m/@v/list", status=200, cache_result="hit", bytes=12,
              duration=0.0004, upstream_time=0.0, end="", client="127.0.0.1", aborted=False, cut=False)


def access_log(monkeypatch: Any, form: str, level: LogLevel = LogLevel.info) -> tuple[AccessLog, io.StringIO, Clock]:
    stream, clock = io.StringIO(), Clock()
    monkeypatch.setattr(logs, "_output", logs._Output(stream, form, level))
    access = AccessLog(clock)
    access.start()
    return access, stream, clock


def test_the_access_log_is_written_in_batches_of_whole_lines(monkeypatch: Any) -> None:
    access, stream, clock = access_log(monkeypatch, "text")
    for status in (200, 404, 502):
        access.log(**{**FIELDS, "status": status})
    assert stream.getvalue() == "", "nothing yet: a batch a second"
    clock.advance(logs.ACCESS_FLUSH_INTERVAL)
    lines = stream.getvalue().splitlines()
    assert [line.split(" ", 2)[1:] for line in lines] == [
        ["[contentcache.access#info]", f"GET /goproxy/m/@v/list {status} hit 12 0.0004 0.0000"]
        for status in (200, 404, 502)
    ]
    access.log(**{**FIELDS, "end": " client left"})
    access.stop()  # at shutdown, what is left
    assert stream.getvalue().endswith(" client left\n")


def test_the_access_log_in_json_keeps_its_fields(monkeypatch: Any) -> None:
    access, stream, clock = access_log(monkeypatch, "json")
    access.log(**FIELDS)
    access.stop()
    [event] = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert event["log_namespace"] == "contentcache.access" and event["level"] == "info"
    assert (event["method"], event["status"], event["cache_result"], event["bytes"]) == ("GET", 200, "hit", 12)
    assert event["message"] == "GET /goproxy/m/@v/list 200 hit 12 0.0004 0.0000"


def test_the_access_log_is_dropped_above_info(monkeypatch: Any) -> None:
    access, stream, clock = access_log(monkeypatch, "text", LogLevel.warn)
    access.log(**FIELDS)
    access.stop()
    assert stream.getvalue() == ""
