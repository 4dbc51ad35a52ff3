"""
Where the daemon's log goes and in what form: human-readable text, or one
JSON object per line for journald, Loki or ELK.
"""

from __future__ import annotations

import sys
from typing import IO, Callable

from twisted.logger import (
    FilteringLogObserver,
    ILogObserver,
    LogEvent,
    formatEvent,
    LogLevel,
    LogLevelFilterPredicate,
    jsonFileLogObserver,
    textFileLogObserver,
)

FORMATS = ("text", "json")
LEVELS = ("debug", "info", "warn", "error", "critical")


def observer_factory(format: str, level: str, stream: IO[str] | None = None) -> Callable[[], ILogObserver]:
    """
    A factory twistd calls (its C{--logger}) for the daemon's observer.
    The stream is bound when twistd calls it, before it redirects stdout
    into the log, so every line the daemon writes, twistd's own included,
    comes out in one format.
    """

    def make() -> ILogObserver:
        out = stream or sys.stdout
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
        return FilteringLogObserver(
            observer, [LogLevelFilterPredicate(defaultLogLevel=LogLevel.levelWithName(level))]
        )

    return make


#: What twistd's --logger (named by dotted path: it takes no arguments)
#: builds; set from the command line before twistd starts logging.
configured: tuple[str, str] = ("text", "info")


def configured_observer() -> ILogObserver:
    return observer_factory(*configured)()
