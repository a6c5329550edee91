"""Listeners with real processes: every event, in order, pushed before the writer returns."""

import os
import re
import signal
import threading
import time

import pytest
from django.core.cache import caches
from django.test import override_settings

import django_clustershm as clustershm
import django_clustershm.registry
from django_clustershm.signals import changed
from django_clustershm.wire import frames as P

from .conftest import TRANSPORTS
from .helpers import ManagerProcess, block_until_killed, fork_call, reap, wait_until
from .test_manager import _handshaked_socket


@pytest.fixture(params=TRANSPORTS)
def transport(request):
    """Every transport, the remote engines too (#16): the tests that take ``client`` need
    nothing Manager-specific (the rest, which do, take ``cluster``; the Redis engine's own
    listener tests are in tests/test_redis_listen.py)."""
    return request.param


@pytest.fixture(autouse=True)
def _cancel_handles():
    yield
    client = clustershm.registry.current()
    if client is not None and client._dispatcher is not None:
        for handle in list(client._dispatcher.handles.values()):
            handle.cancel()


def subscriptions() -> int:
    return clustershm.stats()["listeners"]["subscriptions"]


def test_three_listening_processes_see_every_event_in_order(cluster):
    expected = []
    for i in range(300):
        key = f"ev:{i % 7}"
        expected.append((key, i, "set"))
        if i % 50 == 49:
            expected.append((key, None, "remove"))
    expected.append(("ev:end", True, "set"))
    r, w = os.pipe()

    def listener(n):
        got = []
        done = threading.Event()

        def callback(key, value, event):
            got.append((key, value, event))
            if key == "ev:end":
                done.set()

        clustershm.listen(prefix="ev:", callback=callback)
        os.write(w, b"r")
        assert done.wait(30)
        assert got == expected, (len(got), got[:5])

    pids = [fork_call(listener, n) for n in range(3)]
    for _ in pids:
        os.read(r, 1)
    for key, value, event in expected:
        if event == "set":
            clustershm.set(key, value)
        else:
            clustershm.remove(key)
    assert [reap(pid, 60) for pid in pids] == [0, 0, 0]
    os.close(r)
    os.close(w)


def test_the_event_is_on_the_listeners_socket_before_the_writer_gets_its_reply(cluster):
    listener = _handshaked_socket(cluster.address, cluster.secret)
    listener.sendall(P.encode(P.LISTEN, 1, [1, "", "hot", False]))
    reader = P.FrameReader(max_frame=1 << 20)
    assert reader.feed(listener.recv(4096))[0][0] == P.OK
    writer = _handshaked_socket(cluster.address, cluster.secret)
    listener.setblocking(False)
    for i in range(200):
        writer.sendall(P.encode(P.SET, i + 1, ["", "hot", i, None]))
        assert writer.recv(4096)  # the writer's reply is here...
        frames = reader.feed(listener.recv(65536))  # ...so the event must already be (no wait)
        assert [P.decode_payload(p) for _, _, p in frames] == [[1, "", "hot", P.EVENT_SET, i]]
    listener.close()
    writer.close()


def test_cancel_stops_delivery(cluster):
    got = []
    handle = clustershm.listen("c", lambda k, v, e: got.append(v))
    clustershm.set("c", 1)
    wait_until(lambda: got == [1], message="first event")
    handle.cancel()
    clustershm.set("c", 2)
    marker = []
    clustershm.listen("c2", lambda k, v, e: marker.append(v))
    clustershm.set("c2", "after")  # delivered after anything about "c" would have been
    wait_until(lambda: marker == ["after"], message="marker")
    assert got == [1]
    wait_until(lambda: subscriptions() == 1, message="unsubscribed in the Manager")


def test_a_raising_callback_does_not_stop_delivery(cluster, caplog):
    got = []

    def callback(key, value, event):
        if value == 2:
            raise RuntimeError("listener bug")
        got.append(value)

    clustershm.listen("r", callback)
    for v in (1, 2, 3):
        clustershm.set("r", v)
    wait_until(lambda: got == [1, 3], message="events after the raise")
    assert "listener bug" in caplog.text


