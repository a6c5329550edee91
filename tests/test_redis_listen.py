"""listen() on the Redis engine (#16, part 1): redisengine/events.py and the write scripts' events.

Every test runs on each remote engine (redis, valkey, a Redis Cluster, Sentinel), with
the writes made by ANOTHER (forked) process unless the writer's own process is the point.
No fixed sleeps: every wait is wait_until on a condition.
"""

import logging
import os
import threading

import msgpack
import pytest
from django.core.cache import caches
from django.test import override_settings

import django_clustershm as clustershm
from django_clustershm import registry
from django_clustershm.signals import changed

from .conftest import remote_with
from .helpers import drop_module_client, fork_call, reap, run_forked, stopped, wait_until


@pytest.fixture(autouse=True)
def _cancel_handles():
    yield
    client = registry.current()
    if client is not None and client._dispatcher is not None:
        for handle in list(client._dispatcher.handles.values()):
            handle.cancel()


def _in_child(fn, *args):
    assert reap(fork_call(fn, *args), 60) == 0


def _redis():
    return registry.get_client().transport.redis


def test_events_of_another_process_reach_key_and_prefix_listeners(remote):
    by_prefix, by_key, elsewhere = [], [], []
    clustershm.listen(prefix="ev:", callback=lambda k, v, e: by_prefix.append((k, v, e)))
    clustershm.listen("x", lambda k, v, e: by_key.append((k, v, e)))
    clustershm.listen(prefix="zz:", callback=lambda k, v, e: elsewhere.append((k, v, e)))

    def writer():
        clustershm.set("ev:a", 1)
        clustershm.set("other", 1)  # nobody listens
        clustershm.incr("ev:n")
        clustershm.incr("ev:n", 5)
        assert clustershm.add("ev:b", "B")
        assert not clustershm.add("ev:b", "again")  # not stored: no event
        clustershm.set_many({"ev:c": [1], "ev:d": "D"})
        assert clustershm.delete_many(["ev:c", "ev:missing"]) == 1
        assert clustershm.touch("ev:a", 0)  # expired at once: removed
        assert clustershm.remove("ev:d")
        assert not clustershm.remove("ev:d")  # absent: no event
        clustershm.set("xy", 1)  # not the key "x"
        clustershm.set("x", "X")
        clustershm.set("ev:big", b"\x01" * 100_000)  # over 64 KiB: read by the listener
        clustershm.clear()

    _in_child(writer)
    expected = [
        ("ev:a", 1, "set"),
        ("ev:n", 1, "set"),
        ("ev:n", 6, "set"),
        ("ev:b", "B", "set"),
        ("ev:c", [1], "set"),
        ("ev:d", "D", "set"),
        ("ev:c", None, "remove"),
        ("ev:a", None, "remove"),
        ("ev:d", None, "remove"),
        ("ev:big", None, "set"),  # replaced below: the value is read at delivery
        (None, None, "clear"),
    ]
    wait_until(lambda: len(by_prefix) >= len(expected), message="events of the prefix")
    assert [e[2] for e in by_prefix] == [e[2] for e in expected]
    big = by_prefix[9]
    assert big[0] == "ev:big" and big[1] in (b"\x01" * 100_000, None)  # None if cleared before the read
    assert by_prefix[:9] + by_prefix[10:] == expected[:9] + expected[10:]
    wait_until(lambda: len(by_key) == 2, message="events of the key")
    assert by_key == [("x", "X", "set"), (None, None, "clear")]
    assert elsewhere == [(None, None, "clear")]  # a clear reaches every listener of the namespace


def test_per_key_order_is_kept_under_four_writers(remote):
    got: dict[str, list] = {}
    clustershm.listen(prefix="w:", callback=lambda k, v, e: got.setdefault(k, []).append(v))

    def writer(i):
        for n in range(100):
            clustershm.set(f"w:{i}", n)

    assert run_forked(4, writer) == [0, 0, 0, 0]
    wait_until(lambda: all(len(got.get(f"w:{i}", ())) == 100 for i in range(4)), message="every event")
    assert got == {f"w:{i}": list(range(100)) for i in range(4)}


def test_the_writers_own_callbacks_have_run_when_its_call_returns(remote):
    got = []
    clustershm.listen(prefix="own:", callback=lambda k, v, e: got.append((k, v)))
    for i in range(100):
        clustershm.set(f"own:{i % 3}", i)
        assert got[-1] == (f"own:{i % 3}", i)


