"""Near caches: worker-local reads that never return a value older than a completed write."""

import socket
import time

import pytest
from django.core.cache import caches
from django.test import override_settings

import django_clustershm as clustershm
from django_clustershm import registry as conf
from django_clustershm.exceptions import ArgumentTypeError
from django_clustershm.server.engine import Engine
from django_clustershm.wire import frames as P

from .helpers import fork_call, reap, run_forked, wait_until
from .test_manager import _handshaked_socket

NEAR = {"BACKEND": "django_clustershm.cache.ClusterShmCache", "LOCATION": "near",
        "OPTIONS": {"NEAR_CACHE": {"MAX_ENTRIES": 1000, "MAX_BYTES": 1 << 20, "POLICY": "always"}}}  # fmt: skip
CACHES = {"default": NEAR, "v2": {**NEAR, "VERSION": 2}, "plain": {**NEAR, "OPTIONS": {"NEAR_CACHE": False}}}


BIG = "x" * 100_000


def near():
    return clustershm.get_client()._near["near"]


def refreshed(ns: str = "near") -> int:
    """Stale copies of this process refilled from their key's value slot (no round trip)."""
    return clustershm.near_stats()[ns]["refreshed"]


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
    fills = clustershm.stats()["near"]["fills"]
    # The writer's call returned, so its stamp, and its value in the key's slot, were already there.
    assert cache.get("k") == 2
    assert counts() == (2, 1) and refreshed() == 1  # the copy was stale: refilled from the slot, a hit
    assert cache.get("k") == 2
    assert counts() == (3, 1) and refreshed() == 1  # kept with the new stamp: a plain hit
    assert clustershm.stats()["near"]["fills"] == fills  # nothing was read from the Manager


@override_settings(CACHES=CACHES)
def test_a_value_too_large_for_a_slot_is_read_again_from_the_manager(cluster):
    cache = caches["default"]
    big = "y" * (2 * P.SLOT_SIZE)
    cache.set("k", big)
    assert cache.get("k") == big and cache.get("k") == big
    assert counts() == (1, 1)

    def writer():
        caches["default"].set("k", big + "!")

    assert reap(fork_call(writer), 10) == 0
    assert cache.get("k") == big + "!"
    assert counts() == (1, 2) and refreshed() == 0  # no slot: the stale copy is a miss
    assert cache.get("k") == big + "!" and counts() == (2, 2)


@override_settings(CACHES=CACHES)
def test_writes_elsewhere_invalidate_the_local_copies(cluster):
    cache = caches["default"]
    cache.set_many({"k": 1, "n": 1, "t": "old", "same": 1})
    assert cache.get_many(["k", "n", "t", "same"]) == {"k": 1, "n": 1, "t": "old", "same": 1}  # all held
    hits, misses = counts()

    def writer():
        c = caches["default"]
        c.set("k", {"v": 2})
        c.incr("n", 41)
        c.set("t", "short-lived", 0.5)

    assert reap(fork_call(writer), 10) == 0
    before = time.monotonic()
    assert cache.get("k") == {"v": 2} and cache.get("n") == 42 and cache.get("t") == "short-lived"
    # Three stale copies, each refilled from its key's value slot: three hits, no miss.
    assert counts() == (hits + 3, misses) and refreshed() == 3
    assert cache.get("same") == 1 and counts() == (hits + 4, misses)  # a key nobody wrote: a plain hit
    assert cache.get_many(["k", "n", "t"]) == {"k": {"v": 2}, "n": 42, "t": "short-lived"}
    assert counts() == (hits + 7, misses) and refreshed() == 3  # the new values are held
    # The refilled copy's expiry is the Manager's own (the slot carries it).
    deadline = near()._entries[cache.make_key("t")][1]
    assert before - 0.5 < deadline <= before + 0.5
    wait_until(lambda: cache.get("t") is None, timeout=5, message="expiry of the copy")


@override_settings(CACHES={"default": {**NEAR, "OPTIONS": {"NEAR_CACHE": {"MAX_BYTES": 4096, "POLICY": "always"}}}})
def test_a_value_too_large_for_the_near_cache_is_read_not_kept_and_drops_the_old_copy(cluster):
    cache = caches["default"]
    cache.set("k", "small")
    assert cache.get("k") == "small" and cache.get("k") == "small"  # held locally
    large = "y" * 10_000  # over this near cache's MAX_BYTES

    def writer():
        caches["default"].set("k", large)

    assert reap(fork_call(writer), 10) == 0
    assert cache.get("k") == large and cache.get("k") == large
    assert cache.make_key("k") not in near()._entries


