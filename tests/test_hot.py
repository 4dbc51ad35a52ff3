"""
The in-memory hot set. (The index's log of changes that keeps it true is
tested with each engine in test_index.py.)
"""

from __future__ import annotations

from contentcache.hash import Hash
from contentcache.hot import ENTRY_OVERHEAD, Found, HotSet
from contentcache.index import Entry


def entry(key: str, body: bytes = b"x") -> Entry:
    return Entry("go", key, Hash.of(body), len(body), {}, 0.0, 0.0)


def test_bounded_by_bytes_least_recently_used_out_first() -> None:
    hot = HotSet(10 * (ENTRY_OVERHEAD + 1000))
    for i in range(20):
        hot.put(("go", f"k{i}"), Found(entry(f"k{i}"), b"b" * 900), hot.generation)
        hot.get(("go", "k0"))  # used all the time: stays
    assert hot.size <= hot.bound
    assert hot.get(("go", "k0")) is not None
    assert hot.get(("go", "k1")) is None and hot.get(("go", "k19")) is not None


def test_a_blob_over_the_item_limit_keeps_only_its_entry() -> None:
    hot = HotSet(64 << 20)
    hot.put(("go", "big"), Found(entry("big"), b"z" * (hot.item_limit + 1)), hot.generation)
    held = hot.get(("go", "big"))
    assert held is not None and held.body is None


def test_a_lookup_begun_before_a_drop_does_not_put_back_what_it_read() -> None:
    hot = HotSet(1 << 20)
    since = hot.generation
    hot.drop([("go", "k")])  # changed while the lookup was on the disk pool
    hot.put(("go", "k"), Found(entry("k")), since)
    assert hot.get(("go", "k")) is None
    hot.put(("go", "other"), Found(entry("other")), since)  # another key: fine
    assert hot.get(("go", "other")) is not None
    since = hot.generation
    hot.clear()
    hot.put(("go", "other"), Found(entry("other")), since)
    assert hot.get(("go", "other")) is None
    hot.put(("go", "k"), Found(entry("k")), hot.generation)
    assert hot.get(("go", "k")) is not None


def test_off_holds_nothing() -> None:
    hot = HotSet(0)
    hot.put(("go", "k"), Found(entry("k")), hot.generation)
    assert hot.get(("go", "k")) is None and len(hot) == 0

