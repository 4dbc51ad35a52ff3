"""
The status page's stylesheet, its refresher and its icon: served as they
are, the same bytes for everyone (no token needed: nothing in them is the
cache's).
"""

from __future__ import annotations

import math
import struct
import zlib

STYLESHEET = """\
:root {
  --fg: #1d2330; --muted: #5b6475; --line: #d8dde6; --bg: #ffffff; --panel: #f5f7fa;
  --accent: #2f6fd1; --go: #00a3c4; --npm: #cb3837; --all: #1d2330; --warn: #b26b00; --bad: #c0392b;
  --good: #1e8449;
}
* { box-sizing: border-box; }
body { margin: 0; font: 15px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: var(--fg);
  background: var(--bg); }
header, main, footer { max-width: 1200px; margin: 0 auto; padding: 0 16px; }
header { display: flex; flex-wrap: wrap; align-items: baseline; gap: 4px 16px; padding-top: 12px;
  padding-bottom: 8px; border-bottom: 1px solid var(--line); }
header h1 { font-size: 20px; margin: 0; }
header h1 a { color: inherit; text-decoration: none; }
header .facts { color: var(--muted); font-size: 13px; flex: 1 1 400px; }
header form { display: flex; gap: 6px; flex: 1 1 260px; }
header input[type=search] { flex: 1; min-width: 0; padding: 5px 8px; border: 1px solid var(--line);
  border-radius: 4px; font: inherit; }
header button { padding: 5px 10px; border: 1px solid var(--accent); background: var(--accent); color: #fff;
  border-radius: 4px; font: inherit; }
h2 { font-size: 16px; margin: 20px 0 8px; }
#overview { margin-top: 14px; }
td.mono { min-width: 14em; }
section { margin-bottom: 8px; }
.cards { display: grid; grid-template-columns: repeat(auto-fit, minmax(170px, 1fr)); gap: 10px; }
.card { background: var(--panel); border: 1px solid var(--line); border-radius: 6px; padding: 8px 12px; }
.card .label { color: var(--muted); font-size: 12px; text-transform: uppercase; letter-spacing: .04em; }
.card .value { font-size: 22px; font-weight: 600; }
.card .detail { color: var(--muted); font-size: 12px; }
.charts { display: grid; grid-template-columns: repeat(auto-fit, minmax(320px, 1fr)); gap: 10px; }
figure { margin: 0; background: var(--panel); border: 1px solid var(--line); border-radius: 6px; padding: 8px; }
figcaption { font-size: 13px; color: var(--muted); margin-bottom: 4px; }
svg.chart { width: 100%; height: auto; display: block; }
svg.chart .grid { stroke: var(--line); stroke-width: 1; }
svg.chart text { fill: var(--muted); font-size: 11px; }
svg.chart polyline { fill: none; stroke-width: 2; }
.series-all { stroke: var(--all); fill: var(--all); }
.series-go { stroke: var(--go); fill: var(--go); }
.series-npm { stroke: var(--npm); fill: var(--npm); }
.legend { font-size: 12px; color: var(--muted); display: flex; gap: 12px; margin-top: 2px; }
.legend .swatch { display: inline-block; width: 10px; height: 10px; border-radius: 2px; margin-right: 4px;
  vertical-align: -1px; }
.swatch.series-all { background: var(--all); } .swatch.series-go { background: var(--go); }
.swatch.series-npm { background: var(--npm); }
svg.bar { width: 100%; height: 28px; display: block; }
svg.bar .room { fill: #e7ebf1; } svg.bar .used { fill: var(--accent); } svg.bar .nofree { fill: #f3c7c2; }
svg.bar .limit { stroke: var(--fg); stroke-width: 2; }
.table-wrap { overflow-x: auto; }
table { border-collapse: collapse; width: 100%; font-size: 13px; }
th, td { text-align: left; padding: 5px 8px; border-bottom: 1px solid var(--line); vertical-align: top; }
th { color: var(--muted); font-weight: 600; white-space: nowrap; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
code, .mono { font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; font-size: 12px;
  overflow-wrap: anywhere; }
pre.command { background: var(--panel); border: 1px solid var(--line); border-radius: 6px; padding: 8px 10px;
  overflow-x: auto; }
.bad { color: var(--bad); font-weight: 600; } .warn { color: var(--warn); } .good { color: var(--good); }
.muted { color: var(--muted); }
footer { color: var(--muted); font-size: 12px; padding-top: 16px; padding-bottom: 24px; }
a { color: var(--accent); }
@media (max-width: 600px) {
  body { font-size: 14px; }
  .card .value { font-size: 19px; }
  th, td { padding: 4px 5px; }
  svg.chart text { font-size: 20px; }
  header .facts { flex-basis: 100%; }
}
"""

#: Reloads the figures (the page's <main>) every few seconds while the
#: page is shown; a page without a data-refresh keeps still.
REFRESHER = """\
(function () {
  "use strict";
  var selector = "main[data-refresh]";
  var main = document.querySelector(selector);
  if (!main || !window.fetch || !window.DOMParser) { return; }
  var seconds = Math.max(Number(main.getAttribute("data-refresh")) || 10, 1);
  var busy = false;
  function refresh() {
    if (document.hidden || busy) { return; }
    busy = true;
    fetch(window.location.href, {credentials: "same-origin", cache: "no-store",
                                 headers: {"Accept": "text/html"}})
      .then(function (response) {
        if (!response.ok) { throw new Error("status " + response.status); }
        return response.text();
      })
      .then(function (text) {
        var next = new DOMParser().parseFromString(text, "text/html").querySelector(selector);
        var now = document.querySelector(selector);
        if (next && now) { now.replaceWith(document.adoptNode(next)); }
      })
      .catch(function () { /* the next tick tries again */ })
      .then(function () { busy = false; });
  }
  window.setInterval(refresh, seconds * 1000);
  document.addEventListener("visibilitychange", refresh);
})();
"""

ICON_SIZE = 32
_BLUE = (47, 111, 209)


def _icon_pixel(x: int, y: int) -> tuple[int, int, int, int]:
    """
    A "c" in a blue disc: the icon, one pixel at a time.
    """
    centre = (ICON_SIZE - 1) / 2
    dx, dy = x - centre, y - centre
    r = math.hypot(dx, dy)
    if r > ICON_SIZE / 2:
        return (0, 0, 0, 0)
    angle = math.degrees(math.atan2(dy, dx))
    if 5.5 <= r <= 10 and not -45 <= angle <= 45:
        return (255, 255, 255, 255)
    return (*_BLUE, 255)


def _png(width: int, height: int) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    rows = b"".join(
        b"\x00" + b"".join(bytes(_icon_pixel(x, y)) for x in range(width)) for y in range(height)
    )
    header = struct.pack(">IIBBBBB", width, height, 8, 6, 0, 0, 0)  # 8-bit RGBA
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows, 9)) + chunk(b"IEND", b"")


def _ico(png: bytes, size: int) -> bytes:
    """
    A .ico holding one PNG image (as every browser reads them).
    """
    header = struct.pack("<HHH", 0, 1, 1)
    entry = struct.pack("<BBBBHHII", size, size, 0, 0, 1, 32, len(png), 6 + 16)
    return header + entry + png


FAVICON = _ico(_png(ICON_SIZE, ICON_SIZE), ICON_SIZE)
