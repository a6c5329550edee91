"""What django-redis users reach for (#17 part 1): ttl, pttl, expire, pexpire,
expire_at, pexpire_at, persist, keys, iter_keys, delete_pattern, lock and
set(nx=/xx=), and their async forms.

On every transport (embedded, socket, socket + near cache): the store's API
through the ``client`` fixture, and the Django cache backend, with KEY_PREFIX
and VERSION set, through ``cache``. Round trips are counted by the Manager
(``stats()["ops"]``); iter_keys walks 50,000 keys while another process
writes and removes keys, in flat memory.
"""

from __future__ import annotations

import asyncio
import datetime
import inspect
import os
import threading
import time
import tracemalloc

import pytest
from django.core.cache import caches
from django.test import override_settings

import django_clustershm as clustershm
from django_clustershm import ArgumentTypeError, InvalidArgument, InvalidKey, KeyTooLarge, Lock
from django_clustershm.cache import FRESH_SUFFIX
from django_clustershm.lock import AsyncLock

from .helpers import ManagerProcess, fork_call, reap, wait_until

UTC = datetime.timezone.utc
BACKEND = "django_clustershm.cache.ClusterShmCache"
NEAR = {"NEAR_CACHE": {"MAX_ENTRIES": 100_000, "MAX_BYTES": 64 << 20}}
BIG = {"MAX_ENTRIES": 1_000_000, "MAX_BYTES": 256 << 20}


def ops(client) -> int:
    return client.stats()["ops"]


def one_request(client, call):
    """Run ``call()``; assert the Manager counted exactly one request for it; return its result."""
    before = ops(client)
    result = call()
    assert ops(client) - before == 2, "more than one request (the +1 is the second stats call)"
    return result


# -- the store's API (a Keyspace), on every transport --------------------------------------


def test_ttl_expire_and_persist(client):
    client.set("forever", 1)
    client.set("short", 2, timeout=60)
    assert client.ttl("forever") is None
    assert 59 < client.ttl("short") <= 60 and isinstance(client.ttl("short"), float)
    assert client.ttl("missing") == 0
    assert client.expire("forever", 30) is True and 29 < client.ttl("forever") <= 30
    assert client.expire("forever", datetime.timedelta(minutes=2)) is True and 119 < client.ttl("forever") <= 120
    assert client.expire("missing", 30) is False
    assert client.persist("forever") is True and client.ttl("forever") is None
    assert client.persist("forever") is False  # no expiry to remove
    assert client.persist("missing") is False
    assert client.expire_at("short", datetime.datetime.now(UTC) + datetime.timedelta(seconds=100)) is True
    assert 98 < client.ttl("short") <= 100
    assert client.expire_at("short", time.time() + 50) is True and 48 < client.ttl("short") <= 50
    assert client.expire_at("short", datetime.datetime.now(UTC) - datetime.timedelta(seconds=1)) is True
    assert client.get("short") is None and client.ttl("short") == 0  # a time in the past removes it
    assert client.expire("forever", 0) is True and client.get("forever") is None
    client.set("brief", 3, timeout=0.05)
    wait_until(lambda: client.ttl("brief") == 0, message="brief to expire")
    assert client.persist("brief") is False
    with pytest.raises(ArgumentTypeError):
        client.expire_at("x", "tomorrow")
    with pytest.raises(ArgumentTypeError):
        client.expire("x", "5")


def test_replace_stores_only_an_existing_key(client):
    assert client.replace("k", 1) is False and client.get("k") is None
    client.set("k", 1, timeout=5)
    assert client.replace("k", 2) is True and client.get("k") == 2 and client.ttl("k") is None
    assert client.replace("k", 3, timeout=0) is True and client.get("k") is None
    pages = client.cache("never-written")
    assert pages.replace("k", 1) is False
    # not created by a replace that stores nothing (the Redis engine has no cache list: nothing to create)
    assert "never-written" not in client.stats().get("caches", {})


def test_keys_by_prefix_or_pattern(client):
    client.set_many({"user:1:cart": 1, "user:2:cart": 2, "user:2:name": 3, "item:1": 4, "us*r": 5})
    assert sorted(client.keys("user:")) == ["user:1:cart", "user:2:cart", "user:2:name"]  # a prefix, as before
    assert sorted(client.keys(pattern="user:*:cart")) == ["user:1:cart", "user:2:cart"]
    assert sorted(client.keys(pattern="user:?:[cn]a*")) == ["user:1:cart", "user:2:cart", "user:2:name"]
    assert client.keys(pattern="us\\*r") == ["us*r"]
    assert client.keys(pattern="nothing*") == []
    with pytest.raises(ArgumentTypeError):
        client.keys("user:", pattern="*")
    with pytest.raises(InvalidKey):
        client.keys(pattern=42)
    with pytest.raises(KeyTooLarge):
        client.keys(pattern="x" * (client.limits.max_key + 1))


