"""Near-cache tracking: which process may hold a copy of which key, and what it is sent.

Pure bookkeeping, like :mod:`.subscriptions`. A process's *tracker*
connection (see :mod:`..client.near` for the guarantee this serves) reads a
key with TRACK_GET, which records ``ns -> key -> {tracker id: its push count
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

Memory and the garbage collector (#12): a record is ``ns -> key -> bytes``,
the trackers of the key and their push counts packed as (session id, count)
pairs of two u64, and a tracker's own index is ``ns -> {key: None}``: no
set, tuple key, nested dict per key, or reference to a session. CPython never
tracks such dicts, so a full collection does not visit a million tracked
pairs (a dict per record and a set of tuples per tracker made 65,536 pairs
cost 10-20 ms of every full collection; see :mod:`.gcpolicy`). Trackers are
found by id in :attr:`Tracking.trackers`; a key has few of them (one per
process that read it), so a record is searched with ``bytes.find``.
"""

from __future__ import annotations

import struct
from collections import deque
from typing import Any

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

#: A record's pairs: (tracker session id, its push count when it read the key).
_PAIR = struct.Struct("<QQ")
_ID = struct.Struct("<Q")


def _find(record: bytes, sid: int) -> int:
    """Where ``sid``'s pair starts in ``record``, or -1."""
    pattern = _ID.pack(sid)
    at = record.find(pattern)
    while at >= 0 and at % _PAIR.size:  # matched across two fields: look further
        at = record.find(pattern, at + 1)
    return at


def _without(record: bytes, at: int) -> bytes:
    return record[:at] + record[at + _PAIR.size :]


