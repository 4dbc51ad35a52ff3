"""
The status page's figures, the same for C{/} and C{/-/stats}: computed
from the whole daemon's metrics (what C{/metrics} says), every worker's
recent activity merged, and the store's counters (what C{contentcache
stats} says). Pure functions: what they read is fetched by the caller.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

from attrs import frozen

from ..metrics import Sample

#: Results that count as hits: a revalidated answer is a hit (metrics
#: label it so); a stale one was served from the store too.
HIT_RESULTS = ("hit", "stale", "revalidating")
#: Results served from the store (a miss is, once it is stored).
STORE_RESULTS = ("hit", "stale", "revalidating", "miss")
PROTOCOLS = ("go", "npm")
#: The request protocol of each upstream protocol's answers.
REQUEST_PROTOCOL = {"go": "go", "gosumdb": "go", "npm": "npm"}
#: An upstream that failed last and whose protocol served stale answers
#: this recently is "serving stale".
STALE_RECENT = 300.0


@frozen
class Settings:
    """
    What the page says of the daemon's configuration.
    """

    version: str
    workers: int
    storage: str
    index: str
    shared_index: bool = False
    max_size: int | None = None
    expiry_interval: float = 600.0
    scrub_interval: float = 0.0
    #: The storage options of C{contentcache purge}, as this daemon's.
    purge_options: tuple[str, ...] = ()


def _sum(values: Mapping[Sample, float], name: str, **match: str) -> dict[tuple[str, ...], float]:
    """
    The samples of C{name} whose labels match, summed by the rest of their labels.
    """
    found: dict[tuple[str, ...], float] = {}
    for (sample, labels), value in values.items():
        if sample != name:
            continue
        labelled = dict(labels)
        if any(labelled.get(k) != v for k, v in match.items()):
            continue
        key = tuple(v for k, v in labels if k not in match)
        found[key] = found.get(key, 0.0) + value
    return found


def requests_by_result(values: Mapping[Sample, float]) -> dict[str, dict[str, float]]:
    """
    Requests per protocol and cache result (every status class together).
    """
    out: dict[str, dict[str, float]] = {}
    for (sample, labels), value in values.items():
        if sample == "contentcache_requests_total":
            labelled = dict(labels)
            results = out.setdefault(labelled["protocol"], {})
            results[labelled["cache_result"]] = results.get(labelled["cache_result"], 0.0) + value
    return out


def hit_ratio(hits: float, misses: float) -> float | None:
    return hits / (hits + misses) if hits + misses else None


def sample(values: Mapping[Sample, float]) -> dict[str, Any]:
    """
    What the history keeps of one moment: per protocol, hits, misses and
    every request, so far.
    """
    found = requests_by_result(values)
    counts = {}
    for protocol in (*PROTOCOLS, "other"):
        results = found.get(protocol, {})
        counts[protocol] = [sum(results.get(r, 0.0) for r in HIT_RESULTS), results.get("miss", 0.0),
                            sum(results.values())]
    return {"requests": counts}


def history_points(history: Sequence[Mapping[str, Any]], now_sample: Mapping[str, Any], now: float) -> list[dict[str, Any]]:
    """
    Per interval between samples (the last ending now): requests a second
    and the hit ratio, per protocol and for all.
    """
    samples = [*history, {"t": now, **now_sample}]
    points = []
    for before, after in zip(samples, samples[1:]):
        seconds = after["t"] - before["t"]
        if seconds <= 0:
            continue
        rps: dict[str, float] = {}
        ratio: dict[str, float | None] = {}
        all_hits = all_misses = all_total = 0.0
        for protocol in (*PROTOCOLS, "other"):
            a = after["requests"].get(protocol, [0, 0, 0])
            b = before["requests"].get(protocol, [0, 0, 0])
            # A counter that went back (a daemon restarted under the same
            # history) counts from 0.
            hits, misses, total = (x - y if x >= y else x for x, y in zip(a, b))
            all_hits, all_misses, all_total = all_hits + hits, all_misses + misses, all_total + total
            if protocol in PROTOCOLS:
                rps[protocol] = total / seconds
                ratio[protocol] = hit_ratio(hits, misses)
        rps["all"] = all_total / seconds
        ratio["all"] = hit_ratio(all_hits, all_misses)
        points.append({"t": after["t"], "seconds": seconds, "rps": rps, "hit_ratio": ratio})
    return points


def _ratio(a: float, b: float) -> float | None:
    return a / b if b else None


def compute(
    values: Mapping[Sample, float],
    recent: Mapping[str, Any],
    store: Mapping[str, Any],
    room: tuple[int, int] | None,
    full: bool,
    settings: Settings,
    now: float,
    nodes: int | None = None,
) -> dict[str, Any]:
    """
    Everything the page shows (and C{/-/stats} answers), from the whole
    daemon's metric C{values}, its C{recent} activity (L{activity.merge}),
    the C{store} figures (L{admin.stats}) and the storage's C{room} (free,
    total bytes).
    """
    by_result = requests_by_result(values)
    requests: dict[str, dict[str, Any]] = {}
    every: dict[str, float] = {}
    for protocol in sorted({*PROTOCOLS, *by_result}):
        results = dict(by_result.get(protocol, {}))
        for name, value in results.items():
            every[name] = every.get(name, 0.0) + value
        if protocol == "other" and not any(results.values()):
            continue
        requests[protocol] = _traffic(results)
    requests["all"] = _traffic(every)

    sent = _sum(values, "contentcache_response_bytes_total")
    fetched = _sum(values, "contentcache_upstream_bytes_total")
    bandwidth: dict[str, Any] = {}
    for protocol in (*PROTOCOLS, "all"):
        served = sum(v for (r, p), v in sent.items() if r in STORE_RESULTS and protocol in (p, "all"))
        upstream = sum(v for (p,), v in fetched.items() if protocol in (REQUEST_PROTOCOL.get(p, p), "all"))
        saved = max(served - upstream, 0.0)
        bandwidth[protocol] = {
            "served_from_store_bytes": int(served), "fetched_upstream_bytes": int(upstream),
            "saved_bytes": int(saved), "saved_ratio": _ratio(saved, served),
        }
    bandwidth["all"]["sent_bytes"] = int(sum(sent.values()))

    history = history_points(recent.get("history", []), sample(values), now)

    upstreams = []
    for u in recent.get("upstreams", []):
        failing = u["last_failure"] is not None and (u["last_success"] or 0) < u["last_failure"]
        stale = recent.get("stale", {}).get(REQUEST_PROTOCOL.get(u["protocol"], u["protocol"]), {})
        recently_stale = stale.get("last") is not None and now - stale["last"] < STALE_RECENT
        upstreams.append({
            **u, "failing": failing, "error_rate": _ratio(u["errors"], u["requests"]),
            "serving_stale": failing and recently_stale, "stale_answers_last_hour": stale.get("last_hour", 0),
        })

    free, total = room if room is not None else (None, None)
    stored = int(store.get("stored_bytes", 0))
    store_figures = {
        **store,
        "max_size": settings.max_size,
        "used_of_max": _ratio(stored, settings.max_size) if settings.max_size else None,
        "free_bytes": free,
        "filesystem_bytes": total,
        "full": full,
    }

    expiry = dict(recent.get("expiry") or {})
    expiry.setdefault("interval", settings.expiry_interval)
    scrub = dict(recent.get("scrub") or {})
    scrub["interval"] = settings.scrub_interval
    scrub["enabled"] = settings.scrub_interval > 0
    scrub["damaged_found"] = int(_sum(values, "contentcache_corrupt_blobs_total", found_by="scrub").get((), 0))
    scrub["checked_bytes"] = int(sum(_sum(values, "contentcache_scrub_bytes_total").values()))

    started = recent.get("started", now)
    return {
        "version": settings.version,
        "now": now,
        "started": started,
        "uptime_seconds": max(now - started, 0.0),
        "workers": settings.workers,
        "processes_reporting": recent.get("processes", 1),
        "nodes": nodes,
        "storage": settings.storage,
        "index": settings.index,
        "requests": requests,
        "bandwidth": bandwidth,
        "history": history,
        "store": store_figures,
        "upstreams": upstreams,
        "expiry": expiry,
        "scrub": scrub,
        "top": recent.get("top", []),
        "errors": recent.get("errors", []),
    }


def _traffic(results: Mapping[str, float]) -> dict[str, Any]:
    hits = sum(results.get(r, 0.0) for r in HIT_RESULTS)
    misses = results.get("miss", 0.0)
    return {
        **{r: int(results.get(r, 0.0)) for r in ("hit", "stale", "revalidating", "miss", "error", "bypass", "aborted")},
        "total": int(sum(results.values())),
        "hit_ratio": hit_ratio(hits, misses),
    }
