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

A thin ``BaseCache``: each method makes and validates the key (so Django's
key warnings apply), then calls the process-wide client, which talks to the
cluster's Manager (or the embedded one). The cache itself lives in the
Manager (:mod:`.caches`): every worker sees one cache, ``incr``/``decr``/
``add`` are atomic there, and ``get_or_set`` (Django's, built on ``add``)
never stores twice.
"""

from __future__ import annotations

import logging
from functools import wraps

from asgiref.sync import sync_to_async
from django.core.cache.backends.base import DEFAULT_TIMEOUT, BaseCache

from . import conf
from .caches import DEFAULT_MAX_BYTES
from .exceptions import KeyNotFound, ManagerUnavailable

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


def _default_arg(key, default=None, *args, **kwargs):
    return kwargs.get("default", default)


def _all_keys_failed(data, *args, **kwargs):
    return list(data)


class ClusterShmCache(BaseCache):
    def __init__(self, location: str, params: dict) -> None:
        super().__init__(params)
        self._location = location or "default"
        options = params.get("OPTIONS", {})
        self._max_bytes = int(options.get("MAX_BYTES", DEFAULT_MAX_BYTES))
        self._ignore_exceptions = bool(options.get("IGNORE_EXCEPTIONS", False))
        self._near = conf.near_options(options.get("NEAR_CACHE"))

    @property
    def _client(self):
        # Looked up on every call, not kept: runcluster repoints the process
        # from the embedded Manager to the cluster's before forking.
        client = conf.get_client()
        if self._near is not None and self._location not in getattr(client, "_near", (self._location,)):
            client.enable_near_cache(self._location, *self._near)
        return client

    def _opts(self) -> list:
        # Sent with every write so that aliases sharing a LOCATION keep their
        # own MAX_ENTRIES/CULL_FREQUENCY, as LocMemCache's do.
        return [int(self._max_entries), int(self._cull_frequency), self._max_bytes]

    def _ttl(self, timeout):
        """Django's timeout (DEFAULT_TIMEOUT, None, seconds) as seconds from now or None."""
        if timeout is DEFAULT_TIMEOUT:
            timeout = self.default_timeout
        return None if timeout is None else float(timeout)

    @_ignorable(False)
    def add(self, key, value, timeout=DEFAULT_TIMEOUT, version=None):
        key = self.make_and_validate_key(key, version=version)
        return self._client.cache_add(self._location, key, value, self._ttl(timeout), self._opts())

    @_ignorable(_default_arg)
    def get(self, key, default=None, version=None):
        key = self.make_and_validate_key(key, version=version)
        return self._client.get(key, default, ns=self._location)

    @_ignorable(None)
    def set(self, key, value, timeout=DEFAULT_TIMEOUT, version=None):
        key = self.make_and_validate_key(key, version=version)
        self._client.cache_set(self._location, key, value, self._ttl(timeout), self._opts())

    @_ignorable(False)
    def touch(self, key, timeout=DEFAULT_TIMEOUT, version=None):
        key = self.make_and_validate_key(key, version=version)
        return self._client.touch(key, self._ttl(timeout), ns=self._location)

    @_ignorable(False)
    def delete(self, key, version=None):
        key = self.make_and_validate_key(key, version=version)
        return self._client.remove(key, ns=self._location)

    @_ignorable(lambda *args, **kwargs: {})
    def get_many(self, keys, version=None):
        made = {self.make_and_validate_key(key, version=version): key for key in keys}
        if not made:
            return {}
        found = self._client.get_many(list(made), ns=self._location)
        return {made[k]: v for k, v in found.items()}

    @_ignorable(_all_keys_failed)
    def set_many(self, data, timeout=DEFAULT_TIMEOUT, version=None):
        made = {self.make_and_validate_key(key, version=version): value for key, value in data.items()}
        if made:
            self._client.cache_set_many(self._location, made, self._ttl(timeout), self._opts())
        return []

    @_ignorable(None)
    def delete_many(self, keys, version=None):
        made = [self.make_and_validate_key(key, version=version) for key in keys]
        if made:
            self._client.delete_many(made, ns=self._location)

    @_ignorable(False)
    def has_key(self, key, version=None):
        key = self.make_and_validate_key(key, version=version)
        return self._client.has(key, ns=self._location)

    def incr(self, key, delta=1, version=None):
        made = self.make_and_validate_key(key, version=version)
        try:
            return self._client.incr(made, delta, default=None, ns=self._location)
        except KeyNotFound:
            raise ValueError(f"Key '{key}' not found") from None

    def decr(self, key, delta=1, version=None):
        return self.incr(key, -delta, version=version)

    @_ignorable(None)
    def clear(self):
        self._client.clear(ns=self._location)

    def close(self, **kwargs):
        # Django calls this at the end of every request. The connection is the
        # thread's and is kept for the next request (as RedisCache keeps its
        # pool); the cache stays usable after close().
        pass


def _async_of(name: str):
    # The blocking call runs in a thread of asgiref's pool; each of those
    # threads has a connection of its own. Every a* method maps to our own
    # sync method, so aincr stays atomic in the Manager and aget_many stays
    # one round trip (BaseCache's generic async versions of Django 5.2 fall
    # back to get/set per key).
    def method(self, *args, **kwargs):
        return sync_to_async(getattr(self, name), thread_sensitive=False)(*args, **kwargs)

    method.__name__ = f"a{name}"
    method.__doc__ = f"Async :meth:`{name}`."
    return method


for _name in ("add", "get", "set", "touch", "delete", "get_many", "set_many", "delete_many", "has_key",
              "incr", "decr", "clear"):
    setattr(ClusterShmCache, f"a{_name}", _async_of(_name))


async def _aclose(self, **kwargs):
    self.close(**kwargs)


ClusterShmCache.aclose = _aclose