def test_iter_keys_and_delete_pattern(client):
    client.set_many({f"a:{i}": i for i in range(2500)})
    client.set_many({f"b:{i}": i for i in range(500)})
    found = client.iter_keys("a:*", itersize=100)
    assert inspect.isgenerator(found)
    keys = list(found)
    assert len(keys) == len(set(keys)) == 2500 and set(keys) == set(client.keys(pattern="a:*"))
    assert sorted(clustershm_iter(client, "b:1?")) == [f"b:{i}" for i in range(10, 20)]
    assert client.delete_pattern("a:1*", itersize=7) == 1111
    assert client.delete_pattern("nothing*") == 0
    assert len(client.keys()) == 2500 - 1111 + 500
    assert client.delete_pattern("*") == 2500 - 1111 + 500 and client.keys() == []
    with pytest.raises(InvalidArgument):
        client.iter_keys("*", itersize=0)
    with pytest.raises(ArgumentTypeError):
        client.delete_pattern("*", itersize="10")


def clustershm_iter(client, pattern):
    return list(client.iter_keys(pattern))


def test_near_copies_follow_expiry_changes(client):
    """A worker's near copy keeps the entry's expiry: expire, expire_at and
    persist must reach it (invalidated, as touch does), and replace and
    delete_pattern too. On the embedded transport there is no near cache:
    the same assertions hold trivially."""
    client.set("persisted", "p", timeout=0.3)
    client.set("shortened", "s")
    client.set("past", "x")
    client.set("replaced", "a")
    client.set("pattern:1", "d")
    for key in ("persisted", "shortened", "past", "replaced", "pattern:1"):
        assert client.get(key) is not None  # now held in the near cache, if there is one
    if client.transport.remote and client.near_stats():
        assert client.near_stats()[""]["entries"] == 5
    assert client.persist("persisted") and client.expire("shortened", 0.1)
    assert client.expire_at("past", time.time() - 1)
    assert client.replace("replaced", "b")
    assert client.delete_pattern("pattern:*") == 1
    assert client.get("past") is None and client.get("replaced") == "b" and client.get("pattern:1") is None
    time.sleep(0.4)
    assert client.get("persisted") == "p"  # its old near copy would have expired
    assert client.get("shortened") is None  # its old near copy had no expiry


def test_each_call_is_one_request(client):
    client.set_many({f"k{i}": i for i in range(20)}, timeout=60)
    one_request(client, lambda: client.ttl("k1"))
    one_request(client, lambda: client.expire("k1", 30))
    one_request(client, lambda: client.expire_at("k1", time.time() + 30))
    one_request(client, lambda: client.persist("k1"))
    one_request(client, lambda: client.replace("k1", 5))
    one_request(client, lambda: client.keys(pattern="k1*"))
    assert len(one_request(client, lambda: list(client.iter_keys("k*")))) == 20
    assert one_request(client, lambda: client.delete_pattern("k1*")) == 11


def test_the_async_forms(client):
    aio = client.aio

    async def main():
        await aio.aset("a:1", 1, timeout=60)
        await aio.aset_many({"a:2": 2, "b:1": 3})
        assert 59 < await aio.attl("a:1") <= 60 and await aio.attl("a:2") is None and await aio.attl("zz") == 0
        assert await aio.aexpire("a:2", datetime.timedelta(seconds=30)) and 29 < client.ttl("a:2") <= 30
        assert await aio.aexpire_at("a:2", time.time() + 20) and 18 < client.ttl("a:2") <= 20
        assert await aio.apersist("a:2") is True and await aio.apersist("a:2") is False
        assert await aio.areplace("b:1", 4) is True and await aio.areplace("b:9", 4) is False
        assert sorted(await aio.akeys(pattern="a:*")) == ["a:1", "a:2"] and await aio.akeys("b:") == ["b:1"]
        found = aio.aiter_keys("*", itersize=1)
        assert inspect.isasyncgen(found)
        assert sorted([key async for key in found]) == ["a:1", "a:2", "b:1"]
        assert await aio.adelete_pattern("a:*", itersize=1) == 2
        assert client.keys() == ["b:1"] and client.get("b:1") == 4
        with pytest.raises(ArgumentTypeError):
            await aio.akeys("a", pattern="*")

    asyncio.run(main())


