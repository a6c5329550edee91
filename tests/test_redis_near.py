"""The near cache on the Redis engine (#16, part 2): redisengine/near.py, RESP3 CLIENT TRACKING.

Every test runs on each remote engine (redis, valkey, a Redis Cluster, Sentinel).
Writes that must reach this process's copies are made by ANOTHER (forked)
process; hits are checked by the near cache's own counters, since every value
read would be the same with no near cache at all. No fixed sleeps: every wait is
wait_until on a condition.
"""

import asyncio
import logging
import threading
import time

import pytest
from django.core.cache import caches
from django.test import override_settings

import django_clustershm as clustershm
from django_clustershm import conf, registry
from django_clustershm.exceptions import InvalidArgument
from django_clustershm.redisengine import near as redis_near

from .conftest import remote_with
from .helpers import drop_module_client, fork_call, reap, run_forked, stopped, wait_until

NEAR = {"MAX_ENTRIES": 1000, "MAX_BYTES": 1 << 20}
CACHES = {
    "default": {"BACKEND": "django_clustershm.cache.ClusterShmCache", "LOCATION": "near", "OPTIONS": {"NEAR_CACHE": NEAR}},
    "other": {"BACKEND": "django_clustershm.cache.ClusterShmCache", "LOCATION": "other-place", "OPTIONS": {"NEAR_CACHE": NEAR}},
}  # fmt: skip


@pytest.fixture
def near_remote(remote, settings):
    """The module-level API on each remote engine, with a near cache on the store."""
    yield from remote_with(settings, remote, NEAR_CACHE=NEAR)


def store_near():
    return clustershm.get_client()._near[""]


def tracker():
    return clustershm.get_client()._tracker


def _in_child(fn, *args):
    assert reap(fork_call(fn, *args), 60) == 0


def test_hits_are_local_and_another_process_write_reaches_them(near_remote):
    clustershm.set("k", {"v": 1})
    assert clustershm.get("k") == {"v": 1}  # a miss: read on the tracking connection
    requests = clustershm.get_client().transport.requests
    for _ in range(50):
        got = clustershm.get("k")
        assert got == {"v": 1}
        got["v"] = 99  # the caller may mutate what it gets: every hit is a fresh object
    assert store_near().hits >= 50
    assert clustershm.get_client().transport.requests == requests  # no request for a hit

    _in_child(lambda: clustershm.set("k", {"v": 2}))
    wait_until(lambda: clustershm.get("k") == {"v": 2}, message="the other process's write reached the copy")
    _in_child(lambda: clustershm.remove("k"))
    wait_until(lambda: clustershm.get("k") is None, message="the other process's delete reached the copy")


def test_a_process_reads_its_own_writes_at_once(near_remote):
    """In the writing process a read never returns a value older than its own
    completed write, whatever the push timing: every thread, every step."""
    clustershm.set("own", 0)
    stale = []
    stop = threading.Event()
    done = [0]

    def reader():
        while not stop.is_set():
            floor = done[0]
            value = clustershm.get("own")
            if value < floor:
                stale.append((value, floor))

    threads = [threading.Thread(target=reader) for _ in range(2)]
    for thread in threads:
        thread.start()
    try:
        for n in range(1, 400):
            if n % 5 == 0:
                clustershm.set_many({"own": n, "own2": n})
            elif n % 7 == 0:
                clustershm.set("own", n - 1)
                clustershm.incr("own")
            else:
                clustershm.set("own", n)
            done[0] = n
            assert clustershm.get("own") == n  # the writing thread itself
    finally:
        stop.set()
        for thread in threads:
            thread.join()
    assert not stale, stale[:5]
    assert store_near().hits > 0


def test_a_fill_overtaken_by_its_invalidation_is_not_kept(near_remote):
    """The fill race: another process writes the key between our read and the
    moment the copy would be stored, and its invalidation is already in the
    socket: the copy is dropped, so the next read asks again."""
    clustershm.set("race", "old")
    tracker_ = tracker()
    real_read = tracker_._read

    def read_then_written_elsewhere(ns, rkeys):
        found = real_read(ns, rkeys)
        _in_child(lambda: clustershm.set("race", "new"))
        tracking = tracker_._by_ns[ns]
        with tracking.io:
            wait_until(lambda: tracking.conn.can_read(0), message="the invalidation reached the socket")
        return found

    tracker_._read = read_then_written_elsewhere
    try:
        assert clustershm.get("race") == "old"  # what the read brought back is returned...
    finally:
        del tracker_._read
    assert "race" not in store_near()._entries  # ...but not kept
    assert clustershm.get("race") == "new"


