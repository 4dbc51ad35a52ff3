"""
Worker processes: one daemon as several processes on one port.

With C{--workers N} above 1, the process twistd starts is the supervisor.
It binds the listening socket once (or takes it from systemd), starts N
workers (C{python -m contentcache.workers} with the same options), passes
each the socket, and serves nothing itself. Every worker accepts on that
socket and runs the whole cache over the shared storage and index; what
must happen once (expiry, the scrub) runs in the one that holds the
leader lock (L{contentcache.locks.Leadership}).

The supervisor writes every worker's log lines, whole, to its own log;
replaces a worker that dies; on SIGTERM stops them all and exits 0. A
worker exits by itself when the supervisor goes, even by SIGKILL: it
watches a pipe whose other end only the supervisor holds (and asks the
kernel for SIGTERM when its parent dies).

File descriptors a worker gets: 3 the listening socket, 4 the pipe it
watches, 5 the pipe on which it says it is ready.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import signal
import socket
import sys
import threading
import time
from typing import Any, Callable, Mapping, Sequence

from twisted.application.service import Service
from twisted.internet import error as twisted_error
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IListeningPort
from twisted.internet.protocol import Factory, ProcessProtocol, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from . import logs

log = Logger()

#: The environment variable that makes a process a worker: its slot.
SLOT_VARIABLE = "CONTENTCACHE_WORKER_SLOT"
#: The supervisor's pid, for a worker to see it is still its parent.
SUPERVISOR_VARIABLE = "CONTENTCACHE_SUPERVISOR_PID"
LISTEN_FD = 3
PARENT_FD = 4
READY_FD = 5
#: Where prometheus-client's multiprocess files go, under the run directory.
METRICS_DIRECTORY = "metrics"
METRICS_VARIABLE = "PROMETHEUS_MULTIPROC_DIR"
#: How long the supervisor waits for workers told to stop, before SIGKILL.
STOP_TIMEOUT = 4.0
#: A worker that lived less than this died starting: the next waits longer.
SHORT_LIFE = 2.0
RESPAWN_DELAY = 0.1
LONGEST_RESPAWN_DELAY = 5.0
#: Environment a worker must not inherit: systemd's, meant for the
#: supervisor alone.
_NOT_INHERITED = ("LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES", "NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")
_PR_SET_PDEATHSIG = 1


def worker_slot(environ: Mapping[str, str] | None = None) -> int | None:
    """
    This process's slot if it is a worker, else L{None}.
    """
    value = (os.environ if environ is None else environ).get(SLOT_VARIABLE)
    return int(value) if value is not None and value.isdigit() else None


class _Refuse(Protocol):
    def connectionMade(self) -> None:
        assert self.transport is not None
        self.transport.loseConnection()


def _refusing() -> Factory[_Refuse]:
    """
    The supervisor's factory for the port it binds and never accepts on.
    """
    factory = Factory.forProtocol(_Refuse)
    factory.noisy = False
    return factory


class _LineWriter:
    """
    A worker's output, passed on as whole lines: what came after the last
    newline waits for the rest of its line.
    """

    def __init__(self, write: Callable[[str], None] = logs.write_lines) -> None:
        self._partial = b""
        self._write = write

    def feed(self, data: bytes) -> None:
        data = self._partial + data
        end = data.rfind(b"\n") + 1
        self._partial = data[end:]
        if end:
            self._write(data[:end].decode("utf-8", "replace"))
        if len(self._partial) > 1 << 20:
            # A line this long is not a log line: out it goes, cut.
            self._write(self._partial.decode("utf-8", "replace") + "\n")
            self._partial = b""

    def close(self) -> None:
        if self._partial:
            self._write(self._partial.decode("utf-8", "replace") + "\n")
            self._partial = b""


class _Worker(ProcessProtocol):
    def __init__(self, supervisor: Supervisor, slot: int) -> None:
        self.supervisor = supervisor
        self.slot = slot
        self.started = time.monotonic()
        self.ready = False
        self.pid: int | None = None
        self.ended: Deferred[None] = Deferred()
        self._out = _LineWriter()
        # What a worker writes to stderr is not in the log's form (a
        # traceback as it dies, say): each line becomes an event of ours.
        self._err = _LineWriter(self._stderr)

    def _stderr(self, text: str) -> None:
        for line in text.splitlines():
            log.error("worker {slot} (pid {pid}): {line}", slot=self.slot, pid=self.pid, line=line)

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        if childFD == 1:
            self._out.feed(data)
        elif childFD == 2:
            self._err.feed(data)
        elif childFD == READY_FD and not self.ready:
            self.ready = True
            self.supervisor.worker_ready(self)

    def processEnded(self, reason: Failure) -> None:
        self._out.close()
        self._err.close()
        self.supervisor.worker_ended(self, reason)
        self.ended.callback(None)


def _how(reason: Failure) -> str:
    value = reason.value
    signal_number = getattr(value, "signal", None)
    if signal_number:
        try:
            return f"was killed by {signal.Signals(signal_number).name}"
        except ValueError:
            return f"was killed by signal {signal_number}"
    return f"exited with status {getattr(value, 'exitCode', None)}"


class Supervisor(Service):
    """
    Binds the port, starts the workers and keeps C{count} of them running.
    """

    def __init__(self, reactor: Any, port: str, count: int, argv: Sequence[str], run_directory: str,
                 environment: Mapping[str, Callable[[], str]] | None = None) -> None:
        self._reactor = reactor
        #: Variables for the workers, each found once, at start.
        self._find = dict(environment or {})
        self._extra: dict[str, str] = {}
        self._description = port
        self.count = count
        self._argv = list(argv)
        self._run = run_directory
        # Each supervisor's own: a second daemon on the same state
        # directory keeps its figures apart.
        self._metrics_root = os.path.join(run_directory, METRICS_DIRECTORY)
        self.metrics = os.path.join(self._metrics_root, str(os.getpid()))
        self.port: IListeningPort | None = None
        self.workers: dict[int, _Worker] = {}
        self._delays: dict[int, float] = {}
        self._pending: dict[int, Any] = {}
        self._ready: Deferred[None] = Deferred()
        self._stopping = False

    def privilegedStartService(self) -> None:
        # Bound once, before the reactor runs, so that a port in use stops
        # startup in one sentence; then never accepted on here.
        result: list[object] = []
        serverFromString(self._reactor, self._description).listen(_refusing()).addBoth(
            result.append
        )
        (port,) = result
        if isinstance(port, Failure):
            if port.check(twisted_error.CannotListenError):
                raise SystemExit(f"Cannot listen on {self._description}: {port.value.socketError}.")
            port.raiseException()
        assert IListeningPort.providedBy(port)
        port.stopReading()  # type: ignore[attr-defined]
        self.port = port
        super().privilegedStartService()

    def startService(self) -> None:
        super().startService()
        self._extra = {name: find() for name, find in self._find.items()}
        try:
            _remove_dead(self._metrics_root)
            os.makedirs(self.metrics, exist_ok=True)
        except OSError as e:
            raise SystemExit(f"Cannot create {self.metrics}: {e.strerror}.") from None
        for slot in range(self.count):
            self._spawn(slot)

    def when_ready(self) -> Deferred[None]:
        """
        Fires once every worker of the first generation listens.
        """
        return self._ready

    def _environment(self, slot: int) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k not in _NOT_INHERITED}
        env.update(self._extra)
        env[SLOT_VARIABLE] = str(slot)
        env[SUPERVISOR_VARIABLE] = str(os.getpid())
        env[METRICS_VARIABLE] = self.metrics
        return env

    def _spawn(self, slot: int) -> None:
        self._pending.pop(slot, None)
        if self._stopping:
            return
        assert self.port is not None
        worker = _Worker(self, slot)
        self.workers[slot] = worker
        process = self._reactor.spawnProcess(
            worker,
            sys.executable,
            [sys.executable, "-m", "contentcache.workers", *self._argv],
            env=self._environment(slot),
            childFDs={0: "w", 1: "r", 2: "r", LISTEN_FD: self.port.fileno(),  # type: ignore[attr-defined]
                      PARENT_FD: "w", READY_FD: "r"},
        )
        worker.pid = process.pid

    def worker_ready(self, worker: _Worker) -> None:
        log.debug("worker {slot} (pid {pid}) is serving", slot=worker.slot, pid=worker.pid)
        if not self._ready.called and all(w.ready for w in self.workers.values()) and len(self.workers) == self.count:
            number = getattr(self.port.getHost(), "port", None) if self.port is not None else None
            where = f"port {number}" if isinstance(number, int) else self._description
            log.info("{count} workers serving on {where}", count=self.count, where=where)
            self._ready.callback(None)

    def worker_ended(self, worker: _Worker, reason: Failure) -> None:
        pid = worker.pid
        if pid is not None:
            _mark_dead(pid, self.metrics)
        if self.workers.get(worker.slot) is worker:
            del self.workers[worker.slot]
        if self._stopping:
            return
        if not worker.ready and not self._ready.called:
            # The first workers cannot start: no point in trying again.
            log.error("worker {slot} (pid {pid}) {how} while starting; stopping", slot=worker.slot,
                      pid=worker.pid, how=_how(reason))
            self._give_up()
            return
        lived = time.monotonic() - worker.started
        delay = self._delays.get(worker.slot, RESPAWN_DELAY)
        delay = min(delay * 2, LONGEST_RESPAWN_DELAY) if lived < SHORT_LIFE else RESPAWN_DELAY
        self._delays[worker.slot] = delay
        log.warn("worker {slot} (pid {pid}) {how}; starting another in {delay:.1f} s",
                 slot=worker.slot, pid=pid, how=_how(reason), delay=delay)
        self._pending[worker.slot] = self._reactor.callLater(delay, self._spawn, worker.slot)

    def _give_up(self) -> None:
        self._reactor.addSystemEventTrigger("after", "shutdown", _exit_failed)
        try:
            self._reactor.stop()
        except twisted_error.ReactorNotRunning:
            pass

    async def _stop(self) -> None:
        self._stopping = True
        for call in self._pending.values():
            if call.active():
                call.cancel()
        self._pending.clear()
        workers = list(self.workers.values())
        for worker in workers:
            _signal(worker, signal.SIGTERM)
        deadline = self._reactor.callLater(STOP_TIMEOUT, self._kill, workers)
        for worker in workers:
            await worker.ended
        if deadline.active():
            deadline.cancel()
        if self.port is not None:
            await self.port.stopListening()  # type: ignore[misc]

    def _kill(self, workers: list[_Worker]) -> None:
        for worker in workers:
            if not worker.ended.called:
                log.warn("worker {slot} (pid {pid}) did not stop in {timeout:g} s; killing it",
                         slot=worker.slot, pid=worker.pid, timeout=STOP_TIMEOUT)
                _signal(worker, signal.SIGKILL)

    def stopService(self) -> Deferred[None]:
        super().stopService()
        return Deferred.fromCoroutine(self._stop())


def _signal(worker: _Worker, signum: int) -> None:
    try:
        if worker.transport is not None:
            worker.transport.signalProcess(signum)
    except twisted_error.ProcessExitedAlready:
        pass


def _remove_dead(root: str) -> None:
    """
    Remove the metrics of supervisors that are gone (a restart).
    """
    for name in os.listdir(root) if os.path.isdir(root) else []:
        if name.isdigit() and not os.path.exists(f"/proc/{name}"):
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)


def _exit_failed() -> None:
    # twistd has no exit status of its own to give: this one says it failed.
    logs.flush_output()
    sys.stdout.flush()
    os._exit(1)


def _mark_dead(pid: int, directory: str) -> None:
    from prometheus_client import multiprocess

    try:
        multiprocess.mark_process_dead(pid, directory)
    except OSError:
        pass


class NotifySupervisor(Service):
    """
    In a worker: tell the supervisor once it is listening (this service
    starts after the port).
    """

    def __init__(self, reactor: Any) -> None:
        self._reactor = reactor

    def startService(self) -> None:
        super().startService()
        self._reactor.callWhenRunning(_say_ready)


def _say_ready() -> None:
    try:
        os.write(READY_FD, b"ready\n")
        os.close(READY_FD)
    except OSError:
        pass


class AdoptedPort(Service):
    """
    In a worker: accept on the listening socket the supervisor passed in.
    """

    def __init__(self, reactor: Any, factory: Any, fd: int = LISTEN_FD) -> None:
        self._reactor = reactor
        self._factory = factory
        self._fd = fd
        self.port: IListeningPort | None = None

    def privilegedStartService(self) -> None:
        super().privilegedStartService()
        family = socket.socket(fileno=os.dup(self._fd))
        try:
            self.port = self._reactor.adoptStreamPort(self._fd, family.family, self._factory)
        finally:
            family.close()
        os.close(self._fd)

    def stopService(self) -> Deferred[None] | None:
        super().stopService()
        if self.port is None:
            return None
        port, self.port = self.port, None
        return port.stopListening()


def _watch_parent(reactor: Any) -> None:
    """
    Stop the reactor when the supervisor's end of the pipe closes (it
    died), and leave in any case 5 seconds later.
    """
    try:
        while os.read(PARENT_FD, 4096):
            pass
    except OSError:
        pass
    threading.Timer(5.0, os._exit, (0,)).start()
    reactor.callFromThread(_stop_reactor, reactor)


def _stop_reactor(reactor: Any) -> None:
    log.warn("the supervising process is gone; this worker stops")
    try:
        reactor.stop()
    except twisted_error.ReactorNotRunning:
        pass


def _ask_for_sigterm_on_parent_death() -> None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        pass  # the pipe is watched anyway
    if os.environ.get(SUPERVISOR_VARIABLE, str(os.getppid())) != str(os.getppid()):
        os._exit(0)  # the supervisor died before the request was made


def main(argv: Sequence[str] | None = None) -> None:
    """
    A worker: the daemon's options, as the supervisor was given them.
    """
    from twisted.internet import reactor
    from twisted.logger import globalLogBeginner

    from .tap import Options, makeService

    _ask_for_sigterm_on_parent_death()
    options = Options()
    try:
        options.parseOptions(list(sys.argv[1:] if argv is None else argv))
    except Exception as e:
        print(f"worker: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    observer = logs.observer_factory(options["log-format"], options["log-level"], stream=sys.stdout)()
    globalLogBeginner.beginLoggingTo([observer], redirectStandardIO=False)
    service = makeService(options)
    service.privilegedStartService()
    service.startService()
    reactor.addSystemEventTrigger("before", "shutdown", service.stopService)
    threading.Thread(target=_watch_parent, args=(reactor,), daemon=True, name="parent-watch").start()
    reactor.run()
    logs.flush_output()


if __name__ == "__main__":
    main()
