"""The shared store: a key/value namespace with optional per-key expiry.

Pure data structure: no I/O, no threads, no locks. The Manager calls it from
its single event-loop thread (the embedded client under one mutex), which is
what makes every operation atomic. The clock is injected so that expiry is
tested without sleeping.

Values are opaque: ``bytes`` (the client's pickle, never unpickled here) or a
native ``int``, which is what lets ``incr``/``decr`` be atomic in the Manager.
"""

from __future__ import annotations

import heapq
import time
from typing import Callable, Iterable

from .exceptions import IntegerOverflow, KeyNotFound, NotAnInteger, StoreFull
from .protocol import EVENT_CLEAR, EVENT_EXPIRE, EVENT_REMOVE, EVENT_SET, EVENT_TOUCH

INT64_MIN = -(2**63)
INT64_MAX = 2**63 - 1

#: What an integer counts for in the byte accounting.
INT_SIZE = 8


def _size(key: str, value) -> int:
    # len(key) counts characters, not UTF-8 bytes: the accounting is a budget,
    # and encoding every key on every write would cost more than it is worth.
    return len(key) + (len(value) if type(value) is bytes else INT_SIZE)


class BatchOps:
    """The batch operations of a namespace, built on its own get/remove."""

    def get_many(self, keys: Iterable[str]) -> dict:
        found = {}
        for key in keys:
            value = self.get(key)
            if value is not None:
                found[key] = value
        return found

    def delete_many(self, keys: Iterable[str]) -> int:
        return sum(1 for key in keys if self.remove(key))


