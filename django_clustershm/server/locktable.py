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

Memory and the garbage collector (#12). A held lock is one ``bytes`` object
(its holder: session id, pid, fence, since, lease end and token, packed), in
a ``dict`` of key -> holder; what a session holds is a ``dict`` of its keys.
Neither bytes nor a dict of str and bytes is ever tracked by CPython's cycle
collector, so a full collection does not visit 100,000 held locks (it
visited two objects per lock before, a 23-58 ms stall of the Manager's loop;
see :mod:`.gcpolicy`), and a lock costs 96 bytes instead of ~300. Objects
exist only for what waits: a :class:`Waiter` per queued acquire, linked into
its key's :class:`_Queue`, and indexed by its connection's request id, so
that a waiter leaves its queue in O(1) whatever the reason: granted,
cancelled (LOCK_CANCEL), timed out, or its connection closed.
"""

from __future__ import annotations

import heapq
import math
import os
import struct
import time
from collections.abc import Callable, Iterator
from itertools import islice

from ..exceptions import InvalidArgument, LimitExceeded, LockNotOwned
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

INF = math.inf

# -- a holder: one bytes object ---------------------------------------------------------
#
# session id (u64), pid (u64), fence (i64), since (f64), lease end (f64, inf:
# none), then the token. Read with unpack_from (no copy); the token is
# compared with endswith(). A new holder is a new object, so a lease timer
# can tell its holder by identity (an extend replaces it).

_HEAD = struct.Struct("<QQqdd")
_TOKEN_AT = _HEAD.size
_sid_of = struct.Struct("<Q").unpack_from
_lease_of = struct.Struct("<d").unpack_from  # at offset 32
_LEASE_AT = 32


def _holder(sid: int, pid: int, fence: int, since: float, lease_until: float | None, token: bytes) -> bytes:
    return _HEAD.pack(sid, pid, fence, since, INF if lease_until is None else lease_until) + token


def _sid(holder: bytes) -> int:
    return _sid_of(holder)[0]


def _lease_until(holder: bytes) -> float:
    """When the holder's lease ends (inf: it has none)."""
    return _lease_of(holder, _LEASE_AT)[0]


def _owns(holder: bytes, token) -> bool:
    return len(holder) == _TOKEN_AT + TOKEN_SIZE and type(token) is bytes and holder.endswith(token)


class Waiter:
    """One queued acquire: its connection's request ``rid``, in ``key``'s queue until ``done``."""

    __slots__ = ("deadline", "done", "key", "lease", "next", "prev", "rid", "session", "since")

    def __init__(
        self, session, rid: int, lease: float | None, deadline: float | None, since: float = 0.0, key: str = ""
    ) -> None:
        self.session = session
        self.rid = rid
        self.key = key
        self.lease = lease
        self.deadline = deadline
        self.since = since
        #: True once it has left its queue (granted, answered, cancelled, or of a closed session)
        self.done = False
        self.prev: Waiter | None = None
        self.next: Waiter | None = None


class _Queue:
    """A key's waiters, first come first served: a doubly linked list through
    the waiters, so that any of them leaves it in O(1), not only the first."""

    __slots__ = ("head", "size", "tail")

    def __init__(self) -> None:
        self.head: Waiter | None = None
        self.tail: Waiter | None = None
        self.size = 0

    def __len__(self) -> int:
        return self.size

    def append(self, waiter: Waiter) -> None:
        waiter.prev, waiter.next = self.tail, None
        if self.tail is None:
            self.head = waiter
        else:
            self.tail.next = waiter
        self.tail = waiter
        self.size += 1

    def remove(self, waiter: Waiter) -> None:
        before, after = waiter.prev, waiter.next
        if before is None:
            self.head = after
        else:
            before.next = after
        if after is None:
            self.tail = before
        else:
            after.prev = before
        waiter.prev = waiter.next = None  # no cycle is left behind
        self.size -= 1

    def popleft(self) -> Waiter:
        waiter = self.head
        assert waiter is not None
        self.remove(waiter)
        return waiter

    def __iter__(self) -> Iterator[Waiter]:
        waiter = self.head
        while waiter is not None:
            after = waiter.next
            yield waiter
            waiter = after


class LockTable:
    """Every lock of one Manager.

    ``answer(waiter, result)`` is called for each waiter that gets its answer
    later: ``[token, fence]`` when granted, ``None`` when its deadline passed.
    """

    def __init__(self, answer: Callable, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.answer = answer
        self.clock = clock
        #: key -> its holder (see _holder): every held lock, and only those
        self._held: dict[str, bytes] = {}
        #: key -> its waiters, while anyone waits (someone holds it then)
        self._queues: dict[str, _Queue] = {}
        self._timers: list[tuple[float, int, str, object]] = []  # (when, seq, key, waiter|holder)
        self._compacting: list[tuple[float, int, str, object]] = []  # the heap being compacted
        self._seq = 0
        self._compact_at = 1024
        # session id -> {key: None} of the locks it holds (the by-session index)
        self._holds: dict[int, dict[str, None]] = {}
        # session id -> {request id: waiter} of its queued acquires (LOCK_CANCEL's index)
        self._waits: dict[int, dict[int, Waiter]] = {}
        # session id -> {key: None} of keys it holds that someone queued for (a
        # superset: what must be handed over at once when it closes)
        self._contended: dict[int, dict[str, None]] = {}
        # Closed sessions whose holds and waits are still to be visited (see
        # drop_session): session id -> (what is left of its holds, of its
        # waits). A holder or a waiter of one of these sessions is treated as
        # gone wherever it is met.
        self._dropped: dict[int, tuple[dict[str, None], dict[int, Waiter]]] = {}
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
        holder = self._held.get(key)
        if holder is not None:
            holder = self._settle(key, holder, now)  # may hand over, or free the key
        queue = self._queues.get(key)
        if holder is None and queue is None:
            return self._grant(key, session, lease, now)
        if wait is not None and wait <= 0:
            return None
        if session.waiting >= MAX_WAITERS_PER_SESSION:
            raise LimitExceeded(f"this connection already waits for {session.waiting} locks")
        if self.waiting_count >= MAX_WAITERS:
            raise LimitExceeded(f"the Manager already queues {self.waiting_count} lock requests")
        waits = self._waits.get(session.id)
        if waits is None:
            waits = self._waits[session.id] = {}
        elif rid in waits:
            raise InvalidArgument(
                f"request id {rid} of this connection already waits for lock {waits[rid].key!r}; "
                "each request needs its own id"
            )
        waiter = Waiter(session, rid, lease, None if wait is None else now + wait, now, key)
        if queue is None:
            queue = self._queues[key] = _Queue()
        queue.append(waiter)
        waits[rid] = waiter
        session.waiting += 1
        self.waiting_count += 1
        if holder is not None:
            self._contend(_sid(holder), key)
        if waiter.deadline is not None:
            self._timer(waiter.deadline, key, waiter)
        return ...

    def cancel(self, session, key: str, rid: int) -> bool:
        """Take back ``session``'s queued acquire ``rid`` of ``key``: True if it
        was still waiting (it will never be answered now), False if it was
        answered already (a grant then reaches the client, which releases it).

        What an asyncio client does for a task cancelled while it waits: its
        connection is shared with the loop's other tasks, so it cannot be
        dropped to take the wait back, as a blocking client's is. O(1): the
        waiter is found by its request id and unlinked from its queue, however
        long the queue (it was a scan of the queue)."""
        waits = self._waits.get(session.id)
        waiter = waits.get(rid) if waits is not None else None
        if waiter is None or waiter.key != key:
            return False
        self._unqueue(waiter)
        self._forget_wait(waiter)
        return True

    def release(self, key: str, token: bytes) -> bool:
        """Release; True if a waiter was granted the lock, False if it is free now."""
        holder = self._held.get(key)
        if holder is not None:
            holder = self._settle(key, holder, self.clock())
        if holder is None or not _owns(holder, token):
            raise LockNotOwned(f"lock {key!r} is not held with this token (released, expired, or never acquired)")
        return self._hand_over(key, holder)

    def extend(self, key: str, token: bytes, lease: float | None) -> bool:
        now = self.clock()
        holder = self._held.get(key)
        if holder is not None:
            holder = self._settle(key, holder, now)
        if holder is None or not _owns(holder, token):
            raise LockNotOwned(f"lock {key!r} is not held with this token; it cannot be extended")
        lease_until = INF if lease is None else now + lease
        holder = self._held[key] = holder[:_LEASE_AT] + struct.pack("<d", lease_until) + holder[_TOKEN_AT:]
        if lease_until != INF:
            self._timer(lease_until, key, holder)
        return True

    def status(self, key: str, token: bytes | None) -> list:
        holder = self._held.get(key)
        if holder is not None:
            holder = self._settle(key, holder, self.clock())
        return [holder is not None, holder is not None and token is not None and _owns(holder, token)]

    def drop_session(self, session) -> None:
        """The session is gone (its process died): its locks are free, its waits forgotten.

        What a client can see happens now: each lock it held that someone
        waits for goes to the next waiter, every other one is free to the next
        acquire (a holder or waiter of a dropped session counts as gone), and
        the figures no longer count it. Forgetting its holds and taking its
        waiters out of their queues is left to :meth:`sweep`, a bounded number
        at a time. Work here is a step per contended lock."""
        sid = session.id
        holds = self._holds.pop(sid, None)
        waits = self._waits.pop(sid, None)
        contended = self._contended.pop(sid, None)
        if holds is None and waits is None:
            return  # it holds and waits for nothing
        if holds:
            self.held_count -= len(holds)
        self.waiting_count -= session.waiting
        session.waiting = 0
        self._dropped[sid] = (holds or {}, waits or {})  # only sweep() changes them now
        for key in contended or ():
            holder = self._held.get(key)
            if holder is not None and _sid(holder) == sid:
                self._hand_over(key, holder)

    @property
    def sweeping(self) -> int:
        """Dropped sessions whose holds and waits :meth:`sweep` has still to visit."""
        return len(self._dropped)

    def sweep(self, budget: int) -> int:
        """Forget what dropped sessions left, in the order they closed: about
        ``budget`` units of work at most (a waiter taken out of its queue, or
        a key it held). Return the units done (less than ``budget``: nothing is left)."""
        done = 0
        dropped = self._dropped
        while dropped and done < budget:
            sid = next(iter(dropped))
            holds, waits = dropped[sid]
            # Emptied as they go (not iterated, then freed whole): freeing
            # 100k keys at once took 5 ms.
            while waits and done < budget:
                waiter = waits.popitem()[1]
                done += 1
                if not waiter.done:
                    self._unqueue(waiter)
            while holds and done < budget:
                key = holds.popitem()[0]
                done += 1
                holder = self._held.get(key)
                if holder is not None and _sid(holder) == sid:
                    self._hand_over(key, holder)
            if holds or waits:
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
                if type(item) is bytes:  # a lease
                    if self._held.get(key) is item:
                        self._settle(key, item, now)
                elif not item.done:  # type: ignore[attr-defined]
                    self._time_out(item)  # type: ignore[arg-type]
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
        _when, _seq, key, item = timer
        if type(item) is bytes:
            return self._held.get(key) is item  # the same holder, with the same lease
        return not item.done

    def _contend(self, sid: int, key: str) -> None:
        """Someone queued for ``key``, which session ``sid`` holds."""
        keys = self._contended.get(sid)
        if keys is None:
            keys = self._contended[sid] = {}
        keys[key] = None

    def _grant(self, key: str, session, lease: float | None, now: float) -> list:
        holds = self._holds.get(session.id)
        if holds is None:
            holds = self._holds[session.id] = {}
        holds[key] = None
        self.held_count += 1
        self._fence += 1
        token = os.urandom(TOKEN_SIZE)
        lease_until = None if lease is None else now + lease
        holder = self._held[key] = _holder(session.id, session.pid, self._fence, now, lease_until, token)
        self.granted += 1
        if lease_until is not None:
            self._timer(lease_until, key, holder)
        return [token, self._fence]

    def _hand_over(self, key: str, holder: bytes) -> bool:
        """The holder is done: grant the first waiter still waiting, in FIFO order (True if one was)."""
        del self._held[key]
        sid = _sid(holder)
        dropped = self._dropped
        if not dropped or sid not in dropped:  # a dropped one was counted off when it closed
            holds = self._holds.get(sid)
            if holds is not None:
                holds.pop(key, None)
                if not holds:
                    del self._holds[sid]
            self.held_count -= 1
            contended = self._contended.get(sid)
            if contended is not None:
                contended.pop(key, None)  # an empty one stays until the session closes: no churn
        queue = self._queues.get(key)
        if queue is None:
            return False
        now = self.clock()
        while queue.size:
            waiter = queue.popleft()
            waiter.done = True
            if dropped and waiter.session.id in dropped:
                continue  # its session closed: counted off then
            self._forget_wait(waiter)
            if waiter.deadline is not None and waiter.deadline <= now:
                self.timed_out += 1
                self._waited(key, waiter, now, False)
                self.answer(waiter, None)  # its time ran out: never granted afterwards
                continue
            self._waited(key, waiter, now, True)
            self.answer(waiter, self._grant(key, waiter.session, waiter.lease, now))
            if queue.size:
                self._contend(waiter.session.id, key)
            else:
                del self._queues[key]
            return True
        del self._queues[key]
        return False

    def _unqueue(self, waiter: Waiter) -> None:
        """Take ``waiter`` out of its key's queue (O(1)); it is done."""
        queue = self._queues[waiter.key]
        queue.remove(waiter)
        waiter.done = True
        if not queue.size:
            del self._queues[waiter.key]

    def _forget_wait(self, waiter: Waiter) -> None:
        """A live session's wait ended: out of its index and its counts."""
        session = waiter.session
        waits = self._waits.get(session.id)
        if waits is not None and waits.get(waiter.rid) is waiter:
            del waits[waiter.rid]
            if not waits:
                del self._waits[session.id]
        session.waiting -= 1
        self.waiting_count -= 1

    def _time_out(self, waiter: Waiter) -> None:
        self._unqueue(waiter)
        if self._dropped and waiter.session.id in self._dropped:
            return  # its session closed: no answer, counted off then
        self._forget_wait(waiter)
        self.timed_out += 1
        self._waited(waiter.key, waiter, self.clock(), False)
        self.answer(waiter, None)

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

    def _settle(self, key: str, holder: bytes, now: float) -> bytes | None:
        """Before anyone looks at ``key``: a holder whose session closed, or
        whose lease ran out, holds it no more. Returns who holds it now."""
        if self._dropped and _sid(holder) in self._dropped:
            self._hand_over(key, holder)
        elif _lease_until(holder) <= now:
            self.expired_leases += 1
            self._hand_over(key, holder)
        else:
            return holder
        return self._held.get(key)

    # -- introspection --------------------------------------------------------------

    #: Held locks that describe() lists at most (it counts them all).
    DESCRIBE_LIMIT = 100
    #: Keys describe() looks at, at most, to find those (while a closed
    #: session's locks are swept, many of the first may be its own, no longer held).
    DESCRIBE_SCAN = 10_000

    def holder_info(self, key: str) -> dict | None:
        """Who holds ``key`` as the table records it (tests, describe): None if no one."""
        holder = self._held.get(key)
        if holder is None:
            return None
        sid, pid, fence, since, lease_until = _HEAD.unpack_from(holder)
        return {
            "sid": sid,
            "pid": pid,
            "fence": fence,
            "since": since,
            "lease_until": None if lease_until == INF else lease_until,
            "token": holder[_TOKEN_AT:],
        }

    def waiters(self, key: str) -> list[Waiter]:
        """The waiters in ``key``'s queue, in order (tests, describe)."""
        queue = self._queues.get(key)
        return list(queue) if queue is not None else []

    def describe(self) -> dict:
        """Figures, and the first DESCRIBE_LIMIT held locks in detail. A stats()
        call must not stall the loop listing 200,000 locks, nor counting them
        (20 ms): the counts are kept as locks come and go."""
        now = self.clock()
        held: list[dict] = []
        dropped = self._dropped
        queues = self._queues
        for key, holder in islice(self._held.items(), self.DESCRIBE_SCAN):
            sid, pid, fence, since, lease_until = _HEAD.unpack_from(holder)
            if dropped and sid in dropped:
                continue
            queue = queues.get(key)
            waiting = (
                [w for w in islice(queue, self.DESCRIBE_LIMIT) if not (dropped and w.session.id in dropped)]
                if queue is not None
                else []
            )
            held.append(
                {
                    "key": key,
                    "pid": pid,
                    "fence": fence,
                    "held_for": now - since,
                    "lease_left": None if lease_until == INF else lease_until - now,
                    "waiters": [w.session.pid for w in waiting],  # in the order they will be granted
                    "waited": [now - w.since for w in waiting],  # how long each has waited so far
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
