"""The Manager's state and its operations, with no I/O.

:class:`Engine` owns the namespaces and answers decoded requests. Two
transports drive it: :class:`~django_clustershm.manager.Manager` (a Unix
socket server whose event loop is the only thread that touches the engine)
and :class:`~django_clustershm.client.EmbeddedClient` (in-process calls under
one mutex). Both therefore share one implementation of every operation and
every limit: the embedded mode has the cluster's semantics by construction.

Arguments may come from a rogue client, so every handler checks types and
sizes itself; it raises a :class:`ClusterShmError` for a request it refuses
(sent back as an error, the connection stays open). Any other exception
means the request was malformed, and the transport closes that connection.
"""

from __future__ import annotations

import os
import time
from typing import Callable

from . import protocol as P
from .caches import LruCache, NullCache
from .exceptions import InvalidKey, KeyTooLarge, LimitExceeded, ProtocolError, ValueTooLarge
from .listeners import Listeners
from .locks import LockTable
from .protocol import EVENT_SET
from .store import INT64_MAX, INT64_MIN, Store

_INT_SIZE = 8  # what an int counts for against a tracker's push limit

DEFAULT_MAX_KEY = 4096
DEFAULT_MAX_VALUE = 32 * 1024 * 1024
#: Seconds between two reclamations of the caches' expired entries.
CACHE_REAP_INTERVAL = 0.01
#: Named caches one Manager holds at most (each is bounded by its MAX_BYTES).
MAX_CACHES = 256
MAX_CACHE_NAME = 256
_NULL_CACHE = NullCache()
#: (ns, key) records of near caches the Manager keeps at most; beyond, reads are not tracked.
MAX_TRACKED = 1_000_000
#: Largest value a tracker is sent in a PUSH_UPDATE (a larger one is invalidated
#: instead); a tracker may ask for less. Bounded so that a burst of writes
#: fits the tracker's socket buffer (see Manager.tracker_sndbuf).
MAX_PUSH_VALUE = 64 * 1024


#: What dispatch returns for a request that will be answered later.
DEFERRED = object()
#: What dispatch returns for a request that has no reply (UNTRACK, a hint).
NO_REPLY = object()


class Session:
    """One client connection (or one embedded client), as the engine sees it."""

    __slots__ = (
        "id", "pid", "since", "ops", "peer_uid", "waiting", "deliver", "push",
        "tracker", "inval_seq", "invalidate", "tracked", "push_limit", "__weakref__",
    )

    def __init__(self, sid: int, pid: int = 0, peer_uid: int | None = None) -> None:
        self.id = sid
        self.pid = pid
        self.peer_uid = peer_uid
        self.since = time.time()
        self.ops = 0
        self.waiting = 0  # queued lock requests
        # deliver(rid, result): how a reply that comes later (a lock grant)
        # reaches this client; set by the transport.
        self.deliver: Callable | None = None
        # push(event): how a listener event reaches this client; set by the transport.
        self.push: Callable | None = None
        # Near-cache channel (a TRACKER connection): how many pushes
        # (invalidations and updates) it was sent, how they are sent
        # (invalidate(opcode, payload) -> bool, set by the transport: at once,
        # into the socket, or the connection is shut down; False if an update
        # was not sent), which (ns, key) it may hold, and the largest value it
        # wants pushed.
        self.tracker = False
        self.inval_seq = 0
        self.invalidate: Callable | None = None
        self.tracked: set | None = None
        self.push_limit = 0


class Limits:
    """Sizes a client must respect; told to clients at the handshake."""

    __slots__ = ("max_key", "max_value", "max_frame")

    def __init__(self, max_key: int = DEFAULT_MAX_KEY, max_value: int = DEFAULT_MAX_VALUE, max_frame: int | None = None):
        if max_frame is None:
            max_frame = max(P.DEFAULT_MAX_FRAME, max_value + P.FRAME_OVERHEAD)
        if max_value + P.FRAME_OVERHEAD > max_frame:
            raise ValueError("max_frame must exceed max_value by at least FRAME_OVERHEAD")
        self.max_key = max_key
        self.max_value = max_value
        self.max_frame = max_frame

    def as_dict(self) -> dict:
        return {"max_key": self.max_key, "max_value": self.max_value, "max_frame": self.max_frame}


