"""The pure store, with a fake clock: expiry is tested without sleeping."""

import pytest

from django_clustershm.exceptions import IntegerOverflow, KeyNotFound, NotAnInteger, StoreFull
from django_clustershm.store import INT64_MAX, Store


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock():
    return FakeClock()


@pytest.fixture
def store(clock):
    return Store(clock=clock)


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
    store = Store(clock=clock, max_bytes=100)
    store.set("a", b"x" * 50)
    assert store.bytes == 51
    store.set("a", b"x" * 90)  # replacing counts the difference only
    assert store.bytes == 91
    with pytest.raises(StoreFull, match="MAX_STORE_BYTES"):
        store.set("b", b"x" * 20)
    assert store.get("b") is None and store.bytes == 91
    with pytest.raises(StoreFull):
        store.set_many({"c": b"1", "d": b"x" * 50})
    assert store.get("c") is None  # all or nothing
    store.remove("a")
    assert store.bytes == 0
    store.set("n", 5)
    assert store.bytes == 1 + 8
