"""The Django cache backend: ``django_clustershm.cache.ClusterShmCache``.

::

    CACHES = {
        "default": {
            "BACKEND": "django_clustershm.cache.ClusterShmCache",
            "LOCATION": "default",          # aliases with the same LOCATION share one cache
            "TIMEOUT": 300,
            "OPTIONS": {
                "MAX_ENTRIES": 10000,       # Django's meaning: cull when full
                "CULL_FREQUENCY": 3,        # drop 1/3 of the entries, least recently used first
                "MAX_BYTES": 128 * 2**20,   # bound of the cache's memory in the Manager
                "IGNORE_EXCEPTIONS": False, # True: a missing Manager reads as a miss
                "NEAR_CACHE": {"MAX_ENTRIES": 10000, "MAX_BYTES": 16 * 2**20},  # optional
                "BUILD_TIMEOUT": 30,        # get_or_set: how long a miss waits for another's build
                "SERIALIZER": "django_clustershm.serializers.PickleSerializer",  # or JSON..., MSGPack...
                "COMPRESSOR": None,         # e.g. "django_clustershm.compressors.ZlibCompressor"
                "COMPRESS_MIN_LEN": 300,    # serialized values shorter than this stay raw
            },
        }
    }

A thin ``BaseCache``, shaped like Django's ``RedisCache``: each method makes
and validates the key (so Django's key warnings apply), then calls the
method of the same name on a :class:`~.client.Keyspace`, the client's view of
the cache, which talks to the cluster's Manager (or the embedded one). The
cache itself lives in the Manager (:mod:`.server.namespace`): every worker
sees one cache, ``incr``/``decr``/``add`` are atomic there.

``get_or_set(key, build)`` **builds once across the cluster**: when workers
miss the same key at once, one takes the key's build lock in the Manager and
builds, and the others wait for its value (Django's own, on ``add``, stores
once but builds once per worker). A builder that raises, or whose process
dies, releases the lock at once: the next waiter finds no value and builds.
A waiter that waits longer than ``BUILD_TIMEOUT`` builds itself. With
``stale=seconds`` an expired value is served for that long while exactly one
worker rebuilds it. :func:`cached` is the same as a decorator.

django-redis's extra API is here too, with its names and meanings (#17):
``ttl``/``pttl``, ``expire``/``pexpire``, ``expire_at``/``pexpire_at``,
``persist``, ``keys``, ``iter_keys``, ``delete_pattern`` (glob patterns, with
the alias's prefix and version applied as django-redis's ``make_pattern``
does), ``lock`` (our :class:`~.lock.Lock`) and ``set(..., nx=True/xx=True)``,
each one request, atomic in the Manager; and their ``a*`` forms.

``SERIALIZER`` and ``COMPRESSOR`` are django-redis's options too: dotted
paths to classes of :mod:`.serializers` and :mod:`.compressors` (or
subclasses of them), given the alias's OPTIONS. Values are serialized and
compressed in the caller; integers stay native so ``incr`` works with any.
"""

from __future__ import annotations

import hashlib
import inspect
import logging
import re
from collections.abc import AsyncIterator, Iterator
from datetime import timedelta
from functools import wraps

from django.core.cache.backends.base import (
    DEFAULT_TIMEOUT,
    MEMCACHE_MAX_KEY_LENGTH,
    BaseCache,
    default_key_func,
    get_key_func,
)
from django.utils.module_loading import import_string

from . import conf
from . import registry as _registry
from .client import Client, Keyspace
from .client.aio import AsyncKeyspace
from .client.serializer import Serializer
from .exceptions import InvalidArgument, KeyNotFound, ManagerUnavailable
from .lock import AsyncLock, Lock
from .registry import get_client
from .wire.args import DEFAULT_ITERSIZE
from .wire.limits import DEFAULT_CACHE_BYTES

logger = logging.getLogger("django_clustershm.cache")

__all__ = ["ClusterShmCache", "cached"]


def _ignorable(default):
    """With IGNORE_EXCEPTIONS, a missing Manager makes the call return ``default``."""

    def decorate(method):
        @wraps(method)
        def wrapper(self, *args, **kwargs):
            if not self._ignore_exceptions:
                return method(self, *args, **kwargs)
            try:
                return method(self, *args, **kwargs)
            except ManagerUnavailable as exc:
                logger.warning("cache %r: %s (ignored: IGNORE_EXCEPTIONS)", self._location, exc)
                return default(*args, **kwargs) if callable(default) else default

        return wrapper

    return decorate


