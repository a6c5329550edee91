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
import math
import os
import select
import threading
import time
from typing import Any

import msgpack
import redis.exceptions as E

from ..client.near import Tracker
from ..exceptions import ManagerUnavailable, Unsupported
from ..wire import frames as F
from .errors import translate
from .scripts import ack_key

logger = logging.getLogger("django_clustershm.near")

#: Seconds a tracking connection may stay unheard before its copies stop
#: answering (the next read of them is a miss, which proves the connection).
HEARD_WITHIN = 2.0
#: Seconds of silence after which a read pings the tracking connection.
PING_AFTER = 0.5
#: Seconds a strict miss waits for its subscription while the server is failing.
OUTAGE_WAIT = 0.25
#: Seconds a strict copy lives at most: its holder record on the server lives
#: that long after the read that made it (so a write always finds it).
HOLD_FOR = 60.0

STRICT_UNACKED = (
    "a write went on without %d of the %d acknowledgements its strict sessions (near-cache holders, listeners) "
    "owed: those processes' leases ended (hung or gone); a holder serves no copy after its lease"
)


class _Tracking:
    """One tracking connection (one server node) and what is known of it."""

    __slots__ = ("client_id", "conn", "heard", "io", "node", "pinged_at", "pings", "poller")

    def __init__(self, conn, node: str, client_id: int) -> None:
        self.conn = conn
        self.node = node
        self.client_id = client_id  # the server's CLIENT ID of the connection (CLIENT LIST, CLIENT KILL)
        #: Held while a thread talks on the connection (a miss, a drain, a ping).
        self.io = threading.Lock()
        self.heard = time.monotonic()
        self.pings = 0  # PINGs sent and not yet answered
        self.pinged_at = 0.0
        self.poller = select.poll()
        self.poller.register(conn._sock.fileno(), select.POLLIN)

    def has_input(self) -> bool:
        """Whether anything arrived (never blocks): what the parser holds already,
        or a zero-timeout poll(2) of the socket (0.3 us against redis-py's
        can_read(), 1.2 us; a closed socket polls readable too)."""
        reader = getattr(self.conn._parser, "_reader", None)  # hiredis's, which may hold parsed input
        if reader is not None and hasattr(reader, "has_data"):
            if reader.has_data():
                return True
        elif self.conn.can_read(0):  # the pure-Python parser: let it tell
            return True
        return bool(self.poller.poll(0))

    def close(self) -> None:
        try:
            self.conn.disconnect()  # in a forked child: closes our copy, never shuts the parent's down
        except Exception:  # closing what may already be broken
            pass


