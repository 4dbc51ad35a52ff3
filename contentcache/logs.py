"""
Where the daemon's log goes and in what form: human-readable text, or one
JSON object per line for journald, Loki or ELK; and the access log, a line
per request, formatted cheaply and written in batches to the same place.
"""

from __future__ import annotations

import signal
import sys
import time
from datetime import datetime
from typing import IO, Any, Callable, cast

from attrs import define, field
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall

from twisted.python.logfile import LogFile

from twisted.logger import (
    ILogObserver,
    LogEvent,
    Logger,
    eventAsJSON,
    formatEvent,
    LogLevel,
    jsonFileLogObserver,
    textFileLogObserver,
)
from zope.interface import provider

FORMATS = ("text", "json")
LEVELS = ("debug", "info", "warn", "error", "critical")


def observer_factory(
    format: str, level: str, stream: IO[str] | None = None, logfile: str | None = None
) -> Callable[[], ILogObserver]:
    """
    A factory twistd calls (its C{--logger}) for the daemon's observer.
    The stream is bound when twistd calls it, before it redirects stdout
    into the log, so every line the daemon writes, twistd's own included,
    comes out in one format. C{logfile} is twistd's C{--logfile}, which its
    C{--logger} would otherwise override.
    """

    def make() -> ILogObserver:
        global _output
        out: IO[str] = stream or sys.stdout
        if logfile and logfile != "-":
            out = _reopened_on_sigusr1(LogFile.fromFullPath(logfile))
        _output = _Output(out, format, LogLevel.levelWithName(level))
        observer: ILogObserver
        if format == "json":
            json_observer = jsonFileLogObserver(out, recordSeparator="")

            def with_text(event: LogEvent) -> None:
                # The formatted line and the level's name, for people and
                # for queries that do not know Twisted's event keys.
                json_observer({
                    **event,
                    "message": formatEvent(event),
                    "level": event["log_level"].name if "log_level" in event else "info",
                })

            observer = with_text  # type: ignore[assignment]
        else:
            observer = textFileLogObserver(out)
        return _at_least(LogLevel.levelWithName(level), observer)

    return make


def _at_least(level: LogLevel, observer: ILogObserver) -> ILogObserver:
    """
    Pass on the events of C{level} and above: a set lookup per event (the
    access log is a line per request; Twisted's FilteringLogObserver with a
    LogLevelFilterPredicate walks the namespace for each, about 6% of a
    cached hit).
    """
    levels = list(LogLevel.iterconstants())
    wanted = frozenset(levels[levels.index(level):])

    @provider(ILogObserver)
    def observe(event: LogEvent) -> None:
        if event.get("log_level", LogLevel.info) in wanted:
            observer(event)

    return cast(ILogObserver, observe)


def _reopened_on_sigusr1(log_file: LogFile) -> IO[str]:
    """
    SIGUSR1 reopens the file (what logrotate's postrotate expects), rather
    than ending the daemon; twistd's own --logfile would rotate it itself.
    """
    if not signal.getsignal(signal.SIGUSR1):

        def reopen(signum: int, frame: object) -> None:
            from twisted.internet import reactor

            reactor.callFromThread(log_file.reopen)  # type: ignore[attr-defined]

        signal.signal(signal.SIGUSR1, reopen)
    return log_file  # type: ignore[return-value]


#: What twistd's --logger (named by dotted path: it takes no arguments)
#: builds: format, level and twistd's --logfile, set from the command line
#: before twistd starts logging.
configured: tuple[str, str, str | None] = ("text", "info", None)


def configured_observer() -> ILogObserver:
    format, level, logfile = configured
    return observer_factory(format, level, logfile=logfile)()


@define
class _Output:
    """
    Where the daemon's own observer writes, for the access log to write
    there too, in the same form.
    """

    stream: IO[str]
    format: str
    level: LogLevel


#: Set when twistd builds the daemon's observer; L{None} when it logs on
#: its own (a --logger or --syslog of its own) or outside twistd (tests).
_output: _Output | None = None

ACCESS_NAMESPACE = "contentcache.access"
ACCESS_FORMAT = "{method} {path} {status} {cache_result} {bytes} {duration:.4f} {upstream_time:.4f}{end}"
#: How often the access log's lines are written, at the most.
ACCESS_FLUSH_INTERVAL = 0.25
_access = Logger(namespace=ACCESS_NAMESPACE)
_INFO_AND_BELOW = frozenset({LogLevel.debug, LogLevel.info})


@define
class AccessLog:
    """
    A line per request, formatted with an f-string (or as the JSON of the
    event twisted.logger would have built) rather than through
    twisted.logger's formatting, and written in batches at most every
    L{ACCESS_FLUSH_INTERVAL} seconds and at stop: whole lines, in the
    daemon's log, in its form. Where the daemon does not own its log, each
    request is an event as any other.
    """

    clock: IReactorTime
    _lines: list[str] = field(factory=list)
    _loop: LoopingCall | None = None
    _second: int = -1
    _stamp: str = ""

    def start(self) -> None:
        if _output is not None and self._loop is None:
            self._loop = LoopingCall(self.flush)
            self._loop.clock = self.clock
            self._loop.start(ACCESS_FLUSH_INTERVAL, now=False)

    def stop(self) -> None:
        if self._loop is not None:
            self._loop.stop()
            self._loop = None
        self.flush()

    def log(self, **fields: Any) -> None:
        """
        Record a request's line: C{method}, C{path}, C{status},
        C{cache_result}, C{bytes}, C{duration}, C{upstream_time} and
        C{end} (what follows, as " client left"), and any other fields
        the JSON form carries.
        """
        output = _output
        if output is None or self._loop is None:
            _access.info(ACCESS_FORMAT, **fields)
            return
        if output.level not in _INFO_AND_BELOW:
            return
        now = time.time()
        if output.format == "json":
            event = {
                **fields, "log_namespace": ACCESS_NAMESPACE, "log_level": LogLevel.info,
                "log_format": ACCESS_FORMAT, "log_time": now, "level": "info",
            }
            event["message"] = formatEvent(event)
            self._lines.append(eventAsJSON(event) + "\n")
            return
        second = int(now)
        if second != self._second:
            self._second, self._stamp = second, datetime.fromtimestamp(second).astimezone().strftime(
                "%Y-%m-%dT%H:%M:%S%z"
            )
        self._lines.append(
            f"{self._stamp} [{ACCESS_NAMESPACE}#info] {fields['method']} {fields['path']} {fields['status']} "
            f"{fields['cache_result']} {fields['bytes']} {fields['duration']:.4f} "
            f"{fields['upstream_time']:.4f}{fields['end']}\n"
        )

    def flush(self) -> None:
        if not self._lines or _output is None:
            return
        lines, self._lines = self._lines, []
        try:
            _output.stream.write("".join(lines))
            _output.stream.flush()
        except OSError:
            pass  # a full disk or a closed pipe: the lines are lost, not the daemon


_relayed = Logger(namespace="contentcache.workers")


def write_lines(text: str) -> None:
    """
    Whole lines from a worker, written as they came to the daemon's log
    (in its form already); where the daemon does not own its log, each is
    an event.
    """
    if _output is None:
        for line in text.splitlines():
            _relayed.info("{line}", line=line)
        return
    try:
        _output.stream.write(text)
        _output.stream.flush()
    except OSError:
        pass  # as for the access log: lines lost, not the daemon


def flush_output() -> None:
    """
    Write what is waiting (at exit).
    """
    if _output is not None:
        try:
            _output.stream.flush()
        except OSError:
            pass
