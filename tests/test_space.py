"""
The storage's room: what counts as a full disk, and how often it is said.
"""

from __future__ import annotations

import sqlite3
import threading
from typing import Any

from twisted.logger import globalLogPublisher

from contentcache.space import DiskSpace, StorageFull, is_full

FULL = OSError(28, "No space left on device")


def test_what_is_a_full_disk() -> None:
    assert is_full(FULL) and is_full(OSError(122, "Disk quota exceeded"))
    assert is_full(StorageFull("x"))
    assert not is_full(OSError(13, "Permission denied")) and not is_full(ValueError())
    error = sqlite3.OperationalError("database or disk is full")
    error.sqlite_errorcode = 13  # type: ignore[attr-defined]
    assert is_full(error)


def test_full_is_said_once_a_minute_however_writes_alternate(tmp_path: Any) -> None:
    now = [1000.0]
    space = DiskSpace(str(tmp_path), clock=lambda: now[0])
    said: list[str] = []

    def observe(event: dict[str, Any]) -> None:
        if event.get("log_namespace") == "contentcache.space":
            said.append(event["log_format"].split(" ")[2])

    globalLogPublisher.addObserver(observe)
    try:
        for _ in range(5):  # a nearly full disk: large misses fail, small ones fit
            assert isinstance(space.failed(FULL), StorageFull) and space.full
            now[0] += 5
            space.wrote()
            assert not space.full
        now[0] += 60
        space.failed(FULL)
    finally:
        globalLogPublisher.removeObserver(observe)
    assert said.count("full") == 2 and said.count("room") == 1


def test_a_full_disk_found_on_a_disk_thread_is_announced_on_the_reactor(tmp_path: Any) -> None:
    class Reactor:
        def __init__(self) -> None:
            self.calls: list[Any] = []

        def callFromThread(self, f: Any, *args: Any) -> None:
            self.calls.append((f, args))

    reactor = Reactor()
    space = DiskSpace(str(tmp_path), reactor)
    heard: list[bool] = []
    space.when_short(lambda: heard.append(True))
    thread = threading.Thread(target=space.failed, args=(FULL,))
    thread.start()
    thread.join()
    assert space.full and heard == [] and len(reactor.calls) == 1
    f, args = reactor.calls[0]
    f(*args)
    assert heard == [True]
