"""Near caches: worker-local reads that never return a value older than a completed write."""

import socket
import time

import pytest
from django.core.cache import caches
from django.test import override_settings

import django_clustershm as clustershm
from django_clustershm import registry as conf
from django_clustershm.client.near import MAX_UNREAD_UPDATES, PUSH_LIMIT
from django_clustershm.exceptions import ArgumentTypeError
from django_clustershm.server.engine import NO_REPLY, Engine
from django_clustershm.wire import frames as P

from .helpers import fork_call, reap, run_forked, wait_until
from .test_manager import _handshaked_socket

NEAR = {"BACKEND": "django_clustershm.cache.ClusterShmCache", "LOCATION": "near",
        "OPTIONS": {"NEAR_CACHE": {"MAX_ENTRIES": 1000, "MAX_BYTES": 1 << 20, "POLICY": "always"}}}  # fmt: skip
CACHES = {"default": NEAR, "v2": {**NEAR, "VERSION": 2}, "plain": {**NEAR, "OPTIONS": {"NEAR_CACHE": False}}}


BIG = "x" * (PUSH_LIMIT + 1)


def near():
    return clustershm.get_client()._near["near"]


def counts(ns: str = "near") -> tuple[int, int]:
    """(hits, misses) of this process's near cache of ``ns``; fails if there is none.

    The tests below check these and not only the values read: every value
    would be the same with no near cache at all (each read a round trip)."""
    stats = clustershm.near_stats()
    assert ns in stats, f"no near cache for {ns!r} in this process: {stats}"
    return stats[ns]["hits"], stats[ns]["misses"]


@override_settings(CACHES=CACHES)
def test_hits_are_local_and_fresh_objects(cluster):
    cache = caches["default"]
    cache.set("k", {"list": [1]})
    first = cache.get("k")
    ops = clustershm.stats()["ops"]
    for _ in range(50):
        got = cache.get("k")
        assert got == {"list": [1]}
        got["list"].append(2)  # the caller may mutate what it gets
    assert clustershm.stats()["ops"] == ops + 1  # 50 hits, no round trip (the +1 is this stats call)
    assert near().hits >= 50 and first is not got
    stats = clustershm.near_stats()["near"]
    assert stats["hits"] >= 50 and stats["entries"] == 1 and stats["bytes"] > 0


@override_settings(CACHES=CACHES)
def test_a_write_in_another_process_is_seen_at_once(cluster):
    cache = caches["default"]
    cache.set("k", 1)
    assert cache.get("k") == 1 and cache.get("k") == 1  # now held locally
    assert counts() == (1, 1)  # a miss, then a hit

    def writer():
        caches["default"].set("k", 2)

    assert reap(fork_call(writer), 10) == 0
    assert cache.get("k") == 2  # the writer's call returned, so its push was already here
    assert counts() == (2, 1)  # answered locally, from the pushed value: no round trip


@override_settings(CACHES=CACHES)
def test_writes_elsewhere_update_the_local_copy_without_a_miss(cluster):
    cache = caches["default"]
    cache.set_many({"k": 1, "n": 1, "t": "old"})
    assert cache.get_many(["k", "n", "t"]) == {"k": 1, "n": 1, "t": "old"}  # now all held locally
    misses = near().misses

    def writer():
        c = caches["default"]
        c.set("k", {"v": 2})
        c.incr("n", 41)
        c.set("t", "short-lived", 0.5)

    before = time.monotonic()
    assert reap(fork_call(writer), 10) == 0
    assert cache.get("k") == {"v": 2} and cache.get("n") == 42 and cache.get("t") == "short-lived"
    assert near().misses == misses  # the new values were pushed: no round trip
    # The pushed expiry is the Manager's own deadline, not one restarted here.
    deadline = near()._entries[cache.make_key("t")][1]
    assert before < deadline <= time.monotonic() + 0.5
    wait_until(lambda: cache.get("t") is None, timeout=5, message="expiry of the pushed copy")


