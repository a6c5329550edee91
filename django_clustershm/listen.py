"""Listeners: ``clustershm.listen()``, changes pushed from the Manager to every worker.

::

    import django_clustershm as clustershm

    def on_change(key, value, event):      # event: "set", "remove", "expire", "evict" or "clear"
        ...

    handle = clustershm.listen("feature:checkout", on_change)
    handle = clustershm.listen(prefix="flags:", callback=on_change)
    handle = clustershm.listen(prefix="", callback=on_change, cache="default")  # a cache's keys
    handle.cancel()

    async def on_flag(key, value, event):   # a coroutine: runs on the loop that registered it
        ...

    handle = await clustershm.alisten(prefix="flags:", callback=on_flag)

What a listener sees, and when, is stated precisely (and tested) in
:mod:`.client.dispatcher`: in another process the event is pushed before the
writer's call returns; in the writer's own process, its callbacks for that
write have run when the call returns (unless the write is made from a
callback). For every event, the Django signal
:data:`django_clustershm.signals.changed` is sent too (``sender`` is the
namespace: ``""`` for the shared store, the cache's LOCATION otherwise).

For a cache, keys are Django's full keys (``KEY_PREFIX:VERSION:key``, what
``cache.make_key(key)`` returns) and ``key`` and ``prefix`` are taken as
such; ``cache.make_key`` helps build them.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from .client import Keyspace
from .client.dispatcher import Handle
from .exceptions import ArgumentTypeError
from .registry import get_client

__all__ = ["Handle", "alisten", "listen"]


def listen(
    key: str | None = None,
    callback: Callable[[Any, Any, str], None] | None = None,
    *,
    prefix: str | None = None,
    cache: str | None = None,
    timeout: float | None = None,
    on_resync: Callable[[], None] | None = None,
) -> Handle:
    """Call ``callback(key, value, event)`` for every change of ``key`` (or of every
    key starting with ``prefix``) in the shared store, or in the cache alias ``cache``.

    Returns once the Manager has the subscription: every write that completes
    after that reaches the callback. ``callback`` may be None when only the
    Django signal :data:`~django_clustershm.signals.changed` is wanted.

    ``on_resync()`` is called (on the dispatcher thread) each time the
    subscription is made again (in a forked child, after a reconnection or a
    cut-off), once it is live: events of the gap may be lost, so a listener
    that mirrors state reloads it there.
    """
    space = _space(cache)
    return space.listen(key, callback, prefix=prefix, timeout=timeout, on_resync=on_resync)


async def alisten(
    key: str | None = None,
    callback: Callable[..., Any] | None = None,
    *,
    prefix: str | None = None,
    cache: str | None = None,
    timeout: float | None = None,
    on_resync: Callable[[], None] | None = None,
) -> Handle:
    """:func:`listen` from async code: a coroutine ``callback`` runs on the
    calling task's event loop, one event after another (a plain function on
    the dispatcher thread, as with :func:`listen`). Registering waits for the
    Manager's confirmation in a thread, so the loop is not blocked."""
    loop = asyncio.get_running_loop()
    space = _space(cache)
    return await asyncio.to_thread(
        space.listen, key, callback, prefix=prefix, timeout=timeout, on_resync=on_resync, loop=loop
    )


def _space(cache: str | None) -> Keyspace:
    space: Keyspace = get_client()
    if cache is not None:
        from django.core.cache import caches

        from .cache import ClusterShmCache

        backend = caches[cache]
        if not isinstance(backend, ClusterShmCache):
            raise ArgumentTypeError(f"cache {cache!r} is not a ClusterShmCache")
        space = backend.keyspace
    return space
