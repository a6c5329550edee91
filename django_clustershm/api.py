"""The module-level API: ``import django_clustershm as clustershm; clustershm.set(...)``.

Each function calls the process-wide client (:func:`~.registry.get_client`):
the cluster's Manager inside ``runcluster`` workers, an embedded one
elsewhere. See :class:`~.client.Client` for the full signatures.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable, Iterator, Mapping
from datetime import datetime, timedelta
from typing import Any

from .registry import get_client
from .wire.args import DEFAULT_ITERSIZE


class _Missing:
    """The "no timeout given" sentinel of the seed's LRU calls (Django's DEFAULT_TIMEOUT applies)."""

    def __repr__(self) -> str:
        return "MISSING"


_MISSING: Any = _Missing()


def get(key: str, default: Any = None) -> Any:
    """The value of ``key``, or ``default`` if it is missing or expired (seed: ``get``)."""
    return get_client().get(key, default)


def set(key: str, value: Any, timeout: float | None = None) -> None:
    """Store ``value`` under ``key``, optionally expiring after ``timeout`` seconds (seed: ``set``)."""
    get_client().set(key, value, timeout)


def remove(key: str) -> bool:
    """Remove ``key``; True if it existed (seed: ``remove``)."""
    return get_client().remove(key)


def has(key: str) -> bool:
    """Whether ``key`` exists (and has not expired)."""
    return get_client().has(key)


def add(key: str, value: Any, timeout: float | None = None) -> bool:
    """Store only if ``key`` is absent, atomically; True if stored."""
    return get_client().add(key, value, timeout)


def incr(key: str, delta: int = 1, *, default: int | None = 0) -> int:
    """Atomically add ``delta``; a missing key starts at ``default`` (None: raise KeyNotFound)."""
    return get_client().incr(key, delta, default=default)


def decr(key: str, delta: int = 1, *, default: int | None = 0) -> int:
    return get_client().decr(key, delta, default=default)


def touch(key: str, timeout: float | None = None) -> bool:
    return get_client().touch(key, timeout)


def get_many(keys: Iterable[str]) -> dict:
    return get_client().get_many(keys)


def set_many(mapping: Mapping[str, Any], timeout: float | None = None) -> None:
    get_client().set_many(mapping, timeout)


def delete_many(keys: Iterable[str]) -> int:
    return get_client().delete_many(keys)


def keys(prefix: str = "", *, pattern: str | None = None) -> list[str]:
    """The live keys starting with ``prefix``, or matching the glob ``pattern=`` (``"user:*:cart"``)."""
    return get_client().keys(prefix, pattern=pattern)


def iter_keys(pattern: str = "*", *, itersize: int = DEFAULT_ITERSIZE) -> Iterator[str]:
    """A generator of the keys matching the glob ``pattern``, ``itersize`` per request (never all at once)."""
    return get_client().iter_keys(pattern, itersize=itersize)


def delete_pattern(pattern: str, *, itersize: int = DEFAULT_ITERSIZE) -> int:
    """Remove the keys matching the glob ``pattern``; how many were removed."""
    return get_client().delete_pattern(pattern, itersize=itersize)


def ttl(key: str) -> float | int | None:
    """Seconds ``key`` has left (a float); None if it never expires; 0 if it is missing."""
    return get_client().ttl(key)


def expire(key: str, timeout: float | timedelta | None) -> bool:
    """A new expiry, ``timeout`` seconds from now (a timedelta too; zero or less removes the key)."""
    return get_client().expire(key, timeout)


def expire_at(key: str, when: datetime | float) -> bool:
    """Expire at ``when``, a datetime or a Unix timestamp (in the past: removed now)."""
    return get_client().expire_at(key, when)


def persist(key: str) -> bool:
    """Remove ``key``'s expiry; True if it had one."""
    return get_client().persist(key)


def clear() -> int:
    return get_client().clear()


def stats() -> dict:
    return get_client().stats()


def capabilities() -> dict:
    """What the engine in use guarantees (locks, listeners, near cache...): see the README's table."""
    return get_client().capabilities()


def ping() -> bool:
    return get_client().ping()


