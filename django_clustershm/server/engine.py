"""The Manager's state and the dispatch of requests to it, with no I/O.

:class:`Engine` owns the namespaces (:mod:`.namespace`), the lock table
(:mod:`.locktable`), the listeners' subscriptions (:mod:`.subscriptions`) and
the near caches' stamps (:mod:`.stamps`), and answers decoded requests.
Two transports drive it: the socket server (:class:`~.manager.Manager`, whose
loop is the only thread that touches the engine) and the embedded transport
of the client side (in-process calls under one mutex). Both share every
operation and every limit: the embedded mode has the cluster's semantics by
construction.

Arguments may come from a rogue client, so every handler checks them with
the checks the client ran (:mod:`..wire.args`) before anything changes. A
request the engine refuses raises a :class:`ClusterShmError`, which the
transport sends back as an error reply: the connection, and whatever locks
it holds, stay. An unknown opcode or a wrong number of arguments is refused
the same way; only a malformed frame costs a connection (the transport's
business).
"""

from __future__ import annotations

import logging
import os
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator

from ..exceptions import (
    ArgumentTypeError,
    ClusterShmError,
    InvalidArgument,
    InvalidKey,
    LimitExceeded,
    RemoteError,
    ValueTooLarge,
)
from ..wire import args as A
from ..wire import frames as F
from ..wire.frames import SLOT_PAYLOAD
from ..wire.limits import (
    DEFAULT_BOUNDS,
    DEFAULT_MAX_CACHE_BYTES,
    Limits,
    default_store_bytes,
    default_total_cache_bytes,
)
from . import gcpolicy
from .locktable import LockTable
from .namespace import Namespace
from .scans import Scans, compile_glob
from .stamps import MASK as STAMP_MASK
from .stamps import SLOT_BYTES, SLOT_CHECK, SLOT_IDLE, Stamps, bucket
from .stamps import SLOT_HEADER as pack_slot_header
from .subscriptions import Subscriptions

logger = logging.getLogger("django_clustershm.server")

#: Seconds between two reclamations of the caches' expired entries.
CACHE_REAP_INTERVAL = 0.01
#: Named caches one Manager holds at most (each is bounded by its MAX_BYTES).
MAX_CACHES = 256
#: A new cache gets at least this much of MAX_TOTAL_CACHE_BYTES, or is refused.
MIN_CACHE_BYTES = 2**20
MAX_CACHE_NAME = 256
#: Units of deferred clean-up (a closed session's lock key)
#: one tick does at most: about 2 ms on a slow 2-vCPU VM (bench/bench_close.py).
SWEEP_BUDGET = 2048

#: Seconds of ops/s history stats() carries (the dashboard's chart): one int
#: a second in a ring, so 300 s cost 2.4 kB however long the Manager runs.
HISTORY_SECONDS = 300

#: What dispatch returns for a request that will be answered later.
DEFERRED = object()
#: What dispatch returns for a request that has no reply (RECENT, a hint).
NO_REPLY = object()


class Session:
    """One client connection (or one embedded thread or channel), as the engine sees it."""

    __slots__ = (
        "__weakref__",
        "deliver",
        "id",
        "ops",
        "peer_uid",
        "pid",
        "push",
        "since",
        "tracker",
        "waiting",
    )

    def __init__(self, sid: int, pid: int = 0, peer_uid: int | None = None) -> None:
        self.id = sid
        self.pid = pid
        self.peer_uid = peer_uid
        self.since = time.time()
        self.ops = 0
        self.waiting = 0  # queued lock requests
        # deliver(rid, result): how a reply that comes later (a lock grant, or
        # "not acquired" when a wait runs out) reaches this client; set by the transport.
        self.deliver: Callable | None = None
        # push(event): how a listener event reaches this client; set by the transport.
        self.push: Callable | None = None
        # A process's near-cache channel (a TRACKER session: it reports hits
        # with RECENT). Nothing else is kept per holder: see .stamps.
        self.tracker = False


