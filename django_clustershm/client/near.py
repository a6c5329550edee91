"""Near caches: worker-local copies of hot keys that stay consistent across processes.

Enable one per cache alias (``OPTIONS = {"NEAR_CACHE": {"MAX_ENTRIES": 10000,
"MAX_BYTES": 16 * 2**20}}``) or for the shared store (``CLUSTERSHM =
{"NEAR_CACHE": {...}}``). Only in cluster mode: the embedded Manager is
in-process already.

**The guarantee.** A read answered from a near cache never returns a value
older than a write that completed, in any process, before the read began.
Why it holds:

1. A read that misses asks the Manager with TRACK_GET, which records that
   this process (its *tracker* connection, one per process) may now hold the
   key.
2. Every later change of that key makes the Manager write a push into this
   process's tracker socket *before* it replies to the writer, or, if the
   socket cannot take it at once, shut the tracker down (the process then
   drops its whole near cache). A write of a small value (at most
   :data:`PUSH_LIMIT` bytes) is pushed as an *update* carrying the new value
   and its expiry, and the key stays tracked; any other change (delete,
   touch, expiry, eviction, clear, a larger value) as an *invalidation*,
   which ends the tracking. So once a write has completed, its push (or the
   shutdown) is already in the socket of every process that may hold the old
   value.
3. Before answering from its near cache, a read applies every push in the
   tracker socket, without blocking: a zero-timeout ``poll(2)`` says whether
   there is anything to read (0.3 µs, against 1 µs for a ``recv`` that fails
   with EAGAIN, which costs Python an exception).
4. A value fetched by a miss is kept only if no push arrived between the
   Manager's answer and the moment it is stored: the Manager numbers a
   tracker's pushes and says in each TRACK_GET reply how many it had sent;
   the fill is dropped unless the process has applied exactly that many.

Why updates and not only invalidations (what Redis sends): with several
processes reading a hot key, each write would cost every one of them a round
trip to read the key again; an update costs the Manager what the
invalidation did, and no process a miss. An update of a key the process no
longer holds (evicted from its near cache, or dropped after
:data:`MAX_UNREAD_UPDATES` updates it never read) is answered with UNTRACK,
so the Manager stops sending that key; and a process that lags (1 MiB of pushes
unread: an idle worker) is sent invalidations instead of updates, which end
the tracking, so that it is not flooded and cut off.

A copy is kept with its expiry: for a value read, computed from the moment
the request was sent (so never later than the Manager's); for a value pushed,
the Manager's own deadline (CLOCK_MONOTONIC is the same in every process).
The copies are bounded by entries and bytes (LRU).
Values are kept serialized (pickled by default): every hit returns a fresh
object. A value its cache alias compressed (``COMPRESSOR``) is kept
*decompressed*: the copy is made once per fill or push, and a hit then costs
what a raw value's does. Measured on a 100 KiB HTML page (zlib: 17.9 KB
stored): a hit took 12 us from a decompressed copy against 249 us from a
compressed one (950 us with lzma), slower than asking the Manager; the price
is memory (the copy counts its decompressed size against MAX_BYTES).

A fork, a lost Manager or a cut-off tracker empties the near caches of the
process; the next miss opens a new tracker.

The tracker is a :class:`~.transport.Channel` and the reads are transport
calls: the near cache uses nothing but the transport seam.
"""

