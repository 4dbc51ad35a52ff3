"""
Prometheus metrics: what the cache does, for a dashboard. Labels are a
small bounded set (protocol, status class, cache result), never a package
name.
"""

from __future__ import annotations

import os
import time
from contextvars import ContextVar
from typing import Any
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from twisted.web import http


REGISTRY = CollectorRegistry(auto_describe=True)
#: Set by the supervisor for its workers: each keeps its figures in files
#: there, and /metrics, from any of them, sums them (prometheus-client's
#: multiprocess mode).
MULTIPROCESS_DIRECTORY = os.environ.get("PROMETHEUS_MULTIPROC_DIR")


def collect() -> bytes:
    """
    The whole daemon's metrics in the Prometheus text format. With
    workers this reads their files: call it on the disk pool.
    """
    if MULTIPROCESS_DIRECTORY is None:
        return generate_latest(REGISTRY)
    from prometheus_client import multiprocess

    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry, MULTIPROCESS_DIRECTORY)
    return generate_latest(registry)

Sample = tuple[str, tuple[tuple[str, str], ...]]


def values() -> dict[Sample, float]:
    """
    Every sample of the whole daemon's metrics, the same figures as
    L{collect}, by name and sorted labels. With workers this reads their
    files: call it on the disk pool.
    """
    registry = REGISTRY
    if MULTIPROCESS_DIRECTORY is not None:
        from prometheus_client import multiprocess

        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry, MULTIPROCESS_DIRECTORY)
    found: dict[Sample, float] = {}
    for family in registry.collect():
        for sample in family.samples:
            found[sample.name, tuple(sorted(sample.labels.items()))] = sample.value
    return found


#: The protocol label of each top-level path.
PROTOCOLS = {b"goproxy": "go", b"npm": "npm"}
#: Cache results: what X-Cache says (a STALE one being revalidated in the
#: background counts as revalidating), else bypass (or error for a
#: 4xx/5xx, aborted for a request whose client left before it was answered).
RESULTS = {b"HIT": "hit", b"REVALIDATED": "hit", b"MISS": "miss", b"STALE": "stale"}
_LATENCY = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)

requests = Counter(
    "contentcache_requests", "Requests answered.", ["protocol", "status_class", "cache_result"],
    registry=REGISTRY,
)
response_bytes = Counter(
    "contentcache_response_bytes", "Response body bytes sent, by cache result (hit, miss, stale and revalidating: "
    "served from the store).", ["protocol", "cache_result"], registry=REGISTRY
)
request_duration = Histogram(
    "contentcache_request_duration_seconds", "Time from request to the end of the response.",
    ["protocol"], buckets=_LATENCY, registry=REGISTRY,
)
upstream_requests = Counter(
    "contentcache_upstream_requests", "Requests sent upstream.", ["protocol"], registry=REGISTRY
)
upstream_errors = Counter(
    "contentcache_upstream_errors", "Upstream requests that failed (unreachable, timeout, broken body, "
    "an answer other than 200, 304, 404 or 410; a 5xx to a request passed through).",
    ["protocol"], registry=REGISTRY,
)
upstream_bytes = Counter(
    "contentcache_upstream_bytes", "Body bytes received from upstream to be stored (what the cache fetched; "
    "pass-through answers are not counted).", ["protocol"], registry=REGISTRY,
)
upstream_duration = Histogram(
    "contentcache_upstream_fetch_duration_seconds", "Time to an upstream response's headers.",
    ["protocol"], buckets=_LATENCY, registry=REGISTRY,
)
coalesced = Counter(
    "contentcache_coalesced_waiters", "Requests that waited for another request's upstream fetch.",
    ["protocol"], registry=REGISTRY,
)
integrity_failures = Counter(
    "contentcache_integrity_failures", "Upstream content refused by a check (checksum, zip rules, integrity).",
    ["protocol"], registry=REGISTRY,
)
policy_refusals = Counter(
    "contentcache_policy_refusals", "Versions asked for by name and refused 403 by a policy, by protocol and "
    "rule (min-age: younger than the minimum release age; deny: a deny rule).", ["protocol", "rule"],
    registry=REGISTRY,
)
for _protocol in ("npm", "go"):
    for _rule in ("min-age", "deny"):
        policy_refusals.labels(_protocol, _rule)
