"""The Redis engine's transports: the same seam as a Manager's (:mod:`..client.transport`).

``CLUSTERSHM = {"ENGINE": "redis://..."}`` gives every process a
:class:`RedisTransport` instead of a socket to a Manager; the whole API above
the seam (the client's checks, serializers, locks, the cache backend) is
unchanged. Each request is one plan of :mod:`.ops`, run here with redis-py's
blocking client (thread-safe, one pooled connection per concurrent call,
fork-aware) or, in :class:`AsyncRedisTransport`, awaited on
``redis.asyncio`` (one client per event loop).
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
import weakref
from collections import Counter
from typing import Any

# Imported only once the redis extra is known to be there (redisengine.make_transport).
import redis.exceptions as E

from ..client.transport import Transport
from ..exceptions import ClusterShmError
from ..wire import frames as F
from ..wire.limits import Limits
from .config import EngineConfig
from .errors import translate
from .near import STRICT_UNACKED, RedisTracker, written
from .ops import BLOCK, CMD, DROP, HOLD, KEYSCAN, SCRIPT, SLEEP, RedisOps
from .scripts import NEAR_MARK, ack_key
from .values import Codec, derive_key
from .watchdog import Watchdog, beat_if_registered

logger = logging.getLogger("django_clustershm")


def signing_key(config: EngineConfig, secret: str | bytes | None) -> bytes | None:
    if not config.sign_values:
        return None
    key = config.signing_key if config.signing_key is not None else secret
    if not key:
        raise ClusterShmError(
            "the Redis engine signs values (ENGINE_OPTIONS SIGN_VALUES) and needs a secret: set Django's "
            "SECRET_KEY or ENGINE_OPTIONS SIGNING_KEY"
        )
    return derive_key(key)


class RedisTransport(Transport):
    """Requests carried out on Redis or Valkey (standalone, Sentinel or Cluster)."""

    name = "redis"
    remote = True
    #: The near caches' tracker (.near): made by the first NEAR_CACHE.
    tracker: RedisTracker | None = None
    #: Set once the server refused to turn keyspace notifications on (logged once).
    notify_refused = False

    def __init__(
        self, config: EngineConfig, *, timeout: float, limits: Limits, secret: str | bytes | None = None
    ) -> None:
        self.config = config
        self.timeout = timeout
        self._limits = limits
        self.codec = Codec(signing_key(config, secret))
        self.ops = RedisOps(config, self.codec, timeout)
        self.capabilities = self.ops.capabilities
        self.where = config.description
        self._pid = os.getpid()
        self._client: Any = None
        self._mutex = threading.Lock()
        self.watchdog = Watchdog(self)
        self._aio: AsyncRedisTransport | None = None
        self._channels: weakref.WeakSet = weakref.WeakSet()
        #: Requests this process made (stats()["ops"] on this engine: the
        #: server's own figures are in stats()["server"]).
        self.requests = 0
        self.ops.ops_count = lambda: self.requests

    def __repr__(self) -> str:
        return f"<RedisTransport {self.where}>"

    @property
    def limits(self) -> Limits:
        return self._limits

    @property
    def redis(self):
        """redis-py's client of this process (made on first use, and again in a forked child)."""
        client = self._client
        if client is None or self._pid != os.getpid():
            with self._mutex:
                if self._client is None or self._pid != os.getpid():
                    self._pid = os.getpid()
                    self._client = self.config.sync_client(self.timeout)
                client = self._client
        return client

    def execute(self, step: tuple):
        kind = step[0]
        r = self.redis
        if kind == CMD:
            return r.execute_command(*step[1])
        if kind == SCRIPT:
            reply = self.eval(r, step[1], step[2], step[3])
            if type(reply) is list and reply and reply[0] == NEAR_MARK:
                return self._acknowledged(r, step[2][-1], reply)
            return reply
        if kind == BLOCK:
            beat_if_registered()
            return r.execute_command("BLPOP", step[1], step[2])
        if kind == HOLD:
            self.watchdog.hold(step[1], step[2], step[3], threading.current_thread().is_alive, step[4], step[5])
            return None
        if kind == DROP:
            self.watchdog.drop(step[1])
            return None
        if kind == KEYSCAN:
            return list(r.scan_iter(match=step[1], count=1000))
        if kind == SLEEP:
            time.sleep(step[1])
            return None
        raise AssertionError(step)

    def _owed(self, listening_key: bytes, reply: list) -> tuple[Counter, bytes, float, Any]:
        """What a write that told strict sessions waits for: the acks it is owed
        (the sessions told, less this process's listeners, whose callbacks the
        listener barrier waits for), where they come, until when, and the
        script's own result."""
        _mark, wait_ms, ack_id, result, *told = reply
        owed = Counter(told)
        for channel in list(self._channels):
            if channel.lsid is not None:
                owed.pop(channel.lsid, None)
        return owed, ack_key(listening_key, ack_id), time.monotonic() + wait_ms / 1000, result

    def _acknowledged(self, r, listening_key: bytes, reply: list):
        """A write that told strict sessions (near caches' holders, listeners):
        wait for their acks, or until the last one's lease ended (a holder
        serves no copy after that)."""
        owed, key, deadline, result = self._owed(listening_key, reply)
        while owed.total() > 0:
            left = deadline - time.monotonic()
            got = r.execute_command("BLPOP", key, max(0.001, left)) if left > 0 else None
            if not got:
                logger.warning(STRICT_UNACKED, owed.total(), len(reply) - 4)
                break
            acks = [got[1]]
            if owed.total() > 1:
                acks += r.execute_command("LPOP", key, owed.total() - 1) or ()
            owed.subtract(acks)
            owed = +owed
        return result

    @staticmethod
    def eval(r, script, keys, argv):
        try:
            return r.execute_command("EVALSHA", script.sha, len(keys), *keys, *argv)
        except E.NoScriptError:
            return r.execute_command("EVAL", script.source, len(keys), *keys, *argv)

    def run(self, plan):
        """Run one plan to its result; errors in the library's tree."""
        execute = self.execute
        try:
            step = plan.send(None)
            while True:
                try:
                    reply = execute(step)
                except BaseException as exc:
                    error = translate(exc, self.where) if isinstance(exc, Exception) else exc
                    step = plan.throw(error)
                    continue
                step = plan.send(reply)
        except StopIteration as stop:
            return stop.value
        except ClusterShmError:
            raise
        except Exception as exc:
            raise translate(exc, self.where) from exc

    def call(self, op: int, args: list, timeout: Any = None) -> Any:
        self.requests += 1
        tracker = self.tracker
        if tracker is not None:
            target = written(op, args)
            if target is not None:
                tracker.own_write(*target)
                try:
                    return self.run(self.ops.plan(op, args))
                finally:
                    tracker.own_write(*target)
        return self.run(self.ops.plan(op, args))

    def make_tracker(self) -> RedisTracker:
        """The near caches' tracker of this process (one per transport)."""
        if self.tracker is None:
            self.tracker = RedisTracker(self)
        return self.tracker

    def open_channel(self):
        """A listener channel (:mod:`.events`). Only the listener dispatcher
        opens one: the near cache reads and hears on tracking connections of
        its own (:mod:`.near`), and a channel answers its requests with
        Unsupported anyway."""
        from .events import RedisEventChannel

        channel = RedisEventChannel(self)
        self._channels.add(channel)
        return channel

    def after_fork(self) -> None:
        # redis-py's pools notice the new pid themselves; the parent's locks
        # are the parent's: the child's watchdog renews none of them.
        self._mutex = threading.Lock()
        for channel in list(self._channels):
            channel.forget()  # the parent's pub/sub connections: closed here, untouched there
        self._channels = weakref.WeakSet()
        self.watchdog.after_fork()
        if self._aio is not None:
            self._aio.after_fork()

    def close(self) -> None:
        """Nothing per thread: redis-py pools connections per process."""

    def shutdown(self) -> None:
        """Release the locks this process holds and close its connections."""
        self.watchdog.release_all()
        self.watchdog.stop()
        tracker, self.tracker = self.tracker, None
        if tracker is not None:
            tracker.stop()
        client, self._client = self._client, None
        if client is not None and self._pid == os.getpid():
            _close_sync(client)

    def async_twin(self) -> AsyncRedisTransport:
        if self._aio is None:
            self._aio = AsyncRedisTransport(self)
        return self._aio