class Store(BatchOps):
    """A dict of key -> bytes|int with per-key deadlines, reaped incrementally."""

    def __init__(self, *, clock: Callable[[], float] = time.monotonic, max_bytes: int | None = None) -> None:
        self.clock = clock
        self.max_bytes = max_bytes
        self._data: dict[str, bytes | int] = {}
        self._deadline: dict[str, float] = {}
        # (deadline, key) entries; stale ones (key re-set or removed) are
        # skipped when popped, and the heap is rebuilt when they pile up.
        self._heap: list[tuple[float, str]] = []
        self.bytes = 0
        self.hits = 0
        self.misses = 0
        self.expired = 0
        #: on_event(event, key, value): what listeners are told (set by the engine).
        self.on_event: Callable | None = None

    # -- internals -------------------------------------------------------

    def _expire_if_due(self, key: str) -> bool:
        """Drop ``key`` if its deadline has passed; True if it was dropped."""
        deadline = self._deadline.get(key)
        if deadline is not None and deadline <= self.clock():
            self._drop(key)
            self.expired += 1
            if self.on_event is not None:
                self.on_event(EVENT_EXPIRE, key, None)
            return True
        return False

    def _drop(self, key: str):
        value = self._data.pop(key)
        self._deadline.pop(key, None)
        self.bytes -= _size(key, value)
        return value

    def _lookup(self, key: str):
        value = self._data.get(key)
        if value is None or (self._deadline and self._expire_if_due(key)):
            return None
        return value

    def _put(self, key: str, value, ttl: float | None, emit: bool = True) -> None:
        old = self._data.get(key)
        delta = _size(key, value) - (_size(key, old) if old is not None else 0)
        if self.max_bytes is not None and delta > 0 and self.bytes + delta > self.max_bytes:
            raise StoreFull(
                f"storing {key!r} would take the store to {self.bytes + delta} bytes; "
                f"its maximum (MAX_STORE_BYTES) is {self.max_bytes}"
            )
        self._data[key] = value
        self.bytes += delta
        if ttl is None:
            self._deadline.pop(key, None)
        else:
            deadline = self.clock() + ttl
            self._deadline[key] = deadline
            heapq.heappush(self._heap, (deadline, key))
            if len(self._heap) > 2 * len(self._deadline) + 1024:
                self._heap = [(d, k) for k, d in self._deadline.items()]
                heapq.heapify(self._heap)
        if emit and self.on_event is not None:
            self.on_event(EVENT_SET, key, value)

    # -- operations --------------------------------------------------------

    def get(self, key: str):
        value = self._lookup(key)
        if value is None:
            self.misses += 1
        else:
            self.hits += 1
        return value

    def has(self, key: str) -> bool:
        return self._lookup(key) is not None

    def set(self, key: str, value, ttl: float | None = None) -> None:
        if ttl is not None and ttl <= 0:
            # A timeout of zero or less stores nothing (Django's meaning), and
            # must not leave an older value behind either.
            self.remove(key)
            return
        self._put(key, value, ttl)

    def add(self, key: str, value, ttl: float | None = None) -> bool:
        if self._lookup(key) is not None:
            return False
        if ttl is not None and ttl <= 0:
            return True  # stored and expired at once, as Django's backends do
        self._put(key, value, ttl)
        return True

    def remove(self, key: str) -> bool:
        if key not in self._data or self._expire_if_due(key):
            return False
        self._drop(key)
        if self.on_event is not None:
            self.on_event(EVENT_REMOVE, key, None)
        return True

    def touch(self, key: str, ttl: float | None) -> bool:
        if self._lookup(key) is None:
            return False
        if ttl is not None and ttl <= 0:
            self._drop(key)
            if self.on_event is not None:
                self.on_event(EVENT_REMOVE, key, None)
            return True
        self._put(key, self._data[key], ttl, emit=False)
        if self.on_event is not None:
            self.on_event(EVENT_TOUCH, key, None)
        return True

    def incr(self, key: str, delta: int, initial: int | None = None) -> int:
        value = self._lookup(key)
        if value is None:
            if initial is None:
                raise KeyNotFound(f"key {key!r} not found")
            value = initial
        elif type(value) is not int:
            raise NotAnInteger(f"the value of {key!r} is not an integer")
        result = value + delta
        if not INT64_MIN <= result <= INT64_MAX:
            raise IntegerOverflow(f"incrementing {key!r} by {delta} leaves the signed 64-bit range")
        # An existing key keeps its expiry (as in Redis and Django's LocMemCache).
        deadline = self._deadline.get(key)
        self._put(key, result, None if deadline is None else deadline - self.clock())
        return result

    def set_many(self, mapping: dict, ttl: float | None = None) -> None:
        if self.max_bytes is not None:
            # All or nothing: check the budget before the first write.
            delta = sum(_size(k, v) - (_size(k, self._data[k]) if k in self._data else 0) for k, v in mapping.items())
            if delta > 0 and self.bytes + delta > self.max_bytes:
                raise StoreFull(f"set_many would take the store over its maximum of {self.max_bytes} bytes")
        for key, value in mapping.items():
            self.set(key, value, ttl)

    def keys(self, prefix: str = "") -> list[str]:
        self.reap()
        if not prefix:
            return list(self._data)
        return [key for key in self._data if key.startswith(prefix)]

    def clear(self) -> int:
        self.reap()
        count = len(self._data)
        self._data.clear()
        self._deadline.clear()
        self._heap.clear()
        self.bytes = 0
        if self.on_event is not None:
            self.on_event(EVENT_CLEAR, None, None)
        return count

    def __len__(self) -> int:
        return len(self._data)

    # -- expiry ------------------------------------------------------------

    def ttl(self, key: str) -> float | None:
        """Seconds ``key`` has left (None: no expiry). The key must exist."""
        deadline = self._deadline.get(key)
        return None if deadline is None else deadline - self.clock()

    def deadline(self, key: str) -> float | None:
        """When ``key`` expires (the clock's time; None: never)."""
        return self._deadline.get(key)

    def next_deadline(self) -> float | None:
        """When the next key may expire (monotonic seconds), for the event loop's sleep."""
        return self._heap[0][0] if self._heap else None

    def reap(self, limit: int = 10_000) -> list[str]:
        """Drop up to ``limit`` keys whose deadline has passed; return their names.

        Work is proportional to what expired, never to the size of the store.
        """
        now = self.clock()
        heap = self._heap
        gone = []
        while heap and heap[0][0] <= now and len(gone) < limit:
            deadline, key = heapq.heappop(heap)
            if self._deadline.get(key) == deadline:
                self._drop(key)
                self.expired += 1
                gone.append(key)
                if self.on_event is not None:
                    self.on_event(EVENT_EXPIRE, key, None)
        return gone