auth_failures = Counter(
    "contentcache_auth_failures", "Requests refused 401: no token where one is needed, or one that is not valid.",
    ["reason"], registry=REGISTRY,
)
for _reason in ("missing", "unknown"):
    auth_failures.labels(_reason)
sumdb_derived_tiles = Counter(
    "contentcache_sumdb_derived_tiles", "Checksum-database partial tiles a client asked for that were cut "
    "from a wider tile the cache held (its first entries) without asking upstream, once a cut, by kind: hash "
    "or data.", ["kind"], registry=REGISTRY,
)
for _kind in ("hash", "data"):
    sumdb_derived_tiles.labels(_kind)
sumdb_prefetched_tiles = Counter(
    "contentcache_sumdb_prefetched_tiles", "Checksum-database tiles fetched ahead of the go clients: those that "
    "prove the stored lookup answers' records and trees in the largest tree they name.", registry=REGISTRY,
)
# Gauges of the shared storage: the last any worker measured.
store_blobs = Gauge("contentcache_store_blobs", "Blobs in the store.", registry=REGISTRY,
                    multiprocess_mode="mostrecent")
store_logical_bytes = Gauge(
    "contentcache_store_logical_bytes", "Bytes of all cached entries, shared content counted per entry.",
    registry=REGISTRY, multiprocess_mode="mostrecent",
)
store_bytes = Gauge(
    "contentcache_store_bytes", "Bytes the blobs take in the backend, after compression.", registry=REGISTRY,
    multiprocess_mode="mostrecent",
)
expiry_passes = Counter("contentcache_expiry_passes", "Expiry passes run.", registry=REGISTRY)
expiry_evicted_entries = Counter(
    "contentcache_expiry_evicted_entries", "Entries removed by expiry (TTL or size).", registry=REGISTRY
)
expiry_deleted_blobs = Counter(
    "contentcache_expiry_deleted_blobs", "Blobs deleted by expiry.", registry=REGISTRY
)
expiry_duration = Histogram(
    "contentcache_expiry_pass_duration_seconds", "Time an expiry pass took.",
    buckets=(0.01, 0.1, 1, 10, 60, 300, 1800), registry=REGISTRY,
)
corrupt_blobs = Counter(
    "contentcache_corrupt_blobs", "Stored blobs found damaged (and deleted, to be fetched again), "
    "by where: read whole, streamed, or by the background scrub.", ["found_by"], registry=REGISTRY,
)
client_aborts = Counter(
    "contentcache_client_aborts", "Requests whose client closed the connection before the whole "
    "response was sent.", ["protocol"], registry=REGISTRY,
)
storage_free_bytes = Gauge(
    "contentcache_storage_free_bytes", "Bytes free on the filesystem of the storage (with S3: of the "
    "spool directory), as last measured.", registry=REGISTRY, multiprocess_mode="mostrecent",
)
storage_full = Gauge(
    "contentcache_storage_full", "1 from a write that found the storage full until one succeeds again "
    "(in any worker).", registry=REGISTRY, multiprocess_mode="mostrecent",
)
expiry_interval = Gauge(
    "contentcache_expiry_interval_seconds", "How often expiry runs (--expiry-interval).", registry=REGISTRY,
    multiprocess_mode="max",
)
expiry_next_pass = Gauge(
    "contentcache_expiry_next_pass_timestamp_seconds", "When the next expiry pass is due (Unix time), as "
    "the process that runs expiry last scheduled it.", registry=REGISTRY, multiprocess_mode="max",
)
store_max_bytes = Gauge(
    "contentcache_store_max_bytes", "The store's size limit (--max-size); 0: none.", registry=REGISTRY,
    multiprocess_mode="max",
)
storage_size_bytes = Gauge(
    "contentcache_storage_size_bytes", "Size of the filesystem of the storage (with S3: of the spool "
    "directory), as last measured.", registry=REGISTRY, multiprocess_mode="mostrecent",
)
scrub_bytes = Counter(
    "contentcache_scrub_bytes", "Stored bytes the background scrub has read and checked.", registry=REGISTRY,
)
scrub_passes = Counter(
    "contentcache_scrub_passes", "Full passes of the background scrub over the store.", registry=REGISTRY,
)
disk_queue = Gauge(
    "contentcache_disk_pool_queue_depth", "Calls waiting for or running on the disk thread pool "
    "(of every worker).", registry=REGISTRY, multiprocess_mode="livesum",
)
hot_bytes = Gauge(
    "contentcache_memory_cache_bytes", "Bytes the in-memory hot set holds (in every worker).",
    registry=REGISTRY, multiprocess_mode="livesum",
)
hot_entries = Gauge(
    "contentcache_memory_cache_entries", "Entries the in-memory hot set holds (in every worker).",
    registry=REGISTRY, multiprocess_mode="livesum",
)