def test_expire_and_evict_events_arrive(cluster):
    got = []
    clustershm.listen(prefix="", callback=lambda k, v, e: got.append((k, e)))
    clustershm.set("short", 1, timeout=0.05)
    wait_until(lambda: ("short", "expire") in got, timeout=5, message="expire event without any read")
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
        for i in range(4):
            cache.set(f"k{i}", i)
        wait_until(lambda: (cache.make_key("k0"), "evict") in seen, message="evict event")
        cache.clear()
        wait_until(lambda: (None, "clear") in seen, message="clear event")


def test_listeners_of_a_dead_process_are_dropped(cluster):
    r, w = os.pipe()

    def listener():
        clustershm.listen(prefix="x", callback=lambda *a: None)
        os.write(w, b"r")
        block_until_killed()

    pid = fork_call(listener)
    os.read(r, 1)
    assert subscriptions() == 1
    os.kill(pid, signal.SIGKILL)
    reap(pid, 10)
    wait_until(lambda: subscriptions() == 0, message="dead listener dropped")
    os.close(r)
    os.close(w)


def test_a_listener_registered_before_fork_lives_once_in_each_child(cluster):
    """The runcluster case: AppConfig.ready() registers in the master, then it forks."""
    counts = {}

    def callback(key, value, event):
        counts[value] = counts.get(value, 0) + 1

    resyncs = []
    clustershm.listen("flag", callback, on_resync=lambda: resyncs.append(os.getpid()))
    assert resyncs == []  # not on the first subscription
    r, w = os.pipe()

    def child(n):
        # Subscribed again during the fork itself: live before the child runs any code.
        assert clustershm.stats()["listeners"]["by_pid"].get(str(os.getpid())) == 1
        wait_until(lambda: resyncs == [os.getpid()], message="on_resync in the child")
        os.write(w, b"r")
        # "end" is written after "go": once it is here, any duplicate "go" would be too.
        wait_until(lambda: "end" in counts, timeout=30, message="events in the child")
        assert counts == {"go": 1, "end": 1}, counts  # once, not twice

    pids = [fork_call(child, n) for n in range(2)]
    for _ in pids:
        os.read(r, 1)
    clustershm.set("flag", "go")
    clustershm.set("flag", "end")
    assert [reap(pid, 60) for pid in pids] == [0, 0]
    wait_until(lambda: counts == {"go": 1, "end": 1}, message="the parent heard them too")
    assert resyncs == []
    os.close(r)
    os.close(w)


def test_django_signal_is_sent(cluster):
    got = []

    def receiver(sender, key, value, event, **kwargs):
        got.append((sender, key, value, event))

    changed.connect(receiver)
    try:
        clustershm.listen("sig")  # no callback: the signal alone
        clustershm.set("sig", "v")
        wait_until(lambda: got == [("", "sig", "v", "set")], message="signal")
    finally:
        changed.disconnect(receiver)


#: The listener backlog of the Manager in the slow-listener test: small, so
#: that what the Manager queued can be told from its default (16 MiB) and
#: from no limit at all.
SMALL_BACKLOG = 1 << 20


@pytest.fixture
def small_backlog_cluster(monkeypatch):
    """A cluster whose Manager cuts listeners off at SMALL_BACKLOG bytes.

    Manager.max_listener_backlog is a class attribute: set here, before the
    fork, the Manager's process inherits it."""
    from django_clustershm.server.manager import Manager

    monkeypatch.setattr(Manager, "max_listener_backlog", SMALL_BACKLOG)
    proc = ManagerProcess().start()
    clustershm.configure(proc.address, proc.secret)
    yield proc
    clustershm.configure(None)
    proc.cleanup()