def test_the_module_level_api():
    clustershm.set("flag:a", 1, timeout=60)
    clustershm.set("flag:b", 2)
    assert 59 < clustershm.ttl("flag:a") <= 60 and clustershm.ttl("flag:b") is None
    assert clustershm.expire("flag:b", 10) and clustershm.persist("flag:b")
    assert clustershm.expire_at("flag:b", time.time() + 10)
    assert sorted(clustershm.keys(pattern="flag:*")) == ["flag:a", "flag:b"] == sorted(clustershm.iter_keys("fl*"))
    assert clustershm.delete_pattern("flag:?") == 2

    async def main():
        await clustershm.aset("x:1", 1)
        assert await clustershm.attl("x:1") is None and await clustershm.aexpire("x:1", 10)
        assert await clustershm.aexpire_at("x:1", time.time() + 10) and await clustershm.apersist("x:1")
        assert await clustershm.akeys(pattern="x*") == ["x:1"] == [k async for k in clustershm.aiter_keys()]
        assert await clustershm.adelete_pattern("x:*") == 1

    asyncio.run(main())


# -- the Django cache backend, with KEY_PREFIX and VERSION, on every transport ----------------


def backend_caches(near: bool) -> dict:
    options = {**BIG, **(NEAR if near else {})}
    base = {"BACKEND": BACKEND, "LOCATION": "t", "KEY_PREFIX": "app", "VERSION": 3, "OPTIONS": options}
    return {
        "default": base,
        "other_prefix": {**base, "KEY_PREFIX": "other"},
        "other_location": {**base, "LOCATION": "u"},
        # glob characters in a prefix are escaped (django-redis's glob_escape) ...
        "globby": {**base, "KEY_PREFIX": "we*ird[1]"},
        # ... so that they do not match this one's keys
        "lookalike": {**base, "KEY_PREFIX": "weXird1"},
        "pipes": {
            **base,
            "KEY_FUNCTION": lambda key, prefix, version: f"{prefix}|{version}|{key}",
            "REVERSE_KEY_FUNCTION": lambda key: key.split("|", 2)[2],
        },
    }


@pytest.fixture(params=["embedded", "socket", "socket+near"])
def cache(request):
    """``caches["default"]`` (KEY_PREFIX "app", VERSION 3) on each transport."""
    proc = None
    if request.param != "embedded":
        proc = ManagerProcess().start()
        clustershm.configure(proc.address, proc.secret)
    with override_settings(CACHES=backend_caches(request.param == "socket+near")):
        try:
            yield caches["default"]
        finally:
            if proc is not None:
                clustershm.configure(None)
                proc.cleanup()


def test_backend_ttl_and_pttl(cache):
    cache.set("k", 1, 60)
    cache.set("forever", 1, None)
    assert cache.ttl("k") == 60 and isinstance(cache.ttl("k"), int)
    assert 59_000 < cache.pttl("k") <= 60_000
    assert cache.ttl("forever") is None and cache.pttl("forever") is None
    assert cache.ttl("missing") == 0 and cache.pttl("missing") == 0
    cache.set("v", 1, 30, version=4)
    assert cache.ttl("v") == 0 and cache.ttl("v", version=4) == 30
    assert caches["other_prefix"].ttl("k") == 0  # another prefix: another key
    cache.set("default-timeout", 1)
    assert cache.ttl("default-timeout") == 300  # Django's default TIMEOUT