@override_settings(CACHES=CACHES)
def test_a_value_over_the_push_limit_is_invalidated_not_pushed(cluster):
    cache = caches["default"]
    cache.set("big", "small")
    assert cache.get("big") == "small"
    misses = near().misses

    def writer():
        caches["default"].set("big", BIG)

    assert reap(fork_call(writer), 10) == 0
    assert cache.get("big") == BIG
    assert near().misses == misses + 1  # invalidated, then read again from the Manager


@override_settings(CACHES={"default": {**NEAR, "OPTIONS": {"NEAR_CACHE": {"MAX_BYTES": 4096, "POLICY": "always"}}}})
def test_a_pushed_value_too_large_for_the_near_cache_drops_the_old_copy(cluster):
    cache = caches["default"]
    cache.set("k", "small")
    assert cache.get("k") == "small" and cache.get("k") == "small"  # held locally
    large = "y" * 10_000  # pushed (under PUSH_LIMIT) but over this near cache's MAX_BYTES

    def writer():
        caches["default"].set("k", large)

    assert reap(fork_call(writer), 10) == 0
    assert cache.get("k") == large
    assert cache.make_key("k") not in near()._entries


@override_settings(CACHES={"default": {**NEAR, "OPTIONS": {"NEAR_CACHE": {"MAX_ENTRIES": 2, "POLICY": "always"}}}})
def test_a_key_evicted_locally_stops_being_pushed(cluster):
    cache = caches["default"]
    cache.set_many({"a": 1, "b": 1, "c": 1})
    for key in "abc":
        assert cache.get(key) == 1  # "a" is evicted from the near cache by "c"
    assert clustershm.stats()["near_cache_tracking"] == 3

    def writer():
        caches["default"].set("a", 2)  # pushed once; this process answers UNTRACK

    assert reap(fork_call(writer), 10) == 0
    assert cache.get("b") == 1  # a read applies the push (and sends UNTRACK)
    wait_until(lambda: clustershm.stats()["near_cache_tracking"] == 2, message="the Manager forgetting 'a'")
    assert cache.get("a") == 2  # a miss, tracked again
    assert clustershm.stats()["near_cache_tracking"] == 3


@override_settings(CACHES=CACHES)
def test_a_key_updated_again_and_again_without_a_read_stops_being_pushed(cluster):
    cache = caches["default"]
    cache.set_many({"hot": 0, "other": 0})
    assert cache.get("hot") == 0 and cache.get("other") == 0  # both held locally
    assert clustershm.stats()["near_cache_tracking"] == 2

    def writer():
        for i in range(1, MAX_UNREAD_UPDATES + 2):
            caches["default"].set("hot", i)  # never read here in between

    assert reap(fork_call(writer), 10) == 0
    assert cache.get("other") == 0  # a read applies the pushes: the last one drops "hot"
    assert cache.make_key("hot") not in near()._entries
    wait_until(lambda: clustershm.stats()["near_cache_tracking"] == 1, message="the Manager forgetting 'hot'")
    misses = near().misses
    assert cache.get("hot") == MAX_UNREAD_UPDATES + 1 and near().misses == misses + 1  # read again

    def writer2():
        caches["default"].set("hot", -1)

    assert cache.get("hot") == MAX_UNREAD_UPDATES + 1  # a hit now: reads reset the count
    assert reap(fork_call(writer2), 10) == 0
    assert cache.get("hot") == -1 and near().misses == misses + 1  # pushed, kept, no miss


def test_untrack_keeps_a_record_read_again_after_the_push():
    """UNTRACK races a new read of the same key: the Manager forgets the record only
    if the tracker had not read the key again after the push it answers."""
    engine = Engine()
    writer, tracker = engine.open_session(), engine.open_session()
    sent = []
    tracker.invalidate = lambda op, payload: sent.append((op, payload)) or True  # sent
    engine.dispatch(tracker, P.TRACKER, [PUSH_LIMIT])
    engine.dispatch(writer, P.SET, ["", "k", b"v1", None])
    engine.dispatch(writer, P.TRACK_GET, ["", "k", tracker.id])
    engine.dispatch(writer, P.SET, ["", "k", b"v2", None])  # push 1
    assert sent == [(P.PUSH_UPDATE, ["", "k", b"v2", None])] and tracker.inval_seq == 1
    engine.dispatch(writer, P.TRACK_GET, ["", "k", tracker.id])  # read again after push 1
    assert engine.dispatch(tracker, P.UNTRACK, ["", "k", 1]) is NO_REPLY
    assert engine.tracking.has("", "k")  # kept: the process holds the newer copy
    engine.dispatch(writer, P.SET, ["", "k", b"v3", None])  # push 2
    engine.dispatch(tracker, P.UNTRACK, ["", "k", 2])
    assert not engine.tracking.has("", "k") and not tracker.tracked and tracker.tracked_count == 0
    engine.dispatch(writer, P.SET, ["", "k", b"v4", None])
    assert len(sent) == 2  # no longer pushed
    with pytest.raises(ArgumentTypeError):
        engine.dispatch(writer, P.UNTRACK, ["", "k", 3])  # not a tracker connection


