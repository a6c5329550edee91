"""The client API, run on both transports (socket and embedded) for the same semantics."""

import datetime
import os
import signal
import threading
import time

import pytest

from django_clustershm.exceptions import (
    ArgumentTypeError,
    ClusterShmError,
    IntegerOverflow,
    InvalidArgument,
    InvalidKey,
    KeyNotFound,
    KeyTooLarge,
    ManagerUnavailable,
    NotAnInteger,
    SerializationError,
    ValueTooLarge,
)
from django_clustershm.wire import frames as F
from django_clustershm.wire.frames import FRAME_OVERHEAD
from django_clustershm.wire.limits import Limits

from .helpers import ManagerProcess, embedded_client, fork_call, reap, socket_client, wait_until


def test_set_get_remove(client):
    client.set("myObj", {"name": "Tom", "age": 10})
    assert client.get("myObj") == {"name": "Tom", "age": 10}
    assert client.remove("myObj") is True
    assert client.get("myObj") is None
    assert client.get("myObj", "dflt") == "dflt"
    assert client.remove("myObj") is False


def test_values_are_copies(client):
    value = {"list": [1, 2]}
    client.set("v", value)
    value["list"].append(3)
    got = client.get("v")
    assert got == {"list": [1, 2]}
    got["list"].append(4)
    assert client.get("v") == {"list": [1, 2]}


@pytest.mark.parametrize(
    "value",
    [0, -1, 2**63 - 1, -(2**63), 2**64, True, False, None, 1.5, "s", b"b", [1, "a"], {"x": (1, 2)}, {1, 2}],
)
def test_value_types_round_trip(client, value):
    client.set("k", value)
    got = client.get("k", default="missing")
    assert got == value and type(got) is type(value)


def test_none_is_a_value_not_a_miss(client):
    client.set("n", None)
    assert client.has("n")
    assert client.get("n", "dflt") is None


def test_unicode_keys(client):
    client.set("clé-ключ-鍵", 1)
    assert client.get("clé-ключ-鍵") == 1
    assert client.keys("clé") == ["clé-ключ-鍵"]


def test_has_and_add(client):
    assert not client.has("a")
    assert client.add("a", 1) is True
    assert client.add("a", 2) is False
    assert client.get("a") == 1


def test_expiry(client):
    client.set("t", "v", timeout=0.05)
    assert client.get("t") == "v"
    wait_until(lambda: client.get("t") is None, timeout=5, message="expiry")
    assert not client.has("t")


def test_touch(client):
    client.set("t", 1, timeout=0.05)
    client.set("witness", 1, timeout=0.05)  # same expiry, not touched
    assert client.touch("t", None)
    wait_until(lambda: client.get("witness") is None, timeout=5, message="the witness's expiry")
    assert client.get("t") == 1
    assert not client.touch("nope", 10)


def test_incr_decr(client):
    assert client.incr("n") == 1
    assert client.incr("n", 10) == 11
    assert client.decr("n", 20) == -9
    assert client.decr("fresh") == -1
    assert client.get("n") == -9
    with pytest.raises(KeyNotFound):
        client.incr("missing", default=None)
    assert not client.has("missing")
    client.set("s", "text")
    with pytest.raises(NotAnInteger):
        client.incr("s")
    client.set("big", 2**63 - 1)
    with pytest.raises(IntegerOverflow):
        client.incr("big")
    with pytest.raises(TypeError):
        client.incr("n", 1.5)


def test_many(client):
    client.set_many({"a": 1, "b": [2], "c": "3"})
    assert client.get_many(["a", "b", "zz"]) == {"a": 1, "b": [2]}
    assert client.delete_many(["a", "zz", "b"]) == 2
    assert client.get_many([]) == {}
    assert client.keys() == ["c"]


def test_keys_and_clear(client):
    for i in range(5):
        client.set(f"flags:{i}", i)
    client.set("other", 1)
    assert sorted(client.keys("flags:")) == [f"flags:{i}" for i in range(5)]
    assert client.clear() == 6
    assert client.keys() == []


def test_stats(client):
    client.set("a", b"x" * 100)
    client.get("a")
    client.get("missing")
    stats = client.stats()
    assert stats["store"]["keys"] == 1
    if client.transport.name == "redis":  # the server's own figures (the README's table says which)
        assert stats["server"]["used_memory"] > 0 and stats["server"]["keyspace_hits"] >= 1
        assert stats["capabilities"]["engine"].startswith("redis")
        assert client.ping()
        return
    assert stats["store"]["bytes"] >= 100
    assert stats["store"]["hits"] == 1 and stats["store"]["misses"] == 1
    assert stats["ops"] >= 3
    assert os.getpid() in [c["pid"] for c in stats["clients"]]
    assert client.ping()


