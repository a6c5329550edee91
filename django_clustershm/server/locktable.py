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

A session that closes gives its locks up at once, but the table forgets them
over several ticks (:meth:`LockTable.drop_session`, :meth:`LockTable.sweep`):
releasing 100,000 locks in one go kept the Manager's loop busy for 53 ms.
"""

from __future__ import annotations

import heapq
import os
import time
from collections import deque
from collections.abc import Callable
from itertools import islice

from ..exceptions import LimitExceeded, LockNotOwned
from ..wire.args import TOKEN_SIZE

#: Queued acquires one session may have at once. A blocking client has one
#: per connection; an asyncio client pipelines every task of its event loop
#: on one connection, so thousands may wait there (a waiter costs ~200 B).
MAX_WAITERS_PER_SESSION = 65_536
#: ... and all sessions together: the Manager's lock queues stay bounded
#: whatever the number of connections (about 200 MB at most).
MAX_WAITERS = 1_000_000
#: Timers a compaction of the timer heap moves per new timer, and per tick.
COMPACT_PER_TIMER = 4
COMPACT_PER_TICK = 1024
#: The longest lock waits since the start that describe() lists (the dashboard's "longest waits").
LONGEST_WAITS = 5


class Holder:
    __slots__ = ("fence", "lease_until", "session", "since", "token")

    def __init__(self, session, token: bytes, fence: int, since: float, lease_until: float | None) -> None:
        self.session = session
        self.token = token
        self.fence = fence
        self.since = since
        self.lease_until = lease_until


class Waiter:
    __slots__ = ("deadline", "done", "lease", "rid", "session", "since")

    def __init__(self, session, rid: int, lease: float | None, deadline: float | None, since: float = 0.0) -> None:
        self.session = session
        self.rid = rid
        self.lease = lease
        self.deadline = deadline
        self.since = since
        self.done = False


#: An uncontended key's queue: shared, immutable and not tracked by the
#: garbage collector. A full collection visits every tracked object, and a
#: deque per held lock made it 3 objects a lock (68 ms for 100k locks here,
#: a stall of the Manager's loop); the first waiter gets a real deque.
_NO_QUEUE: deque = ()  # type: ignore[assignment]


class _Key:
    __slots__ = ("holder", "queue")

    def __init__(self) -> None:
        self.holder: Holder | None = None
        self.queue: deque[Waiter] = _NO_QUEUE


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
        self._compacting: list[tuple[float, int, str, object]] = []  # the heap being compacted
        self._seq = 0
        self._compact_at = 1024
        # session id -> {key: how many holds and waits it has there}
        self._refs: dict[int, dict[str, int]] = {}
        # session id -> keys it holds that someone queued for (a superset:
        # what must be handed over at once when it closes)
        self._contended: dict[int, set[str]] = {}
        # Closed sessions whose keys are still to be visited (see drop_session):
        # session id -> what is left of its _refs. A holder or a waiter of one
        # of these sessions is treated as gone wherever it is met.
        self._dropped: dict[int, dict[str, int]] = {}
        self.held_count = 0  # locks held (by sessions not closed)
        self.waiting_count = 0  # queued acquires (of sessions not closed)
        # One counter for all keys: a key's state is forgotten when no one
        # holds or waits for it, and its next fence must still be larger.
        # Fences grow for the Manager's lifetime (the server's).
        self._fence = 0
        self.granted = 0
        self.expired_leases = 0
        self.timed_out = 0
        # The LONGEST_WAITS longest waits that ended (granted or timed out),
        # longest first: [waited, key, pid, granted, wall-clock time it ended].
        self.longest_waits: list[list] = []

    # -- requests ------------------------------------------------------------------

    def acquire(self, session, rid: int, key: str, lease: float | None, wait: float | None):
        """``[token, fence]`` now, ``None`` (not acquired, no wait), or ``...`` (answered later)."""
        now = self.clock()
        state = self._keys.get(key)
        if state is not None:
            self._settle(key, state, now)  # may hand over, or forget the key
            state = self._keys.get(key)
        if state is None:
            state = self._keys[key] = _Key()
        if state.holder is None and not state.queue:
            return self._grant(key, state, session, lease, now)
        if wait is not None and wait <= 0:
            return None
        if session.waiting >= MAX_WAITERS_PER_SESSION:
            raise LimitExceeded(f"this connection already waits for {session.waiting} locks")
        if self.waiting_count >= MAX_WAITERS:
            raise LimitExceeded(f"the Manager already queues {self.waiting_count} lock requests")
        waiter = Waiter(session, rid, lease, None if wait is None else now + wait, now)
        if state.queue is _NO_QUEUE:
            state.queue = deque()
        state.queue.append(waiter)
        session.waiting += 1
        self.waiting_count += 1
        self._ref(session, key)
        if state.holder is not None:
            self._contend(state.holder.session.id, key)
        if waiter.deadline is not None:
            self._timer(waiter.deadline, key, waiter)
        return ...

    def cancel(self, session, key: str, rid: int) -> bool:
        """Take back ``session``'s queued acquire ``rid`` of ``key``: True if it
        was still waiting (it will never be answered now), False if it was
        answered already (a grant then reaches the client, which releases it).

        What an asyncio client does for a task cancelled while it waits: its
        connection is shared with the loop's other tasks, so it cannot be
        dropped to take the wait back, as a blocking client's is."""
        state = self._keys.get(key)
        if state is None:
            return False
        for waiter in state.queue:
            if waiter.rid == rid and waiter.session is session and not waiter.done:
                break
        else:
            return False
        state.queue.remove(waiter)
        waiter.done = True
        session.waiting -= 1
        self.waiting_count -= 1
        self._unref(session, key)
        if state.holder is None and not state.queue:
            del self._keys[key]
        return True

    def release(self, key: str, token: bytes) -> bool:
        """Release; True if a waiter was granted the lock, False if it is free now."""
        state = self._keys.get(key)
        if state is not None:
            self._settle(key, state, self.clock())
        if state is None or state.holder is None or state.holder.token != token:
            raise LockNotOwned(f"lock {key!r} is not held with this token (released, expired, or never acquired)")
        return self._hand_over(key, state)

    def extend(self, key: str, token: bytes, lease: float | None) -> bool:
        state = self._keys.get(key)
        now = self.clock()
        if state is not None:
            self._settle(key, state, now)
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
        self._settle(key, state, self.clock())
        holder = state.holder
        return [holder is not None, holder is not None and token is not None and holder.token == token]

    def drop_session(self, session) -> None:
        """The session is gone (its process died): its locks are free, its waits forgotten.

        What a client can see happens now: each lock it held that someone
        waits for goes to the next waiter, every other one is free to the next
        acquire (a holder or waiter of a dropped session counts as gone), and
        the figures no longer count it. Forgetting its keys is left to
        :meth:`sweep`, a bounded number at a time. Work here is a step per
        contended lock, and one sum in C over all it held."""
        sid = session.id
        refs = self._refs.pop(sid, None)
        if refs is None:
            return  # it held and waited for nothing
        # refs counts a hold once and each wait once: what it held is the
        # rest (a sum in C, 0.5 ms for 100k locks, rather than a count kept
        # on every grant and release).
        self.held_count -= sum(refs.values()) - session.waiting
        self.waiting_count -= session.waiting
        session.waiting = 0
        self._dropped[sid] = refs  # only sweep() changes it now: it left _refs
        for key in self._contended.pop(sid, ()):
            state = self._keys.get(key)
            if state is not None and state.holder is not None and state.holder.session.id == sid:
                self._hand_over(key, state)

    @property
    def sweeping(self) -> int:
        """Dropped sessions whose keys :meth:`sweep` has still to visit."""
        return len(self._dropped)

    def sweep(self, budget: int) -> int:
        """Forget what dropped sessions left, in the order they closed: about
        ``budget`` units of work at most (a key, or a waiter in its queue).
        Return the units done (less than ``budget``: nothing is left)."""
        done = 0
        dropped = self._dropped
        while dropped and done < budget:
            sid = next(iter(dropped))
            left = dropped[sid]
            while left:
                # Emptied as it goes (not iterated, then freed whole): freeing
                # 100k keys at once took 5 ms.
                key = left.popitem()[0]
                done += 1
                state = self._keys.get(key)
                if state is not None:
                    if state.queue:
                        done += len(state.queue)
                        kept: deque[Waiter] = deque()
                        for w in state.queue:
                            if w.session.id == sid:
                                w.done = True  # its timer is stale now
                            else:
                                kept.append(w)
                        state.queue = kept
                    holder = state.holder
                    if holder is not None and holder.session.id == sid:
                        self._hand_over(key, state)
                    elif holder is None and not state.queue:
                        del self._keys[key]
                if done >= budget and left:
                    return done
            del dropped[sid]
        return done

    # -- time -----------------------------------------------------------------------

    def tick(self) -> float | None:
        """Expire leases and waiters that are due; return the next due time."""
        now = self.clock()
        if self._compacting:
            self._compact(COMPACT_PER_TICK)
        for timers in (self._compacting, self._timers):
            while timers and timers[0][0] <= now:
                _, _, key, item = heapq.heappop(timers)
                state = self._keys.get(key)
                if state is None:
                    continue
                if isinstance(item, Waiter):
                    if not item.done:
                        self._time_out(key, state, item)
                else:
                    self._settle(key, state, now)
        if self._compacting:
            return min(self._compacting[0][0], self._timers[0][0]) if self._timers else self._compacting[0][0]
        return self._timers[0][0] if self._timers else None

    # -- internals --------------------------------------------------------------------

    def _timer(self, when: float, key: str, item) -> None:
        self._seq += 1
        heapq.heappush(self._timers, (when, self._seq, key, item))
        if self._compacting:
            self._compact(COMPACT_PER_TIMER)
        elif len(self._timers) > self._compact_at:
            # Timers of released holds, extended leases and answered waiters
            # stay in the heap until their time (each keeping its session
            # alive): drop them once they are most of it. Not in one go
            # (rebuilding 400k timers stalled an extend() 105 ms): a new heap
            # takes the live ones of the old, a few per new timer and per tick,
            # while the old one's due timers still run. Amortized O(log n).
            self._compacting, self._timers = self._timers, []
            self._compact(COMPACT_PER_TIMER)

    def _compact(self, count: int) -> None:
        old, timers, live = self._compacting, self._timers, self._timer_live
        for _ in range(min(count, len(old))):
            timer = heapq.heappop(old)  # the old heap stays a heap: tick() runs its due timers
            if live(timer):
                heapq.heappush(timers, timer)
        if not old:
            self._compact_at = 2 * len(timers) + 1024

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

    def _contend(self, sid: int, key: str) -> None:
        """Someone queued for ``key``, which session ``sid`` holds."""
        keys = self._contended.get(sid)
        if keys is None:
            keys = self._contended[sid] = set()
        keys.add(key)

    def _grant(self, key: str, state: _Key, session, lease: float | None, now: float) -> list:
        self._ref(session, key)
        self.held_count += 1
        self._fence += 1
        holder = Holder(session, os.urandom(TOKEN_SIZE), self._fence, now, None if lease is None else now + lease)
        state.holder = holder
        self.granted += 1
        if holder.lease_until is not None:
            self._timer(holder.lease_until, key, holder)
        return [holder.token, holder.fence]

    def _hand_over(self, key: str, state: _Key) -> bool:
        """The holder is done: grant the first waiter still waiting, in FIFO order (True if one was)."""
        holder = state.holder
        dropped = self._dropped
        if holder is not None:
            sid = holder.session.id
            if not dropped or sid not in dropped:  # a dropped one was counted off when it closed
                self._unref(holder.session, key)
                self.held_count -= 1
                contended = self._contended.get(sid)
                if contended is not None:
                    contended.discard(key)  # an empty set stays until the session closes: no churn
            state.holder = None
        now = self.clock()
        while state.queue:
            waiter = state.queue.popleft()
            if waiter.done:
                continue
            waiter.done = True
            if dropped and waiter.session.id in dropped:
                continue  # its session closed: counted off then
            waiter.session.waiting -= 1
            self.waiting_count -= 1
            self._unref(waiter.session, key)
            if waiter.deadline is not None and waiter.deadline <= now:
                self.timed_out += 1
                self._waited(key, waiter, now, False)
                self.answer(waiter, None)  # its time ran out: never granted afterwards
                continue
            self._waited(key, waiter, now, True)
            self.answer(waiter, self._grant(key, state, waiter.session, waiter.lease, now))
            if state.queue:
                self._contend(waiter.session.id, key)
            return True
        del self._keys[key]
        return False

    def _time_out(self, key: str, state: _Key, waiter: Waiter) -> None:
        if self._dropped and waiter.session.id in self._dropped:
            waiter.done = True  # its session closed: no answer; sweep() takes it out of the queue
            return
        try:
            state.queue.remove(waiter)
        except ValueError:
            return
        waiter.done = True
        waiter.session.waiting -= 1
        self.waiting_count -= 1
        self._unref(waiter.session, key)
        self.timed_out += 1
        self._waited(key, waiter, self.clock(), False)
        self.answer(waiter, None)
        if state.holder is None and not state.queue:
            del self._keys[key]

    def _waited(self, key: str, waiter: Waiter, now: float, granted: bool) -> None:
        """A wait ended: keep it if it is one of the longest (a comparison, mostly).
        One that ran out ended at its deadline, whenever the tick that saw it ran."""
        end = now if granted or waiter.deadline is None else min(now, waiter.deadline)
        waited = end - waiter.since
        longest = self.longest_waits
        if len(longest) < LONGEST_WAITS or waited > longest[-1][0]:
            longest.append([waited, key, waiter.session.pid, granted, time.time()])
            longest.sort(key=lambda entry: entry[0], reverse=True)
            del longest[LONGEST_WAITS:]

    def _settle(self, key: str, state: _Key, now: float) -> None:
        """Before anyone looks at ``key``: a holder whose session closed, or
        whose lease ran out, holds it no more."""
        holder = state.holder
        if holder is None:
            return
        if self._dropped and holder.session.id in self._dropped:
            self._hand_over(key, state)
        elif holder.lease_until is not None and holder.lease_until <= now:
            self.expired_leases += 1
            self._hand_over(key, state)

    # -- introspection --------------------------------------------------------------

    #: Held locks that describe() lists at most (it counts them all).
    DESCRIBE_LIMIT = 100
    #: Keys describe() looks at, at most, to find those (while a closed
    #: session's locks are swept, many of the first may be its own, no longer held).
    DESCRIBE_SCAN = 10_000

    def describe(self) -> dict:
        """Figures, and the first DESCRIBE_LIMIT held locks in detail. A stats()
        call must not stall the loop listing 200,000 locks, nor counting them
        (20 ms): the counts are kept as locks come and go."""
        now = self.clock()
        held: list[dict] = []
        dropped = self._dropped
        for key, state in islice(self._keys.items(), self.DESCRIBE_SCAN):
            holder = state.holder
            if holder is None or (dropped and holder.session.id in dropped):
                continue
            queue = [
                w
                for w in islice(state.queue, self.DESCRIBE_LIMIT)
                if not w.done and not (dropped and w.session.id in dropped)
            ]
            held.append(
                {
                    "key": key,
                    "pid": holder.session.pid,
                    "fence": holder.fence,
                    "held_for": now - holder.since,
                    "lease_left": None if holder.lease_until is None else holder.lease_until - now,
                    "waiters": [w.session.pid for w in queue],  # in the order they will be granted
                    "waited": [now - w.since for w in queue],  # how long each has waited so far
                }
            )
            if len(held) >= self.DESCRIBE_LIMIT:
                break
        return {
            "held": held,
            "held_count": self.held_count,
            "waiting": self.waiting_count,
            "granted": self.granted,
            "expired_leases": self.expired_leases,
            "timed_out": self.timed_out,
            "longest_waits": [
                {"key": key, "pid": pid, "waited": waited, "granted": granted, "at": at}
                for waited, key, pid, granted, at in self.longest_waits
            ],
        }