class Engine:
    """All state of a Manager, and the dispatch of requests to it."""

    def __init__(
        self,
        *,
        limits: Limits | None = None,
        max_store_bytes: int | None = None,
        max_cache_bytes: int = DEFAULT_MAX_CACHE_BYTES,
        max_total_cache_bytes: int | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.limits = limits or Limits()
        #: A cache's MAX_BYTES is whatever its first writer asks, clamped to
        #: this (the settings the Manager trusts): never 2**62 from a client.
        self.max_cache_bytes = max_cache_bytes
        #: ... and all caches' MAX_BYTES together stay within this, so that
        #: MAX_CACHES caches cannot multiply it.
        self.max_total_cache_bytes = (
            default_total_cache_bytes() if max_total_cache_bytes is None else max_total_cache_bytes
        )
        self._cache_bytes_granted = 0
        if max_store_bytes is None:
            max_store_bytes = default_store_bytes()
        self._max_key = self.limits.max_key
        self.clock = clock
        self.subscriptions = Subscriptions()
        #: The near caches' stamps file (see .stamps), when the transport maps
        #: one (a Manager on a socket); None: no near cache keeps a copy.
        self.stamps: Stamps | None = None
        #: Keys read by near-cache misses (TRACK_GET, TRACK_GET_MANY), in all.
        self.near_fills = 0
        #: Each namespace's keys that have a value slot (see .stamps), by namespace.
        self._slotted: dict[str, dict[str, list]] = {}
        self.store = self._namespace("", Namespace.store(max_store_bytes, clock=clock))
        self.caches: dict[str, Namespace] = {}
        # What a read sees of a cache no one has written yet: an empty one
        # that is never written (writes create the cache, see _space_for_write).
        self._empty = Namespace.cache(clock=clock)
        self._next_cache_reap = 0.0
        self.locks = LockTable(self._answer_waiter, clock=clock)
        #: Open SCAN cursors (see .scans).
        self.scans = Scans(clock)
        self._rid = 0
        #: The transport's own figures for stats() (the Manager's loop: its longest stall).
        self.loop_stats: Callable[[], dict] | None = None
        #: ... and its snapshots' (see .snapshot), when it writes them.
        self.snapshot_stats: Callable[[], dict] | None = None
        self.sessions: dict[int, Session] = {}
        self._next_sid = 1
        self.started = time.time()
        self.ops = 0
        # ops/s over the last whole second, and over each of the last
        # HISTORY_SECONDS: kept by tick() once a second (not per request).
        self._rate_second = int(clock())
        self._rate_ops = 0
        self.ops_per_second = 0
        self.ops_history: deque[int] = deque(maxlen=HISTORY_SECONDS)
        #: Closed sessions whose locks or tracked keys tick() has still to sweep.
        self.sweep_pending = 0
        self.swept = 0  # units swept in all
        self.sweep_largest = 0  # the most units one tick swept
        self.handlers: dict[int, Callable] = {
            F.PING: self._ping,
            F.GET: self._get,
            F.SET: self._set,
            F.ADD: self._add,
            F.REMOVE: self._remove,
            F.HAS: self._has,
            F.INCR: self._incr,
            F.TOUCH: self._touch,
            F.GET_MANY: self._get_many,
            F.SET_MANY: self._set_many,
            F.DELETE_MANY: self._delete_many,
            F.KEYS: self._keys,
            F.CLEAR: self._clear,
            F.STATS: self._stats,
            F.LOCK_ACQUIRE: self._lock_acquire,
            F.LOCK_RELEASE: self._lock_release,
            F.LOCK_EXTEND: self._lock_extend,
            F.LOCK_STATUS: self._lock_status,
            F.LOCK_CANCEL: self._lock_cancel,
            F.LISTEN: self._listen,
            F.UNLISTEN: self._unlisten,
            F.TRACKER: self._tracker,
            F.TRACK_GET: self._track_get,
            F.TRACK_GET_MANY: self._track_get_many,
            F.RECENT: self._recent,
            F.TTL: self._ttl,
            F.PERSIST: self._persist,
            F.REPLACE: self._replace,
            F.KEYS_MATCH: self._keys_match,
            F.SCAN: self._scan,
            F.SCAN_DELETE: self._scan_delete,
        }

    def _namespace(self, name: str, space: Namespace) -> Namespace:
        subscriptions = self.subscriptions
        salt = hash(name)
        # This namespace's keys that have a value slot (see .stamps): key -> its record.
        slotted: dict[str, list] = {}
        self._slotted[name] = slotted

        def on_event(event: int, key, value, deadline, name=name, salt=salt, engine=self) -> None:
            # Near caches first: the key's value slot if it has one, then a new
            # stamp in its bucket, both before the writer's reply (see .stamps;
            # the same hash as stamps.bucket, inlined: this runs for every
            # change). Then listeners, if any.
            stamps = engine.stamps
            if stamps is not None:
                words = stamps.words
                if key is None:
                    if slotted:
                        stamps.free_all(slotted)
                    stamps.bump_all()
                elif words is not None:
                    if slotted:
                        slot = slotted.get(key)
                        if slot is not None:
                            if (
                                type(value) is bytes
                                and len(value) <= SLOT_PAYLOAD
                                and stamps.clock() - slot[2] <= SLOT_IDLE
                            ):
                                # Stamps.rewrite's usual case, inlined (1 us a change
                                # of a slotted key; 0.6 us so): the seqlock's writer.
                                region, slot_words = stamps.slot_region
                                base, start, n = slot[3], slot[4], len(value)
                                seq = slot_words[base]
                                slot_words[base] = seq + 1
                                pack_slot_header(region, start + 8, slot[1], deadline, SLOT_BYTES | n)
                                region[start + 32 : start + 32 + n] = value
                                slot_words[base] = seq + 2
                                stamps.slot_writes += 1
                                slot[7] += 1
                                if slot[7] >= SLOT_CHECK:
                                    stamps.weigh(slot)
                            elif value is None:  # the key is gone (a delete, expiry, eviction)
                                stamps.free_slot(slot[0])
                            else:
                                stamps.rewrite(slot, value, deadline)
                    words[(hash(key) ^ salt) & STAMP_MASK] = stamps.next_stamp()
            if subscriptions.count:
                subscriptions.notify(name, event, key, value)

        space.on_event = on_event
        return space

    # -- sessions ----------------------------------------------------------------------

    def open_session(self, pid: int = 0, peer_uid: int | None = None) -> Session:
        session = Session(self._next_sid, pid, peer_uid)
        self._next_sid += 1
        self.sessions[session.id] = session
        return session

    def close_session(self, session: Session) -> None:
        """Forget a client: its locks are released (and granted to the next
        waiter) at once, its queued lock requests and subscriptions dropped.

        At once for everything a client can see (it is sent nothing more, a
        waiter gets its lock now, every other lock it held is free, the figures
        no longer count it); what the lock table keeps of it is swept by
        tick(), SWEEP_BUDGET units a call, because doing it here kept the loop
        busy for 116 ms (100k locks and 65k tracked keys, when the Manager
        still kept near-cache records)."""
        if self.sessions.pop(session.id, None) is not None:
            self.locks.drop_session(session)
            self.subscriptions.drop_session(session)  # at most 1,024: 0.6 ms
            self.scans.drop_session(session.id)
            session.deliver = session.push = None
            self.sweep_pending = self.locks.sweeping

    # -- dispatch ----------------------------------------------------------------------

    def dispatch(self, session: Session, op: int, args: list, rid: int = 0):
        """The result of one request, ``DEFERRED`` if it is answered later
        through ``session.deliver`` (a lock acquire that has to wait), or
        ``NO_REPLY``. A refused request raises a :class:`ClusterShmError`."""
        handler = self.handlers.get(op)
        if handler is None:
            raise InvalidArgument(f"unknown opcode 0x{op:02x}")
        session.ops += 1
        self.ops += 1
        self._rid = rid
        try:
            return handler(session, *args)
        except ClusterShmError:
            raise
        except TypeError as exc:  # a wrong number or shape of arguments
            raise ArgumentTypeError(f"{F.OPCODE_NAMES.get(op, op)}: malformed arguments ({exc})") from exc
        except Exception as exc:  # a bug of ours: refuse this request, keep serving
            logger.exception("error handling %s", F.OPCODE_NAMES.get(op, op))
            raise RemoteError(f"{F.OPCODE_NAMES.get(op, op)} failed in the Manager: {exc!r}") from exc

    def tick(self) -> float | None:
        """Reclaim expired keys, time out lock waits and leases; return the next
        deadline (monotonic) or None. The transport calls it before it sleeps
        and at least every few milliseconds while busy."""
        second = int(self.clock())
        if second != self._rate_second:
            self._roll_rate(second)
        self.store.reap()
        if self.caches:
            # Reads expire lazily; reclaiming the rest (and telling listeners)
            # can wait a few ms, and doing it every loop round would cost
            # O(caches) per request.
            now = self.clock()
            if now >= self._next_cache_reap:
                self._next_cache_reap = now + CACHE_REAP_INTERVAL
                for cache in self.caches.values():
                    cache.reap()
        store_next = self.store.next_deadline()
        locks_next = self.locks.tick()
        more = bool(self.sweep_pending) and bool(self._sweep())
        if self.scans.copying:
            self.scans.tick()  # a chunk of a scan's snapshot (see .scans)
            more = more or bool(self.scans.copying)
        if more:
            return self.clock()  # more to sweep or copy: come back as soon as requests allow
        if store_next is None:
            return locks_next
        return store_next if locks_next is None else min(store_next, locks_next)

    def _roll_rate(self, second: int, current: int = 0) -> None:
        """A new second began: the ops counted since the last roll go to the
        second that ended (but the ``current`` ones, counted in this second),
        and any whole seconds after it (no tick ran then: an idle embedded
        engine ticks only when called) count none."""
        gone = second - self._rate_second
        done = self.ops - current - self._rate_ops
        self._rate_second = second
        self._rate_ops = self.ops - current
        if gone <= 0:  # a clock that went back (an injected one): start again from here
            return
        self.ops_per_second = done if gone == 1 else 0
        history = self.ops_history
        history.append(done)
        history.extend([0] * min(gone - 1, HISTORY_SECONDS))

    def _sweep(self) -> int:
        """Sweep after closed sessions, SWEEP_BUDGET units at most; return how
        many sessions are still to sweep."""
        done = self.locks.sweep(SWEEP_BUDGET)
        self.swept += done
        if done > self.sweep_largest:
            self.sweep_largest = done
        self.sweep_pending = pending = self.locks.sweeping
        return pending

    def _answer_waiter(self, waiter, result) -> None:
        deliver = waiter.session.deliver
        if deliver is not None:
            deliver(waiter.rid, result)

    # -- arguments -----------------------------------------------------------------------

    def _space(self, ns) -> Namespace:
        """The store, or the named cache (an empty stand-in if none exists yet)."""
        if ns == "":
            return self.store
        cache = self.caches.get(ns)
        if cache is not None:
            return cache
        if type(ns) is not str:
            raise ArgumentTypeError(f"a namespace is a str, not {type(ns).__name__}")
        return self._empty

    def _space_for_write(self, ns, bounds) -> tuple[Namespace, list | None]:
        if bounds is None and ns == "":
            return self.store, None  # the common cases, without the checks below: a store write...
        if bounds is not None:
            cache = self.caches.get(ns)  # ...and a cache alias's write (with its bounds) to a cache that exists
            if cache is not None:
                return cache, A.bounds(bounds)
        bounds = A.bounds(bounds)
        if ns == "":
            if bounds is not None:
                raise InvalidArgument("the shared store takes no cache bounds")
            return self.store, None
        if bounds is None:
            bounds = list(DEFAULT_BOUNDS)
        cache = self.caches.get(ns)
        if cache is None:
            cache = self._new_cache(ns, bounds[2])
        return cache, bounds

    def _new_cache(self, ns, asked: int) -> Namespace:
        """Create cache ``ns`` with a MAX_BYTES of ``asked``, clamped to what the settings allow."""
        if type(ns) is not str:
            raise ArgumentTypeError(f"a cache name is a str, not {type(ns).__name__}")
        if len(ns) > MAX_CACHE_NAME:
            raise InvalidKey(f"a cache name is at most {MAX_CACHE_NAME} characters")
        if len(self.caches) >= MAX_CACHES:
            raise LimitExceeded(f"the Manager holds {MAX_CACHES} caches already; use fewer cache LOCATIONs")
        remaining = self.max_total_cache_bytes - self._cache_bytes_granted
        max_bytes = min(asked, self.max_cache_bytes, remaining)
        if remaining < min(asked, self.max_cache_bytes, MIN_CACHE_BYTES):
            raise LimitExceeded(
                f"the caches' MAX_BYTES add up to {self._cache_bytes_granted} bytes: no room for cache {ns!r} "
                f"within MAX_TOTAL_CACHE_BYTES={self.max_total_cache_bytes}"
            )
        if max_bytes < asked:
            logger.warning(
                "cache %r asked for MAX_BYTES=%d; it gets %d (MAX_CACHE_BYTES=%d, MAX_TOTAL_CACHE_BYTES=%d)",
                ns,
                asked,
                max_bytes,
                self.max_cache_bytes,
                self.max_total_cache_bytes,
            )
        self._cache_bytes_granted += max_bytes
        cache = self.caches[ns] = self._namespace(ns, Namespace.cache(max_bytes, clock=self.clock))
        return cache

    # -- snapshots (the file format and the writer are .snapshot's) -----------------------

    def snapshot(
        self, max_entries: int = 4096, max_bytes: int = 1 << 20
    ) -> Iterator[tuple[str, int | None, Iterator[list]]]:
        """``(name, max_bytes, batches)`` for the store (name ``""``, max_bytes
        None: the settings decide it at restore) and then every cache (its
        MAX_BYTES), ``batches`` being :meth:`Namespace.snapshot_batches`: the
        values as stored (opaque bytes or ints), their remaining ttls, in LRU
        order. Reads only. Locks, listeners and near-cache tracking are not in
        it: their holders do not outlive the server."""
        yield "", None, self.store.snapshot_batches(max_entries, max_bytes)
        for name, cache in list(self.caches.items()):
            yield name, cache.max_bytes, cache.snapshot_batches(max_entries, max_bytes)

    def snapshot_meta(self) -> dict:
        """What a snapshot keeps besides the entries: the last fencing token
        granted, so that fences keep growing across a restart (a store that
        recorded one would otherwise refuse every new holder)."""
        return {"fence": self.locks._fence}

    def restore_meta(self, meta: dict) -> None:
        fence = meta.get("fence")
        if type(fence) is int and fence > self.locks._fence:
            self.locks._fence = fence

    def restore(self, spaces: Iterable[tuple[str, int | None, Iterable[list]]], elapsed: float = 0.0) -> dict:
        """Put back what :meth:`snapshot` gave, ``elapsed`` seconds later (taken
        off every ttl; what ran out is skipped); return counts (see
        :meth:`Namespace.restore`). A cache is created with the MAX_BYTES it
        had, clamped by MAX_CACHE_BYTES and MAX_TOTAL_CACHE_BYTES as any new
        cache; one that no longer fits is left out (logged). Keys written
        before the restore (start-up code) are newer and stay."""
        totals = {"restored": 0, "expired": 0, "left_out": 0, "newer": 0, "caches": 0, "caches_left_out": 0}
        for name, max_bytes, batches in spaces:
            if name == "":
                space = self.store
            else:
                cache = self.caches.get(name)
                if cache is None:
                    try:
                        cache = self._new_cache(name, DEFAULT_BOUNDS[2] if max_bytes is None else max_bytes)
                    except ClusterShmError as exc:
                        logger.error("snapshot: cache %r is not restored: %s", name, exc)
                        totals["caches_left_out"] += 1
                        continue
                totals["caches"] += 1
                space = cache
            for key, count in space.restore(batches, elapsed).items():
                totals[key] += count
        return totals

    def _key(self, key) -> str:
        if type(key) is str and len(key) <= self._max_key and key.isascii():
            return key  # the common case, without a call
        if type(key) is not str:
            raise InvalidKey(f"keys are str, not {type(key).__name__}")
        return A.key(key, self.limits.max_key)

    def _value(self, value):
        kind = type(value)
        if kind is bytes:
            if len(value) > self.limits.max_value:
                raise ValueTooLarge(
                    f"value of {len(value)} bytes exceeds the maximum of {self.limits.max_value} (MAX_VALUE_SIZE)"
                )
            return value
        if kind is int:
            return A.integer(value, "value")
        raise ArgumentTypeError(f"values are bin or int on the wire, not {kind.__name__}")

    def _keys_list(self, keys) -> list:
        if type(keys) is not list:
            raise ArgumentTypeError("keys are a list")
        return [self._key(k) for k in keys]

    def _mapping(self, items) -> dict:
        """SET_MANY's flat [key, value, key, value...] list (see wire/frames.py), checked."""
        if type(items) is not list or len(items) % 2:
            raise ArgumentTypeError("set_many takes a flat list of keys and values, [key, value, key, value...]")
        return {self._key(items[i]): self._value(items[i + 1]) for i in range(0, len(items), 2)}

    def _check_reply(self, found: dict, values: dict | None = None) -> dict:
        """A batch reply must fit in one frame, in both modes alike (``values``: each key's
        value, if ``found`` holds more than it). One that holds a big value comes back as a
        :class:`~..wire.frames.BigMap`, whose big values the Manager sends as buffers of their own."""
        size = 0
        big = False
        for key, value in (found if values is None else values).items():
            if type(value) is bytes:
                n = len(value)
                size += len(key) + n + F.ITEM_OVERHEAD
                if n >= F.BIG:
                    big = True
            else:
                size += len(key) + 9 + F.ITEM_OVERHEAD
        if size > self.limits.max_frame:
            raise ValueTooLarge(
                f"the reply would be about {size} bytes, over the maximum frame of {self.limits.max_frame}; "
                "ask for fewer keys at once"
            )
        return F.BigMap(found) if big else found

    # -- the store and the caches --------------------------------------------------------

    def _ping(self, session):
        return "pong"

    def _get(self, session, ns, key):
        return self._space(ns).get(self._key(key))

    def _set(self, session, ns, key, value, ttl, bounds=None):
        key, value, ttl = self._key(key), self._value(value), A.timeout(ttl)
        space, bounds = self._space_for_write(ns, bounds)
        space.set(key, value, ttl, bounds)

    def _add(self, session, ns, key, value, ttl, bounds=None):
        key, value, ttl = self._key(key), self._value(value), A.timeout(ttl)
        space, bounds = self._space_for_write(ns, bounds)
        return space.add(key, value, ttl, bounds)

    def _remove(self, session, ns, key):
        return self._space(ns).remove(self._key(key))

    def _has(self, session, ns, key):
        return self._space(ns).has(self._key(key))

    def _incr(self, session, ns, key, delta, initial, bounds=None):
        key, delta = self._key(key), A.integer(delta, "delta")
        initial = None if initial is None else A.integer(initial, "default")
        if initial is None:
            return self._space(ns).incr(key, delta, None)  # a missing key is an error: nothing to create
        space, bounds = self._space_for_write(ns, bounds)
        return space.incr(key, delta, initial, bounds)

    def _touch(self, session, ns, key, ttl):
        return self._space(ns).touch(self._key(key), A.timeout(ttl))

    def _get_many(self, session, ns, keys):
        return self._check_reply(self._space(ns).get_many(self._keys_list(keys)))

    def _set_many(self, session, ns, mapping, ttl, bounds=None):
        mapping, ttl = self._mapping(mapping), A.timeout(ttl)
        space, bounds = self._space_for_write(ns, bounds)
        space.set_many(mapping, ttl, bounds)

    def _delete_many(self, session, ns, keys):
        return self._space(ns).delete_many(self._keys_list(keys))

    def _keys(self, session, ns, prefix):
        return self._space(ns).keys(A.prefix(prefix))

    def _clear(self, session, ns):
        return self._space(ns).clear()

    # -- expiry and key-space scans (#17: django-redis's extra API; see .scans) -------------

    def _ttl(self, session, ns, key):
        exists, left = self._space(ns).expiry(self._key(key))
        return [exists, left]

    def _persist(self, session, ns, key):
        return self._space(ns).persist(self._key(key))

    def _replace(self, session, ns, key, value, ttl, bounds=None):
        key, value, ttl = self._key(key), self._value(value), A.timeout(ttl)
        if ns != "" and ns not in self.caches:
            A.bounds(bounds)
            return False  # a cache no one has written has no key to replace: not created for this
        space, bounds = self._space_for_write(ns, bounds)
        return space.replace(key, value, ttl, bounds)

    def _keys_match(self, session, ns, pattern):
        keys = self._space(ns).keys_matching(compile_glob(A.pattern(pattern, self.limits.max_key)))
        size = sum(map(len, keys)) + len(keys) * F.ITEM_OVERHEAD
        if size > self.limits.max_frame:
            raise ValueTooLarge(
                f"{len(keys)} keys match, about {size} bytes, over the maximum frame of {self.limits.max_frame}; "
                "iterate with iter_keys() instead"
            )
        return keys

    def _scan_args(self, ns, cursor, pattern, count) -> tuple:
        if type(ns) is not str:
            raise ArgumentTypeError(f"a namespace is a str, not {type(ns).__name__}")
        cursor, pattern = A.integer(cursor, "cursor"), A.pattern(pattern, self.limits.max_key)
        # At most what fits in a reply, however long the keys.
        count = min(A.itersize(count), max(1, self.limits.max_frame // (self.limits.max_key + F.ITEM_OVERHEAD)))
        return self._space(ns), cursor, pattern, count

    def _scan(self, session, ns, cursor, pattern, count):
        space, cursor, pattern, count = self._scan_args(ns, cursor, pattern, count)
        cursor, keys = self.scans.step(session.id, space, ns, cursor, pattern, count)
        return [cursor, keys]

    def _scan_delete(self, session, ns, cursor, pattern, count):
        space, cursor, pattern, count = self._scan_args(ns, cursor, pattern, count)
        cursor, keys = self.scans.step(session.id, space, ns, cursor, pattern, count)
        removed = 0
        for key in keys:
            removed += space.remove(key)
        return [cursor, removed]

    # -- locks -----------------------------------------------------------------------------

    def _lock_acquire(self, session, key, lease, wait):
        key = self._key(key)
        if lease is not None:
            lease = A.positive_seconds(lease, "lease")
        if wait is not None and type(wait) is not int:
            wait = A.timeout(wait, "wait")
        result = self.locks.acquire(session, self._rid, key, lease, wait)
        return DEFERRED if result is ... else result

    def _lock_release(self, session, key, token):
        if type(token) is not bytes or len(token) != A.TOKEN_SIZE:
            A.token(token)  # raises, naming the argument
        return self.locks.release(self._key(key), token)

    def _lock_extend(self, session, key, token, lease):
        key, token, lease = self._key(key), A.token(token), A.positive_seconds(lease, "lease")
        return self.locks.extend(key, token, lease)

    def _lock_cancel(self, session, key, rid):
        return self.locks.cancel(session, self._key(key), A.integer(rid, "rid"))

    def _lock_status(self, session, key, token):
        return self.locks.status(self._key(key), None if token is None else A.token(token))

    # -- listeners -------------------------------------------------------------------------

    def _listen(self, session, sub_id, ns, key, prefix):
        if type(ns) is not str or type(prefix) is not bool:
            raise ArgumentTypeError("LISTEN takes [sub_id, ns, key, prefix]")
        key = A.prefix(key) if prefix else self._key(key)
        self.subscriptions.add(session, A.integer(sub_id, "sub_id"), ns, key, prefix)
        return True

    def _unlisten(self, session, sub_id):
        return self.subscriptions.remove(session, A.integer(sub_id, "sub_id"))

    # -- near caches (see .stamps) -------------------------------------------------------

    def _tracker(self, session, *_ignored):
        """This connection becomes its process's near-cache channel: ``[session
        id, the stamps file's generation (0: none, no copy may be kept)]``."""
        session.tracker = True
        stamps = self.stamps
        return [session.id, stamps.generation if stamps is not None and stamps.words is not None else 0]

    def _recent(self, session, ns, hits, keys):
        """A tracker's report of its process's near-cache hits (see wire/frames.py)."""
        if (
            not session.tracker
            or type(hits) is not int
            or hits < 0
            or type(keys) is not list
            or len(keys) > F.MAX_RECENT
        ):
            raise ArgumentTypeError(
                f"RECENT takes [ns, hits >= 0, at most {F.MAX_RECENT} keys] on a tracker connection"
            )
        space = self._space(ns)
        if space is not self._empty:
            keys = self._keys_list(keys)
            space.refresh(keys, hits)
            slotted = self._slotted.get(ns)
            if slotted and self.stamps is not None:
                # Keys still read from their slots keep them (see .stamps: SLOT_IDLE).
                now = self.clock()
                for key in keys:
                    slot = slotted.get(key)
                    if slot is not None:
                        slot[2] = now
        return NO_REPLY

    def _track_get(self, session, ns, key, first=False, *_ignored):
        """GET, with the key's bucket, the stamp it holds and its value slot
        (see .stamps). ``first`` (a process's first read of the key, which its
        near cache keeps only if another process's did): a value slot only if
        the key has one already; without one, the bucket and its stamp tell
        the process's next read whether the key changed in between (see
        NearCache._admit)."""
        space = self._space(ns)
        key = self._key(key)
        value = space.get(key)
        if value is None:
            return [None, None, 0, 0, -1, 0]
        if first is True and key not in self._slotted.get(ns, ()):
            reply = self._tracked(ns, space, key, value, with_slot=False)
        else:
            self.near_fills += 1
            reply = self._tracked(ns, space, key, value)
        # A big value's reply is marked, so that the Manager sends the value as a buffer of its own
        # (a TRACK_GET_MANY's map is marked by _check_reply).
        return F.BigList(reply) if type(value) is bytes and len(value) >= F.BIG else reply

    def _track_get_many(self, session, ns, keys, first=False, *_ignored):
        space = self._space(ns)
        slotted = self._slotted.get(ns, {}) if first is True else None
        found = {}
        for key in self._keys_list(keys):
            value = space.get(key)
            if value is not None:
                if slotted is not None and key not in slotted:
                    found[key] = self._tracked(ns, space, key, value, with_slot=False)
                else:
                    found[key] = self._tracked(ns, space, key, value)
                    self.near_fills += 1
        return self._check_reply(found, {k: v[0] for k, v in found.items()})

    def _tracked(self, ns: str, space: Namespace, key: str, value, with_slot: bool = True) -> list:
        """``[value, ttl, bucket, stamp, slot, token]`` of a near-cache miss
        (``with_slot`` False, a first read's: no slot, -1 and 0)."""
        stamps = self.stamps
        words = stamps.words if stamps is not None else None
        b = bucket(ns, key)
        ttl = space.ttl(key)
        if words is None:
            return [value, ttl, b, 0, -1, 0]
        if not with_slot:
            return [value, ttl, b, words[b], -1, 0]
        # The slot gets the Manager's own deadline (peek's), never a later one.
        deadline = space.peek(key)[1]  # type: ignore[index]
        slot, token = stamps.slot_for(self._slotted[ns], key, value, deadline)  # type: ignore[union-attr]
        return [value, ttl, b, words[b], slot, token]

    # -- introspection -----------------------------------------------------------------------

    def _stats(self, session):
        store = self.store
        now = self.clock()
        second = int(now)
        if second != self._rate_second:
            self._roll_rate(second, current=1)  # this STATS request is the new second's
        return {
            "manager_pid": os.getpid(),
            "uptime": time.time() - self.started,
            "ops": self.ops,
            "ops_per_second": self.ops_per_second,
            # Ops in each of the last seconds, oldest first; the last one ended
            # at the wall-clock time "end" (the current second, still counting, is not in it).
            "ops_history": {"end": time.time() - (now - second), "ops": list(self.ops_history)},
            "store": {
                "keys": len(store),
                "bytes": store.bytes,
                "max_bytes": store.max_bytes,
                "hits": store.hits,
                "misses": store.misses,
                "expired": store.expired,
            },
            "caches": {
                name: {
                    "keys": len(cache),
                    "bytes": cache.bytes,
                    "max_bytes": cache.max_bytes,
                    "hits": cache.hits,
                    "misses": cache.misses,
                    "evictions": cache.evictions,
                    "expired": cache.expired,
                }
                for name, cache in self.caches.items()
            },
            "clients": [{"id": s.id, "pid": s.pid, "since": s.since, "ops": s.ops} for s in self.sessions.values()],
            "locks": self.locks.describe(),
            "listeners": self.subscriptions.describe(),
            # Near caches as the Manager sees them: the processes that keep
            # them, the keys their misses read, and the stamps written (see .stamps).
            "near": {
                "processes": sorted({s.pid for s in self.sessions.values() if s.tracker}),
                "fills": self.near_fills,
                "stamps": self.stamps.issued if self.stamps is not None else 0,
                # Value slots (see .stamps): in use, changes written into them, freed.
                "slots": self.stamps.slots_used if self.stamps is not None else 0,
                "slot_writes": self.stamps.slot_writes if self.stamps is not None else 0,
                "slots_freed": self.stamps.slots_freed if self.stamps is not None else 0,
                "slots_banned": self.stamps.slots_banned if self.stamps is not None else 0,
            },
            "max_total_cache_bytes": self.max_total_cache_bytes,
            "sweep": {"pending": self.sweep_pending, "swept": self.swept, "largest": self.sweep_largest},
            "limits": self.limits.as_dict(),
            "loop": self.loop_stats() if self.loop_stats is not None else {},
            "snapshot": self.snapshot_stats() if self.snapshot_stats is not None else None,
            "scans": self.scans.describe(),
            "gc": gcpolicy.stats(),
        }
