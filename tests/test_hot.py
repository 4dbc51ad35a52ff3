"""
The in-memory hot set and the index's log of changes that keeps it true.
"""

from __future__ import annotations

import os
from typing import Any

from contentcache.hash import Hash
from contentcache.hot import ENTRY_OVERHEAD, Found, HotSet
from contentcache.index import Entry, SQLiteDatabase
from contentcache.store import Blob


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


def test_changes_are_logged_for_every_write_but_a_touch(tmp_path: Any) -> None:
    db = SQLiteDatabase(os.path.join(str(tmp_path), "index.sqlite"))
    start = db.changes_since(None)
    assert start.keys == []
    blob = Blob(Hash.of(b"x"), 1)
    db.put("go", "a", blob, {}, 1.0)
    db.put("go", "a", blob, {"etag": "2"}, 2.0)  # replaced
    db.touch({("go", "a"): 3.0})  # an access changes nothing held
    db.put("npm", "b", blob, {}, 1.0)
    db.delete("npm", "b")
    changes = db.changes_since(start.position)
    assert changes.keys == [("go", "a"), ("go", "a"), ("npm", "b"), ("npm", "b")]
    assert db.changes_since(changes.position).keys == []


def test_changes_pruned_unseen_drop_everything(tmp_path: Any) -> None:
    db = SQLiteDatabase(os.path.join(str(tmp_path), "index.sqlite"))
    blob = Blob(Hash.of(b"x"), 1)
    db.put("go", "a", blob, {}, 1.0)
    seen = db.changes_since(None)
    db.put("go", "b", blob, {}, 1.0)
    db.put("go", "c", blob, {}, 1.0)
    db.prune_changes(keep=float("-inf"))  # all of it, b and c unseen
    db.put("go", "d", blob, {}, 1.0)
    changes = db.changes_since(seen.position)
    assert changes.keys is None  # cannot tell what changed: drop it all
    assert db.changes_since(changes.position).keys == []
    # A process starting now starts where the log is, even when pruned empty.
    db.prune_changes(keep=float("-inf"))
    fresh = db.changes_since(None)
    db.put("go", "e", blob, {}, 1.0)
    assert db.changes_since(fresh.position).keys == [("go", "e")]
