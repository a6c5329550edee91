"""Near caches: worker-local copies of hot keys that stay consistent across processes.

On by default in cluster mode (see :class:`..conf.NearOptions`); per cache
alias ``OPTIONS = {"NEAR_CACHE": {"MAX_ENTRIES": 10000, "MAX_BYTES": 16 *
2**20}}`` or ``False``, and ``CLUSTERSHM = {"NEAR_CACHE": ...}`` for the
shared store. Only in cluster mode: the embedded Manager is in-process already.

**The guarantee.** A read answered from a near cache never returns a value
older than a write that completed, in any process, before the read began.
Why it holds (the Manager's side is :mod:`..server.stamps`):

1. A read that misses asks the Manager with TRACK_GET, which answers the
   value, the key's *bucket* and the *stamp* that bucket holds.
2. Every change of a key (a write, delete, touch, eviction, expiry, clear,
   in any process) makes the Manager store a new stamp in the key's bucket,
   in a file every process maps read-only, *before* it replies to the request
   that made the change.
3. A copy answers only while its bucket still holds the stamp it was filled
   with: one read of shared memory per hit, no system call, no message.
4. A fill races nothing: the stamp it keeps was read in the same step of the
   Manager's loop as the value, so a change after it moved the bucket on.

A Manager that goes away marks its file dead, and so does one that takes over
the address of a dead one: every copy stops answering.

**What it costs.** A write costs the Manager one store whatever the number of
processes holding its key, and the Manager keeps nothing per process or per
copy (#19 part 3: with per-process records and pushed updates, a write held
by 8 processes cost 7.9x one held by none, back to back). A process holding a
key that another writes reads it again at its next read (a miss), as with
Redis's client-side caching; a write of another key of the same bucket costs
it a miss too (rare: see :mod:`..server.stamps`). A process's own write
leaves nothing for its next read to wait for.

A copy is kept with its expiry, computed from the moment the request was
sent (so never later than the Manager's; CLOCK_MONOTONIC is the same in every
process). The copies are bounded by entries and bytes (LRU).
Values are kept serialized (pickled by default): every hit returns a fresh
object. A value its cache alias compressed (``COMPRESSOR``) is kept
*decompressed*: the copy is made once per fill, and a hit then costs
what a raw value's does. Measured on a 100 KiB HTML page (zlib: 17.9 KB
stored): a hit took 12 us from a decompressed copy against 249 us from a
compressed one (950 us with lzma), slower than asking the Manager; the price
is memory (the copy counts its decompressed size against MAX_BYTES).

A fork, a lost Manager or a lost tracker channel empties the near caches of
the process; the next miss opens a new channel and maps the new file.

The tracker's channel (a :class:`~.transport.Channel`, one per process)
carries the process's RECENT reports of its hits; the reads are transport
calls: the near cache uses nothing but the transport seam. The Redis
engine's tracker (:mod:`..redisengine.near`) keeps the same copies valid by
Redis's invalidation pushes instead of stamps.
"""

from __future__ import annotations

import copy
import itertools
import logging
import mmap
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from ..exceptions import ClusterShmError
from ..wire import frames as P
from .transport import Channel, Transport

logger = logging.getLogger("django_clustershm.near")

_INT_SIZE = 8
#: "adaptive": misses between two weighings of a near cache's copies (see NearCache._judge).
JUDGE_EVERY = 256
#: "adaptive": seconds a near cache keeps no copies once they cost more than they saved
#: (doubled at each rest that follows a rest at once, up to MAX_REST_FOR).
REST_FOR = 2.0
MAX_REST_FOR = 32.0
#: Seconds between two reports of a near cache's hits to the Manager (RECENT).
RECENT_EVERY = 0.25
#: What :meth:`NearCache._local` answers for a miss the policy reads untracked.
_UNTRACKED = object()
_INF = float("inf")
_SLOT_WORDS = P.SLOT_SIZE // 8


def _expanded(data: bytes) -> bytes:
    """A compressed value's serialization (kept as it is if it cannot be decompressed here)."""
    from ..compressors import expand

    try:
        return bytes(expand(data))
    except Exception:
        return data


