"""
The status page, the package views and the search, as HTML: every name and
string from a request, an upstream or the index goes through L{e} (HTML
escaping, quotes too); the charts and the store's bar are inline SVG drawn
here. No script in the page itself: the refresher is a file of its own,
and the pages' Content-Security-Policy admits scripts from this daemon
only.
"""

from __future__ import annotations

import html
import shlex
import time
from typing import Any, Callable, Iterable, Mapping, Sequence
from urllib.parse import quote

from .packages import PackageView, VersionRow

#: Seconds between the page's refreshes of its figures.
REFRESH_SECONDS = 10
CHART_WIDTH, CHART_HEIGHT = 600, 170
_LEFT, _RIGHT, _TOP, _BOTTOM = 44, 8, 10, 22
HOUR = 3600.0


def e(value: object) -> str:
    """
    Text for HTML, attribute values included.
    """
    return html.escape(str(value), quote=True)


def human_bytes(n: float | None) -> str:
    if n is None:
        return "-"
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(size) < 1024 or unit == "TiB":
            return f"{int(size)} B" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"


def human_seconds(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 1:
        return f"{seconds * 1000:.1f} ms" if seconds < 0.1 else f"{seconds * 1000:.0f} ms"
    for limit, unit, size in ((120, "s", 1), (7200, "min", 60), (172800, "h", 3600)):
        if seconds < limit:
            return f"{seconds / size:.0f} {unit}"
    return f"{seconds / 86400:.0f} d"


def percent(ratio: float | None) -> str:
    return "-" if ratio is None else f"{ratio * 100:.1f}%"


def when(t: float | None, now: float) -> str:
    """
    A time as "12 s ago" (or "in 5 min"), with the UTC time as its title.
    """
    if t is None:
        return '<span class="muted">never</span>'
    stamp = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(t))
    delta = now - t
    relative = f"{human_seconds(delta)} ago" if delta >= 0 else f"in {human_seconds(-delta)}"
    return f'<time datetime="{e(time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t)))}" title="{e(stamp)}">{e(relative)}</time>'


def number(n: float | None) -> str:
    return "-" if n is None else f"{int(n):,}"


def _document(title: str, header: str, body: str, refresh: bool = False) -> bytes:
    main_attributes = f' data-refresh="{REFRESH_SECONDS}"' if refresh else ""
    return f"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{e(title)}</title>
<link rel="stylesheet" href="/-/ui/style.css">
<link rel="icon" href="/favicon.ico" type="image/x-icon">
<script src="/-/ui/refresh.js" defer></script>
</head>
<body>
{header}
<main id="main"{main_attributes}>
{body}
</main>
<footer>The same figures as JSON: <a href="/-/stats">/-/stats</a> · Prometheus: <a href="/metrics">/metrics</a>
· Health: <a href="/health">/health</a></footer>
</body>
</html>
""".encode("utf-8")


def _header(figures: Mapping[str, Any] | None, query: str = "") -> str:
    facts = ""
    if figures is not None:
        parts = [f"version {e(figures['version'])}", f"up {e(human_seconds(figures['uptime_seconds']))}",
                 f"{e(figures['workers'])} worker{'s' if figures['workers'] != 1 else ''}"]
        if figures.get("nodes") is not None:
            parts.append(f"{e(figures['nodes'])} node{'s' if figures['nodes'] != 1 else ''}")
        parts += [f"storage <span class=\"mono\">{e(figures['storage'])}</span>",
                  f"index <span class=\"mono\">{e(figures['index'])}</span>"]
        facts = f'<div class="facts" id="facts">{" · ".join(parts)}</div>'
    return f"""<header>
<h1><a href="/">contentcache</a></h1>
{facts}
<form action="/-/ui/search" method="get" role="search">
<input type="search" name="q" value="{e(query)}" placeholder="Cached packages and modules starting with..."
 aria-label="Search cached names">