def test_backend_expire_family(cache):
    cache.set("k", 1, None)
    assert cache.expire("k", 100) is True and cache.ttl("k") == 100
    assert cache.expire("k", datetime.timedelta(seconds=50)) is True and cache.ttl("k") == 50
    assert cache.pexpire("k", 20_000) is True and 19_000 < cache.pttl("k") <= 20_000
    assert cache.pexpire("k", datetime.timedelta(seconds=40)) is True and cache.ttl("k") == 40
    when = datetime.datetime.now(UTC) + datetime.timedelta(seconds=70)
    assert cache.expire_at("k", when) is True and cache.ttl("k") in (69, 70)
    assert cache.pexpire_at("k", int((time.time() + 80) * 1000)) is True and cache.ttl("k") in (79, 80)
    assert cache.pexpire_at("k", when) is True and cache.ttl("k") in (69, 70)
    assert cache.persist("k") is True and cache.ttl("k") is None and cache.persist("k") is False
    assert cache.expire("missing", 10) is False and cache.pexpire("missing", 10) is False
    assert cache.expire_at("missing", when) is False and cache.persist("missing") is False
    assert cache.expire("k", 5, version=4) is False  # another version: another key
    assert cache.expire_at("k", datetime.datetime.now(UTC) - datetime.timedelta(seconds=1)) is True
    assert cache.get("k") is None  # expire_at in the past removed it, as Redis's EXPIREAT does
    cache.set("z", 1, None)
    assert cache.expire("z", 0) is True and cache.get("z") is None


def test_backend_set_nx_and_xx(cache):
    assert cache.set("plain", 1) is None  # Django's set returns None
    assert cache.set("k", 1, nx=True) is True and cache.get("k") == 1
    assert cache.set("k", 2, nx=True) is False and cache.get("k") == 1
    assert cache.set("new", 1, xx=True) is False and cache.get("new", "absent") == "absent"
    assert cache.set("k", 3, 30, xx=True) is True and cache.get("k") == 3 and cache.ttl("k") == 30
    # django-redis: a timeout of zero or less with nx leaves an existing key, with xx removes it
    assert cache.set("k", 4, 0, nx=True) is False and cache.get("k") == 3
    assert cache.set("gone", 4, 0, nx=True) is True and cache.get("gone") is None
    assert cache.set("k", 5, 0, xx=True) is True and cache.get("k") is None
    with pytest.raises(InvalidArgument):
        cache.set("k", 1, nx=True, xx=True)


def fill(cache_names=("default", "other_prefix", "other_location", "globby", "lookalike", "pipes")):
    for name in cache_names:
        c = caches[name]
        c.set_many({"user:1": 1, "user:2": 2, "item:1": 3, "odd*key": 4})
    caches["default"].set("user:3", 5, version=4)


def test_backend_keys_and_iter_keys_apply_prefix_and_version(cache):
    fill()
    assert sorted(cache.keys("user:*")) == ["user:1", "user:2"]
    assert sorted(cache.keys("*")) == ["item:1", "odd*key", "user:1", "user:2"]
    assert cache.keys("odd[*]key") == ["odd*key"] and cache.keys("odd*key") == ["odd*key"]
    assert cache.keys("user:*", version=4) == ["user:3"]
    found = cache.iter_keys("user:*", itersize=1)
    assert inspect.isgenerator(found) and sorted(found) == ["user:1", "user:2"]
    assert sorted(cache.iter_keys("*")) == ["item:1", "odd*key", "user:1", "user:2"]
    assert sorted(caches["globby"].keys("*")) == ["item:1", "odd*key", "user:1", "user:2"]
    assert sorted(caches["lookalike"].keys("user:*")) == ["user:1", "user:2"]
    assert sorted(caches["pipes"].keys("user:*")) == ["user:1", "user:2"]  # its own key and reverse functions
    assert cache.make_pattern("a*", version=2, prefix="p?") == "p[?]:2:a*"


def test_backend_delete_pattern_leaves_other_aliases_alone(cache):
    fill()
    assert cache.delete_pattern("user:*") == 2
    assert cache.keys("*") == ["item:1", "odd*key"] or sorted(cache.keys("*")) == ["item:1", "odd*key"]
    assert cache.get("user:3", version=4) == 5  # another version
    for name in ("other_prefix", "other_location", "globby", "lookalike", "pipes"):
        assert caches[name].get_many(["user:1", "user:2"]) == {"user:1": 1, "user:2": 2}, name
    assert caches["globby"].delete_pattern("*") == 4
    assert caches["lookalike"].get_many(["user:1", "item:1"]) == {"user:1": 1, "item:1": 3}
    assert cache.delete_pattern("*", version=4) == 1 and cache.get("item:1") == 3
    assert caches["other_prefix"].delete_pattern("user:*", itersize=1) == 2
    assert cache.delete_pattern("*", prefix="other") == 2  # django-redis's prefix= argument
    assert caches["other_prefix"].keys("*") == []
    assert cache.delete_pattern("nothing*") == 0