class NearCache:
    """The local copies of one namespace (a cache LOCATION, or "" for the store).

    ``policy`` says which keys get copies. "always": every key read (each
    miss keeps a copy). "adaptive", the default: a key read for the first
    time is read without keeping a copy and remembered among the last
    ``max_entries`` such keys; a second miss of it while it is remembered
    keeps a copy, if a copy kept at the first read would have answered it:
    the first read noted the stamp of the key's bucket, and the bucket must
    hold it still (see :meth:`_admit`). So a key read once (a page of a long
    tail, a scan) does not evict a hot copy from the local budget (TinyLFU's
    doorkeeper), and a key written between each two reads here costs no
    fills that nothing would read. A key whose copy was invalidated (written,
    deleted, touched, expired in the Manager) after it answered a read is
    remembered, so its next miss keeps a copy again; one invalidated before
    it answered anything goes back to a first read. Every
    :data:`JUDGE_EVERY` misses the copies are weighed (see :meth:`_judge`).

    ``clock`` gives the copies' deadlines their time: CLOCK_MONOTONIC, the
    Manager's own (a test may pass another)."""

    def __init__(
        self,
        tracker: Tracker,
        ns: str,
        max_entries: int = 2_000,
        max_bytes: int = 4 * 2**20,
        *,
        policy: str = "adaptive",
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.tracker = tracker
        self.clock = clock
        self.ns = ns
        self.max_entries = int(max_entries)
        self.max_bytes = int(max_bytes)
        self.policy = policy
        # key -> [data, deadline, size, stamp, answered]; stamp: (bucket, the
        # stamp it held at the fill, the key's value slot or -1, the slot's
        # token), or None for a copy its tracker keeps valid by invalidations;
        # answered: whether the copy answered a read since its fill.
        self._entries: OrderedDict[str, list] = OrderedDict()
        # "adaptive": keys read once (and not kept), oldest first, at most
        # max_entries of them: a second miss while a key is here keeps a copy
        # (if its mark, the (bucket, stamp) its first read saw, still holds).
        # An OrderedDict, not a dict: forgetting the oldest of a full dict
        # (del d[next(iter(d))]) scans the holes its earlier deletions left
        # at the front, 1.5 us a first read on average and 4.6 us measured in
        # _local; popitem(last=False) on the linked order is O(1) (0.4 us).
        self._seen: OrderedDict[str, tuple[int, int] | None] | None = OrderedDict() if policy == "adaptive" else None
        self.bytes = 0
        self.hits = 0
        self.misses = 0
        self.untracked = 0  # misses read without keeping a copy (the policy's first reads)
        self.invalidated = 0  # copies found stale or invalidated (changed in the Manager)
        self.refreshed = 0  # stale copies refilled from their key's value slot (counted in hits too)
        self.declined = 0  # "adaptive": second reads not kept, the key having changed since the first
        # "adaptive": when the copies were last weighed (see _judge), and until when they rest.
        self._judge_at = JUDGE_EVERY
        self._judged = (0, 0)
        self._resting = 0.0
        self._rest_for = REST_FOR
        self.rests = 0
        # Reads while resting, which skip the lock and the copies (see get):
        # counted by a C-level counter, which threads cannot lose counts of.
        self._rest_reads = itertools.count()
        # Keys hit since the last RECENT report, and how many hits (see _hit).
        self._recent: dict[str, None] = {}
        self._recent_hits = 0
        self._report_due = 0.0

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def rest_reads(self) -> int:
        """Reads made while resting: misses read plainly, not counted in ``misses``."""
        return next(copy.copy(self._rest_reads))

    def _rests_now(self) -> bool:
        """Whether this read is one of a rest's (no lock: a float read, and a
        C-level count). While the copies rest, a read costs what a plain one
        does, plus this."""
        resting = self._resting
        if resting and self.clock() < resting:
            next(self._rest_reads)
            return True
        return False

    # -- under the tracker's lock ---------------------------------------------------

    def _lookup(self, key: str):
        entry = self._entries.get(key)
        if entry is None:
            return None
        stamp = entry[3]
        refreshed = False
        if stamp is not None:
            stamps = self.tracker.stamps
            now = stamps[stamp[0]] if stamps is not None else None
            if now != stamp[1]:
                # Changed in the Manager since the fill (or a key of the same
                # bucket did): the new value from the key's slot, if it has one.
                refreshed = stamp[2] >= 0 and now is not None and self._refresh(key, entry, now)
                if not refreshed:
                    self._invalidated(key, entry)
                    return None
        if entry[1] is not None and entry[1] <= self.clock():
            self._drop(key)
            return None
        self._entries.move_to_end(key)
        entry[4] = True
        if refreshed and self.bytes > self.max_bytes:
            self._shrink()  # (the refreshed copy is the newest: it goes last)
        return entry[0]

    def _refresh(self, key: str, entry: list, now: int) -> bool:
        """Refill ``entry`` from its key's value slot; ``now``: the stamp its
        bucket holds, read *before* the slot (so the value read is at least
        as new as it: see :mod:`..server.stamps`). False: the slot is no longer
        the key's, or was being written; the copy goes and the read asks the Manager."""
        _, _, slot, token = stamp = entry[3]
        read = self.tracker.read_slot(slot, token)
        if read is None:
            return False
        data, deadline = read
        if type(data) is bytes and data[:1] == b"\xc1":
            data = _expanded(data)
        size = len(key) + (len(data) if type(data) is bytes else _INT_SIZE)
        if size > self.max_bytes:
            return False
        self.bytes += size - entry[2]
        entry[0] = data
        entry[1] = None if deadline == _INF else deadline
        entry[2] = size
        entry[3] = (stamp[0], now, slot, token)
        self.refreshed += 1
        self.tracker.count_read(slot)
        if self.tracker.reports_recent and self.clock() >= self._report_due:
            # The Manager frees a slot whose key no fill or report named for
            # SLOT_IDLE seconds: a process that reads a key only from its slot
            # says so at least every RECENT_EVERY (not only every 64 hits).
            self._recent[key] = None
            self._report()
        return True

    def _drop(self, key: str) -> None:
        entry = self._entries.pop(key, None)
        if entry is not None:
            self.bytes -= entry[2]

    def _admit(self, key: str) -> bool:
        """A miss of ``key``: whether to keep a copy of what it reads (see the
        policy above). A key remembered with a mark (the ``(bucket, stamp)``
        its first read saw) is kept only if its bucket holds that stamp
        still: a copy kept then would have answered now. If it moved, the key
        changed in between (or, rarely, another key of its bucket did): this
        read is *declined*, read as a first read again, and leaves a new mark.
        This is what keeps a key written in every other process between two
        reads here (10/90 on 16 workers) from costing a fill per read."""
        seen = self._seen
        if seen is None:
            return True
        if self.misses >= self._judge_at:
            self._judge()
        if self._resting:
            if self.clock() < self._resting:
                return False
            self._resting = 0.0
        if key in seen:
            mark = seen.pop(key)
            if mark is None:
                return True
            # Would a copy kept at the last read still answer? Only if its
            # bucket still holds the stamp it held then (see _remember_first).
            stamps = self.tracker.stamps
            if stamps is not None and stamps[mark[0]] == mark[1]:
                return True
            self.declined += 1
        self._remember_seen(key)
        return False

    def _judge(self) -> None:
        """Every :data:`JUDGE_EVERY` misses, weigh the copies' invalidations
        (each a change elsewhere, or here, of a key this process held: a fill
        wasted) and the declined second reads (each a fill that would have
        been wasted) against their hits since the last time. More of those
        than hits: the namespace is written more often than its copies are
        read, and keeping them only costs this process the fills (and its
        first reads their marks); the copies
        are dropped and keys are read plainly for :data:`REST_FOR` seconds,
        then kept again from their second read. A namespace that must rest
        again at the first weighing after a rest rests twice as long (up to
        :data:`MAX_REST_FOR`): each return costs JUDGE_EVERY misses' worth of
        fills and bookkeeping, which a namespace that stays write-heavy
        (16 workers on 2 CPUs, where a copy is stale before its worker reads
        it again) then pays less often."""
        wasted_now = self.invalidated + self.declined
        hits, wasted = self.hits - self._judged[0], wasted_now - self._judged[1]
        self._judged = (self.hits, wasted_now)
        self._judge_at = self.misses + JUDGE_EVERY
        if wasted >= JUDGE_EVERY // 8 and wasted > hits:
            self._resting = self.clock() + self._rest_for
            self._rest_for = min(self._rest_for * 2, MAX_REST_FOR)
            self.rests += 1
            self._entries.clear()
            self.bytes = 0
            self._seen.clear()  # type: ignore[union-attr]
        else:
            self._rest_for = REST_FOR

    def _remember_seen(self, key: str) -> None:
        seen = self._seen
        if seen is not None:
            seen[key] = None
            if len(seen) > self.max_entries:
                seen.popitem(last=False)

    def _put(self, key: str, data, deadline, stamp: tuple[int, int, int, int] | None = None) -> None:
        if type(data) is memoryview:
            # A big value, read in place from its reply's buffer (..wire.frames.decode_reply):
            # copied only if it may be kept (a view would hold the whole buffer, uncounted).
            if len(key) + len(data) > self.max_bytes:
                self._drop(key)
                return
            data = bytes(data)
        if type(data) is bytes and data[:1] == b"\xc1":
            data = _expanded(data)
        self._drop(key)  # first: a value too large to keep must not leave the old one behind
        size = len(key) + (len(data) if type(data) is bytes else _INT_SIZE)
        if size > self.max_bytes:
            return
        self._entries[key] = [data, deadline, size, stamp, False]
        self.bytes += size
        self._shrink()

    def _shrink(self) -> None:
        while len(self._entries) > self.max_entries or self.bytes > self.max_bytes:
            old = self._entries.popitem(last=False)[1][2]
            self.bytes -= old

    def invalidate(self, key) -> None:
        """``key`` changed in the Manager (None: every key): its copy goes."""
        if key is None:
            self.drop_all()
        else:
            entry = self._entries.get(key)
            if entry is not None:
                self._invalidated(key, entry)

    def _invalidated(self, key: str, entry: list) -> None:
        """``key``'s copy went stale: it goes. If it answered a read since its
        fill, the key's next miss keeps a copy again. If not, the fill was
        wasted (the key changed before a read here used it), and the key's
        next read is a first read again (see :meth:`_admit`)."""
        self.invalidated += 1
        self._drop(key)
        if entry[4]:
            self._remember_seen(key)

    def drop_all(self) -> None:
        self._entries.clear()
        self.bytes = 0
        if self._seen is not None:
            self._seen.clear()

    # -- reads ------------------------------------------------------------------------

    def get(self, key: str):
        """The stored data (bytes or int) of ``key``, or None if it is missing."""
        if self._resting and self._rests_now():
            return self.tracker.fetch_untracked(self.ns, key)
        data = self._local(key)
        if data is not None and data is not _UNTRACKED:
            return data
        if data is _UNTRACKED:
            sid, sent_at = self.tracker.sid, self.clock()
            if sid is None:  # a first read opens no channel: read plainly (see _remember_first)
                return self._remember_first(
                    key, None, sent_at, self.tracker.fetch_untracked(self.ns, key), None, None, False
                )
            return self._remember_first(key, sid, sent_at, *self.tracker.fetch_first(self.ns, key, sid))
        sid, sent_at = self.tracker.session_id(), self.clock()
        return self._remember(key, sid, sent_at, *self.tracker.fetch(self.ns, key, sid))

    async def aget(self, key: str, acall) -> Any:
        """:meth:`get` for the asyncio client: a miss is read with ``await acall(...)``.

        The local part never blocks: the tracker's lock is only held around
        dict operations. (The channel itself is opened once per process, at the first miss.)"""
        if self._resting and self._rests_now():
            return await self.tracker.afetch_untracked(acall, self.ns, key)
        data = self._local(key)
        if data is not None and data is not _UNTRACKED:
            return data
        if data is _UNTRACKED:
            sid, sent_at = self.tracker.sid, self.clock()
            if sid is None:  # a first read opens no channel: read plainly (see _remember_first)
                data = await self.tracker.afetch_untracked(acall, self.ns, key)
                return self._remember_first(key, None, sent_at, data, None, None, False)
            reply = await self.tracker.afetch_first(acall, self.ns, key, sid)
            return self._remember_first(key, sid, sent_at, *reply)
        sid, sent_at = self.tracker.session_id(), self.clock()
        return self._remember(key, sid, sent_at, *await self.tracker.afetch(acall, self.ns, key, sid))

    def _local(self, key: str):
        """The local copy's data; on a miss None (read it and keep a copy) or
        ``_UNTRACKED`` (the policy keeps no copy of it yet: read it plainly)."""
        tracker = self.tracker
        with tracker.lock:
            if tracker.drain(self.ns):
                data = self._lookup(key)
                if data is not None:
                    self.hits += 1
                    if tracker.reports_recent:
                        self._hit(key)
                    return data
            self.misses += 1  # counted under the lock: threads share the figures
            tracker.check_alive()
            if self._recent and self.clock() >= self._report_due:
                self._report()
            if self._seen is not None and not self._admit(key):
                return _UNTRACKED  # (counted in untracked by _remember_first, unless it keeps a copy)
        return None

    def _hit(self, key: str) -> None:
        """A hit the Manager should hear of (under the tracker's lock): its
        cache's LRU order and hit rate would otherwise be blind to the reads
        served here, and a key hot in the workers could look cold there and be
        evicted first. Reported with RECENT (no reply) when :data:`RECENT_EVERY`
        seconds have passed (looked at every 64 hits, and at each miss), or
        when :data:`~..wire.frames.MAX_RECENT` distinct keys were hit."""
        recent = self._recent
        recent[key] = None
        self._recent_hits += 1
        if len(recent) >= P.MAX_RECENT or (not self._recent_hits & 63 and self.clock() >= self._report_due):
            self._report()

    def _report(self) -> None:
        channel = self.tracker.channel
        if channel is not None:
            try:
                channel.post(P.RECENT, [self.ns, self._recent_hits, list(self._recent)])
            except ClusterShmError:
                pass  # the channel is lost: the next miss opens another
        self._recent = {}
        self._recent_hits = 0
        self._report_due = self.clock() + RECENT_EVERY

    def _remember(self, key: str, sid, sent_at: float, data, ttl, seq, tracked):
        """Keep what a miss read, if its tracker says the copy may be kept."""
        if data is not None and tracked:
            tracker = self.tracker
            with tracker.lock:
                stamp = tracker.fill(sid, seq, tracked)
                if stamp is not False:
                    self._put(key, data, None if ttl is None else sent_at + ttl, stamp)
        return data

    def _remember_first(self, key: str, sid, sent_at: float, data, ttl, seq, tracked, mark=None):
        """What a first read (which the policy keeps no copy of) read: kept
        all the same if ``tracked`` (the key has a value slot, so another
        process reads it through its near cache: it is hot in the cluster).
        A process whose near caches have kept nothing yet has no channel,
        and its first reads do not open one: they are plain reads."""
        tracker = self.tracker
        with tracker.lock:
            if data is not None and tracked:
                stamp = tracker.fill(sid, seq, tracked)
                if stamp is not False:
                    self._put(key, data, None if ttl is None else sent_at + ttl, stamp)
                    if self._seen is not None:
                        self._seen.pop(key, None)
                    return data
            if mark is not None and sid == tracker.sid:
                self._mark(key, mark)
            self.untracked += 1
        return data

    def _mark(self, key: str, mark: tuple[int, int]) -> None:
        """A first read of ``key`` found its bucket holding ``mark[1]``: its
        next read keeps a copy only if the bucket holds it still (see :meth:`_admit`)."""
        seen = self._seen
        if seen is not None and key in seen:
            seen[key] = mark

    def get_many(self, keys: list) -> dict:
        if self._resting and self._rests_now():
            return self.tracker.fetch_many_untracked(self.ns, keys)
        found, missing, track = self._local_many(keys)
        if not missing:
            return found
        if not track:
            sid, sent_at = self.tracker.sid, self.clock()
            if sid is None:  # first reads open no channel: read plainly
                fetched = {k: (v, None) for k, v in self.tracker.fetch_many_untracked(self.ns, missing).items()}
                return self._remember_many(found, None, sent_at, fetched, None, False, first=len(missing))
            fetched, seq, tracked, marks = self.tracker.fetch_many_first(self.ns, missing, sid)
            return self._remember_many(found, sid, sent_at, fetched, seq, tracked, first=len(missing), marks=marks)
        sid, sent_at = self.tracker.session_id(), self.clock()
        reply = self.tracker.fetch_many(self.ns, missing, sid)
        return self._remember_many(found, sid, sent_at, *reply)

    async def aget_many(self, keys: list, acall) -> dict:
        """:meth:`get_many` for the asyncio client."""
        if self._resting and self._rests_now():
            return await self.tracker.afetch_many_untracked(acall, self.ns, keys)
        found, missing, track = self._local_many(keys)
        if not missing:
            return found
        if not track:
            sid, sent_at = self.tracker.sid, self.clock()
            if sid is None:  # first reads open no channel: read plainly
                plain = await self.tracker.afetch_many_untracked(acall, self.ns, missing)
                fetched = {k: (v, None) for k, v in plain.items()}
                return self._remember_many(found, None, sent_at, fetched, None, False, first=len(missing))
            fetched, seq, tracked, marks = await self.tracker.afetch_many_first(acall, self.ns, missing, sid)
            return self._remember_many(found, sid, sent_at, fetched, seq, tracked, first=len(missing), marks=marks)
        sid, sent_at = self.tracker.session_id(), self.clock()
        reply = await self.tracker.afetch_many(acall, self.ns, missing, sid)
        return self._remember_many(found, sid, sent_at, *reply)

    def _local_many(self, keys: list) -> tuple[dict, list, bool]:
        tracker = self.tracker
        found = {}
        missing = []
        with tracker.lock:
            live = tracker.drain(self.ns)
            for key in keys:
                data = self._lookup(key) if live else None
                if data is None:
                    missing.append(key)
                else:
                    found[key] = data
            self.hits += len(found)
            self.misses += len(missing)
            if missing:
                tracker.check_alive()
            if found and tracker.reports_recent:
                for key in found:
                    self._hit(key)
            if missing and self._seen is not None:
                # One request either way: kept if any missing key is admitted
                # (keys asked for together are usually read together again), else plain.
                admitted = [self._admit(key) for key in missing]
                if not any(admitted):
                    return found, missing, False  # (first reads: see _remember_many)
        return found, missing, True

    def _remember_many(
        self, found: dict, sid, sent_at: float, fetched: dict, seq, tracked, first: int = 0, marks=None
    ) -> dict:
        """``tracked``: true (every key's copy is kept valid by invalidations), a
        dict of each key's stamp, or false (keep nothing). ``first``: these
        were the first reads of that many keys (see :meth:`_remember_first`):
        only the keys ``tracked`` names are kept, the others count as untracked."""
        tracker = self.tracker
        with tracker.lock:
            stamps = tracker.fill(sid, seq, tracked) if tracked else False
            kept = 0
            for key, (data, ttl) in fetched.items():
                found[key] = data
                if stamps is not False:
                    stamp = stamps.get(key) if type(stamps) is dict else None
                    if first and stamp is None:
                        continue
                    self._put(key, data, None if ttl is None else sent_at + ttl, stamp)
                    if first:
                        kept += 1
                        if self._seen is not None:
                            self._seen.pop(key, None)
            self.untracked += first - kept
            if marks and sid == tracker.sid:
                for key, mark in marks.items():
                    self._mark(key, mark)
        return found


class Tracker:
    """The process's near caches on one Manager: the stamps file it maps, and its channel.

    ``stamps`` is the Manager's file as 8-byte words, mapped read-only (None
    until the first miss connects, and after the channel or the Manager is
    lost: then no copy answers, and there are none)."""

    #: Whether the near caches tell the Manager what they hit (RECENT).
    reports_recent = True

    def __init__(self, transport: Transport) -> None:
        self.transport = transport
        self.lock = threading.Lock()
        self.channel: Channel | None = None
        #: Moves at each connection: a miss read on an earlier one is not kept.
        self.sid: int | None = None
        self._connections = 0
        self.caches: dict[str, NearCache] = {}
        self._stamps_map: mmap.mmap | None = None
        self.stamps: memoryview | None = None
        #: The file's value slots (see :meth:`read_slot`): as bytes, 8-byte words, float64s and int64s.
        self._slots: tuple[memoryview[Any], ...] | None = None
        #: The slots' read counts, mapped writable (see :meth:`count_read`), and their map.
        self._reads: memoryview[int] | None = None
        self._reads_map: mmap.mmap | None = None
        self.generation = 0

    def near_cache(
        self, ns: str, max_entries: int, max_bytes: int, consistency: str | None = None, policy: str = "adaptive"
    ) -> NearCache:
        """``ns``'s near cache (``consistency``: a Manager's copies are always strict)."""
        cache = self.caches.get(ns)
        if cache is None:
            cache = self.caches[ns] = NearCache(self, ns, max_entries, max_bytes, policy=policy)
        return cache

    def session_id(self) -> int | None:
        """The connection a miss is read on, connecting first if needed. (No
        lock while connected: :meth:`fill` checks, under the lock, that it is
        still the same one and that its file is alive.)"""
        sid = self.sid
        if sid is not None:
            return sid
        with self.lock:
            if self.channel is None:
                self._connect()
            return self.sid

    def _connect(self) -> None:
        channel = self.transport.open_channel()
        try:
            body = channel.request(P.TRACKER, [], self.transport.timeout)
        except BaseException:
            channel.close()
            raise
        self._connections += 1
        self.channel, self.sid = channel, self._connections
        self._map_stamps(body[1] if len(body) >= 2 else 0)

    def _map_stamps(self, generation: int) -> None:
        """Map the Manager's stamps file read-only and check it is the one
        TRACKER named (its generation); without it no copy is kept and every
        read asks the Manager."""
        path = self.transport.stamps_file
        if path is None or not generation:
            return
        reads_map = None
        try:
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW)
            try:
                if os.fstat(fd).st_uid != os.getuid():
                    return  # not the Manager's (which runs as this user: the handshake checked)
                # Read-only but for the slots' read counts: a bug here cannot corrupt a stamp.
                stamps_map = mmap.mmap(fd, 0, prot=mmap.PROT_READ)
                if os.fstat(fd).st_size >= P.SLOT_READS_OFFSET + P.SLOTS * 8:
                    reads_map = mmap.mmap(fd, P.SLOTS * 8, offset=P.SLOT_READS_OFFSET)
            finally:
                os.close(fd)
        except (OSError, ValueError) as exc:
            logger.warning("near caches keep no copies: cannot map %s: %s", path, exc)
            return
        stamps = memoryview(stamps_map).cast("Q")
        if len(stamps) <= P.STAMP_BUCKETS or stamps[P.STAMP_BUCKETS] != generation:
            stamps.release()
            stamps_map.close()
            if reads_map is not None:
                reads_map.close()
            return
        self._stamps_map, self.stamps, self.generation = stamps_map, stamps, generation
        if reads_map is not None:
            region = memoryview(stamps_map)[P.SLOTS_OFFSET : P.SLOT_READS_OFFSET]
            self._slots = (region, region.cast("Q"), region.cast("d"), region.cast("q"))
            self._reads_map, self._reads = reads_map, memoryview(reads_map).cast("Q")

    def count_read(self, slot: int) -> None:
        """This process took a value from ``slot``: one more read in its count,
        which the Manager weighs against its rewrites (see :mod:`..server.stamps`)."""
        reads = self._reads
        if reads is not None:
            reads[slot] += 1

    def read_slot(self, slot: int, token: int) -> tuple | None:
        """``(data, deadline)`` of value slot ``slot`` if it still holds the
        value of the key whose fill gave ``token`` (a seqlock's reader: the
        Manager writes the slot between two moves of ``seq``; see
        :mod:`..server.stamps`), else None (no lock: shared memory only)."""
        views = self._slots
        if views is None:
            return None
        region, words, floats, ints = views
        base = slot * _SLOT_WORDS
        seq = words[base]
        if seq & 1 or words[base + 1] != token:
            return None
        deadline = floats[base + 2]
        meta = words[base + 3]
        kind = meta >> 32
        if kind == 1:
            n = meta & 0xFFFFFFFF
            if n > P.SLOT_PAYLOAD:
                return None
            start = slot * P.SLOT_SIZE + 32
            data: bytes | int = region[start : start + n].tobytes()
        elif kind == 2:
            data = ints[base + 4]
        else:
            return None
        if words[base] != seq:
            return None
        return data, deadline

    def _unmap_stamps(self) -> None:
        # Every view first, then the maps they are views of.
        for view in (*reversed(self._slots or ()), self._reads, self.stamps):
            if view is not None:
                view.release()
        for mapped in (self._reads_map, self._stamps_map):
            if mapped is not None:
                mapped.close()
        self._slots = self._reads = self.stamps = None
        self._reads_map = self._stamps_map = None

    # -- how misses travel (the Redis engine's tracker reads them on its tracking connection) --

    def fetch(self, ns: str, key: str, sid) -> tuple:
        """A miss: ``(data, ttl, seq, tracked)``, passed to :meth:`fill` to
        keep the copy. Here ``seq`` is unused and ``tracked`` the key's
        ``(bucket, stamp, slot, token)``."""
        value, ttl, bucket, stamp, slot, token = self.transport.call(P.TRACK_GET, [ns, key])
        return value, ttl, None, (bucket, stamp, _slot(slot), token)

    def fetch_many(self, ns: str, keys: list, sid) -> tuple:
        """Misses of several keys: ``({key: (data, ttl)}, seq, tracked)``
        (here ``tracked`` is each key's ``(bucket, stamp, slot, token)``)."""
        return self._many(self.transport.call(P.TRACK_GET_MANY, [ns, keys]))

    async def afetch(self, acall, ns: str, key: str, sid) -> tuple:
        """:meth:`fetch` from the asyncio client (``acall``: its transport's call)."""
        value, ttl, bucket, stamp, slot, token = await acall(P.TRACK_GET, [ns, key])
        return value, ttl, None, (bucket, stamp, _slot(slot), token)

    async def afetch_many(self, acall, ns: str, keys: list, sid) -> tuple:
        return self._many(await acall(P.TRACK_GET_MANY, [ns, keys]))

    def fetch_first(self, ns: str, key: str, sid) -> tuple:
        """A first read (see :meth:`NearCache._remember_first`): :meth:`fetch`'s
        answer, whose ``tracked`` is False unless the key has a value slot,
        and the key's ``(bucket, stamp)``, which its next read compares (see
        :meth:`NearCache._admit`)."""
        return self._first(self.transport.call(P.TRACK_GET, [ns, key, True]))

    async def afetch_first(self, acall, ns: str, key: str, sid) -> tuple:
        return self._first(await acall(P.TRACK_GET, [ns, key, True]))

    def fetch_many_first(self, ns: str, keys: list, sid) -> tuple:
        """First reads of several keys: ``tracked`` names the keys that have a
        value slot, and ``marks`` each other key's ``(bucket, stamp)``."""
        return self._many(self.transport.call(P.TRACK_GET_MANY, [ns, keys, True]), first=True)

    async def afetch_many_first(self, acall, ns: str, keys: list, sid) -> tuple:
        return self._many(await acall(P.TRACK_GET_MANY, [ns, keys, True]), first=True)

    @staticmethod
    def _first(reply: list) -> tuple:
        value, ttl, bucket, stamp, slot, token = reply
        slot = _slot(slot)
        return value, ttl, None, ((bucket, stamp, slot, token) if slot >= 0 else False), (bucket, stamp)

    @staticmethod
    def _many(reply: dict, first: bool = False) -> tuple:
        fetched, stamps, marks = {}, {}, {}
        for key, (value, ttl, bucket, stamp, slot, token) in reply.items():
            fetched[key] = (value, ttl)
            slot = _slot(slot)
            if not first or slot >= 0:
                stamps[key] = (bucket, stamp, slot, token)
            elif value is not None:
                marks[key] = (bucket, stamp)
        if first:
            return fetched, None, stamps or False, marks
        return fetched, None, stamps or True

    def check_alive(self) -> None:
        """At a miss (under the lock): if the file died (its Manager went away
        and a new one marked it so), drop everything now, so that this miss
        connects to the new Manager and maps its file."""
        stamps = self.stamps
        if stamps is not None and stamps[P.STAMP_BUCKETS] != self.generation:
            self._lost("the Manager's near-cache file is dead (the Manager went away)")

    def fill(self, sid, seq, tracked):
        """What a copy read on connection ``sid`` is kept with (under the
        lock): its ``(bucket, stamp)`` (or, for several keys, each one's), or
        False if it must not be kept (read before a reconnection, whose
        Manager hashes keys to other buckets, or with no file mapped)."""
        if sid != self.sid or self.stamps is None:
            return False
        self.check_alive()  # (died since the miss: not kept, and the next miss connects again)
        return tracked if self.stamps is not None else False

    # Plain reads, for the keys a policy keeps no copy of (yet).

    def fetch_untracked(self, ns: str, key: str):
        return self.transport.call(P.GET, [ns, key])

    def fetch_many_untracked(self, ns: str, keys: list) -> dict:
        return self.transport.call(P.GET_MANY, [ns, keys])

    async def afetch_untracked(self, acall, ns: str, key: str):
        return await acall(P.GET, [ns, key])

    async def afetch_many_untracked(self, acall, ns: str, keys: list) -> dict:
        return await acall(P.GET_MANY, [ns, keys])

    def drain(self, ns: str | None = None) -> bool:
        """Whether copies may answer now (under the lock; never blocks): here,
        whether the stamps are mapped; each copy's own stamp says the rest.
        (``ns``: the namespace about to be read; the Redis engine's tracker
        applies its invalidations here.)"""
        return self.stamps is not None

    def _lost(self, reason: str) -> None:
        logger.warning("near caches of process %d emptied: %s", os.getpid(), reason)
        self.drop()

    def stop(self) -> None:
        """The client is being dropped: close the channel, empty the copies."""
        with self.lock:
            self.drop()

    def drop(self) -> None:
        if self.channel is not None:
            self.channel.close()
        self.channel = None
        self.sid = None
        self._unmap_stamps()
        for cache in self.caches.values():
            cache.drop_all()

    def after_fork(self) -> None:
        # The child has none of the parent's channel (the transport closed its
        # copy of the socket) and no right to its copies; another thread may
        # have held the lock, or been inside a near cache, at the fork.
        self.lock = threading.Lock()
        self.channel = None
        self.sid = None
        self._unmap_stamps()
        for cache in self.caches.values():
            cache._entries = OrderedDict()
            if cache._seen is not None:
                cache._seen = OrderedDict()
            cache._recent = {}
            cache.bytes = cache.hits = cache.misses = cache.untracked = cache._recent_hits = 0  # the child's own
            cache.invalidated = cache.rests = cache.refreshed = cache.declined = 0
            cache._rest_reads = itertools.count()
            cache._judge_at, cache._judged, cache._resting, cache._rest_for = JUDGE_EVERY, (0, 0), 0.0, REST_FOR


def _slot(slot) -> int:
    """A slot index from the Manager's reply (-1: none, or not one of the file's)."""
    return slot if type(slot) is int and 0 <= slot < P.SLOTS else -1
