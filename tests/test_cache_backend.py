"""The Django cache backend beyond Django's own contract (tests/test_cache_contract.py):
sharing between real processes, the Manager-side bounds, IGNORE_EXCEPTIONS, and
what Django users plug into a cache (sessions, cache middleware, cache_page,
template fragments), each across forked processes."""

import os
import re
from unittest import mock

import pytest
from django.core.cache import CacheKeyWarning, caches
from django.core.cache.backends.base import InvalidCacheBackendError, default_key_func
from django.test import Client, override_settings

import django_clustershm as clustershm
from django_clustershm.cache import ClusterShmCache

from .helpers import ManagerProcess, fork_call, reap, run_forked, wait_until

BACKEND = "django_clustershm.cache.ClusterShmCache"


def cache_settings(**aliases):
    base = {"BACKEND": BACKEND, "LOCATION": "t"}
    return {name: {**base, **conf} for name, conf in {"default": {}, **aliases}.items()}


def pipe_value():
    r, w = os.pipe()

    def send(text):
        os.write(w, text.encode() + b"\n")

    def receive():
        os.close(w)
        with os.fdopen(r) as fh:
            return fh.read().split()

    return send, receive


# -- sharing across processes ---------------------------------------------------------


@override_settings(CACHES=cache_settings())
def test_processes_share_one_cache(cluster):
    cache = caches["default"]
    cache.set("from-parent", {"a": 1}, 60)

    def child(i):
        c = caches["default"]
        assert c.get("from-parent") == {"a": 1}
        c.set(f"from-child-{i}", i)

    assert run_forked(3, child) == [0, 0, 0]
    assert cache.get_many([f"from-child-{i}" for i in range(3)]) == {f"from-child-{i}": i for i in range(3)}


@override_settings(CACHES=cache_settings())
def test_four_processes_incr_exactly(cluster):
    caches["default"].set("counter", 0)

    def child(i):
        c = caches["default"]
        for _ in range(2000):
            c.incr("counter")

    assert run_forked(4, child) == [0] * 4
    assert caches["default"].get("counter") == 8000


@override_settings(CACHES=cache_settings())
def test_get_or_set_stores_once_across_processes(cluster):
    send, receive = pipe_value()

    def child(i):
        value = caches["default"].get_or_set("once", lambda: f"made-by-{os.getpid()}", 60)
        send(value)

    assert run_forked(4, child) == [0] * 4
    values = receive()
    assert len(values) == 4 and len(set(values)) == 1  # every process got the one stored value


@override_settings(
    CACHES=cache_settings(
        prefixed={"KEY_PREFIX": "p"},
        prefixed_too={"KEY_PREFIX": "p", "OPTIONS": {"MAX_ENTRIES": 5}},
        v2={"VERSION": 2},
        elsewhere={"LOCATION": "other"},
    )
)
def test_aliases_with_one_location_share_one_cache(cluster):
    caches["prefixed"].set("k", "shared")
    assert caches["prefixed_too"].get("k") == "shared"  # same LOCATION, same key function
    assert caches["default"].get("k") is None  # another prefix: another key
    caches["default"].set("k", "v1")
    assert caches["v2"].get("k") is None and caches["v2"].get("k", version=1) == "v1"
    assert caches["elsewhere"].get("k", version=1) is None  # another LOCATION: another cache
    caches["elsewhere"].set("x", 1)
    caches["default"].clear()  # clears the LOCATION for every alias on it
    assert caches["prefixed_too"].get("k") is None
    assert caches["elsewhere"].get("x") == 1


@override_settings(CACHES=cache_settings())
def test_caches_live_apart_from_the_shared_store(cluster):
    clustershm.set("k", "store")
    caches["default"].set("k", "cache")
    clustershm.clear()
    assert caches["default"].get("k") == "cache"
    caches["default"].clear()
    clustershm.set("k", "store")
    assert clustershm.get("k") == "store"


# -- the Manager's bounds -------------------------------------------------------------


@override_settings(
    CACHES=cache_settings(
        small={"LOCATION": "small", "OPTIONS": {"MAX_BYTES": 100_000, "MAX_ENTRIES": 10**6, "NEAR_CACHE": False}}
    )
)
def test_max_bytes_bounds_the_cache_by_evicting_lru(cluster):
    # The Manager's own LRU order, every read a request (near hits reach it
    # later, in RECENT reports: test_near_cache.py's test of them).
    cache = caches["small"]
    for i in range(100):
        cache.set(f"k{i}", b"x" * 5000)
        cache.get("k0")  # keep k0 recently used
    stats = clustershm.stats()["caches"]["small"]
    assert stats["bytes"] <= 100_000
    assert stats["evictions"] >= 80
    assert cache.get("k0") is not None  # LRU, not FIFO
    assert cache.get("k99") is not None
    assert cache.get("k1") is None
    with pytest.raises(clustershm.ValueTooLarge, match="MAX_BYTES"):
        cache.set("huge", b"x" * 200_000)


