"""
Services that start and stop the daemon's parts cleanly.
"""

from __future__ import annotations

import os
import signal
import socket
from types import FrameType
from typing import Any, Callable

from twisted.application.service import MultiService, Service
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.error import ReactorNotRunning
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from .backend import StorageUnavailable
from .store import Store

log = Logger()


class SequentialServices(MultiService):
    """
    A MultiService that stops its children one at a time, last started
    first, each only after the one before has finished stopping.

    MultiService stops them all at once; then the disk pool would join its
    threads while the index still has its last batch of access times to
    write through it, and that write would never run.
    """

    async def _stop_in_order(self) -> None:
        for service in reversed(list(self)):
            try:
                await maybeDeferred(service.stopService)
            except Exception:
                log.failure("stopping {service} failed", service=service)

    def stopService(self) -> Deferred[None]:
        Service.stopService(self)
        return Deferred.fromCoroutine(self._stop_in_order())


class StoreService(Service):
    """
    Prepares the store's directories at start and sweeps what interrupted
    writes left behind, in the background: on a large store the sweep takes
    a while and locked temporary files keep it from touching live writes.
    """


    def __init__(self, store: Store, sweep: bool = True, check: bool = True) -> None:
        self.store = store
        #: Whether this process sweeps (with workers, one of them does).
        self.sweep = sweep
        #: Whether a storage out of reach stops startup. A worker does not
        #: check: the supervisor did, once, and a worker started to replace
        #: one that died must serve what it can while the bucket is away.
        self.check = check
        self.swept: Deferred[None] | None = None

    def startService(self) -> None:
        # Before the reactor runs: a bucket that is missing or refuses the
        # credentials stops the daemon with one sentence.
        try:
            if self.check:
                self.store.backend.check()
            os.makedirs(self.store.staging, exist_ok=True)
        except StorageUnavailable as e:
            raise SystemExit(str(e)) from None
        except OSError as e:
            raise SystemExit(f"Cannot use the storage directory: {e}.") from None
        super().startService()
        if self.sweep:
            self.swept = Deferred.fromCoroutine(self._sweep())

    async def _sweep(self) -> None:
        try:
            removed = await self.store.start()
        except StorageUnavailable as e:
            log.warn("sweeping leftover temporary files failed: {error}", error=e)
        except Exception:
            log.failure("sweeping leftover temporary files failed")
        else:
            if removed:
                log.info("removed {count} leftover temporary files", count=removed)

    def stopService(self) -> Deferred[None] | None:
        super().stopService()
        return self.swept


def sd_notify(state: bytes) -> bool:
    """
    Tell the service manager C{state} (C{READY=1}, C{STOPPING=1}) on
    C{$NOTIFY_SOCKET}, as sd_notify(3) does; whether there was one.
    A datagram to a local socket: it does not wait on anything.
    """
    path = os.environ.get("NOTIFY_SOCKET")
    if not path:
        return False
    if path.startswith("@"):
        path = "\0" + path[1:]  # an abstract socket
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            s.connect(path)
            s.sendall(state)
    except OSError as e:
        log.warn("could not notify the service manager: {error}", error=e)
        return False
    return True


class NotifyReady(Service):
    """
    C{READY=1} to systemd (Type=notify) once the site listens: this
    service starts after the listening port, which raises if it cannot
    bind (with workers: once C{ready} fires, when they all listen).
    C{STOPPING=1} when the daemon begins to stop.
    """

    def __init__(self, reactor: Any, ready: Callable[[], Deferred[None]] | None = None) -> None:
        self._reactor = reactor
        self._ready = ready

    def startService(self) -> None:
        super().startService()
        if self._ready is None:
            self._reactor.callWhenRunning(sd_notify, b"READY=1")
        else:
            self._ready().addCallback(lambda _: sd_notify(b"READY=1"))

    def stopService(self) -> None:
        super().stopService()
        sd_notify(b"STOPPING=1")


class ExitCleanlyOnSIGTERM(Service):
    """
    Make SIGTERM a clean stop that exits 0.

    twistd re-raises SIGTERM at itself after the reactor stops, so a service
    manager would see death by signal; SIGTERM is how systemd, container
    runtimes and operators ask a daemon to stop, and a clean stop should
    read as success. Installed once the reactor runs, after twistd's own
    handlers, and removed at stop.
    """

    def __init__(self, reactor: Any) -> None:
        self._reactor = reactor
        self._previous: Any = None

    def startService(self) -> None:
        super().startService()
        self._reactor.callWhenRunning(self._install)

    def _install(self) -> None:
        if self.running:
            self._previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        log.info("SIGTERM: stopping")
        self._reactor.callFromThread(self._stop)

    def _stop(self) -> None:
        try:
            self._reactor.stop()
        except ReactorNotRunning:
            pass

    def stopService(self) -> None:
        super().stopService()
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None


class Every(Service):
    """
    Calls C{f} every C{interval} seconds while it runs.
    """

    def __init__(self, clock: Any, interval: float, f: Callable[[], object]) -> None:
        self._loop = LoopingCall(f)
        self._loop.clock = clock
        self._interval = interval

    def startService(self) -> None:
        super().startService()
        self._loop.start(self._interval, now=True)

    def stopService(self) -> None:
        super().stopService()
        if self._loop.running:
            self._loop.stop()
