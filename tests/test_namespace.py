"""The one namespace implementation, with a fake clock: expiry is tested without sleeping.

Every semantic test runs on both policies (the store's dict and a cache's
LRU), since they share one implementation; the policy tests follow.
"""

import math

import pytest

from django_clustershm.exceptions import IntegerOverflow, KeyNotFound, NotAnInteger, StoreFull, ValueTooLarge
from django_clustershm.server.namespace import ENTRY_OVERHEAD, Namespace, entry_size
from django_clustershm.wire.args import INT64_MAX
from django_clustershm.wire.frames import EVENT_EVICT, EVENT_EXPIRE, EVENT_REMOVE, EVENT_SET, EVENT_TOUCH


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock():
    return FakeClock()


@pytest.fixture(params=["store", "cache"])
def store(request, clock):
    if request.param == "store":
        return Namespace.store(clock=clock)
    return Namespace.cache(clock=clock)


def test_set_get_remove(store):
    store.set("a", b"1")
    assert store.get("a") == b"1"
    assert store.has("a")
    assert store.remove("a") is True
    assert store.remove("a") is False
    assert store.get("a") is None
    assert (store.hits, store.misses) == (1, 1)


def test_expiry_is_exact_and_lazy(store, clock):
    store.set("a", b"1", ttl=10)
    clock.now += 9.999
    assert store.get("a") == b"1"
    clock.now += 0.001
    assert store.get("a") is None
    assert not store.has("a")
    assert store.expired == 1
    assert store.bytes == 0


def test_reap_reclaims_only_what_expired(store, clock):
    for i in range(100):
        store.set(f"short{i}", b"x", ttl=1)
    store.set("long", b"y", ttl=100)
    store.set("forever", b"z")
    clock.now += 2
    gone = store.reap()
    assert sorted(gone) == sorted(f"short{i}" for i in range(100))
    assert len(store) == 2
    assert store.next_deadline() == pytest.approx(1100.0)


def test_reset_ttl_leaves_stale_heap_entries_harmless(store, clock):
    store.set("a", b"1", ttl=1)
    store.set("a", b"2", ttl=100)
    clock.now += 5
    assert store.reap() == []
    assert store.get("a") == b"2"
    store.set("a", b"3")  # no ttl any more
    clock.now += 500
    assert store.reap() == []
    assert store.get("a") == b"3"


def test_heap_is_compacted_when_stale_entries_pile_up(store):
    for _ in range(5000):
        store.set("a", b"1", ttl=50)
    assert len(store._heap) <= 2 * 1 + 1024 + 1


def test_zero_or_negative_ttl_stores_nothing(store):
    store.set("a", b"1")
    store.set("a", b"2", ttl=0)
    assert store.get("a") is None
    assert store.add("b", b"1", ttl=-1) is True
    assert store.get("b") is None


def test_add_only_when_absent_or_expired(store, clock):
    assert store.add("a", b"1", ttl=5)
    assert not store.add("a", b"2")
    clock.now += 6
    assert store.add("a", b"3")
    assert store.get("a") == b"3"


def test_incr(store, clock):
    assert store.incr("n", 1, 0) == 1
    assert store.incr("n", 41) == 42
    assert store.incr("n", -50) == -8
    with pytest.raises(KeyNotFound):
        store.incr("missing", 1)
    store.set("s", b"pickled")
    with pytest.raises(NotAnInteger):
        store.incr("s", 1)
    store.set("big", INT64_MAX)
    with pytest.raises(IntegerOverflow):
        store.incr("big", 1)
    assert store.get("big") == INT64_MAX


def test_incr_keeps_the_expiry(store, clock):
    store.set("n", 1, ttl=10)
    clock.now += 5
    store.incr("n", 1)
    clock.now += 5
    assert store.get("n") is None


def test_touch(store, clock):
    store.set("a", b"1", ttl=1)
    assert store.touch("a", 100)
    clock.now += 50
    assert store.get("a") == b"1"
    assert store.touch("a", None)
    clock.now += 1e6
    assert store.get("a") == b"1"
    assert not store.touch("missing", 5)
    assert store.touch("a", 0)
    assert store.get("a") is None


def test_many(store):
    store.set_many({"a": b"1", "b": b"2", "c": 3})
    assert store.get_many(["a", "c", "zz"]) == {"a": b"1", "c": 3}
    assert store.delete_many(["a", "zz"]) == 1
    assert sorted(store.keys()) == ["b", "c"]


def test_keys_by_prefix_and_clear(store, clock):
    store.set("flags:a", b"1")
    store.set("flags:b", b"1", ttl=1)
    store.set("other", b"1")
    assert sorted(store.keys("flags:")) == ["flags:a", "flags:b"]
    clock.now += 2
    assert store.keys("flags:") == ["flags:a"]
    assert store.clear() == 2
    assert len(store) == 0 and store.bytes == 0