#: get_or_set's build locks: apart from any name a user would give a lock.
BUILD_LOCK_PREFIX = "clustershm:build:"
#: cache.lock()'s locks, per LOCATION (as django-redis's are per Redis database).
CACHE_LOCK_PREFIX = "clustershm:lock:"
#: The key that says a value stored with ``stale=`` is still fresh.
FRESH_SUFFIX = ":clustershm:fresh"
#: Seconds a get_or_set miss waits for another worker's build (OPTIONS BUILD_TIMEOUT).
DEFAULT_BUILD_TIMEOUT = 30.0
_MISSING = object()
_NONE = object()
#: Django's key making and checking, which ClusterShmCache._made stands for while none is replaced.
_KEY_METHODS = ("make_key", "validate_key", "make_and_validate_key")
#: The attributes whose change recomputes ClusterShmCache._made's head.
_KEY_STATE = frozenset({"key_func", "key_prefix", "version", *_KEY_METHODS})


async def _call(build):
    value = build()
    if inspect.isawaitable(value):
        value = await value
    return value


def cached(timeout=DEFAULT_TIMEOUT, *, key=None, cache: str = "default", stale=None, version=None):
    """Memoize a function (sync or async) in a ClusterShmCache, built once across the cluster::

        @clustershm.cached(timeout=300)
        def report(year):
            ...                              # runs once per year and per 300 s, cluster-wide

        @clustershm.cached(timeout=60, key=lambda request: f"home:{request.LANGUAGE_CODE}", stale=30)
        def home(request):                   # a view: its response is cached (pickled)
            ...

    ``key``: a str (one entry) or a callable taking the function's arguments
    and returning one; by default the function's module and qualified name and
    the ``repr`` of its arguments (which must then be simple values).
    ``stale``, ``timeout`` and ``version``: as :meth:`ClusterShmCache.get_or_set`.
    """

    def decorate(function):
        def make_key(args, kwargs) -> str:
            if key is None:
                parts = [repr(a) for a in args] + [f"{k}={v!r}" for k, v in sorted(kwargs.items())]
                return f"{function.__module__}.{function.__qualname__}({', '.join(parts)})"
            return key(*args, **kwargs) if callable(key) else str(key)

        def backend() -> ClusterShmCache:
            from django.core.cache import caches

            found = caches[cache]
            if not isinstance(found, ClusterShmCache):
                raise TypeError(f"cached(): cache {cache!r} is not a ClusterShmCache")
            return found

        if inspect.iscoroutinefunction(function):

            @wraps(function)
            async def awrapper(*args, **kwargs):
                return await backend().aget_or_set(
                    make_key(args, kwargs), lambda: function(*args, **kwargs), timeout, version, stale=stale
                )

            return awrapper

        @wraps(function)
        def wrapper(*args, **kwargs):
            return backend().get_or_set(
                make_key(args, kwargs), lambda: function(*args, **kwargs), timeout, version, stale=stale
            )

        return wrapper

    return decorate


def _aignorable(default):
    """:func:`_ignorable` for the async methods."""

    def decorate(method):
        @wraps(method)
        async def wrapper(self, *args, **kwargs):
            if not self._ignore_exceptions:
                return await method(self, *args, **kwargs)
            try:
                return await method(self, *args, **kwargs)
            except ManagerUnavailable as exc:
                logger.warning("cache %r: %s (ignored: IGNORE_EXCEPTIONS)", self._location, exc)
                return default(*args, **kwargs) if callable(default) else default

        return wrapper

    return decorate


def _default_arg(key, default=None, *args, **kwargs):
    return kwargs.get("default", default)


def _all_keys_failed(data, *args, **kwargs):
    return list(data)


def _set_failed(*args, nx=False, xx=False, **kwargs):
    return False if nx or xx else None


def _glob_escape(text: str) -> str:
    """django-redis's ``glob_escape``: ``*``, ``?`` and ``[`` as one-character sets."""
    return _GLOB_SPECIAL.sub(r"[\1]", text)


_GLOB_SPECIAL = re.compile(r"([*?[])")


def _milliseconds(left):
    """Keyspace.ttl's seconds as Redis's PTTL: whole milliseconds (None and 0 as they are)."""
    return left if not left else int(left * 1000)


def _seconds(left):
    """... and as Redis's TTL: the milliseconds rounded to whole seconds."""
    return left if not left else (int(left * 1000) + 500) // 1000


def _from_ms(timeout, given):
    """pexpire's milliseconds as seconds (a timedelta, or the alias's default timeout, as they are)."""
    if given is DEFAULT_TIMEOUT or timeout is None or isinstance(timeout, timedelta):
        return timeout
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)):
        return timeout  # refused by the client's check, with its message
    return timeout / 1000


def _at_ms(when):
    """pexpire_at's Unix timestamp in milliseconds as seconds (a datetime as it is)."""
    if isinstance(when, bool) or not isinstance(when, (int, float)):
        return when
    return when / 1000