def test_a_slow_listener_is_cut_off_and_does_not_stall_writers(small_backlog_cluster):
    cluster = small_backlog_cluster
    r, w = os.pipe()

    def slow_listener():
        def callback(key, value, event):
            threading.Event().wait()  # never keeps up: stuck on its first event

        clustershm.listen(prefix="big:", callback=callback)
        os.write(w, b"r")
        block_until_killed()

    pid = fork_call(slow_listener)
    os.close(w)  # the child's copy only: EOF here if it dies before listening
    try:
        assert os.read(r, 1) == b"r", "the listener process failed to subscribe"
        value = os.urandom(256 * 1024)
        start = time.monotonic()
        for i in range(200):  # 50 MiB of events for a listener that reads none after the first
            clustershm.set(f"big:{i % 4}", value)
        elapsed = time.monotonic() - start
        assert elapsed < 30  # the writer never waits for the listener
        reason = rf"closing client \(pid {pid}\): listener too slow: (\d+) bytes of events pending"
        found = wait_until(
            lambda: re.search(reason, cluster.log()), message="the slow listener cut off, with a logged reason"
        )
        # What the Manager had queued for that connection when it cut it off:
        # over the limit by at most the one event that crossed it (the value
        # and a header), so what a slow listener costs the Manager is bounded
        # by the limit (with no limit, or the default one, this fails).
        pending = int(found.group(1))
        most = SMALL_BACKLOG + len(value) + 1024
        assert SMALL_BACKLOG < pending <= most, f"{pending} bytes queued, limit {SMALL_BACKLOG}"
    finally:
        os.kill(pid, signal.SIGKILL)  # also on failure: the child would otherwise wait forever
        reap(pid, 10)
        os.close(r)


def test_embedded_listeners():
    got = []
    handle = clustershm.listen(prefix="e:", callback=lambda k, v, e: got.append((k, v, e)))
    clustershm.set("e:1", [1])
    clustershm.remove("e:1")
    wait_until(lambda: got == [("e:1", [1], "set"), ("e:1", None, "remove")], message="embedded events")
    handle.cancel()


def test_listen_arguments():
    with pytest.raises(TypeError):
        clustershm.listen()
    with pytest.raises(TypeError):
        clustershm.listen("k", prefix="p")
    with pytest.raises(TypeError):
        clustershm.listen("k", callback="not callable")


# -- the writer's own process (see client/dispatcher.py, "What a listener sees") -----------------


def test_the_writers_own_callbacks_have_run_when_its_call_returns(client):
    """On every transport: 200 writes, and after each returns its callback has run."""
    got = []
    handle = client.listen(prefix="own:", callback=lambda k, v, e: got.append((k, v, e)))
    for i in range(200):
        client.set(f"own:{i % 3}", i)
        assert got[-1] == (f"own:{i % 3}", i, "set"), (i, got[-3:])
    client.incr("own:n")
    assert got[-1] == ("own:n", 1, "set")
    client.remove("own:n")
    assert got[-1] == ("own:n", None, "remove")
    client.set_many({"own:a": "A", "own:b": "B"})
    assert sorted(got[-2:]) == [("own:a", "A", "set"), ("own:b", "B", "set")]
    client.clear()
    assert got[-1] == (None, None, "clear")
    n = len(got)
    client.set("other", 1)  # a key no handle here listens to: no barrier, no event
    assert len(got) == n
    handle.cancel()


def test_other_threads_of_the_writers_process_are_covered_too(client):
    got = set()
    client.listen(prefix="t:", callback=lambda k, v, e: got.add(v))
    errors = []

    def writer(t):
        for i in range(50):
            value = (t, i)
            client.set(f"t:{t}", value)
            if value not in got:
                errors.append(value)

    threads = [threading.Thread(target=writer, args=(t,)) for t in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    client.shutdown()


def test_a_write_from_a_callback_does_not_wait_for_itself(client):
    """A callback that writes a key it listens to must not deadlock on the barrier."""
    got = []

    def callback(key, value, event):
        got.append(value)
        if value < 3:
            client.set("chain", value + 1)  # from the dispatcher thread: no barrier

    client.listen("chain", callback)
    start = time.monotonic()
    client.set("chain", 0)
    wait_until(lambda: got == [0, 1, 2, 3], timeout=5, message="the chain of writes")
    assert time.monotonic() - start < 2  # no barrier timed out on the way
    client.shutdown()