def test_backend_keys_hide_get_or_set_freshness_markers(cache):
    assert cache.get_or_set("report", lambda: "r", 60, stale=30) == "r"
    assert cache.keys("*") == ["report"] == list(cache.iter_keys("*"))
    assert cache.delete_pattern("report*") == 2  # the value and its marker


def test_backend_lock(cache):
    lock = cache.lock("job", timeout=0.3, blocking_timeout=0.1)
    assert isinstance(lock, Lock) and lock.lease == 0.3 and lock.timeout == 0.1
    assert lock.key.endswith(":t:app:3:job")  # the made key, within its LOCATION
    assert lock.acquire()
    result = {}

    def other_thread():
        rival = caches["default"].lock("job", blocking_timeout=0.1)
        result["while_held"] = rival.acquire()
        result["elsewhere"] = caches["other_location"].lock("job", blocking=False).acquire()
        result["after_lease"] = rival.acquire(blocking_timeout=2)  # redis-py's keyword
        rival.release()

    thread = threading.Thread(target=other_thread)
    thread.start()
    thread.join(10)
    assert result == {"while_held": False, "elsewhere": True, "after_lease": True}
    with cache.lock("job", blocking_timeout=1):
        assert cache.lock("job", blocking=False).acquire() is False  # a try (and not reentrant)
    with pytest.raises(InvalidArgument, match="thread_local"):
        cache.lock("job", thread_local=False)

    async def main():
        alock = cache.alock("job", timeout=5, blocking_timeout=1)
        assert isinstance(alock, AsyncLock) and alock.lease == 5
        async with alock:
            assert await cache.alock("job").acquire(blocking=False) is False

    asyncio.run(main())


def test_backend_calls_are_one_request_each(cache):
    client = clustershm.get_client()
    cache.set_many({f"k{i}": i for i in range(20)}, 60)
    cache.set("held", 1)
    cache.get("held")  # in the near cache now, where there is one
    for call in (
        lambda: cache.ttl("k1"),
        lambda: cache.pttl("k1"),
        lambda: cache.expire("k1", 30),
        lambda: cache.pexpire("k1", 30_000),
        lambda: cache.expire_at("k1", time.time() + 30),
        lambda: cache.pexpire_at("k1", (time.time() + 30) * 1000),
        lambda: cache.persist("k1"),
        lambda: cache.persist("held"),
        lambda: cache.expire("held", 10),
        lambda: cache.keys("k1*"),
        lambda: list(cache.iter_keys("k*")),
        lambda: cache.set("k1", 2, nx=True),
        lambda: cache.set("k1", 2, xx=True),
        lambda: cache.delete_pattern("k1*"),
    ):
        one_request(client, call)
    lock = cache.lock("l")
    one_request(client, lock.acquire)
    one_request(client, lock.release)


def test_backend_async_forms(cache):
    async def main():
        await cache.aset("a", 1, 60)
        await cache.aset("b", 2, None)
        assert await cache.attl("a") == 60 and 59_000 < await cache.apttl("a") <= 60_000
        assert await cache.attl("b") is None and await cache.attl("zz") == 0
        assert await cache.aexpire("b", 40) and cache.ttl("b") == 40
        assert await cache.apexpire("b", 30_000) and cache.ttl("b") == 30
        assert await cache.aexpire_at("b", datetime.datetime.now(UTC) + datetime.timedelta(seconds=20))
        assert cache.ttl("b") in (19, 20)
        assert await cache.apexpire_at("b", (time.time() + 10) * 1000) and cache.ttl("b") in (9, 10)
        assert await cache.apersist("b") is True and await cache.apersist("b") is False
        assert await cache.aset("a", 9, nx=True) is False and await cache.aset("c", 3, xx=True) is False
        assert await cache.aset("a", 9, xx=True) is True and await cache.aget("a") == 9
        assert await cache.aset("plain", 1) is None
        assert sorted(await cache.akeys("*")) == ["a", "b", "plain"]
        found = cache.aiter_keys("*", itersize=1)
        assert inspect.isasyncgen(found) and sorted([key async for key in found]) == ["a", "b", "plain"]
        assert await cache.adelete_pattern("[ab]") == 2 and await cache.akeys("*") == ["plain"]
        assert await caches["other_prefix"].adelete_pattern("*") == 0

    asyncio.run(main())