class Engine:
    """All state of a Manager, and the dispatch of requests to it."""

    def __init__(
        self,
        *,
        limits: Limits | None = None,
        max_store_bytes: int | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.limits = limits or Limits()
        self.clock = clock
        self.store = Store(clock=clock, max_bytes=max_store_bytes)
        self.caches: dict[str, LruCache] = {}
        self._next_cache_reap = 0.0
        self.locks = LockTable(self._answer_waiter, clock=clock)
        self.listeners = Listeners()
        # (ns, key) -> {tracker session: its push count when it read the key}
        self.tracking: dict[tuple[str, str], dict] = {}
        on_change = self._on_change
        self.store.on_event = lambda event, key, value: on_change("", event, key, value)
        self._rid = 0
        self.sessions: dict[int, Session] = {}
        self._next_sid = 1
        self.started = time.time()
        self.ops = 0
        # ops/s over the last whole second, kept by tick() (not per request)
        self._rate_second = int(clock())
        self._rate_ops = 0
        self.ops_per_second = 0
        self.handlers: dict[int, Callable] = {
            P.PING: self._ping,
            P.GET: self._get,
            P.SET: self._set,
            P.ADD: self._add,
            P.REMOVE: self._remove,
            P.HAS: self._has,
            P.INCR: self._incr,
            P.TOUCH: self._touch,
            P.GET_MANY: self._get_many,
            P.SET_MANY: self._set_many,
            P.DELETE_MANY: self._delete_many,
            P.KEYS: self._keys,
            P.CLEAR: self._clear,
            P.STATS: self._stats,
            P.CACHE_SET: self._cache_set,
            P.CACHE_ADD: self._cache_add,
            P.CACHE_SET_MANY: self._cache_set_many,
            P.LOCK_ACQUIRE: self._lock_acquire,
            P.LOCK_RELEASE: self._lock_release,
            P.LOCK_EXTEND: self._lock_extend,
            P.LOCK_STATUS: self._lock_status,
            P.LISTEN: self._listen,
            P.UNLISTEN: self._unlisten,
            P.TRACKER: self._tracker,
            P.TRACK_GET: self._track_get,
            P.TRACK_GET_MANY: self._track_get_many,
            P.UNTRACK: self._untrack,
        }

    # -- sessions ------------------------------------------------------------

    def open_session(self, pid: int = 0, peer_uid: int | None = None) -> Session:
        session = Session(self._next_sid, pid, peer_uid)
        self._next_sid += 1
        self.sessions[session.id] = session
        return session

    def close_session(self, session: Session) -> None:
        """Forget a client: its locks are released (and granted to the next
        waiter) at once, its queued lock requests dropped."""
        if self.sessions.pop(session.id, None) is not None:
            self.locks.drop_session(session)
            self.listeners.drop_session(session)
            if session.tracked:
                for record in session.tracked:
                    trackers = self.tracking.get(record)
                    if trackers is not None:
                        trackers.pop(session, None)
                        if not trackers:
                            del self.tracking[record]
                session.tracked = None

    # -- dispatch ------------------------------------------------------------

    def dispatch(self, session: Session, op: int, args: list, rid: int = 0):
        """The result of one request, or ``DEFERRED`` if it is answered later
        through ``session.deliver`` (a lock acquire that has to wait)."""
        handler = self.handlers.get(op)
        if handler is None:
            raise ProtocolError(f"unknown opcode 0x{op:02x}")
        session.ops += 1
        self.ops += 1
        self._rid = rid
        return handler(session, *args)

    def tick(self) -> float | None:
        """Reclaim expired keys; return the next deadline (monotonic) or None.

        The transport calls it before it sleeps and at least every few
        milliseconds while busy."""
        second = int(self.clock())
        if second != self._rate_second:
            self.ops_per_second = self.ops - self._rate_ops if second == self._rate_second + 1 else 0
            self._rate_second = second
            self._rate_ops = self.ops
        self.store.reap()
        if self.caches:
            # Caches expire lazily on access; reclaiming the rest of their
            # expired entries (and telling listeners) can wait a few ms, and
            # doing it on every loop round would cost O(caches) per request.
            now = self.clock()
            if now >= self._next_cache_reap:
                self._next_cache_reap = now + CACHE_REAP_INTERVAL
                for cache in self.caches.values():
                    cache.reap()
        store_next = self.store.next_deadline()
        locks_next = self.locks.tick()
        if store_next is None:
            return locks_next
        return store_next if locks_next is None else min(store_next, locks_next)

    def _on_change(self, ns: str, event: int, key, value) -> None:
        """Every change of the store or a cache: update or invalidate near caches, then tell listeners."""
        if self.tracking:
            if key is None:  # clear: everything of the namespace
                records = [r for r in self.tracking if r[0] == ns]
                trackers = set()
                for record in records:
                    for session in self.tracking.pop(record):
                        session.tracked.discard(record)
                        trackers.add(session)
                for session in trackers:
                    self._invalidate(session, ns, None)
            elif event == EVENT_SET:
                self._update(ns, key, value)
            else:
                trackers = self.tracking.pop((ns, key), None)
                if trackers:
                    for session in trackers:
                        session.tracked.discard((ns, key))
                        self._invalidate(session, ns, key)
        self.listeners.notify(ns, event, key, value)

    def _update(self, ns: str, key: str, value) -> None:
        """A tracked key was written: send its new value (and expiry) to every
        tracker that may hold it, which keeps tracking it; a tracker that does
        not want a value that large is sent an invalidation and forgets it.

        Why push the value rather than only invalidate (as Redis does): with N
        processes reading a hot key, an invalidation costs each of them a
        round trip to read the key again (measured with bench_cache.py at 4
        processes and 10% writes: 23% of gets went to the Manager); an update
        costs the Manager what the invalidation did, and no process a miss.
        """
        record = (ns, key)
        trackers = self.tracking.get(record)
        if not trackers:
            return
        size = _INT_SIZE if type(value) is int else len(value)
        space = self.store if not ns else self.caches[ns]
        deadline = space.deadline(key)
        for session in list(trackers):
            session.inval_seq += 1
            send = session.invalidate
            if size <= session.push_limit and send is not None and send(P.PUSH_UPDATE, [session.inval_seq, ns, key, value, deadline]):
                continue
            # Too large for it, or refused by the transport (a tracker that
            # lags behind): an invalidation, and the tracking ends.
            del trackers[session]
            session.tracked.discard(record)
            if send is not None:
                send(P.PUSH_INVALIDATE, [session.inval_seq, ns, key])
        if not trackers:
            del self.tracking[record]

    @staticmethod
    def _invalidate(session: Session, ns: str, key) -> None:
        session.inval_seq += 1
        if session.invalidate is not None:
            session.invalidate(P.PUSH_INVALIDATE, [session.inval_seq, ns, key])

    def _answer_waiter(self, waiter, result) -> None:
        deliver = waiter.session.deliver
        if deliver is not None:
            deliver(waiter.rid, result)

    # -- validation of what a client sent -----------------------------------

    def _ns(self, ns):
        """The store, or the named cache (an empty stand-in if none exists yet)."""
        if ns == "":
            return self.store
        cache = self.caches.get(ns)
        if cache is not None:
            return cache
        if type(ns) is not str:
            raise ProtocolError("a namespace is a str")
        return _NULL_CACHE

    def _cache_for_write(self, ns, opts) -> tuple:
        if type(ns) is not str or not ns:
            raise ProtocolError("a cache name is a non-empty str")
        if type(opts) is not list or len(opts) != 3 or not all(type(o) is int for o in opts):
            raise ProtocolError("cache options are [max_entries, cull_frequency, max_bytes]")
        max_entries, cull_frequency, max_bytes = opts
        if cull_frequency < 0 or max_bytes < 1:
            raise ProtocolError("cull_frequency must be >= 0 and max_bytes >= 1")
        cache = self.caches.get(ns)
        if cache is None:
            if len(ns) > MAX_CACHE_NAME:
                raise InvalidKey(f"a cache name is at most {MAX_CACHE_NAME} characters")
            if len(self.caches) >= MAX_CACHES:
                raise LimitExceeded(f"the Manager holds {MAX_CACHES} caches already; use fewer cache LOCATIONs")
            cache = self.caches[ns] = LruCache(max_bytes, clock=self.clock)
            on_change = self._on_change
            cache.on_event = lambda event, key, value: on_change(ns, event, key, value)
        return cache, max_entries, cull_frequency

    def _key(self, key) -> str:
        if type(key) is not str:
            raise InvalidKey(f"keys are str, not {type(key).__name__}")
        if len(key) > self.limits.max_key:
            # len() counts characters; a client checks UTF-8 bytes before sending.
            raise KeyTooLarge(f"key of {len(key)} characters exceeds the maximum of {self.limits.max_key}")
        return key

    def _value(self, value):
        kind = type(value)
        if kind is bytes:
            if len(value) > self.limits.max_value:
                raise ValueTooLarge(f"value of {len(value)} bytes exceeds the maximum of {self.limits.max_value}")
            return value
        if kind is int:
            return value
        raise ProtocolError(f"values are bin or int on the wire, not {kind.__name__}")

    @staticmethod
    def _ttl(ttl):
        if ttl is None or type(ttl) in (int, float):
            return ttl
        raise ProtocolError(f"a timeout is a number or nil, not {type(ttl).__name__}")

    @staticmethod
    def _int(n):
        if type(n) is not int or not INT64_MIN <= n <= INT64_MAX:
            raise ProtocolError("expected a 64-bit integer")
        return n

    # -- handlers --------------------------------------------------------------

    def _ping(self, session):
        return "pong"

    def _get(self, session, ns, key):
        return self._ns(ns).get(self._key(key))

    def _set(self, session, ns, key, value, ttl):
        self._ns(ns).set(self._key(key), self._value(value), self._ttl(ttl))

    def _add(self, session, ns, key, value, ttl):
        return self._ns(ns).add(self._key(key), self._value(value), self._ttl(ttl))

    def _remove(self, session, ns, key):
        return self._ns(ns).remove(self._key(key))

    def _has(self, session, ns, key):
        return self._ns(ns).has(self._key(key))

    def _incr(self, session, ns, key, delta, initial):
        return self._ns(ns).incr(self._key(key), self._int(delta), None if initial is None else self._int(initial))

    def _touch(self, session, ns, key, ttl):
        return self._ns(ns).touch(self._key(key), self._ttl(ttl))

    def _get_many(self, session, ns, keys):
        store = self._ns(ns)
        return store.get_many([self._key(k) for k in keys])

    def _set_many(self, session, ns, mapping, ttl):
        if type(mapping) is not dict:
            raise ProtocolError("set_many takes a map")
        checked = {self._key(k): self._value(v) for k, v in mapping.items()}
        self._ns(ns).set_many(checked, self._ttl(ttl))

    def _delete_many(self, session, ns, keys):
        store = self._ns(ns)
        return store.delete_many([self._key(k) for k in keys])

    def _keys(self, session, ns, prefix):
        if type(prefix) is not str:
            raise InvalidKey("a prefix is a str")
        return self._ns(ns).keys(prefix)

    def _clear(self, session, ns):
        return self._ns(ns).clear()

    def _cache_set(self, session, ns, key, value, ttl, opts):
        cache, max_entries, cull = self._cache_for_write(ns, opts)
        cache.set(self._key(key), self._value(value), self._ttl(ttl), max_entries, cull)

    def _cache_add(self, session, ns, key, value, ttl, opts):
        cache, max_entries, cull = self._cache_for_write(ns, opts)
        return cache.add(self._key(key), self._value(value), self._ttl(ttl), max_entries, cull)

    def _cache_set_many(self, session, ns, mapping, ttl, opts):
        if type(mapping) is not dict:
            raise ProtocolError("set_many takes a map")
        cache, max_entries, cull = self._cache_for_write(ns, opts)
        checked = {self._key(k): self._value(v) for k, v in mapping.items()}
        cache.set_many(checked, self._ttl(ttl), max_entries, cull)

    @staticmethod
    def _seconds(value, what: str):
        if value is None:
            return None
        if type(value) not in (int, float) or value != value:
            raise ProtocolError(f"{what} is a number of seconds or nil")
        return value

    @staticmethod
    def _token(token):
        if type(token) is not bytes or len(token) != 16:
            raise ProtocolError("a lock token is 16 bytes")
        return token

    def _lock_acquire(self, session, key, lease, wait):
        lease = self._seconds(lease, "a lease")
        if lease is not None and lease <= 0:
            raise ProtocolError("a lease is a positive number of seconds")
        result = self.locks.acquire(session, self._rid, self._key(key), lease, self._seconds(wait, "a wait"))
        return DEFERRED if result is ... else result

    def _lock_release(self, session, key, token):
        return self.locks.release(self._key(key), self._token(token))

    def _lock_extend(self, session, key, token, lease):
        lease = self._seconds(lease, "a lease")
        if lease is not None and lease <= 0:
            raise ProtocolError("a lease is a positive number of seconds")
        return self.locks.extend(self._key(key), self._token(token), lease)

    def _lock_status(self, session, key, token):
        return self.locks.status(self._key(key), None if token is None else self._token(token))

    def _listen(self, session, sub_id, ns, key, prefix):
        if type(sub_id) is not int or type(ns) is not str or type(prefix) is not bool:
            raise ProtocolError("LISTEN takes [sub_id, ns, key, prefix]")
        if prefix and type(key) is not str:
            raise InvalidKey("a prefix is a str")
        self.listeners.add(session, self._int(sub_id), ns, key if prefix else self._key(key), prefix)
        return True

    def _tracker(self, session, push_limit=0):
        session.tracker = True
        session.push_limit = min(self._int(push_limit), MAX_PUSH_VALUE)
        if session.tracked is None:
            session.tracked = set()
        return [session.id]

    def _untrack(self, session, ns, key, seq):
        """A tracker was pushed a key it no longer holds (evicted from its near
        cache, or dropped there after updates it never read): stop sending it
        that key, unless it read the key again after that push (then it holds
        the newer copy and must stay tracked)."""
        if not session.tracker or type(ns) is not str or type(key) is not str or type(seq) is not int:
            raise ProtocolError("UNTRACK takes [ns, key, seq] on a tracker connection")
        record = (ns, key)
        trackers = self.tracking.get(record)
        if trackers is not None and trackers.get(session, seq) < seq:
            del trackers[session]
            session.tracked.discard(record)
            if not trackers:
                del self.tracking[record]
        return NO_REPLY

    def _tracker_session(self, tracker_id) -> Session | None:
        """The tracker, or None if it is gone (cut off, or its process lost it
        meanwhile): the read is then answered untracked, not refused."""
        if type(tracker_id) is not int:
            raise ProtocolError("a tracker id is an int")
        tracker = self.sessions.get(tracker_id)
        return tracker if tracker is not None and tracker.tracker else None

    def _track(self, tracker: Session | None, ns: str, key: str) -> bool:
        if tracker is None:
            return False
        record = (ns, key)
        trackers = self.tracking.get(record)
        if trackers is None:
            if len(self.tracking) >= MAX_TRACKED:
                return False
            trackers = self.tracking[record] = {}
        trackers[tracker] = tracker.inval_seq
        tracker.tracked.add(record)
        return True

    def _track_get(self, session, ns, key, tracker_id):
        tracker = self._tracker_session(tracker_id)
        space = self._ns(ns)
        value = space.get(self._key(key))
        seq = 0 if tracker is None else tracker.inval_seq
        if value is None:
            return [None, None, seq, False]
        return [value, space.ttl(key), seq, self._track(tracker, ns, key)]

    def _track_get_many(self, session, ns, keys, tracker_id):
        tracker = self._tracker_session(tracker_id)
        space = self._ns(ns)
        found = {}
        tracked = True
        for key in keys:
            value = space.get(self._key(key))
            if value is not None:
                found[key] = [value, space.ttl(key)]
                tracked = self._track(tracker, ns, key) and tracked
        return [found, 0 if tracker is None else tracker.inval_seq, tracked and tracker is not None]

    def _unlisten(self, session, sub_id):
        return self.listeners.remove(session, self._int(sub_id))

    def _stats(self, session):
        store = self.store
        return {
            "manager_pid": os.getpid(),
            "uptime": time.time() - self.started,
            "ops": self.ops,
            "ops_per_second": self.ops_per_second,
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
            "clients": [
                {"id": s.id, "pid": s.pid, "since": s.since, "ops": s.ops}
                for s in self.sessions.values()
            ],
            "locks": self.locks.describe(),
            "listeners": self.listeners.describe(),
            "near_cache_tracking": len(self.tracking),
            "limits": self.limits.as_dict(),
        }