def test_a_killed_tracking_connection_empties_the_near_cache(near_remote, caplog):
    clustershm.set("a", 1)
    clustershm.set("b", 2)
    assert clustershm.get("a") == 1 and clustershm.get("b") == 2
    assert len(store_near()) == 2
    tracking = tracker()._by_ns[""]
    node = tracking.node

    def kill_and_write():
        client = clustershm.get_client()
        r = client.transport.redis
        if client.transport.config.kind == "cluster":
            r = r.get_redis_connection(r.get_node(node_name=node))
        assert r.execute_command("CLIENT", "KILL", "ID", tracking.client_id) == 1
        clustershm.set("a", 10)  # no invalidation can reach the killed connection

    _in_child(kill_and_write)
    with caplog.at_level(logging.WARNING, logger="django_clustershm.near"):
        wait_until(lambda: clustershm.get("a") == 10, message="the lost connection was noticed")
    assert "near caches of process" in caplog.text and "was lost" in caplog.text
    assert clustershm.get("b") == 2
    assert tracker()._by_ns[""].client_id != tracking.client_id  # a new tracking connection


def test_a_copy_expires_with_its_key(near_remote):
    clustershm.set("brief", "x", timeout=0.3)
    clustershm.set("kept", "y")
    assert clustershm.get("brief") == "x" and clustershm.get("brief") == "x"
    assert store_near().hits >= 1
    wait_until(lambda: clustershm.get("brief") is None, message="the copy expired")
    assert clustershm.get("kept") == "y"


def test_a_flush_drops_every_copy(near_remote):
    clustershm.set("f1", 1)
    assert clustershm.get("f1") == 1 and len(store_near()) == 1

    def flush():
        client = clustershm.get_client()
        r = client.transport.redis
        if client.transport.config.kind == "cluster":
            r.flushdb(target_nodes=r.PRIMARIES)
        else:
            r.flushdb()

    _in_child(flush)
    wait_until(lambda: clustershm.get("f1") is None, message="FLUSHDB's invalidation (of every key) arrived")


def test_after_fork_the_child_starts_empty_and_tracks_its_own(near_remote):
    clustershm.set("forked", "parent")
    assert clustershm.get("forked") == "parent"
    parent_id = tracker()._by_ns[""].client_id

    def child():
        assert len(store_near()) == 0 and tracker()._by_ns == {}
        assert clustershm.get("forked") == "parent"  # a miss, on the child's own connection
        assert tracker()._by_ns[""].client_id != parent_id
        assert clustershm.get("forked") == "parent" and store_near().hits == 1

    _in_child(child)
    assert clustershm.get("forked") == "parent"
    assert tracker()._by_ns[""].client_id == parent_id  # the parent's connection is untouched


def test_an_unheard_tracking_connection_answers_no_hits_until_proved(near_remote, monkeypatch):
    """Copies answer only while their connection was heard from recently: a
    quiet connection is pinged, and until it answers a read is a miss."""
    clustershm.set("quiet", 1)
    assert clustershm.get("quiet") == 1
    monkeypatch.setattr(redis_near, "HEARD_WITHIN", 0.05)
    monkeypatch.setattr(redis_near, "PING_AFTER", 0.01)
    tracking = tracker()._by_ns[""]
    wait_until(lambda: time.monotonic() - tracking.heard > 0.05, message="a quiet spell")
    misses = store_near().misses
    assert clustershm.get("quiet") == 1
    assert store_near().misses == misses + 1  # not answered from the copy
    assert clustershm.get("quiet") == 1  # heard again: the copy answers
    assert store_near().hits >= 1
    wait_until(lambda: tracking.pings > 0 or clustershm.get("quiet") != 1, message="a ping sent")