@override_settings(CACHES={"lenient": {"BACKEND": BACKEND, "LOCATION": "t", "OPTIONS": {"IGNORE_EXCEPTIONS": True}}})
def test_backend_ignore_exceptions(tmp_path):
    clustershm.configure(str(tmp_path / "gone.sock"), b"secret")
    try:
        lenient = caches["lenient"]
        assert lenient.ttl("k") == 0 and lenient.pttl("k") == 0
        assert lenient.expire("k", 1) is False and lenient.persist("k") is False
        assert lenient.keys("*") == [] and list(lenient.iter_keys("*")) == [] and lenient.delete_pattern("*") == 0
        assert lenient.set("k", 1, nx=True) is False and lenient.set("k", 1) is None
    finally:
        clustershm.configure(None)


# -- iter_keys over 50,000 keys while another process writes ----------------------------------


def churn(stop_path: str, prefix: str) -> None:
    """Write, re-set and remove keys until ``stop_path`` exists."""
    cache = caches["default"]
    i = 0
    while not os.path.exists(stop_path):
        i += 1
        cache.set(f"churn:{i}", i)
        cache.set(f"stable:{i % 50_000}", -i)  # re-set: still present throughout
        if i > 50:
            cache.delete(f"churn:{i - 50}")
        if i % 500 == 0:
            cache.delete_pattern("churn:1*", itersize=100)


@pytest.mark.slow
@pytest.mark.parametrize("near", [False, True])
def test_iter_keys_over_50k_keys_while_another_process_writes(cluster, tmp_path, near):
    with override_settings(CACHES=backend_caches(near)):
        cache = caches["default"]
        for start in range(0, 50_000, 5_000):
            cache.set_many({f"stable:{i}": i for i in range(start, start + 5_000)}, None)
        stop = str(tmp_path / "stop")
        writer = fork_call(churn, stop, "churn")
        try:
            wait_until(lambda: cache.get("churn:10") is not None or cache.keys("churn:*"), message="churn")
            seen = bytearray(50_000)
            others = 0
            ops_before = clustershm.stats()["ops"]
            tracemalloc.start()
            found = cache.iter_keys("*", itersize=500)
            assert inspect.isgenerator(found)
            for key in found:
                if key.startswith("stable:"):
                    seen[int(key[7:])] += 1
                else:
                    others += 1
            _, iter_peak = tracemalloc.get_traced_memory()
            written = clustershm.stats()["ops"] - ops_before - 50_000 // 500 - 2
            tracemalloc.reset_peak()
            whole = cache.keys("*")
            _, keys_peak = tracemalloc.get_traced_memory()
            tracemalloc.stop()
        finally:
            open(stop, "w").close()
            assert reap(writer, 30) == 0
        assert seen == bytearray([1]) * 50_000  # every stable key, exactly once
        assert written > 1000, written  # the other process wrote and removed keys meanwhile
        assert len(whole) >= 50_000 and others < 50_000
        # The generator holds one batch at a time; keys() holds them all.
        assert iter_peak < 400_000, iter_peak
        assert keys_peak > 10 * iter_peak, (keys_peak, iter_peak)
        assert clustershm.stats()["scans"]["open"] == 0


def test_iter_keys_while_another_thread_writes_embedded():
    """The embedded transport's counterpart (no other process shares its Manager): a writer thread."""
    client = clustershm.get_client()
    client.set_many({f"stable:{i}": i for i in range(20_000)})
    done = threading.Event()

    def write():
        i = 0
        while not done.is_set():
            i += 1
            client.set(f"churn:{i}", i)
            client.set(f"stable:{i % 20_000}", -i)
            client.remove(f"churn:{i - 10}")

    thread = threading.Thread(target=write)
    thread.start()
    try:
        seen = bytearray(20_000)
        for key in client.iter_keys("stable:*", itersize=100):
            seen[int(key[7:])] += 1
    finally:
        done.set()
        thread.join(10)
    assert seen == bytearray([1]) * 20_000


def test_a_near_copy_follows_another_process_expire_and_persist(cluster):
    with override_settings(CACHES=backend_caches(True)):
        cache = caches["default"]
        cache.set("p", "kept", 0.3)
        cache.set("e", "gone", None)
        assert cache.get("p") == "kept" and cache.get("e") == "gone"  # near copies now

        def other():
            c = caches["default"]
            assert c.persist("p") and c.expire("e", 0)

        assert reap(fork_call(other), 10) == 0
        assert cache.get("e") is None
        time.sleep(0.4)
        assert cache.get("p") == "kept" and cache.ttl("p") is None
        assert FRESH_SUFFIX not in "".join(cache.keys("*"))
