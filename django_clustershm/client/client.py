"""The API, given a transport: ``Client(transport)``.

::

    from django_clustershm.client import Client, EmbeddedTransport, SocketTransport

    client = Client(SocketTransport(address, secret))     # or Client(EmbeddedTransport())
    client.set("myObj", {"name": "Tom"}, timeout=60)
    client.get("myObj")
    sessions = client.cache("sessions", max_entries=10_000)   # a named LRU cache, same methods
    sessions.add("token", "tom")

Everything done on the caller's side lives here, once, for every transport:
key and argument checks (:mod:`..wire.args`: the embedded and the socket
transports refuse the same mistakes with the same errors, before anything is
sent), size limits (a batch over the frame limit fails the same way in both
modes), serialisation (:mod:`.serializer`), the near caches
(:mod:`.near`), the listener dispatcher (:mod:`.dispatcher`, including the
barrier that makes a write wait for its own process's callbacks), and the
per-thread record of the locks held through :class:`~django_clustershm.Lock`.

A :class:`Keyspace` is the set of operations on one namespace: the shared
store (a :class:`Client` is the store's keyspace) or a named cache
(:meth:`Client.cache`). Their method names match Django's cache API where
they overlap (``get``, ``set``, ``add``, ``delete``, ``has_key``, ``incr``...).
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import os
import threading
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from ..exceptions import ArgumentTypeError, Unsupported, ValueTooLarge
from ..wire import args as A
from ..wire import frames as F
from ..wire.limits import DEFAULT_CACHE_BYTES, DEFAULT_CULL_FREQUENCY, DEFAULT_MAX_ENTRIES, Limits
from .dispatcher import Dispatcher, Handle
from .near import NearCache, Tracker
from .serializer import Serializer
from .transport import USE_DEFAULT, Transport

if TYPE_CHECKING:
    from .aio import AsyncClient

logger = logging.getLogger("django_clustershm.client")

#: Every Client of this process, for the after-fork reset (registry.py).
_clients: weakref.WeakSet[Client] = weakref.WeakSet()


_GET, _SET, _ADD, _REMOVE, _HAS, _INCR, _TOUCH = F.GET, F.SET, F.ADD, F.REMOVE, F.HAS, F.INCR, F.TOUCH


def clients() -> list[Client]:
    return list(_clients)


class Keyspace:
    """The operations on one namespace (the shared store, or a named cache)."""

    _client: Client
    _ns: str
    _bounds: list | None
    #: The near cache this keyspace reads through, if it has one.
    _near_cache: NearCache | None
    #: How this keyspace's values are stored (its client's, unless a cache alias gives its own).
    serializer: Serializer

    def __init__(
        self,
        client: Client,
        ns: str,
        bounds: list | None,
        near_cache: NearCache | None = None,
        serializer: Serializer | None = None,
    ) -> None:
        self._client = client
        self._ns = ns
        self._bounds = bounds
        self._near_cache = near_cache
        self.serializer = serializer or client.serializer

    def __repr__(self) -> str:
        return f"<Keyspace {self._ns!r} of {self._client!r}>"

    @property
    def name(self) -> str:
        """The namespace: "" for the shared store, the cache's name otherwise."""
        return self._ns

    # -- checks ----------------------------------------------------------------------------

    def _key(self, key) -> str:
        client = self._client
        if type(key) is str and len(key) <= client._max_key and key.isascii():
            return key  # the common case, without a call
        return A.key(key, client.limits.max_key)

    def _value(self, value, transport=None):
        """``value``'s stored form; given the ``transport`` a SET, ADD, REPLACE or SET_MANY
        goes through, a big ``bytes`` or ``str`` value skips pickle's copies if
        it can send it as several buffers (its ``splices``: see
        :meth:`.serializer.Serializer.dumps`)."""
        splice = transport is not None and getattr(transport, "splices", False)
        return self.serializer.dumps(value, self._client.limits.max_value, splice)

    def _write_args(self, *args) -> list:
        return [self._ns, *args] if self._bounds is None else [self._ns, *args, self._bounds]

    def _written(self, keys) -> None:
        """After a write: wait for this process's own listener callbacks of it (see .dispatcher)."""
        dispatcher = self._client._dispatcher
        if dispatcher is not None and dispatcher._index and dispatcher.listens(self._ns, keys):
            dispatcher.sync(self._client.transport.timeout)

    # -- the seed's operations ---------------------------------------------------------------

    def get(self, key: str, default: Any = None) -> Any:
        """The value of ``key``, or ``default`` if it is missing or expired."""
        client = self._client
        key = self._key(key)
        near = self._near_cache
        if near is not None:
            data = near.get(key)
        else:
            data = client.transport.call(_GET, [self._ns, key])
        return default if data is None else self.serializer.loads(data)

    def set(self, key: str, value: Any, timeout: float | None = None) -> None:
        """Store ``value`` under ``key``; ``timeout`` seconds until it expires
        (None: never; 0 or less: store nothing and remove the key)."""
        key = self._key(key)
        bounds = self._bounds  # a cache's: sent with each write (aliases of one cache keep their own)
        if bounds is None:
            args = [self._ns, key, self._value(value, self._client.transport), A.timeout(timeout)]
        else:
            args = [self._ns, key, self._value(value, self._client.transport), A.timeout(timeout), bounds]
        self._client.transport.call(_SET, args)
        self._written((key,))

    def remove(self, key: str) -> bool:
        """Remove ``key``; True if it existed."""
        key = self._key(key)
        existed = self._client.transport.call(_REMOVE, [self._ns, key])
        self._written((key,))
        return existed

    delete = remove

    # -- more atomic operations ------------------------------------------------------------------

    def has(self, key: str) -> bool:
        return self._client.transport.call(_HAS, [self._ns, self._key(key)])

    has_key = has

    def add(self, key: str, value: Any, timeout: float | None = None) -> bool:
        """Store ``value`` only if ``key`` is absent; True if it was stored."""
        key = self._key(key)
        transport = self._client.transport
        stored = transport.call(_ADD, self._write_args(key, self._value(value, transport), A.timeout(timeout)))
        self._written((key,))
        return stored

    def incr(self, key: str, delta: int = 1, *, default: int | None = 0) -> int:
        """Add ``delta`` atomically and return the new value.

        A missing key starts from ``default``; with ``default=None`` a missing
        key raises :class:`KeyNotFound` instead (Django's cache semantics).
        """
        key = self._key(key)
        delta = A.integer(delta, "delta")
        if default is None:
            # Nothing is created (a missing key raises), so no cache bounds to apply: none sent.
            args = [self._ns, key, delta, None]
        else:
            args = self._write_args(key, delta, A.integer(default, "default"))
        value = self._client.transport.call(_INCR, args)
        self._written((key,))
        return value

    def decr(self, key: str, delta: int = 1, *, default: int | None = 0) -> int:
        return self.incr(key, -A.integer(delta, "delta"), default=default)

    def touch(self, key: str, timeout: float | None = None) -> bool:
        """Give ``key`` a new expiry (None: never expires); True if the key exists."""
        key = self._key(key)
        found = self._client.transport.call(_TOUCH, [self._ns, key, A.timeout(timeout)])
        self._written((key,))
        return found

    def get_many(self, keys: Iterable[str]) -> dict:
        """The values of the keys that exist, in one round trip."""
        client = self._client
        checked = [self._key(k) for k in keys]
        near = self._near_cache
        if near is not None:
            found = near.get_many(checked)
        else:
            found = client.transport.call(F.GET_MANY, [self._ns, checked])
        loads = self.serializer.loads
        return {key: loads(data) for key, data in found.items()}

    def set_many(self, mapping: Mapping[str, Any], timeout: float | None = None) -> None:
        """Store every item in one round trip (all or none)."""
        ttl = A.timeout(timeout)
        transport = self._client.transport
        items, keys = self._set_many_items(mapping, transport)
        transport.call(F.SET_MANY, self._write_args(items, ttl))
        self._written(keys)

    def _set_many_items(self, mapping: Mapping[str, Any], transport=None) -> tuple[list, list]:
        """SET_MANY's flat [key, value...] list, checked against the frame limit, and its keys
        (``transport``: the one it goes through, see :meth:`_value`)."""
        encoded = {self._key(k): self._value(v, transport) for k, v in mapping.items()}
        max_frame = self._client.limits.max_frame
        size = 0
        for key, data in encoded.items():
            size += (len(key) if key.isascii() else len(key.encode())) + (9 if type(data) is int else len(data))
            size += F.ITEM_OVERHEAD
        if size > max_frame:
            # Checked here for both transports alike (an embedded call has no frame).
            raise ValueTooLarge(
                f"set_many of {len(encoded)} items is about {size} bytes, over the maximum frame of {max_frame}; "
                "send fewer items at once"
            )
        # A flat [key, value, key, value...] list, not a map: msgpack interns
        # the str keys of every map it decodes, and an interned key costs the
        # Manager a slot in the interpreter's intern table for as long as the
        # key lives (34 bytes a key, measured).
        return [x for item in encoded.items() for x in item], list(encoded)

    def delete_many(self, keys: Iterable[str]) -> int:
        """Remove the keys in one round trip; return how many existed."""
        checked = [self._key(k) for k in keys]
        count = self._client.transport.call(F.DELETE_MANY, [self._ns, checked])
        self._written(checked)
        return count

    def clear(self) -> int:
        """Remove every key of the namespace; return how many there were."""
        count = self._client.transport.call(F.CLEAR, [self._ns])
        self._written(None)
        return count

    # -- expiry and key-space scans (django-redis's extra API, #17) ------------------------------
    #
    # Each is one request, atomic in the Manager; iter_keys and delete_pattern
    # walk the namespace a batch per request (see server/scans.py).

    def ttl(self, key: str) -> float | int | None:
        """Seconds ``key`` has left, as a float; None if it never expires; 0 if
        it is missing or expired (django-redis's convention). One request,
        never answered from a near cache."""
        exists, left = self._client.transport.call(F.TTL, [self._ns, self._key(key)])
        return left if exists else 0

    def expire(self, key: str, timeout: float | timedelta | None) -> bool:
        """Give ``key`` a new expiry, ``timeout`` seconds from now (a number or
        a ``timedelta``, as redis-py's ``expire`` takes; None: never; zero or
        less removes the key). True if the key exists. Django's ``touch``."""
        key = self._key(key)
        found = self._client.transport.call(F.TOUCH, [self._ns, key, A.expire_timeout(timeout)])
        self._written((key,))
        return found

    def expire_at(self, key: str, when: datetime | float) -> bool:
        """Make ``key`` expire at ``when``: an aware ``datetime`` (a naive one is
        local time, as redis-py reads it) or a Unix timestamp in seconds. A time
        in the past removes the key (Redis's EXPIREAT). True if the key exists."""
        return self.expire(key, A.seconds_until(when))

    def persist(self, key: str) -> bool:
        """Remove ``key``'s expiry; True if it had one (False: missing, or it never expired)."""
        return self._client.transport.call(F.PERSIST, [self._ns, self._key(key)])

    def replace(self, key: str, value: Any, timeout: float | None = None) -> bool:
        """Store ``value`` only if ``key`` exists (Redis's SET XX); True if it did."""
        key = self._key(key)
        transport = self._client.transport
        stored = transport.call(F.REPLACE, self._write_args(key, self._value(value, transport), A.timeout(timeout)))
        self._written((key,))
        return stored

    def keys(self, prefix: str = "", *, pattern: str | None = None) -> list[str]:
        """The live keys that start with ``prefix`` (all keys by default), or
        that match the glob ``pattern`` (Redis's rules: ``*``, ``?``,
        ``[abc]``, ``[^abc]``, ``\\`` escapes), in one request. For a large
        namespace, :meth:`iter_keys` walks it without loading it whole."""
        if pattern is None:
            return self._client.transport.call(F.KEYS, [self._ns, A.prefix(prefix)])
        if prefix:
            raise ArgumentTypeError("keys() takes a prefix or a pattern=, not both")
        return self._client.transport.call(F.KEYS_MATCH, [self._ns, A.pattern(pattern, self._client.limits.max_key)])

    def iter_keys(self, pattern: str = "*", *, itersize: int = A.DEFAULT_ITERSIZE) -> Iterator[str]:
        """A generator of the live keys matching the glob ``pattern``, fetched
        ``itersize`` at a time at most (one request per batch): the key space is
        never loaded whole. Every key present for the whole iteration is
        yielded, once; keys written or removed meanwhile may or may not be."""
        args = [self._ns, 0, A.pattern(pattern, self._client.limits.max_key), A.itersize(itersize)]
        return self._scan(args)

    def _scan(self, args: list) -> Iterator[str]:
        call = self._client.transport.call
        while True:
            cursor, keys = call(F.SCAN, args)
            yield from keys
            if not cursor:
                return
            args[1] = cursor

    def delete_pattern(self, pattern: str, *, itersize: int = A.DEFAULT_ITERSIZE) -> int:
        """Remove every key matching the glob ``pattern``; return how many were
        removed. The Manager walks the namespace as :meth:`iter_keys` does and
        removes what matches as it goes (a request per ``itersize`` keys at
        most: each batch is atomic, the whole is not, as with django-redis)."""
        args = [self._ns, 0, A.pattern(pattern, self._client.limits.max_key), A.itersize(itersize)]
        call = self._client.transport.call
        removed = 0
        while True:
            cursor, count = call(F.SCAN_DELETE, args)
            removed += count
            if not cursor:
                break
            args[1] = cursor
        if removed:
            self._written(None)
        return removed

    # -- listeners -------------------------------------------------------------------------

    def listen(
        self,
        key: str | None = None,
        callback: Callable[[Any, Any, str], None] | None = None,
        *,
        prefix: str | None = None,
        timeout: float | None = None,
        on_resync: Callable[[], None] | None = None,
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> Handle:
        """Call ``callback(key, value, event)`` for every change of ``key`` (or
        of every key starting with ``prefix``) of this namespace; see
        :func:`django_clustershm.listen`. A coroutine function runs on ``loop``
        (default: the running loop), one event after another."""
        refused = self._client.transport.refuses.get("listen")
        if refused:
            raise Unsupported(refused)
        if (key is None) == (prefix is None):
            raise ArgumentTypeError("listen() takes a key or a prefix=, not both")
        if callback is not None and not callable(callback):
            raise ArgumentTypeError("callback must be callable")
        if callback is not None and inspect.iscoroutinefunction(callback):
            callback = _OnLoop(callback, loop)
        if on_resync is not None and not callable(on_resync):
            raise ArgumentTypeError("on_resync must be callable")
        target = key if prefix is None else prefix
        if not isinstance(target, str):
            raise ArgumentTypeError("a key or prefix is a str")
        if prefix is None:
            target = self._key(target)
        wait = self._client.transport.timeout if timeout is None else A.timeout(timeout, "timeout")
        handle = Handle(self._ns, target, prefix is not None, callback, on_resync, self.serializer.loads)
        if isinstance(callback, _OnLoop):
            callback.handle = handle
        return self._client.dispatcher.add(handle, wait)


class _OnLoop:
    """A coroutine function as a listener callback: the dispatcher thread
    queues each event onto the loop, where one task per subscription awaits
    the callback for each, in order. (A write's return waits for its events
    to be queued there, not for the coroutines to finish: the writer may be a
    task of that very loop.)"""

    def __init__(self, function: Callable, loop: asyncio.AbstractEventLoop | None) -> None:
        if loop is None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                raise ArgumentTypeError(
                    "a coroutine callback runs on an event loop: call listen() from async code "
                    "(or await alisten()), or pass loop="
                ) from None
        self.function = function
        self.loop = loop
        self.handle: Handle | None = None
        self._queue: asyncio.Queue | None = None

    def __repr__(self) -> str:
        return f"<coroutine callback {self.function!r}>"

    def __call__(self, key, value, event: str) -> None:
        loop = self.loop
        if loop.is_closed():
            if self.handle is not None:
                self.handle.cancel()  # its loop is gone: so is the subscription
            return
        try:
            loop.call_soon_threadsafe(self._put, (key, value, event))
        except RuntimeError:  # closed meanwhile
            pass

    def _put(self, item: tuple) -> None:
        if self._queue is None:
            self._queue = asyncio.Queue()
            self.loop.create_task(self._consume(self._queue))
        self._queue.put_nowait(item)

    async def _consume(self, queue: asyncio.Queue) -> None:
        while self.handle is None or self.handle.active:
            key, value, event = await queue.get()
            try:
                await self.function(key, value, event)
            except Exception:
                logger.exception(
                    "listener coroutine %r raised on %s of %r; delivery goes on", self.function, event, key
                )


class Client(Keyspace):
    """The whole API over ``transport``; the client itself is the shared store's keyspace."""

    def __init__(self, transport: Transport, *, serializer: Serializer | None = None) -> None:
        self.transport = transport
        self.serializer = serializer or Serializer()
        self._client = self
        self._ns = ""
        self._bounds = None
        self._near_cache = None
        self._max_key = -1  # known once the limits are (a socket learns them at its handshake)
        self._near: dict[str, NearCache] = {}
        self._tracker: Tracker | None = None
        self._dispatcher: Dispatcher | None = None
        self._held = threading.local()
        self._aio: AsyncClient | None = None
        _clients.add(self)

    def __repr__(self) -> str:
        return f"<Client {self.transport!r}>"

    @property
    def limits(self) -> Limits:
        limits = self.transport.limits
        self._max_key = limits.max_key
        return limits

    @property
    def timeout(self) -> float:
        return self.transport.timeout

    @property
    def aio(self) -> AsyncClient:
        """This client's awaitable twin (:mod:`.aio`): same data, same near caches, no thread per call."""
        aio = self._aio
        if aio is None:
            from .aio import AsyncClient

            aio = self._aio = AsyncClient(self)
        return aio

    # -- named caches -----------------------------------------------------------------------

    def cache(
        self,
        name: str,
        *,
        max_entries: int = DEFAULT_MAX_ENTRIES,
        cull_frequency: int = DEFAULT_CULL_FREQUENCY,
        max_bytes: int = DEFAULT_CACHE_BYTES,
        near_cache: tuple | None = None,
        serializer: Serializer | None = None,
    ) -> Keyspace:
        """The named LRU cache ``name`` (what a Django cache LOCATION names), with
        these bounds for this keyspace's writes (Django's MAX_ENTRIES and
        CULL_FREQUENCY; MAX_BYTES is fixed by the cache's first write).

        ``near_cache=(max_entries, max_bytes)`` (or ``conf.NearOptions``, what
        ``enable_near_cache`` takes): this keyspace reads through a near cache
        of the namespace (shared with the other keyspaces of it that ask for
        one; a keyspace that does not ask reads from the Manager).
        ``serializer``: how this keyspace stores values (default: the client's)."""
        if type(name) is not str or not name:
            raise ArgumentTypeError("a cache name is a non-empty str")
        near = None if near_cache is None else self.enable_near_cache(name, *near_cache)
        return Keyspace(self, name, A.bounds([max_entries, cull_frequency, max_bytes]), near, serializer)

    # -- near caches (see .near) ----------------------------------------------------------------

    def enable_near_cache(
        self,
        ns: str = "",
        max_entries: int = 2_000,
        max_bytes: int = 4 * 2**20,
        consistency: str | None = None,
        policy: str = "adaptive",
        implicit: bool = False,
    ) -> NearCache | None:
        """Answer reads of namespace ``ns`` from a consistent process-local copy.
        Only over a transport to another process (None otherwise: an embedded
        engine is in this process already). ``consistency``: "strict" or
        "eventual" (None: the engine's default; the local engine is always
        strict, see ``capabilities()["near_cache"]``). ``policy``: which keys
        get copies ("adaptive" or "always", see :class:`.near.NearCache`).
        ``implicit``: not asked for by the settings, so only where the engine
        makes near caches its default (None elsewhere, without a word)."""
        if not self.transport.remote or (implicit and not self.transport.near_by_default):
            return None
        refused = self.transport.refuses.get("near_cache")
        if refused:
            raise Unsupported(refused)
        refused = self.transport.refuses.get(f"near_cache_{consistency}")
        if refused:
            raise Unsupported(refused)
        near = self._near.get(ns)
        if near is None:
            if self._tracker is None:
                self._tracker = self.transport.make_tracker() or Tracker(self.transport)
            near = self._tracker.near_cache(ns, max_entries, max_bytes, consistency, policy)
            self._near = {**self._near, ns: near}
            if ns == "":
                self._near_cache = near  # the store's reads (this client's own methods)
            logger.info(
                "django-clustershm: near cache for %s (%d entries, %d bytes, %s%s) in process %d: %s",
                repr(ns) if ns else "the store",
                max_entries,
                max_bytes,
                near.policy,
                ", the default" if implicit else "",
                os.getpid(),
                self.transport.capabilities.get(f"near_cache_{consistency}")
                or self.transport.capabilities["near_cache"],
            )
        return near

    def near_stats(self) -> dict:
        """This process's near caches: ``{namespace: {"entries", "bytes", "hits",
        "misses", "untracked", "invalidated", "refreshed", "declined", "rests", "policy"}}``
        (``untracked``: misses read without keeping a copy; ``invalidated``:
        copies dropped because their key changed in the Manager; ``refreshed``:
        copies whose key changed, refilled from its value slot in shared
        memory with no round trip (counted in ``hits``); ``declined``: second
        reads the adaptive policy kept no copy of, the key having changed since
        the first; ``rests``: times the adaptive policy found the copies cost
        more than they saved, see :class:`.near.NearCache`)."""
        return {
            ns: {
                "entries": len(cache),
                "bytes": cache.bytes,
                "hits": cache.hits,
                "misses": cache.misses + (rested := cache.rest_reads),
                "untracked": cache.untracked + rested,
                "invalidated": cache.invalidated,
                "refreshed": cache.refreshed,
                "declined": cache.declined,
                "rests": cache.rests,
                "policy": cache.policy,
            }
            for ns, cache in self._near.items()
        }

    # -- locks (django_clustershm.lock holds the user-facing API) ---------------------------------

    def lock_acquire(self, key: str, lease: float | None = None, wait: float | None = None) -> list | None:
        """``[token, fence]``, or None if not acquired within ``wait`` seconds
        (None: wait forever, 0 or less: do not wait)."""
        key = self._key(key)
        if lease is not None:
            lease = A.positive_seconds(lease, "lease")
        if wait is not None and type(wait) is not int:
            wait = A.timeout(wait, "timeout")
        if wait is None:
            reply_timeout = None  # no limit: the Manager answers when it grants the lock
        elif wait <= 0:
            reply_timeout = USE_DEFAULT
        else:
            reply_timeout = wait + self.transport.timeout
        return self.transport.call(F.LOCK_ACQUIRE, [key, lease, wait], reply_timeout)

    def lock_release(self, key: str, token: bytes) -> bool:
        """Release; True if the lock went to a waiter, False if it is free now."""
        if type(token) is not bytes or len(token) != A.TOKEN_SIZE:
            A.token(token)  # raises, naming the argument
        handed_over = self.transport.call(F.LOCK_RELEASE, [self._key(key), token])
        if handed_over and self.transport.yields_on_handoff:
            # The next holder was just woken, most likely onto this CPU's run
            # queue (it slept in recv() here): let it run now rather than when
            # this thread next blocks. Go's sync.Mutex does the same on a
            # hand-off (semrelease with handoff=true yields). Measured with
            # bench_locks.py, 4 processes on 2 CPUs: the new holder's first
            # round trip 21 -> 9 us, locked read-modify-write 1.4x-2.0x -> 1.9x-2.4x diskcache's.
            # (Not on Redis: there the waiter is woken by the server, not by us.)
            os.sched_yield()
        return handed_over

    def lock_extend(self, key: str, token: bytes, lease: float | None) -> bool:
        return self.transport.call(F.LOCK_EXTEND, [self._key(key), A.token(token), A.positive_seconds(lease, "lease")])

    def lock_status(self, key: str, token: bytes | None = None) -> list:
        """``[locked, owned]``: held by anyone; held with ``token``."""
        return self.transport.call(F.LOCK_STATUS, [self._key(key), None if token is None else A.token(token)])

    def holds(self) -> dict:
        """The locks the calling thread holds through Lock objects of this client: key -> hold."""
        table = getattr(self._held, "table", None)
        if table is None:
            table = self._held.table = {}
        return table

    # -- listeners ------------------------------------------------------------------------------

    @property
    def dispatcher(self) -> Dispatcher:
        if self._dispatcher is None:
            self._dispatcher = Dispatcher(self.transport)
        return self._dispatcher

    # -- the rest --------------------------------------------------------------------------------

    def stats(self) -> dict:
        """The Manager's figures: keys, bytes, hits, ops/s, connected clients...
        and ``"capabilities"``: what this engine guarantees (:meth:`capabilities`)."""
        stats = self.transport.call(F.STATS, [])
        stats.setdefault("capabilities", self.capabilities())
        return stats

    def capabilities(self) -> dict:
        """What the engine behind this client guarantees, said out loud: how soon
        a dead holder's lock is free, whether listeners hear a write before it
        returns, how strict the near cache is... (the README has the table)."""
        return dict(self.transport.capabilities)

    def ping(self) -> bool:
        return self.transport.call(F.PING, []) == "pong"

    def close(self) -> None:
        """Release what the calling thread holds (its connection or session):
        locks it held are released. The client stays usable."""
        self.transport.close()

    def shutdown(self) -> list[Handle]:
        """Stop the listener dispatcher and drop the near caches; return the handles."""
        handles = self._dispatcher.stop() if self._dispatcher is not None else []
        if self._tracker is not None:
            self._tracker.stop()
        return handles

    # -- fork (called in order by registry's one after-fork reset) --------------------------------

    def after_fork(self) -> None:
        """In a forked child: drop every connection, session, hold, near copy
        and thread of the parent, renewing every lock; never blocks."""
        self.transport.after_fork()
        if self._aio is not None:
            self._aio.after_fork()
        self._held = threading.local()
        if self._tracker is not None:
            self._tracker.after_fork()
        if self._dispatcher is not None:
            self._dispatcher.after_fork()

    def resume_after_fork(self) -> None:
        """Then, once every client is reset: listeners subscribe again (bounded wait)."""
        if self._dispatcher is not None:
            self._dispatcher.resume(self.transport.timeout)
