"""Lock state held by the Manager: fair, leased, fenced, and freed when the holder dies.

Pure data structure with an injected clock, like :mod:`.namespace`. Waiting is
not done here: an acquire that cannot be granted at once leaves a *waiter*
in the key's FIFO queue, and the engine answers that request later, when
:meth:`LockTable.release` (or a lease expiry, or the holder's session
closing) hands the lock over, or when the waiter's own deadline passes.
A waiter whose deadline has passed is never granted: it is removed from the
queue and answered "not acquired" at that moment, by the Manager, so the
client and the Manager cannot disagree about who holds the lock.

Locks live in their own table: no cache eviction, ``clear()`` or store
operation can touch them.
"""

from __future__ import annotations

import heapq
import os
import time
from collections import deque
from collections.abc import Callable

from ..exceptions import LimitExceeded, LockNotOwned
from ..wire.args import TOKEN_SIZE

#: Queued acquires one session may have at once (a blocking client has one).
MAX_WAITERS_PER_SESSION = 1024


class Holder:
    __slots__ = ("fence", "lease_until", "session", "since", "token")

    def __init__(self, session, token: bytes, fence: int, since: float, lease_until: float | None) -> None:
        self.session = session
        self.token = token
        self.fence = fence
        self.since = since
        self.lease_until = lease_until


class Waiter:
    __slots__ = ("deadline", "done", "lease", "rid", "session")

    def __init__(self, session, rid: int, lease: float | None, deadline: float | None) -> None:
        self.session = session
        self.rid = rid
        self.lease = lease
        self.deadline = deadline
        self.done = False


class _Key:
    __slots__ = ("holder", "queue")

    def __init__(self) -> None:
        self.holder: Holder | None = None
        self.queue: deque[Waiter] = deque()


