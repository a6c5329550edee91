"""Locks for views and tasks: ``mutex()``, ``Lock``, ``get_lock``/``release_lock``; ``AsyncLock``, ``amutex()``.

::

    import django_clustershm as clustershm

    with clustershm.mutex("order:42", timeout=5, lease=30):   # or @clustershm.mutex(...)
        ...

    lock = clustershm.Lock("report", lease=60)
    if lock.acquire(blocking=False):
        try:
            ...
            lock.extend()          # another 60 s
        finally:
            lock.release()

    token = clustershm.get_lock("myObj", timeout=5)      # the seed's getLock/releaseLock
    clustershm.release_lock("myObj", token)

Semantics, kept by the Manager (:mod:`.locks`): waiters are granted in FIFO
order; only the holder's token releases or extends; an optional lease frees
the lock for the next waiter if the holder overruns it; every grant of a key
has a larger fencing token (``lock.fence``) than the last, so a store that
records it can refuse a late writer; a waiter whose timeout passes is never
granted afterwards; and a lock is freed the moment its holder's process dies
(its connection closes), with no lease needed.

Ownership is per thread, as with redis-py's ``thread_local=True``: a lock
that one thread holds is not released, extended or re-acquired by another
thread through the same ``Lock`` object. Locks are not reentrant by default:
a thread that asks again for a lock it already holds gets
:class:`WouldDeadlock` at once instead of waiting for itself forever. With
``reentrant=True``, the holding thread may enter again (any ``Lock`` or
``mutex`` on that key, in that thread); the Manager's lock is released when
the outermost holder releases.
"""

from __future__ import annotations

import asyncio
import threading
import weakref
from contextlib import ContextDecorator

from .client import Client
from .exceptions import LockNotOwned, LockTimeout, WouldDeadlock
from .registry import get_client

__all__ = ["AsyncLock", "Lock", "amutex", "get_lock", "mutex", "release_lock"]


class _Hold:
    """What a thread holds on one key through Lock objects (redis-py keeps one
    thread-local token; reentrancy needs the depth too). Kept per client and
    per thread in ``client.holds()``, so a forked child, whose client forgot
    its parent's holds, holds none of its parent's locks."""

    __slots__ = ("client", "depth", "fence", "token")

    def __init__(self, token: bytes, fence: int, client: Client) -> None:
        self.token = token
        self.fence = fence
        self.depth = 1
        self.client = client


class _LockOptions:
    """What a :class:`Lock` and an :class:`AsyncLock` are made of."""

    _kind = ""

    def __init__(
        self,
        key: str,
        timeout: float | None = None,
        lease: float | None = None,
        *,
        blocking: bool = True,
        reentrant: bool = False,
    ) -> None:
        self.key = key
        self.timeout = timeout
        self.lease = lease
        self.blocking = blocking
        self.reentrant = reentrant

    def __repr__(self) -> str:
        return f"<{self._kind} {self.key!r} lease={self.lease} reentrant={self.reentrant}>"

    def _wanted(self, blocking: bool | None, timeout: float | None, blocking_timeout: float | None) -> tuple:
        """(blocking, timeout) of an acquire() call, from its arguments and this lock's defaults."""
        blocking = self.blocking if blocking is None else blocking
        if timeout is None:
            timeout = self.timeout if blocking_timeout is None else blocking_timeout
        return blocking, timeout

    def _enter_again(self, mine: _Hold, blocking: bool, owner: str) -> bool:
        """The owner (a thread, or a task) asks again for a lock it holds: enter
        again if reentrant, fail a try, refuse a wait that would wait for itself."""
        if self.reentrant:
            mine.depth += 1
            return True
        if not blocking:
            return False
        raise WouldDeadlock(
            f"this {owner} already holds lock {self.key!r}; waiting for it would wait for itself "
            "(release it first, or use reentrant=True)"
        )