def test_a_rogue_untrack_is_refused_and_the_manager_serves_on(cluster):
    rogue = _handshaked_socket(cluster.address, cluster.secret)
    rogue.sendall(P.encode(P.UNTRACK, 0, ["", "k", 1]))  # not on a tracker connection
    rogue.settimeout(5)
    ((op, _rid, payload),) = P.FrameReader(1 << 20).feed(rogue.recv(65536))
    assert op == P.ERR and "UNTRACK takes" in P.decode_payload(payload)[1]  # refused, connection kept
    rogue.sendall(P.encode(P.PING, 2, []))
    ((op, rid, payload),) = P.FrameReader(1 << 20).feed(rogue.recv(65536))
    assert (op, rid, P.decode_payload(payload)) == (P.OK, 2, "pong")
    rogue.close()
    conf.configure(cluster.address, cluster.secret)
    clustershm.set("still", "serving")
    assert clustershm.get("still") == "serving"


@override_settings(CACHES=CACHES)
def test_no_stale_reads_under_heavy_concurrent_writes(cluster):
    """Writers record in the store how far they got *after* each write returns; a reader
    that read that record must never see an older value through its near cache."""
    seconds = 3.0

    def writer(w):
        cache = caches["default"]
        n = 0
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            n += 1
            if n % 7 == 0:
                cache.delete(f"key{w}")
                cache.set(f"key{w}", n)
            elif n % 11 == 0:
                cache.set_many({f"key{w}": n, f"other{w}": n})
            elif n % 13 == 0:
                cache.set(f"key{w}", [n, BIG])  # over the push limit: invalidated, not pushed
            elif n % 17 == 0:
                cache.set(f"key{w}", n - 1)  # not older than the last completed write (n - 1)
                cache.incr(f"key{w}")  # pushed as an int
            else:
                cache.set(f"key{w}", n)
            clustershm.set(f"done{w}", n)  # the shared store: no near cache
        clustershm.set(f"finished{w}", n)

    def reader(r):
        cache = caches["default"]
        reads = stale = 0
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            for w in range(2):
                done = clustershm.get(f"done{w}", 0)
                value = cache.get(f"key{w}") if reads % 3 else cache.get_many([f"key{w}"]).get(f"key{w}")
                reads += 1
                # None is possible between a writer's delete and its set; a
                # value older than one whose write had completed is not.
                if type(value) is list:
                    value = value[0]
                if value is not None and value < done:
                    stale += 1
        near_cache = clustershm.get_client()._near["near"]
        assert near_cache.hits > 100, near_cache.hits  # the near cache really answered
        assert stale == 0, f"{stale} stale reads out of {reads}"

    pids = [fork_call(writer, w) for w in range(2)] + [fork_call(reader, r) for r in range(2)]
    assert [reap(pid, 60) for pid in pids] == [0, 0, 0, 0]


@override_settings(CACHES=CACHES)
def test_expiry_is_kept_locally(cluster):
    cache = caches["default"]
    cache.set("short", "v", 0.2)
    asked = time.monotonic()
    assert cache.get("short") == "v" and cache.get("short") == "v"
    assert counts() == (1, 1)  # the second read was answered locally
    # The copy carries its own deadline: no later than the Manager's, counted
    # from before the read was sent.
    deadline = near()._entries[cache.make_key("short")][1]
    assert deadline is not None and asked < deadline <= asked + 0.2
    wait_until(lambda: cache.get("short") is None, timeout=5, message="expiry of the local copy")
    assert cache.make_key("short") not in near()._entries
    _, misses = counts()
    assert misses >= 2  # the expired copy was not answered: the Manager was asked again