class _LoopClient:
    """One event loop's redis.asyncio client, closed inside that loop when it shuts down."""

    __slots__ = ("client", "closer")

    def __init__(self, client) -> None:
        self.client = client
        self.closer: Any = None


async def _close_at_shutdown(client):
    """An async generator that asyncio.run() (and every runner that calls
    ``loop.shutdown_asyncgens()``) closes before the loop closes: the moment
    to close the loop's connections without a ResourceWarning."""
    try:
        yield
    finally:
        await _close_async(client)


class AsyncRedisTransport:
    """The sync transport's plans, awaited on redis.asyncio: no thread per call."""

    name = "redis"
    remote = True

    def __init__(self, sync: RedisTransport) -> None:
        self.sync = sync
        self.timeout = sync.timeout
        self._clients: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _LoopClient] = weakref.WeakKeyDictionary()

    def __repr__(self) -> str:
        return f"<AsyncRedisTransport {self.sync.where}>"

    @property
    def limits(self) -> Limits:
        return self.sync.limits

    async def _client(self):
        loop = asyncio.get_running_loop()
        state = self._clients.get(loop)
        if state is None:
            state = self._clients[loop] = _LoopClient(self.sync.config.async_client(self.timeout))
            closer = _close_at_shutdown(state.client)
            await closer.__anext__()  # registered with the loop's async generators
            state.closer = closer
            weakref.finalize(loop, _drop_sockets, state.client)
        return state.client

    async def execute(self, step: tuple):
        kind = step[0]
        if kind == CMD:
            r = await self._client()
            return await r.execute_command(*step[1])
        if kind == SCRIPT:
            r = await self._client()
            script, keys, argv = step[1], step[2], step[3]
            try:
                reply = await r.execute_command("EVALSHA", script.sha, len(keys), *keys, *argv)
            except E.NoScriptError:
                reply = await r.execute_command("EVAL", script.source, len(keys), *keys, *argv)
            if type(reply) is list and reply and reply[0] == NEAR_MARK:
                return await self._acknowledged(r, keys[-1], reply)
            return reply
        if kind == BLOCK:
            beat_if_registered()
            r = await self._client()
            return await r.execute_command("BLPOP", step[1], step[2])
        if kind == HOLD:
            loop = asyncio.get_running_loop()
            self.sync.watchdog.hold(step[1], step[2], step[3], lambda: not loop.is_closed(), step[4], step[5])
            return None
        if kind == DROP:
            self.sync.watchdog.drop(step[1])
            return None
        if kind == SLEEP:
            await asyncio.sleep(step[1])
            return None
        if kind == KEYSCAN:
            r = await self._client()
            return [key async for key in r.scan_iter(match=step[1], count=1000)]
        raise AssertionError(step)

    async def _acknowledged(self, r, listening_key: bytes, reply: list):
        """:meth:`RedisTransport._acknowledged`, awaited."""
        owed, key, deadline, result = self.sync._owed(listening_key, reply)
        while owed.total() > 0:
            left = deadline - time.monotonic()
            got = await r.execute_command("BLPOP", key, max(0.001, left)) if left > 0 else None
            if not got:
                logger.warning(STRICT_UNACKED, owed.total(), len(reply) - 4)
                break
            acks = [got[1]]
            if owed.total() > 1:
                acks += await r.execute_command("LPOP", key, owed.total() - 1) or ()
            owed.subtract(acks)
            owed = +owed
        return result

    async def run(self, plan):
        where = self.sync.where
        try:
            step = plan.send(None)
            while True:
                try:
                    reply = await self.execute(step)
                except BaseException as exc:
                    error = translate(exc, where) if isinstance(exc, Exception) else exc
                    step = plan.throw(error)
                    continue
                step = plan.send(reply)
        except StopIteration as stop:
            return stop.value
        except ClusterShmError:
            raise
        except Exception as exc:
            raise translate(exc, where) from exc

    async def call(self, op: int, args: list, timeout: Any = None) -> Any:
        sync = self.sync
        sync.requests += 1
        tracker = sync.tracker
        if tracker is not None:
            target = written(op, args)
            if target is not None:
                tracker.own_write(*target)
                try:
                    return await self.run(sync.ops.plan(op, args))
                finally:
                    tracker.own_write(*target)
        return await self.run(sync.ops.plan(op, args))

    async def acquire(self, key: str, args: list, timeout: Any) -> Any:
        self.sync.requests += 1
        return await self.run(self.sync.ops.plan(F.LOCK_ACQUIRE, args))

    async def close(self) -> None:
        loop = asyncio.get_running_loop()
        state = self._clients.pop(loop, None)
        if state is not None:
            await _close_async(state.client)
            if state.closer is not None:
                await state.closer.aclose()

    def after_fork(self) -> None:
        for state in list(self._clients.values()):
            _drop_sockets(state.client)
        self._clients = weakref.WeakKeyDictionary()


