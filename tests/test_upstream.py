"""
Coalescing and the negative cache.
"""

from __future__ import annotations

import pytest
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.task import Clock

from OpenSSL import SSL
from service_identity import VerificationError
from service_identity.hazmat import DNS_ID, DNSMismatch
from twisted.internet.error import ConnectionLost, ConnectionRefusedError, DNSLookupError
from twisted.python.failure import Failure
from twisted.web._newclient import ResponseFailed, ResponseNeverReceived

from contentcache.upstream import Coalescer, NegativeCache, what_happened

from .conftest import resolve


def test_concurrent_callers_share_one_operation() -> None:
    coalescer: Coalescer[str, int] = Coalescer()
    started: list[Deferred[int]] = []

    async def operation() -> int:
        d: Deferred[int] = Deferred()
        started.append(d)
        return await d

    waiters = [coalescer.run("k", operation) for _ in range(5)]
    assert len(started) == 1
    assert coalescer.waiting("k") == 5
    started[0].callback(7)
    assert [resolve(w) for w in waiters] == [7] * 5
    assert len(coalescer) == 0
    # The next miss starts a new operation.
    coalescer.run("k", operation)
    assert len(started) == 2
    started[1].callback(8)


def test_a_caller_that_gives_up_cancels_only_its_own_wait() -> None:
    coalescer: Coalescer[str, int] = Coalescer()
    gate: Deferred[int] = Deferred()

    async def operation() -> int:
        return await gate

    first = coalescer.run("k", operation)
    second = coalescer.run("k", operation)
    first.cancel()
    with pytest.raises(CancelledError):
        resolve(first)
    assert not gate.called  # the shared operation goes on
    gate.callback(3)
    assert resolve(second) == 3


def test_failures_reach_every_waiter() -> None:
    coalescer: Coalescer[str, int] = Coalescer()

    async def operation() -> int:
        raise ConnectionError("upstream down")

    waiters = [coalescer.run("k", operation)]
    for w in waiters:
        with pytest.raises(ConnectionError):
            resolve(w)


def test_negative_cache_expires_and_is_bounded() -> None:
    clock = Clock()
    negative: NegativeCache[str] = NegativeCache(clock, ttl=60, limit=2)
    negative.add("a")
    assert "a" in negative
    clock.advance(59.9)
    assert "a" in negative
    clock.advance(0.2)
    assert "a" not in negative
    for key in ("x", "y", "z"):
        negative.add(key)
    assert "x" not in negative and "y" in negative and "z" in negative
    negative.discard("z")
    assert "z" not in negative


def test_negative_cache_off() -> None:
    negative: NegativeCache[str] = NegativeCache(Clock(), ttl=0)
    negative.add("a")
    assert "a" not in negative


@pytest.mark.parametrize(
    "error, said",
    [
        (ConnectionRefusedError("127.0.0.1", 1), "refused the connection"),
        (DNSLookupError("registry.test"), "has a host name that does not resolve"),
        (ResponseNeverReceived([Failure(ConnectionLost())]), "reset the connection"),
        (ResponseFailed([Failure(ConnectionLost()), Failure(ValueError("x"))]), "reset the connection"),
        (RuntimeError("something\nwith lines <object at 0x1>"), "failed (something)"),
        (RuntimeError(), "failed (RuntimeError)"),
        (RuntimeError("<twisted.python.failure.Failure builtins.OSError: x>"), "failed (RuntimeError)"),
        (SSL.Error([("SSL routines", "", "certificate verify failed")]),
         "failed the TLS handshake (certificate verify failed)"),
        (SSL.Error([("SSL routines", "tls_process_server_certificate", "certificate verify failed", "")]),
         "failed the TLS handshake (certificate verify failed)"),
        (VerificationError(errors=[DNSMismatch(mismatched_id=DNS_ID("registry.test"))]),
         "presented a certificate for another host name"),
        (RuntimeError("Thing(errors=[Other(x=1)])"), "failed (RuntimeError)"),
    ],
)
def test_upstream_errors_read_as_sentences(error: Exception, said: str) -> None:
    assert what_happened(error) == said