from __future__ import annotations

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
_MAX_UNTRACK_BACKLOG = 1 << 20
#: Updates of a key kept without a read in between; the next one drops the
#: key and ends its tracking (see NearCache.update). A miss costs a round trip
#: (~12 us here), an update about 2 us to apply: after a few unread updates,
#: invalidating is cheaper.
MAX_UNREAD_UPDATES = 4
#: Seconds a sync read waits for pushes the Manager has counted but not yet
#: sent (they follow the reply before them within its round) before it asks
#: the Manager instead. An asyncio read does not wait: it asks.
PUSH_WAIT = 0.002
#: "adaptive": misses between two weighings of a near cache's copies (see NearCache._judge).
JUDGE_EVERY = 256
#: "adaptive": seconds a near cache keeps no copies once they cost more than they saved.
REST_FOR = 2.0
#: Seconds between two reports of a near cache's hits to the Manager (RECENT).
RECENT_EVERY = 0.25
#: What :meth:`NearCache._local` answers for a miss the policy reads untracked.
_UNTRACKED = object()
#: Values up to this size are pushed to the near caches that hold their key
#: when they are written (larger ones are invalidated): the Manager's limit.
PUSH_LIMIT = 64 * 1024


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
    miss is a tracked read). "adaptive", the default: a key read for the
    first time is read *untracked* (a plain GET: no copy, nothing the Manager
    must remember or push later) and remembered among the last
    ``max_entries`` such keys; a second miss of it while it is remembered is
    a tracked read that keeps a copy. Together with the drop of a copy after
    :data:`MAX_UNREAD_UPDATES` updates it was not read between (after which it
    must be read twice again), a process keeps copies of the keys it reads
    more often than others write them, and only those: a key read once (a
    page of a long tail, a scan) costs neither the local budget (no hot copy
    is evicted for it) nor the writers (no push for a copy nobody reads
    again). It is TinyLFU's doorkeeper, applied to what a copy costs here:
    its pushes. A key whose copy was invalidated (deleted, touched, expired
    in the Manager) is remembered, so its next miss keeps a copy again.

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
        # key -> [data, deadline, size, updates pushed since the last read]
        self._entries: OrderedDict[str, list] = OrderedDict()
        # "adaptive": keys read once (and not kept), oldest first, at most
        # max_entries of them: a second miss while a key is here keeps a copy.
        self._seen: dict[str, None] | None = {} if policy == "adaptive" else None
        self.bytes = 0
        self.hits = 0
        self.misses = 0
        self.untracked = 0  # misses read without keeping a copy (the policy's first reads)
        self.pushes = 0  # updates and invalidations applied to copies
        # "adaptive": when the copies were last weighed (see _judge), and until when they rest.
        self._judge_at = JUDGE_EVERY
        self._judged = (0, 0)
        self._resting = 0.0
        self.rests = 0
        # Keys hit since the last RECENT report, and how many hits (see _hit).
        self._recent: dict[str, None] = {}
        self._recent_hits = 0
        self._report_due = 0.0

    def __len__(self) -> int:
        return len(self._entries)

    # -- under the tracker's lock ---------------------------------------------------

    def _lookup(self, key: str):
        entry = self._entries.get(key)
        if entry is None:
            return None
        if entry[1] is not None and entry[1] <= self.clock():
            self._drop(key)
            return None
        self._entries.move_to_end(key)
        entry[3] = 0
        return entry[0]

    def _drop(self, key: str) -> None:
        entry = self._entries.pop(key, None)
        if entry is not None:
            self.bytes -= entry[2]

    def _admit(self, key: str) -> bool:
        """A miss of ``key``: whether to read it tracked and keep a copy (see the policy above)."""
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
            del seen[key]
            return True
        self._remember_seen(key)
        return False

    def _judge(self) -> None:
        """Every :data:`JUDGE_EVERY` misses, weigh what the copies cost
        against what they saved since the last time: pushes applied (each a
        write elsewhere, or here, that the Manager counted, sent and this
        process applied, and after which the next read waited for it)
        against hits. More pushes than hits: the namespace is written here
        or elsewhere more often than its copies are read, where copies lose
        to plain reads (bench_near.py, back to back: 50/50 and 10/90 mixes at
        1-16 workers, 0.68-0.91x of NEAR_CACHE False without this; 0.82-1.02x
        with it); the copies are dropped and keys are read plainly for
        :data:`REST_FOR` seconds, then kept again from their second read. (One
        push for two hits was too eager: 90/10 at 4 workers fell from 1.70x
        to 1.20x.)"""
        hits, pushes = self.hits - self._judged[0], self.pushes - self._judged[1]
        self._judged = (self.hits, self.pushes)
        self._judge_at = self.misses + JUDGE_EVERY
        if pushes >= JUDGE_EVERY // 8 and pushes > hits:
            self._resting = self.clock() + REST_FOR
            self.rests += 1
            self._entries.clear()
            self.bytes = 0
            self._seen.clear()  # type: ignore[union-attr]

    def _remember_seen(self, key: str) -> None:
        seen = self._seen
        if seen is not None:
            seen[key] = None
            if len(seen) > self.max_entries:
                del seen[next(iter(seen))]

    def _put(self, key: str, data, deadline) -> None:
        if type(data) is bytes and data[:1] == b"\xc1":
            data = _expanded(data)
        self._drop(key)  # first: a value too large to keep must not leave the old one behind
        size = len(key) + (len(data) if type(data) is bytes else _INT_SIZE)
        if size > self.max_bytes:
            return
        self._entries[key] = [data, deadline, size, 0]
        self.bytes += size
        self._shrink()

    def _shrink(self) -> None:
        while len(self._entries) > self.max_entries or self.bytes > self.max_bytes:
            _, (_, _, old, _) = self._entries.popitem(last=False)
            self.bytes -= old

    def update(self, key: str, data, deadline) -> bool:
        """A pushed new value of ``key``: True if it replaced the local copy;
        False if there is none, or if the copy was not read since the last
        :data:`MAX_UNREAD_UPDATES` updates (it is dropped): the Manager is
        then told to stop pushing the key.

        Updates beat invalidations for keys that are read between writes;
        for a key written over and over and no longer read here, each update
        is wasted work, so after a few unread ones the process falls back to
        what an invalidation does: drop it, and read it again if it is needed
        (the update/invalidate switch of competitive snooping protocols)."""
        entry = self._entries.get(key)
        if entry is None:
            return False
        self.pushes += 1
        if type(data) is bytes and data[:1] == b"\xc1":
            data = _expanded(data)
        size = len(key) + (len(data) if type(data) is bytes else _INT_SIZE)
        if entry[3] >= MAX_UNREAD_UPDATES or size > self.max_bytes:
            self._drop(key)
            return False
        self.bytes += size - entry[2]
        entry[0], entry[1], entry[2], entry[3] = data, deadline, size, entry[3] + 1
        self._shrink()  # in place: an update does not make the key recently used
        return key in self._entries

    def invalidate(self, key) -> None:
        if key is None:
            self.drop_all()
        elif key in self._entries:
            self.pushes += 1
            self._drop(key)
            self._remember_seen(key)  # read here before: its next miss keeps a copy again

    def drop_all(self) -> None:
        self._entries.clear()
        self.bytes = 0
        if self._seen is not None:
            self._seen.clear()

    # -- reads ------------------------------------------------------------------------

    def get(self, key: str):
        """The stored data (bytes or int) of ``key``, or None if it is missing."""
        data = self._local(key, PUSH_WAIT)
        if data is not None:
            return data if data is not _UNTRACKED else self.tracker.fetch_untracked(self.ns, key)
        sid, sent_at = self.tracker.session_id(), self.clock()
        return self._remember(key, sid, sent_at, *self.tracker.fetch(self.ns, key, sid))

    async def aget(self, key: str, acall) -> Any:
        """:meth:`get` for the asyncio client: a miss is read with ``await acall(...)``.

        The local part never blocks: the tracker's lock is only held around
        dict operations, and draining its channel reads what is already in the
        socket. (The channel itself is opened once per process, at the first miss.)"""
        data = self._local(key)
        if data is not None:
            return data if data is not _UNTRACKED else await self.tracker.afetch_untracked(acall, self.ns, key)
        sid, sent_at = self.tracker.session_id(), self.clock()
        return self._remember(key, sid, sent_at, *await self.tracker.afetch(acall, self.ns, key, sid))

    def _local(self, key: str, wait: float = 0.0):
        """The local copy's data; on a miss None (read it tracked) or
        ``_UNTRACKED`` (the policy keeps no copy of it yet: read it plainly)."""
        tracker = self.tracker
        with tracker.lock:
            live = tracker.drain(self.ns, wait)
            if live:
                data = self._lookup(key)
                if data is not None:
                    self.hits += 1
                    if tracker.reports_recent:
                        self._hit(key)
                    return data
            self.misses += 1  # counted under the lock: threads share the figures
            if self._recent and self.clock() >= self._report_due:
                self._report()
            if self._seen is not None and not self._admit(key):
                self.untracked += 1
                return _UNTRACKED
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
                pass  # the channel is lost: the next drain says so
        self._recent = {}
        self._recent_hits = 0
        self._report_due = self.clock() + RECENT_EVERY

    def _remember(self, key: str, sid, sent_at: float, data, ttl, seq, tracked):
        """Keep what a tracked read brought, unless an invalidation may have passed it."""
        if data is not None and tracked:
            tracker = self.tracker
            with tracker.lock:
                tracker.drain()
                if tracker.sid == sid and tracker.seq == seq:
                    self._put(key, data, None if ttl is None else sent_at + ttl)
        return data

    def get_many(self, keys: list) -> dict:
        found, missing, track = self._local_many(keys, PUSH_WAIT)
        if not missing:
            return found
        if not track:
            found.update(self.tracker.fetch_many_untracked(self.ns, missing))
            return found
        sid, sent_at = self.tracker.session_id(), self.clock()
        reply = self.tracker.fetch_many(self.ns, missing, sid)
        return self._remember_many(found, sid, sent_at, *reply)

    async def aget_many(self, keys: list, acall) -> dict:
        """:meth:`get_many` for the asyncio client."""
        found, missing, track = self._local_many(keys)
        if not missing:
            return found
        if not track:
            found.update(await self.tracker.afetch_many_untracked(acall, self.ns, missing))
            return found
        sid, sent_at = self.tracker.session_id(), self.clock()
        reply = await self.tracker.afetch_many(acall, self.ns, missing, sid)
        return self._remember_many(found, sid, sent_at, *reply)

    def _local_many(self, keys: list, wait: float = 0.0) -> tuple[dict, list, bool]:
        tracker = self.tracker
        found = {}
        missing = []
        with tracker.lock:
            live = tracker.drain(self.ns, wait)
            for key in keys:
                data = self._lookup(key) if live else None
                if data is None:
                    missing.append(key)
                else:
                    found[key] = data
            self.hits += len(found)
            self.misses += len(missing)
            if found and tracker.reports_recent:
                for key in found:
                    self._hit(key)
            if missing and self._seen is not None:
                # One request either way: tracked if any missing key is
                # admitted (keys asked for together are usually read together
                # again), else plain.
                admitted = [self._admit(key) for key in missing]
                if not any(admitted):
                    self.untracked += len(missing)
                    return found, missing, False
        return found, missing, True

    def _remember_many(self, found: dict, sid, sent_at: float, fetched: dict, seq, tracked) -> dict:
        tracker = self.tracker
        with tracker.lock:
            tracker.drain()
            keep = tracked and tracker.sid == sid and tracker.seq == seq
            for key, (data, ttl) in fetched.items():
                found[key] = data
                if keep:
                    self._put(key, data, None if ttl is None else sent_at + ttl)
        return found


