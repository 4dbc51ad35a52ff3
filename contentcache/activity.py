"""
What the daemon did lately that its counters do not say: each upstream's
last success and last failure (with its one-line reason), the last errors
it answered, the most requested names of the last hour, the last expiry
and scrub passes, and a per-minute history of the whole daemon's figures
for the status page's charts.

Each process records its own in an L{Activity} (the module's L{current},
as the metrics are the module's). With workers, each writes its own to a
small JSON file beside the metrics files, at most once a second and off
the reactor (L{ActivityService}); the status page merges every worker's
(L{merge}). Memory is bounded: a few dozen names a minute for an hour,
the last 20 errors, a few dozen fetch times per upstream.
"""

from __future__ import annotations

import json
import os
import statistics
import time
from collections import deque
from typing import Any, Awaitable, Callable, Iterable, Mapping
from urllib.parse import urlsplit

from attrs import Factory, define, field
from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from . import tempfiles
from .pool import Runner

log = Logger()

MINUTE = 60
HOUR = 60 * MINUTE
#: Errors kept (each process; the page shows the daemon's last ones).
ERRORS_KEPT = 20
#: Names counted in one minute at most (the least counted make room).
NAMES_PER_MINUTE = 64
#: The most requested names shown.
TOP_NAMES = 30
#: Fetch times kept per upstream, for the median.
DURATIONS_KEPT = 64
#: Minutes of history: an hour of intervals.
HISTORY_POINTS = 61
TEXT_LENGTH = 300
#: How often a worker writes what it recorded (when it changed).
WRITE_INTERVAL = 1.0
#: How often the whole daemon's figures are sampled for the history.
SAMPLE_INTERVAL = MINUTE
FILE_PREFIX = "activity-"


