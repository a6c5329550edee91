"""The near cache on Redis or Valkey: worker-local copies kept by RESP3 ``CLIENT TRACKING``.

The local engine's near cache (:mod:`..client.near`) is kept consistent by
its Manager, which pushes every change to the processes that read the key
before it answers the writer. Redis has the same mechanism, server-assisted
client-side caching: a connection that turned ``CLIENT TRACKING ON`` is sent
an ``invalidate`` push for every key it read, the first time the key changes
afterwards (written, deleted, expired, evicted, flushed). This module speaks
it directly (redis-py's own client-side cache refuses Valkey and Redis older
than 7.4, and caches commands rather than our decoded values):

* One RESP3 connection per process and server node: the **tracking
  connection**. Misses are read *on it* (``GET`` + ``PTTL``, pipelined), so
  the key is tracked by the very connection that will hear of its change,
  and the ``invalidate`` for any write after the read comes after the read's
  reply on the same stream.
* **No fill races an invalidation.** Every push read, and every write of
  this process, moves the tracker's counter ``seq``. A miss notes ``seq``
  when it sends its read, and its copy is kept only if ``seq`` has not moved
  when it is stored (after the pushes already in the socket are applied):
  an invalidation that overtook the reply, or a write of this process that
  overlapped it, drops the copy instead.
* **Pending invalidations are applied before every hit**: a zero-timeout
  poll of the tracking socket, as on the local engine.
* **Read-your-writes in the process**: a write of this process drops its
  local copies of the keys before it is sent and again once it returned,
  whatever the push timing.
* **A lost tracking connection empties the near cache** (closed, reset,
  ``CLIENT KILL``, a failover). A connection that stops answering is caught
  too: a process pings its idle tracking connection and answers hits only
  while the connection was heard from within :data:`HEARD_WITHIN` seconds
  (else the read is a miss, read on the connection, which proves it alive).

**The guarantee is "eventual"** (the default): in this process, a read never
returns a value older than this process's own completed writes; another
host's write reaches this process's copies within the push delay, usually
well under a millisecond on one network, but not before that writer's call
returns (Redis sends the writer's reply and the invalidations on different
connections: see ``../shared/research/redis-engine.md``, 0.36-0.72% of
reads racing a signal were answered from the old copy on loopback). The
startup log says so.

Misses from the asyncio client are read in a worker thread (``to_thread``):
the tracking connection is a blocking socket shared with the process's
threads, and an event loop must not wait on it. Hits never leave the loop.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from typing import Any

import redis.exceptions as E

from ..client.near import Tracker
from ..exceptions import Unsupported
from ..wire import frames as F
from .errors import translate

logger = logging.getLogger("django_clustershm.near")

#: Seconds a tracking connection may stay unheard before its copies stop
#: answering (the next read of them is a miss, which proves the connection).
HEARD_WITHIN = 2.0
#: Seconds of silence after which a read pings the tracking connection.
PING_AFTER = 0.5


class _Tracking:
    """One tracking connection (one server node) and what is known of it."""

    __slots__ = ("client_id", "conn", "heard", "io", "node", "pinged_at", "pings")

    def __init__(self, conn, node: str, client_id: int) -> None:
        self.conn = conn
        self.node = node
        self.client_id = client_id  # the server's CLIENT ID of the connection (CLIENT LIST, CLIENT KILL)
        #: Held while a thread talks on the connection (a miss, a drain, a ping).
        self.io = threading.Lock()
        self.heard = time.monotonic()
        self.pings = 0  # PINGs sent and not yet answered
        self.pinged_at = 0.0

    def close(self) -> None:
        try:
            self.conn.disconnect()  # in a forked child: closes our copy, never shuts the parent's down
        except Exception:  # closing what may already be broken
            pass


class RedisTracker(Tracker):
    """The near caches of one process on the Redis engine (see the module's docstring)."""

    def __init__(self, transport) -> None:
        super().__init__(transport)
        #: The generation of the tracking connections: moves whenever they are
        #: dropped, so a miss read on a dropped connection is not kept.
        self.sid = 1
        self._push_lock = threading.Lock()  # guards seq and _pending (taken inside a parser callback)
        self._pending: list = []
        self._connect_lock = threading.Lock()
        self._by_node: dict[str, _Tracking] = {}
        self._by_ns: dict[str, _Tracking] = {}
        #: (value-key prefix, namespace) of every near cache, for the invalidated keys' names.
        self._prefixes: tuple[tuple[bytes, str], ...] = ()
        self._ops = transport.ops
        self.engine: Any = transport  # the RedisTransport (typed Any: it imports this module)

    def near_cache(self, ns: str, max_entries: int, max_bytes: int):
        cache = super().near_cache(ns, max_entries, max_bytes)
        pfx = self._ops.space(ns)[0]
        if (pfx, ns) not in self._prefixes:
            # Longest first: a namespace's prefix may begin another's.
            self._prefixes = tuple(sorted({*self._prefixes, (pfx, ns)}, key=lambda p: -len(p[0])))
        return cache

    def session_id(self) -> int | None:
        # Never connects: the tracking connection is opened by the first miss,
        # which may run in a worker thread (an event loop must not wait on it).
        return self.sid

    # -- pushes --------------------------------------------------------------------------------

    def _pushed(self, message) -> None:
        """redis-py's parser callback for an ``invalidate`` push (any thread, io lock held)."""
        keys = message[1] if len(message) > 1 else None
        with self._push_lock:
            self.seq += 1
            self._pending.append(keys)

    def _apply_pending(self) -> None:
        """Apply the invalidations read so far (the tracker's lock is held)."""
        if not self._pending:
            return
        with self._push_lock:
            pending, self._pending = self._pending, []
        for keys in pending:
            if keys is None:  # FLUSHALL, FLUSHDB, or the server's tracking table overflowed
                for cache in self.caches.values():
                    cache.drop_all()
                continue
            for rkey in keys:
                if type(rkey) is str:
                    rkey = rkey.encode("utf-8")
                for pfx, ns in self._prefixes:
                    if rkey.startswith(pfx):
                        self.caches[ns].invalidate(rkey[len(pfx) :].decode("utf-8", "replace"))
                        break

    def own_write(self, ns: str, keys: list | None) -> None:
        """A write of this process, before it is sent and once it returned:
        its keys' copies (all of ``ns`` for ``None``) are dropped and every
        read in flight is kept from storing what it read (read-your-writes,
        whatever the push timing)."""
        cache = self.caches.get(ns)
        if cache is None:
            return
        with self._push_lock:
            self.seq += 1
        with self.lock:
            if keys is None:
                cache.drop_all()
            else:
                for key in keys:
                    cache._drop(key)

    def drain(self, ns: str | None = None) -> bool:
        """Apply every invalidation already received (the tracker's lock is
        held; never blocks: a connection another thread is reading is left to
        it). True if ``ns``'s copies may answer."""
        self._apply_pending()
        now = time.monotonic()
        for tracking in list(self._by_node.values()):
            if not tracking.io.acquire(blocking=False):
                continue
            try:
                self._read_ready(tracking, now)
            except (E.ConnectionError, E.TimeoutError, OSError) as exc:
                self._lost(f"its tracking connection to {tracking.node} was lost: {exc}")
                return False
            finally:
                tracking.io.release()
        self._apply_pending()
        serving = self._by_ns.get(ns) if ns is not None else None
        return serving is not None and now - serving.heard < HEARD_WITHIN

    def _read_ready(self, tracking: _Tracking, now: float) -> None:
        """Read what the connection has (io lock held); ping it when it has been quiet."""
        conn = tracking.conn
        while conn.can_read(0):
            reply = conn.read_response(push_request=True)
            if reply is not None and tracking.pings:  # a PONG (a push returns None)
                tracking.pings -= 1
                tracking.heard = now
        if tracking.pings:
            if now - tracking.pinged_at > self.transport.timeout:
                raise E.TimeoutError(f"no answer to a PING within {self.transport.timeout:g}s")
        elif now - tracking.heard > PING_AFTER:
            conn.send_command("PING", check_health=False)
            tracking.pings += 1
            tracking.pinged_at = now

    def _lost(self, reason: str) -> None:
        logger.warning("near caches of process %d emptied: %s", os.getpid(), reason)
        self.drop()

    def drop(self) -> None:
        """Close the tracking connections and empty the near caches (the tracker's lock is held)."""
        trackings = list(self._by_node.values())
        self._by_node, self._by_ns = {}, {}
        self.sid = (self.sid or 0) + 1
        with self._push_lock:
            self.seq += 1
            self._pending = []
        for tracking in trackings:
            tracking.close()
        for cache in self.caches.values():
            cache.drop_all()

    def after_fork(self) -> None:
        trackings, generation = list(self._by_node.values()), self.sid
        super().after_fork()
        self._push_lock = threading.Lock()
        self._connect_lock = threading.Lock()
        self._pending = []
        self._by_node, self._by_ns = {}, {}
        self.sid = (generation or 0) + 1
        for tracking in trackings:
            tracking.close()

    # -- misses, read on the tracking connection --------------------------------------------------

    def _tracking(self, ns: str, rkey: bytes) -> _Tracking:
        tracking = self._by_ns.get(ns)
        if tracking is not None:
            return tracking
        with self._connect_lock:
            pool, node = self._pool_of(rkey)
            tracking = self._by_node.get(node)
            if tracking is None:
                conn, client_id = self._open(pool, node)
                tracking = _Tracking(conn, node, client_id)
                with self.lock:
                    self._by_node = {**self._by_node, node: tracking}
            with self.lock:
                self._by_ns = {**self._by_ns, ns: tracking}
            return tracking

    def _pool_of(self, rkey: bytes) -> tuple[Any, str]:
        """The connection pool of the node that serves ``rkey``, and that node's name."""
        client = self.engine.redis
        if self.engine.config.kind == "cluster":
            node = client.get_node_from_key(rkey)
            redis_connection = node.redis_connection or client.get_redis_connection(node)
            return redis_connection.connection_pool, node.name
        pool = client.connection_pool
        if self.engine.config.kind == "sentinel":
            host, port = pool.get_master_address()
            return pool, f"{host}:{port}"
        return pool, self.engine.where

    def _open(self, pool, node: str) -> tuple[Any, int]:
        """A new RESP3 connection to ``node`` with tracking on, and its CLIENT ID."""
        kwargs = dict(pool.connection_kwargs)
        kwargs.update(protocol=3, health_check_interval=0)
        conn = pool.connection_class(**kwargs)
        try:
            conn.connect()
            conn.send_packed_command(conn.pack_commands([("CLIENT", "TRACKING", "ON"), ("CLIENT", "ID")]))
            conn.read_response()
            client_id = int(conn.read_response())
        except E.ResponseError as exc:
            conn.disconnect()
            raise Unsupported(
                f"the near cache needs RESP3 and CLIENT TRACKING (Redis 6+, Valkey 7.2+); {node} refused: {exc}"
            ) from exc
        except BaseException:
            conn.disconnect()
            raise
        conn._parser.set_invalidation_push_handler(self._pushed)
        return conn, client_id

    def _read(self, ns: str, rkeys: list[bytes]) -> tuple[list, list, int]:
        """Raw values and PTTLs of ``rkeys`` (one namespace: one node), read
        on the tracking connection; and ``seq`` as it was when they were sent."""
        tracking = self._tracking(ns, rkeys[0])
        conn = tracking.conn
        with tracking.io:
            with self._push_lock:
                seq = self.seq
            get = ("GET", rkeys[0]) if len(rkeys) == 1 else ("MGET", *rkeys)
            try:
                conn.send_packed_command(conn.pack_commands([get, *[("PTTL", rkey) for rkey in rkeys]]))
                while tracking.pings:  # answers to PINGs sent before come first
                    if conn.read_response(push_request=True) is not None:  # a push gives None
                        tracking.pings -= 1
                raws = conn.read_response()
                pttls = [conn.read_response() for _ in rkeys]
            except (E.ConnectionError, E.TimeoutError, OSError) as exc:
                with self.lock:
                    if self._by_node.get(tracking.node) is tracking:
                        self._lost(f"its tracking connection to {tracking.node} was lost: {exc}")
                raise translate(exc, self.engine.where) from exc
            tracking.heard = time.monotonic()
        return ([raws] if len(rkeys) == 1 else raws), pttls, seq

    def fetch(self, ns: str, key: str, sid) -> tuple:
        rkey = self._ops.space(ns)[0] + key.encode("utf-8")
        try:
            raws, pttls, seq = self._read(ns, [rkey])
        except E.ResponseError as exc:
            return self._untracked(ns, exc, F.GET, [ns, key]), None, -1, False
        data = self._ops.codec.decode(rkey, raws[0])
        return data, _seconds(pttls[0]), seq, data is not None

    def fetch_many(self, ns: str, keys: list, sid) -> tuple:
        pfx = self._ops.space(ns)[0]
        rkeys = [pfx + key.encode("utf-8") for key in keys]
        try:
            raws, pttls, seq = self._read(ns, rkeys)
        except E.ResponseError as exc:
            found = self._untracked(ns, exc, F.GET_MANY, [ns, keys])
            return {key: (data, None) for key, data in found.items()}, -1, False
        decode = self._ops.codec.decode
        fetched = {}
        for key, rkey, raw, pttl in zip(keys, rkeys, raws, pttls, strict=True):
            if raw is not None:
                fetched[key] = (decode(rkey, raw), _seconds(pttl))
        return fetched, seq, True

    def _untracked(self, ns: str, exc: Exception, op: int, args: list):
        """A read the tracking connection could not serve (a Cluster slot that
        moved: MOVED/ASK): read it as any other request (which refreshes the
        slot map), not kept; the next miss finds the node again."""
        if not str(exc).startswith(("MOVED", "ASK")):
            raise translate(exc, self.engine.where) from exc
        with self._connect_lock, self.lock:
            self._by_ns = {n: t for n, t in self._by_ns.items() if n != ns}
        return self.transport.call(op, args)

    async def afetch(self, acall, ns: str, key: str, sid) -> tuple:
        return await asyncio.to_thread(self.fetch, ns, key, sid)

    async def afetch_many(self, acall, ns: str, keys: list, sid) -> tuple:
        return await asyncio.to_thread(self.fetch_many, ns, keys, sid)


def _seconds(pttl) -> float | None:
    """A copy's time to live from PTTL (-1: none; a key gone has no value either)."""
    if pttl is None or pttl < 0:
        return None
    return pttl / 1000


def written(op: int, args: list) -> tuple[str, list | None] | None:
    """The namespace and keys a request writes (``None`` keys: any of them), or None for a read."""
    if op in _KEYED_WRITES:
        return args[0], [args[1]]
    if op == F.SET_MANY:
        return args[0], list(args[1][0::2])
    if op == F.DELETE_MANY:
        return args[0], list(args[1])
    if op in (F.CLEAR, F.SCAN_DELETE):
        return args[0], None
    return None


_KEYED_WRITES = frozenset({F.SET, F.ADD, F.REPLACE, F.REMOVE, F.INCR, F.TOUCH, F.PERSIST})
