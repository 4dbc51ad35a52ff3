"""
Where the daemon's log goes and in what form: human-readable text, or one
JSON object per line for journald, Loki or ELK.
"""

from __future__ import annotations

import signal
import sys
from typing import IO, Callable, cast

from twisted.python.logfile import LogFile

from twisted.logger import (
    ILogObserver,
    LogEvent,
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
        out: IO[str] = stream or sys.stdout
        if logfile and logfile != "-":
            out = _reopened_on_sigusr1(LogFile.fromFullPath(logfile))
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