def _minute(t: float) -> int:
    return int(t // MINUTE)


def _line(text: str) -> str:
    lines = text.strip().splitlines()
    return (lines[0] if lines else "")[:TEXT_LENGTH]


def display_url(url: str) -> str:
    """
    An upstream's address without any user or password in it.
    """
    parts = urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    try:
        port = f":{parts.port}" if parts.port else ""
    except ValueError:
        port = ""
    return f"{parts.scheme}://{host}{port}{parts.path}".rstrip("/")


@define
class _Upstream:
    protocol: str
    url: str
    last_success: float | None = None
    last_failure: float | None = None
    reason: str | None = None
    #: minute -> [requests, errors]
    minutes: dict[int, list[int]] = field(factory=dict)
    durations: deque[float] = field(factory=lambda: deque(maxlen=DURATIONS_KEPT))

    def as_json(self) -> dict[str, Any]:
        return {
            "protocol": self.protocol, "url": self.url, "last_success": self.last_success,
            "last_failure": self.last_failure, "reason": self.reason,
            "minutes": {str(m): c for m, c in self.minutes.items()}, "durations": list(self.durations),
        }


@define
class Activity:
    """
    One process's record. The methods called per request (L{requested})
    do a dict update and nothing else; the minute turns in L{tick}.
    """

    clock: Callable[[], float] = time.time
    started: float = field(default=Factory(lambda self: self.clock(), takes_self=True))
    upstreams: dict[tuple[str, str], _Upstream] = field(factory=dict)
    errors: deque[dict[str, Any]] = field(factory=lambda: deque(maxlen=ERRORS_KEPT))
    #: This minute's counts of names, and the hour's minutes before it.
    names: dict[tuple[str, str], int] = field(factory=dict)
    minute: int = field(default=Factory(lambda self: _minute(self.clock()), takes_self=True))
    earlier_names: deque[tuple[int, dict[tuple[str, str], int]]] = field(factory=lambda: deque(maxlen=60))
    #: protocol -> minute -> stale answers
    stale: dict[str, dict[int, int]] = field(factory=dict)
    last_stale: dict[str, float] = field(factory=dict)
    expiry: dict[str, Any] | None = None
    scrub: dict[str, Any] | None = None
    history: deque[dict[str, Any]] = field(factory=lambda: deque(maxlen=HISTORY_POINTS))
    #: Counts every change, so that a writer knows whether to write; and
    #: those of the hour's part (earlier minutes, the history), which
    #: change once a minute and are written apart.
    changes: int = 0
    hour_changes: int = 0

    # Recording.

    def requested(self, protocol: str, name: str) -> None:
        """
        A request for a package or module: counted for this minute. When
        the minute's table is full, the least counted name gives way
        (space-saving: a name counted since holds at least its real count).
        """
        key = (protocol, name)
        names = self.names
        count = names.get(key)
        if count is not None:
            names[key] = count + 1
        elif len(names) < NAMES_PER_MINUTE:
            names[key] = 1
        else:
            least = min(names, key=names.__getitem__)
            names[key] = names.pop(least) + 1
        self.changes += 1

    def upstream(self, protocol: str, url: str) -> tuple[str, str]:
        """
        Know an upstream from the start (before it is asked anything); its key.
        """
        key = (protocol, display_url(url))
        if key not in self.upstreams:
            self.upstreams[key] = _Upstream(*key)
            self.changes += 1
        return key

    def fetched(self, key: tuple[str, str], seconds: float, failure: str | None = None) -> None:
        """
        An upstream answered (or failed to, with the one-line reason).
        """
        record = self.upstreams.get(key) or self.upstreams.setdefault(key, _Upstream(*key))
        now = self.clock()
        counts = record.minutes.get(_minute(now))
        if counts is None:
            counts = record.minutes[_minute(now)] = [0, 0]
            for old in [m for m in record.minutes if m <= _minute(now) - 60]:
                del record.minutes[old]
        counts[0] += 1
        if failure is None:
            record.last_success = now
        else:
            counts[1] += 1
            record.last_failure = now
            record.reason = _line(failure)
        record.durations.append(seconds)
        self.changes += 1

    def error(self, protocol: str, method: str, path: str, status: int, reason: str) -> None:
        """
        An answer with an error status (what the client was told).
        """
        self.errors.append({"time": self.clock(), "protocol": protocol, "method": method[:16],
                            "path": path[:TEXT_LENGTH], "status": status, "reason": _line(reason)})
        self.changes += 1

    def served_stale(self, protocol: str) -> None:
        now = self.clock()
        minutes = self.stale.setdefault(protocol, {})
        minutes[_minute(now)] = minutes.get(_minute(now), 0) + 1
        for old in [m for m in minutes if m <= _minute(now) - 60]:
            del minutes[old]
        self.last_stale[protocol] = now
        self.changes += 1

    def expiry_scheduled(self, next_at: float | None, interval: float) -> None:
        """
        This process runs expiry from now on (C{next_at}), or no longer (L{None}).
        """
        self.expiry = {**(self.expiry or {}), "updated": self.clock(), "next": next_at, "interval": interval}
        self.changes += 1

    def expiry_passed(self, report: Mapping[str, Any], next_at: float | None) -> None:
        now = self.clock()
        self.expiry = {**(self.expiry or {}), "updated": now, "last": now, "report": dict(report), "next": next_at}
        self.changes += 1

    def scrub_scheduled(self, running: bool, interval: float, next_at: float | None = None) -> None:
        """
        A scrub pass starts now (C{running}), or none runs until C{next_at}
        (L{None}: not in this process any more).
        """
        now = self.clock()
        self.scrub = {**(self.scrub or {}), "updated": now, "running": running, "interval": interval,
                      "next": next_at, **({"pass_started": now} if running else {})}
        self.changes += 1

    def scrub_passed(self, report: Mapping[str, Any], next_at: float | None) -> None:
        now = self.clock()
        self.scrub = {**(self.scrub or {}), "updated": now, "last": now, "report": dict(report), "next": next_at,
                      "running": False}
        self.changes += 1

    def sampled(self, figures: Mapping[str, Any]) -> None:
        """
        The whole daemon's figures now, for the history.
        """
        self.history.append({"t": self.clock(), **figures})
        self.changes += 1
        self.hour_changes += 1

    def tick(self) -> None:
        """
        Turn the minute of the names' counts, if it has turned.
        """
        minute = _minute(self.clock())
        if minute != self.minute:
            if self.names:
                self.earlier_names.append((self.minute, self.names))
            self.names = {}
            self.minute = minute
            self.changes += 1
            self.hour_changes += 1

    # As JSON, for the file and the page.

    def snapshot(self) -> dict[str, Any]:
        now, hour = self.snapshot_parts()
        return combined(now, hour)

    def snapshot_parts(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """
        The snapshot as what changes all the time and the hour's part
        (the earlier minutes' names, the history), written apart.
        """
        now = {
            "pid": os.getpid(),
            "started": self.started,
            "upstreams": [u.as_json() for u in self.upstreams.values()],
            "errors": list(self.errors),
            "names": [[self.minute, [[p, n, c] for (p, n), c in self.names.items()]]] if self.names else [],
            "stale": {p: {"last": self.last_stale.get(p), "minutes": {str(m): c for m, c in ms.items()}}
                      for p, ms in self.stale.items()},
            "expiry": self.expiry,
            "scrub": self.scrub,
        }
        hour = {
            "names": [[m, [[p, n, c] for (p, n), c in counts.items()]] for m, counts in self.earlier_names if counts],
            "history": list(self.history),
            # The minutes it holds end before this one.
            "through": self.minute - 1,
        }
        return now, hour

    def restore(self, snapshot: Mapping[str, Any]) -> None:
        """
        Go on from what a process before this one in the same worker's
        place recorded (it died, and this one replaced it).
        """
        try:
            self.started = float(snapshot["started"])
            for u in snapshot.get("upstreams", []):
                record = _Upstream(u["protocol"], u["url"], u["last_success"], u["last_failure"], u["reason"],
                                   {int(m): list(c) for m, c in u["minutes"].items()})
                record.durations.extend(u["durations"])
                self.upstreams[record.protocol, record.url] = record
            self.errors.extend(snapshot.get("errors", []))
            for m, counts in snapshot.get("names", []):
                if m < self.minute:
                    self.earlier_names.append((m, {(p, n): c for p, n, c in counts}))
            for p, stale in snapshot.get("stale", {}).items():
                self.stale[p] = {int(m): c for m, c in stale["minutes"].items()}
                if stale.get("last") is not None:
                    self.last_stale[p] = stale["last"]
            self.expiry = snapshot.get("expiry")
            self.scrub = snapshot.get("scrub")
            self.history.extend(snapshot.get("history", []))
        except (KeyError, TypeError, ValueError) as e:
            log.warn("not going on from the last worker's activity: {error!r}", error=e)
        self.changes += 1
        self.hour_changes += 1


#: This process's record.
current = Activity()


def merge(snapshots: Iterable[Mapping[str, Any]], now: float) -> dict[str, Any]:
    """
    The whole daemon's recent activity from every process's snapshot.
    """
    snapshots = list(snapshots)
    upstreams: dict[tuple[str, str], dict[str, Any]] = {}
    names: dict[tuple[str, str], int] = {}
    stale: dict[str, dict[str, Any]] = {}
    errors: list[dict[str, Any]] = []
    expiry: dict[str, Any] | None = None
    scrub: dict[str, Any] | None = None
    history: list[dict[str, Any]] = []
    hour_ago = _minute(now) - 60
    for snap in snapshots:
        for u in snap.get("upstreams", []):
            merged = upstreams.setdefault((u["protocol"], u["url"]), {
                "protocol": u["protocol"], "url": u["url"], "last_success": None, "last_failure": None,
                "reason": None, "requests": 0, "errors": 0, "durations": [],
            })
            if u["last_success"] is not None and (merged["last_success"] or 0) < u["last_success"]:
                merged["last_success"] = u["last_success"]
            if u["last_failure"] is not None and (merged["last_failure"] or 0) < u["last_failure"]:
                merged["last_failure"], merged["reason"] = u["last_failure"], u["reason"]
            for m, (count, failed) in u["minutes"].items():
                if int(m) > hour_ago:
                    merged["requests"] += count
                    merged["errors"] += failed
            merged["durations"].extend(u["durations"])
        errors.extend(snap.get("errors", []))
        for m, counts in snap.get("names", []):
            if m > hour_ago:
                for p, n, c in counts:
                    names[p, n] = names.get((p, n), 0) + c
        for p, s in snap.get("stale", {}).items():
            merged_stale = stale.setdefault(p, {"last": None, "last_hour": 0})
            if s.get("last") is not None and (merged_stale["last"] or 0) < s["last"]:
                merged_stale["last"] = s["last"]
            merged_stale["last_hour"] += sum(c for m, c in s["minutes"].items() if int(m) > hour_ago)
        for kind in ("expiry", "scrub"):
            record = snap.get(kind)
            best = expiry if kind == "expiry" else scrub
            if record is not None and (best is None or best.get("updated", 0) < record.get("updated", 0)):
                if kind == "expiry":
                    expiry = record
                else:
                    scrub = record
        # Every process samples the same (whole daemon's) figures: the
        # longest history is the best.
        own = [h for h in snap.get("history", []) if h.get("t", 0) > now - HOUR - MINUTE]
        if len(own) > len(history) or (own and len(own) == len(history) and own[-1]["t"] > history[-1]["t"]):
            history = own
    for merged in upstreams.values():
        durations = merged.pop("durations")
        merged["median_seconds"] = statistics.median(durations) if durations else None
    top = sorted(names.items(), key=lambda item: (-item[1], item[0]))[:TOP_NAMES]
    return {
        "started": min((s["started"] for s in snapshots), default=now),
        "processes": len(snapshots),
        "upstreams": sorted(upstreams.values(), key=lambda u: (u["protocol"], u["url"])),
        "errors": sorted(errors, key=lambda e: -e["time"])[:ERRORS_KEPT],
        "top": [{"protocol": p, "name": n, "requests": c} for (p, n), c in top],
        "stale": stale,
        "expiry": expiry,
        "scrub": scrub,
        "history": history,
    }


def _file(directory: str, slot: int, part: str = "") -> str:
    return os.path.join(directory, f"{FILE_PREFIX}{slot}{part}.json")


#: The name part of the file of the hour's part of a snapshot.
HOUR_PART = ".hour"


def combined(now: dict[str, Any], hour: Mapping[str, Any] | None) -> dict[str, Any]:
    """
    A snapshot from its two parts (see L{Activity.snapshot_parts}).
    """
    hour = hour or {}
    # A minute the hour's part holds already is not counted twice (the
    # other part, read between the two files' writes, may still have it).
    through = hour.get("through", -1)
    current = [entry for entry in now.get("names", []) if entry[0] > through]
    return {**now, "names": [*hour.get("names", []), *current], "history": hour.get("history", [])}


def _read(path: str) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None  # being replaced, or gone: the next read has it


def read_snapshots(directory: str, skip: int | None = None) -> list[dict[str, Any]]:
    """
    Every worker's last written snapshot (but slot C{skip}'s). Blocking.
    """
    found = []
    try:
        names = os.listdir(directory)
    except OSError:
        return []
    for name in sorted(names):
        slot = name.removeprefix(FILE_PREFIX).removesuffix(".json")
        if not (name.startswith(FILE_PREFIX) and name.endswith(".json") and slot.isdigit()):
            continue
        if skip is not None and int(slot) == skip:
            continue
        snapshot = read_snapshots_of(directory, int(slot))
        if snapshot is not None:
            found.append(snapshot)
    return found


def _write(directory: str, slot: int, body: bytes, part: str = "") -> None:
    path, handle = tempfiles.create(directory)
    try:
        handle.write(body)
        handle.close()
        os.replace(path, _file(directory, slot, part))
    except BaseException:
        tempfiles.discard(path, handle)
        raise


class ActivityService(Service):
    """
    Turns the minute of the names' counts; samples the whole daemon's
    figures once a minute (at start too) for the history; and, in a
    worker, writes what it recorded for the others to merge.
    """

    def __init__(self, activity: Activity, clock: Any, disk: Runner,
                 sample: Callable[[], Awaitable[Mapping[str, Any]]],
                 directory: str | None = None, slot: int | None = None) -> None:
        self.activity = activity
        self._clock = clock
        self._disk = disk
        self._sample = sample
        self.directory = directory
        self.slot = slot
        self._written = -1
        self._written_hour = -1
        self._writing: Deferred[None] | None = None
        self._ticks = LoopingCall(self._tick)
        self._ticks.clock = clock
        self._samples = LoopingCall(lambda: Deferred.fromCoroutine(self._take_sample()))
        self._samples.clock = clock

    def startService(self) -> None:
        super().startService()
        if self.directory is not None and self.slot is not None:
            # Before the reactor runs: a small file, read once.
            found = read_snapshots_of(self.directory, self.slot)
            if found is not None:
                self.activity.restore(found)
        self._ticks.start(WRITE_INTERVAL, now=False)
        self._samples.start(SAMPLE_INTERVAL, now=True)

    async def _take_sample(self) -> None:
        try:
            self.activity.sampled(await self._sample())
        except Exception:
            log.failure("sampling the daemon's figures for the status page failed")

    def _tick(self) -> None:
        self.activity.tick()
        if self.directory is None or self.slot is None:
            return
        if self.activity.changes == self._written or (self._writing is not None and not self._writing.called):
            return
        self._writing = Deferred.fromCoroutine(self._write())

    async def _write(self) -> None:
        assert self.directory is not None and self.slot is not None
        changes, hour_changes = self.activity.changes, self.activity.hour_changes
        now, hour = self.activity.snapshot_parts()
        write_hour = hour_changes != self._written_hour
        directory, slot = self.directory, self.slot

        def write() -> None:
            # The hour's part (the bulk: an hour of names) once a minute,
            # the rest when it changed, at most once a second.
            if write_hour:
                _write(directory, slot, json.dumps(hour, separators=(",", ":")).encode("utf-8"), HOUR_PART)
            _write(directory, slot, json.dumps(now, separators=(",", ":")).encode("utf-8"))

        try:
            await self._disk.run(write)
        except OSError as e:
            log.debug("could not write this worker's activity: {error}", error=e)
            return
        self._written, self._written_hour = changes, hour_changes

    def stopService(self) -> Deferred[None] | None:
        super().stopService()
        for loop in (self._ticks, self._samples):
            if loop.running:
                loop.stop()
        if self.directory is None or self.slot is None or self.activity.changes == self._written:
            return self._writing if self._writing is not None and not self._writing.called else None
        previous = self._writing
        return Deferred.fromCoroutine(self._last_write(previous))

    async def _last_write(self, previous: Deferred[None] | None) -> None:
        if previous is not None and not previous.called:
            await previous
        await self._write()


def read_snapshots_of(directory: str, slot: int) -> dict[str, Any] | None:
    """
    What slot C{slot}'s worker last wrote, if anything. Blocking.
    """
    now = _read(_file(directory, slot))
    if not isinstance(now, dict):
        return None
    hour = _read(_file(directory, slot, HOUR_PART))
    return combined(now, hour if isinstance(hour, dict) else None)