def _close_sync(client) -> None:
    """Close every connection of a redis-py client: its pool's, and a Sentinel
    client's connections to the Sentinels (``close()`` alone leaves both open
    for a client made by ``master_for``)."""
    pool = getattr(client, "connection_pool", None)
    if pool is not None:
        manager = getattr(pool, "sentinel_manager", None)
        for sentinel in getattr(manager, "sentinels", []):
            sentinel.connection_pool.disconnect()
        pool.disconnect()
    client.close()


async def _close_async(client) -> None:
    """The asyncio twin of :func:`_close_sync`."""
    pool = getattr(client, "connection_pool", None)
    if pool is not None:
        manager = getattr(pool, "sentinel_manager", None)
        for sentinel in getattr(manager, "sentinels", []):
            await sentinel.connection_pool.disconnect()
        await pool.disconnect()
    await client.aclose()


def _drop_sockets(client) -> None:
    """Close a redis.asyncio client's sockets without its loop (closed, or the
    parent's after a fork): what its connections would warn about otherwise."""
    pools = []
    pool = getattr(client, "connection_pool", None)
    if pool is not None:
        pools.append(pool)
    for node in getattr(client, "get_nodes", lambda: [])():
        redis_connection = getattr(node, "redis_connection", None)
        if redis_connection is not None:
            pools.append(redis_connection.connection_pool)
        for conn in list(getattr(node, "_connections", [])) + list(getattr(node, "_free", [])):
            _drop_connection(conn)
    for pool in pools:
        for conn in list(getattr(pool, "_available_connections", [])) + list(getattr(pool, "_in_use_connections", [])):
            _drop_connection(conn)


def _drop_connection(conn) -> None:
    writer = getattr(conn, "_writer", None)
    if writer is None:
        return
    transport = writer.transport
    sock = getattr(transport, "_sock", None)
    try:
        if sock is not None:
            sock.close()
    except OSError:
        pass
    conn._writer = conn._reader = None