@override_settings(CACHES=cache_settings())
def test_expired_entries_are_reclaimed_without_being_read(cluster):
    cache = caches["default"]
    cache.set_many({f"k{i}": i for i in range(50)}, 0.05)
    cache.set("stays", 1, None)
    wait_until(lambda: clustershm.stats()["caches"]["t"]["keys"] == 1, timeout=5, message="expired entries reclaimed")
    assert clustershm.stats()["caches"]["t"]["expired"] == 50


# -- a missing Manager ----------------------------------------------------------------


@override_settings(CACHES=cache_settings(lenient={"OPTIONS": {"IGNORE_EXCEPTIONS": True}}))
def test_ignore_exceptions_reads_a_missing_manager_as_a_miss(tmp_path, caplog):
    clustershm.configure(str(tmp_path / "gone.sock"), b"secret")
    try:
        lenient = caches["lenient"]
        assert lenient.get("k", "dflt") == "dflt"
        assert lenient.get("k", default="d2") == "d2"
        assert lenient.set("k", 1) is None
        assert lenient.add("k", 1) is False
        assert lenient.set_many({"a": 1, "b": 2}) == ["a", "b"]
        assert lenient.get_many(["a"]) == {}
        assert lenient.has_key("a") is False
        assert lenient.touch("a") is False and lenient.delete("a") is False
        assert lenient.set("a", 1, nx=True) is False and lenient.set("a", 1, xx=True) is False
        assert lenient.delete_many(["a"]) is None
        assert "IGNORE_EXCEPTIONS" in caplog.text
        for method, args in (("get", ("k",)), ("set", ("k", 1)), ("touch", ("k",)), ("delete", ("k",))):
            with pytest.raises(clustershm.ManagerUnavailable):
                getattr(caches["default"], method)(*args)
        with pytest.raises(clustershm.ManagerUnavailable):
            caches["default"].get("k")
        with pytest.raises(clustershm.ManagerUnavailable):
            lenient.incr("k")  # a counter must not silently stop counting
    finally:
        clustershm.configure(None)


# -- keys: Django's, made in one step for the usual key ------------------------------------
#
# ClusterShmCache makes the usual key (a str, the alias's version, printable,
# no space, short) as one concatenation instead of Django's make_key and
# validate_key (#19 part 5). These check that it is still Django's key, with
# Django's warnings, whatever the settings, the key, or a later change.


def _stored_under(cache) -> list:
    """The keys the cache's namespace holds (as the Manager sees them)."""
    return sorted(cache.keyspace.keys())


@pytest.mark.parametrize(
    "conf",
    [{}, {"KEY_PREFIX": "site"}, {"VERSION": 3}, {"KEY_PREFIX": "a:b", "VERSION": "v2"}, {"KEY_PREFIX": "é%s"}],
    ids=["default", "prefix", "version", "str-version", "odd-prefix"],
)
def test_the_made_key_is_djangos(conf):
    with override_settings(CACHES=cache_settings(c=conf)):
        cache = caches["c"]
        cache.clear()

        class Shown(str):  # a str whose made key comes from its str(): Django's "%s"
            def __str__(self):
                return "shown"

        keys = ["k", "é", "a" * 200, 42, Shown("hidden")]
        for i, key in enumerate(keys):
            cache.set(key, i)
            assert cache.add(f"added{i}", i) and not cache.add(f"added{i}", i)
            assert cache.get(key) == i and cache.incr(key) == i + 1 and cache.has_key(key)
            cache.set(key, i, version=9)  # another version: Django's own path
        expected = {cache.make_key(k) for k in keys} | {cache.make_key(f"added{i}") for i in range(len(keys))}
        expected |= {cache.make_key(k, version=9) for k in keys}
        assert set(_stored_under(cache)) == expected
        assert cache.make_key(Shown("hidden")).endswith(":shown")
        for key in keys:
            assert cache.delete(key) is True and cache.get(key, version=9) is not None


