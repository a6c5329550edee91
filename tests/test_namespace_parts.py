"""A namespace past SPLIT_AT keys keeps its entries in PARTS dicts (#12).

One dict of millions of keys stalls the Manager's loop whenever it grows (a
resize copies it whole: 110 ms at 2.8M keys); a part holds 1/PARTS of the
keys, so that no resize copies more. The thresholds are lowered here (a split
at 64 keys into 16 parts) so that a few thousand keys exercise the layout:
every answer must be the one a single dict gives, compared operation by
operation; a cache's order of use becomes approximate across parts, so its
evictions and culls must still take the least recently used.
"""

import random
import sys

import pytest

from django_clustershm.server.namespace import INF, Namespace, _unpack

from .test_namespace import FakeClock


@pytest.fixture
def small_parts(monkeypatch):
    monkeypatch.setattr(Namespace, "SPLIT_AT", 64)
    monkeypatch.setattr(Namespace, "PARTS", 16)


def make(kind: str, clock, max_bytes: int = 2**40, split: bool = True) -> Namespace:
    space = Namespace.store(max_bytes, clock=clock) if kind == "store" else Namespace.cache(max_bytes, clock=clock)
    if not split:
        space._split_at = sys.maxsize  # the reference: one dict, as it always was
    return space


def values(space: Namespace) -> dict:
    return {key: _unpack(stored) for key, stored in space.entries()}


@pytest.mark.parametrize("kind", ["store", "cache"])
def test_a_namespace_splits_past_split_at_and_every_key_lives_in_its_part(small_parts, kind):
    space = make(kind, FakeClock())
    for i in range(64):
        space.set(f"k{i}", b"v")
    assert len(space.parts) == 1 and space.mask == 0
    space.set("k64", b"v", 30)
    assert len(space.parts) == 16 and space.mask == 15
    for i in range(65, 5000):
        space.set(f"k{i}", b"v", 30 if i % 2 else None)
    for index, part in enumerate(space.parts):
        assert all(hash(key) & 15 == index for key in part)
    assert sum(map(len, space.parts)) == len(space) == 5000 == len(space.keys())
    # What a resize copies: one part, about 1/16 of the keys (hashes spread them evenly).
    assert max(map(len, space.parts)) <= 2 * 5000 / 16
    assert (
        space.get("k64") == b"v"
        and space.ttl("k64") == 30
        and space.deadline("k65") == 1030
        and space.deadline("k66") is None
    )
    assert space.clear() == 5000
    assert len(space.parts) == 1 and len(space) == 0 and space.bytes == 0 and space.timed == 0


@pytest.mark.parametrize("kind", ["store", "cache"])
def test_a_split_namespace_answers_as_one_dict_does(small_parts, kind):
    """The same random operations on a namespace that splits and one that
    never does: every answer, the size, the bytes, the timed count, the
    entries and the wheel's references stay the same (nothing is evicted:
    order of use aside, the two are one semantics)."""
    rng = random.Random(kind)
    clock = FakeClock()
    split, one = make(kind, clock), make(kind, clock, split=False)
    bounds = None if kind == "store" else [10**9, 3, 2**40]
    keys = [f"k{i}" for i in range(400)]
    split_steps = 0
    for step in range(12_000):
        key, op = rng.choice(keys), rng.randrange(14)
        ttl = rng.choice([None, None, 1.0, 10.0])
        if op == 13 and rng.random() >= 0.02:
            op = 0  # a clear now and then only
        batch, doomed = rng.sample(keys, 5), rng.sample(keys, 5)
        answers = []
        for space in (split, one):
            if op == 0:
                result = space.set(key, b"v%d" % step, ttl, bounds)
            elif op == 1:
                result = space.add(key, b"a", ttl, bounds)
            elif op == 2:
                result = space.remove(key)
            elif op == 3:
                result = space.get(key)
            elif op == 4:
                result = space.touch(key, ttl)
            elif op == 5:
                value = space.get(key)
                result = space.incr(key, 1, 0, bounds) if value is None or type(value) is int else 0
            elif op == 6:
                result = sorted(space.reap())
            elif op == 7:
                result = space.has(key)
            elif op == 8:
                result = space.expiry(key)
            elif op == 9:
                result = (space.persist(key), space.replace(key, b"r", ttl, bounds))
            elif op == 10:
                space.set_many({k: b"m" for k in batch}, ttl, bounds)
                result = space.get_many(batch)
            elif op == 11:
                result = space.delete_many(doomed)
            elif op == 12:
                result = sorted(space.keys("k1"))
            else:
                result = space.clear()
            answers.append(result)
        assert answers[0] == answers[1], (step, op, key)
        assert (len(split), split.bytes, split.timed) == (len(one), one.bytes, one.timed), step
        assert split.wheel.refs == one.wheel.refs
        if step % 200 == 0:
            assert values(split) == values(one)
            assert sum(map(len, split.parts)) == len(split)
        split_steps += len(split.parts) == 16
        clock.now += rng.choice([0, 0, 0.4])
    assert split_steps > 6000 and values(split) == values(one)


