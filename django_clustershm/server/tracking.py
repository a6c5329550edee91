"""Near-cache tracking: which process may hold a copy of which key, and what it is sent.

Pure bookkeeping, like :mod:`.subscriptions`. A process's *tracker*
connection (see :mod:`..client.near` for the guarantee this serves) reads a
key with TRACK_GET, which records ``(ns, key) -> {tracker: its push count
then}``. Every change of a recorded key is then pushed to each tracker, in
order, through ``session.invalidate(opcode, payload) -> bool`` (set by the
transport: into the socket at once, or the tracker is shut down):

* a write of a value of at most the tracker's ``push_limit`` bytes: a
  PUSH_UPDATE with the value and its deadline, and the record is kept;
* any other change (delete, touch, expiry, eviction, clear, a larger value,
  or an update the transport refused because the tracker lags): a
  PUSH_INVALIDATE, and the record is forgotten.

Pushes carry no number: each one counts one in ``session.inval_seq``, and
the tracker's process counts the pushes it applies.

Why push values rather than only invalidate (what Redis sends): with N
processes reading a hot key, an invalidation costs each of them a round trip
to read the key again (measured with bench_cache.py at 4 processes and 10%
writes: 23% of gets went to the Manager); an update costs the Manager what
the invalidation did, and no process a miss.
"""

from __future__ import annotations

from collections import deque

from ..wire import frames as F
from ..wire.frames import EVENT_SET

#: What an int counts for against a tracker's push limit.
_INT_SIZE = 8
#: (key, tracker) pairs the Manager keeps at most, all trackers together;
#: beyond, reads are answered untracked (the process does not keep them).
#: Pairs, not keys: 40 trackers x 100k keys used to pass a key cap (+787 MB).
MAX_TRACKED = 1_000_000
#: Pairs one tracker may hold: what its disconnection leaves to clean up
#: (over several ticks: see Tracking.drop_session).
MAX_TRACKED_PER_TRACKER = 65_536
#: Largest value pushed as an update (a larger one is invalidated instead); a
#: tracker may ask for less. Bounded so that a burst of writes fits the
#: tracker's socket buffer (see Manager.tracker_sndbuf).
MAX_PUSH_VALUE = 64 * 1024


class Tracking:
    """The records, and the pairs they hold.

    A tracker that closes is counted off at once (``session.tracked`` becomes
    None: it is never pushed to or counted again), and its pairs are
    forgotten by :meth:`sweep`, a bounded number at a time: dropping 65,536
    at once kept the Manager's loop busy for 49 ms (102 ms when 40 trackers
    share the keys). Until then a record may name a closed tracker; whatever
    meets one there drops it without a word.
    """

    def __init__(self) -> None:
        # (ns, key) -> {tracker session: its push count when it read the key}
        self.records: dict[tuple[str, str], dict] = {}
        # Live pairs: sum of len(trackers) over the records, less the closed
        # trackers' pairs sweep() has still to remove.
        self.pairs = 0
        # Closed trackers, in the order they closed, with what is left of their records to visit.
        self._dropped: deque[tuple[object, set[tuple[str, str]]]] = deque()

    def __len__(self) -> int:
        return len(self.records)

    def track(self, tracker, ns: str, key: str) -> bool:
        """Record that ``tracker``'s process may now hold ``key``; False if the table is full."""
        if tracker is None:
            return False
        record = (ns, key)
        trackers = self.records.get(record)
        if trackers is None or tracker not in trackers:
            if self.pairs >= MAX_TRACKED or len(tracker.tracked) >= MAX_TRACKED_PER_TRACKER:
                return False
            if trackers is None:
                trackers = self.records[record] = {}
            self.pairs += 1
        trackers[tracker] = tracker.inval_seq
        tracker.tracked.add(record)
        return True

    def changed(self, ns: str, event: int, key, value, deadline_of) -> None:
        """A key of ``ns`` changed (``key`` None: the namespace was cleared).
        ``deadline_of(key)`` gives a written key's deadline."""
        if not self.records:
            return
        if key is None:
            cleared: set = set()
            for record in [r for r in self.records if r[0] == ns]:
                for session in self.records.pop(record):
                    if session.tracked is not None:  # else closed: counted off then
                        session.tracked.discard(record)
                        cleared.add(session)
                        self.pairs -= 1
            payload = [ns, None]
            for session in cleared:
                _invalidate(session, payload)
        elif event == EVENT_SET:
            self._update(ns, key, value, deadline_of)
        else:
            trackers = self.records.pop((ns, key), None)
            if trackers:
                payload = [ns, key]  # one list for every tracker: the Manager encodes it once
                for session in trackers:
                    if session.tracked is not None:  # else closed: counted off then
                        self.pairs -= 1
                        session.tracked.discard((ns, key))
                        _invalidate(session, payload)

    def _update(self, ns: str, key: str, value, deadline_of) -> None:
        record = (ns, key)
        trackers = self.records.get(record)
        if not trackers:
            return
        size = _INT_SIZE if type(value) is int else len(value)
        # One payload list each for every tracker of the change: the Manager
        # encodes a list once, however many trackers it goes to.
        update = [ns, key, value, deadline_of(key)]
        invalidation = [ns, key]
        for session in list(trackers):
            if session.tracked is None:  # closed: counted off then
                del trackers[session]
                continue
            session.inval_seq += 1
            send = session.invalidate
            if size <= session.push_limit and send is not None and send(F.PUSH_UPDATE, update):
                continue
            # Too large for it, or refused by the transport (a tracker that
            # lags behind): an invalidation, and the tracking ends.
            del trackers[session]
            self.pairs -= 1
            session.tracked.discard(record)
            if send is not None:
                send(F.PUSH_INVALIDATE, invalidation)
        if not trackers:
            del self.records[record]

    def untrack(self, session, ns: str, key: str, seq: int) -> None:
        """A tracker was pushed a key it no longer holds (evicted from its near
        cache, or dropped there after updates it never read): stop sending it
        that key, unless it read the key again after that push (then it holds
        the newer copy and must stay tracked)."""
        record = (ns, key)
        trackers = self.records.get(record)
        if trackers is not None and trackers.get(session, seq) < seq:
            del trackers[session]
            self.pairs -= 1
            session.tracked.discard(record)
            if not trackers:
                del self.records[record]

    def drop_session(self, session) -> None:
        """A tracker closed: it is sent nothing more and its pairs no longer
        count, at once; :meth:`sweep` removes them from the records later."""
        tracked = session.tracked
        session.tracked = None
        if tracked:
            self.pairs -= len(tracked)
            self._dropped.append((session, tracked))  # only sweep() changes it now

    @property
    def sweeping(self) -> int:
        """Closed trackers whose records :meth:`sweep` has still to visit."""
        return len(self._dropped)

    def sweep(self, budget: int) -> int:
        """Remove closed trackers' pairs, at most ``budget`` of them; return
        how many records were visited (less than ``budget``: nothing is left)."""
        done = 0
        dropped, records = self._dropped, self.records
        while dropped and done < budget:
            session, left = dropped[0]
            while left:
                # Emptied as it goes (not iterated, then freed whole): freeing
                # 65,536 records at once took 5 ms.
                record = left.pop()
                done += 1
                trackers = records.get(record)
                if trackers is not None and trackers.pop(session, None) is not None and not trackers:
                    del records[record]
                if done >= budget and left:
                    return done
            dropped.popleft()
        return done


def _invalidate(session, payload: list) -> None:
    session.inval_seq += 1
    if session.invalidate is not None:
        session.invalidate(F.PUSH_INVALIDATE, payload)