class Lock(_LockOptions, ContextDecorator):
    """A lock on ``key`` shared by every process of the cluster, shaped like redis-py's.

    ``timeout``: seconds ``acquire()`` waits by default (None: forever).
    ``lease``: seconds after which the Manager frees the lock if it is still
    held (None: held until released or until the holder's process dies).
    ``blocking=False`` makes ``acquire()`` a try-acquire by default.
    """

    _kind = "Lock"

    def __init__(
        self,
        key: str,
        timeout: float | None = None,
        lease: float | None = None,
        *,
        blocking: bool = True,
        reentrant: bool = False,
    ) -> None:
        super().__init__(key, timeout, lease, blocking=blocking, reentrant=reentrant)
        self._local = threading.local()

    # -- acquire / release ----------------------------------------------------------

    def acquire(
        self, blocking: bool | None = None, timeout: float | None = None, *, blocking_timeout: float | None = None
    ) -> bool:
        """Wait for the lock; True once held, False if ``timeout`` (or a try)
        failed. ``blocking_timeout``: redis-py's name for ``timeout``."""
        blocking, timeout = self._wanted(blocking, timeout, blocking_timeout)
        client = get_client()
        holds = client.holds()
        mine = holds.get(self.key)
        if mine is not None and not client.lock_status(self.key, mine.token)[1]:
            # A hold this thread recorded but no longer has: its lease ran out,
            # or its connection or Manager is gone. Forget it (one round trip,
            # only on this path).
            del holds[self.key]
            mine = None
        if mine is not None:
            entered = self._enter_again(mine, blocking, "thread")
            if entered:
                self._local.hold = mine
            return entered
        hold = self.do_acquire(client, 0 if not blocking else timeout)
        if hold is None:
            return False
        holds[self.key] = self._local.hold = hold
        return True

    def do_acquire(self, client: Client, wait: float | None) -> _Hold | None:
        """The I/O of :meth:`acquire` (redis-py's split): one request to the Manager."""
        granted = client.lock_acquire(self.key, self.lease, wait)
        return None if granted is None else _Hold(granted[0], granted[1], client)

    def release(self) -> None:
        """Release the lock; LockNotOwned if this thread does not hold it (any more)."""
        hold = self._hold()
        hold.depth -= 1
        if hold.depth > 0:
            return
        self._local.hold = None
        del hold.client.holds()[self.key]
        hold.client.lock_release(self.key, hold.token)  # LockNotOwned if the lease ran out meanwhile

    def extend(self, lease: float | None = None) -> None:
        """Restart the lease: ``lease`` seconds from now (default: this lock's lease)."""
        hold = self._hold()
        hold.client.lock_extend(self.key, hold.token, self.lease if lease is None else lease)

    def locked(self) -> bool:
        """Whether anyone holds the lock now."""
        return get_client().lock_status(self.key)[0]

    def owned(self) -> bool:
        """Whether this thread holds the lock now (False once its lease has run out)."""
        hold = getattr(self._local, "hold", None)
        if hold is None or hold.client.holds().get(self.key) is not hold:
            return False
        return hold.client.lock_status(self.key, hold.token)[1]

    @property
    def fence(self) -> int | None:
        """The fencing token of this thread's hold: larger for every later grant of the key."""
        hold = getattr(self._local, "hold", None)
        return None if hold is None else hold.fence

    def _hold(self) -> _Hold:
        hold = getattr(self._local, "hold", None)
        if hold is None or hold.client.holds().get(self.key) is not hold:
            raise LockNotOwned(f"lock {self.key!r} is not held by this thread through this Lock")
        return hold

    # -- context manager and decorator ---------------------------------------------------

    def __enter__(self) -> Lock:
        if not self.acquire():
            raise LockTimeout(f"lock {self.key!r} not acquired within {self.timeout}s")
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def mutex(key: str, timeout: float | None = None, lease: float | None = None, *, reentrant: bool = False) -> Lock:
    """``with clustershm.mutex(key, timeout=5, lease=30):`` or ``@clustershm.mutex(key)``.

    Raises :class:`LockTimeout` if the lock is not acquired within ``timeout``
    seconds; releases on the way out, exceptions included.
    """
    return Lock(key, timeout, lease, reentrant=reentrant)


def get_lock(key: str, timeout: float | None = None, lease: float | None = None) -> bytes:
    """Acquire ``key`` and return its owner token (the seed's ``getLock``).

    Raises :class:`LockTimeout` if not acquired within ``timeout`` seconds
    (None: wait forever, 0: do not wait). The token, not the thread, owns
    the lock: pass it to :func:`release_lock`.
    """
    granted = get_client().lock_acquire(key, lease, timeout)
    if granted is None:
        raise LockTimeout(f"lock {key!r} not acquired within {timeout}s")
    return granted[0]


def release_lock(key: str, token: bytes) -> None:
    """Release ``key`` held with ``token`` (the seed's ``releaseLock``); LockNotOwned otherwise."""
    get_client().lock_release(key, token)


