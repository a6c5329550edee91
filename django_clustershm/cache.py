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
            },
        }
    }

A thin ``BaseCache``, shaped like Django's ``RedisCache``: each method makes
and validates the key (so Django's key warnings apply), then calls the
method of the same name on a :class:`~.client.Keyspace`, the client's view of
the cache, which talks to the cluster's Manager (or the embedded one). The
cache itself lives in the Manager (:mod:`.server.namespace`): every worker
sees one cache, ``incr``/``decr``/``add`` are atomic there, and
``get_or_set`` (Django's, built on ``add``) never stores twice.
"""

from __future__ import annotations

import logging
from functools import wraps

from django.core.cache.backends.base import DEFAULT_TIMEOUT, BaseCache

from . import conf
from .client import Client, Keyspace
from .client.aio import AsyncKeyspace
from .exceptions import KeyNotFound, ManagerUnavailable
from .registry import get_client
from .wire.limits import DEFAULT_CACHE_BYTES

logger = logging.getLogger("django_clustershm.cache")

__all__ = ["ClusterShmCache"]


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


class ClusterShmCache(BaseCache):
    def __init__(self, location: str, params: dict) -> None:
        super().__init__(params)
        self._location = location or "default"
        options = params.get("OPTIONS", {})
        self._max_bytes = int(options.get("MAX_BYTES", DEFAULT_CACHE_BYTES))
        self._ignore_exceptions = bool(options.get("IGNORE_EXCEPTIONS", False))
        self._near = conf.near_options(options.get("NEAR_CACHE"))
        self._space: tuple[Client, Keyspace] | None = None
        self._aspace: tuple[Keyspace, AsyncKeyspace] | None = None

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
            )
            self._space = space = (client, keyspace)
        return space[1]

    def get_backend_timeout(self, timeout=DEFAULT_TIMEOUT):
        """Seconds from now, or None for never (Django's base class gives an
        absolute time; the Manager's clock is its own). The client checks the
        type, so a str timeout fails the same way in every mode."""
        if timeout is DEFAULT_TIMEOUT:
            return self.default_timeout
        return timeout

    @_ignorable(False)
    def add(self, key, value, timeout=DEFAULT_TIMEOUT, version=None):
        key = self.make_and_validate_key(key, version=version)
        return self.keyspace.add(key, value, self.get_backend_timeout(timeout))

    @_ignorable(_default_arg)
    def get(self, key, default=None, version=None):
        key = self.make_and_validate_key(key, version=version)
        return self.keyspace.get(key, default)

    @_ignorable(None)
    def set(self, key, value, timeout=DEFAULT_TIMEOUT, version=None):
        key = self.make_and_validate_key(key, version=version)
        self.keyspace.set(key, value, self.get_backend_timeout(timeout))

    @_ignorable(False)
    def touch(self, key, timeout=DEFAULT_TIMEOUT, version=None):
        key = self.make_and_validate_key(key, version=version)
        return self.keyspace.touch(key, self.get_backend_timeout(timeout))

    @_ignorable(False)
    def delete(self, key, version=None):
        key = self.make_and_validate_key(key, version=version)
        return self.keyspace.delete(key)

    @_ignorable(lambda *args, **kwargs: {})
    def get_many(self, keys, version=None):
        made = {self.make_and_validate_key(key, version=version): key for key in keys}
        if not made:
            return {}
        found = self.keyspace.get_many(list(made))
        return {made[k]: v for k, v in found.items()}

    @_ignorable(_all_keys_failed)
    def set_many(self, data, timeout=DEFAULT_TIMEOUT, version=None):
        made = {self.make_and_validate_key(key, version=version): value for key, value in data.items()}
        if made:
            self.keyspace.set_many(made, self.get_backend_timeout(timeout))
        return []

    @_ignorable(None)
    def delete_many(self, keys, version=None):
        made = [self.make_and_validate_key(key, version=version) for key in keys]
        if made:
            self.keyspace.delete_many(made)

    @_ignorable(False)
    def has_key(self, key, version=None):
        key = self.make_and_validate_key(key, version=version)
        return self.keyspace.has_key(key)

    def incr(self, key, delta=1, version=None):
        made = self.make_and_validate_key(key, version=version)
        try:
            return self.keyspace.incr(made, delta, default=None)
        except KeyNotFound:
            raise ValueError(f"Key '{key}' not found") from None

    def decr(self, key, delta=1, version=None):
        return self.incr(key, -delta, version=version)

    @_ignorable(None)
    def clear(self):
        self.keyspace.clear()

    def close(self, **kwargs):
        # Django calls this at the end of every request. The connection is the
        # thread's and is kept for the next request (as RedisCache keeps its
        # pool); the cache stays usable after close().
        pass

    # -- async: native, on the process-wide client's asyncio twin (one
    # pipelined connection per event loop, no thread per call, the same near
    # cache). Each maps to its own request, so aincr stays atomic in the
    # Manager and aget_many one round trip (BaseCache's generic versions fall
    # back to get/set per key).

    @property
    def akeyspace(self) -> AsyncKeyspace:
        """The awaitable twin of :attr:`keyspace`."""
        sync = self.keyspace
        space = self._aspace
        if space is None or space[0] is not sync:
            self._aspace = space = (sync, get_client().aio.keyspace(sync))
        return space[1]

    @_aignorable(False)
    async def aadd(self, key, value, timeout=DEFAULT_TIMEOUT, version=None):
        key = self.make_and_validate_key(key, version=version)
        return await self.akeyspace.aadd(key, value, self.get_backend_timeout(timeout))

    @_aignorable(_default_arg)
    async def aget(self, key, default=None, version=None):
        key = self.make_and_validate_key(key, version=version)
        return await self.akeyspace.aget(key, default)

    @_aignorable(None)
    async def aset(self, key, value, timeout=DEFAULT_TIMEOUT, version=None):
        key = self.make_and_validate_key(key, version=version)
        await self.akeyspace.aset(key, value, self.get_backend_timeout(timeout))

    @_aignorable(False)
    async def atouch(self, key, timeout=DEFAULT_TIMEOUT, version=None):
        key = self.make_and_validate_key(key, version=version)
        return await self.akeyspace.atouch(key, self.get_backend_timeout(timeout))

    @_aignorable(False)
    async def adelete(self, key, version=None):
        key = self.make_and_validate_key(key, version=version)
        return await self.akeyspace.adelete(key)

    @_aignorable(lambda *args, **kwargs: {})
    async def aget_many(self, keys, version=None):
        made = {self.make_and_validate_key(key, version=version): key for key in keys}
        if not made:
            return {}
        found = await self.akeyspace.aget_many(list(made))
        return {made[k]: v for k, v in found.items()}

    @_aignorable(_all_keys_failed)
    async def aset_many(self, data, timeout=DEFAULT_TIMEOUT, version=None):
        made = {self.make_and_validate_key(key, version=version): value for key, value in data.items()}
        if made:
            await self.akeyspace.aset_many(made, self.get_backend_timeout(timeout))
        return []

    @_aignorable(None)
    async def adelete_many(self, keys, version=None):
        made = [self.make_and_validate_key(key, version=version) for key in keys]
        if made:
            await self.akeyspace.adelete_many(made)

    @_aignorable(False)
    async def ahas_key(self, key, version=None):
        key = self.make_and_validate_key(key, version=version)
        return await self.akeyspace.ahas_key(key)

    async def aincr(self, key, delta=1, version=None):
        made = self.make_and_validate_key(key, version=version)
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