@override_settings(CACHES=cache_settings())
def test_keys_at_memcacheds_limit_warn_as_djangos():
    cache = caches["default"]
    room = 250 - len(cache.make_key(""))
    cache.set("a" * room, 1)  # warnings are errors in this suite: none here
    for key in ("a" * (room + 1), "with space", "tab\t", "del\x7f"):
        for method, args in (("set", (key, 1)), ("get", (key,)), ("add", (key, 1))):
            with pytest.warns(CacheKeyWarning):
                getattr(cache, method)(*args)
    with pytest.warns(CacheKeyWarning):
        cache.incr("a" * (room + 1))


@override_settings(CACHES=cache_settings())
def test_a_live_change_of_prefix_version_or_key_function_is_followed():
    cache = caches["default"]
    cache.clear()
    cache.key_prefix = "new"
    cache.set("k", 1)
    cache.version = 7
    cache.set("k", 2)
    assert _stored_under(cache) == ["new:1:k", "new:7:k"]
    cache.key_func = lambda key, prefix, version: f"custom|{prefix}|{version}|{key}"
    cache.set("k", 3)
    assert cache.get("k") == 3 and "custom|new|7|k" in _stored_under(cache)
    cache.key_func = default_key_func
    with mock.patch.object(cache, "key_prefix", "patched"):
        cache.set("k", 4)
    cache.set("k", 5)
    assert "patched:7:k" in _stored_under(cache) and cache.get("k") == 5 and cache.get("k", version=1) == 1
    cache.key_prefix, cache.version = "", 1
    cache.set("k", 6)
    assert cache.get("k") == 6 and ":1:k" in _stored_under(cache)


class LowerKeys(ClusterShmCache):
    """A subclass with its own make_key, as Django's docs allow."""

    def make_key(self, key, version=None):
        return super().make_key(key.lower(), version)


class CheckedKeys(ClusterShmCache):
    """... and one with its own validate_key."""

    checked: list = []

    def validate_key(self, key):
        CheckedKeys.checked.append(key)
        super().validate_key(key)


@override_settings(
    CACHES={
        "default": {"BACKEND": f"{__name__}.LowerKeys", "LOCATION": "t"},
        "checked": {"BACKEND": f"{__name__}.CheckedKeys", "LOCATION": "t"},
    }
)
def test_a_subclass_or_an_instance_making_its_own_keys_is_used():
    cache = caches["default"]
    cache.clear()
    cache.set("KEY", 1)
    assert cache.get("key") == 1 and cache.incr("Key") == 2 and cache.touch("kEY") and cache.has_key("KEY")
    assert _stored_under(cache) == [":1:key"]
    CheckedKeys.checked.clear()
    checked = caches["checked"]
    checked.set("k", 1)
    assert checked.get("k") == 1 and checked.incr("k") == 2 and checked.delete("k")
    assert CheckedKeys.checked == [":1:k"] * 4

    plain = ClusterShmCache("t", {})
    plain.make_key = lambda key, version=None: f"mine:{key}"  # an instance's own, as mock.patch.object does
    plain.set("k", 5)
    assert plain.get("k") == 5 and "mine:k" in _stored_under(plain)
    del plain.make_key
    plain.set("k", 6)
    assert ":1:k" in _stored_under(plain) and plain.get("k") == 6
    with mock.patch.object(plain, "validate_key", side_effect=ValueError("refused")):
        for call in (lambda: plain.get("k"), lambda: plain.set("k", 1), lambda: plain.incr("k")):
            with pytest.raises(ValueError, match="refused"):
                call()
    assert plain.get("k") == 6


def test_the_cache_follows_the_process_to_another_manager():
    """runcluster repoints the process from its embedded Manager to the
    cluster's before forking: an alias used before must write to the new one."""
    with override_settings(CACHES=cache_settings()):
        cache = caches["default"]
        cache.set("before", 1)  # the embedded Manager
        proc = ManagerProcess().start()
        try:
            clustershm.configure(proc.address, proc.secret)
            assert cache.get("before") is None
            cache.set("k", 2)
            assert cache.incr("k") == 3

            def child():
                assert caches["default"].get("k") == 3

            assert reap(fork_call(child), 10) == 0
        finally:
            clustershm.configure(None)
            proc.cleanup()
        assert cache.get("k") is None and cache.get("before") is None  # a new embedded Manager


# -- the seed's LRU functions -----------------------------------------------------------