def test_expire_evict_and_clear_events(remote):
    got = []
    clustershm.listen(prefix="", callback=lambda k, v, e: got.append((k, e)))
    _in_child(lambda: clustershm.set("short", 1, timeout=0.2))
    # Told by the server's keyspace notifications, without any read of the key.
    wait_until(lambda: ("short", "expire") in got, timeout=10, message="expire event")
    with override_settings(
        CACHES={
            "default": {
                "BACKEND": "django_clustershm.cache.ClusterShmCache",
                "LOCATION": "evict",
                "OPTIONS": {"MAX_ENTRIES": 3, "CULL_FREQUENCY": 3},
            }
        }
    ):
        cache = caches["default"]
        seen = []
        clustershm.listen(prefix="", cache="default", callback=lambda k, v, e: seen.append((k, e)))

        def fill():
            for i in range(4):
                cache.set(f"k{i}", i)
            cache.clear()

        _in_child(fill)
        wait_until(lambda: (cache.make_key("k0"), "evict") in seen, message="evict event")
        wait_until(lambda: (None, "clear") in seen, message="clear event")
        assert seen.index((cache.make_key("k0"), "evict")) < seen.index((None, "clear"))


def _kill_pubsub_clients():
    r = _redis()
    if registry.get_client().transport.config.kind == "cluster":
        r.execute_command("CLIENT", "KILL", "TYPE", "pubsub", target_nodes=r.ALL_NODES)
    else:
        r.execute_command("CLIENT", "KILL", "TYPE", "pubsub")


def test_on_resync_after_the_connection_is_killed_and_delivery_resumes(remote, caplog):
    got, resyncs = [], []
    clustershm.listen("rk", lambda k, v, e: got.append(v), on_resync=lambda: resyncs.append(1))
    _in_child(lambda: clustershm.set("rk", 1))
    wait_until(lambda: got == [1], message="the first event")
    _kill_pubsub_clients()
    wait_until(lambda: resyncs == [1], message="on_resync after CLIENT KILL")
    _in_child(lambda: clustershm.set("rk", 2))
    wait_until(lambda: got == [1, 2], message="delivery after the resync")
    assert "subscribing again" in caplog.text


def test_a_forged_event_does_not_stop_delivery(remote, caplog):
    got = []
    clustershm.listen("bs", lambda k, v, e: got.append((v, e)))
    ops = registry.get_client().transport.ops
    channel = ops.space("")[3][:-2] + b"#e"
    forged = msgpack.packb([1, b"bs", b"S" + b"0" * 32 + b"not signed by this site"])
    with caplog.at_level(logging.WARNING, logger="django_clustershm.listen"):
        _redis().spublish(channel, forged)
        _redis().spublish(channel, b"\xc1 not msgpack")
        _in_child(lambda: clustershm.set("bs", "good"))
        wait_until(lambda: got == [(None, "set"), ("good", "set")], message="delivery after forged events")
    assert "bad signature" in caplog.text
    assert "not one of ours" in caplog.text


def test_the_django_signal_fires(remote):
    got = []

    def receiver(sender, key, value, event, **kwargs):
        got.append((sender, key, value, event))

    changed.connect(receiver)
    try:
        clustershm.listen("sig")  # no callback: the signal alone
        _in_child(lambda: clustershm.set("sig", "v"))
        wait_until(lambda: got == [("", "sig", "v", "set")], message="signal")
    finally:
        changed.disconnect(receiver)


def test_writes_nobody_listens_to_publish_nothing(remote):
    """Without a listener, the presence key is absent and the scripts publish nothing."""
    ops = registry.get_client().transport.ops
    channel = ops.space("")[3][:-2] + b"#e"
    r = _redis()
    assert r.exists(ops.space("")[3]) == 0
    if registry.get_client().transport.config.kind == "cluster":
        node = r.get_node_from_key(channel)
        numsub = r.get_redis_connection(node).execute_command("PUBSUB", "SHARDNUMSUB", channel)
    else:
        numsub = r.execute_command("PUBSUB", "SHARDNUMSUB", channel)
    assert numsub[1] == 0
    clustershm.set("quiet", 1)  # no listener: nothing to wait for
    heard = threading.Event()
    clustershm.listen("quiet", lambda k, v, e: heard.set())
    assert r.exists(ops.space("")[3]) == 1
    assert 0 < r.pttl(ops.space("")[3]) <= 15_000
    clustershm.set("quiet", 2)
    assert heard.is_set()  # the writer's own: run before set() returned


def test_listeners_survive_fork(remote):
    """A listener registered before a fork is subscribed again in the child."""
    counts: dict = {}
    clustershm.listen("flag", lambda k, v, e: counts.__setitem__(v, counts.get(v, 0) + 1))
    r, w = os.pipe()

    def child():
        os.write(w, b"r")
        wait_until(lambda: "end" in counts, timeout=30, message="events in the child")
        assert counts == {"go": 1, "end": 1}, counts

    pid = fork_call(child)
    os.read(r, 1)
    # The child's subscription is live before it runs (resume_after_fork waits for it).
    clustershm.set("flag", "go")
    clustershm.set("flag", "end")
    assert reap(pid, 60) == 0
    assert counts == {"go": 1, "end": 1}
    os.close(r)
    os.close(w)