def test_the_cache_backend_near_cache_across_processes(near_remote):
    with override_settings(CACHES=CACHES):
        cache, other = caches["default"], caches["other"]
        cache.set("page", "v1")
        other.set("page", "elsewhere")
        assert cache.get("page") == "v1" and cache.get("page") == "v1"
        assert other.get("page") == "elsewhere" and other.get("page") == "elsewhere"
        stats = clustershm.near_stats()
        assert stats["near"]["hits"] >= 1 and stats["other-place"]["hits"] >= 1

        def writer():
            caches["default"].set("page", "v2")
            caches["default"].set_many({"a": 1, "b": 2})

        _in_child(writer)
        wait_until(lambda: cache.get("page") == "v2", message="the cache alias's copy was invalidated")
        assert other.get("page") == "elsewhere"  # another namespace: untouched
        assert cache.get_many(["a", "b"]) == {"a": 1, "b": 2}
        assert cache.get_many(["a", "b"]) == {"a": 1, "b": 2}
        _in_child(lambda: caches["default"].clear())
        wait_until(lambda: cache.get("a") is None, message="clear() reached the copies")
        transport = clustershm.get_client().transport
        if transport.config.kind == "cluster":  # one tracking connection per node, the one serving each namespace
            for ns, tracking in tracker()._by_ns.items():
                assert tracking.node == transport.redis.get_node_from_key(transport.ops.space(ns)[0]).name
            assert len(tracker()._by_node) == len({t.node for t in tracker()._by_ns.values()})


def test_async_hits_stay_on_the_loop_and_misses_go_to_a_thread(near_remote):
    clustershm.set("ak", "v")
    fetched_in = []
    tracker_ = tracker()
    real_fetch = tracker_.fetch

    def fetch(*args):
        fetched_in.append(threading.current_thread())
        return real_fetch(*args)

    tracker_.fetch = fetch

    async def main():
        aio = clustershm.get_client().aio
        assert await aio.aget("ak") == "v"  # a miss
        assert await aio.aget("ak") == "v"  # a hit
        return threading.current_thread()

    try:
        loop_thread = asyncio.run(main())
    finally:
        del tracker_.fetch
    assert len(fetched_in) == 1 and fetched_in[0] is not loop_thread
    assert store_near().hits >= 1