@override_settings(CACHES=CACHES)
def test_touch_incr_delete_clear_evict_invalidate(cluster):
    cache = caches["default"]
    cache.set("n", 1)
    assert cache.get("n") == 1 and cache.get("n") == 1
    assert counts() == (1, 1)
    cache.incr("n")
    assert cache.get("n") == 2
    assert counts() == (2, 1)  # the incremented value was pushed: a hit
    cache.touch("n", 0.1)
    wait_until(lambda: cache.get("n") is None, timeout=5, message="the touched expiry")
    hits, misses = counts()
    assert misses >= 2 and cache.make_key("n") not in near()._entries  # the touch invalidated the copy
    cache.set_many({"a": 1, "b": 2})
    assert cache.get_many(["a", "b"]) == {"a": 1, "b": 2}
    assert cache.get_many(["a", "b"]) == {"a": 1, "b": 2}
    assert counts() == (hits + 2, misses + 2)  # two misses, then two hits
    cache.delete("a")
    assert cache.get("a") is None
    assert counts() == (hits + 2, misses + 3)  # invalidated: a miss
    assert cache.get("b") == 2
    assert counts() == (hits + 3, misses + 3)  # "b" is still held
    cache.clear()
    assert cache.get("b") is None
    assert counts() == (hits + 3, misses + 4)  # the clear invalidated every copy
    assert len(near()) == 0
    with override_settings(CACHES={"default": {**NEAR, "OPTIONS": {**NEAR["OPTIONS"], "MAX_ENTRIES": 3}}}):
        small = caches["default"]
        small.set("x0", 0)
        assert small.get("x0") == 0 and small.get("x0") == 0
        assert counts() == (hits + 4, misses + 5)  # the same near cache ("near"): held again
        for i in range(1, 4):
            small.set(f"x{i}", i)  # culls x0 in the Manager
        assert small.get("x0") is None
        assert counts() == (hits + 4, misses + 6)  # the eviction invalidated the copy


@override_settings(CACHES=CACHES)
def test_versions_and_prefixes(cluster):
    caches["default"].set("k", "v1")
    caches["v2"].set("k", "v2")
    assert caches["default"].get("k") == "v1" and caches["v2"].get("k") == "v2"
    assert counts() == (0, 2)  # two keys (":1:k", ":2:k") in one near cache
    caches["default"].incr_version("k")  # moves v1's value to version 2 (a hit, a set, a delete)
    assert counts() == (1, 2)
    assert caches["default"].get("k") is None
    assert counts() == (1, 3)  # ":1:k" was invalidated by the delete
    assert caches["default"].get("k", version=2) == "v1"
    assert caches["v2"].get("k") == "v1"
    assert counts() == (3, 3)  # ":2:k" was updated by the push of the set: two hits


@override_settings(CACHES=CACHES)
def test_after_fork_the_child_starts_empty(cluster):
    cache = caches["default"]
    cache.set("k", "parent")
    assert cache.get("k") == "parent" and len(near()) == 1

    def child():
        assert len(clustershm.get_client()._near["near"]) == 0
        assert caches["default"].get("k") == "parent"
        caches["default"].set("k", "child")

    assert reap(fork_call(child), 10) == 0
    assert cache.get("k") == "child"


@override_settings(CACHES=CACHES)
def test_after_the_manager_restarts(cluster):
    cache = caches["default"]
    cache.set("k", "old")
    assert cache.get("k") == "old" and cache.get("k") == "old"
    assert counts() == (1, 1) and len(near()) == 1
    cluster.kill()
    cluster.start()  # empty state
    assert cache.get("k") is None  # the lost channel emptied the near cache
    assert counts() == (1, 2) and len(near()) == 0  # not answered locally: emptied, then a miss
    cache.set("k", "new")
    assert cache.get("k") == "new" and cache.get("k") == "new"
    assert counts() == (2, 3)  # a new tracker: the new value is held locally again