def test_a_split_cache_evicts_and_culls_its_least_recently_used(small_parts):
    """Across parts the order of use is approximate (a fair share from the
    front of every part), but with half the keys read since they were
    written, what goes to make room is only ever the other half."""
    clock = FakeClock()
    size = make("cache", clock).entry_cost("k0000", b"x" * 50, expires=True)
    cache = make("cache", clock, max_bytes=4000 * size)
    keys = [f"k{i:04d}" for i in range(4000)]
    for key in keys:
        cache.set(key, b"x" * 50, 300)
    hot = set(keys[::2])
    for key in keys[::2]:
        assert cache.get(key) == b"x" * 50
    for i in range(1000):  # no room: each write evicts
        cache.set(f"new{i:04d}", b"x" * 50, 300)
    gone = set(keys) - set(cache.keys())
    assert 1000 <= len(gone) <= 1100 and cache.evictions == len(gone)
    assert not gone & hot, "a recently used key was evicted"
    assert cache.bytes <= cache.max_bytes and len(cache.parts) == 16
    # Django's MAX_ENTRIES: a full cache culls len // CULL_FREQUENCY, the least recently used.
    cache = make("cache", clock)
    for key in keys:
        cache.set(key, b"x" * 50, 300)
    for key in keys[::2]:
        cache.get(key)
    cache.set("last", b"x", 300, [len(cache), 4, 2**40])
    culled = set(keys) - set(cache.keys())
    assert len(culled) == 1000 and not culled & hot and cache.get("last") == b"x"


def test_a_split_cache_survives_a_snapshot_with_its_order_of_use(small_parts):
    """snapshot_batches gives the parts' entries in their approximate order
    of use; a restore puts them back in that order (splitting as it goes),
    the entries it already had last."""
    clock = FakeClock()
    cache = make("cache", clock)
    keys = [f"k{i:04d}" for i in range(3000)]
    for key in keys:
        cache.set(key, b"v" + key.encode(), 300 if key.endswith("1") else None)
    hot = set(keys[::2])
    for key in keys[::2]:
        cache.get(key)
    batches = list(cache.snapshot_batches(max_entries=100))
    into = make("cache", clock)
    into.set("k0001", b"newer")
    into.set("extra", b"e")
    counts = into.restore(batches)
    assert counts == {"restored": 2999, "expired": 0, "left_out": 0, "newer": 1}
    assert len(into.parts) == 16 and len(into) == 3001
    expected = values(cache) | {"k0001": (b"newer", INF), "extra": (b"e", INF)}
    got = values(into)
    assert got.keys() == expected.keys()
    for key, (value, deadline) in expected.items():
        assert got[key][0] == value and (got[key][1] == deadline if deadline == INF else got[key][1] > clock.now)
    assert into.timed == cache.timed - 1 and into.wheel.refs == into.timed
    assert into.bytes == sum(into._cost(key, stored) for key, stored in into.entries())
    before = set(into.keys())
    into.set("last", b"x", None, [len(into), 3, 2**40])
    culled = before - set(into.keys())
    assert len(culled) == len(before) // 3 and not culled & (hot | {"k0001", "extra"})


def test_a_namespace_frozen_for_a_scan_splits_only_once_thawed(small_parts):
    clock = FakeClock()
    space = make("store", clock)
    for i in range(60):
        space.set(f"k{i}", b"v")
    copy = space.freeze()
    for i in range(60, 200):
        space.set(f"k{i}", b"v")
    assert space.frozen and len(space.parts) == 1 and len(space) == 200
    assert sorted(copy) == sorted(f"k{i}" for i in range(60))  # the keys of the moment it froze
    space.thaw()
    assert len(space.parts) == 1  # nothing written since
    space.set("after", b"v")
    assert len(space.parts) == 16 and len(space) == 201 == len(space.keys())
    # A split namespace freezes part by part, and its copy walks them all.
    copy = space.freeze()
    space.remove("k0")
    space.set("during", b"v")
    assert sorted(copy) == sorted([f"k{i}" for i in range(200)] + ["after"])
    assert space.get("k0") is None and space.get("during") == b"v" and len(space) == 201
    space.thaw()
    assert all(type(part) is dict for part in space.parts)
    assert space.get("k0") is None and space.get("during") == b"v" and len(space) == 201 == len(space.keys())