def test_byte_accounting_and_budget(clock):
    store = Namespace.store(100 + 2 * ENTRY_OVERHEAD, clock=clock)
    store.set("a", b"x" * 50)
    assert store.bytes == entry_size("a", b"x" * 50) == 51 + ENTRY_OVERHEAD
    store.set("a", b"x" * 90)  # replacing counts the difference only
    assert store.bytes == 91 + ENTRY_OVERHEAD
    with pytest.raises(StoreFull, match="MAX_STORE_BYTES"):
        store.set("b", b"x" * 100)
    assert store.get("b") is None and store.bytes == 91 + ENTRY_OVERHEAD
    with pytest.raises(StoreFull):
        store.set_many({"c": b"1", "d": b"x" * 50})
    assert store.get("c") is None  # all or nothing
    store.remove("a")
    assert store.bytes == 0
    store.set("n", 5)
    assert store.bytes == 1 + 8 + ENTRY_OVERHEAD


def test_events_are_the_same_on_both_policies(store, clock):
    events = []
    store.on_event = lambda event, key, value: events.append((event, key, value))
    store.set("a", b"1", ttl=5)
    store.touch("a", 10)
    store.incr("n", 2, 0)
    store.remove("n")
    clock.now += 11
    store.reap()
    assert events == [
        (EVENT_SET, "a", b"1"),
        (EVENT_TOUCH, "a", None),
        (EVENT_SET, "n", 2),
        (EVENT_REMOVE, "n", None),
        (EVENT_EXPIRE, "a", None),
    ]


def test_a_cache_evicts_the_least_recently_used_to_fit_its_bytes(clock):
    size = entry_size("k0", b"x" * 100)
    cache = Namespace.cache(3 * size, clock=clock)
    events = []
    cache.on_event = lambda event, key, value: events.append((event, key))
    for i in range(3):
        cache.set(f"k{i}", b"x" * 100)
    cache.get("k0")  # now the most recently used
    cache.set("k3", b"x" * 100)
    assert sorted(cache.keys()) == ["k0", "k2", "k3"]
    assert (EVENT_EVICT, "k1") in events and cache.evictions == 1
    with pytest.raises(ValueTooLarge):
        cache.set("huge", b"x" * (3 * size))
    assert cache.get("k0") == b"x" * 100  # a refused write evicts nothing


def test_a_cache_culls_as_locmem_does(clock):
    cache = Namespace.cache(clock=clock)
    bounds = [10, 3, 10**9]
    for i in range(10):
        cache.set(f"k{i}", b"x", None, bounds)
    assert len(cache) == 10
    cache.set("k10", b"x", None, bounds)  # full: drop 10 // 3 least recently used first
    assert len(cache) == 8 and cache.get("k0") is None and cache.get("k3") == b"x"
    cache.set("k11", b"x", None, [8, 0, 10**9])  # CULL_FREQUENCY 0: everything goes
    assert cache.keys() == ["k11"]


def test_a_cull_reaps_expired_entries_first(clock):
    cache = Namespace.cache(clock=clock)
    bounds = [3, 3, 10**9]
    cache.set("old", b"x", 1, bounds)
    cache.set("a", b"x", None, bounds)
    cache.set("b", b"x", None, bounds)
    clock.now += 2
    cache.set("c", b"x", None, bounds)  # the expired one made room: nothing culled
    assert sorted(cache.keys()) == ["a", "b", "c"] and cache.evictions == 0


def test_an_expired_key_never_stalls_reaping(store, clock):
    # The engine refuses NaN timeouts (wire.args); the heap must not depend on it:
    # a key whose deadline is past is reaped whatever was set before it.
    for i in range(1000):
        store.set(f"k{i}", b"x", ttl=1)
    clock.now += 2
    assert len(store.reap()) == 1000 and len(store) == 0
    assert math.isinf(float("inf"))


def test_a_caches_max_bytes_is_clamped_to_the_managers_ceiling():
    """#12 row 8: a cache's MAX_BYTES came from whatever its first writer sent (2**62 accepted)."""
    from django_clustershm.server.engine import Engine
    from django_clustershm.wire import frames as P

    engine = Engine(max_cache_bytes=10_000)
    session = engine.open_session()
    engine.dispatch(session, P.SET, ["greedy", "k", b"v", None, [300, 3, 2**62]])
    assert engine.caches["greedy"].max_bytes == 10_000
    engine.dispatch(session, P.SET, ["modest", "k", b"v", None, [300, 3, 5_000]])
    assert engine.caches["modest"].max_bytes == 5_000
