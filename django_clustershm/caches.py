"""Named, bounded LRU caches held by the Manager (one per cache ``LOCATION``).

Built on ``cachetools.TLRUCache``: least-recently-used order, a per-entry
deadline, expired entries reclaimed from a heap (work proportional to what
expired, never a scan of the cache), and a byte bound (``MAX_BYTES``) that
evicts LRU entries to make room. On top of it, the entry bound follows
Django's ``MAX_ENTRIES``/``CULL_FREQUENCY`` exactly as ``LocMemCache`` does:
before a write, if the cache holds ``MAX_ENTRIES`` entries or more, drop
``len // CULL_FREQUENCY`` least recently used ones (all of them when
``CULL_FREQUENCY`` is 0). Those two settings travel with every write, so
aliases that share a LOCATION but differ in them each get their own
behaviour, as with LocMemCache; ``MAX_BYTES`` is fixed when the cache is
first created and lasts as long as the Manager.

Pure data structure, like :mod:`.store`: no I/O, injected clock.
"""

from __future__ import annotations

import math
import time
from typing import Callable

from cachetools import TLRUCache

from .exceptions import IntegerOverflow, KeyNotFound, NotAnInteger, ValueTooLarge
from .protocol import EVENT_CLEAR, EVENT_EVICT, EVENT_EXPIRE, EVENT_REMOVE, EVENT_SET, EVENT_TOUCH
from .store import INT64_MAX, INT64_MIN, INT_SIZE, BatchOps

#: What one entry costs beyond its key and value (the tuple, the heap item, dict slots).
ENTRY_OVERHEAD = 150
DEFAULT_MAX_BYTES = 128 * 1024 * 1024

_INF = math.inf


def _ttu(key, entry, now):
    return entry[1]


def _sizeof(entry) -> int:
    return entry[2]