def near_stats() -> dict:
    """This process's near caches: ``{namespace: {"entries", "bytes", "hits", "misses"}}``
    (the namespace is a cache's LOCATION, "" for the shared store); empty when
    none is enabled, and always in embedded mode."""
    return get_client().near_stats()


# -- the seed's LRU operations, on the default cache ------------------------------

_standalone_lru = None


def _default_cache():
    """``caches["default"]`` when it is a ClusterShmCache, else a ClusterShmCache
    on the Manager's cache named "default" with Django's default bounds."""
    global _standalone_lru
    from django.conf import settings as dj_settings

    from .cache import ClusterShmCache

    if dj_settings.configured and "default" in getattr(dj_settings, "CACHES", {}):
        from django.core.cache import caches

        cache = caches["default"]
        if isinstance(cache, ClusterShmCache):
            return cache
    if _standalone_lru is None:
        _standalone_lru = ClusterShmCache("default", {})
    return _standalone_lru


def set_lru(key: str, value: Any, timeout: Any = _MISSING) -> None:
    """Store ``value`` in the default LRU cache (seed: ``setLRU``); ``timeout`` as Django's."""
    cache = _default_cache()
    if timeout is _MISSING:
        cache.set(key, value)
    else:
        cache.set(key, value, timeout)


def get_lru(key: str, default: Any = None) -> Any:
    """The value of ``key`` in the default LRU cache, or ``default`` (seed: ``getLRU``)."""
    return _default_cache().get(key, default)


def remove_lru(key: str) -> bool:
    """Remove ``key`` from the default LRU cache (seed: ``removeLRU``)."""
    return _default_cache().delete(key)


# -- the same, awaitable (the process-wide client's asyncio twin: no thread per call) --------------


async def aget(key: str, default: Any = None) -> Any:
    """``await clustershm.aget(key)``: :func:`get` for async views and tasks."""
    return await get_client().aio.aget(key, default)


async def aset(key: str, value: Any, timeout: float | None = None) -> None:
    await get_client().aio.aset(key, value, timeout)


async def aremove(key: str) -> bool:
    return await get_client().aio.aremove(key)


async def ahas(key: str) -> bool:
    return await get_client().aio.ahas(key)


async def aadd(key: str, value: Any, timeout: float | None = None) -> bool:
    return await get_client().aio.aadd(key, value, timeout)


async def aincr(key: str, delta: int = 1, *, default: int | None = 0) -> int:
    return await get_client().aio.aincr(key, delta, default=default)


async def adecr(key: str, delta: int = 1, *, default: int | None = 0) -> int:
    return await get_client().aio.adecr(key, delta, default=default)


async def atouch(key: str, timeout: float | None = None) -> bool:
    return await get_client().aio.atouch(key, timeout)


async def aget_many(keys: Iterable[str]) -> dict:
    return await get_client().aio.aget_many(keys)


async def aset_many(mapping: Mapping[str, Any], timeout: float | None = None) -> None:
    await get_client().aio.aset_many(mapping, timeout)


async def adelete_many(keys: Iterable[str]) -> int:
    return await get_client().aio.adelete_many(keys)


async def akeys(prefix: str = "", *, pattern: str | None = None) -> list[str]:
    return await get_client().aio.akeys(prefix, pattern=pattern)


def aiter_keys(pattern: str = "*", *, itersize: int = DEFAULT_ITERSIZE) -> AsyncIterator[str]:
    """``async for key in clustershm.aiter_keys("user:*"):`` (an async generator)."""
    return get_client().aio.aiter_keys(pattern, itersize=itersize)


async def adelete_pattern(pattern: str, *, itersize: int = DEFAULT_ITERSIZE) -> int:
    return await get_client().aio.adelete_pattern(pattern, itersize=itersize)


async def attl(key: str) -> float | int | None:
    return await get_client().aio.attl(key)


async def aexpire(key: str, timeout: float | timedelta | None) -> bool:
    return await get_client().aio.aexpire(key, timeout)


async def aexpire_at(key: str, when: datetime | float) -> bool:
    return await get_client().aio.aexpire_at(key, when)


async def apersist(key: str) -> bool:
    return await get_client().aio.apersist(key)


async def aclear() -> int:
    return await get_client().aio.aclear()


async def astats() -> dict:
    return await get_client().aio.astats()