def test_a_rogue_recent_is_refused_and_the_manager_serves_on(cluster):
    rogue = _handshaked_socket(cluster.address, cluster.secret)
    rogue.sendall(P.encode(P.RECENT, 0, ["", 1, ["k"]]))  # not on a tracker connection
    rogue.settimeout(5)
    ((op, _rid, payload),) = P.FrameReader(1 << 20).feed(rogue.recv(65536))
    assert op == P.ERR and "RECENT takes" in P.decode_payload(payload)[1]  # refused, connection kept
    rogue.sendall(P.encode(0x3B, 2, ["", "k", 1]))  # UNTRACK, gone with per-process records
    ((op, _rid, payload),) = P.FrameReader(1 << 20).feed(rogue.recv(65536))
    assert op == P.ERR
    rogue.sendall(P.encode(P.PING, 3, []))
    ((op, rid, payload),) = P.FrameReader(1 << 20).feed(rogue.recv(65536))
    assert (op, rid, P.decode_payload(payload)) == (P.OK, 3, "pong")
    rogue.close()
    conf.configure(cluster.address, cluster.secret)
    clustershm.set("still", "serving")
    assert clustershm.get("still") == "serving"
    with pytest.raises(ArgumentTypeError):
        engine = Engine()
        engine.dispatch(engine.open_session(), P.RECENT, ["", 1, ["k"]])


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
                cache.set(f"key{w}", [n, BIG])  # a large value
            elif n % 17 == 0:
                cache.set(f"key{w}", n - 1)  # not older than the last completed write (n - 1)
                cache.incr(f"key{w}")  # an int
            elif n % 2:
                cache.set(f"key{w}", [n])  # a small pickled value: rewritten in its slot as bytes
            else:
                cache.set(f"key{w}", n)  # an int: rewritten in its slot as an int
            clustershm.set(f"done{w}", n)  # the shared store: no near cache
        clustershm.set(f"finished{w}", n)

    def reader(r):
        cache = caches["default"]
        reads = stale = 0
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            for w in range(2):
                done = clustershm.get(f"done{w}", 0)
                # Twice: the first miss after a write keeps a copy, which the
                # second read may answer (a writer writes again within ~0.1 ms).
                for _ in range(2):
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
    assert counts() == (2, 1) and refreshed() == 1  # the incr moved the stamp: refilled from the slot
    assert cache.get("n") == 2
    assert counts() == (3, 1)
    cache.touch("n", 0.1)
    assert cache.get("n") == 2 and refreshed() == 2  # the touch moved the stamp; the slot has the deadline
    assert near()._entries[cache.make_key("n")][1] <= time.monotonic() + 0.1
    wait_until(lambda: cache.get("n") is None, timeout=5, message="the touched expiry")
    hits, misses = counts()
    assert misses >= 2 and cache.make_key("n") not in near()._entries  # expired here, then asked again
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
    assert counts() == (1, 3)  # ":1:k" was deleted: its slot went with it, a miss
    assert caches["default"].get("k", version=2) == "v1"
    assert counts() == (2, 3) and refreshed() == 1  # ":2:k" was written by incr_version: refilled from its slot
    assert caches["v2"].get("k") == "v1"
    assert counts() == (3, 3)  # the same key, held: a hit


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


@override_settings(CACHES=CACHES)
def test_plain_alias_without_near_cache_on_the_same_location(cluster):
    caches["plain"].set("k", 1)
    assert caches["default"].get("k") == 1
    assert counts() == (0, 1)
    caches["plain"].set("k", 2)  # a write through the alias with no near cache...
    assert caches["default"].get("k") == 2
    assert counts() == (1, 1) and refreshed() == 1  # ...made the copy of the other stale: refilled from its slot
    assert caches["default"].get("k") == 2
    assert counts() == (2, 1)


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
            # Each of the writer's own increments moves its copy's stamp; the
            # key's slot already holds the new value: one miss, then refills.
            assert (hits, misses) == (499, 1)

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
    fills = lambda: clustershm.stats()["near"]["fills"]  # noqa: E731
    assert cache.get("k") == "v"  # a first read: plain, nothing kept
    stats = clustershm.near_stats()["plain-default"]
    assert (stats["entries"], stats["untracked"], stats["policy"]) == (0, 1, "adaptive") and fills() == 0
    assert cache.get("k") == "v"  # the second: kept
    assert clustershm.near_stats()["plain-default"]["entries"] == 1 and fills() == 1
    ops = clustershm.stats()["ops"]
    assert [cache.get("k") for _ in range(20)] == ["v"] * 20
    assert clustershm.stats()["ops"] == ops + 1  # hits: no request but this stats call
    # The store has its own, by the same default.
    clustershm.set("s", 1)
    assert [clustershm.get("s") for _ in range(5)] == [1] * 5
    assert clustershm.near_stats()[""]["hits"] == 3
    # A key read once keeps no copy (no hot copy is evicted for a scan of 200 keys).
    cache.set_many({f"scan{i}": i for i in range(200)})
    assert [cache.get(f"scan{i}") for i in range(200)] == list(range(200))
    assert fills() == 2 and clustershm.near_stats()["plain-default"]["entries"] == 1