def test_many_processes_read_and_write_one_key(near_remote):
    """Four processes write one key in turn and read it through their near
    caches: none ever reads back an older value of its own after a newer one
    returned (other processes' values may come and go), and in the end every
    process reads the last write."""
    clustershm.set("hot", -1)

    def worker(i):
        for n in range(60):
            mine = i * 1000 + n
            clustershm.set("hot", mine)
            for _ in range(4):
                value = clustershm.get("hot")
                assert not (value // 1000 == i and value < mine), (value, mine)
        clustershm.incr("hot-done")
        wait_until(lambda: clustershm.get("hot-done") == 4, message="every worker finished")
        if i == 0:
            clustershm.set("hot", "end")
        wait_until(lambda: clustershm.get("hot") == "end", message="the last write reached every process")

    clustershm.set("hot-done", 0)
    assert run_forked(4, worker) == [0, 0, 0, 0]
    assert clustershm.get("hot") == "end"


def test_near_cache_options_are_checked():
    assert conf.near_options({"MAX_ENTRIES": 5, "CONSISTENCY": "eventual"}) == (
        5,
        conf.NEAR_CACHE_DEFAULTS["MAX_BYTES"],
        "eventual",
        "adaptive",
        False,
    )
    # Left out: the defaults, marked implicit (on only where the engine makes them its default).
    assert conf.near_options(None) == (2_000, 4 * 2**20, None, "adaptive", True)
    assert conf.near_options(True) == conf.near_options({}) == (2_000, 4 * 2**20, None, "adaptive", False)
    assert conf.near_options(False) is None
    assert conf.near_options({"POLICY": "always"}).policy == "always"
    with pytest.raises(InvalidArgument, match="unknown NEAR_CACHE option"):
        conf.near_options({"MAX_ENTRYS": 5})
    with pytest.raises(InvalidArgument, match="'eventual' or 'strict'"):
        conf.near_options({"CONSISTENCY": "sometimes"})
    with pytest.raises(InvalidArgument, match="'adaptive' or 'always'"):
        conf.near_options({"POLICY": "lru"})
    with pytest.raises(InvalidArgument, match="or False"):
        conf.near_options("yes")


def test_the_redis_engine_has_no_near_cache_unless_asked(remote):
    """Left out, NEAR_CACHE means none on Redis (eventual there: a choice to make), one when asked."""
    from django_clustershm import registry

    client = registry.remote(remote.url, remote.options, timeout=5)
    try:
        assert client.cache("implicit", near_cache=conf.near_options(None))._near_cache is None
        asked = client.cache("asked", near_cache=conf.near_options({"MAX_ENTRIES": 10}))._near_cache
        assert asked is not None and asked.policy == "always"  # CLIENT TRACKING tracks every read
    finally:
        client.shutdown()
        client.transport.shutdown()


# -- strict: a write returns once every live holder dropped its copy -------------------------------


@pytest.fixture
def strict_remote(remote, settings):
    """The module-level API on each remote engine, with a strict near cache on the store."""
    yield from remote_with(settings, remote, {"STRICT_LEASE": 1.0}, NEAR_CACHE={**NEAR, "CONSISTENCY": "strict"})


def test_strict_another_process_write_is_seen_as_soon_as_it_returns(strict_remote):
    """No wait_until here: once the writer's call returned, the copy is gone."""
    import os

    clustershm.set("s", 0)
    r, w = os.pipe()
    go_r, go_w = os.pipe()

    def writer():
        for n in range(1, 31):
            os.read(go_r, 1)
            clustershm.set("s", n)
            os.write(w, b"w")

    pid = fork_call(writer)
    try:
        for n in range(1, 31):
            assert clustershm.get("s") == n - 1 and clustershm.get("s") == n - 1  # a hit, at least the second
            os.write(go_w, b"g")
            assert os.read(r, 1) == b"w"
            assert clustershm.get("s") == n
    finally:
        assert reap(pid, 30) == 0
        for fd in (r, w, go_r, go_w):
            os.close(fd)
    assert store_near().hits >= 30


def test_strict_no_stale_reads_under_concurrent_writers_and_readers(strict_remote):
    """Writers note in shared memory, right after each write returned, how far
    they got; readers in other processes read that note, then the key through
    their near caches: never a value older than the note. (Shared memory, not
    Redis, carries the note: the fastest signal there is, so that a copy a
    writer's invalidation has not reached yet would be caught. With
    CONSISTENCY "eventual" this very test finds stale reads.)"""
    import mmap
    import struct

    seconds = 2.0
    clustershm.set("key0", 0)
    clustershm.set("key1", 0)
    notes = mmap.mmap(-1, 16)

    def writer(w):
        n = 0
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            n += 1
            if n % 7 == 0:
                clustershm.set_many({f"key{w}": n, f"other{w}": n})
            elif n % 11 == 0:
                clustershm.set(f"key{w}", n - 1)
                clustershm.incr(f"key{w}")
            else:
                clustershm.set(f"key{w}", n)
            struct.pack_into("q", notes, 8 * w, n)

    def reader(_r):
        reads = stale = 0
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            for w in range(2):
                (done,) = struct.unpack_from("q", notes, 8 * w)
                value = clustershm.get(f"key{w}") if reads % 3 else clustershm.get_many([f"key{w}"]).get(f"key{w}")
                reads += 1
                if value < done:
                    stale += 1
        assert store_near().hits > 20, store_near().hits  # the near cache really answered
        assert stale == 0, f"{stale} stale reads out of {reads}"

    pids = [fork_call(writer, w) for w in range(2)] + [fork_call(reader, r) for r in range(2)]
    assert [reap(pid, 60) for pid in pids] == [0, 0, 0, 0]
    notes.close()


def test_strict_a_hung_holder_holds_a_writer_up_at_most_its_lease(strict_remote, caplog):
    """A holder stopped (SIGSTOP) cannot acknowledge: the write goes on when its
    lease ends, and once resumed the holder serves no copy until it has caught up."""
    import os
    import signal

    clustershm.set("h", "old")
    r, w = os.pipe()

    def holder():
        assert clustershm.get("h") == "old" and clustershm.get("h") == "old"
        os.write(w, b"h")
        os.kill(os.getpid(), signal.SIGSTOP)
        # Resumed after the write returned: never the old copy.
        assert clustershm.get("h") == "new"

    pid = fork_call(holder)
    assert os.read(r, 1) == b"h"
    wait_until(lambda: stopped(pid), message="the holder stopped")
    with caplog.at_level(logging.WARNING, logger="django_clustershm"):
        clustershm.set("h", "new")  # returns once the holder's lease (1 s) ended
    assert "acknowledgements its strict sessions" in caplog.text
    os.kill(pid, signal.SIGCONT)
    assert reap(pid, 30) == 0
    os.close(r)
    os.close(w)


def test_strict_a_holder_that_exits_cleanly_leaves_at_once(strict_remote, caplog):
    def holder():
        clustershm.set("gone", 1)
        assert clustershm.get("gone") == 1 and clustershm.get("gone") == 1
        current = registry.current()
        current.shutdown()
        current.transport.shutdown()  # what the registry does at a clean exit

    _in_child(holder)
    with caplog.at_level(logging.WARNING, logger="django_clustershm"):
        clustershm.set("gone", 2)
    assert "acknowledgements" not in caplog.text  # nobody left to wait for


def test_strict_a_killed_subscription_empties_the_copies_and_starts_a_new_session(strict_remote, caplog):
    clustershm.set("c", 1)
    assert clustershm.get("c") == 1 and clustershm.get("c") == 1
    hub = tracker().hub
    old_sid = hub.sid

    def kill_and_write():
        client = clustershm.get_client()
        r = client.transport.redis
        nodes = (
            [r.get_redis_connection(n) for n in r.get_primaries()] if client.transport.config.kind == "cluster" else [r]
        )
        killed = 0
        for node in nodes:
            for info in node.client_list():
                if "ssubscribe" in info.get("cmd", "") or info.get("ssub", "0") != "0":
                    killed += node.execute_command("CLIENT", "KILL", "ID", info["id"])
        assert killed >= 1

    with caplog.at_level(logging.WARNING, logger="django_clustershm.near"):
        _in_child(kill_and_write)
        wait_until(lambda: hub.sid != old_sid, message="a new session")
    assert "strict near caches of process" in caplog.text
    _in_child(lambda: clustershm.set("c", 2))
    assert clustershm.get("c") == 2
    wait_until(lambda: hub.serving("", time.monotonic()), message="serving again")
    assert clustershm.get("c") == 2 and clustershm.get("c") == 2


def test_a_resharded_namespace_keeps_its_guarantees(fresh_redis_cluster, settings, caplog):
    """A Cluster moves the slots of the store and of a cache to other primaries,
    keys and all: eventual copies are dropped (the source deletes the keys) and
    misses find the new node; strict copies are dropped (the server ends the
    subscription) and a write after the move is still seen as soon as it returns;
    listeners subscribe again on the new node."""
    from .conftest import remote_options

    cluster = fresh_redis_cluster
    settings.CLUSTERSHM = {
        "ENGINE": cluster.url,
        "ENGINE_OPTIONS": remote_options(STRICT_LEASE=1.0),
        "NEAR_CACHE": NEAR,
    }
    strict_cache = {**CACHES["default"], "OPTIONS": {"NEAR_CACHE": {**NEAR, "CONSISTENCY": "strict"}}}
    registry.reset()
    try:
        with override_settings(CACHES={"default": strict_cache}):
            cache = caches["default"]
            ops = clustershm.get_client().transport.ops
            heard = []
            clustershm.listen("k", lambda *event: heard.append(event[1]))
            clustershm.set("k", 1)
            cache.set("k", 1)
            assert clustershm.get("k") == 1 and clustershm.get("k") == 1
            assert cache.get("k") == 1 and cache.get("k") == 1
            wait_until(lambda: 1 in heard, message="the listener heard the first write")
            for ns in ("", "near"):
                cluster.move_slot_of((ops.space(ns)[0] + b"k").decode())
            _in_child(lambda: (clustershm.set("k", 2), caches["default"].set("k", 2)))
            assert cache.get("k") == 2  # strict: at once
            wait_until(lambda: clustershm.get("k") == 2, message="the eventual copy followed the move")
            wait_until(lambda: 2 in heard, message="the listener subscribed again on the new node")
            _in_child(lambda: (clustershm.set("k", 3), caches["default"].set("k", 3)))
            assert cache.get("k") == 3
            wait_until(lambda: clustershm.get("k") == 3, message="eventual copies work on the new node")
            assert cache.get("k") == 3 and clustershm.near_stats()["near"]["hits"] >= 2
    finally:
        drop_module_client()


def test_strict_from_asyncio_reads_hold_and_writes_wait_for_acknowledgements(strict_remote, monkeypatch):
    """The asyncio client on a strict near cache: a miss is read (and recorded as
    held) in a worker thread; a write waits, without blocking the loop, for the
    acknowledgement of every holder, this process's own included."""
    clustershm.set("as", 1)
    from django_clustershm.redisengine.transport import AsyncRedisTransport

    waits = []
    real = AsyncRedisTransport._acknowledged

    async def acknowledged(self, r, key, reply):
        waits.append(reply[4:])  # the sessions told
        return await real(self, r, key, reply)

    monkeypatch.setattr(AsyncRedisTransport, "_acknowledged", acknowledged)

    async def main():
        aio = clustershm.get_client().aio
        assert await aio.aget("as") == 1  # a miss: this process now holds "as"
        assert await aio.aget("as") == 1  # a hit
        ticks = 0

        async def ticker():
            nonlocal ticks
            while True:
                ticks += 1
                await asyncio.sleep(0)

        task = asyncio.ensure_future(ticker())
        await aio.aset("as", 2)  # told this process's session: waits for its own hub's ack
        task.cancel()
        assert await aio.aget("as") == 2
        return ticks

    assert asyncio.run(main()) > 0  # the loop ran while the write waited
    assert waits == [[tracker().hub.sid]]  # the write waited for this process's own acknowledgement
    assert store_near().hits >= 1
    _in_child(lambda: clustershm.set("as", 3))
    assert clustershm.get("as") == 3


def test_a_process_that_exits_cleanly_gives_back_its_locks_and_strict_sessions(redis_server, tmp_path, caplog):
    """A real interpreter (a gunicorn worker leaves the same way: SystemExit) holds
    a lock and a strict copy, and exits: the lock is free at once, not after its
    lease, and a write waits for no acknowledgement."""
    import os
    import subprocess
    import sys
    import uuid

    prefix = f"t{uuid.uuid4().hex[:10]}"
    script = """
import django, os
django.setup()
from django.core.cache import caches
import django_clustershm as clustershm
assert clustershm.get_client().transport.name == "redis"
caches["near"].set("exit-key", 1)  # the demo's near alias: strict on Redis
assert caches["near"].get("exit-key") == 1 and caches["near"].get("exit-key") == 1
assert clustershm.Lock("exit-lock").acquire()  # no lease: the watchdog's (LOCK_LEASE, 10 s)
print("held", flush=True)
"""
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "testproject.settings",
        "DEMO_ENGINE": redis_server.url,
        "DEMO_ENGINE_PREFIX": prefix,
    }
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, cwd=str(_root()), env=env
    )
    assert proc.returncode == 0 and "held" in proc.stdout, proc.stderr
    from django.test import override_settings

    from .conftest import remote_options

    engine = {"ENGINE": redis_server.url, "ENGINE_OPTIONS": {**remote_options(), "KEY_PREFIX": prefix}}
    with override_settings(CLUSTERSHM=engine):
        registry.reset()
        try:
            assert clustershm.Lock("exit-lock").acquire(timeout=0)  # free at once, not in 10 s
            with caplog.at_level(logging.WARNING, logger="django_clustershm"):
                clustershm.get_client().cache("near").set("exit-key", 2)
            assert "acknowledgements" not in caplog.text  # the exited holder had left
        finally:
            drop_module_client()