@override_settings(CACHES=cache_settings())
def test_seed_lru_functions_use_the_default_cache(cluster):
    clustershm.set_lru("item", {"user": "Tom"})
    assert clustershm.get_lru("item") == {"user": "Tom"}
    assert caches["default"].get("item") == {"user": "Tom"}
    assert clustershm.remove_lru("item") is True
    assert clustershm.get_lru("item", "gone") == "gone"
    clustershm.set_lru("short", 1, 0.05)
    wait_until(lambda: clustershm.get_lru("short") is None, timeout=5, message="expiry")

    def child():
        clustershm.set_lru("from-child", 7)

    assert reap(fork_call(child), 10) == 0
    assert clustershm.get_lru("from-child") == 7


@override_settings(CACHES={"default": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache"}})
def test_seed_lru_functions_without_a_clustershm_default_cache(cluster):
    clustershm.set_lru("item", 1)
    assert clustershm.get_lru("item") == 1
    assert caches["default"].get("item") is None  # not the user's LocMem cache


# -- what Django users plug into a cache, across processes -----------------------------


def _session_cookie(response):
    return response.cookies["sessionid"].value


@override_settings(CACHES=cache_settings(sessions={"LOCATION": "sessions"}))
def test_cache_session_engine_across_processes(cluster):
    send, receive = pipe_value()

    def log_in():
        response = Client().get("/login/?name=alice")
        assert response.json()["user"] == "alice"
        send(_session_cookie(response))

    assert reap(fork_call(log_in), 20) == 0
    (cookie,) = receive()

    def read_session(i):
        client = Client()
        client.cookies["sessionid"] = cookie
        assert client.get("/me/").json()["user"] == "alice"

    assert run_forked(2, read_session) == [0, 0]

    def log_out():
        client = Client()
        client.cookies["sessionid"] = cookie
        client.get("/logout/")

    assert reap(fork_call(log_out), 20) == 0
    client = Client()
    client.cookies["sessionid"] = cookie
    assert client.get("/me/").json()["user"] is None


@override_settings(CACHES=cache_settings(sessions={"LOCATION": "sessions"}))
def test_cache_page_decorator_across_processes(cluster):
    send, receive = pipe_value()

    def fetch(i):
        send(str(Client().get("/cached/").json()["rendered_by"]))

    # One renders and stores first (cache_page does not make concurrent misses
    # wait for each other); then three others, at once, get that copy.
    assert reap(fork_call(fetch, 0), 20) == 0
    assert run_forked(3, fetch) == [0] * 3
    rendered_by = receive()
    assert len(set(rendered_by)) == 1  # rendered once, served from the shared cache by the others


SITE_CACHE_MIDDLEWARE = [
    "django.middleware.cache.UpdateCacheMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.cache.FetchFromCacheMiddleware",
]


@override_settings(
    CACHES=cache_settings(sessions={"LOCATION": "sessions"}),
    MIDDLEWARE=SITE_CACHE_MIDDLEWARE,
    CACHE_MIDDLEWARE_SECONDS=60,
)
def test_per_site_cache_middleware_across_processes(cluster):
    send, receive = pipe_value()

    def fetch(i):
        body = Client().get("/booted/")
        send(f"{body.json()['pid']}:{'max-age=60' in body['Cache-Control']}")

    assert reap(fork_call(fetch, 0), 20) == 0  # the first renders and stores
    assert run_forked(3, fetch) == [0] * 3
    results = receive()
    assert len({r.split(":")[0] for r in results}) == 1  # the first renderer's pid, every time
    assert all(r.endswith("True") for r in results)


@override_settings(CACHES=cache_settings(sessions={"LOCATION": "sessions"}))
def test_template_fragment_cache_across_processes(cluster):
    send, receive = pipe_value()

    def fetch(i):
        html = Client().get("/fragment/").content.decode()
        served = re.search(r"served by worker (\d+)", html).group(1)
        fragment = re.search(r"fragment rendered by worker (\d+)", html).group(1)
        send(f"{served}:{fragment}")

    assert reap(fork_call(fetch, 0), 20) == 0
    assert run_forked(3, fetch) == [0] * 3
    pairs = [r.split(":") for r in receive()]
    assert len({served for served, _ in pairs}) == 4  # four different processes rendered the page
    assert len({fragment for _, fragment in pairs}) == 1  # one of them rendered the fragment


def test_backend_is_importable_by_path():
    from django.core.cache import caches as _caches

    with override_settings(CACHES={"default": {"BACKEND": BACKEND}}):
        assert isinstance(_caches["default"], ClusterShmCache)
    with pytest.raises(InvalidCacheBackendError):
        with override_settings(CACHES={"default": {"BACKEND": "django_clustershm.cache.Nope"}}):
            _caches["default"]