class LockTable:
    """Every lock of one Manager.

    ``answer(waiter, result)`` is called for each waiter that gets its answer
    later: ``[token, fence]`` when granted, ``None`` when its deadline passed.
    """

    def __init__(self, answer: Callable, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.answer = answer
        self.clock = clock
        self._keys: dict[str, _Key] = {}
        self._timers: list[tuple[float, int, str, object]] = []  # (when, seq, key, waiter|holder)
        self._seq = 0
        self._compact_at = 1024
        # session id -> {key: how many holds and waits it has there}
        self._refs: dict[int, dict[str, int]] = {}
        # One counter for all keys: a key's state is forgotten when no one
        # holds or waits for it, and its next fence must still be larger.
        # Fences grow for the Manager's lifetime (the server's).
        self._fence = 0
        self.granted = 0
        self.expired_leases = 0
        self.timed_out = 0

    # -- requests ------------------------------------------------------------------

    def acquire(self, session, rid: int, key: str, lease: float | None, wait: float | None):
        """``[token, fence]`` now, ``None`` (not acquired, no wait), or ``...`` (answered later)."""
        now = self.clock()
        state = self._keys.get(key)
        if state is not None:
            self._expire_lease(key, state, now)  # may hand over, or forget the key
            state = self._keys.get(key)
        if state is None:
            state = self._keys[key] = _Key()
        if state.holder is None and not state.queue:
            return self._grant(key, state, session, lease, now)
        if wait is not None and wait <= 0:
            return None
        if session.waiting >= MAX_WAITERS_PER_SESSION:
            raise LimitExceeded(f"this connection already waits for {session.waiting} locks")
        waiter = Waiter(session, rid, lease, None if wait is None else now + wait)
        state.queue.append(waiter)
        session.waiting += 1
        self._ref(session, key)
        if waiter.deadline is not None:
            self._timer(waiter.deadline, key, waiter)
        return ...

    def release(self, key: str, token: bytes) -> bool:
        """Release; True if a waiter was granted the lock, False if it is free now."""
        state = self._keys.get(key)
        if state is not None:
            self._expire_lease(key, state, self.clock())
        if state is None or state.holder is None or state.holder.token != token:
            raise LockNotOwned(f"lock {key!r} is not held with this token (released, expired, or never acquired)")
        return self._hand_over(key, state)

    def extend(self, key: str, token: bytes, lease: float | None) -> bool:
        state = self._keys.get(key)
        now = self.clock()
        if state is not None:
            self._expire_lease(key, state, now)
        if state is None or state.holder is None or state.holder.token != token:
            raise LockNotOwned(f"lock {key!r} is not held with this token; it cannot be extended")
        holder = state.holder
        holder.lease_until = None if lease is None else now + lease
        if holder.lease_until is not None:
            self._timer(holder.lease_until, key, holder)
        return True

    def status(self, key: str, token: bytes | None) -> list:
        state = self._keys.get(key)
        if state is None:
            return [False, False]
        self._expire_lease(key, state, self.clock())
        holder = state.holder
        return [holder is not None, holder is not None and token is not None and holder.token == token]

    def drop_session(self, session) -> None:
        """The session is gone (its process died): free its locks, forget its waits.

        Work is proportional to the keys this session holds or waits for (an
        index by session), not to every lock of the Manager."""
        for key in self._refs.pop(session.id, ()):
            state = self._keys.get(key)
            if state is None:
                continue
            if state.queue:
                kept = deque(w for w in state.queue if w.session is not session)
                for w in state.queue:
                    if w.session is session:
                        w.done = True
                state.queue = kept
            if state.holder is not None and state.holder.session is session:
                self._hand_over(key, state)
            elif state.holder is None and not state.queue:
                del self._keys[key]
        session.waiting = 0

    # -- time -----------------------------------------------------------------------

    def tick(self) -> float | None:
        """Expire leases and waiters that are due; return the next due time."""
        timers = self._timers
        now = self.clock()
        while timers and timers[0][0] <= now:
            _, _, key, item = heapq.heappop(timers)
            state = self._keys.get(key)
            if state is None:
                continue
            if isinstance(item, Waiter):
                if not item.done:
                    self._time_out(key, state, item)
            else:
                self._expire_lease(key, state, now)
        return timers[0][0] if timers else None

    # -- internals --------------------------------------------------------------------

    def _timer(self, when: float, key: str, item) -> None:
        self._seq += 1
        heapq.heappush(self._timers, (when, self._seq, key, item))
        if len(self._timers) > self._compact_at:
            # Timers of released holds, extended leases and answered waiters
            # stay in the heap until their time (each keeping its session
            # alive): drop them once they are most of it. Amortized O(1).
            self._timers = [t for t in self._timers if self._timer_live(t)]
            heapq.heapify(self._timers)
            self._compact_at = 2 * len(self._timers) + 1024

    def _timer_live(self, timer) -> bool:
        when, _seq, key, item = timer
        if isinstance(item, Waiter):
            return not item.done
        state = self._keys.get(key)
        return isinstance(item, Holder) and state is not None and state.holder is item and item.lease_until == when

    def _ref(self, session, key: str) -> None:
        """``session`` holds or waits for ``key`` once more (the by-session index)."""
        refs = self._refs.get(session.id)
        if refs is None:
            refs = self._refs[session.id] = {}
        refs[key] = refs.get(key, 0) + 1

    def _unref(self, session, key: str) -> None:
        refs = self._refs.get(session.id)
        if refs is None:
            return  # the session is being dropped
        count = refs.get(key, 0) - 1
        if count > 0:
            refs[key] = count
        else:
            refs.pop(key, None)
            if not refs:
                del self._refs[session.id]

    def _grant(self, key: str, state: _Key, session, lease: float | None, now: float) -> list:
        self._ref(session, key)
        self._fence += 1
        holder = Holder(session, os.urandom(TOKEN_SIZE), self._fence, now, None if lease is None else now + lease)
        state.holder = holder
        self.granted += 1
        if holder.lease_until is not None:
            self._timer(holder.lease_until, key, holder)
        return [holder.token, holder.fence]

    def _hand_over(self, key: str, state: _Key) -> bool:
        """The holder is done: grant the first waiter still waiting, in FIFO order (True if one was)."""
        if state.holder is not None:
            self._unref(state.holder.session, key)
        state.holder = None
        now = self.clock()
        while state.queue:
            waiter = state.queue.popleft()
            waiter.session.waiting -= 1
            waiter.done = True
            self._unref(waiter.session, key)
            if waiter.deadline is not None and waiter.deadline <= now:
                self.timed_out += 1
                self.answer(waiter, None)  # its time ran out: never granted afterwards
                continue
            self.answer(waiter, self._grant(key, state, waiter.session, waiter.lease, now))
            return True
        del self._keys[key]
        return False

    def _time_out(self, key: str, state: _Key, waiter: Waiter) -> None:
        try:
            state.queue.remove(waiter)
        except ValueError:
            return
        waiter.done = True
        waiter.session.waiting -= 1
        self._unref(waiter.session, key)
        self.timed_out += 1
        self.answer(waiter, None)
        if state.holder is None and not state.queue:
            del self._keys[key]

    def _expire_lease(self, key: str, state: _Key, now: float) -> None:
        holder = state.holder
        if holder is not None and holder.lease_until is not None and holder.lease_until <= now:
            self.expired_leases += 1
            self._hand_over(key, state)

    # -- introspection --------------------------------------------------------------

    #: Held locks that describe() lists at most (it counts them all).
    DESCRIBE_LIMIT = 100

    def describe(self) -> dict:
        """Figures, and the first DESCRIBE_LIMIT held locks in detail (a stats()
        call must not stall the loop listing 200,000 of them)."""
        now = self.clock()
        held: list[dict] = []
        held_count = waiting = 0
        for key, state in self._keys.items():
            holder = state.holder
            waiting += len(state.queue)
            if holder is None:
                continue
            held_count += 1
            if len(held) < self.DESCRIBE_LIMIT:
                held.append(
                    {
                        "key": key,
                        "pid": holder.session.pid,
                        "fence": holder.fence,
                        "held_for": now - holder.since,
                        "lease_left": None if holder.lease_until is None else holder.lease_until - now,
                        "waiters": [w.session.pid for w in list(state.queue)[: self.DESCRIBE_LIMIT]],
                    }
                )
        return {
            "held": held,
            "held_count": held_count,
            "waiting": waiting,
            "granted": self.granted,
            "expired_leases": self.expired_leases,
            "timed_out": self.timed_out,
        }
