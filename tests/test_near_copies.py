"""A near cache's copies, on a fake clock and a stand-in tracker: no Manager, no sockets, no sleeping.

The table-level operations (``_lookup``, ``_put``, ``invalidate``) are called
as the tracker calls them, under its lock; ``get``/``get_many`` are driven by
a stand-in tracker whose replies and invalidations the test scripts (as the
Redis engine's tracker gets them), or whose stamps it moves (as a Manager's).
"""

import threading
from contextlib import contextmanager
from types import SimpleNamespace

import pytest

from django_clustershm.client.near import NearCache
from django_clustershm.wire import frames as P


class Clock:
    def __init__(self, now: float = 500.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class StandInTracker:
    """What NearCache uses of its Tracker: ``lock``, ``drain()``, ``session_id()``,
    ``fill()``, ``stamps`` and ``fetch``/``fetch_many`` (the Manager's TRACK_GET calls).

    ``replies`` are what the Manager answers, in order; ``on_call`` runs during
    a call (the round trip: move the clock, or have a push arrive, which the
    next ``drain()`` applies). ``fill`` keeps a miss as the Redis engine's
    tracker does: only if no invalidation came since its read (``seq``)."""

    reports_recent = False  # what RECENT does is tested against a Manager (test_near_cache.py)

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.sid = 7
        self.seq = 0
        self.live = True
        self.replies: list = []
        self.calls: list = []
        self.pushes: list = []  # (cache, key): invalidations on their way
        self.on_call = None
        self.stamps: list | None = None  # a Manager's stamps, for copies filled with one
        self.slots: dict = {}  # slot -> (token, data, deadline): what read_slot answers
        self.first_replies: list = []
        self.counted: list = []  # the slots count_read() counted

    def read_slot(self, slot, token):
        held = self.slots.get(slot)
        return None if held is None or held[0] != token else held[1:]

    def count_read(self, slot):
        self.counted.append(slot)

    def session_id(self):
        return self.sid

    def fetch(self, ns, key, sid):
        return self.call(P.TRACK_GET, [ns, key, sid])

    def fetch_many(self, ns, keys, sid):
        return self.call(P.TRACK_GET_MANY, [ns, keys, sid])

    def fetch_untracked(self, ns, key):
        return self.call(P.GET, [ns, key])

    def fetch_first(self, ns, key, sid):
        # A first read: ``first_replies`` holds a Manager's (a key with a slot
        # answers a stamp, one without False; then the key's mark, or None);
        # without them, a plain GET.
        if self.first_replies:
            self.calls.append((P.TRACK_GET, [ns, key, "first"]))
            if self.on_call is not None:
                self.on_call()
            return self.first_replies.pop(0)
        return self.fetch_untracked(ns, key), None, None, False, None

    def fetch_many_first(self, ns, keys, sid):
        return {k: (v, None) for k, v in self.fetch_many_untracked(ns, keys).items()}, None, False, None

    def fetch_many_untracked(self, ns, keys):
        return self.call(P.GET_MANY, [ns, keys])

    def drain(self, ns=None, wait=0.0) -> bool:
        assert self.lock.locked()  # always called under the tracker's lock
        for cache, key in self.pushes:
            self.seq += 1
            cache.invalidate(key)
        self.pushes = []
        return self.live

    def check_alive(self) -> None:
        pass  # (a Manager's tracker drops everything here once its file is dead: test_near_cache.py)

    def fill(self, sid, seq, tracked):
        self.drain()
        if self.sid != sid or (seq is not None and self.seq != seq):  # seq None: a stamped reply
            return False
        return tracked if type(tracked) is not bool else None

    def call(self, op, args):
        assert not self.lock.locked()  # never holds the lock over a round trip
        self.calls.append((op, args))
        if self.on_call is not None:
            self.on_call()
        return self.replies.pop(0)


@pytest.fixture
def clock():
    return Clock()


def make(clock, max_entries=100, max_bytes=10_000, tracker=None, policy="always"):
    return NearCache(tracker or StandInTracker(), "ns", max_entries, max_bytes, policy=policy, clock=clock)


@contextmanager
def held(cache):
    """The tracker's lock, under which the tracker reads and changes the copies."""
    with cache.tracker.lock:
        yield


def size(key: str, data) -> int:
    return len(key) + (len(data) if type(data) is bytes else 8)


# -- the copies ---------------------------------------------------------------------------


def test_put_and_lookup_count_bytes(clock):
    cache = make(clock)
    with held(cache):
        assert cache._lookup("k") is None
        cache._put("k", b"abc", None)
        cache._put("n", 42, None)
        assert cache._lookup("k") == b"abc" and cache._lookup("n") == 42
        assert len(cache) == 2 and cache.bytes == size("k", b"abc") + size("n", 42)
        cache._put("k", b"a longer value", None)  # replaces, and counts the new size only
        assert cache.bytes == size("k", b"a longer value") + size("n", 42)


def test_lru_by_entries(clock):
    cache = make(clock, max_entries=3)
    with held(cache):
        for key in "abc":
            cache._put(key, b"v", None)
        assert cache._lookup("a") == b"v"  # "a" is now the most recently used
        cache._put("d", b"v", None)  # over 3 entries: "b", the least recently used, goes
        assert list(cache._entries) == ["c", "a", "d"]
        assert cache.bytes == 3 * size("a", b"v")


def test_lru_by_bytes(clock):
    cache = make(clock, max_bytes=100)
    with held(cache):
        cache._put("a", b"x" * 39, None)  # 40 bytes
        cache._put("b", b"x" * 39, None)  # 80
        cache._lookup("a")
        cache._put("c", b"x" * 29, None)  # 110: "b" goes
        assert list(cache._entries) == ["a", "c"] and cache.bytes == 70
        cache._put("d", b"x" * 99, None)  # exactly 100 on its own: everything else goes
        assert list(cache._entries) == ["d"] and cache.bytes == 100


def test_a_value_too_large_to_keep_drops_the_old_copy(clock):
    cache = make(clock, max_bytes=100)
    with held(cache):
        cache._put("k", b"small", None)
        cache._put("other", b"kept", None)
        cache._put("k", b"x" * 100, None)  # 101 bytes with its key: never kept
        assert cache._lookup("k") is None  # and the old value is not left behind
        assert list(cache._entries) == ["other"] and cache.bytes == size("other", b"kept")


def test_expiry_by_the_clock(clock):
    cache = make(clock)
    with held(cache):
        cache._put("k", b"v", clock.now + 10)
        cache._put("forever", b"v", None)
        clock.now += 9.999
        assert cache._lookup("k") == b"v"
        clock.now += 0.001  # the deadline itself is expired
        assert cache._lookup("k") is None
        assert "k" not in cache._entries and cache.bytes == size("forever", b"v")  # dropped, not only hidden
        clock.now += 10**9
        assert cache._lookup("forever") == b"v"


def test_invalidate_one_and_all(clock):
    cache = make(clock)
    with held(cache):
        for key in "abc":
            cache._put(key, b"v", None)
        cache.invalidate("b")
        cache.invalidate("missing")  # nothing to drop: no error
        assert list(cache._entries) == ["a", "c"] and cache.bytes == 2 * size("a", b"v")
        cache.invalidate(None)  # a clear of the namespace, or a lost tracker
        assert len(cache) == 0 and cache.bytes == 0


# -- stamps (a Manager's near cache) ---------------------------------------------------------


def test_a_copy_answers_while_its_bucket_holds_its_stamp(clock):
    cache = make(clock)
    tracker = cache.tracker
    tracker.stamps = [0] * 8
    with held(cache):
        cache._put("k", b"v", None, (3, 0, -1, 0))
        cache._put("other", b"w", None, (5, 0, -1, 0))
        assert cache._lookup("k") == b"v"
        tracker.stamps[3] = 1  # "k", or another key of its bucket, changed in the Manager
        assert cache._lookup("k") is None and "k" not in cache._entries  # dropped, not only hidden
        assert cache.invalidated == 1 and cache.bytes == size("other", b"w")
        assert cache._lookup("other") == b"w"  # another bucket: still answers
        tracker.stamps = None  # the tracker lost its file (it empties the copies too)
        assert cache._lookup("other") is None


def test_a_miss_keeps_the_stamp_its_reply_carried(clock):
    cache = make(clock)
    tracker = cache.tracker
    tracker.stamps = [0] * 8
    tracker.replies = [(b"v", None, None, (2, 7, -1, 0))]
    assert cache.get("k") == b"v" and cache._entries["k"][3] == (2, 7, -1, 0)
    tracker.replies = [(b"v2", None, None, (2, 0, -1, 0))]
    assert cache.get("k") == b"v2"  # bucket 2 holds 0, not 7 (moved on since): stale, asked again
    assert (cache.hits, cache.misses, cache.invalidated) == (0, 2, 1)
    assert cache.get("k") == b"v2" and cache.hits == 1  # kept with (2, 0): a hit
    tracker.stamps[4] = 9
    tracker.replies = [({"a": (b"A", None)}, None, {"a": (4, 9, -1, 0)})]
    assert cache.get_many(["a"]) == {"a": b"A"} and cache._entries["a"][3] == (4, 9, -1, 0)
    assert cache.get_many(["a"]) == {"a": b"A"} and cache.hits == 2  # its bucket held 9: a hit


def test_a_stale_copy_with_a_value_slot_is_refilled_from_it(clock):
    cache = make(clock)
    tracker = cache.tracker
    tracker.stamps = [0] * 8
    tracker.slots = {5: (11, b"new", float("inf"))}
    with held(cache):
        cache._put("k", b"old", None, (3, 0, 5, 11))
        tracker.stamps[3] = 4  # "k" changed in the Manager: the slot holds its value
        assert cache._lookup("k") == b"new" and tracker.calls == []  # no round trip
        # Kept with the new stamp, and marked as having answered a read.
        assert cache._entries["k"] == [b"new", None, size("k", b"new"), (3, 4, 5, 11), True]
        assert (cache.refreshed, cache.invalidated, cache.bytes) == (1, 0, size("k", b"new"))
        assert tracker.counted == [5]  # a read the Manager weighs against the slot's rewrites
        assert cache._lookup("k") == b"new" and cache.refreshed == 1  # the stamp holds: a plain hit
        # A deadline comes from the slot (the Manager's own) and is honoured.
        tracker.slots[5] = (11, 42, clock.now + 1)
        tracker.stamps[3] = 5
        assert cache._lookup("k") == 42 and cache._entries["k"][1] == clock.now + 1
        clock.now += 1
        assert cache._lookup("k") is None and "k" not in cache._entries
        # A slot that went to another key (another token), or is missing: the copy goes.
        cache._put("k", b"v", None, (3, 5, 5, 11))
        tracker.slots[5] = (12, b"someone else's", float("inf"))
        tracker.stamps[3] = 6
        assert cache._lookup("k") is None and cache.invalidated == 1 and cache.refreshed == 2
        cache._put("k", b"v", None, (3, 6, 6, 13))
        tracker.stamps[3] = 7
        assert cache._lookup("k") is None and cache.invalidated == 2
        # A value larger than the budget is not kept.
        cache._put("k", b"v", None, (3, 7, 5, 12))
        tracker.slots[5] = (12, b"x" * (cache.max_bytes + 1), float("inf"))
        tracker.stamps[3] = 8
        assert cache._lookup("k") is None and cache.bytes == 0 and cache.invalidated == 3


def test_a_key_read_only_from_its_slot_is_reported_at_least_every_recent_every(clock):
    """The Manager frees a slot no fill or RECENT named for SLOT_IDLE seconds:
    a refill reports its key once RECENT_EVERY has passed, whatever the hits."""
    from django_clustershm.client.near import RECENT_EVERY

    cache = make(clock)
    tracker = cache.tracker
    tracker.reports_recent = True
    posts = []
    tracker.channel = SimpleNamespace(post=lambda op, args: posts.append((op, args)))
    tracker.stamps = [0] * 8
    tracker.slots = {5: (11, b"v1", float("inf"))}
    with held(cache):
        cache._put("k", b"v0", None, (3, 0, 5, 11))
        cache._report_due = clock.now + RECENT_EVERY
        tracker.stamps[3] = 1
        assert cache._lookup("k") == b"v1" and posts == []  # not due yet
        clock.now += RECENT_EVERY
        tracker.stamps[3] = 2
        assert cache._lookup("k") == b"v1"
        assert posts == [(P.RECENT, ["ns", 0, ["k"]])]  # due: reported at once, not at the 64th hit
        assert cache._report_due == clock.now + RECENT_EVERY


# -- reads through the tracker ---------------------------------------------------------------


def test_a_miss_fills_the_copy_with_a_deadline_from_before_the_request(clock):
    cache = make(clock)
    tracker = cache.tracker
    tracker.replies = [(b"v", 10.0, 0, True)]  # data, ttl, the tracker's push count, tracked

    def round_trip():
        clock.now += 0.5

    tracker.on_call = round_trip
    sent = clock.now
    assert cache.get("k") == b"v"
    assert tracker.calls == [(P.TRACK_GET, ["ns", "k", 7])]
    assert cache._entries["k"][1] == sent + 10.0  # never later than the Manager's deadline
    assert cache.get("k") == b"v" and len(tracker.calls) == 1  # a hit
    assert (cache.hits, cache.misses) == (1, 1)
    clock.now = sent + 10.0
    tracker.replies = [(None, None, 0, True)]
    assert cache.get("k") is None  # expired here: asked again
    assert (cache.hits, cache.misses) == (1, 2) and len(cache) == 0


def test_a_fill_raced_by_a_push_is_not_kept(clock):
    cache = make(clock)
    tracker = cache.tracker
    tracker.replies = [(b"old", None, 0, True)]  # the Manager had sent 0 pushes when it answered
    tracker.on_call = lambda: tracker.pushes.append((cache, "k"))  # then invalidated "k"
    assert cache.get("k") == b"old"  # this read's answer...
    assert len(cache) == 0  # ...is not kept: a later write may already have changed it
    tracker.on_call = None
    tracker.replies = [(b"new", None, 1, True)]
    assert cache.get("k") == b"new" and len(cache) == 1  # the push count matches now: kept
    assert cache.get("k") == b"new" and (cache.hits, cache.misses) == (1, 2)


def test_an_untracked_or_missing_value_is_not_kept(clock):
    cache = make(clock)
    tracker = cache.tracker
    tracker.replies = [(b"v", None, 0, False), (None, None, 0, True)]  # the Manager's table is full; a miss
    assert cache.get("k") == b"v" and cache.get("k2") is None
    assert len(cache) == 0 and (cache.hits, cache.misses) == (0, 2)


def test_copies_are_not_answered_without_a_live_tracker(clock):
    cache = make(clock)
    tracker = cache.tracker
    with held(cache):
        cache._put("k", b"stale?", None)
    tracker.live = False  # channel lost (the tracker empties the caches too; here it did not yet)
    tracker.replies = [(b"fresh", None, 0, True)]
    assert cache.get("k") == b"fresh" and (cache.hits, cache.misses) == (0, 1)


def test_invalidations_are_applied_before_a_hit(clock):
    cache = make(clock)
    tracker = cache.tracker
    with held(cache):
        cache._put("k", b"v1", None)
        cache._put("gone", b"v1", None)
    tracker.pushes = [(cache, "gone")]
    tracker.replies = [(None, None, 1, True)]
    assert cache.get("k") == b"v1" and cache.get("gone") is None
    assert (cache.hits, cache.misses) == (1, 1)


def test_get_many_hits_and_fills(clock):
    cache = make(clock)
    tracker = cache.tracker
    with held(cache):
        cache._put("a", b"A", None)
    tracker.on_call = lambda: setattr(clock, "now", clock.now + 1.0)
    sent = clock.now
    tracker.replies = [({"b": (b"B", 5.0), "c": (3, None)}, 0, True)]  # "d" does not exist
    assert cache.get_many(["a", "b", "c", "d"]) == {"a": b"A", "b": b"B", "c": 3}
    assert tracker.calls == [(P.TRACK_GET_MANY, ["ns", ["b", "c", "d"], 7])]  # only the misses
    assert (cache.hits, cache.misses) == (1, 3)
    assert cache._entries["b"][1] == sent + 5.0 and cache._entries["c"][1] is None
    assert cache.get_many(["a", "b", "c"]) == {"a": b"A", "b": b"B", "c": 3}
    assert len(tracker.calls) == 1 and (cache.hits, cache.misses) == (4, 3)


# -- the adaptive policy (the default, #19) ---------------------------------------------------


def test_adaptive_keeps_a_copy_from_the_second_read(clock):
    cache = make(clock, policy="adaptive")
    tracker = cache.tracker
    tracker.replies = [b"V", (b"V", None, 0, True)]
    assert cache.get("k") == b"V"  # first read: plain, nothing kept, nothing tracked
    assert tracker.calls[-1] == (P.GET, ["ns", "k"]) and len(cache) == 0 and cache.untracked == 1
    assert cache.get("k") == b"V"  # second read: tracked, kept
    assert tracker.calls[-1] == (P.TRACK_GET, ["ns", "k", 7]) and len(cache) == 1
    assert cache.get("k") == b"V" and len(tracker.calls) == 2  # then a hit
    assert (cache.hits, cache.misses, cache.untracked) == (1, 2, 1)


def test_adaptive_keeps_a_first_read_of_a_key_another_process_keeps(clock):
    """A key with a value slot is read through another process's near cache:
    hot in the cluster, so a first read keeps its copy at once."""
    cache = make(clock, policy="adaptive")
    tracker = cache.tracker
    tracker.stamps = [0] * 8
    tracker.first_replies = [(b"V", None, None, (2, 0, 5, 9), (2, 0)), (b"W", None, None, False, (3, 0))]
    assert cache.get("hot") == b"V" and tracker.calls[-1] == (P.TRACK_GET, ["ns", "hot", "first"])
    assert cache._entries["hot"][3] == (2, 0, 5, 9) and "hot" not in cache._seen and cache.untracked == 0
    assert cache.get("hot") == b"V" and len(tracker.calls) == 1  # a hit
    assert cache.get("cold") == b"W" and "cold" not in cache._entries and "cold" in cache._seen
    assert (cache.hits, cache.misses, cache.untracked) == (1, 2, 1)


def test_adaptive_remembers_at_most_max_entries_first_reads(clock):
    cache = make(clock, max_entries=3, policy="adaptive")
    tracker = cache.tracker
    tracker.replies = [b"V"] * 5 + [(b"V", None, 0, True)]
    for key in ["a", "b", "c", "d"]:  # a scan: each key read once
        cache.get(key)
    assert list(cache._seen) == ["b", "c", "d"]  # "a" forgotten: bounded like the copies
    cache.get("a")  # so a first read again, untracked
    assert tracker.calls[-1][0] == P.GET and len(cache) == 0
    cache.get("c")  # "c" was remembered: tracked now
    assert tracker.calls[-1][0] == P.TRACK_GET


def test_adaptive_an_invalidated_copy_is_kept_again_at_its_next_read(clock):
    cache = make(clock, policy="adaptive")
    tracker = cache.tracker
    tracker.replies = [b"V", (b"V", None, 0, True)]
    cache.get("k")
    cache.get("k")
    assert cache.get("k") == b"V" and cache.hits == 1  # the copy answered a read
    tracker.pushes.append((cache, "k"))  # written, deleted, touched, expired in the Manager
    tracker.replies = [(b"X", None, 1, True)]
    assert cache.get("k") == b"X" and tracker.calls[-1][0] == P.TRACK_GET and len(cache) == 1


def test_adaptive_a_copy_invalidated_before_it_answered_goes_back_to_a_first_read(clock):
    """Its fill was wasted: the key changed before a read here used it."""
    cache = make(clock, policy="adaptive")
    tracker = cache.tracker
    tracker.replies = [b"V", (b"V", None, 0, True)]
    cache.get("k")
    cache.get("k")  # kept, never read
    tracker.pushes.append((cache, "k"))
    tracker.replies = [b"X", (b"X", None, 1, True)]
    assert cache.get("k") == b"X" and tracker.calls[-1][0] == P.GET and len(cache) == 0  # a first read
    assert cache.invalidated == 1 and cache.untracked == 2
    assert cache.get("k") == b"X" and tracker.calls[-1][0] == P.TRACK_GET and len(cache) == 1  # then kept


def test_adaptive_keeps_a_second_read_only_if_the_key_did_not_change_since_the_first(clock):
    """The first read notes the (bucket, stamp) its reply carried; the second
    keeps a copy only if the bucket holds that stamp still."""
    cache = make(clock, policy="adaptive")
    tracker = cache.tracker
    tracker.stamps = [0] * 8
    tracker.first_replies = [(b"V", None, None, False, (2, 0))]
    assert cache.get("k") == b"V" and cache._seen["k"] == (2, 0) and len(cache) == 0
    tracker.stamps[2] = 1  # "k" changed since: a copy kept at the first read would not answer now
    tracker.first_replies = [(b"W", None, None, False, (2, 1))]
    assert cache.get("k") == b"W" and tracker.calls[-1] == (P.TRACK_GET, ["ns", "k", "first"])
    assert len(cache) == 0 and cache.declined == 1 and cache._seen["k"] == (2, 1)  # a new mark
    tracker.replies = [(b"W", None, None, (2, 1, -1, 0))]
    assert cache.get("k") == b"W" and tracker.calls[-1] == (P.TRACK_GET, ["ns", "k", 7])  # unchanged: kept
    assert cache._entries["k"][3] == (2, 1, -1, 0) and "k" not in cache._seen and cache.declined == 1
    assert cache.get("k") == b"W" and cache.hits == 1
    # A mark taken on an earlier connection (whose buckets may be another Manager's) is not kept.
    tracker.first_replies = [(b"Z", None, None, False, (5, 0))]
    tracker.on_call = lambda: setattr(tracker, "sid", 8)
    assert cache.get("z") == b"Z" and cache._seen["z"] is None


def test_adaptive_get_many_is_one_request_tracked_if_any_key_is_admitted(clock):
    cache = make(clock, policy="adaptive")
    tracker = cache.tracker
    tracker.replies = [{"a": b"A", "b": b"B"}]
    assert cache.get_many(["a", "b"]) == {"a": b"A", "b": b"B"}
    assert tracker.calls[-1] == (P.GET_MANY, ["ns", ["a", "b"]]) and len(cache) == 0
    tracker.replies = [({"a": (b"A", None), "c": (b"C", None)}, 0, True)]
    assert cache.get_many(["a", "c"]) == {"a": b"A", "c": b"C"}  # "a" read before: tracked, both kept
    assert tracker.calls[-1][0] == P.TRACK_GET_MANY and set(cache._entries) == {"a", "c"}


def test_adaptive_rests_while_invalidations_outnumber_hits_then_keeps_copies_again(clock, monkeypatch):
    import django_clustershm.client.near as near_module

    monkeypatch.setattr(near_module, "JUDGE_EVERY", 16)
    cache = make(clock, policy="adaptive")
    cache._judge_at = 16
    tracker = cache.tracker
    tracked = lambda key: (key.encode(), None, tracker.seq, True)  # noqa: E731

    def read_twice(key):  # a first (plain) read, then a kept one
        tracker.replies = [key.encode()]
        cache.get(key)  # (applies the pushes before it)
        tracker.replies = [tracked(key)]
        cache.get(key)

    # Written here or elsewhere as often as read: every copy is invalidated before it is read again.
    for i in range(8):
        read_twice(f"w{i}")
        tracker.pushes.append((cache, f"w{i}"))
    # Weighed at the 16th miss: 7 copies invalidated, no hit: the copies rest.
    assert cache.invalidated >= 7 and cache.hits == 0
    assert cache.rests == 1 and len(cache) == 0
    tracker.replies = [b"k", b"k", b"k"]
    misses = cache.misses
    for _ in range(3):
        assert cache.get("k") == b"k"
    assert [op for op, _ in tracker.calls[-3:]] == [P.GET] * 3 and len(cache) == 0  # plain reads, no copy
    assert (cache.rest_reads, cache.misses) == (3, misses)  # counted apart: they skipped the lock and the copies
    clock.now += near_module.REST_FOR
    read_twice("k")  # rested: its second read keeps a copy again
    assert tracker.calls[-1][0] == P.TRACK_GET and len(cache) == 1
    # Read far more than written: no rest.
    for _ in range(40):
        assert cache.get("k") == b"k"
    tracker.replies = [b"y"] * 16
    for i in range(16):
        cache.get(f"once{i}")
    assert cache.rests == 1


def test_adaptive_rests_twice_as_long_when_it_must_rest_again_at_once(clock, monkeypatch):
    import django_clustershm.client.near as near_module

    monkeypatch.setattr(near_module, "JUDGE_EVERY", 16)
    cache = make(clock, policy="adaptive")
    cache._judge_at = 16
    tracker = cache.tracker
    tracked = lambda key: (key.encode(), None, tracker.seq, True)  # noqa: E731

    def write_heavy_window(tag):  # 16 misses whose copies are all invalidated before a hit
        for i in range(8):
            tracker.replies = [b"v"]
            cache.get(f"{tag}{i}")  # first read: plain (it applies the invalidations before it)
            tracker.replies = [tracked(f"{tag}{i}")]
            cache.get(f"{tag}{i}")  # second: kept
            tracker.pushes.append((cache, f"{tag}{i}"))
        tracker.replies = [b"v"]
        cache.get(f"{tag}-judged")  # the miss at which the window is weighed

    def resting_for() -> float:
        return cache._resting - clock.now

    write_heavy_window("a")
    assert cache.rests == 1 and resting_for() == near_module.REST_FOR
    clock.now = cache._resting  # the rest is over
    write_heavy_window("b")
    assert cache.rests == 2 and resting_for() == 2 * near_module.REST_FOR  # again at once: twice as long
    for n in range(3, 8):
        clock.now = cache._resting
        write_heavy_window(f"c{n}")
    assert cache.rests == 7 and resting_for() == near_module.MAX_REST_FOR  # doubled up to the cap
    clock.now = cache._resting
    tracker.replies = [b"k"]
    cache.get("k")
    tracker.replies = [tracked("k")]
    cache.get("k")
    for _ in range(40):  # read far more than written: no rest, and the next one is short again
        assert cache.get("k") == b"k"
    tracker.replies = [b"y"] * 20
    for i in range(20):
        cache.get(f"once{i}")
    assert cache.rests == 7 and cache._rest_for == near_module.REST_FOR


def test_adaptive_declined_second_reads_weigh_toward_a_rest(clock, monkeypatch):
    """A declined second read is a fill that would have been wasted: it weighs as an invalidation does."""
    import django_clustershm.client.near as near_module

    monkeypatch.setattr(near_module, "JUDGE_EVERY", 16)
    cache = make(clock, policy="adaptive")
    cache._judge_at = 16
    tracker = cache.tracker
    tracker.stamps = [0] * 8
    for i in range(15):  # each key changes between its two reads here
        tracker.first_replies = [(b"v", None, None, False, (1, tracker.stamps[1]))]
        assert cache.get(f"k{i % 8}") == b"v"
        tracker.stamps[1] += 1
    assert (cache.declined, cache.invalidated, cache.hits, cache.rests, len(cache)) == (7, 0, 0, 0, 0)
    tracker.first_replies = [(b"v", None, None, False, (1, tracker.stamps[1]))]
    cache.get("k7")  # the 16th miss: weighed, 7 wasted against no hit
    assert cache.rests == 1 and cache._resting > clock.now
    tracker.replies = [b"v"]
    assert cache.get("k0") == b"v" and tracker.calls[-1] == (P.GET, ["ns", "k0"])  # resting: a plain read