def test_a_caches_writes_carry_its_bounds_but_an_incr_that_creates_nothing_sends_none():
    """What a cache keyspace sends: its bounds with every write that may
    store a new key (aliases of one cache keep their own MAX_ENTRIES and
    CULL_FREQUENCY), none with Django's incr (``default=None``: a missing key
    raises, nothing is created, so there is nothing to cull for), none on
    the store (#19 part 5)."""
    client = embedded_client()
    cache = client.cache("t", max_entries=5, cull_frequency=2, max_bytes=10**6)
    sent = []
    call = client.transport.call

    def recording(op, args, *rest):
        sent.append((op, list(args)))
        return call(op, args, *rest)

    client.transport.call = recording
    try:
        cache.set("k", 1, 60)
        assert cache.incr("k", default=None) == 2
        with pytest.raises(KeyNotFound):
            cache.incr("missing", default=None)
        assert cache.incr("n") == 1
        cache.add("a", 1)
        client.set("s", 1)
        assert client.incr("s", default=None) == 2
    finally:
        del client.transport.call
    bounds = [5, 2, 10**6]
    assert sent == [
        (F.SET, ["t", "k", 1, 60, bounds]),
        (F.INCR, ["t", "k", 1, None]),
        (F.INCR, ["t", "missing", 1, None]),
        (F.INCR, ["t", "n", 1, 0, bounds]),
        (F.ADD, ["t", "a", 1, None, bounds]),
        (F.SET, ["", "s", 1, None]),
        (F.INCR, ["", "s", 1, None]),
    ]
    assert cache.get("k") == 2 and cache.ttl("k") > 0  # the incr kept the key's expiry


# -- bad input: a clear error in the caller, nothing sent, nothing lost --------


def test_bad_keys(client):
    client.set("keep", 1)
    for bad in (None, 1, b"bytes", ("t",)):
        with pytest.raises(InvalidKey):
            client.set(bad, 1)
    with pytest.raises(InvalidKey):
        client.set("\ud800" * 2000, 1)  # a lone surrogate cannot be UTF-8
    with pytest.raises(InvalidKey):
        client.set("\ud800", 1)
    with pytest.raises(KeyTooLarge):
        client.set("k" * 5000, 1)
    with pytest.raises(ValueTooLarge):  # KeyTooLarge is a ValueTooLarge too
        client.get("é" * 3000)
    assert client.get("keep") == 1
    assert client.keys() == ["keep"]


def test_value_too_large_is_raised_before_sending(client):
    client.set("keep", 1)
    too_big = b"x" * (client.limits.max_value + 1)
    with pytest.raises(ValueTooLarge, match="MAX_VALUE_SIZE"):
        client.set("big", too_big)
    with pytest.raises(ValueTooLarge):
        client.set_many({"ok": 1, "big": too_big})
    assert client.get("ok") is None and client.get("big") is None
    assert client.get("keep") == 1


def test_large_values_are_welcome(client):
    big = os.urandom(8 * 1024 * 1024)
    client.set("big", big)
    assert client.get("big") == big


def test_unpicklable_value(client):
    lock = threading.Lock()
    with pytest.raises(SerializationError, match="cannot pickle"):
        client.set("k", lock)
    import pickle

    with pytest.raises(pickle.PickleError):  # what Django's cache tests expect
        client.set("k", lambda: None)
    assert not client.has("k")


def test_errors_share_one_root(client):
    with pytest.raises(ClusterShmError):
        client.incr("missing", default=None)


BAD_CALLS = [
    (ArgumentTypeError, "timeout", lambda c: c.set("k", 1, timeout="5")),
    (ArgumentTypeError, "timeout", lambda c: c.set("k", 1, timeout=datetime.timedelta(seconds=5))),
    (ArgumentTypeError, "timeout", lambda c: c.set("k", 1, timeout=True)),
    (InvalidArgument, "timeout", lambda c: c.set("k", 1, timeout=float("nan"))),
    (InvalidArgument, "timeout", lambda c: c.add("k", 1, timeout=float("inf"))),
    (ArgumentTypeError, "timeout", lambda c: c.touch("k", "5")),
    (InvalidArgument, "timeout", lambda c: c.set_many({"k": 1}, timeout=float("-inf"))),
    (ArgumentTypeError, "delta", lambda c: c.incr("k", 1.5)),
    (ArgumentTypeError, "default", lambda c: c.incr("k", 1, default="0")),
    (InvalidArgument, "delta", lambda c: c.incr("k", 2**64)),
    (ArgumentTypeError, "token", lambda c: c.lock_release("held", None)),
    (ArgumentTypeError, "token", lambda c: c.lock_release("held", b"short")),
    (InvalidArgument, "lease", lambda c: c.lock_acquire("other", lease=-1, wait=0)),
    (ArgumentTypeError, "lease", lambda c: c.lock_acquire("other", lease="30", wait=0)),
    (ArgumentTypeError, "timeout", lambda c: c.lock_acquire("other", wait="1")),
]


