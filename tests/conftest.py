"""
Shared fixtures: a synchronous disk runner, a store and index on a temporary
directory, and a guard that fails any test that logs a failure or leaves a
timer behind (pytest-twisted has no dirty-reactor check of its own).
"""

from __future__ import annotations

import os
from typing import Any, Callable, Coroutine, Iterator, TypeVar

import pytest
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.logger import globalLogPublisher
from twisted.python.failure import Failure

from contentcache.backend.filesystem import FilesystemBackend
from contentcache.index import SQLiteIndex
from contentcache.pool import SynchronousRunner
from contentcache.store import Store

from .daemon import Backing
from .seaweed import seaweed  # noqa: F401  (a session fixture)
from .postgres import pg_dsn, postgresql  # noqa: F401  (a session server, a database per test)

T = TypeVar("T")


@pytest.fixture(autouse=True)
def clean_reactor() -> Iterator[list[dict[str, Any]]]:
    """
    Fail a test that logs a failure or leaves a delayed call pending.
    A test that expects a logged failure removes it from the list.
    """
    failures: list[dict[str, Any]] = []

    def observe(event: dict[str, Any]) -> None:
        if "log_failure" in event:
            failures.append(event)

    before = set(reactor.getDelayedCalls())
    globalLogPublisher.addObserver(observe)
    try:
        yield failures
    finally:
        globalLogPublisher.removeObserver(observe)
    leftover = [c for c in reactor.getDelayedCalls() if c not in before and c.active()]
    for call in leftover:
        call.cancel()
    assert not failures, "logged failures: " + "; ".join(
        str(e["log_failure"].getTraceback()) for e in failures
    )
    assert not leftover, f"delayed calls left behind: {leftover}"


def resolve(d: Deferred[T] | Coroutine[Any, Any, T]) -> T:
    """
    The result of an already-fired Deferred (or a coroutine that completes
    synchronously), raising its failure.
    """
    if not isinstance(d, Deferred):
        d = Deferred.fromCoroutine(d)
    results: list[Any] = []
    d.addBoth(results.append)
    assert results, "the operation did not complete synchronously"
    if isinstance(results[0], Failure):
        results[0].raiseException()
    return results[0]  # type: ignore[no-any-return]


@pytest.fixture
def disk() -> SynchronousRunner:
    return SynchronousRunner()


@pytest.fixture
def storage(tmp_path: Any) -> str:
    return str(tmp_path / "storage")


@pytest.fixture
def make_store(storage: str, disk: SynchronousRunner) -> Callable[[], Store]:
    def make() -> Store:
        store = Store(FilesystemBackend(storage, disk), os.path.join(storage, "tmp"), disk)
        resolve(store.start())
        return store

    return make


@pytest.fixture
def store(make_store: Callable[[], Store]) -> Store:
    return make_store()


@pytest.fixture(params=["filesystem", "s3"])
def backing(request: Any, tmp_path: Any) -> Iterator[Backing]:
    """
    Storage for a test daemon, on each backend in turn: a directory, or a
    prefix of the session's S3 bucket (emptied afterwards).
    """
    if request.param == "filesystem":
        yield Backing.directory(str(tmp_path / "storage"))
        return
    s3 = request.getfixturevalue("seaweed")
    prefix = f"e2e-{os.path.basename(str(tmp_path))[:30]}-{os.urandom(4).hex()}"
    yield Backing.bucket(s3, prefix, str(tmp_path / "state"))
    s3.empty_bucket(s3.bucket, prefix + "/")


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def index(storage: str, disk: SynchronousRunner, clock: Clock) -> Iterator[SQLiteIndex]:
    os.makedirs(storage, exist_ok=True)
    idx = SQLiteIndex(storage, disk, clock)
    idx.open()
    yield idx
    if idx._database is not None:
        resolve(idx.close())


def files_under(root: str) -> list[str]:
    """
    Every file below C{root}, relative, sorted.
    """
    found = []
    for directory, _, names in os.walk(root):
        for name in names:
            found.append(os.path.relpath(os.path.join(directory, name), root))
    return sorted(found)