class AsyncLock(_LockOptions):
    """The awaitable :class:`Lock`, shaped like redis-py's asyncio ``Lock``.

    ::

        lock = clustershm.AsyncLock("report", timeout=5, lease=60)
        if await lock.acquire():
            try:
                ...
                await lock.extend()
            finally:
                await lock.release()

        async with clustershm.AsyncLock("order:42", timeout=5):   # or clustershm.amutex(...)
            ...

    Ownership is per **task** (as ``Lock``'s is per thread): another task of
    the loop, even one running the same code, waits its turn; a task asking
    again for a lock it holds gets :class:`WouldDeadlock` (unless
    ``reentrant=True``). Waiting takes no thread: the acquire is one pipelined
    request on the loop's connection, answered when the Manager grants the
    lock, in FIFO order with every other process's waiters. A task cancelled
    while it waits leaves no lock held and no wait queued. The Manager's
    guarantees are the sync API's: fencing, leases, timeouts decided by the
    Manager, locks freed when the holding process dies.
    """

    _kind = "AsyncLock"

    def __init__(
        self,
        key: str,
        timeout: float | None = None,
        lease: float | None = None,
        *,
        blocking: bool = True,
        reentrant: bool = False,
    ) -> None:
        super().__init__(key, timeout, lease, blocking=blocking, reentrant=reentrant)
        # task -> its hold through this object
        self._holds: weakref.WeakKeyDictionary[asyncio.Task, _Hold] = weakref.WeakKeyDictionary()

    async def acquire(
        self, blocking: bool | None = None, timeout: float | None = None, *, blocking_timeout: float | None = None
    ) -> bool:
        """Wait for the lock; True once held, False if ``timeout`` (or a try)
        failed. ``blocking_timeout``: redis-py's name for ``timeout``."""
        blocking, timeout = self._wanted(blocking, timeout, blocking_timeout)
        client = get_client()
        aio = client.aio
        holds = aio.holds()
        mine = holds.get(self.key)
        if mine is not None and not (await aio.alock_status(self.key, mine.token))[1]:
            del holds[self.key]  # its lease ran out, or its connection went: held no more
            mine = None
        if mine is not None:
            entered = self._enter_again(mine, blocking, "task")
            if entered:
                self._holds[_task()] = mine
            return entered
        granted = await aio.alock_acquire(self.key, self.lease, 0 if not blocking else timeout)
        if granted is None:
            return False
        hold = _Hold(granted[0], granted[1], client)
        holds[self.key] = self._holds[_task()] = hold
        return True

    async def release(self) -> None:
        """Release the lock; LockNotOwned if this task does not hold it (any more)."""
        hold = self._hold()
        hold.depth -= 1
        if hold.depth > 0:
            return
        del self._holds[_task()]
        aio = hold.client.aio
        aio.holds().pop(self.key, None)
        await aio.alock_release(self.key, hold.token)  # LockNotOwned if the lease ran out meanwhile

    async def extend(self, lease: float | None = None) -> None:
        """Restart the lease: ``lease`` seconds from now (default: this lock's lease)."""
        hold = self._hold()
        await hold.client.aio.alock_extend(self.key, hold.token, self.lease if lease is None else lease)

    async def locked(self) -> bool:
        """Whether anyone holds the lock now."""
        return (await get_client().aio.alock_status(self.key))[0]

    async def owned(self) -> bool:
        """Whether this task holds the lock now (False once its lease has run out)."""
        hold = self._mine()
        if hold is None:
            return False
        return (await hold.client.aio.alock_status(self.key, hold.token))[1]

    def _mine(self) -> _Hold | None:
        """This task's hold through this object, if its client still records it."""
        hold = self._holds.get(_task())
        if hold is None:
            return None
        recorded: _Hold | None = hold.client.aio.holds().get(self.key)
        return hold if recorded is hold else None

    @property
    def fence(self) -> int | None:
        """The fencing token of this task's hold: larger for every later grant of the key."""
        hold = self._holds.get(_task())
        return None if hold is None else hold.fence

    @property
    def token(self) -> bytes | None:
        """This task's owner token (None if it holds nothing through this object)."""
        hold = self._holds.get(_task())
        return None if hold is None else hold.token

    def _hold(self) -> _Hold:
        hold = self._mine()
        if hold is None:
            raise LockNotOwned(f"lock {self.key!r} is not held by this task through this AsyncLock")
        return hold

    async def __aenter__(self) -> AsyncLock:
        if not await self.acquire():
            raise LockTimeout(f"lock {self.key!r} not acquired within {self.timeout}s")
        return self

    async def __aexit__(self, *exc) -> None:
        await self.release()


def _task() -> asyncio.Task:
    task = asyncio.current_task()
    if task is None:  # pragma: no cover - a coroutine always runs in a task under asyncio
        raise RuntimeError("AsyncLock is used from a task of a running event loop")
    return task


class amutex(AsyncLock):
    """``async with clustershm.amutex(key, timeout=5, lease=30):`` for async views.

    An :class:`AsyncLock` (native: no thread, however many tasks wait);
    :class:`LockTimeout` if not acquired within ``timeout`` seconds.
    """

    def __init__(
        self, key: str, timeout: float | None = None, lease: float | None = None, *, reentrant: bool = False
    ) -> None:
        super().__init__(key, timeout, lease, reentrant=reentrant)