def _root():
    from pathlib import Path

    return Path(__file__).resolve().parent.parent


def test_with_the_server_gone_a_strict_read_fails_with_the_outage_not_a_timeout(settings, caplog):
    """A read through a strict near cache while Redis is down raises
    ManagerUnavailable that names the outage (the hub's last error), after a
    few retries' worth of waiting (OUTAGE_WAIT), not the transport's timeout;
    and the outage is logged once, not once per retry."""
    from django_clustershm.exceptions import ManagerUnavailable

    from . import redis_servers
    from .conftest import _binary, remote_options

    server = redis_servers.RedisServer(_binary("redis-server"))
    try:
        settings.CLUSTERSHM = {
            "ENGINE": server.url,
            "ENGINE_OPTIONS": remote_options(),
            "NEAR_CACHE": {**NEAR, "CONSISTENCY": "strict"},
        }
        registry.reset()
        clustershm.set("down", 1)
        assert clustershm.get("down") == 1
        server.stop()
        with caplog.at_level(logging.WARNING, logger="django_clustershm.near"):
            wait_until(lambda: tracker().hub.error is not None, message="the hub saw the server go")
            with pytest.raises(ManagerUnavailable, match=r"could not subscribe to its invalidations.*: .+"):
                clustershm.get("other")
        assert caplog.text.count("strict near caches of process") == 1
    finally:
        drop_module_client()
        server.stop()
