"""One namespace implementation for the shared store and for every named cache.

The store (``ns == ""``) and the caches (one per Django cache ``LOCATION``)
obey the same rules, written once here: expiry (a per-key deadline on the
Manager's clock, reclaimed from a heap in work proportional to what expired),
"a timeout of zero or less stores nothing" (Django's meaning), ``add``,
``touch``, atomic ``incr``/``decr`` that keep a key's expiry, size
accounting (:func:`entry_size`), batches, and the events that listeners and
near caches are told. What differs is only where the entries live, the
*table* (a policy):

* :class:`StoreTable`: a dict, unbounded, or with a byte budget
  (``MAX_STORE_BYTES``) that *refuses* a write past it (:class:`StoreFull`):
  the store holds state (login status, flags) that must not vanish.
* :class:`LruTable`: ``cachetools.LRUCache`` bounded by bytes (``MAX_BYTES``),
  that *evicts* the least recently used entries to make room; plus Django's
  ``MAX_ENTRIES``/``CULL_FREQUENCY``, applied exactly as ``LocMemCache`` does
  (before a write, if the cache holds ``MAX_ENTRIES`` entries or more, drop
  ``len // CULL_FREQUENCY`` least recently used ones, all when it is 0).
  Those two travel with every write, so aliases that share a LOCATION keep
  their own; ``MAX_BYTES`` is fixed when the cache is first written.

Pure data structures: no I/O, no threads, an injected clock (tests move time
by hand). The Manager calls them from its one loop thread (the embedded
transport under one mutex), which is what makes each operation atomic.
Arguments are checked by the engine before they get here.

Values are opaque: ``bytes`` (the client's pickle, never unpickled here) or a
native ``int`` (so that ``incr`` happens here).
"""

from __future__ import annotations

import heapq
import math
import time
from collections.abc import Callable, Iterable

from cachetools import Cache, LRUCache

from ..exceptions import IntegerOverflow, KeyNotFound, NotAnInteger, StoreFull, ValueTooLarge
from ..wire.args import INT64_MAX, INT64_MIN
from ..wire.frames import EVENT_CLEAR, EVENT_EVICT, EVENT_EXPIRE, EVENT_REMOVE, EVENT_SET, EVENT_TOUCH
from ..wire.limits import DEFAULT_CACHE_BYTES

INF = math.inf
#: What an integer value counts for in the byte accounting.
INT_SIZE = 8
#: What one entry costs beyond its key and value (the tuple, dict and heap slots).
ENTRY_OVERHEAD = 150


def entry_size(key: str, value) -> int:
    """What an entry counts for against a budget, in the store and in caches alike.

    ``len(key)`` counts characters, not UTF-8 bytes: the accounting is a
    budget, and encoding every key on every write would cost more than it is worth.
    """
    return len(key) + (len(value) if type(value) is bytes else INT_SIZE) + ENTRY_OVERHEAD


# An entry is a tuple (value, deadline, size); deadline INF: never expires.


class StoreTable:
    """The store's policy: a dict, with an optional budget that refuses."""

    kind = "store"

    def __init__(self, max_bytes: int | None = None) -> None:
        self.max_bytes = max_bytes
        self.data: dict[str, tuple] = {}
        self.get = self.peek = self.data.get
        self.bytes = 0
        self.evictions = 0

    def check(self, key: str, size: int, old) -> None:
        if self.max_bytes is not None:
            delta = size - (old[2] if old is not None else 0)
            if delta > 0 and self.bytes + delta > self.max_bytes:
                raise StoreFull(
                    f"storing {key!r} would take the store to {self.bytes + delta} bytes; "
                    f"its maximum (MAX_STORE_BYTES) is {self.max_bytes}"
                )

    def check_batch(self, delta: int) -> None:
        if self.max_bytes is not None and delta > 0 and self.bytes + delta > self.max_bytes:
            raise StoreFull(
                f"the batch would take the store over its maximum of {self.max_bytes} bytes (MAX_STORE_BYTES)"
            )

    def put(self, key: str, entry: tuple, old) -> None:
        self.data[key] = entry
        self.bytes += entry[2] - (old[2] if old is not None else 0)

    def pop(self, key: str):
        entry = self.data.pop(key, None)
        if entry is not None:
            self.bytes -= entry[2]
        return entry

    def popitem(self):  # pragma: no cover - the store never evicts
        raise KeyError("the store does not evict")

    def __len__(self) -> int:
        return len(self.data)

    def __iter__(self):
        return iter(self.data)

    def clear(self) -> None:
        self.data.clear()
        self.bytes = 0


class _LRU(LRUCache):
    """cachetools' LRUCache that reports what it evicts to make room."""

    on_evict: Callable | None = None

    def popitem(self):
        item = super().popitem()
        if self.on_evict is not None:
            self.on_evict(item[0])
        return item