class _TLRU(TLRUCache):
    """TLRUCache that counts what leaves it without being asked to."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.evictions = 0
        self.expirations = 0
        self.on_event: Callable | None = None

    def popitem(self):  # called by cachetools to make room (MAX_BYTES)
        item = super().popitem()
        self.evictions += 1
        if self.on_event is not None:
            self.on_event(EVENT_EVICT, item[0], None)
        return item

    def expire(self, time=None):
        expired = super().expire(time)
        if expired:
            self.expirations += len(expired)
            if self.on_event is not None:
                for key, _ in expired:
                    self.on_event(EVENT_EXPIRE, key, None)
        return expired


class LruCache(BatchOps):
    """One named cache. Values are opaque bytes or native ints, as in the store."""

    def __init__(self, max_bytes: int = DEFAULT_MAX_BYTES, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.max_bytes = max_bytes
        self._c = _TLRU(maxsize=max_bytes, ttu=_ttu, timer=clock, getsizeof=_sizeof)
        self.hits = 0
        self.misses = 0

    @property
    def on_event(self):
        return self._c.on_event

    @on_event.setter
    def on_event(self, callback) -> None:
        self._c.on_event = callback

    @property
    def bytes(self) -> int:
        return self._c.currsize

    @property
    def evictions(self) -> int:
        return self._c.evictions

    @property
    def expired(self) -> int:
        return self._c.expirations

    def __len__(self) -> int:
        return len(self._c)

    # -- internals ---------------------------------------------------------------

    def _entry(self, key: str):
        try:
            return self._c[key]
        except KeyError:
            return None

    def _cull(self, cull_frequency: int) -> None:
        cache = self._c
        emit = cache.on_event
        if cull_frequency == 0:
            keys = list(cache) if emit is not None else ()
            cache.evictions += len(cache)
            cache.clear()
            for key in keys:
                emit(EVENT_EVICT, key, None)
            return
        pop = TLRUCache.popitem
        for _ in range(len(cache) // cull_frequency):
            key, _value = pop(cache)
            cache.evictions += 1
            if emit is not None:
                emit(EVENT_EVICT, key, None)

    def _store(self, key: str, value, ttl, max_entries: int, cull_frequency: int) -> None:
        if ttl is not None and ttl <= 0:
            self.remove(key)  # a timeout of 0 or less stores nothing (Django's meaning)
            return
        size = len(key) + (len(value) if type(value) is bytes else INT_SIZE) + ENTRY_OVERHEAD
        if size > self.max_bytes:
            raise ValueTooLarge(f"an entry of {size} bytes does not fit in a cache of MAX_BYTES={self.max_bytes}")
        if len(self._c) >= max_entries:
            self._c.expire()
            if len(self._c) >= max_entries:
                self._cull(cull_frequency)
        self._c[key] = (value, _INF if ttl is None else self.clock() + ttl, size)
        if self._c.on_event is not None:
            self._c.on_event(EVENT_SET, key, value)

    # -- operations ----------------------------------------------------------------

    def get(self, key: str):
        entry = self._entry(key)
        if entry is None:
            self.misses += 1
            return None
        self.hits += 1
        return entry[0]

    def has(self, key: str) -> bool:
        return key in self._c

    def set(self, key: str, value, ttl, max_entries: int, cull_frequency: int) -> None:
        self._store(key, value, ttl, max_entries, cull_frequency)

    def add(self, key: str, value, ttl, max_entries: int, cull_frequency: int) -> bool:
        if key in self._c:
            return False
        self._store(key, value, ttl, max_entries, cull_frequency)
        return True

    def set_many(self, mapping: dict, ttl, max_entries: int, cull_frequency: int) -> None:
        for key, value in mapping.items():
            self._store(key, value, ttl, max_entries, cull_frequency)

    def remove(self, key: str) -> bool:
        try:
            del self._c[key]
        except KeyError:  # absent, or present but expired (removed all the same)
            return False
        if self._c.on_event is not None:
            self._c.on_event(EVENT_REMOVE, key, None)
        return True

    def touch(self, key: str, ttl) -> bool:
        entry = self._entry(key)
        if entry is None:
            return False
        if ttl is not None and ttl <= 0:
            self.remove(key)
        else:
            self._c[key] = (entry[0], _INF if ttl is None else self.clock() + ttl, entry[2])
            if self._c.on_event is not None:
                self._c.on_event(EVENT_TOUCH, key, None)
        return True

    def ttl(self, key: str) -> float | None:
        """Seconds ``key`` has left (None: no expiry). The key must exist."""
        deadline = self._c[key][1]
        return None if deadline == _INF else deadline - self.clock()

    def deadline(self, key: str) -> float | None:
        """When ``key`` expires (the clock's time; None: never). The key must exist."""
        deadline = self._c[key][1]
        return None if deadline == _INF else deadline

    def incr(self, key: str, delta: int, initial: int | None = None) -> int:
        entry = self._entry(key)
        if entry is None:
            if initial is None:
                raise KeyNotFound(f"Key '{key}' not found")
            value, deadline, size = initial, _INF, len(key) + INT_SIZE + ENTRY_OVERHEAD
        else:
            value, deadline, size = entry
            if type(value) is not int:
                raise NotAnInteger(f"the value of {key!r} is not an integer")
        result = value + delta
        if not INT64_MIN <= result <= INT64_MAX:
            raise IntegerOverflow(f"incrementing {key!r} by {delta} leaves the signed 64-bit range")
        if entry is not None and type(entry[0]) is int:
            size = entry[2]
        self._c[key] = (result, deadline, size)  # keeps its expiry
        if self._c.on_event is not None:
            self._c.on_event(EVENT_SET, key, result)
        return result

    def keys(self, prefix: str = "") -> list[str]:
        return [key for key in self._c if key.startswith(prefix)]

    def clear(self) -> int:
        count = len(self._c)
        self._c.clear()
        if self._c.on_event is not None:
            self._c.on_event(EVENT_CLEAR, None, None)
        return count

    def reap(self) -> list:
        return self._c.expire()

    def next_deadline(self) -> float | None:
        return None  # cachetools keeps its heap private; the loop ticks every second anyway


class NullCache:
    """What a read sees of a cache that no one has written yet: empty."""

    hits = misses = 0

    def get(self, key):
        return None

    def has(self, key):
        return False

    def remove(self, key):
        return False

    def touch(self, key, ttl):
        return False

    def incr(self, key, delta, initial=None):
        if initial is None:
            raise KeyNotFound(f"Key '{key}' not found")
        raise KeyNotFound(f"the cache holding {key!r} does not exist yet; write to it first")

    def get_many(self, keys):
        return {}

    def delete_many(self, keys):
        return 0

    def keys(self, prefix=""):
        return []

    def clear(self):
        return 0