def test_a_sentinel_failover_resyncs_the_listeners_and_delivery_resumes(fresh_redis_sentinel):
    from .conftest import remote_options

    client = registry.remote(fresh_redis_sentinel.url, remote_options(), timeout=1)
    got, resyncs = [], []
    try:
        client.listen("fo", lambda k, v, e: got.append(v), on_resync=lambda: resyncs.append(1))
        client.set("fo", 1)
        assert got == [1]
        fresh_redis_sentinel.kill_primary()
        wait_until(lambda: resyncs, timeout=60, message="on_resync after the failover")

        def write():
            try:
                client.set("fo", 2)
                return True
            except clustershm.ManagerUnavailable:
                return False

        wait_until(write, timeout=60, interval=0.2, message="a write on the new primary")
        wait_until(lambda: got[-1:] == [2], message="delivery from the new primary")
    finally:
        client.shutdown()
        client.transport.shutdown()


# -- strict listeners (STRICT_LISTENERS): a write returns once every listening process ran its callbacks --


@pytest.fixture
def strict_listening(remote, settings):
    yield from remote_with(settings, remote, {"STRICT_LISTENERS": True, "STRICT_LEASE": 1.0})


def test_strict_listeners_have_run_when_another_process_write_returns(strict_listening):
    """No wait_until: the writer signals once its call returned, and by then the
    (slow) callback of this process has run for every write."""
    import time

    assert clustershm.get_client().capabilities()["listeners"].startswith("strict")
    seen = []

    def slow(key, value, event):
        time.sleep(0.02)
        seen.append((key, value, event))

    r, w = os.pipe()
    go_r, go_w = os.pipe()

    def writer():
        for n in range(10):
            os.read(go_r, 1)
            if n == 5:
                clustershm.set_many({"sl:a": n, "sl:b": n})
            else:
                clustershm.set("sl:a", n)
            os.write(w, b"w")

    pid = fork_call(writer)  # before listen(): the writer is not a listener itself
    clustershm.listen(prefix="sl:", callback=slow)
    try:
        for n in range(10):
            os.write(go_w, b"g")
            assert os.read(r, 1) == b"w"
            assert ("sl:a", n, "set") in seen, (n, seen)
            if n == 5:
                assert ("sl:b", n, "set") in seen
    finally:
        assert reap(pid, 30) == 0
        for fd in (r, w, go_r, go_w):
            os.close(fd)


def test_a_hung_strict_listener_holds_a_writer_up_at_most_its_lease(strict_listening, caplog):
    import signal

    r, w = os.pipe()

    def listener():
        seen = []
        clustershm.listen("hung", lambda *event: seen.append(event))
        os.write(w, b"l")
        os.kill(os.getpid(), signal.SIGSTOP)
        wait_until(lambda: seen, message="the event, once resumed")

    pid = fork_call(listener)
    assert os.read(r, 1) == b"l"
    wait_until(lambda: stopped(pid), message="the listener stopped")
    with caplog.at_level(logging.WARNING, logger="django_clustershm"):
        clustershm.set("hung", 1)  # returns once the listener's lease (1 s) ended
    assert "acknowledgements its strict sessions" in caplog.text
    os.kill(pid, signal.SIGCONT)
    assert reap(pid, 30) == 0
    os.close(r)
    os.close(w)


def test_a_strict_listener_that_stops_listening_leaves_at_once(strict_listening, caplog):
    def listener():
        handle = clustershm.listen("left", lambda *event: None)
        clustershm.set("left", 0)
        handle.cancel()
        current = registry.current()
        current.shutdown()
        current.transport.shutdown()

    _in_child(listener)
    with caplog.at_level(logging.WARNING, logger="django_clustershm"):
        clustershm.set("left", 1)
    assert "acknowledgements" not in caplog.text


def test_a_server_that_refuses_config_still_tells_writes_and_says_so_once(
    redis_server_without_config, settings, caplog
):
    """A managed Redis refuses CONFIG SET: keyspace notifications cannot be turned
    on, so listeners hear the events of writes but not of keys the server expires
    itself; one warning says so. Near caches (both consistencies) need no CONFIG."""
    from .conftest import remote_options

    settings.CLUSTERSHM = {
        "ENGINE": redis_server_without_config.url,
        "ENGINE_OPTIONS": remote_options(STRICT_LISTENERS=True),
        "NEAR_CACHE": {"MAX_ENTRIES": 100, "CONSISTENCY": "strict"},
    }
    registry.reset()
    try:
        with caplog.at_level(logging.WARNING, logger="django_clustershm.listen"):
            seen = []
            clustershm.listen("cfg", lambda *event: seen.append(event[1:]))
            clustershm.listen("cfg2", lambda *event: seen.append(event[1:]))
            _in_child(lambda: clustershm.set("cfg", 1))
            assert (1, "set") in seen  # strict listeners: run before the writer's call returned
        assert caplog.text.count("refused to turn on keyspace notifications") == 1, caplog.text
        assert "notify-keyspace-events" in caplog.text
        clustershm.set("near", "v")
        assert clustershm.get("near") == "v" and clustershm.get("near") == "v"
        assert clustershm.near_stats()[""]["hits"] >= 1
        _in_child(lambda: clustershm.set("near", "w"))
        assert clustershm.get("near") == "w"
    finally:
        drop_module_client()