def test_bad_arguments_raise_the_same_error_everywhere_and_keep_the_lock(client, transport):
    """Each mistake raises a ClusterShmError naming the argument, before
    anything is sent; the thread's connection (and so its lock) survives."""
    token, _fence = client.lock_acquire("held", None, 0)
    for error, argument, call in BAD_CALLS:
        with pytest.raises(error, match=argument):
            call(client)
    assert client.get("k") is None  # nothing was stored by a refused call
    assert client.lock_status("held", token) == [True, True]
    if transport == "embedded":
        other = threading.Thread(target=lambda: taken.append(client.lock_acquire("held", None, 0)))
        taken: list = []
        other.start()
        other.join()
        assert taken == [None]
    elif client.transport.name == "redis":

        def another_process():
            assert client.lock_acquire("held", None, 0) is None  # the child's own connections

        assert reap(fork_call(another_process), 10) == 0
    else:
        address, secret = client.transport.address, client.transport.secret

        def another_process():
            assert socket_client(address, secret).lock_acquire("held", None, 0) is None

        assert reap(fork_call(another_process), 10) == 0
    assert client.lock_release("held", token) is False


def test_a_batch_over_the_frame_limit_fails_the_same_way_in_both_modes(transport):
    limits = Limits(max_key=100, max_value=1000, max_frame=1000 + FRAME_OVERHEAD)
    if transport == "embedded":
        client, proc = embedded_client(limits=limits), None
    else:
        proc = ManagerProcess(limits=limits).start()
        client = socket_client(proc.address, proc.secret)
    try:
        batch = {f"k{i}": b"x" * 900 for i in range(100)}  # 90 kB in one request
        with pytest.raises(ValueTooLarge, match="over the maximum frame of 66536; send fewer items"):
            client.set_many(batch)
        assert client.get_many(list(batch)) == {}  # all or nothing
        for i in range(0, 100, 10):
            client.set_many({k: batch[k] for k in list(batch)[i : i + 10]})
        with pytest.raises(ValueTooLarge, match=r"reply would be about .* over the maximum frame of 66536"):
            client.get_many(list(batch))
        assert len(client.get_many(list(batch)[:50])) == 50
    finally:
        client.close()
        if proc is not None:
            proc.cleanup()


# -- the socket transport only -------------------------------------------------------


def test_no_manager_fails_fast(tmp_path):
    client = socket_client(str(tmp_path / "none.sock"), b"s", timeout=5)
    start = time.monotonic()
    with pytest.raises(ManagerUnavailable, match="no Manager is listening"):
        client.get("a")
    assert time.monotonic() - start < 1


def test_a_hung_manager_times_out_instead_of_hanging(manager_process):
    client = socket_client(manager_process.address, manager_process.secret, timeout=0.3)
    client.set("a", 1)
    os.kill(manager_process.pid, signal.SIGSTOP)
    try:
        start = time.monotonic()
        with pytest.raises(ManagerUnavailable, match=r"within 0\.3s"):
            client.get("a")
        assert time.monotonic() - start < 2
    finally:
        os.kill(manager_process.pid, signal.SIGCONT)
    # The connection that timed out was dropped; the next call uses a new one.
    assert client.get("a") == 1
    client.close()


def test_manager_death_then_restart_reconnects():
    proc = ManagerProcess().start()
    client = socket_client(proc.address, proc.secret, timeout=2)
    try:
        client.set("a", 1)
        proc.kill()  # SIGKILL: no goodbye
        with pytest.raises(ManagerUnavailable):
            client.get("a")
        proc.start()  # same address and secret, empty state
        assert client.get("a") is None
        client.set("a", 2)
        # A restart while the client holds an idle connection: the next call
        # finds the socket dead on send and transparently uses a new one.
        proc.stop()
        proc.start()
        assert client.get("a") is None
    finally:
        client.close()
        proc.cleanup()


def test_each_thread_has_its_own_connection(socket_client):
    seen = []  # the connections themselves: a freed one's id() could be reused
    errors = []

    def work(i):
        try:
            for _ in range(200):
                socket_client.incr("t")
            seen.append(socket_client.transport._local.conn)
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert socket_client.get("t") == 800
    assert len({id(conn) for conn in seen}) == 4


def test_limits_come_from_the_manager():
    proc = ManagerProcess(limits=Limits(max_key=16, max_value=1000)).start()
    client = socket_client(proc.address, proc.secret)
    try:
        with pytest.raises(KeyTooLarge):
            client.set("k" * 17, 1)
        with pytest.raises(ValueTooLarge):
            client.set("k", b"x" * 1001)
        client.set("k" * 16, b"x" * 900)
    finally:
        client.close()
        proc.cleanup()