class Tracking:
    """The records, and the pairs they hold.

    A tracker's session keeps what it may hold in ``session.tracked`` (ns ->
    {key: None}) and how many pairs that is in ``session.tracked_count``. A
    tracker that closes is counted off at once (``session.tracked`` becomes
    None and it leaves :attr:`trackers`: it is never pushed to or counted
    again), and its pairs are forgotten by :meth:`sweep`, a bounded number at
    a time: dropping 65,536 at once kept the Manager's loop busy for 49 ms
    (102 ms when 40 trackers share the keys). Until then a record may name a
    closed tracker; whatever meets one there drops it without a word.
    """

    def __init__(self) -> None:
        # ns -> key -> packed (tracker session id, its push count when it read the key) pairs
        self.records: dict[str, dict[str, bytes]] = {}
        # The live trackers that hold pairs, by session id.
        self.trackers: dict[int, Any] = {}
        # Live pairs: the sum of every live tracker's tracked_count.
        self.pairs = 0
        # Closed trackers, in the order they closed: (session id, what is left of its pairs to visit).
        self._dropped: deque[tuple[int, dict[str, dict[str, None]]]] = deque()

    def __len__(self) -> int:
        """Keys tracked (by one tracker or more)."""
        return sum(len(keys) for keys in self.records.values())

    def has(self, ns: str, key: str) -> bool:
        keys = self.records.get(ns)
        return keys is not None and key in keys

    def trackers_of(self, ns: str, key: str) -> dict[int, int]:
        """{tracker session id: its push count when it read the key} (closed trackers included until swept)."""
        keys = self.records.get(ns)
        record = keys.get(key) if keys is not None else None
        return dict(_PAIR.iter_unpack(record)) if record else {}

    def track(self, tracker, ns: str, key: str) -> bool:
        """Record that ``tracker``'s process may now hold ``key``; False if the table is full."""
        if tracker is None:
            return False
        sid = tracker.id
        keys = self.records.get(ns)
        record = keys.get(key) if keys is not None else None
        at = _find(record, sid) if record is not None else -1
        if at < 0:
            if self.pairs >= MAX_TRACKED or tracker.tracked_count >= MAX_TRACKED_PER_TRACKER:
                return False
            if keys is None:
                keys = self.records[ns] = {}
            mine = tracker.tracked.get(ns)
            if mine is None:
                mine = tracker.tracked[ns] = {}
            mine[key] = None
            tracker.tracked_count += 1
            self.pairs += 1
            self.trackers[sid] = tracker
            keys[key] = (record or b"") + _PAIR.pack(sid, tracker.inval_seq)
        else:  # read again: the push count it holds the key at moves on
            keys[key] = record[:at] + _PAIR.pack(sid, tracker.inval_seq) + record[at + _PAIR.size :]  # type: ignore[index]
        return True

    def changed(self, ns: str, event: int, key, value, deadline_of) -> None:
        """A key of ``ns`` changed (``key`` None: the namespace was cleared).
        ``deadline_of(key)`` gives a written key's deadline."""
        keys = self.records.get(ns)
        if not keys:
            return
        if key is None:
            del self.records[ns]
            cleared: dict[int, None] = {}
            for record_key, record in keys.items():
                for sid, _seq in _PAIR.iter_unpack(record):
                    if self._forget(sid, ns, record_key):
                        cleared[sid] = None
            payload = [ns, None]
            for sid in cleared:
                _invalidate(self.trackers[sid], payload)
        elif event == EVENT_SET:
            self._update(keys, ns, key, value, deadline_of)
        else:
            record = keys.pop(key, b"")
            if not record:
                return
            if not keys:
                del self.records[ns]
            payload = [ns, key]  # one list for every tracker: the Manager encodes it once
            for sid, _seq in _PAIR.iter_unpack(record):
                if self._forget(sid, ns, key):
                    _invalidate(self.trackers[sid], payload)

    def _forget(self, sid: int, ns: str, key: str) -> bool:
        """A pair left the records: out of its tracker's own index (False: the tracker closed)."""
        session = self.trackers.get(sid)
        if session is None:
            return False  # closed: counted off then
        mine = session.tracked[ns]
        del mine[key]
        if not mine:
            del session.tracked[ns]
        session.tracked_count -= 1
        self.pairs -= 1
        return True

    def _update(self, keys: dict, ns: str, key: str, value, deadline_of) -> None:
        record = keys.get(key)
        if not record:
            return
        size = _INT_SIZE if type(value) is int else len(value)
        # One payload list each for every tracker of the change: the Manager
        # encodes a list once, however many trackers it goes to.
        update = [ns, key, value, deadline_of(key)]
        invalidation = [ns, key]
        trackers = self.trackers
        # The record is rebuilt only if a pair leaves it (the common write
        # keeps every tracker: nothing packed, nothing joined).
        left: list[int] | None = None
        for i, (sid, _seq) in enumerate(_PAIR.iter_unpack(record)):
            session = trackers.get(sid)
            if session is not None:
                session.inval_seq += 1
                send = session.invalidate
                if size <= session.push_limit and send is not None and send(F.PUSH_UPDATE, update):
                    continue
                # Too large for it, or refused by the transport (a tracker that
                # lags behind): an invalidation, and the tracking ends.
                self._forget(sid, ns, key)
                if send is not None:
                    send(F.PUSH_INVALIDATE, invalidation)
            # else closed: counted off then
            if left is None:
                left = []
            left.append(i)
        if left is None:
            return
        width = _PAIR.size
        kept = [record[i * width : (i + 1) * width] for i in range(len(record) // width) if i not in left]
        if kept:
            keys[key] = b"".join(kept)
        else:
            del keys[key]
            if not keys:
                del self.records[ns]

    def untrack(self, session, ns: str, key: str, seq: int) -> None:
        """A tracker was pushed a key it no longer holds (evicted from its near
        cache, or dropped there after updates it never read): stop sending it
        that key, unless it read the key again after that push (then it holds
        the newer copy and must stay tracked)."""
        keys = self.records.get(ns)
        if keys is None or key not in keys:
            return
        record = keys[key]
        at = _find(record, session.id)
        if at >= 0 and _ID.unpack_from(record, at + _ID.size)[0] < seq:
            self._forget(session.id, ns, key)
            self._put(keys, ns, key, _without(record, at))

    def _put(self, keys: dict, ns: str, key: str, record: bytes) -> None:
        if record:
            keys[key] = record
        else:
            del keys[key]
            if not keys:
                del self.records[ns]

    def drop_session(self, session) -> None:
        """A tracker closed: it is sent nothing more and its pairs no longer
        count, at once; :meth:`sweep` removes them from the records later."""
        tracked = session.tracked
        session.tracked = None
        self.trackers.pop(session.id, None)
        if tracked:
            self.pairs -= session.tracked_count
            self._dropped.append((session.id, tracked))  # only sweep() changes it now
        session.tracked_count = 0

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
            sid, left = dropped[0]
            while left:
                ns = next(iter(left))
                mine = left[ns]
                # Emptied as it goes (not iterated, then freed whole): freeing
                # 65,536 records at once took 5 ms.
                while mine and done < budget:
                    key = mine.popitem()[0]
                    done += 1
                    keys = records.get(ns)
                    if keys is not None and key in keys:
                        record = keys[key]
                        at = _find(record, sid)
                        if at >= 0:
                            self._put(keys, ns, key, _without(record, at))
                if mine:
                    return done
                del left[ns]
            dropped.popleft()
        return done


def _invalidate(session, payload: list) -> None:
    session.inval_seq += 1
    if session.invalidate is not None:
        session.invalidate(F.PUSH_INVALIDATE, payload)