class RedisTracker(Tracker):
    """The near caches of one process on the Redis engine (see the module's docstring)."""

    #: No RECENT: Redis's own LRU does not see near hits (its eviction samples
    #: keys; a hint would cost a command per key).
    reports_recent = False

    def __init__(self, transport) -> None:
        super().__init__(transport)
        #: The generation of the tracking connections: moves whenever they are
        #: dropped, so a miss read on a dropped connection is not kept.
        self.sid = 1
        #: Invalidations received (and own writes begun), counted: a miss is
        #: kept only if none came between its read and its fill (see fill).
        self.seq = 0
        self._push_lock = threading.Lock()  # guards seq and _pending (taken inside a parser callback)
        self._pending: list = []
        self._connect_lock = threading.Lock()
        self._by_node: dict[str, _Tracking] = {}
        self._trackings: tuple[_Tracking, ...] = ()  # _by_node's values, for the hit path
        self._by_ns: dict[str, _Tracking] = {}
        #: (value-key prefix, namespace) of every near cache, for the invalidated keys' names.
        self._prefixes: tuple[tuple[bytes, str], ...] = ()
        self._ops = transport.ops
        self.engine: Any = transport  # the RedisTransport (typed Any: it imports this module)
        #: The namespaces whose copies are strict, and the thread that keeps them so.
        self._strict: frozenset[str] = frozenset()
        self.hub: _StrictHub | None = None

    def near_cache(
        self, ns: str, max_entries: int, max_bytes: int, consistency: str | None = None, policy: str = "always"
    ):
        # "always" whatever is asked: CLIENT TRACKING tracks every read on the
        # tracking connection, and a read elsewhere (to keep no copy) would
        # cost a connection more per process for what the policy saves.
        cache = super().near_cache(ns, max_entries, max_bytes, consistency, "always")
        if consistency == "strict":
            self._strict = self._strict | {ns}
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

    def invalidated(self, ns: str, members) -> None:
        """A strict invalidation (the hub's thread): drop the copies, before the write is acknowledged."""
        with self._push_lock:
            self.seq += 1
        cache = self.caches.get(ns)
        if cache is None:
            return
        with self.lock:
            if not members:
                cache.drop_all()
            else:
                for member in members:
                    cache._drop(member.decode("utf-8", "replace"))

    def invalidated_all(self, namespaces: list) -> None:
        with self._push_lock:
            self.seq += 1
        with self.lock:
            for ns in namespaces:
                cache = self.caches.get(ns)
                if cache is not None:
                    cache.drop_all()

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

    # First reads (NearCache._remember_first): plain reads here, never kept (no
    # value slots on Redis; near caches on Redis keep every key read anyway).

    def fetch_first(self, ns: str, key: str, sid) -> tuple:
        return self.fetch_untracked(ns, key), None, None, False, None

    async def afetch_first(self, acall, ns: str, key: str, sid) -> tuple:
        return await self.afetch_untracked(acall, ns, key), None, None, False, None

    def fetch_many_first(self, ns: str, keys: list, sid) -> tuple:
        return {key: (value, None) for key, value in self.fetch_many_untracked(ns, keys).items()}, None, False, None

    async def afetch_many_first(self, acall, ns: str, keys: list, sid) -> tuple:
        found = await self.afetch_many_untracked(acall, ns, keys)
        return {key: (value, None) for key, value in found.items()}, None, False, None

    def check_alive(self) -> None:
        """(No file here: a lost tracking connection is found by drain.)"""

    def fill(self, sid, seq, tracked):
        """A miss is kept (with no stamp: invalidations keep it valid) only if
        no invalidation or own write came between its read and now, on the
        same tracking connections; they are applied first."""
        self.drain()
        return None if self.sid == sid and self.seq == seq else False

    def drain(self, ns: str | None = None) -> bool:
        """Apply every invalidation already received (the tracker's lock is
        held; never blocks: a connection another thread is reading is left to
        it). True if ``ns``'s copies may answer."""
        if self._pending:
            self._apply_pending()
        now = time.monotonic()
        for tracking in self._trackings:
            # The common case in one cheap test: nothing arrived, nothing due.
            if not tracking.has_input() and now - tracking.heard <= PING_AFTER:
                continue
            if not tracking.io.acquire(blocking=False):
                continue
            try:
                self._read_ready(tracking, now)
            except (E.ConnectionError, E.TimeoutError, E.ResponseError, OSError) as exc:
                self._lost(f"its tracking connection to {tracking.node} was lost: {exc}")
                return False
            finally:
                tracking.io.release()
            if self._pending:
                self._apply_pending()
        if ns in self._strict:
            hub = self.hub
            return hub is not None and hub.serving(ns, now)
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
        self._by_node, self._by_ns, self._trackings = {}, {}, ()
        self.sid = (self.sid or 0) + 1
        with self._push_lock:
            self.seq += 1
            self._pending = []
        for tracking in trackings:
            tracking.close()
        for cache in self.caches.values():
            cache.drop_all()

    def stop(self) -> None:
        """The client is being dropped: end the strict thread (its sessions leave at once)."""
        hub, self.hub = self.hub, None
        if hub is not None:
            hub.stop()
        with self.lock:
            self.drop()

    def after_fork(self) -> None:
        trackings, generation = list(self._by_node.values()), self.sid
        super().after_fork()
        self._push_lock = threading.Lock()
        self._connect_lock = threading.Lock()
        self._pending = []
        self._by_node, self._by_ns, self._trackings = {}, {}, ()
        self.sid = (generation or 0) + 1
        for tracking in trackings:
            tracking.close()
        hub, self.hub = self.hub, None
        if hub is not None:
            hub.forget()

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
                    self._trackings = tuple(self._by_node.values())
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
                replies = []
                for _ in range(1 + len(rkeys)):  # every reply, errors too: the stream stays in step
                    try:
                        replies.append(conn.read_response())
                    except E.ResponseError as exc:  # MOVED/ASK: the slot moved (see _untracked)
                        replies.append(exc)
                failed = next((r for r in replies if isinstance(r, E.ResponseError)), None)
                if failed is not None:
                    raise failed
                raws, pttls = replies[0], replies[1:]
            except (E.ConnectionError, E.TimeoutError, OSError) as exc:
                with self.lock:
                    if self._by_node.get(tracking.node) is tracking:
                        self._lost(f"its tracking connection to {tracking.node} was lost: {exc}")
                raise translate(exc, self.engine.where) from exc
            tracking.heard = time.monotonic()
        return ([raws] if len(rkeys) == 1 else raws), pttls, seq

    def fetch(self, ns: str, key: str, sid) -> tuple:
        if ns in self._strict:
            fetched, seq = self._strict_read(ns, [key])
            data, ttl = fetched.get(key, (None, None))
            return data, ttl, seq, data is not None
        rkey = self._ops.space(ns)[0] + key.encode("utf-8")
        try:
            raws, pttls, seq = self._read(ns, [rkey])
        except E.ResponseError as exc:
            return self._untracked(ns, exc, F.GET, [ns, key]), None, -1, False
        data = self._ops.codec.decode(rkey, raws[0])
        return data, _seconds(pttls[0]), seq, data is not None

    def fetch_many(self, ns: str, keys: list, sid) -> tuple:
        if ns in self._strict:
            fetched, seq = self._strict_read(ns, keys)
            return fetched, seq, True
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
        if not isinstance(exc, (E.MovedError, E.AskError)):
            raise translate(exc, self.engine.where) from exc
        with self._connect_lock, self.lock:
            self._by_ns = {n: t for n, t in self._by_ns.items() if n != ns}
        return self.transport.call(op, args)

    def _strict_read(self, ns: str, keys: list) -> tuple[dict, int]:
        """A strict miss: read and recorded as a holder of each key found, by
        one script, once this process's session listens for invalidations."""
        hub = self.hub
        if hub is None:
            with self._connect_lock:
                hub = self.hub
                if hub is None:
                    hub = self.hub = _StrictHub(self)
        space = hub.ensure(ns)
        pfx = self._ops.space(ns)[0]
        with self._push_lock:
            seq = self.seq
        members = [key.encode("utf-8") for key in keys]
        engine = self.engine
        argv = [pfx, hub.sid, hub.lease_ms, _HOLD_MS, *members]
        try:
            reply = engine.eval(engine.redis, self._ops.script("NEAR_READ"), [space.skey], argv)
        except Exception as exc:
            raise translate(exc, engine.where) from exc
        # The read renewed the lease on the server too, but only a renewal on the
        # subscription's own connection lets copies answer (see _StrictHub).
        decode = self._ops.codec.decode
        fetched = {}
        for i, (key, member) in enumerate(zip(keys, members, strict=True)):
            raw, pttl = reply[2 * i], reply[2 * i + 1]
            if raw is not None:
                ttl = HOLD_FOR if pttl is None or pttl < 0 else min(pttl / 1000, HOLD_FOR)
                fetched[key] = (decode(pfx + member, raw), ttl)
        return fetched, seq

    async def afetch(self, acall, ns: str, key: str, sid) -> tuple:
        return await asyncio.to_thread(self.fetch, ns, key, sid)

    async def afetch_many(self, acall, ns: str, keys: list, sid) -> tuple:
        return await asyncio.to_thread(self.fetch_many, ns, keys, sid)


