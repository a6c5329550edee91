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
    # The wheel looks again at "long" no later than its deadline plus 1/64 s:
    # a far deadline waits in a coarse bucket first, then a finer one.
    assert 1000 < store.next_deadline() <= 1100 + 1 / 64
    while store.next_deadline() < 1100:
        clock.now = store.next_deadline()
        assert store.reap() == []
    clock.now = store.next_deadline()
    assert store.reap() == ["long"]


def test_reset_ttl_leaves_stale_wheel_references_harmless(store, clock):
    store.set("a", b"1", ttl=1)
    store.set("a", b"2", ttl=100)
    clock.now += 5
    assert store.reap() == []
    assert store.get("a") == b"2"
    store.set("a", b"3")  # no ttl any more
    clock.now += 500
    assert store.reap() == []
    assert store.get("a") == b"3"


def test_a_key_re_set_with_the_same_timeout_keeps_one_reference(store, clock):
    for _ in range(5000):
        store.set("a", b"1", ttl=50)
        clock.now += 0.0001
    assert store.wheel.refs <= 3


def test_stale_references_are_swept_in_bounded_steps(store, clock):
    """A client setting and removing expiring keys cannot grow the wheel
    without bound: the writes themselves sweep, a few references each."""
    store.SWEEP_SLACK = 100
    store.set("kept", b"y", ttl=3600)
    most = 0
    for i in range(20_000):
        store.set(f"k{i}", b"x", ttl=3600)
        store.remove(f"k{i}")
        most = max(most, store.wheel.refs)
    assert store.timed == 1
    assert most <= 2 * store.SWEEP_SLACK + store.SWEEP_PER_WRITE
    # A reap does a bounded step too: stale references left are swept over several calls.
    store.SWEEP_PER_WRITE = 0
    for i in range(5_000):
        store.set(f"j{i}", b"x", ttl=3600)
        store.remove(f"j{i}")
    store.REAP_BATCH = 50
    calls = 0
    while store.wheel.refs > 1 + store.SWEEP_SLACK:
        store.reap(limit=50)
        calls += 1
    assert calls >= 5_000 // 50 // 2
    clock.now += 3601
    assert store.reap() == ["kept"]


def test_the_wheel_reaps_every_key_within_a_unit_of_its_deadline(store, clock):
    """A model check: random writes, re-sets, touches, removals and time steps;
    every key is reaped no later than 1/64 s after its deadline, never before,
    and the references stay bounded."""
    import random

    rng = random.Random(7)
    store.SWEEP_SLACK = 64
    deadlines: dict[str, float] = {}
    for _ in range(20_000):
        key = f"k{rng.randrange(300)}"
        action = rng.random()
        if action < 0.5:
            ttl = rng.choice([0.001, 0.02, 0.5, 3, 70, 5000, 100_000]) * rng.random()
            store.set(key, b"v" if rng.random() < 0.5 else 1, ttl=ttl)
            if ttl > 0:
                deadlines[key] = clock.now + ttl
            else:  # a timeout of zero stores nothing
                deadlines.pop(key, None)
        elif action < 0.6:
            store.set(key, b"forever")
            deadlines[key] = math.inf
        elif action < 0.7:
            if store.touch(key, 40):
                deadlines[key] = clock.now + 40
            else:  # absent, or found expired (and dropped) by the touch
                deadlines.pop(key, None)
        elif action < 0.8:
            store.remove(key)
            deadlines.pop(key, None)
        else:
            clock.now += rng.choice([0.001, 0.01, 0.3, 5, 100, 3000])
            for gone in store.reap(limit=10**9):
                assert deadlines.pop(gone) <= clock.now
            overdue = [k for k, d in deadlines.items() if d + 1 / 64 < clock.now]
            assert overdue == [], overdue
        assert store.wheel.refs <= 3 * max(store.timed, 1) + 200 + 64
    assert store.timed == sum(1 for d in deadlines.values() if d != math.inf)
    assert sorted(store.iter_keys()) == sorted(deadlines)


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
    # the key, the value, its tag byte, and what the objects and dict slot cost
    assert store.bytes == entry_size("a", b"x" * 50) == 1 + 50 + 1 + ENTRY_OVERHEAD
    store.set("a", b"x" * 90)  # replacing counts the difference only
    assert store.bytes == entry_size("a", b"x" * 90)
    with pytest.raises(StoreFull, match="MAX_STORE_BYTES"):
        store.set("b", b"x" * 100)
    assert store.get("b") is None and store.bytes == entry_size("a", b"x" * 90)
    with pytest.raises(StoreFull):
        store.set_many({"c": b"1", "d": b"x" * 50})
    assert store.get("c") is None  # all or nothing
    store.remove("a")
    assert store.bytes == 0
    store.set("n", 5)
    assert store.bytes == 1 + 8 + ENTRY_OVERHEAD
    # An expiring entry costs more (its deadline and its reference in the wheel).
    assert entry_size("a", b"x", expires=True) > entry_size("a", b"x")
    assert entry_size("n", 5, expires=True) > entry_size("n", 5)


def test_values_of_every_size_and_kind_come_back_as_stored(store, clock):
    """The dict holds small values inline (tagged, with their deadline),
    large ones as they came: each kind, with and without expiry, round-trips."""
    from django_clustershm.server.namespace import INLINE_MAX

    values = [b"", b"\x00", b"\x01" * 9, b"x" * INLINE_MAX, b"\x00" * (INLINE_MAX + 1)]
    values += [b"\x00" * (INLINE_MAX + 9), b"\x01" * (INLINE_MAX + 10), b"y" * 100_000, 0, -1, 2**62]
    for ttl in (None, 50):
        for i, value in enumerate(values):
            store.set(f"v{i}", value, ttl)
        for i, value in enumerate(values):
            assert store.get(f"v{i}") == value and type(store.get(f"v{i}")) is type(value)
            assert store.ttl(f"v{i}") == (None if ttl is None else pytest.approx(50))
        assert store.bytes == sum(entry_size(f"v{i}", v, ttl is not None) for i, v in enumerate(values))
    big = b"z" * 200_000
    store.set("big", big)
    assert store.get("big") is big  # a large value is never copied