<button type="submit">Search</button>
</form>
</header>"""


def page(title: str, body: str, figures: Mapping[str, Any] | None = None, query: str = "",
         refresh: bool = False) -> bytes:
    return _document(title, _header(figures, query), body, refresh)


# The status page.


def status_page(figures: Mapping[str, Any]) -> bytes:
    now = figures["now"]
    body = "\n".join([
        _overview(figures),
        _traffic(figures),
        _bandwidth(figures["bandwidth"]),
        _store(figures["store"]),
        _upstreams(figures["upstreams"], now),
        _maintenance(figures["expiry"], figures["scrub"], now),
        _top(figures["top"]),
        _errors(figures["errors"], now),
    ])
    return page("contentcache status", body, figures, refresh=True)


def _overview(figures: Mapping[str, Any]) -> str:
    everything = figures["requests"]["all"]
    history = figures["history"]
    saved = figures["bandwidth"]["all"]
    store = figures["store"]
    failing = [u for u in figures["upstreams"] if u["failing"]]
    stored = int(store.get("stored_bytes", 0))
    of = (f"of {e(human_bytes(store['max_size']))} ({e(percent(store.get('used_of_max')))})" if store.get("max_size")
          else f"{e(human_bytes(store.get('free_bytes')))} free on disk")
    upstreams = (f'<span class="bad">{len(failing)} failing</span>' if failing
                 else f'<span class="good">{len(figures["upstreams"])} answering</span>' if figures["upstreams"]
                 else '<span class="muted">none</span>')
    last = history[-1] if history else None
    cards = [
        _card("Hit ratio", f'<span data-ratio="{e(everything["hit_ratio"])}">{e(percent(everything["hit_ratio"]))}</span>',
              f"{number(everything['hit'] + everything['stale'] + everything['revalidating'])} hits, "
              f"{number(everything['miss'])} misses",
              id="hit-ratio"),
        _card("Requests", number(everything["total"]),
              (f"{last['rps']['all']:.2f}/s over the last {e(human_seconds(last['seconds']))}" if last else ""),
              id="requests"),
        _card("Bandwidth saved", e(percent(saved["saved_ratio"])), f"{e(human_bytes(saved['saved_bytes']))}"),
        _card("Store", e(human_bytes(stored)), of),
        _card("Upstreams", upstreams, ", ".join(e(u["url"]) for u in failing)),
    ]
    return f'<section id="overview"><div class="cards">{"".join(cards)}</div></section>'


def _card(label: str, value: str, detail: str = "", id: str = "") -> str:
    ident = f' id="{e(id)}"' if id else ""
    return (f'<div class="card"{ident}><div class="label">{e(label)}</div><div class="value">{value}</div>'
            f'<div class="detail">{detail}</div></div>')


def _traffic(figures: Mapping[str, Any]) -> str:
    requests = figures["requests"]
    history = figures["history"]
    rows = []
    for protocol, t in requests.items():
        rows.append(
            f'<tr data-protocol="{e(protocol)}"><td>{e(protocol)}</td><td class="num">{number(t["total"])}</td>'
            f'<td class="num">{number(t["hit"])}</td><td class="num">{number(t["revalidating"])}</td>'
            f'<td class="num">{number(t["stale"])}</td><td class="num">{number(t["miss"])}</td><td class="num">{number(t["error"])}</td>'
            f'<td class="num">{number(t["bypass"])}</td>'
            f'<td class="num" data-ratio="{e(t["hit_ratio"])}">{e(percent(t["hit_ratio"]))}</td></tr>'
        )
    table = ('<div class="table-wrap"><table id="requests-table"><thead><tr><th>Protocol</th><th class="num">Requests</th>'
             '<th class="num" title="answered from the store">Hits</th>'
             '<th class="num" title="answered from the store while revalidated in the background (stale-while-revalidate)">'
             'Revalidating</th>'
             '<th class="num" title="answered from the store because upstream failed (stale-if-error)">Stale</th>'
             '<th class="num">Misses</th><th class="num">Errors</th>'
             '<th class="num">Passed through</th><th class="num">Hit ratio</th></tr></thead><tbody>'
             + "".join(rows) + "</tbody></table></div>")
    now = figures["now"]
    rps = {name: [(p["t"], p["rps"].get(name)) for p in history] for name in ("all", "go", "npm")}
    ratio = {name: [(p["t"], p["hit_ratio"].get(name)) for p in history] for name in ("all", "go", "npm")}
    top = max([v for series in rps.values() for _, v in series if v is not None] + [0.0])
    charts = (
        '<div class="charts">'
        + _chart("chart-rps", "Requests per second, per minute, the last hour", rps, now, _nice(top),
                 lambda v: f"{v:.3g}")
        + _chart("chart-hit-ratio", "Hit ratio (stale and revalidated answers are hits), per minute, the last hour",
                 ratio, now, 1.0, lambda v: f"{v * 100:.0f}%")
        + "</div>"
    )
    return (f'<section id="traffic"><h2>Traffic</h2>'
            f"<p class=\"muted\">Hit ratio: hits ÷ (hits + misses); stale and revalidated answers count as hits, "
            f"errors as neither.</p>{table}{charts}</section>")


def _nice(top: float) -> float:
    """
    A round number at or above C{top}, for a chart's scale.
    """
    if top <= 0:
        return 1.0
    scale = 10 ** len(str(int(top))) / 10 if top >= 1 else 1.0
    if top < 1:
        scale = 0.1
        while scale / 10 >= top:
            scale /= 10
    for step in (1, 2, 5, 10):
        if step * scale >= top:
            return float(step * scale)
    return float(10 * scale)


def _chart(ident: str, caption: str, series: Mapping[str, Sequence[tuple[float, float | None]]], now: float,
           top: float, label: Callable[[float], str]) -> str:
    """
    A line chart of the last hour, one polyline per series, a dot per point
    (its value in a tooltip): an SVG drawn here, styled by the stylesheet.
    """
    width, height = CHART_WIDTH, CHART_HEIGHT
    plot_w, plot_h = width - _LEFT - _RIGHT, height - _TOP - _BOTTOM
    start = now - HOUR

    def x(t: float) -> float:
        return _LEFT + max(0.0, min(1.0, (t - start) / HOUR)) * plot_w

    def y(v: float) -> float:
        return _TOP + plot_h - max(0.0, min(1.0, v / top)) * plot_h

    parts = [f'<svg class="chart" id="{e(ident)}" viewBox="0 0 {width} {height}" role="img" '
             f'aria-label="{e(caption)}" xmlns="http://www.w3.org/2000/svg">']
    for i in range(5):
        v = top * i / 4
        parts.append(f'<line class="grid" x1="{_LEFT}" x2="{width - _RIGHT}" y1="{y(v):.1f}" y2="{y(v):.1f}"/>')
        parts.append(f'<text x="{_LEFT - 4}" y="{y(v) + 4:.1f}" text-anchor="end">{e(label(v))}</text>')
    for minutes in (60, 45, 30, 15, 0):
        anchor = "end" if minutes == 0 else "start" if minutes == 60 else "middle"
        parts.append(f'<text x="{x(now - minutes * 60):.1f}" y="{height - 6}" text-anchor="{anchor}">'
                     f'{"now" if minutes == 0 else f"-{minutes} min"}</text>')
    for name, points in series.items():
        drawn = [(t, v) for t, v in points if v is not None and t >= start]
        if not drawn:
            continue
        coordinates = " ".join(f"{x(t):.1f},{y(v):.1f}" for t, v in drawn)
        parts.append(f'<polyline class="series-{e(name)}" points="{coordinates}"/>')
        for t, v in drawn:
            parts.append(f'<circle class="point series-{e(name)}" data-series="{e(name)}" data-value="{v!r}" '
                         f'cx="{x(t):.1f}" cy="{y(v):.1f}" r="2.5"><title>{e(name)}: {e(label(v))} '
                         f'({e(time.strftime("%H:%M", time.gmtime(t)))} UTC)</title></circle>')
    parts.append("</svg>")
    legend = "".join(f'<span><span class="swatch series-{e(n)}"></span>{e(n)}</span>' for n in series)
    return f'<figure><figcaption>{e(caption)}</figcaption>{"".join(parts)}<div class="legend">{legend}</div></figure>'


def _bandwidth(bandwidth: Mapping[str, Any]) -> str:
    everything = bandwidth["all"]
    cards = [
        _card("Served from the store", human_bytes(everything["served_from_store_bytes"]),
              f"{number(everything['served_from_store_bytes'])} bytes", id="served-bytes"),
        _card("Fetched upstream", human_bytes(everything["fetched_upstream_bytes"]),
              f"{number(everything['fetched_upstream_bytes'])} bytes", id="fetched-bytes"),
        _card("Bandwidth saved", f'<span data-bytes="{e(everything["saved_bytes"])}">'
              f'{e(human_bytes(everything["saved_bytes"]))}</span>',
              f'<span data-ratio="{e(everything["saved_ratio"])}">{e(percent(everything["saved_ratio"]))}</span> '
              "of what was served", id="saved"),
    ]
    return (f'<section id="bandwidth"><h2>Bandwidth</h2><div class="cards">{"".join(cards)}</div>'
            '<p class="muted">Saved: bytes served from the store less bytes fetched upstream to store them.</p>'
            "</section>")


def _bar(stored: int, max_size: int | None, free: int | None) -> str:
    """
    The store against its limit and the room on its disk: used, then what
    the disk still has room for, then (with --max-size) what it has not.
    """
    room = stored + (free or 0)
    scale = max(max_size or 0, room, stored, 1)
    width = 1000.0
    used = stored / scale * width
    parts = [f'<svg class="bar" id="store-bar" viewBox="0 0 {width:.0f} 28" preserveAspectRatio="none" role="img" '
             f'aria-label="{e(human_bytes(stored))} stored" data-stored="{stored}" '
             f'data-max="{e(max_size if max_size is not None else "")}" data-free="{e(free if free is not None else "")}" '
             'xmlns="http://www.w3.org/2000/svg">',
             f'<rect class="room" x="0" y="0" width="{width:.0f}" height="28"/>']
    if max_size is not None and room < max_size:
        no_room = room / scale * width
        parts.append(f'<rect class="nofree" x="{no_room:.1f}" y="0" width="{width - no_room:.1f}" height="28">'
                     "<title>beyond the free space on the disk</title></rect>")
    parts.append(f'<rect class="used" x="0" y="0" width="{used:.1f}" height="28"><title>stored</title></rect>')
    if max_size is not None:
        limit = max_size / scale * width
        parts.append(f'<line class="limit" x1="{limit:.1f}" x2="{limit:.1f}" y1="0" y2="28"/>')
    parts.append("</svg>")
    return "".join(parts)


def _store(store: Mapping[str, Any]) -> str:
    stored = int(store.get("stored_bytes", 0))
    max_size = store.get("max_size")
    free = store.get("free_bytes")
    limit = (f"of {e(human_bytes(max_size))} (--max-size, {e(percent(store.get('used_of_max')))} used)"
             if max_size else "(no --max-size)")
    full = ' <span class="bad">the disk is full: nothing new is stored</span>' if store.get("full") else ""
    if store.get("error"):
        full += f' <span class="bad">the index does not answer: {e(store["error"])}</span>'
    summary = (f'<p id="store-summary"><strong data-bytes="{stored}">{e(human_bytes(stored))}</strong> '
               f'({number(stored)} bytes) on disk {limit} · {e(human_bytes(free))} free on the filesystem'
               f"{full}</p>")
    entries = store.get("entries", {})
    rows = "".join(f'<tr><td>entries ({e(p)})</td><td class="num" data-entries="{e(p)}">{number(n)}</td></tr>'
                   for p, n in sorted(entries.items()))
    rows += (f'<tr><td>blobs</td><td class="num" id="store-blobs">{number(store.get("blobs"))}</td></tr>'
             f'<tr><td>compressed blobs</td><td class="num">{number(store.get("compressed_blobs"))}</td></tr>'
             f'<tr><td>logical bytes (every entry counted)</td><td class="num">{number(store.get("logical_bytes"))}</td></tr>'
             f'<tr><td>unique bytes (each blob once)</td><td class="num">{number(store.get("unique_bytes"))}</td></tr>'
             f'<tr><td>bytes stored (after compression)</td><td class="num" id="store-bytes">{number(stored)}</td></tr>'
             f'<tr><td>dedup ratio (logical ÷ unique)</td><td class="num">{_ratio_text(store.get("dedup_ratio"))}</td></tr>'
             f'<tr><td>compression ratio (unique ÷ stored)</td><td class="num">{_ratio_text(store.get("compression_ratio"))}</td></tr>')
    return (f'<section id="store"><h2>Store</h2>{_bar(stored, max_size, free)}{summary}'
            f'<div class="table-wrap"><table id="store-table"><tbody>{rows}</tbody></table></div></section>')


def _ratio_text(ratio: float | None) -> str:
    return "-" if ratio is None else f"{ratio:.2f}×"


def _upstreams(upstreams: Sequence[Mapping[str, Any]], now: float) -> str:
    if not upstreams:
        return '<section id="upstreams"><h2>Upstreams</h2><p class="muted">None: cache-only.</p></section>'
    rows = []
    for u in upstreams:
        failure = when(u["last_failure"], now)
        if u["reason"]:
            failure += f': <span class="{"bad" if u["failing"] else "muted"}">{e(u["reason"])}</span>'
        stale = ('<span class="warn">yes</span>' if u["serving_stale"] else "no")
        if u["stale_answers_last_hour"]:
            count = u["stale_answers_last_hour"]
            stale += f' <span class="muted">({number(count)} stale answer{"s" if count != 1 else ""} in the last hour)</span>'
        rate = percent(u["error_rate"])
        if u["requests"]:
            rate += f' <span class="muted">({number(u["errors"])} of {number(u["requests"])})</span>'
        rows.append(
            f'<tr data-upstream="{e(u["url"])}"><td>{e(u["protocol"])}</td><td class="mono">{e(u["url"])}</td>'
            f'<td>{when(u["last_success"], now)}</td><td>{failure}</td><td>{rate}</td>'
            f'<td class="num">{e(human_seconds(u["median_seconds"]))}</td><td>{stale}</td></tr>'
        )
    return ('<section id="upstreams"><h2>Upstreams</h2><div class="table-wrap"><table><thead><tr><th>Protocol</th>'
            '<th>Upstream</th><th>Last success</th><th>Last failure</th><th>Errors (last hour)</th>'
            '<th class="num">Median fetch</th><th>Serving stale</th></tr></thead><tbody>'
            + "".join(rows) + "</tbody></table></div></section>")


def _maintenance(expiry: Mapping[str, Any], scrub: Mapping[str, Any], now: float) -> str:
    report = expiry.get("report")
    if report:
        did = (f"removed {number(report.get('expired_entries'))} expired and {number(report.get('evicted_entries'))} "
               f"evicted entries, {number(report.get('deleted_blobs'))} blobs ({e(human_bytes(report.get('freed_bytes')))}) "
               f"in {e(human_seconds(report.get('seconds')))}")
    else:
        did = "no pass yet"
    expiry_row = (f'<tr id="expiry"><td>expiry (every {e(human_seconds(expiry.get("interval")))})</td>'
                  f'<td>{when(expiry.get("last"), now)}</td><td>{did}</td>'
                  f'<td>{when(expiry.get("next"), now) if expiry.get("next") else "-"}</td></tr>')
    if not scrub.get("enabled"):
        scrub_row = '<tr id="scrub"><td>scrub</td><td colspan="3" class="muted">off (--scrub-interval 0)</td></tr>'
    else:
        last = scrub.get("report")
        did = (f"checked {number(last.get('blobs'))} blobs ({e(human_bytes(last.get('bytes')))}); "
               f"{number(last.get('damaged'))} damaged, deleted to be fetched again" if last else "no full pass yet")
        did += (f'; <span class="muted">{e(human_bytes(scrub.get("checked_bytes")))} checked since start, '
                f'{number(scrub.get("damaged_found"))} damaged found</span>')
        if scrub.get("running"):
            following = f"a pass is under way (since {when(scrub.get('pass_started'), now)})"
        else:
            following = when(scrub.get("next"), now) if scrub.get("next") else "-"
        scrub_row = (f'<tr id="scrub"><td>scrub (a pass about every {e(human_seconds(scrub.get("interval")))})</td>'
                     f'<td>{when(scrub.get("last"), now)}</td><td>{did}</td><td>{following}</td></tr>')
    return ('<section id="maintenance"><h2>Expiry and scrub</h2><div class="table-wrap"><table><thead><tr><th></th>'
            '<th>Last pass</th><th>What it did</th><th>Next</th></tr></thead><tbody>'
            + expiry_row + scrub_row + "</tbody></table></div></section>")


def package_link(protocol: str, name: str) -> str:
    kind = "go" if protocol == "go" else "npm"
    return f'/-/ui/{kind}/{quote(name, safe="@/")}'


def _top(top: Sequence[Mapping[str, Any]]) -> str:
    if not top:
        body = '<p class="muted">No requests in the last hour.</p>'
    else:
        rows = "".join(
            f'<tr><td>{e(t["protocol"])}</td><td><a href="{e(package_link(t["protocol"], t["name"]))}">{e(t["name"])}</a>'
            f'</td><td class="num">{number(t["requests"])}</td></tr>'
            for t in top
        )
        body = ('<div class="table-wrap"><table id="top-table"><thead><tr><th>Protocol</th><th>Name</th>'
                f'<th class="num">Requests</th></tr></thead><tbody>{rows}</tbody></table></div>')
    return f'<section id="top"><h2>Most requested, the last hour</h2>{body}</section>'


def _errors(errors: Sequence[Mapping[str, Any]], now: float) -> str:
    if not errors:
        body = '<p class="muted">None.</p>'
    else:
        rows = "".join(
            f'<tr><td>{when(x["time"], now)}</td><td class="num">{e(x["status"])}</td><td>{e(x["method"])}</td>'
            f'<td class="mono">{e(x["path"])}</td><td>{e(x["reason"])}</td></tr>'
            for x in errors
        )
        body = ('<div class="table-wrap"><table id="errors-table"><thead><tr><th>When</th><th class="num">Status</th>'
                f'<th>Method</th><th>Path</th><th>What the client was told</th></tr></thead><tbody>{rows}</tbody>'
                "</table></div>")
    return f'<section id="errors"><h2>Last errors</h2>{body}</section>'


# A package's view.

#: The columns of a package's versions: heading, cell (HTML). A column of
#: its own for something else a version has is one more line here.
VERSION_COLUMNS: list[tuple[str, Callable[[VersionRow, float], str]]] = [
    ("Version", lambda row, now: f'<span class="mono">{e(row.version)}</span>'),
    ("Cached", lambda row, now: e(" ".join(row.files))),
    ("Size", lambda row, now: e(human_bytes(row.size))),
    ("Fetched", lambda row, now: when(row.fetched, now)),
    ("Last used", lambda row, now: when(row.last_used, now)),
    ("Digest", lambda row, now: (f'<span class="mono">{e(row.digest)}</span>' if row.digest else "-")
     + (f'<br><span class="mono muted">go.mod {e(row.other_digest)}</span>' if row.other_digest else "")),
    ("Checked", lambda row, now: e(row.verified)),
    ("Policy", lambda row, now: f'<span class="warn">hidden: {e(row.hidden)}</span>' if row.hidden else "served"),
]


def purge_command(protocol: str, name: str, options: Iterable[str]) -> str:
    return shlex.join(["contentcache", "purge", *options, protocol, name])


def package_page(view: PackageView, now: float, options: Sequence[str]) -> bytes:
    kind = "Go module" if view.protocol == "go" else "npm package"
    if view.versions:
        head = "".join(f"<th>{e(h)}</th>" for h, _ in VERSION_COLUMNS)
        rows = "".join(
            f'<tr data-version="{e(row.version)}">' + "".join(f"<td>{cell(row, now)}</td>" for _, cell in VERSION_COLUMNS)
            + "</tr>"
            for row in view.versions
        )
        versions = (f'<div class="table-wrap"><table id="versions"><thead><tr>{head}</tr></thead>'
                    f"<tbody>{rows}</tbody></table></div>")
    else:
        versions = f'<p class="muted" id="versions-none">No version of this {e(kind)} is cached.</p>'
    if view.truncated:
        versions += '<p class="warn">More is cached than this page lists.</p>'
    if view.metadata:
        rows = "".join(f"<tr><td>{e(m.what)}</td><td>{e(human_bytes(m.size))}</td><td>{when(m.fetched, now)}</td>"
                       f"<td>{when(m.last_used, now)}</td></tr>" for m in view.metadata)
        metadata = ('<h2>Metadata</h2><div class="table-wrap"><table id="metadata"><thead><tr><th>What</th><th>Size</th>'
                    f"<th>Fetched</th><th>Last used</th></tr></thead><tbody>{rows}</tbody></table></div>")
    else:
        metadata = ""
    command = purge_command(view.protocol, view.name, options)
    body = (f'<h2 id="name">{e(kind)} <span class="mono">{e(view.name)}</span></h2>'
            f"<h2>Cached versions ({len(view.versions)})</h2>{versions}{metadata}"
            "<h2>Remove it from the cache</h2><p>This page changes nothing. To remove every version and its "
            "metadata, run on the daemon's machine (the next request fetches them again):</p>"
            f'<pre class="command" id="purge"><code>{e(command)}</code></pre>')
    return page(f"{view.name} · contentcache", body)


def not_a_name_page(kind: str, text: str, reason: str) -> bytes:
    body = (f'<h2>Not found</h2><p id="not-found">{e(reason)}: <span class="mono">{e(text)}</span></p>'
            f'<p>Search the cached {e(kind)} names with the box above.</p>')
    return page("not found · contentcache", body, query=text)


def search_page(text: str, found: Sequence[tuple[str, str]]) -> bytes:
    if found:
        rows = "".join(f'<li data-protocol="{e(p)}">{e(p)}: <a href="{e(package_link(p, n))}">{e(n)}</a></li>'
                       for p, n in found)
        results = f'<ul id="results">{rows}</ul>'
    else:
        results = '<p class="muted" id="no-results">No cached name starts with that.</p>'
    body = (f'<h2>Cached names starting with <span class="mono" id="query">{e(text)}</span></h2>{results}')
    return page("search · contentcache", body, query=text)
