"""One namespace implementation for the shared store and for every named cache.

The store (``ns == ""``) and the caches (one per Django cache ``LOCATION``)
obey the same rules, written once here in :class:`Namespace`: expiry (a
per-key deadline on the Manager's clock, reclaimed by an :class:`ExpiryWheel`
in work proportional to what expired), "a timeout of zero or less stores
nothing" (Django's meaning), ``add``, ``touch``, atomic ``incr``/``decr``
that keep a key's expiry, byte accounting, batches, and the events that
listeners and near caches are told. What differs is the policy, in two
subclasses:

* :class:`Store`: refuses a write past its byte budget (``MAX_STORE_BYTES``,
  :class:`StoreFull`): the store holds state (login status, flags) that must
  not vanish to make room.
* :class:`Cache`: least recently used order, bounded by bytes (``MAX_BYTES``),
  *evicting* to make room; plus Django's ``MAX_ENTRIES``/``CULL_FREQUENCY``,
  applied exactly as ``LocMemCache`` does (before a write, if the cache holds
  ``MAX_ENTRIES`` entries or more, drop ``len // CULL_FREQUENCY`` least
  recently used ones, all when it is 0). Those two travel with every write,
  so aliases that share a LOCATION keep their own; ``MAX_BYTES`` is fixed
  when the cache is first written.

Memory (#12). A Manager may hold millions of small keys, and what an entry
costs is what the budgets must count. So an entry is the least Python can
hold: one slot of one ``dict`` (key -> stored value), and no per-entry
tuple, size or order record:

* In the store, the stored value is the client's ``bytes`` (or a native
  ``int``) itself; only a key with a deadline holds a ``(value, deadline)``
  tuple (the store's keys rarely expire).
* In a cache, where nearly every key expires (Django's default timeout is
  300 s), a value of up to :data:`INLINE_MAX` bytes is stored as *8 bytes of
  deadline followed by the value*, one ``bytes`` object: the deadline costs 8
  bytes instead of a tuple and a float (96). Larger values and integers are a
  ``(value, deadline)`` tuple, whose cost is small next to theirs (and a large
  value is then never copied).
* The cache's LRU order is the dict's own order: a hit moves the key to the
  end (pop and insert again), eviction takes keys from the front, in batches
  so that the dict's holes are skipped once per batch, not once per key. (Past
  32k keys a namespace's dict is split in 1024 by hash, so that no resize
  stalls the Manager: the order is then exact within each part and
  approximate across them; see :class:`Namespace`.)
  ``cachetools.LRUCache`` (which this replaced) keeps three hash-table slots
  and an ``OrderedDict`` node per entry: 230 bytes more per key, measured.
* Expiry is an :class:`ExpiryWheel`: one reference per expiring key in a
  bucket list, instead of a ``(deadline, key)`` tuple on a heap (72 bytes).

:func:`entry_size` counts an entry as it really costs (the str and bytes
headers, the dict slot and allocator rounding, measured; see
``bench/bench_memory.py``), so that RSS stays near the budgets.

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
import struct
import sys
import time
from collections.abc import Callable, Generator, Iterable, Iterator, Sequence
from itertools import chain, islice
from typing import Any

from ..exceptions import IntegerOverflow, KeyNotFound, NotAnInteger, StoreFull, ValueTooLarge
from ..wire.args import INT64_MAX, INT64_MIN
from ..wire.frames import EVENT_CLEAR, EVENT_EVICT, EVENT_EXPIRE, EVENT_REMOVE, EVENT_SET, EVENT_TOUCH
from ..wire.limits import DEFAULT_CACHE_BYTES

INF = math.inf
#: What an integer value counts for in the byte accounting (beyond the overhead).
INT_SIZE = 8
#: What one entry costs beyond the characters of its key and the bytes of its
#: value: a str header (49), a bytes header (33), a dict slot (19-38 bytes by
#: how full its table is; 31-40 before namespaces were split, #12) and the
#: allocator's rounding of two objects to 16 bytes. Measured on CPython 3.11 at
#: 100k and 1M keys (bench/bench_memory.py); kept at the unsplit figure, so that
#: RSS stays under what the budgets count (0.80-0.94x of it at 100k-3M keys).
ENTRY_OVERHEAD = 136
#: What an expiring entry costs more: its wheel reference (8 bytes, and the
#: stale ones a sweep has not dropped yet, which keep a removed key's str).
WHEEL_REF = 32
#: ... and where its deadline does not fit inline, a (value, deadline) tuple and float.
TIMED_TUPLE = 96
#: Values up to this size are stored inline, after a tag byte (and the
#: deadline's 8 bytes if they have one); larger ones are stored as they came
#: (or in a tuple with their deadline) and never copied.
INLINE_MAX = 1024
#: A stored bytes object longer than this is a large value as it came.
_RAW_MIN = INLINE_MAX + 9

_TIMED = struct.Struct("<Bd")  # tag 1 and the deadline
_pack_timed = _TIMED.pack
_unpack_deadline = struct.Struct("<d").unpack_from


def _pack(value, deadline: float):
    """What the dict holds for ``value`` expiring at ``deadline`` (INF: never).

    * ``b"\\x00" + value``: a value of up to INLINE_MAX bytes without expiry;
    * ``b"\\x01" + deadline (8 bytes) + value``: the same with a deadline;
    * the value itself: a larger value without expiry (longer than _RAW_MIN,
      so it cannot be mistaken for the two above), or an int without expiry;
    * ``(value, deadline)``: anything else (a larger value or an int that expires).
    """
    if type(value) is bytes:
        size = len(value)
        if size <= INLINE_MAX:
            return b"\x00" + value if deadline == INF else _pack_timed(1, deadline) + value
        if size > _RAW_MIN and deadline == INF:
            return value
        return (value, deadline)
    return value if deadline == INF else (value, deadline)


def _unpack(stored) -> tuple:
    """(value, deadline) of what the dict holds."""
    kind = type(stored)
    if kind is bytes:
        if len(stored) > _RAW_MIN:
            return stored, INF
        if stored[0] == 0:
            return stored[1:], INF
        return stored[9:], _unpack_deadline(stored, 1)[0]
    if kind is tuple:
        return stored
    return stored, INF


def _deadline_of(stored) -> float:
    kind = type(stored)
    if kind is bytes:
        if len(stored) > _RAW_MIN or stored[0] == 0:
            return INF
        return _unpack_deadline(stored, 1)[0]
    if kind is tuple:
        return stored[1]
    return INF


def _cost(key: str, stored) -> int:
    """What an entry costs in memory, as the budgets count it."""
    kind = type(stored)
    if kind is bytes:
        size = len(key) + len(stored) + ENTRY_OVERHEAD
        return size if len(stored) > _RAW_MIN or stored[0] == 0 else size + WHEEL_REF
    if kind is int:
        return len(key) + INT_SIZE + ENTRY_OVERHEAD
    value = stored[0]
    size = len(key) + (len(value) if type(value) is bytes else INT_SIZE) + ENTRY_OVERHEAD + TIMED_TUPLE
    return size if stored[1] == INF else size + WHEEL_REF


def entry_size(key: str, value, expires: bool = False) -> int:
    """What an entry counts for against a budget, in the store and in caches alike.

    ``len(key)`` counts characters, not UTF-8 bytes: keys are ASCII (the
    engine checks), and encoding every key on every write would cost more
    than it is worth.
    """
    return _cost(key, _pack(value, 1.0 if expires else INF))


# -- the expiry wheel -------------------------------------------------------------------

#: The wheel's resolution: an expired key is reclaimed (and listeners told)
#: at most 1/64 s after its deadline. Reads are exact whatever the wheel does.
UNITS = 64
#: Far deadlines wait in coarse buckets (64 s, then 1 s) and move to finer
#: ones as they come near, so that a long-lived key costs one reference and
#: the number of buckets stays small (about 128 plus one per 64 s of TTL).
_COARSE = (4096, 64)


def _check_point(du: float, nu: float) -> int:
    """The first check of a deadline ``du`` (in units) strictly after ``nu``.

    A deadline's checks (its *chain*) are its floor at 64 s, its floor at
    1 s, and the unit after it. They depend on the deadline alone, so the
    wheel can tell a key's current reference from a stale one without
    keeping anything per key.
    """
    for k in _COARSE:
        point = int(du // k) * k
        if point > nu:
            return point
    return int(du // 1) + 1


def _on_chain(point: int, du: float) -> bool:
    return point == int(du // 1) + 1 or point == int(du // 64) * 64 or point == int(du // 4096) * 4096


#: References a bucket's open list holds before they become one tuple (see :class:`Bucket`).
CHUNK = 64


class Bucket:
    """The keys to look at at one time: full chunks (tuples of CHUNK keys) and an open list.

    The garbage collector visits every reference of a list at every full
    collection: with a reference per expiring key, a million of them cost
    about 20 ms of the Manager's loop each time. A tuple of strs stops being
    tracked once a young collection has seen it (CPython untracks tuples of
    atomic objects), so a bucket's references are invisible to it but for
    its open list (CHUNK at most) and one per chunk.
    """

    __slots__ = ("chunks", "tail")

    def __init__(self) -> None:
        self.chunks: list[tuple[str, ...]] = []
        self.tail: list[str] = []

    def append(self, key: str) -> None:
        tail = self.tail
        tail.append(key)
        if len(tail) >= CHUNK:
            self.chunks.append(tuple(tail))
            tail.clear()

    def take(self, limit: int) -> list[str]:
        """Remove and return up to ``limit`` references (at least one if any is left)."""
        tail = self.tail
        while not tail and self.chunks:
            tail += self.chunks.pop()
        if len(tail) <= limit:
            self.tail = []
            return tail
        taken = tail[-limit:]
        del tail[-limit:]
        return taken

    def __bool__(self) -> bool:
        return bool(self.tail or self.chunks)

    def __len__(self) -> int:
        return len(self.tail) + sum(map(len, self.chunks))

    def __iter__(self) -> Iterator[str]:
        yield from chain.from_iterable(self.chunks)
        yield from self.tail


class ExpiryWheel:
    """Buckets of keys to look at, by time (in 1/64 s units), and a heap of the bucket times.

    A key is in the bucket of its deadline's next check; when that comes, the
    namespace expires it, or moves it to its next check, or drops the
    reference if the key was since removed or given another deadline (a
    stale reference). Stale references are also swept incrementally when they
    pile up (:meth:`Namespace.reap`), so that a client setting and removing
    expiring keys cannot grow the wheel without bound.
    """

    __slots__ = ("buckets", "heap", "refs")

    def __init__(self) -> None:
        self.buckets: dict[int, Bucket] = {}
        self.heap: list[int] = []
        #: references held by all buckets, current and stale
        self.refs = 0

    def add(self, key: str, deadline: float, now: float, old_deadline: float = INF) -> None:
        """``key`` now expires at ``deadline``; ``old_deadline`` is the one it had (INF: none).

        No second reference is added when the old one is already at the
        right check (a key re-set with the same timeout, over and over).
        """
        nu = now * UNITS
        point = _check_point(deadline * UNITS, nu)
        if old_deadline != INF and _check_point(old_deadline * UNITS, nu) == point:
            return
        self.put(key, point)

    def put(self, key: str, point: int) -> None:
        bucket = self.buckets.get(point)
        if bucket is None:
            bucket = self.buckets[point] = Bucket()
            heapq.heappush(self.heap, point)
        bucket.append(key)
        self.refs += 1

    def next_time(self) -> float | None:
        return self.heap[0] / UNITS if self.heap else None

    def clear(self) -> None:
        self.buckets.clear()
        self.heap.clear()
        self.refs = 0


# -- a namespace while a scan copies its keys (see .scans) -------------------------------

_MISS = object()
#: In an overlay's ``young``: the key was removed (it may still be in ``base``).
_GONE = object()


class Overlay:
    """A namespace's dict (one of its parts) while a scan copies its keys in bounded steps.

    Python's dict iterator breaks as soon as its dict changes size, and a
    SCAN cursor must outlive writes, so its snapshot of the keys used to be
    one C-level copy when the scan started: 15-25 ms of the Manager's loop per
    million keys. While a snapshot is copied (:meth:`Namespace.freeze`), the
    namespace's dict (``base``) stops changing: this overlay takes its place,
    with every change since in ``young`` (a new value, or ``_GONE`` for a
    removal) and reads looking there first, so that the copy walks ``base`` a
    chunk at a time across loop rounds and gets exactly the keys of the
    moment it started. :meth:`Namespace.thaw` puts ``young``'s changes back
    into ``base`` (work: the changes made meanwhile, a few milliseconds'
    worth of writes) and the plain dict returns.

    A split namespace has an overlay per part (see :class:`Namespace`), and
    the copy walks their bases one after the other. To every method of
    :class:`Namespace` an overlay is the dict it stands for, order included: a value set again keeps its key's place, a key removed then set
    again (a cache's move to the most recently used end) comes last, as a new
    key does. Slower than a dict (Python, not C), for the few milliseconds a
    copy lasts.
    """

    __slots__ = ("base", "hidden", "moved", "size", "young")

    def __init__(self, base: dict) -> None:
        self.base = base
        #: key -> its value since the freeze, or _GONE (removed), in the order a dict would have them
        self.young: dict = {}
        #: keys of ``base`` removed and set again since: their place is in ``young``'s order
        self.moved: dict = {}
        self.size = len(base)
        self.hidden = False  # cleared since: base's entries are all gone

    def get(self, key, default=None):
        value = self.young.get(key, _MISS)
        if value is _MISS:
            return default if self.hidden else self.base.get(key, default)
        return default if value is _GONE else value

    def __contains__(self, key) -> bool:
        return self.get(key, _MISS) is not _MISS

    def __getitem__(self, key):
        value = self.get(key, _MISS)
        if value is _MISS:
            raise KeyError(key)
        return value

    def _in_base(self, key) -> bool:
        return not self.hidden and key in self.base

    def __setitem__(self, key, value) -> None:
        young = self.young
        old = young.get(key, _MISS)
        if old is _GONE:
            del young[key]  # set again after a removal: it comes last, as a new key does in a dict
            if self._in_base(key):
                self.moved[key] = None
            self.size += 1
        elif old is _MISS and not self._in_base(key):
            self.size += 1
        young[key] = value

    def __delitem__(self, key) -> None:
        young = self.young
        old = young.get(key, _MISS)
        if old is _GONE or (old is _MISS and not self._in_base(key)):
            raise KeyError(key)
        if self._in_base(key):
            young[key] = _GONE
        else:
            del young[key]
        self.size -= 1

    def pop(self, key, default=_MISS):
        value = self.get(key, _MISS)
        if value is _MISS:
            if default is _MISS:
                raise KeyError(key)
            return default
        del self[key]
        return value

    def __len__(self) -> int:
        return self.size

    def items(self) -> Iterator[tuple]:
        young, moved = self.young, self.moved
        hidden = self.hidden
        if not hidden:
            for key, value in self.base.items():  # base does not change while the overlay stands
                changed = young.get(key, _MISS)
                if changed is _MISS:
                    yield key, value
                elif changed is not _GONE and key not in moved:
                    yield key, changed  # set again in its place
        base = self.base
        for key, value in list(young.items()):
            if value is not _GONE and (hidden or key in moved or key not in base):
                yield key, value

    def __iter__(self) -> Iterator:
        for key, _ in self.items():
            yield key

    def clear(self) -> None:
        self.young.clear()
        self.moved.clear()
        self.hidden = True
        self.size = 0

    def merge(self) -> dict:
        """Put the changes into ``base`` (no copy is walking it any more) and return it."""
        base, moved = self.base, self.moved
        if self.hidden:
            base.clear()
        for key, value in self.young.items():
            if value is _GONE:
                base.pop(key, None)
            elif key in moved or key not in base:
                base.pop(key, None)
                base[key] = value  # the end of the order, where the dict it stood for has it
            else:
                base[key] = value
        self.young, self.moved = {}, {}
        return base


# -- the namespace's parts -------------------------------------------------------------

#: Rounds of an approximate LRU walk over many parts (see :func:`_interleave`).
ROUNDS = 64


def _interleave(parts: list, items: bool, start: int = 0) -> Iterator:
    """The entries of ``parts`` (``items``: ``(key, stored)`` pairs; else keys), least recently used first.

    Exactly so in one part (its dict's order). In many, approximately: in
    :data:`ROUNDS` rounds, each taking the next 1/ROUNDS of every part from its
    front (starting with part ``start``). A key's part is chosen by its hash,
    so every part holds a fair sample of the keys, and the front 1/ROUNDS of
    each is about the least recently used 1/ROUNDS of them all. The parts must
    not change while it runs (callers collect, then act).
    """
    if len(parts) == 1:
        yield from parts[0].items() if items else parts[0]
        return
    order = parts[start:] + parts[:start]
    walks = [(iter(part.items() if items else part), len(part)) for part in order]
    for r in range(ROUNDS):
        for walk, size in walks:
            take = size * (r + 1) // ROUNDS - size * r // ROUNDS
            if take:
                yield from islice(walk, take)


# -- the namespace ----------------------------------------------------------------------


class Namespace:
    """The operations, over one dict or many (its *parts*); :class:`Store` and :class:`Cache` are the policies.

    Its entries (key -> stored value, see :func:`_pack`) are one dict until it
    holds :attr:`SPLIT_AT` keys, then :attr:`PARTS` dicts, key ``k`` in
    ``parts[hash(k) & mask]`` (#12). A dict grows by copying itself whole into
    a table twice as large, in one C call: 25 ms of the Manager's loop at 700k
    keys, 52 ms at 1.4M, 110 ms at 2.8M, measured; a part holds 1/PARTS of the
    keys, so its resize copies that much (under 1 ms at 3M keys, about 3 ms at
    100M). The split itself is one pass over SPLIT_AT keys (6 ms, once), and a
    dict of up to SPLIT_AT keys resizes in under 1 ms. Smaller tables cost
    less too: a part's index holds 2-byte slots up to about 22k keys (1-byte
    ones up to 85) where one dict of 100k keys or more needs 4-byte ones: 3-8
    bytes a key less, measured. A lookup pays for ``hash()`` (cached in the
    str) and an index: 50-90 ns.

    Order. A cache's LRU order is each part's dict order, exact within a
    part; across parts, its least recently used are taken a fair share from
    the front of every part (:func:`_interleave`): an approximation of LRU, as
    Redis's and memcached's are, for namespaces over SPLIT_AT keys only; a
    smaller one has one part and the exact order it always had. A namespace
    goes back to one part when cleared.
    """

    kind = ""
    #: Keys past which the one dict is split into PARTS (tests lower it).
    SPLIT_AT = 1 << 15
    #: The number of parts of a split namespace (a power of two).
    PARTS = 1024
    #: How many stale references are tolerated before a sweep starts.
    SWEEP_SLACK = 8192
    #: The most references a reap looks at in one call (bounded work per loop round).
    REAP_BATCH = 10_000
    #: References an expiring write sweeps while a sweep is on.
    SWEEP_PER_WRITE = 16

    def __init__(self, max_bytes: int | None, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.max_bytes = max_bytes
        self.clock = clock
        #: the entries: one dict, or PARTS of them, ``parts[hash(key) & mask]`` holding ``key``
        self.parts: list[dict[str, object]] = [{}]
        self.mask = 0
        #: the number of entries (expired ones not yet reclaimed included)
        self.count = 0
        #: the count past which the one part splits (never, once split)
        self._split_at = self.SPLIT_AT
        #: the part an approximate LRU walk starts from (eviction goes round the parts in turn)
        self._turn = 0
        self.bytes = 0
        self.hits = 0
        self.misses = 0
        self.expired = 0
        self.evictions = 0
        #: entries with a deadline (against which the wheel's references are judged)
        self.timed = 0
        self.wheel = ExpiryWheel()
        self._sweep: Generator[None, None, None] | None = None
        self._sweep_chunk = 0
        #: on_event(event, key, value, deadline): what listeners and near caches are told (set by
        #: the engine); ``value`` and ``deadline`` (INF: none) are the entry's after a set or a
        #: touch, else None and INF.
        self.on_event: Callable | None = None

    @classmethod
    def store(cls, max_bytes: int | None = None, *, clock: Callable[[], float] = time.monotonic) -> Namespace:
        return Store(max_bytes, clock=clock)

    @classmethod
    def cache(cls, max_bytes: int = DEFAULT_CACHE_BYTES, *, clock: Callable[[], float] = time.monotonic) -> Namespace:
        return Cache(max_bytes, clock=clock)

    def __len__(self) -> int:
        return self.count

    def iter_keys(self) -> Iterator[str]:
        """Every key (expired ones not yet reclaimed included), part after part. Nothing may change meanwhile."""
        return chain.from_iterable(self.parts)

    def entries(self) -> Iterator[tuple[str, object]]:
        """``(key, stored)`` of every entry, least recently used first (exactly in one part; see :func:`_interleave`)."""
        return _interleave(self.parts, True)

    def _items(self) -> Iterator[tuple[str, object]]:
        return chain.from_iterable(part.items() for part in self.parts)

    def _split(self) -> None:
        """Spread the one part's keys over PARTS parts (see the class's docstring)."""
        if self.mask or self.frozen:
            return  # split already; or a scan's copy walks the part: a write after the thaw splits it
        mask = self.PARTS - 1
        parts: list[dict[str, object]] = [{} for _ in range(mask + 1)]
        for key, stored in self.parts[0].items():  # in order: each part keeps its keys' LRU order
            parts[hash(key) & mask][key] = stored
        self.parts, self.mask = parts, mask
        self._split_at = sys.maxsize

    def entry_cost(self, key: str, value, expires: bool = False) -> int:
        """What an entry of ``key`` and ``value`` counts for here (as it costs in memory)."""
        return entry_size(key, value, expires)

    # -- the policy (subclasses) ---------------------------------------------------------

    _pack = staticmethod(_pack)
    _unpack = staticmethod(_unpack)
    _deadline_of = staticmethod(_deadline_of)
    _cost = staticmethod(_cost)

    def _lookup(self, key: str):
        """The stored entry of ``key`` or None, as a read sees it (a cache marks it used)."""
        return self.parts[hash(key) & self.mask].get(key)

    def _check(self, key: str, size: int, delta: int) -> None:
        """Refuse a write of ``size`` bytes (``delta`` more than now) before anything changes."""

    def _make_room(self, bounds, keep: str) -> None:
        """Django's MAX_ENTRIES/CULL_FREQUENCY (caches only)."""

    def _fit(self, delta: int, keep: str) -> None:
        """Make room for ``delta`` more bytes (caches evict)."""

    def _insert(self, data: dict, key: str, stored, old) -> None:
        data[key] = stored

    # -- internals -------------------------------------------------------------------

    def _emit(self, event: int, key, value=None) -> None:
        if self.on_event is not None:
            self.on_event(event, key, value, INF)

    def _drop(self, key: str, stored) -> None:
        del self.parts[hash(key) & self.mask][key]
        self.count -= 1
        self.bytes -= self._cost(key, stored)
        if self._deadline_of(stored) != INF:
            self.timed -= 1

    def _live(self, key: str, peek: bool = False):
        """The stored entry of ``key`` if it exists and has not expired (an expired one is dropped now)."""
        stored = self.parts[hash(key) & self.mask].get(key) if peek else self._lookup(key)
        if stored is None:
            return None
        deadline = self._deadline_of(stored)
        if deadline != INF and deadline <= self.clock():
            self._drop(key, stored)
            self.expired += 1
            self._emit(EVENT_EXPIRE, key)
            return None
        return stored

    def _deadline(self, ttl) -> float:
        return INF if ttl is None else self.clock() + ttl

    def _put(self, key: str, value, deadline: float, bounds, event: int = EVENT_SET) -> None:
        stored = self._pack(value, deadline)
        size = self._cost(key, stored)
        data = self.parts[hash(key) & self.mask]
        old = data.get(key)
        self._check(key, size, size - (self._cost(key, old) if old is not None else 0))
        if bounds is not None:
            self._make_room(bounds, key)
            old = data.get(key)  # a reap may have taken it
        old_size = self._cost(key, old) if old is not None else 0
        self._fit(size - old_size, key)
        self._insert(data, key, stored, old)
        if old is None:
            self.count += 1
            if self.count > self._split_at:
                self._split()
        self.bytes += size - old_size
        old_deadline = INF if old is None else self._deadline_of(old)
        if deadline != INF:
            if old_deadline == INF:
                self.timed += 1
            self.wheel.add(key, deadline, self.clock(), old_deadline)
            self._sweep_step(self.SWEEP_PER_WRITE)
        elif old_deadline != INF:
            self.timed -= 1
        on_event = self.on_event
        if on_event is not None:
            on_event(event, key, value, deadline)

    # -- operations (the wire's requests) ------------------------------------------------

    def refresh(self, keys: list[str], hits: int) -> None:
        """Keys read from near copies in a worker (RECENT): counted as hits;
        in a cache they also become the most recently used (the store has no order)."""
        self.hits += hits

    def get(self, key: str):
        stored = self._live(key)
        if stored is None:
            self.misses += 1
            return None
        self.hits += 1
        return self._unpack(stored)[0]

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
        stored = self._live(key, peek=True)
        if stored is None:
            return False
        self._drop(key, stored)
        self._emit(EVENT_REMOVE, key)
        return True

    def touch(self, key: str, ttl: float | None) -> bool:
        stored = self._live(key)
        if stored is None:
            return False
        if ttl is not None and ttl <= 0:
            self._drop(key, stored)
            self._emit(EVENT_REMOVE, key)
            return True
        self._put(key, self._unpack(stored)[0], self._deadline(ttl), None, EVENT_TOUCH)
        return True

    def incr(self, key: str, delta: int, initial: int | None = None, bounds=None) -> int:
        stored = self._live(key)
        if stored is None:
            if initial is None:
                raise KeyNotFound(f"Key '{key}' not found")
            value, deadline = initial, INF
        else:
            value, deadline = self._unpack(stored)
            if type(value) is not int:
                raise NotAnInteger(f"the value of {key!r} is not an integer")
        result = value + delta
        if not INT64_MIN <= result <= INT64_MAX:
            raise IntegerOverflow(f"incrementing {key!r} by {delta} leaves the signed 64-bit range")
        # An existing key keeps its expiry (as in Redis and Django's LocMemCache).
        self._put(key, result, deadline, bounds if stored is None else None)
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
        parts, mask = self.parts, self.mask
        deadline = self._deadline(ttl)
        delta = 0
        for key, value in mapping.items():
            size = self._cost(key, self._pack(value, deadline))
            old = parts[hash(key) & mask].get(key)
            step = size - (self._cost(key, old) if old is not None else 0)
            self._check(key, size, step)
            delta += step
        if ttl is None or ttl > 0:
            self._check_batch(delta)
        for key, value in mapping.items():
            self.set(key, value, ttl, bounds)

    def _check_batch(self, delta: int) -> None:
        pass

    def delete_many(self, keys: Iterable[str]) -> int:
        return sum(1 for key in keys if self.remove(key))

    def keys(self, prefix: str = "") -> list[str]:
        self.reap()
        now = self.clock()
        deadline_of = self._deadline_of
        return [
            key
            for key, stored in self._items()
            if key.startswith(prefix) and (type(stored) is int or deadline_of(stored) > now)
        ]

    def clear(self) -> int:
        count = len(self.keys())
        if self.frozen:
            for part in self.parts:
                part.clear()
        else:
            self.parts, self.mask, self._split_at = [{}], 0, self.SPLIT_AT
        self.count = 0
        self.bytes = 0
        self.timed = 0
        self.wheel.clear()
        self._sweep = None
        self._emit(EVENT_CLEAR, None)
        return count

    # -- snapshots (see .snapshot) -----------------------------------------------------

    def snapshot_batches(self, max_entries: int = 4096, max_bytes: int = 1 << 20) -> Iterator[list]:
        """The live entries as flat ``[key, value, ttl, key, value, ttl...]``
        lists of at most ``max_entries`` entries (or a little over ``max_bytes``
        bytes of values), in the dict's order: a cache's LRU order, least
        recently used first. ``value`` is what a client stored (bytes, never
        unpickled, or an int), ``ttl`` the seconds it has left (None: no expiry).

        Reads only: nothing expires or moves, so a forked writer can call it
        on its copy, and it gives the same entries as at the fork.
        """
        now = self.clock()
        batch: list = []
        size = 0
        append = batch.append
        entries: Iterator[tuple[str, Any]] = _interleave(self.parts, True)
        for key, stored in entries:
            kind = type(stored)
            if kind is bytes:
                if len(stored) > _RAW_MIN:
                    value, ttl = stored, None
                elif stored[0] == 0:
                    value, ttl = stored[1:], None
                else:
                    deadline = _unpack_deadline(stored, 1)[0]
                    if deadline <= now:
                        continue
                    value, ttl = stored[9:], deadline - now
                size += len(value)
            elif kind is tuple:
                value, deadline = stored
                if deadline == INF:
                    ttl = None
                elif deadline <= now:
                    continue
                else:
                    ttl = deadline - now
                if type(value) is bytes:
                    size += len(value)
            else:
                value, ttl = stored, None
            append(key)
            append(value)
            append(ttl)
            if len(batch) >= 3 * max_entries or size >= max_bytes:
                yield batch
                batch = []
                append = batch.append
                size = 0
        if batch:
            yield batch

    def items_for_snapshot(self) -> Iterator[tuple[str, object, float | None]]:
        """``(key, value, remaining ttl or None)`` of every live entry, in LRU order (see :meth:`snapshot_batches`)."""
        for batch in self.snapshot_batches():
            for i in range(0, len(batch), 3):
                yield batch[i], batch[i + 1], batch[i + 2]

    def restore(self, batches: Iterable[list], elapsed: float = 0.0) -> dict[str, int]:
        """Put back entries from :meth:`snapshot_batches` (``elapsed``: seconds
        that passed since, taken off every ttl), in their order; return counts.

        An entry whose ttl has run out is skipped, and so is a key this
        namespace holds already: it was written since the snapshot (by start-up
        code), so it is the newer. Restored entries come *before* those in a
        cache's LRU order. The store leaves out what would take it over
        ``MAX_STORE_BYTES`` (counted, not refused: the rest still comes back);
        a cache evicts its least recently used entries down to its ``MAX_BYTES``.
        Byte accounting, the timed count and the expiry wheel are kept as
        every write keeps them. No events: nobody listens yet.
        """
        self.thaw()
        now = self.clock()
        existing, existing_mask = self.parts, self.mask
        self.parts = [{} for _ in existing]
        count = self.count
        wheel_add = self.wheel.add
        budget = self.max_bytes if self.kind == "store" else None
        largest = self.max_bytes if self.kind == "cache" else None
        total = self.bytes
        restored = expired = left_out = newer = timed = 0
        for batch in batches:
            parts, mask = self.parts, self.mask
            for i in range(0, len(batch), 3):
                key, value, ttl = batch[i], batch[i + 1], batch[i + 2]
                data = parts[hash(key) & mask]
                if key in existing[hash(key) & existing_mask] or key in data:
                    newer += 1
                    continue
                if ttl is None:
                    deadline = INF
                else:
                    ttl -= elapsed
                    if ttl <= 0:
                        expired += 1
                        continue
                    deadline = now + ttl
                stored = _pack(value, deadline)
                size = _cost(key, stored)
                if (budget is not None and total + size > budget) or (largest is not None and size > largest):
                    left_out += 1
                    continue
                data[key] = stored
                count += 1
                total += size
                restored += 1
                if deadline != INF:
                    timed += 1
                    wheel_add(key, deadline, now)
            self.count = count
            if count > self._split_at:
                self._split()
        parts, mask = self.parts, self.mask
        for key, stored in _interleave(existing, True):  # the newer entries stay the most recently used
            parts[hash(key) & mask][key] = stored
        self.bytes = total
        self.timed += timed
        evictions = self.evictions
        if self.max_bytes is not None and self.bytes > self.max_bytes and self.kind == "cache":
            self._fit(0, "")
        evicted = self.evictions - evictions
        return {"restored": restored - evicted, "expired": expired, "left_out": left_out + evicted, "newer": newer}

    # -- expiry and key-space scans (django-redis's extra API, #17; see .scans) -----------

    def expiry(self, key: str) -> tuple[bool, float | None]:
        """(whether ``key`` exists, the seconds it has left or None for no
        expiry). Like Redis's TTL, not a use: no LRU move, no hit counted."""
        stored = self._live(key, peek=True)
        if stored is None:
            return False, None
        deadline = self._deadline_of(stored)
        return True, None if deadline == INF else deadline - self.clock()

    def persist(self, key: str) -> bool:
        """Remove ``key``'s expiry; True if it had one (Redis's PERSIST)."""
        stored = self._live(key, peek=True)
        if stored is None or self._deadline_of(stored) == INF:
            return False
        self._put(key, self._unpack(stored)[0], INF, None, EVENT_TOUCH)
        return True

    def replace(self, key: str, value, ttl: float | None = None, bounds=None) -> bool:
        """``set`` only if ``key`` exists (Redis's SET XX); True if it did.
        A timeout of zero or less then removes it, as ``set`` does."""
        if self._live(key, peek=True) is None:
            return False
        if ttl is not None and ttl <= 0:
            self.remove(key)
        else:
            self._put(key, value, self._deadline(ttl), bounds)
        return True

    def freeze(self) -> Iterator[str]:
        """Start copying the keys for a scan: an iterator over every key of
        this moment (expired ones not yet reclaimed included), which stays
        valid across loop rounds until :meth:`thaw` (see :class:`Overlay`)."""
        if self.frozen:
            raise RuntimeError("a copy of this namespace's keys is already under way")
        bases = self.parts
        self.parts = [Overlay(base) for base in bases]  # type: ignore[misc]
        return chain.from_iterable(bases)

    @property
    def frozen(self) -> bool:
        return type(self.parts[0]) is Overlay

    def thaw(self) -> None:
        """The copy is done (or given up): the changes made meanwhile go into the dict."""
        if self.frozen:
            self.parts = [part.merge() for part in self.parts]  # type: ignore[attr-defined]

    def scan_batch(self, keys: list, pos: int, examine: int, count: int, match) -> tuple[list[str], int]:
        """Walk ``keys[pos:]``: look at ``examine`` of them at most, and collect
        up to ``count`` that exist now, have not expired and ``match`` (a test,
        or None for all). Returns them and where the walk stopped. Not a use
        (no LRU move, nothing dropped)."""
        parts, mask, deadline_of, now = self.parts, self.mask, self._deadline_of, self.clock()
        found: list[str] = []
        stop = min(len(keys), pos + examine)
        while pos < stop:
            key = keys[pos]
            pos += 1
            stored = parts[hash(key) & mask].get(key)
            if (
                stored is not None
                and (match is None or match(key))
                and (type(stored) is int or deadline_of(stored) > now)
            ):
                found.append(key)
                if len(found) >= count:
                    break
        return found, pos

    def keys_matching(self, match) -> list[str]:
        """The live keys that ``match`` (a test, or None for all), in one pass (KEYS_MATCH)."""
        now, deadline_of = self.clock(), self._deadline_of
        if match is None:
            return [key for key, stored in self._items() if type(stored) is int or deadline_of(stored) > now]
        return [
            key for key, stored in self._items() if match(key) and (type(stored) is int or deadline_of(stored) > now)
        ]

    # -- expiry ------------------------------------------------------------------------

    def peek(self, key: str) -> tuple | None:
        """``(value, deadline)`` of ``key`` as stored (INF: no expiry), or None;
        changes nothing (no LRU move, no expiry: the near caches' value slots read it)."""
        stored = self.parts[hash(key) & self.mask].get(key)
        return None if stored is None else self._unpack(stored)

    def ttl(self, key: str) -> float | None:
        """Seconds ``key`` has left (None: no expiry). The key must exist."""
        deadline = self._deadline_of(self.parts[hash(key) & self.mask][key])
        return None if deadline == INF else deadline - self.clock()

    def deadline(self, key: str) -> float | None:
        """When ``key`` expires, on the clock (None: never). The key must exist."""
        deadline = self._deadline_of(self.parts[hash(key) & self.mask][key])
        return None if deadline == INF else deadline

    def next_deadline(self) -> float | None:
        """When the wheel has keys to look at next, for the event loop's sleep."""
        return self.wheel.next_time()

    def reap(self, limit: int = REAP_BATCH) -> list[str]:
        """Drop the keys whose deadline has passed (up to ``limit`` references
        looked at per call); return their names.

        Work is proportional to what expired (and to the references it left
        behind), never to the size of the namespace.
        """
        wheel = self.wheel
        self._sweep_step(limit)
        heap = wheel.heap
        if not heap:
            return []
        now = self.clock()
        nu = now * UNITS
        if heap[0] > nu:
            return []
        buckets, parts, mask = wheel.buckets, self.parts, self.mask
        deadline_of = self._deadline_of
        gone: list[str] = []
        budget = limit
        while heap and heap[0] <= nu and budget > 0:
            point = heap[0]
            bucket = buckets[point]
            taken = bucket.take(budget)
            budget -= len(taken)
            wheel.refs -= len(taken)
            for key in taken:
                stored = parts[hash(key) & mask].get(key)
                if stored is None:
                    continue
                deadline = deadline_of(stored)
                if deadline == INF:
                    continue
                if deadline <= now:
                    self._drop(key, stored)
                    self.expired += 1
                    gone.append(key)
                    self._emit(EVENT_EXPIRE, key)
                elif _on_chain(point, deadline * UNITS):
                    wheel.put(key, _check_point(deadline * UNITS, nu))
            if not bucket:
                heapq.heappop(heap)
                del buckets[point]
        return gone

    def _sweep_step(self, refs: int) -> None:
        """Look at up to ``refs`` more references if stale ones passed a quarter of the live ones.

        Writes call it too (a few references each), so that a client that
        churns expiring keys (a cache evicting, set and delete) pays for the
        sweep as it goes: a pass over 1.25x the live references starts after
        0.25x went stale, about 5 looked at per stale one.
        """
        if self._sweep is None:
            if self.wheel.refs <= self.timed + (self.timed >> 2) + self.SWEEP_SLACK:
                return
            self._sweep = self._sweeping()
        self._sweep_chunk = refs
        if next(self._sweep, True):
            self._sweep = None

    def _sweeping(self) -> Generator[None, None, None]:
        """Drop stale references from the buckets not yet due, a bounded step per reap.

        A key's live reference is at its deadline's first check after now
        (or in a bucket already due); any other is stale.
        """
        wheel = self.wheel
        for point in list(wheel.buckets):
            bucket = wheel.buckets.get(point)
            i = 0  # the chunk under way; len(chunks): the open list, swept at once (CHUNK at most)
            while bucket is not None:
                chunks = bucket.chunks
                last = i >= len(chunks)
                refs: Sequence[str] = bucket.tail if last else chunks[i]
                kept: list[str] = []
                done = 0
                while done < len(refs):
                    nu = self.clock() * UNITS
                    if point <= nu:
                        bucket = None  # due now: the reap takes it
                        break
                    parts, mask, deadline_of = self.parts, self.mask, self._deadline_of
                    end = len(refs) if last else min(done + self._sweep_chunk, len(refs))
                    for j in range(done, end):
                        key = refs[j]
                        stored = parts[hash(key) & mask].get(key)
                        if stored is not None:
                            deadline = deadline_of(stored)
                            if deadline != INF and _check_point(deadline * UNITS, nu) == point:
                                kept.append(key)
                    done = end
                    if done < len(refs):
                        yield
                        if wheel.buckets.get(point) is not bucket:
                            bucket = None  # reaped or cleared meanwhile
                            break
                if bucket is None:
                    break
                wheel.refs -= len(refs) - len(kept)
                if last:
                    bucket.tail = kept
                    break
                if kept:
                    chunks[i] = tuple(kept)
                    i += 1
                else:
                    del chunks[i]
                yield
                if wheel.buckets.get(point) is not bucket:
                    bucket = None
            yield


class Store(Namespace):
    """The store's policy: refuses a write past its budget (``MAX_STORE_BYTES``)."""

    kind = "store"

    def get(self, key: str):
        # The hot path, inlined: a small value without a deadline, and a miss.
        stored = self.parts[hash(key) & self.mask].get(key)
        if type(stored) is bytes and stored[0] == 0 and len(stored) <= _RAW_MIN:
            self.hits += 1
            return stored[1:]
        if stored is None:
            self.misses += 1
            return None
        return super().get(key)

    def _check(self, key: str, size: int, delta: int) -> None:
        if self.max_bytes is not None and delta > 0 and self.bytes + delta > self.max_bytes:
            raise StoreFull(
                f"storing {key!r} would take the store to {self.bytes + delta} bytes; "
                f"its maximum (MAX_STORE_BYTES) is {self.max_bytes}"
            )

    def _check_batch(self, delta: int) -> None:
        if self.max_bytes is not None and delta > 0 and self.bytes + delta > self.max_bytes:
            raise StoreFull(
                f"the batch would take the store over its maximum of {self.max_bytes} bytes (MAX_STORE_BYTES)"
            )


class Cache(Namespace):
    """A named cache's policy: LRU order, bounded by bytes, evicting to make room."""

    kind = "cache"
    max_bytes: int

    def __init__(self, max_bytes: int = DEFAULT_CACHE_BYTES, *, clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__(max_bytes, clock=clock)

    def get(self, key: str):
        # The hot path, inlined: a small value, and when it expires a deadline
        # read once; a hit becomes the most recently used.
        data = self.parts[hash(key) & self.mask]
        stored = data.pop(key, None)
        if stored is None:
            self.misses += 1
            return None
        data[key] = stored
        if type(stored) is bytes and len(stored) <= _RAW_MIN:
            if stored[0] == 0:
                self.hits += 1
                return stored[1:]
            if _unpack_deadline(stored, 1)[0] > self.clock():
                self.hits += 1
                return stored[9:]
        return super().get(key)

    def _lookup(self, key: str):
        data = self.parts[hash(key) & self.mask]
        stored = data.pop(key, None)
        if stored is not None:
            data[key] = stored  # now the most recently used
        return stored

    def refresh(self, keys: list[str], hits: int) -> None:
        # Read in near caches: now the most recently used, as a read here makes them.
        parts, mask = self.parts, self.mask
        for key in keys:
            data = parts[hash(key) & mask]
            stored = data.pop(key, None)
            if stored is not None:
                data[key] = stored
        self.hits += hits

    def _insert(self, data: dict, key: str, stored, old) -> None:
        if old is not None:
            del data[key]  # a write makes it the most recently used
        data[key] = stored

    def _check(self, key: str, size: int, delta: int) -> None:
        if size > self.max_bytes:
            raise ValueTooLarge(f"an entry of {size} bytes does not fit in a cache of MAX_BYTES={self.max_bytes}")

    def _evict(self, keys: list[str]) -> None:
        parts, mask = self.parts, self.mask
        for key in keys:
            self._drop(key, parts[hash(key) & mask][key])
            self.evictions += 1
            self._emit(EVENT_EVICT, key)
        if keys and mask:
            self._turn = (
                (hash(keys[-1]) & mask) + 1
            ) & mask  # the next eviction starts after the last part it took from

    def _oldest(self, items: bool) -> Iterator:
        """The least recently used entries first (approximately across parts, see :func:`_interleave`)."""
        return _interleave(self.parts, items, self._turn)

    def _make_room(self, bounds, keep: str) -> None:
        max_entries, cull_frequency = bounds[0], bounds[1]
        if self.count < max_entries:
            return
        self.reap()
        if self.count < max_entries:
            return
        count = self.count if cull_frequency == 0 else self.count // cull_frequency
        self._evict(list(islice(self._oldest(False), count)))

    def _fit(self, delta: int, keep: str) -> None:
        if self.bytes + delta <= self.max_bytes:
            return
        # In a large cache, evict a little more than needed (1/64 of the
        # budget): the dict's front is full of holes left by moved and evicted
        # keys, skipped once per batch instead of once per key.
        excess = self.bytes + delta - self.max_bytes
        if self.count > 4096:
            excess += self.max_bytes // 64
        victims: list[str] = []
        freed = 0
        cost = self._cost
        for key, stored in self._oldest(True):
            if key == keep:
                continue
            victims.append(key)
            freed += cost(key, stored)
            if freed >= excess:
                break
        self._evict(victims)
