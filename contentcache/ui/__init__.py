"""
Seeing the cache: the status page (C{/}), the same figures as JSON
(C{/-/stats}), what is cached of one package or module
(C{/-/ui/npm/NAME}, C{/-/ui/go/MODULE}) and the search of cached names
(C{/-/ui/search?q=}).

The figures are the whole daemon's whichever worker answers: its
metrics as C{/metrics} sums them, every worker's recent activity
(L{contentcache.activity}), and the store's counters from the index (never
a scan). Rendering a page costs a hit nothing: it reads what is counted
anyway.
"""

from __future__ import annotations

import time
from typing import Any, Awaitable, Callable

from attrs import define, field
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from .. import activity, admin, metrics
from ..activity import Activity
from ..index import IIndex, IndexUnavailable
from ..pool import Runner
from ..store import Store
from .figures import Settings, compute, sample

log = Logger()

#: How long the count of nodes is reused (a query of the server's sessions).
NODES_MAX_AGE = 30.0

__all__ = ["Dashboard", "Settings"]


@define
class Dashboard:
    """
    Where the status page's figures come from.
    """

    index: IIndex
    store: Store
    disk: Runner
    clock: IReactorTime
    settings: Settings
    activity: Activity = field(factory=lambda: activity.current)
    #: Where every worker writes its activity (with workers), and this one's slot.
    directory: str | None = None
    slot: int | None = None
    _nodes: tuple[float, int | None] = (float("-inf"), None)
    #: Per protocol: why a policy hides each of a package's versions,
    #: from what is held ((name, versions) -> {version: reason}).
    verdicts: dict[str, Callable[[str, list[str]], Awaitable[dict[str, str]]]] = field(factory=dict)

    def _read_all(self) -> tuple[dict[metrics.Sample, float], list[dict[str, Any]]]:
        # On the disk pool: every worker's files.
        assert self.directory is not None
        return metrics.values(), activity.read_snapshots(self.directory, skip=self.slot)

    async def _values(self) -> tuple[dict[metrics.Sample, float], list[dict[str, Any]]]:
        if self.directory is None:
            return metrics.values(), []
        return await self.disk.run(self._read_all)

    async def sample(self) -> dict[str, Any]:
        """
        What the history keeps of the whole daemon now.
        """
        values = await self.disk.run(metrics.values) if self.directory is not None else metrics.values()
        return sample(values)

    async def _node_count(self) -> int | None:
        if not self.settings.shared_index:
            return None
        checked, count = self._nodes
        if time.monotonic() - checked < NODES_MAX_AGE:
            return count
        try:
            count = await self.index.nodes()
        except IndexUnavailable as e:
            log.warn("counting the nodes for the status page: {error}", error=e)
        self._nodes = (time.monotonic(), count)
        return count

    async def figures(self) -> dict[str, Any]:
        """
        Everything the status page shows, as C{/-/stats} answers it.
        """
        values, others = await self._values()
        now = self.clock.seconds()
        # Merging every worker's activity and the figures are the page's
        # CPU work (milliseconds with full tables): on the pool, so that a
        # hit this worker answers meanwhile waits less for it.
        recent = await self.disk.run(activity.merge, [*others, self.activity.snapshot()], now)
        try:
            store = await admin.stats(self.index)
        except IndexUnavailable as e:
            store = {"error": str(e)}
        try:
            measured = await self.store.room()
            room: tuple[int, int] | None = (measured.free, measured.total)
        except OSError:
            room = None
        full = bool(await self.disk.run(self.store.space.full_now))
        nodes = await self._node_count()
        figures: dict[str, Any] = await self.disk.run(
            compute, values, recent, store, room, full, self.settings, now, nodes
        )
        return figures