def _codec(options: dict) -> Serializer | None:
    """The alias's Serializer from OPTIONS SERIALIZER and COMPRESSOR (None: the client's, pickle)."""
    name = options.get("SERIALIZER")
    compressor_name = options.get("COMPRESSOR")
    serializer = None
    if name and name != _PICKLE:
        serializer = (import_string(name) if isinstance(name, str) else name)(options)
    elif "PICKLE_VERSION" in options:
        serializer = import_string(_PICKLE)(options)
    compressor = None
    if compressor_name:
        compressor = (import_string(compressor_name) if isinstance(compressor_name, str) else compressor_name)(options)
    if serializer is None and compressor is None:
        return None
    return Serializer(serializer, compressor)


_PICKLE = "django_clustershm.serializers.PickleSerializer"


def default_reverse_key(key: str) -> str:
    """django-redis's default REVERSE_KEY_FUNCTION: the user's key out of ``prefix:version:key``."""
    return key.split(":", 2)[2]


class ClusterShmCache(BaseCache):
    #: ``"KEY_PREFIX:VERSION:"`` while a made key is exactly that plus the
    #: user's key (Django's default key function, and Django's own
    #: make_key/validate_key): see :meth:`_made`.
    _head = ""
    #: The longest user key that keeps a made key within memcached's 250
    #: characters; -1 without a head, so that no key takes the fast path.
    _room = -1
    #: (the process-wide client, this alias's keyspace on it): see :meth:`_keyspace`.
    _space: tuple[Client, Keyspace] | None = None

    def __init__(self, location: str, params: dict) -> None:
        super().__init__(params)
        self._location = location or "default"
        options = params.get("OPTIONS", {})
        self._max_bytes = int(options.get("MAX_BYTES", DEFAULT_CACHE_BYTES))
        self._ignore_exceptions = bool(options.get("IGNORE_EXCEPTIONS", False))
        self._near = conf.near_options(options.get("NEAR_CACHE"))
        self._build_timeout = float(options.get("BUILD_TIMEOUT", DEFAULT_BUILD_TIMEOUT))
        self._codec = _codec(options)
        # django-redis's setting, where django-redis reads it: beside KEY_FUNCTION.
        self.reverse_key = get_key_func(params.get("REVERSE_KEY_FUNCTION") or default_reverse_key)
        self._aspace: tuple[Keyspace, AsyncKeyspace] | None = None

    # -- the hot path's precomputed parts ------------------------------------------------------
    #
    # Django's make_and_validate_key is three calls and a "%s:%s:%s" format
    # (0.36 us, most of a near-cache hit's backend cost); the usual key (a
    # str, the alias's own version, printable, no space, short) is made here
    # as one concatenation to a head computed once. Anything that could make
    # the two differ (a KEY_FUNCTION, a subclass's or an instance's own
    # make_key/validate_key, another version) takes Django's path. The head
    # follows any later change of key_func, key_prefix or version (Django's
    # own tests swap key_func on a live cache).

    def __setattr__(self, name: str, value) -> None:
        super().__setattr__(name, value)
        if name in _KEY_STATE:
            self._fast_keys()

    def __delattr__(self, name: str) -> None:
        super().__delattr__(name)
        if name in _KEY_STATE:
            self._fast_keys()

    def _fast_keys(self) -> None:
        head = None
        cls, own = type(self), self.__dict__
        if (
            own.get("key_func") is default_key_func
            and "key_prefix" in own
            and "version" in own
            and cls.make_key is BaseCache.make_key
            and cls.make_and_validate_key is BaseCache.make_and_validate_key
            and cls.validate_key is ClusterShmCache.validate_key
            and not any(name in own for name in _KEY_METHODS)
        ):
            made = "%s:%s:" % (own["key_prefix"], own["version"])  # noqa: UP031 - default_key_func's own format
            if len(made) <= MEMCACHE_MAX_KEY_LENGTH and made.isprintable() and " " not in made:
                head = made
        own["_head"] = head or ""
        own["_room"] = -1 if head is None else MEMCACHE_MAX_KEY_LENGTH - len(head)

    def _made(self, key, version=None) -> str:
        """``make_and_validate_key(key, version)``: the same key and the same
        warnings, in one concatenation for the usual key."""
        if version is None and type(key) is str and len(key) <= self._room and key.isprintable() and " " not in key:
            return self._head + key
        return self.make_and_validate_key(key, version=version)

    def _keyspace(self) -> Keyspace:
        """:attr:`keyspace`, without a call while the process's client is the one it was made on."""
        space = self._space
        if space is not None and space[0] is _registry._client:
            return space[1]
        return self.keyspace

    def _ignored(self, exc: ManagerUnavailable, default):
        """IGNORE_EXCEPTIONS: say so, and return ``default`` (the caller re-raises without it)."""
        logger.warning("cache %r: %s (ignored: IGNORE_EXCEPTIONS)", self._location, exc)
        return default

    @property
    def keyspace(self) -> Keyspace:
        """This alias's view of its cache, on the process-wide client. Looked up
        on every call, not kept across clients: runcluster repoints the
        process from the embedded Manager to the cluster's before forking."""
        client = get_client()
        space = self._space
        if space is None or space[0] is not client:
            keyspace = client.cache(
                self._location,
                max_entries=int(self._max_entries),
                cull_frequency=int(self._cull_frequency),
                max_bytes=self._max_bytes,
                near_cache=self._near,
                serializer=self._codec,
            )
            self._space = space = (client, keyspace)
        return space[1]

    def validate_key(self, key):
        """Django's memcached-portability warnings, at the cost of two C-level
        checks for the usual key (short, printable, no space): Django's own
        check is a generator and a regex search per call, 1-2 us of every get."""
        if len(key) <= MEMCACHE_MAX_KEY_LENGTH and key.isprintable() and " " not in key:
            return
        super().validate_key(key)

    def get_backend_timeout(self, timeout=DEFAULT_TIMEOUT):
        """Seconds from now, or None for never (Django's base class gives an
        absolute time; the Manager's clock is its own). The client checks the
        type, so a str timeout fails the same way in every mode."""
        if timeout is DEFAULT_TIMEOUT:
            return self.default_timeout
        return timeout

    # The methods a request calls most: the key made by _made, the keyspace
    # looked up by _keyspace, IGNORE_EXCEPTIONS as an except clause (free
    # until it runs) instead of _ignorable's wrapper (a call and an *args
    # tuple and **kwargs dict per call).

    def add(self, key, value, timeout=DEFAULT_TIMEOUT, version=None):
        try:
            return self._keyspace().add(self._made(key, version), value, self.get_backend_timeout(timeout))
        except ManagerUnavailable as exc:
            if not self._ignore_exceptions:
                raise
            return self._ignored(exc, False)

    def get(self, key, default=None, version=None):
        try:
            # _made and _keyspace, inlined (two calls less: 0.1 of the 0.4 us get adds to its keyspace's)
            if version is None and type(key) is str and len(key) <= self._room and key.isprintable() and " " not in key:
                made = self._head + key
            else:
                made = self.make_and_validate_key(key, version=version)
            bound = self._space
            space = bound[1] if bound is not None and bound[0] is _registry._client else self.keyspace
            return space.get(made, default)
        except ManagerUnavailable as exc:
            if not self._ignore_exceptions:
                raise
            return self._ignored(exc, default)

    def set(self, key, value, timeout=DEFAULT_TIMEOUT, version=None, *, nx=False, xx=False):
        """Django's ``set``; with django-redis's ``nx=True`` only if the key is
        missing (``add``), with ``xx=True`` only if it exists; either returns
        whether it stored (a plain ``set`` returns None, as Django's)."""
        try:
            if nx or xx:
                return self._set_if(self._keyspace(), self._made(key, version), value, timeout, nx, xx)
            # as in get: _made and _keyspace inlined
            if version is None and type(key) is str and len(key) <= self._room and key.isprintable() and " " not in key:
                made = self._head + key
            else:
                made = self.make_and_validate_key(key, version=version)
            bound = self._space
            space = bound[1] if bound is not None and bound[0] is _registry._client else self.keyspace
            space.set(made, value, self.get_backend_timeout(timeout))
        except ManagerUnavailable as exc:
            if not self._ignore_exceptions:
                raise
            return self._ignored(exc, _set_failed(nx=nx, xx=xx))

    def touch(self, key, timeout=DEFAULT_TIMEOUT, version=None):
        try:
            return self._keyspace().touch(self._made(key, version), self.get_backend_timeout(timeout))
        except ManagerUnavailable as exc:
            if not self._ignore_exceptions:
                raise
            return self._ignored(exc, False)

    def delete(self, key, version=None):
        try:
            return self._keyspace().delete(self._made(key, version))
        except ManagerUnavailable as exc:
            if not self._ignore_exceptions:
                raise
            return self._ignored(exc, False)

    @_ignorable(lambda *args, **kwargs: {})
    def get_many(self, keys, version=None):
        made = {self._made(key, version): key for key in keys}
        if not made:
            return {}
        found = self._keyspace().get_many(list(made))
        return {made[k]: v for k, v in found.items()}

    @_ignorable(_all_keys_failed)
    def set_many(self, data, timeout=DEFAULT_TIMEOUT, version=None):
        made = {self._made(key, version): value for key, value in data.items()}
        if made:
            self._keyspace().set_many(made, self.get_backend_timeout(timeout))
        return []

    @_ignorable(None)
    def delete_many(self, keys, version=None):
        made = [self._made(key, version) for key in keys]
        if made:
            self._keyspace().delete_many(made)

    def has_key(self, key, version=None):
        try:
            return self._keyspace().has_key(self._made(key, version))
        except ManagerUnavailable as exc:
            if not self._ignore_exceptions:
                raise
            return self._ignored(exc, False)

    def incr(self, key, delta=1, version=None):
        try:
            # as in get: _made and _keyspace inlined
            if version is None and type(key) is str and len(key) <= self._room and key.isprintable() and " " not in key:
                made = self._head + key
            else:
                made = self.make_and_validate_key(key, version=version)
            bound = self._space
            space = bound[1] if bound is not None and bound[0] is _registry._client else self.keyspace
            return space.incr(made, delta, default=None)
        except KeyNotFound:
            raise ValueError(f"Key '{key}' not found") from None

    def decr(self, key, delta=1, version=None):
        return self.incr(key, -delta, version=version)

    @_ignorable(None)
    def clear(self):
        self._keyspace().clear()

    def close(self, **kwargs):
        # Django calls this at the end of every request. The connection is the
        # thread's and is kept for the next request (as RedisCache keeps its
        # pool); the cache stays usable after close().
        pass

    # -- django-redis's extra API (#17): the same names and meanings ---------------------------
    #
    # Each call is one request, atomic in the Manager (django-redis's ttl is
    # two: EXISTS, then TTL). keys/iter_keys/delete_pattern take glob patterns
    # (Redis's rules), made and stripped as django-redis's make_pattern and
    # reverse_key do: this alias's KEY_PREFIX and VERSION apply, so other
    # prefixes and versions are never seen; other LOCATIONs are other caches.

    def make_pattern(self, pattern: str, version=None, prefix=None) -> str:
        """django-redis's ``make_pattern``: ``pattern`` inside this alias's key
        function, with the prefix and version glob-escaped."""
        prefix = _glob_escape(self.key_prefix if prefix is None else prefix)
        version = _glob_escape(str(self.version if version is None else version))
        return self.key_func(pattern, prefix, version)

    def _set_if(self, space, made, value, timeout, nx, xx) -> bool:
        if nx and xx:
            raise InvalidArgument("set() takes nx=True or xx=True, not both")
        timeout = self.get_backend_timeout(timeout)
        return space.add(made, value, timeout) if nx else space.replace(made, value, timeout)

    def _timeout_or_default(self, timeout):
        return self.default_timeout if timeout is DEFAULT_TIMEOUT else timeout

    @_ignorable(0)
    def ttl(self, key, version=None):
        """Seconds ``key`` has left, rounded as Redis's TTL; None if it never
        expires; 0 if it is missing or expired (django-redis's meanings)."""
        return _seconds(self._keyspace().ttl(self._made(key, version)))

    @_ignorable(0)
    def pttl(self, key, version=None):
        """:meth:`ttl` in milliseconds."""
        return _milliseconds(self._keyspace().ttl(self._made(key, version)))

    @_ignorable(False)
    def expire(self, key, timeout, version=None):
        """A new expiry, ``timeout`` seconds from now (a number or a
        ``timedelta``; None: never; zero or less removes the key); True if the
        key exists."""
        made = self._made(key, version)
        return self._keyspace().expire(made, self._timeout_or_default(timeout))

    @_ignorable(False)
    def pexpire(self, key, timeout, version=None):
        """:meth:`expire` with ``timeout`` in milliseconds (or a ``timedelta``)."""
        made = self._made(key, version)
        return self._keyspace().expire(made, _from_ms(self._timeout_or_default(timeout), timeout))

    @_ignorable(False)
    def expire_at(self, key, when, version=None):
        """Expire at ``when``: a ``datetime`` (naive: local time, as redis-py
        reads it) or a Unix timestamp; in the past, the key is removed."""
        return self._keyspace().expire_at(self._made(key, version), when)

    @_ignorable(False)
    def pexpire_at(self, key, when, version=None):
        """:meth:`expire_at` with a Unix timestamp in milliseconds (or a ``datetime``)."""
        return self._keyspace().expire_at(self._made(key, version), _at_ms(when))

    @_ignorable(False)
    def persist(self, key, version=None):
        """Remove ``key``'s expiry; True if it had one."""
        return self._keyspace().persist(self._made(key, version))

    @_ignorable(lambda *args, **kwargs: [])
    def keys(self, search, version=None):
        """The keys matching the glob ``search`` (in one request). For many keys, prefer :meth:`iter_keys`."""
        found = self._keyspace().keys(pattern=self.make_pattern(search, version=version))
        reverse = self.reverse_key
        return [reverse(key) for key in found if not key.endswith(FRESH_SUFFIX)]

    def iter_keys(self, search, itersize=None, version=None) -> Iterator[str]:
        """A generator of the keys matching the glob ``search``, fetched
        ``itersize`` at a time (default 1,000): the key space is never loaded
        whole, in this process or in the Manager. Every key present for the
        whole iteration is yielded, once."""
        pattern = self.make_pattern(search, version=version)
        reverse = self.reverse_key
        try:
            for key in self._keyspace().iter_keys(pattern, itersize=itersize or DEFAULT_ITERSIZE):
                if not key.endswith(FRESH_SUFFIX):
                    yield reverse(key)
        except ManagerUnavailable as exc:
            if not self._ignore_exceptions:
                raise
            logger.warning("cache %r: %s (ignored: IGNORE_EXCEPTIONS)", self._location, exc)

    @_ignorable(0)
    def delete_pattern(self, pattern, version=None, prefix=None, itersize=None) -> int:
        """Remove every key matching the glob ``pattern``; how many were
        removed. In batches of ``itersize`` (default 1,000), each atomic."""
        made = self.make_pattern(pattern, version=version, prefix=prefix)
        return self._keyspace().delete_pattern(made, itersize=itersize or DEFAULT_ITERSIZE)

    def _lock_name(self, key, version) -> str:
        made = self._made(key, version)
        name = f"{CACHE_LOCK_PREFIX}{self._location}:{made}"
        if len(name) > 200:
            name = f"{CACHE_LOCK_PREFIX}{self._location}:#{hashlib.sha256(made.encode()).hexdigest()}"
        return name

    def lock(
        self,
        key,
        version=None,
        timeout=None,
        sleep=0.1,
        blocking=True,
        blocking_timeout=None,
        thread_local=True,
        *,
        reentrant=False,
    ) -> Lock:
        """django-redis's ``cache.lock()``, as a :class:`django_clustershm.Lock`.

        redis-py's parameters map onto the Lock's: ``timeout`` (the lock's
        longest life) is its ``lease``; ``blocking_timeout`` (how long
        ``acquire()`` waits; None: forever) its ``timeout``; ``blocking=False``
        makes ``acquire()`` a try. ``sleep`` is ignored: nothing polls, the
        Manager grants waiters in FIFO order. Ownership is per thread, as with
        redis-py's default ``thread_local=True``; ``thread_local=False`` (a
        token any thread may release) is refused: use ``get_lock`` and
        ``release_lock`` for that. The lock's name is the made key (prefix and
        version) within this LOCATION, apart from the cache's keys."""
        if not thread_local:
            raise InvalidArgument(
                "lock(thread_local=False) is not supported: a Lock is owned by the thread that acquired it "
                "(use django_clustershm.get_lock()/release_lock() to pass a token between threads)"
            )
        return Lock(self._lock_name(key, version), blocking_timeout, timeout, blocking=blocking, reentrant=reentrant)

    def alock(
        self, key, version=None, timeout=None, sleep=0.1, blocking=True, blocking_timeout=None, *, reentrant=False
    ) -> AsyncLock:
        """:meth:`lock` for async code: a :class:`django_clustershm.AsyncLock`
        (owned per task), used as ``async with cache.alock("name", timeout=30):``."""
        return AsyncLock(
            self._lock_name(key, version), blocking_timeout, timeout, blocking=blocking, reentrant=reentrant
        )

    # -- get_or_set: built once across the cluster -----------------------------------------

    def _build_lock(self, made: str) -> str:
        """The name of ``made``'s build lock (apart from users' lock names, within the key limit)."""
        name = f"{BUILD_LOCK_PREFIX}{self._location}:{made}"
        if len(name) > 200:
            name = f"{BUILD_LOCK_PREFIX}{self._location}:#{hashlib.sha256(made.encode()).hexdigest()}"
        return name

    def _stored_timeouts(self, timeout, stale) -> tuple:
        """(the value's timeout, the freshness marker's): with ``stale``, the value outlives its freshness."""
        fresh = self.get_backend_timeout(timeout)
        if stale is None or fresh is None:
            return fresh, None
        return fresh + float(stale), fresh

    def get_or_set(self, key, default, timeout=DEFAULT_TIMEOUT, version=None, *, stale=None):
        """The value of ``key``; on a miss, ``default`` (or what the callable
        ``default()`` returns) is stored and returned, built once across the
        cluster (see the module's docstring). ``stale=seconds``: serve an
        expired value for that long while one worker rebuilds it."""
        made = self._made(key, version)
        space = self._keyspace()
        if stale is None:
            value = space.get(made, _MISSING)
            if value is not _MISSING:
                return value
        else:
            found = space.get_many([made, made + FRESH_SUFFIX])
            if made in found:
                if made + FRESH_SUFFIX in found:
                    return found[made]
                # Stale: whoever takes the build lock at once rebuilds; the others serve it as it is.
                return self._build(space, made, default, timeout, stale, wait=0, stale_value=found[made])
        if not callable(default):
            space.add(made, default, self.get_backend_timeout(timeout))
            return space.get(made, default)
        return self._build(space, made, default, timeout, stale, wait=self._build_timeout)

    def _build(self, space, made, build, timeout, stale, wait, stale_value=_NONE):
        client = get_client()
        lock = self._build_lock(made)
        granted = client.lock_acquire(lock, None, wait)
        if granted is None:
            if stale_value is not _NONE:
                return stale_value  # another worker rebuilds it
            # Waited BUILD_TIMEOUT for another's build: build without the lock.
            value = space.get(made, _MISSING)
            return value if value is not _MISSING else self._store(space, made, build(), timeout, stale)
        try:
            # Built by the one before us (we waited for its lock)? Then it is there.
            if stale is None:
                value = space.get(made, _MISSING)
                if value is not _MISSING:
                    return value
            elif space.has_key(made + FRESH_SUFFIX):
                return space.get(made, stale_value if stale_value is not _NONE else None)
            return self._store(space, made, build(), timeout, stale)
        finally:
            client.lock_release(lock, granted[0])

    def _store(self, space, made, value, timeout, stale):
        value_timeout, fresh_timeout = self._stored_timeouts(timeout, stale)
        space.set(made, value, value_timeout)
        if stale is not None:
            space.set(made + FRESH_SUFFIX, True, fresh_timeout)
        return value

    async def aget_or_set(self, key, default, timeout=DEFAULT_TIMEOUT, version=None, *, stale=None):
        """:meth:`get_or_set`, awaited (a coroutine function as ``default`` is awaited)."""
        made = self._made(key, version)
        space = self.akeyspace
        if stale is None:
            value = await space.aget(made, _MISSING)
            if value is not _MISSING:
                return value
        else:
            found = await space.aget_many([made, made + FRESH_SUFFIX])
            if made in found:
                if made + FRESH_SUFFIX in found:
                    return found[made]
                return await self._abuild(space, made, default, timeout, stale, 0, found[made])
        if not callable(default):
            await space.aadd(made, default, self.get_backend_timeout(timeout))
            return await space.aget(made, default)
        return await self._abuild(space, made, default, timeout, stale, self._build_timeout)

    async def _abuild(self, space, made, build, timeout, stale, wait, stale_value=_NONE):
        aio = get_client().aio
        lock = self._build_lock(made)
        granted = await aio.alock_acquire(lock, None, wait)
        if granted is None:
            if stale_value is not _NONE:
                return stale_value
            value = await space.aget(made, _MISSING)
            return (
                value if value is not _MISSING else await self._astore(space, made, await _call(build), timeout, stale)
            )
        try:
            if stale is None:
                value = await space.aget(made, _MISSING)
                if value is not _MISSING:
                    return value
            elif await space.ahas_key(made + FRESH_SUFFIX):
                return await space.aget(made, stale_value if stale_value is not _NONE else None)
            return await self._astore(space, made, await _call(build), timeout, stale)
        finally:
            await aio.alock_release(lock, granted[0])

    async def _astore(self, space, made, value, timeout, stale):
        value_timeout, fresh_timeout = self._stored_timeouts(timeout, stale)
        await space.aset(made, value, value_timeout)
        if stale is not None:
            await space.aset(made + FRESH_SUFFIX, True, fresh_timeout)
        return value

    # -- async: native, on the process-wide client's asyncio twin (one
    # pipelined connection per event loop, no thread per call, the same near
    # cache). Each maps to its own request, so aincr stays atomic in the
    # Manager and aget_many one round trip (BaseCache's generic versions fall
    # back to get/set per key).

    @property
    def akeyspace(self) -> AsyncKeyspace:
        """The awaitable twin of :attr:`keyspace`."""
        sync = self._keyspace()
        space = self._aspace
        if space is None or space[0] is not sync:
            self._aspace = space = (sync, get_client().aio.keyspace(sync))
        return space[1]

    @_aignorable(False)
    async def aadd(self, key, value, timeout=DEFAULT_TIMEOUT, version=None):
        key = self._made(key, version)
        return await self.akeyspace.aadd(key, value, self.get_backend_timeout(timeout))

    @_aignorable(_default_arg)
    async def aget(self, key, default=None, version=None):
        key = self._made(key, version)
        return await self.akeyspace.aget(key, default)

    @_aignorable(_set_failed)
    async def aset(self, key, value, timeout=DEFAULT_TIMEOUT, version=None, *, nx=False, xx=False):
        key = self._made(key, version)
        space = self.akeyspace
        if nx or xx:
            if nx and xx:
                raise InvalidArgument("set() takes nx=True or xx=True, not both")
            timeout = self.get_backend_timeout(timeout)
            return await (space.aadd(key, value, timeout) if nx else space.areplace(key, value, timeout))
        await space.aset(key, value, self.get_backend_timeout(timeout))

    @_aignorable(False)
    async def atouch(self, key, timeout=DEFAULT_TIMEOUT, version=None):
        key = self._made(key, version)
        return await self.akeyspace.atouch(key, self.get_backend_timeout(timeout))

    @_aignorable(False)
    async def adelete(self, key, version=None):
        key = self._made(key, version)
        return await self.akeyspace.adelete(key)

    @_aignorable(lambda *args, **kwargs: {})
    async def aget_many(self, keys, version=None):
        made = {self._made(key, version): key for key in keys}
        if not made:
            return {}
        found = await self.akeyspace.aget_many(list(made))
        return {made[k]: v for k, v in found.items()}

    @_aignorable(_all_keys_failed)
    async def aset_many(self, data, timeout=DEFAULT_TIMEOUT, version=None):
        made = {self._made(key, version): value for key, value in data.items()}
        if made:
            await self.akeyspace.aset_many(made, self.get_backend_timeout(timeout))
        return []

    @_aignorable(None)
    async def adelete_many(self, keys, version=None):
        made = [self._made(key, version) for key in keys]
        if made:
            await self.akeyspace.adelete_many(made)

    @_aignorable(False)
    async def ahas_key(self, key, version=None):
        key = self._made(key, version)
        return await self.akeyspace.ahas_key(key)

    async def aincr(self, key, delta=1, version=None):
        made = self._made(key, version)
        try:
            return await self.akeyspace.aincr(made, delta, default=None)
        except KeyNotFound:
            raise ValueError(f"Key '{key}' not found") from None

    async def adecr(self, key, delta=1, version=None):
        return await self.aincr(key, -delta, version=version)

    @_aignorable(None)
    async def aclear(self):
        await self.akeyspace.aclear()

    async def aclose(self, **kwargs):
        self.close(**kwargs)

    # -- django-redis's extra API, awaited --------------------------------------------------

    @_aignorable(0)
    async def attl(self, key, version=None):
        return _seconds(await self.akeyspace.attl(self._made(key, version)))

    @_aignorable(0)
    async def apttl(self, key, version=None):
        return _milliseconds(await self.akeyspace.attl(self._made(key, version)))

    @_aignorable(False)
    async def aexpire(self, key, timeout, version=None):
        made = self._made(key, version)
        return await self.akeyspace.aexpire(made, self._timeout_or_default(timeout))

    @_aignorable(False)
    async def apexpire(self, key, timeout, version=None):
        made = self._made(key, version)
        return await self.akeyspace.aexpire(made, _from_ms(self._timeout_or_default(timeout), timeout))

    @_aignorable(False)
    async def aexpire_at(self, key, when, version=None):
        return await self.akeyspace.aexpire_at(self._made(key, version), when)

    @_aignorable(False)
    async def apexpire_at(self, key, when, version=None):
        return await self.akeyspace.aexpire_at(self._made(key, version), _at_ms(when))

    @_aignorable(False)
    async def apersist(self, key, version=None):
        return await self.akeyspace.apersist(self._made(key, version))

    @_aignorable(lambda *args, **kwargs: [])
    async def akeys(self, search, version=None):
        found = await self.akeyspace.akeys(pattern=self.make_pattern(search, version=version))
        reverse = self.reverse_key
        return [reverse(key) for key in found if not key.endswith(FRESH_SUFFIX)]

    async def aiter_keys(self, search, itersize=None, version=None) -> AsyncIterator[str]:
        """:meth:`iter_keys` as an async generator: ``async for key in cache.aiter_keys("user:*"):``."""
        pattern = self.make_pattern(search, version=version)
        reverse = self.reverse_key
        try:
            async for key in self.akeyspace.aiter_keys(pattern, itersize=itersize or DEFAULT_ITERSIZE):
                if not key.endswith(FRESH_SUFFIX):
                    yield reverse(key)
        except ManagerUnavailable as exc:
            if not self._ignore_exceptions:
                raise
            logger.warning("cache %r: %s (ignored: IGNORE_EXCEPTIONS)", self._location, exc)

    @_aignorable(0)
    async def adelete_pattern(self, pattern, version=None, prefix=None, itersize=None) -> int:
        made = self.make_pattern(pattern, version=version, prefix=prefix)
        return await self.akeyspace.adelete_pattern(made, itersize=itersize or DEFAULT_ITERSIZE)