#: The request protocols and the upstreams' (the checksum databases' too).
REQUEST_PROTOCOLS = ("go", "npm")
UPSTREAM_PROTOCOLS = ("go", "gosumdb", "npm")
#: Where damaged blobs are found.
FOUND_BY = ("read", "stream", "scrub")


def _initialise() -> None:
    """
    Every series a dashboard or an alert reads, at 0 from the start (in
    every worker), so that a rate over it is 0 rather than nothing.
    """
    for protocol in REQUEST_PROTOCOLS:
        for result in ("hit", "miss", "stale", "revalidating"):
            requests.labels(protocol, "2xx", result)
            response_bytes.labels(protocol, result)
        for status_class in ("4xx", "5xx"):
            requests.labels(protocol, status_class, "error")
        request_duration.labels(protocol)
        integrity_failures.labels(protocol)
        client_aborts.labels(protocol)
        coalesced.labels(protocol)
    for protocol in UPSTREAM_PROTOCOLS:
        upstream_requests.labels(protocol)
        upstream_errors.labels(protocol)
        upstream_bytes.labels(protocol)
        upstream_duration.labels(protocol)
    for where in FOUND_BY:
        corrupt_blobs.labels(where)


_initialise()

#: Seconds this request has spent waiting for upstream: a one-item list
#: set per request (in the context its handler runs in), added to by every
#: upstream call made on its behalf.
upstream_time: ContextVar[list[float] | None] = ContextVar("upstream_time", default=None)

#: How long the store gauges (an index query) are reused between scrapes.
STORE_STATS_MAX_AGE = 30.0


def protocol_of(request: http.Request) -> str:
    prepath = getattr(request, "prepath", None) or [b""]
    return PROTOCOLS.get(prepath[0], "other")


def is_revalidating(request: http.Request) -> bool:
    """
    Whether a stale answer is one being revalidated in the background
    (stale-while-revalidate's Warning 110), not one served because upstream
    failed (stale-if-error's 111).
    """
    warning = request.responseHeaders.getRawHeaders(b"warning", [b""])[0]
    return warning.startswith(b"110")


def observe_request(request: http.Request, started: float) -> None:
    """
    Count a finished request: called once per request by the site.
    """
    protocol = protocol_of(request)
    code = int(request.code)
    outcome = request.responseHeaders.getRawHeaders(b"x-cache", [None])[0]
    if outcome in RESULTS:
        result = RESULTS[outcome]
        if outcome == b"STALE" and is_revalidating(request):
            result = "revalidating"
    elif getattr(request, "aborted", False):
        result = "aborted"
    elif code >= 400:
        result = "error"
    else:
        result = "bypass"
    counters = _per_request.get((protocol, code // 100, result))
    if counters is None:
        # labels() takes a lock and builds a key on every call: keep the
        # children, a handful of them, for the hot path.
        counters = _per_request[protocol, code // 100, result] = (
            requests.labels(protocol, f"{code // 100}xx", result),
            response_bytes.labels(protocol, result),
            request_duration.labels(protocol),
        )
    count, sent, duration = counters
    count.inc()
    sent.inc(request.sentLength)
    duration.observe(time.monotonic() - started)


_per_request: dict[tuple[str, int, str], tuple[Any, Any, Any]] = {}


def observe_refused(code: int) -> None:
    """
    Count a connection answered before it held a request (malformed, too
    slow, too large).
    """
    requests.labels("other", f"{code // 100}xx", "error").inc()