def test_events_are_the_same_on_both_policies(store, clock):
    events = []
    store.on_event = lambda event, key, value, deadline: events.append((event, key, value, deadline))
    t0 = clock.now
    store.set("a", b"1", ttl=5)
    store.touch("a", 10)
    store.incr("n", 2, 0)
    store.remove("n")
    clock.now += 11
    store.reap()
    inf = float("inf")
    assert events == [
        (EVENT_SET, "a", b"1", t0 + 5),
        (EVENT_TOUCH, "a", b"1", t0 + 10),  # (listeners are not told of touches)
        (EVENT_SET, "n", 2, inf),
        (EVENT_REMOVE, "n", None, inf),
        (EVENT_EXPIRE, "a", None, inf),
    ]


def test_a_cache_evicts_the_least_recently_used_to_fit_its_bytes(clock):
    size = Namespace.cache(clock=clock).entry_cost("k0", b"x" * 100)
    cache = Namespace.cache(3 * size, clock=clock)
    events = []
    cache.on_event = lambda event, key, value, deadline: events.append((event, key))
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


def test_all_caches_together_stay_within_the_managers_total():
    """#12 row 8: MAX_CACHES caches of MAX_CACHE_BYTES each would multiply the
    ceiling; their MAX_BYTES add up to at most MAX_TOTAL_CACHE_BYTES: a cache
    gets what is left (logged), and none is made once too little is left."""
    from django_clustershm.exceptions import LimitExceeded
    from django_clustershm.server.engine import MIN_CACHE_BYTES, Engine
    from django_clustershm.wire import frames as P

    engine = Engine(max_cache_bytes=4 * MIN_CACHE_BYTES, max_total_cache_bytes=6 * MIN_CACHE_BYTES)
    session = engine.open_session()
    engine.dispatch(session, P.SET, ["a", "k", b"v", None, [300, 3, 4 * MIN_CACHE_BYTES]])
    engine.dispatch(session, P.SET, ["b", "k", b"v", None, [300, 3, 4 * MIN_CACHE_BYTES]])
    assert engine.caches["b"].max_bytes == 2 * MIN_CACHE_BYTES  # what was left
    with pytest.raises(LimitExceeded, match="MAX_TOTAL_CACHE_BYTES"):
        engine.dispatch(session, P.SET, ["c", "k", b"v", None, [300, 3, 4 * MIN_CACHE_BYTES]])
    assert engine.dispatch(session, P.GET, ["a", "k"]) == b"v"  # the others are untouched
    assert engine.dispatch(session, P.STATS, [])["max_total_cache_bytes"] == 6 * MIN_CACHE_BYTES


def test_the_store_has_a_finite_default_budget():
    """#12 row 8: the store was unbounded by default; now a quarter of the memory."""
    from django_clustershm.server.engine import Engine
    from django_clustershm.wire.limits import memory_limit

    engine = Engine()
    assert engine.store.max_bytes == memory_limit() // 4 > 0
    assert Engine(max_store_bytes=10**6).store.max_bytes == 10**6


@pytest.mark.parametrize(
    "bounds, error, words",
    [
        ("big", "ArgumentTypeError", "bounds must be"),
        ([1, 3], "ArgumentTypeError", "bounds must be"),
        ([True, 3, 10_000], "ArgumentTypeError", "MAX_ENTRIES must be an int"),
        ([300, 3.0, 10_000], "ArgumentTypeError", "CULL_FREQUENCY must be an int"),
        ([300, -1, 10_000], "InvalidArgument", "CULL_FREQUENCY must be 0 or more"),
        ([300, 3, 0], "InvalidArgument", "MAX_BYTES must be at least 1"),
        ([2**63, 3, 10_000], "InvalidArgument", "MAX_ENTRIES must fit"),
    ],
)
def test_every_write_to_an_existing_cache_checks_its_bounds(bounds, error, words):
    """A cache write's bounds take a shorter path once the cache exists (#19
    part 5): the same refusals as on the write that creates it, nothing written."""
    from django_clustershm import exceptions
    from django_clustershm.server.engine import Engine
    from django_clustershm.wire import frames as P

    engine = Engine()
    session = engine.open_session()
    engine.dispatch(session, P.SET, ["c", "k", b"v", None, [300, 3, 10_000]])
    for op, args in (
        (P.SET, ["c", "k", b"new", None, bounds]),
        (P.ADD, ["c", "new", b"new", None, bounds]),
        (P.INCR, ["c", "n", 1, 0, bounds]),
        (P.SET_MANY, ["c", ["k", b"new"], None, bounds]),
        (P.SET, ["fresh", "k", b"new", None, bounds]),  # the write that would create a cache
    ):
        with pytest.raises(getattr(exceptions, error), match=words):
            engine.dispatch(session, op, args)
    assert engine.dispatch(session, P.GET, ["c", "k"]) == b"v"
    assert engine.dispatch(session, P.HAS, ["c", "new"]) is False and "fresh" not in engine.caches
    # a tuple is a list's equal (the embedded transport passes Python objects as they are)
    engine.dispatch(session, P.SET, ["c", "k", b"t", None, (300, 3, 10_000)])
    assert engine.dispatch(session, P.GET, ["c", "k"]) == b"t"