def _sizeof(entry) -> int:
    return entry[2]


_peek = Cache.__getitem__


class LruTable:
    """A named cache's policy: LRU order, bounded by bytes, evicting to make room."""

    kind = "cache"

    def __init__(self, max_bytes: int = DEFAULT_CACHE_BYTES) -> None:
        self.max_bytes = max_bytes
        self._c = _LRU(maxsize=max_bytes, getsizeof=_sizeof)
        self.evictions = 0

    @property
    def bytes(self) -> int:
        return int(self._c.currsize)

    def get(self, key: str):
        try:
            return self._c[key]  # makes it the most recently used
        except KeyError:
            return None

    def peek(self, key: str):
        try:
            return _peek(self._c, key)
        except KeyError:
            return None

    def check(self, key: str, size: int, old) -> None:
        if size > self.max_bytes:
            raise ValueTooLarge(f"an entry of {size} bytes does not fit in a cache of MAX_BYTES={self.max_bytes}")

    def check_batch(self, delta: int) -> None:
        pass  # a cache makes room by evicting

    def put(self, key: str, entry: tuple, old) -> None:
        self._c[key] = entry

    def pop(self, key: str):
        return self._c.pop(key, None)

    def popitem(self):
        """The least recently used entry, removed (a cull)."""
        return LRUCache.popitem(self._c)

    def __len__(self) -> int:
        return len(self._c)

    def __iter__(self):
        return iter(list(self._c.keys()))

    def clear(self) -> None:
        self._c.clear()


