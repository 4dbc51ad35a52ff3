"""
Durations and sizes as operators write them: C{90s}, C{10m}, C{12h},
C{30d}; C{512MiB}, C{20GiB}, C{1.5TB}.
"""

from __future__ import annotations

import re

SECOND = 1.0
MINUTE = 60 * SECOND
HOUR = 60 * MINUTE
DAY = 24 * HOUR

_DURATION = re.compile(r"\s*([0-9]+(?:\.[0-9]+)?)\s*(ms|s|m|h|d|w)?\s*")
_DURATION_UNITS = {
    "ms": SECOND / 1000,
    "s": SECOND,
    "m": MINUTE,
    "h": HOUR,
    "d": DAY,
    "w": 7 * DAY,
    None: SECOND,
}


def parse_duration(text: str) -> float:
    """
    Seconds in C{text}: a number with an optional unit (ms, s, m, h, d, w;
    seconds without one).
    """
    m = _DURATION.fullmatch(text)
    if m is None:
        raise ValueError(f"{text!r} is not a duration like 30s, 10m, 12h or 30d")
    return float(m[1]) * _DURATION_UNITS[m[2]]

_SIZE = re.compile(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([KMGTP]i?B|B)?\s*", re.IGNORECASE)
_SIZE_UNITS = {"": 1, "b": 1}
for _i, _prefix in enumerate("kmgtp", start=1):
    _SIZE_UNITS[f"{_prefix}b"] = 1000**_i
    _SIZE_UNITS[f"{_prefix}ib"] = 1024**_i


def parse_size(text: str) -> int:
    """
    Bytes in C{text}: a number with an optional unit (B, KB/KiB, MB/MiB,
    GB/GiB, TB/TiB, PB/PiB; bytes without one).
    """
    m = _SIZE.fullmatch(text)
    if m is None:
        raise ValueError(f"{text!r} is not a size like 512MiB, 20GiB or 1.5TB")
    return int(float(m[1]) * _SIZE_UNITS[(m[2] or "").lower()])