_HOLD_MS = str(math.ceil(HOLD_FOR * 1000))


class _StrictSpace:
    """A strict namespace of this process: where its invalidations come, and its lease."""

    __slots__ = ("channel", "confirmed", "lease_sent", "node", "ns", "skey")

    def __init__(self, ns: str, listening_key: bytes, sid: bytes) -> None:
        self.ns = ns
        self.skey = listening_key[:-2] + b"#s"
        self.reset(sid)

    def reset(self, sid: bytes) -> None:
        """A new session: not subscribed, no lease."""
        self.channel = self.skey[:-2] + b"#n:" + sid
        self.node: str | None = None
        self.confirmed = False
        self.lease_sent = -math.inf  # when the last renewal that succeeded was sent (monotonic)

    def renewed(self, sent: float) -> None:
        if sent > self.lease_sent:
            self.lease_sent = sent


class _StrictHub:
    """The thread that keeps a process's strict near caches strict.

    The process has a *session* (a random id) per namespace in the server's
    ZSET ``{P|ns}#s``, with a lease (``STRICT_LEASE``) renewed every third of
    it here; each strict miss renews it too and records the session as a
    holder of the keys it read (:data:`..scripts.NEAR_READ`). This thread
    subscribes, on each namespace's shard, to ``{P|ns}#n:<session>``, where
    writes send the keys they changed; it drops those copies, then
    acknowledges (``RPUSH {P|ns}#a:<id>``), and only then does the write
    return (:meth:`RedisTransport._acknowledged`). The copies answer only
    while the lease runs, counted from when its last renewal was *sent*:
    so a writer that stops waiting for a hung process (at its lease's end,
    by the server's clock) knows the process answers from no copy by then.
    A lost connection empties the strict copies and starts a new session.
    """

    def __init__(self, tracker: RedisTracker) -> None:
        self.tracker = tracker
        self.engine = tracker.engine
        self.lease = float(self.engine.config.strict_lease)
        self.lease_ms = str(math.ceil(self.lease * 1000))
        self.sid = os.urandom(8).hex().encode()
        self.spaces: dict[str, _StrictSpace] = {}
        self._by_channel: dict[bytes, _StrictSpace] = {}
        self._conns: dict[str, Any] = {}
        self._cond = threading.Condition()
        self._stopping = False
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._thread: threading.Thread | None = None
        self._renewed_at = 0.0
        self.error: str | None = None  # the last failure, until a subscription succeeds again

    # -- from the process's threads -------------------------------------------------------------

    def ensure(self, ns: str) -> _StrictSpace:
        """``ns``'s space, once its invalidations are subscribed to (blocks; never on an event loop)."""
        with self._cond:
            space = self.spaces.get(ns)
            if space is None:
                space = _StrictSpace(ns, self.engine.ops.space(ns)[3], self.sid)
                self.spaces = {**self.spaces, ns: space}
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="clustershm-strict-near", daemon=True)
                self._thread.start()
            self._wake()
            start = time.monotonic()
            while not space.confirmed:
                # The transport's timeout; but while the server is failing (a
                # refused connection), a few retries' worth only: a read then
                # fails about as fast as it would without a near cache.
                wait = OUTAGE_WAIT if self.error is not None else self.engine.timeout
                left = start + wait - time.monotonic()
                if left <= 0 or self._stopping:
                    raise ManagerUnavailable(
                        f"the strict near cache could not subscribe to its invalidations on {self.engine.where}"
                        + (f": {self.error}" if self.error else "")
                    )
                self._cond.wait(left)
            return space

    def serving(self, ns: str, now: float) -> bool:
        space = self.spaces.get(ns)
        return space is not None and space.confirmed and now - space.lease_sent < self.lease

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._wake()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(self.engine.timeout)
        try:  # the sessions leave at once: writers need not wait for their leases
            for space in self.spaces.values():
                self.engine.redis.execute_command("ZREM", space.skey, self.sid)
        except Exception:
            logger.debug("a strict near-cache session could not leave", exc_info=True)
        self._close()

    def forget(self) -> None:
        """In a forked child: the parent's connections are closed here, untouched there."""
        self._stopping = True
        self._close()

    def _wake(self) -> None:
        try:
            os.write(self._wake_w, b"\0")
        except OSError:
            pass

    def _disconnect(self) -> None:
        for conn in self._conns.values():
            try:
                conn.disconnect()
            except Exception:  # closing what may already be broken
                pass
        self._conns = {}

    def _close(self) -> None:
        self._disconnect()
        for fd in (self._wake_r, self._wake_w):
            try:
                os.close(fd)
            except OSError:
                pass
        self._wake_r = self._wake_w = -1

    # -- the thread -------------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stopping:
            try:
                self._subscribe()
                self._renew()
                self._wait()
                for conn in list(self._conns.values()):
                    while conn.can_read(0):
                        self._handle(conn.read_response(push_request=True))
            except Exception as exc:
                if self._stopping:
                    return
                self._lost(exc)
                with self._cond:
                    self._cond.wait(0.05)  # then connect again

    def _wait(self) -> None:
        fds = [conn._sock.fileno() for conn in self._conns.values() if conn._sock is not None]
        timeout = max(0.0, self._renewed_at + self.lease / 3 - time.monotonic())
        readable, _, _ = select.select([*fds, self._wake_r], [], [], timeout)
        if self._wake_r in readable:
            try:
                while os.read(self._wake_r, 4096):
                    pass
            except BlockingIOError:
                pass

    def _subscribe(self) -> None:
        for space in list(self.spaces.values()):
            if space.node is not None:
                continue
            pool, node = self.tracker._pool_of(space.skey)
            conn = self._conns.get(node)
            if conn is None:
                kwargs = dict(pool.connection_kwargs)
                kwargs.update(protocol=3, health_check_interval=0)
                conn = pool.connection_class(**kwargs)
                conn.connect()
                conn._parser.set_pubsub_push_handler(_as_is)
                self._conns[node] = conn
            space.node = node
            self._by_channel[space.channel] = space
            conn.send_command("SSUBSCRIBE", space.channel, check_health=False)

    def _renew(self) -> None:
        now = time.monotonic()
        if now < self._renewed_at + self.lease / 3:
            return
        self._renewed_at = now
        for space in list(self.spaces.values()):
            if space.confirmed:
                self._renew_on_subscription(space)

    def _renew_on_subscription(self, space: _StrictSpace) -> None:
        """Renew the session's lease *on the connection that carries its
        subscription* (RESP3 allows commands there), and only then count the
        lease as running: a renewal that succeeds proves that this node serves
        the namespace's slot, so a write until the lease ends either reaches this
        subscription or (the slot moved since) waits for the lease; if the slot
        moved, the renewal fails with MOVED and the session starts over."""
        conn = self._conns[space.node]  # type: ignore[index]
        script = self.engine.ops.script("NEAR_RENEW")
        sent = time.monotonic()
        try:
            self._call_on(conn, "EVALSHA", script.sha, 1, space.skey, self.sid, self.lease_ms)
        except E.NoScriptError:
            self._call_on(conn, "EVAL", script.source, 1, space.skey, self.sid, self.lease_ms)
        space.renewed(sent)

    def _call_on(self, conn, *args):
        """A command on a subscribed connection: its reply, the pushes read
        before it handled after (a subscription confirmed meanwhile renews in turn)."""
        conn.send_command(*args, check_health=False)
        pushes = []
        while True:
            reply = conn.read_response(push_request=True)
            if isinstance(reply, list) and reply and reply[0] in _PUSH_KINDS:
                pushes.append(reply)
                continue
            break
        for push in pushes:
            self._handle(push)
        return reply

    def _handle(self, message) -> None:
        if not isinstance(message, list) or len(message) < 3:
            return
        kind, channel = message[0], message[1]
        space = self._by_channel.get(channel)
        if space is None:
            return
        if kind == b"ssubscribe":
            # In the session set, on this very node, before it may answer: a
            # write from now on tells it.
            self._renew_on_subscription(space)
            self.error = None
            with self._cond:
                space.confirmed = True
                self._cond.notify_all()
        elif kind == b"smessage":
            ack_id, members = msgpack.unpackb(message[2], raw=True)
            self.tracker.invalidated(space.ns, members)
            self.engine.eval(
                self.engine.redis, self.engine.ops.script("NEAR_ACK"), [ack_key(space.skey, ack_id)], [self.sid]
            )
        elif kind == b"sunsubscribe":
            raise ManagerUnavailable(f"the server dropped the subscription {channel!r} (its slot moved?)")

    def _lost(self, exc: Exception) -> None:
        """Connections lost: empty the strict copies, and start again as a new session."""
        if self.error is None:  # once per outage, not once per retry
            logger.warning("strict near caches of process %d emptied: %s", os.getpid(), exc)
        self.error = str(exc)
        self._disconnect()
        with self._cond:
            self._cond.notify_all()  # a read waiting to subscribe learns of the outage
        old, self.sid = self.sid, os.urandom(8).hex().encode()
        with self._cond:
            for space in self.spaces.values():
                space.reset(self.sid)
        self._by_channel = {}
        self.tracker.invalidated_all(list(self.spaces))
        if self.engine.config.kind == "cluster":
            try:  # a slot may have moved: ask the cluster where the namespaces are now
                self.engine.redis.nodes_manager.initialize()
            except Exception:
                logger.debug("the cluster's slot map could not be refreshed", exc_info=True)
        try:  # the old session leaves at once, if the server answers: writers need not wait for its lease
            for space in self.spaces.values():
                self.engine.redis.execute_command("ZREM", space.skey, old)
        except Exception:
            pass


_PUSH_KINDS = frozenset({b"smessage", b"ssubscribe", b"sunsubscribe", b"message", b"subscribe", b"unsubscribe"})


def _as_is(message):
    return message


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