class Tracker:
    """The process's invalidation channel to one Manager, shared by its near caches."""

    #: Whether the near caches tell the Manager what they hit (RECENT).
    reports_recent = True

    def __init__(self, transport: Transport) -> None:
        self.transport = transport
        self.lock = threading.Lock()
        self.channel: Channel | None = None
        self.sid: int | None = None
        self.seq = 0
        self.caches: dict[str, NearCache] = {}
        # The epoch slot (see drain): the Manager's file mapped read-only, the
        # slot, and what it says while every push sent has been applied, less seq.
        self._epoch_map: mmap.mmap | None = None
        self.epochs: memoryview | None = None
        self.slot = 0
        self.epoch_base = 0

    def near_cache(
        self, ns: str, max_entries: int, max_bytes: int, consistency: str | None = None, policy: str = "adaptive"
    ) -> NearCache:
        """``ns``'s near cache (``consistency``: a Manager's copies are always strict)."""
        cache = self.caches.get(ns)
        if cache is None:
            cache = self.caches[ns] = NearCache(self, ns, max_entries, max_bytes, policy=policy)
        return cache

    def session_id(self) -> int | None:
        """The tracker's session id, connecting it first if needed."""
        with self.lock:
            if self.channel is None:
                self._connect()
            return self.sid

    def _connect(self) -> None:
        channel = self.transport.open_channel()
        try:
            body = channel.request(P.TRACKER, [PUSH_LIMIT], self.transport.timeout)
        except BaseException:
            channel.close()
            raise
        self.channel, self.sid, self.seq = channel, body[0], 0
        if len(body) >= 3:
            self._map_epochs(body[1], body[2])

    def _map_epochs(self, slot: int, gen: int) -> None:
        """Map the Manager's epochs file read-only and check our slot there
        (its generation, and no push yet); without it, each read polls the
        socket instead (what drain did before there were epochs)."""
        path = self.transport.epoch_file
        if path is None:
            return
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
            try:
                if os.fstat(fd).st_uid != os.getuid():
                    return  # not the Manager's (which runs as this user: the handshake checked)
                epoch_map = mmap.mmap(fd, 0, prot=mmap.PROT_READ)
            finally:
                os.close(fd)
        except (OSError, ValueError) as exc:
            logger.debug("near caches poll their channel: cannot map %s: %s", path, exc)
            return
        epochs = memoryview(epoch_map).cast("Q")
        base = gen << P.EPOCH_SEQ_BITS
        if slot >= len(epochs) or epochs[slot] >> P.EPOCH_SEQ_BITS != gen:
            epochs.release()
            epoch_map.close()
            return
        self._epoch_map, self.epochs, self.slot, self.epoch_base = epoch_map, epochs, slot, base

    def _unmap_epochs(self) -> None:
        if self.epochs is not None:
            self.epochs.release()
            self.epochs = None
        if self._epoch_map is not None:
            self._epoch_map.close()
            self._epoch_map = None

    # -- how misses travel (the Redis engine's tracker reads them on its tracking connection) --

    def fetch(self, ns: str, key: str, sid) -> tuple:
        """A tracked read: ``(data, ttl, seq, tracked)``; the fill is kept
        only if ``seq`` is still the tracker's once the pushes before it are applied."""
        return self.transport.call(P.TRACK_GET, [ns, key, sid])

    def fetch_many(self, ns: str, keys: list, sid) -> tuple:
        """Tracked reads of several keys: ``({key: (data, ttl)}, seq, tracked)``."""
        return self.transport.call(P.TRACK_GET_MANY, [ns, keys, sid])

    async def afetch(self, acall, ns: str, key: str, sid) -> tuple:
        """:meth:`fetch` from the asyncio client (``acall``: its transport's call)."""
        return await acall(P.TRACK_GET, [ns, key, sid])

    async def afetch_many(self, acall, ns: str, keys: list, sid) -> tuple:
        return await acall(P.TRACK_GET_MANY, [ns, keys, sid])

    # Plain reads, for the keys a policy keeps no copy of (yet): nothing tracked.

    def fetch_untracked(self, ns: str, key: str):
        return self.transport.call(P.GET, [ns, key])

    def fetch_many_untracked(self, ns: str, keys: list) -> dict:
        return self.transport.call(P.GET_MANY, [ns, keys])

    async def afetch_untracked(self, acall, ns: str, key: str):
        return await acall(P.GET, [ns, key])

    async def afetch_many_untracked(self, acall, ns: str, keys: list) -> dict:
        return await acall(P.GET_MANY, [ns, keys])

    def drain(self, ns: str | None = None, wait: float = 0.0) -> bool:
        """Apply every push (update, invalidation) already received; whether
        the copies may answer now. Blocks only if ``wait`` (seconds) is given
        and pushes are on their way (see below); never on an event loop.

        With an epoch slot, the slot says how many pushes the Manager has
        sent this process (moved before the reply of the write that caused
        each): equal to the pushes applied, nothing is pending, at the cost of
        reading memory (a ``poll(2)`` otherwise). If pushes are still on
        their way after what was received is applied, the copies do not
        answer this read (it goes to the Manager) but are kept: the pushes
        follow within the Manager's round. With ``wait``, they are waited for
        that long first (the sync client's reads: see PUSH_WAIT).

        False when there is no live channel (never connected, or just lost):
        the near caches are then empty and must not answer. (``ns``: the
        namespace about to be read; one channel serves them all here.)
        """
        channel = self.channel
        if channel is None:
            return False
        epochs = self.epochs
        if epochs is not None:
            if epochs[self.slot] == self.epoch_base + self.seq:
                return True  # every push sent has been applied
        elif not channel.ready():
            return True  # nothing pushed, not closed
        if not self._apply(channel, 0):
            return False
        if epochs is None or epochs[self.slot] == self.epoch_base + self.seq:
            return True
        if wait:
            # On their way: the Manager sends them right after the reply that
            # preceded them (this process's own write, typically), sooner
            # than a request to it would be answered.
            deadline = time.monotonic() + wait
            while epochs[self.slot] != self.epoch_base + self.seq:
                left = deadline - time.monotonic()
                if left <= 0 or not self._apply(channel, left):
                    return False
            return True
        return False

    def _apply(self, channel: Channel, timeout: float) -> bool:
        """Apply what the channel has, waiting up to ``timeout``; False if it is lost."""
        try:
            messages = channel.receive(timeout)
        except ClusterShmError as exc:
            self._lost(f"the near-cache channel was lost (cut off, or the Manager is gone): {exc}")
            return False
        for op, _rid, body in messages:
            if op == P.PUSH_UPDATE:
                ns, key, value, deadline = body
                self.seq += 1
                cache = self.caches.get(ns)
                if cache is None or not cache.update(key, value, deadline):
                    # Tell the Manager this process does not hold the key (a hint).
                    channel.post(P.UNTRACK, [ns, key, self.seq])
            elif op == P.PUSH_INVALIDATE:
                ns, key = body
                self.seq += 1
                cache = self.caches.get(ns)
                if cache is not None:
                    cache.invalidate(key)
        return True

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
        self._unmap_epochs()
        for cache in self.caches.values():
            cache.drop_all()

    def after_fork(self) -> None:
        # The child has none of the parent's tracker (the transport closed its
        # copy of the socket) and no right to its copies; another thread may
        # have held the lock, or been inside a near cache, at the fork.
        self.lock = threading.Lock()
        self.channel = None
        self.sid = None
        self._unmap_epochs()  # the parent's slot, not the child's
        for cache in self.caches.values():
            cache._entries = OrderedDict()
            if cache._seen is not None:
                cache._seen = {}
            cache._recent = {}
            cache.bytes = cache.hits = cache.misses = cache.untracked = cache._recent_hits = 0  # the child's own
            cache.pushes = cache.rests = 0
            cache._judge_at, cache._judged, cache._resting = JUDGE_EVERY, (0, 0), 0.0