@override_settings(CACHES=DEFAULTS)
def test_a_first_read_keeps_a_copy_of_a_key_another_process_keeps(cluster):
    """The adaptive policy keeps no copy of a key read once, unless the key
    has a value slot: another process reads it through its near cache, so
    it is hot in the cluster and a worker started later need not read it twice."""
    cache = caches["default"]
    cache.set_many({"hot": "h", "hot2": "h2", "cold": "c", "cold2": "c2"})

    def other():
        c = caches["default"]
        for _ in range(2):  # its second reads keep copies, and give the keys slots
            assert c.get("hot") == "h" and c.get_many(["hot2"]) == {"hot2": "h2"}
        assert clustershm.near_stats()["plain-default"]["entries"] == 2

    assert reap(fork_call(other), 10) == 0
    # A process that has kept no copy yet has no channel, and a first read opens none: plain.
    assert cache.get("hot") == "h" and clustershm.near_stats()["plain-default"]["entries"] == 0
    cache.set("warm", "w")
    assert cache.get("warm") == "w" and cache.get("warm") == "w"  # a copy kept: the channel is open
    near_cache = clustershm.get_client()._near["plain-default"]
    near_cache._seen.clear()  # (forget that "hot" was read once here)
    before = clustershm.near_stats()["plain-default"]
    assert cache.get("hot") == "h" and cache.get("cold") == "c"
    assert cache.get_many(["hot2", "cold2"]) == {"hot2": "h2", "cold2": "c2"}
    stats = clustershm.near_stats()["plain-default"]
    assert stats["entries"] == 3  # "warm", and the hot keys kept at their first read here
    assert (stats["untracked"] - before["untracked"], stats["misses"] - before["misses"]) == (2, 4)
    assert set(near_cache._entries) == {cache.make_key(k) for k in ("warm", "hot", "hot2")}
    assert cache.get("hot") == "h" and cache.get_many(["hot2"]) == {"hot2": "h2"}
    assert clustershm.near_stats()["plain-default"]["hits"] == before["hits"] + 2


@override_settings(CACHES=DEFAULTS)
def test_forked_workers_rest_at_their_first_weighing_only_where_writes_outpace_reads(cluster):
    """Two forked workers read each key, write it, and read it again (so each
    second read is declined): at their JUDGE_EVERY-th miss their near caches
    rest, and their reads go on plainly, each one fresh. A third, reading its
    own keys without writing them, keeps its copies past the same weighing."""
    from django_clustershm.client import near as near_module

    every = near_module.JUDGE_EVERY
    caches["default"].set_many({f"r{i}": i for i in range(every)})

    def writer(i):
        cache = caches["default"]
        for n in range(every):
            key = f"w{i}-{n}"
            cache.set(key, 0)
            # A first read marks the key's bucket (but the very first, made before the
            # process has a tracker channel, is plain, and that key's second read fills it).
            assert cache.get(key) == 0
            cache.set(key, n)  # (moves its stamp)
            assert cache.get(key) == n  # declined: fresh from the Manager, no copy
            cache.delete(key)  # (the alias culls over its 300 entries: keep the reader's)
        stats = clustershm.near_stats()["plain-default"]
        assert stats["rests"] == 1 and stats["entries"] == 0, stats
        near_cache = clustershm.get_client()._near["plain-default"]
        assert near_cache.rest_reads == every  # rested from the JUDGE_EVERY-th of its 2 * JUDGE_EVERY reads
        for n in range(20):  # resting: plain reads, each one fresh
            cache.set(f"w{i}-0", -n)
            assert cache.get(f"w{i}-0") == -n
        after = clustershm.near_stats()["plain-default"]
        assert (after["rests"], after["entries"], after["hits"]) == (1, 0, 0), after
        assert after["untracked"] - stats["untracked"] == after["misses"] - stats["misses"] == 20
        assert near_cache.rest_reads == every + 20

    def reader():
        cache = caches["default"]
        for _ in range(3):  # 2 * JUDGE_EVERY misses (a first read and a kept one each), then hits
            assert [cache.get(f"r{i}") for i in range(every)] == list(range(every))
        stats = clustershm.near_stats()["plain-default"]
        assert stats["misses"] == 2 * every and stats["hits"] >= every and stats["rests"] == 0, stats
        assert stats["entries"] == every, stats

    pids = [fork_call(writer, 0), fork_call(writer, 1), fork_call(reader)]
    assert [reap(pid, 60) for pid in pids] == [0, 0, 0]