def test_the_shared_store_near_cache(cluster, settings):
    settings.CLUSTERSHM = {"NEAR_CACHE": {"MAX_ENTRIES": 100, "POLICY": "always"}}
    conf.configure(cluster.address, cluster.secret)
    clustershm.set("flag", True)
    assert clustershm.get("flag") is True and clustershm.get("flag") is True
    assert clustershm.get_client()._near[""].hits == 1

    def writer():
        clustershm.set("flag", False)

    assert reap(fork_call(writer), 10) == 0
    assert clustershm.get("flag") is False


def _raw_tracker(cluster, tracker_args: list):
    """A tracker connection that reads only when a test says so, and a worker
    connection with ``call(op, args)`` for its requests."""
    tracker = _handshaked_socket(cluster.address, cluster.secret)
    tracker.sendall(P.encode(P.TRACKER, 1, tracker_args))
    reader = P.FrameReader(max_frame=1 << 20)
    ((_op, _, payload),) = reader.feed(tracker.recv(4096))
    sid = P.decode_payload(payload)[0]  # then its epoch slot and generation
    worker = _handshaked_socket(cluster.address, cluster.secret)
    wreader = P.FrameReader(max_frame=1 << 20)

    def call(op, args):
        worker.sendall(P.encode(op, 1, args))
        while True:
            frames = wreader.feed(worker.recv(65536))
            if frames:
                return frames[0]

    return tracker, reader, sid, worker, call


def test_a_tracker_that_cannot_take_an_invalidation_is_cut_off(cluster):
    """A tracker that never reads: once its socket is full, the next invalidation
    shuts it down instead of being queued (and the writer is not held up)."""
    tracker, _reader, sid, worker, call = _raw_tracker(cluster, [])

    key = "k" * 4000  # big invalidations fill the tracker's socket fast
    start = time.monotonic()
    for i in range(3000):
        call(P.SET, ["", f"{key}{i % 2}", i, None])
        call(P.TRACK_GET, ["", f"{key}{i % 2}", sid])
        if "tracker cut off" in cluster.log():
            break
    assert time.monotonic() - start < 30
    wait_until(lambda: "tracker cut off" in cluster.log(), message="tracker cut off")
    tracker.settimeout(5)
    with pytest.raises((ConnectionResetError, socket.timeout, AssertionError)):
        while tracker.recv(1 << 20):
            pass
        raise AssertionError("EOF")  # shut down: the reader sees EOF after what it had
    tracker.close()
    worker.close()


def test_a_tracker_that_reads_nothing_gets_invalidations_not_a_cut_off(cluster):
    """An idle worker reads nothing: once its unread updates pass the lag limit,
    the Manager invalidates instead, so the flow stops (one push per key) and the
    tracker is not cut off."""
    tracker, reader, sid, worker, call = _raw_tracker(cluster, [PUSH_LIMIT])

    keys = [f"idle{i}" for i in range(10)]
    for key in keys:
        call(P.SET, ["", key, b"v", None])
        call(P.TRACK_GET, ["", key, sid])
    value = b"x" * 4000
    for i in range(2000):  # 8 MB of updates if they were all sent: twice the tracker's buffer
        call(P.SET, ["", keys[i % 10], value, None])
    stats = P.decode_payload(call(P.STATS, [])[2])
    assert stats["near_cache_tracking"] == 0  # every key was invalidated in the end
    assert "cut off" not in cluster.log()
    # The tracker finds, in order: updates, then one invalidation per key, then nothing.
    tracker.settimeout(5)
    pushes = []
    while sum(op == P.PUSH_INVALIDATE for op, _ in pushes) < len(keys):
        for op, _, payload in reader.feed(tracker.recv(1 << 20)):
            pushes.append((op, P.decode_payload(payload)))
    assert len(pushes) < 2000
    ops = [op for op, _ in pushes]
    first_invalidation = ops.index(P.PUSH_INVALIDATE)
    assert set(ops[:first_invalidation]) == {P.PUSH_UPDATE} and first_invalidation > 100
    assert sorted(payload[1] for op, payload in pushes if op == P.PUSH_INVALIDATE) == keys
    tracker.close()
    worker.close()