class Namespace:
    """The store, or one named cache: the operations, over a table (policy)."""

    def __init__(self, table, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.table = table
        self.clock = clock
        # (deadline, key) of entries that expire; stale ones (key re-set,
        # touched or removed) are skipped when popped, and the heap is rebuilt
        # when they pile up.
        self._heap: list[tuple[float, str]] = []
        self.hits = 0
        self.misses = 0
        self.expired = 0
        #: on_event(event, key, value): what listeners and near caches are told (set by the engine).
        self.on_event: Callable | None = None
        if isinstance(table, LruTable):
            table._c.on_evict = self._evicted

    @classmethod
    def store(cls, max_bytes: int | None = None, *, clock: Callable[[], float] = time.monotonic) -> Namespace:
        return cls(StoreTable(max_bytes), clock=clock)

    @classmethod
    def cache(cls, max_bytes: int = DEFAULT_CACHE_BYTES, *, clock: Callable[[], float] = time.monotonic) -> Namespace:
        return cls(LruTable(max_bytes), clock=clock)

    # -- figures -------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self.table)

    @property
    def bytes(self) -> int:
        return self.table.bytes

    @property
    def max_bytes(self) -> int | None:
        return self.table.max_bytes

    @property
    def evictions(self) -> int:
        return self.table.evictions

    # -- internals -------------------------------------------------------------------

    def _emit(self, event: int, key, value=None) -> None:
        if self.on_event is not None:
            self.on_event(event, key, value)

    def _live(self, key: str, peek: bool = False):
        """The entry of ``key`` if it exists and has not expired (an expired one is dropped now)."""
        entry = (self.table.peek if peek else self.table.get)(key)
        if entry is None:
            return None
        deadline = entry[1]
        if deadline != INF and deadline <= self.clock():
            self.table.pop(key)
            self.expired += 1
            self._emit(EVENT_EXPIRE, key)
            return None
        return entry

    def _evicted(self, key: str) -> None:
        self.table.evictions += 1
        self._emit(EVENT_EVICT, key)

    def _deadline(self, ttl) -> float:
        return INF if ttl is None else self.clock() + ttl

    def _make_room(self, bounds) -> None:
        """Django's MAX_ENTRIES/CULL_FREQUENCY, before a cache write (as LocMemCache)."""
        max_entries, cull_frequency = bounds[0], bounds[1]
        table = self.table
        if len(table) < max_entries:
            return
        self.reap()
        if len(table) < max_entries:
            return
        count = len(table) if cull_frequency == 0 else len(table) // cull_frequency
        for _ in range(count):
            key, _entry = table.popitem()
            self._evicted(key)

    def _put(self, key: str, value, deadline: float, bounds, event: int = EVENT_SET) -> None:
        table = self.table
        size = entry_size(key, value)
        old = table.peek(key)
        table.check(key, size, old)  # refuse before anything changes
        if bounds is not None:
            self._make_room(bounds)
            old = table.peek(key)  # the cull may have taken it
        table.put(key, (value, deadline, size), old)
        if deadline != INF:
            heap = self._heap
            heapq.heappush(heap, (deadline, key))
            if len(heap) > 2 * len(table) + 1024:
                self._heap = [
                    (e[1], k) for k, e in ((k, table.peek(k)) for k in table) if e is not None and e[1] != INF
                ]
                heapq.heapify(self._heap)
        on_event = self.on_event
        if on_event is not None:
            on_event(event, key, value if event == EVENT_SET else None)

    # -- operations (the wire's requests) ------------------------------------------------

    def get(self, key: str):
        entry = self._live(key)
        if entry is None:
            self.misses += 1
            return None
        self.hits += 1
        return entry[0]

    def has(self, key: str) -> bool:
        return self._live(key, peek=True) is not None

    def set(self, key: str, value, ttl: float | None = None, bounds=None) -> None:
        if ttl is not None and ttl <= 0:
            # Stores nothing, and must not leave an older value behind either.
            self.remove(key)
            return
        self._put(key, value, self._deadline(ttl), bounds)

    def add(self, key: str, value, ttl: float | None = None, bounds=None) -> bool:
        if self._live(key, peek=True) is not None:
            return False
        if ttl is not None and ttl <= 0:
            return True  # stored and expired at once, as Django's backends do
        self._put(key, value, self._deadline(ttl), bounds)
        return True

    def remove(self, key: str) -> bool:
        if self._live(key, peek=True) is None:
            return False
        self.table.pop(key)
        self._emit(EVENT_REMOVE, key)
        return True

    def touch(self, key: str, ttl: float | None) -> bool:
        entry = self._live(key)
        if entry is None:
            return False
        if ttl is not None and ttl <= 0:
            self.table.pop(key)
            self._emit(EVENT_REMOVE, key)
            return True
        self._put(key, entry[0], self._deadline(ttl), None, EVENT_TOUCH)
        return True

    def incr(self, key: str, delta: int, initial: int | None = None, bounds=None) -> int:
        entry = self._live(key)
        if entry is None:
            if initial is None:
                raise KeyNotFound(f"Key '{key}' not found")
            value, deadline = initial, INF
        else:
            value, deadline = entry[0], entry[1]
            if type(value) is not int:
                raise NotAnInteger(f"the value of {key!r} is not an integer")
        result = value + delta
        if not INT64_MIN <= result <= INT64_MAX:
            raise IntegerOverflow(f"incrementing {key!r} by {delta} leaves the signed 64-bit range")
        # An existing key keeps its expiry (as in Redis and Django's LocMemCache).
        self._put(key, result, deadline, bounds if entry is None else None)
        return result

    def get_many(self, keys: Iterable[str]) -> dict:
        found = {}
        for key in keys:
            value = self.get(key)
            if value is not None:
                found[key] = value
        return found

    def set_many(self, mapping: dict, ttl: float | None = None, bounds=None) -> None:
        """All or nothing: every entry is checked against the budget before the first is written."""
        table = self.table
        delta = 0
        for key, value in mapping.items():
            size = entry_size(key, value)
            old = table.peek(key)
            table.check(key, size, old)
            delta += size - (old[2] if old is not None else 0)
        if ttl is None or ttl > 0:
            table.check_batch(delta)
        for key, value in mapping.items():
            self.set(key, value, ttl, bounds)

    def delete_many(self, keys: Iterable[str]) -> int:
        return sum(1 for key in keys if self.remove(key))

    def keys(self, prefix: str = "") -> list[str]:
        self.reap()
        if not prefix:
            return list(self.table)
        return [key for key in self.table if key.startswith(prefix)]

    def clear(self) -> int:
        self.reap()
        count = len(self.table)
        self.table.clear()
        self._heap.clear()
        self._emit(EVENT_CLEAR, None)
        return count

    # -- expiry ------------------------------------------------------------------------

    def ttl(self, key: str) -> float | None:
        """Seconds ``key`` has left (None: no expiry). The key must exist."""
        deadline = self.table.peek(key)[1]
        return None if deadline == INF else deadline - self.clock()

    def deadline(self, key: str) -> float | None:
        """When ``key`` expires, on the clock (None: never). The key must exist."""
        deadline = self.table.peek(key)[1]
        return None if deadline == INF else deadline

    def next_deadline(self) -> float | None:
        """When the next key may expire, for the event loop's sleep."""
        return self._heap[0][0] if self._heap else None

    def reap(self, limit: int = 10_000) -> list[str]:
        """Drop up to ``limit`` keys whose deadline has passed; return their names.

        Work is proportional to what expired, never to the size of the namespace.
        """
        heap = self._heap
        if not heap:
            return []
        now = self.clock()
        table = self.table
        gone: list[str] = []
        while heap and heap[0][0] <= now and len(gone) < limit:
            deadline, key = heapq.heappop(heap)
            entry = table.peek(key)
            if entry is not None and entry[1] == deadline:
                table.pop(key)
                self.expired += 1
                gone.append(key)
                self._emit(EVENT_EXPIRE, key)
        return gone