def _written_elsewhere(key: str, value) -> None:
    """``cache.set(key, value)`` in another process (forked, then reaped)."""
    assert reap(fork_call(lambda: caches["default"].set(key, value)), 10) == 0


@override_settings(CACHES=DEFAULTS)
def test_a_second_read_keeps_no_copy_if_the_key_changed_since_the_first(cluster):
    """The adaptive policy keeps a copy at a key's second read only if one kept
    at its first would have answered: a key another process writes between
    each two reads here costs no fill (and gets no value slot)."""
    cache = caches["default"]
    cache.set_many({"warm": 0, "k": 0, "m": 0})
    assert cache.get("warm") == 0 and cache.get("warm") == 0  # a copy kept: the channel is open
    fills = lambda: clustershm.stats()["near"]["fills"]  # noqa: E731
    before = fills()
    assert cache.get("k") == 0 and cache.get_many(["m"]) == {"m": 0}  # first reads: each leaves a mark
    for n in (1, 2):
        _written_elsewhere("k", n)
        _written_elsewhere("m", n)
        assert cache.get("k") == n and cache.get_many(["m"]) == {"m": n}  # changed since: declined
    stats = clustershm.near_stats()["plain-default"]
    assert (stats["declined"], stats["entries"], fills()) == (4, 1, before)  # only "warm" kept
    # Read again with no write in between: a copy kept at the last read would answer, so one is kept now.
    assert cache.get("k") == 2 and cache.get_many(["m"]) == {"m": 2}
    assert (clustershm.near_stats()["plain-default"]["entries"], fills()) == (3, before + 2)
    hits = clustershm.near_stats()["plain-default"]["hits"]
    assert cache.get("k") == 2 and cache.get_many(["m"]) == {"m": 2}
    assert clustershm.near_stats()["plain-default"]["hits"] == hits + 2
    # And the copies are exact: a write elsewhere is seen at once.
    _written_elsewhere("k", 3)
    assert cache.get("k") == 3


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


# -- stamps (#19 part 3): one store a write, whoever holds the key ------------------------------


def _mapped_stamps(cluster) -> memoryview:
    """The Manager's stamps file, mapped as a client process maps it."""
    import mmap

    with open(cluster.address + P.STAMPS_SUFFIX, "rb") as fh:
        mapped = mmap.mmap(fh.fileno(), 0, prot=mmap.PROT_READ)
    return memoryview(mapped).cast("Q")


def _raw_client(cluster):
    sock = _handshaked_socket(cluster.address, cluster.secret)
    reader = P.FrameReader(max_frame=1 << 20)

    def call(op, args):
        sock.sendall(P.encode(op, 1, args))
        while not (frames := reader.feed(sock.recv(65536))):
            pass
        return P.decode_payload(frames[0][2])

    return sock, call


def test_a_keys_stamp_moves_before_the_writers_reply(cluster):
    worker, call = _raw_client(cluster)
    stamps = _mapped_stamps(cluster)
    try:
        _sid, generation = call(P.TRACKER, [])
        assert generation and stamps[P.STAMP_BUCKETS] == generation
        call(P.SET, ["", "k", b"v1", None])
        value, ttl, bucket, stamp, slot, token = call(P.TRACK_GET, ["", "k"])
        assert (value, ttl) == (b"v1", None) and stamps[bucket] == stamp
        assert call(P.TRACK_GET, ["", "k"])[2:] == [bucket, stamp, slot, token]  # nothing changed: the same
        assert call(P.TRACK_GET, ["", "absent"]) == [None, None, 0, 0, -1, 0]
        call(P.SET, ["", "k", b"v2", None])
        # The reply is in: the bucket already holds a new stamp.
        assert stamps[bucket] != stamp
        call(P.SET, ["", "n", 1, None])
        for op, args in [
            (P.SET_MANY, ["", ["k", b"v3", "k", b"v4"], None]),
            (P.TOUCH, ["", "k", 30]),
            (P.INCR, ["", "n", 1, None, None]),
            (P.REMOVE, ["", "k"]),
        ]:
            key = "n" if op == P.INCR else "k"
            before = call(P.TRACK_GET, ["", key])[2:4]
            call(op, args)
            assert stamps[before[0]] != before[1], op
        # A clear moves every bucket.
        call(P.SET, ["", "k", b"v5", None])
        many = call(P.TRACK_GET_MANY, ["", ["k", "n", "absent"]])
        assert set(many) == {"k", "n"}
        call(P.CLEAR, [""])
        assert all(stamps[b] != s for _v, _t, b, s, _slot, _token in many.values())
    finally:
        stamps.release()
        worker.close()