@override_settings(CACHES=CACHES)
def test_plain_alias_without_near_cache_on_the_same_location(cluster):
    caches["plain"].set("k", 1)
    assert caches["default"].get("k") == 1
    assert counts() == (0, 1)
    caches["plain"].set("k", 2)  # a write through the alias with no near cache...
    assert caches["default"].get("k") == 2
    assert counts() == (1, 1)  # ...is pushed to the near cache of the other: a hit, of the new value


@override_settings(CACHES=CACHES)
def test_many_processes_hammer_one_key(cluster):
    caches["default"].set("hot", 0)

    def worker(i):
        cache = caches["default"]
        hits0, misses0 = counts()  # a forked child starts with no copies (its counts are the parent's)
        last = 0
        for _ in range(500):
            value = cache.get("hot")
            assert value >= last
            last = value
            if i == 0:
                cache.incr("hot")
        hits, misses = counts()
        hits, misses = hits - hits0, misses - misses0
        assert hits + misses == 500
        if i == 0:
            # The writer's own increments are pushed to it before each incr
            # returns: after its first read, every read is answered locally.
            assert (hits, misses) == (499, 1)
        else:
            assert hits > 0  # readers miss after MAX_UNREAD_UPDATES unread pushes, or a fill raced by a write

    assert run_forked(4, worker) == [0] * 4
    assert caches["default"].get("hot") == 500


def test_embedded_mode_has_no_near_cache():
    with override_settings(CACHES=CACHES):
        caches["default"].set("k", 1)
        assert caches["default"].get("k") == 1
        assert clustershm.get_client()._near == {}
        assert clustershm.near_stats() == {}


# -- the defaults (#19): a near cache per alias and for the store, adaptive --------------------

DEFAULTS = {
    "default": {"BACKEND": "django_clustershm.cache.ClusterShmCache", "LOCATION": "plain-default"},
    "off": {"BACKEND": "django_clustershm.cache.ClusterShmCache", "LOCATION": "plain-default",
            "OPTIONS": {"NEAR_CACHE": False}},
}  # fmt: skip


@override_settings(CACHES=DEFAULTS)
def test_by_default_a_cluster_alias_and_the_store_read_through_adaptive_near_caches(cluster):
    cache = caches["default"]
    cache.set("k", "v")
    pairs = lambda: clustershm.stats()["near_cache_tracked_pairs"]  # noqa: E731
    assert cache.get("k") == "v"  # a first read: plain, nothing kept or tracked
    stats = clustershm.near_stats()["plain-default"]
    assert (stats["entries"], stats["untracked"], stats["policy"]) == (0, 1, "adaptive") and pairs() == 0
    assert cache.get("k") == "v"  # the second: kept, and tracked by the Manager
    assert clustershm.near_stats()["plain-default"]["entries"] == 1 and pairs() == 1
    ops = clustershm.stats()["ops"]
    assert [cache.get("k") for _ in range(20)] == ["v"] * 20
    assert clustershm.stats()["ops"] == ops + 1  # hits: no request but this stats call
    # The store has its own, by the same default.
    clustershm.set("s", 1)
    assert [clustershm.get("s") for _ in range(5)] == [1] * 5
    assert clustershm.near_stats()[""]["hits"] == 3
    # A key read once does not cost the Manager a tracking record, nor the
    # writers a push: a scan of 200 keys leaves only the two copies tracked.
    cache.set_many({f"scan{i}": i for i in range(200)})
    assert [cache.get(f"scan{i}") for i in range(200)] == list(range(200))
    assert pairs() == 2


@override_settings(CACHES=DEFAULTS)
def test_near_cache_false_turns_the_default_off(cluster):
    caches["off"].set("k", 1)
    assert [caches["off"].get("k") for _ in range(3)] == [1] * 3
    assert "plain-default" not in clustershm.near_stats()


def test_embedded_mode_has_no_default_near_cache():
    with override_settings(CACHES=DEFAULTS):
        caches["default"].set("k", 1)
        assert [caches["default"].get("k") for _ in range(3)] == [1] * 3
        assert clustershm.near_stats() == {}