def test_a_write_sends_nothing_to_the_processes_holding_the_key(cluster):
    """The Manager keeps nothing per holder and sends a holder nothing: its
    tracker channel stays silent while others write what it holds."""
    tracker, tcall = _raw_client(cluster)
    worker, call = _raw_client(cluster)
    try:
        tcall(P.TRACKER, [])
        call(P.SET, ["", "k", b"v1", None])
        for _ in range(3):
            tcall(P.TRACK_GET, ["", "k"])
        for i in range(200):
            call(P.SET, ["", "k", b"v%d" % i, None])
        tracker.settimeout(0.2)
        with pytest.raises(socket.timeout):
            tracker.recv(1)  # nothing was pushed
        assert call(P.STATS, [])["near"]["fills"] == 3
    finally:
        tracker.close()
        worker.close()


def test_the_stamps_file_dies_with_its_manager(cluster):
    """A Manager that stops marks its file dead; one that takes over the address
    of a killed one marks the old file dead before it serves anyone. A dead
    file's value slots answer nothing either."""
    from .test_value_slots import _reader

    old = _mapped_stamps(cluster)
    worker, call = _raw_client(cluster)
    _sid, generation = call(P.TRACKER, [])
    reader = _reader(cluster.address, generation)
    try:
        call(P.SET, ["", "k", b"v", None])
        *_, slot, token = call(P.TRACK_GET, ["", "k"])
        worker.close()
        assert old[P.STAMP_BUCKETS] not in (0, P.STAMP_DEAD)
        cluster.kill()  # SIGKILL: it could mark nothing
        assert old[P.STAMP_BUCKETS] != P.STAMP_DEAD
        assert slot < 0 or reader.read_slot(slot, token) == (b"v", float("inf"))
        cluster.start()  # takes the address over
        assert old[P.STAMP_BUCKETS] == P.STAMP_DEAD and set(old[:16].tolist()) == {P.STAMP_DEAD}
        assert slot < 0 or reader.read_slot(slot, token) is None
        new = _mapped_stamps(cluster)
        try:
            assert new[P.STAMP_BUCKETS] not in (0, P.STAMP_DEAD)
            assert cluster.stop() == 0  # an orderly stop
            assert new[P.STAMP_BUCKETS] == P.STAMP_DEAD
        finally:
            new.release()
    finally:
        reader.drop()
        worker.close()
        old.release()


@override_settings(CACHES=CACHES)
def test_no_stale_reads_through_the_asyncio_client(cluster):
    """The stale-read hunt again, read through the asyncio client's near cache
    (its hits check the same stamps, its misses are awaited): forked writers
    record how far they got once each write returned; an asyncio reader in
    another process never sees an older value."""
    seconds = 2.0

    def writer(w):
        cache = caches["default"]
        n = 0
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            n += 1
            if n % 5 == 0:
                cache.delete(f"akey{w}")
            cache.set(f"akey{w}", [n] if n % 2 else n)  # bytes (pickled) or an int in its slot
            clustershm.set(f"adone{w}", n)

    def reader():
        import asyncio

        aio = clustershm.get_client().aio
        near = aio.cache("near", near_cache=(1000, 1 << 20, None, "always"))

        async def main():
            reads = stale = 0
            deadline = time.monotonic() + seconds
            while time.monotonic() < deadline:
                for w in range(2):
                    done = await aio.aget(f"adone{w}", 0)
                    key = caches["default"].make_key(f"akey{w}")
                    for _ in range(2):  # the second read may be answered by the copy the first one kept
                        if reads % 3:
                            value = await near.aget(key)
                        else:
                            value = (await near.aget_many([key])).get(key)
                        reads += 1
                        if type(value) is list:
                            value = value[0]
                        if value is not None and value < done:
                            stale += 1
            await aio.aclose()
            return reads, stale

        reads, stale = asyncio.run(main())
        hits = clustershm.get_client()._near["near"].hits
        assert hits > 50, hits  # the near cache really answered
        assert stale == 0, f"{stale} stale reads out of {reads}"

    pids = [fork_call(writer, w) for w in range(2)] + [fork_call(reader)]
    assert [reap(pid, 60) for pid in pids] == [0, 0, 0]