@override_settings(
    CACHES={
        "default": {"BACKEND": "django_clustershm.cache.ClusterShmCache", "LOCATION": "lru",
                    "OPTIONS": {"MAX_BYTES": 100_000}},
        "plain": {"BACKEND": "django_clustershm.cache.ClusterShmCache", "LOCATION": "lru",
                  "OPTIONS": {"MAX_BYTES": 100_000, "NEAR_CACHE": False}},
    }
)  # fmt: skip
def test_hits_on_near_copies_keep_a_key_recently_used_in_the_manager(cluster):
    """A key read only from near copies would look unused to the Manager's LRU
    and be evicted first; RECENT reports make it as recently used as the reads."""
    value = b"x" * 5000  # about 19 fit in 100,000 bytes
    caches["plain"].set("k0", value)
    for i in range(1, 11):
        caches["plain"].set(f"k{i}", value)  # k0 is now the least recently used

    def reader():
        cache = caches["default"]
        for _ in range(200):  # 2 reads to keep a copy, then hits, reported at the 64th
            assert cache.get("k0") == value

    hits = clustershm.stats()["caches"]["lru"]["hits"]
    assert reap(fork_call(reader), 30) == 0
    wait_until(lambda: clustershm.stats()["caches"]["lru"]["hits"] >= hits + 64, message="the reader's RECENT report")
    for i in range(11, 26):  # 15 more: the least recently used go
        caches["plain"].set(f"k{i}", value)
    assert clustershm.stats()["caches"]["lru"]["evictions"] >= 5
    assert caches["plain"].get("k0") == value  # refreshed by the report: kept
    assert caches["plain"].get("k1") is None  # older than k0's hits: evicted


# -- epochs (#19 part 3): pushes go out after the writer's reply, the slot moves before it -------


def _slot(cluster, tracker_reply: list) -> tuple[memoryview, int, int]:
    """The tracker's epoch slot, read from the Manager's file as its process maps it."""
    import mmap

    _sid, slot, gen = tracker_reply
    with open(cluster.address + P.EPOCH_SUFFIX, "rb") as fh:
        mapped = mmap.mmap(fh.fileno(), 0, prot=mmap.PROT_READ)
    return memoryview(mapped).cast("Q"), slot, gen << P.EPOCH_SEQ_BITS


def test_a_trackers_epoch_moves_before_the_writers_reply_and_says_cut(cluster):
    tracker = _handshaked_socket(cluster.address, cluster.secret)
    tracker.sendall(P.encode(P.TRACKER, 1, [PUSH_LIMIT]))
    reader = P.FrameReader(max_frame=1 << 20)
    ((_op, _, payload),) = reader.feed(tracker.recv(4096))
    reply = P.decode_payload(payload)
    epochs, slot, base = _slot(cluster, reply)
    worker = _handshaked_socket(cluster.address, cluster.secret)
    wreader = P.FrameReader(max_frame=1 << 20)

    def call(op, args):
        worker.sendall(P.encode(op, 1, args))
        while not (frames := wreader.feed(worker.recv(65536))):
            pass
        return P.decode_payload(frames[0][2])

    try:
        assert epochs[slot] == base  # no push yet
        call(P.SET, ["", "k", b"v1", None])
        assert call(P.TRACK_GET, ["", "k", reply[0]])[3] is True
        call(P.SET, ["", "k", b"v2", None])
        # The reply is in: the slot already counts the push (whether or not it arrived).
        assert epochs[slot] == base + 1
        call(P.SET_MANY, ["", ["k", b"v3", "k", b"v4"], None])
        assert epochs[slot] == base + 2  # one push per change of the key
        pushes = []
        tracker.settimeout(5)
        while len(pushes) < 2:
            pushes += [P.decode_payload(p) for _, _, p in reader.feed(tracker.recv(65536))]
        assert pushes == [["", "k", b"v2", None], ["", "k", b"v4", None]]
        tracker.close()  # gone: the slot says so at once, for whoever still maps it
        wait_until(lambda: epochs[slot] & P.EPOCH_CUT == P.EPOCH_CUT, message="the slot marked cut")
    finally:
        epochs.release()
        worker.close()
        tracker.close()
