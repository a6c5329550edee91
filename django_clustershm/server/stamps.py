"""Near-cache stamps: what keeps every process's near cache consistent, at O(1) a write.

The Manager maps a file beside its socket (``<socket>`` +
:data:`~..wire.frames.STAMPS_SUFFIX`, 0600) read-write; each client process
maps it read-only (:class:`..client.near.Tracker`). It holds
:data:`~..wire.frames.STAMP_BUCKETS` 8-byte *stamps* and one header word,
the file's generation. Every key hashes to one bucket; every change of a key
stores a new stamp (a count no bucket ever held) in its bucket, before the
reply to the request that changed it. A near-cache miss (TRACK_GET) answers
the key's bucket and the stamp it holds; the process keeps its copy with
them and answers from it only while the bucket still holds that stamp.

**The guarantee** (a read answered from a near cache never returns a value
older than a write that completed, in any process, before the read began):
the write's stamp is in shared memory before the writer's reply is sent, so
any read that begins after the reply sees a bucket that no longer holds the
copy's stamp, and asks the Manager. A fill races nothing: the stamp it keeps
was read in the same step of the Manager's loop as the value.

**Why stamps, not per-process records and pushes** (what this replaced,
#19 part 3): with records, a write to a key held by K processes cost the
Manager K pushes, K sends and K epoch moves; measured back to back, a write
held by 8 processes took 130 us against 16.5 us held by none (7.9x), and the
Manager kept a record per (key, process) pair (tracking caps, a sweep after
a process closed: #12). A stamp costs one store whatever the holders, and
the Manager keeps nothing per process or per key. What is lost: a holder of
a key written elsewhere reads it again from the Manager (a miss) instead of
being pushed the new value, and a write of another key of the same bucket
costs a holder a miss too (with 65,536 buckets, a process holding 2,000
copies loses one to 3% of the writes of keys it does not hold). Redis's
client-side caching also invalidates rather than pushes values.

The bucket is computed only here (Python's ``hash`` of the key, cached on
the str, mixed with the namespace's): clients never hash, so the hash seed of
the Manager's process is the only one that matters, and a new Manager (a new
seed) has a new file.

**Value slots** (what makes a stale copy cheap, #19): a copy whose stamp
moved costs its process a round trip to the Manager, and read-heavy keys
written now and then by other workers (a 90/10 mix on 4 workers) lost a
third of their hits that way when stamps replaced pushed values. So after
the stamps the file holds :data:`~..wire.frames.SLOTS` slots of
:data:`~..wire.frames.SLOT_SIZE` bytes (layout: ``wire/frames.py``). A
TRACK_GET of a value that fits gives its key a slot (the least recently
filled one when none is free) and writes the value there; every change of
the key rewrites the slot in place, *before* the bucket's new stamp (a
delete, expiry or eviction frees it). A process that finds its copy's stamp
moved reads the bucket's stamp, then the slot: a value read there is at
least as new as that stamp, so keeping it with that stamp is safe, and the
read costs a copy out of shared memory instead of a message. What the
Manager pays: about 1 us per change of a slotted key, nothing per holder.
A slot nobody filled or reported a hit of (RECENT) for :data:`SLOT_IDLE`
seconds is freed at the key's next change: a key no near cache reads any
more stops costing its writers. And a slot must pay: processes add one to
its *read count* (after the slots, the only part of the file they map
writable) when they take a value from it, the Manager counts a fill too,
and every :data:`SLOT_CHECK` rewrites it weighs the reads since the last
time. Fewer than one per :data:`SLOT_WRITES_PER_READ` rewrites (a read
saves the Manager about a round trip, ~5 us; a rewrite costs it 0.8 us),
and the slot is freed and its key gets none for :data:`SLOT_BAN` seconds:
on a write-heavy mix on 16 workers, where the Manager is the bottleneck,
rewriting every slot cost 5-10% of the ops/s.

Readers and the writer never lock: a slot is a *seqlock*. The Manager makes
``seq`` odd, writes, makes it even; a reader reads ``seq``, the slot, then
``seq`` again, and uses what it read only if both were the same even
number. That is sound where 8-byte aligned loads and stores are atomic and
loads are not reordered with loads nor stores with stores: x86-64's memory
model (TSO), which Python cannot fence on other CPUs. Elsewhere the Manager
gives no slots (:data:`SLOTS_OK`) and stale copies cost a miss, as before.

A dead file (its Manager closed it, or a Manager that took over the address
of a dead one found it) has every word set to :data:`~..wire.frames.STAMP_DEAD`,
which no stamp or generation ever is: its clients' copies stop answering.
"""

from __future__ import annotations

import copy
import logging
import mmap
import os
import platform
import struct
import time
from array import array
from collections import OrderedDict
from collections.abc import Callable
from itertools import count

from ..wire.frames import SLOT_PAYLOAD, SLOT_READS_OFFSET, SLOT_SIZE, SLOTS, SLOTS_OFFSET, STAMP_BUCKETS

logger = logging.getLogger("django_clustershm.server")

#: Bucket mask (STAMP_BUCKETS is a power of two).
MASK = STAMP_BUCKETS - 1
#: The header word: the file's generation (STAMP_DEAD once dead).
HEADER = STAMP_BUCKETS
SIZE = SLOT_READS_OFFSET + SLOTS * 8
#: 8-byte words per slot.
SLOT_WORDS = SLOT_SIZE // 8
#: Whether this CPU's memory model makes the slots' seqlock sound (see above).
SLOTS_OK = platform.machine().lower() in ("x86_64", "amd64")
#: Seconds a slot lives without a fill or a reported hit of its key (checked at its key's changes).
SLOT_IDLE = 2.0
#: Every SLOT_CHECK rewrites of a slot, its reads since the last check are weighed: fewer than
#: one per SLOT_WRITES_PER_READ rewrites, and the slot is freed and its key gets none for
#: SLOT_BAN seconds (see above).
SLOT_CHECK = 16
SLOT_WRITES_PER_READ = 6
SLOT_BAN = 5.0
#: Keys held back from slots at most (the oldest goes first).
MAX_BANNED = 4096
_INT64 = (-(1 << 63), 1 << 63)
# A slot's words after ``seq``: token, deadline, kind << 32 | length (and an int value).
SLOT_HEADER = struct.Struct("=QdQ").pack_into
_SLOT_INT = struct.Struct("=QdQq").pack_into
#: The kind of a slot that holds bytes, in its third word.
SLOT_BYTES = 1 << 32


def bucket(ns: str, key: str) -> int:
    """The bucket of ``key`` in namespace ``ns`` (in the Manager's process only)."""
    return (hash(key) ^ hash(ns)) & MASK


def poison(path: str) -> None:
    """Mark a file of ours dead (every word STAMP_DEAD), if there is one at ``path``."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return
    try:
        st = os.fstat(fd)
        if st.st_uid != os.getuid() or st.st_size < 8:
            return
        with mmap.mmap(fd, 0) as old:
            old[:] = b"\xff" * len(old)
    except (OSError, ValueError):
        pass
    finally:
        os.close(fd)


class Stamps:
    """The Manager's side of the stamps file (see the module's docstring).

    ``words`` is the file as 8-byte words: ``words[bucket]`` is that
    bucket's stamp (what the engine's write path stores into, through
    :meth:`next_stamp`), ``words[HEADER]`` the generation."""

    def __init__(self, path: str, clock: Callable[[], float] = time.monotonic) -> None:
        self.path = path
        # A Manager that died here may have left clients mapping its file.
        poison(path)
        tmp = f"{path}.{os.getpid()}.tmp"
        # Made under another name and renamed: the clients of a Manager that
        # died here keep their old (dead) file, never see this one under it.
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            os.ftruncate(fd, SIZE)
            self._map: mmap.mmap | None = mmap.mmap(fd, SIZE)
            os.rename(tmp, path)
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            if getattr(self, "_map", None) is not None:
                self._map.close()  # type: ignore[union-attr]
            raise
        finally:
            os.close(fd)
        self.words: memoryview | None = memoryview(self._map).cast("Q")
        self.generation = int.from_bytes(os.urandom(8), "little") >> 2 or 1
        self._count = count(1)
        #: The next stamp (C-level: one call a write).
        self.next_stamp = self._count.__next__
        self.words[HEADER] = self.generation
        # The value slots (see above): the same bytes as 8-byte words,
        # float64s and int64s, and as bytes.
        region = memoryview(self._map)[SLOTS_OFFSET:SLOT_READS_OFFSET]
        #: Each slot's read count (see above): processes add to it, the Manager weighs it.
        self.reads: memoryview | None = memoryview(self._map)[SLOT_READS_OFFSET:SIZE].cast("Q")
        #: Keys held back from slots, (id of their namespace's map, key) -> until when.
        self._banned: OrderedDict[tuple[int, str], float] = OrderedDict()
        self.slots_banned = 0  # slots freed because their key was written much more than read
        self._slot_views = (region, region.cast("Q"), region.cast("d"), region.cast("q"))
        self._slot_words: memoryview | None = self._slot_views[1]
        #: What the engine's write path writes a slot through (see Engine._namespace).
        self.slot_region = (region, self._slot_words)
        self.slots_ok = SLOTS_OK
        self.clock = clock
        #: Slots in use, least recently filled first: index -> its record, ``[index,
        #: token, when last filled or reported, its first word, its first byte,
        #: its namespace's map, key, rewrites since its reads were last weighed,
        #: its read count then]``; the engine's map of each namespace (key ->
        #: record) holds the same lists.
        self._owners: OrderedDict[int, list] = OrderedDict()
        self._free = list(range(SLOTS - 1, -1, -1))
        self._tokens = count(1)
        self.slot_writes = 0  # changes written into slots, in all
        self.slots_freed = 0  # slots freed (a change that removed the key, idle, or taken by another key)

    # -- value slots ---------------------------------------------------------------------

    def slot_for(self, slotted: dict, key: str, value, deadline: float) -> tuple[int, int]:
        """A TRACK_GET of ``key`` (whose namespace's slots are ``slotted``: key
        -> record) read ``value``: ``(slot, token)`` for the reply, after
        writing the value into the key's slot; ``(-1, 0)`` if it gets none."""
        record = slotted.get(key)
        if record is not None:
            record[2] = self.clock()
            self._owners.move_to_end(record[0])
            self.reads[record[0]] += 1  # type: ignore[index]  # (a fill is a read too)
            return record[0], record[1]
        if not self.slots_ok or self._slot_words is None or not _fits(value):
            return -1, 0
        if self._banned:
            until = self._banned.get((id(slotted), key))
            if until is not None:
                if self.clock() < until:
                    return -1, 0
                del self._banned[(id(slotted), key)]
        if not self._free:
            self.free_slot(next(iter(self._owners)))  # the least recently filled
        i = self._free.pop()
        record = [i, next(self._tokens), self.clock(), i * SLOT_WORDS, i * SLOT_SIZE, slotted, key, 0, 0]
        record[8] = self.reads[i]  # type: ignore[index]
        self._owners[i] = slotted[key] = record
        self._write(i, record[1], value, deadline)
        return i, record[1]

    def rewrite(self, record: list, value, deadline: float) -> None:
        """The key of ``record`` (see ``_owners``) changed to ``value``, expiring
        at ``deadline``: written in place, or the slot freed (it no longer
        fits, or no one filled or reported the key for SLOT_IDLE seconds)."""
        if _fits(value) and self.clock() - record[2] <= SLOT_IDLE:
            self._write(record[0], record[1], value, deadline)
            record[7] += 1
            if record[7] >= SLOT_CHECK:
                self.weigh(record)
        else:
            self.free_slot(record[0])

    def weigh(self, record: list) -> None:
        """Every SLOT_CHECK rewrites: a slot read less than once per
        SLOT_WRITES_PER_READ rewrites costs the Manager more than it saves its
        readers (a rewrite: 0.8 us; a read it saves: a round trip, ~5 us of
        the Manager's): freed, and its key gets no slot for SLOT_BAN seconds."""
        i = record[0]
        reads = self.reads[i]  # type: ignore[index]
        read, record[8], record[7] = reads - record[8], reads, 0
        if read * SLOT_WRITES_PER_READ < SLOT_CHECK:
            banned = self._banned
            banned[(id(record[5]), record[6])] = self.clock() + SLOT_BAN
            if len(banned) > MAX_BANNED:
                banned.popitem(last=False)
            self.slots_banned += 1
            self.free_slot(i)

    def free_slot(self, i: int) -> None:
        """Slot ``i`` belongs to no key any more (token 0: its readers ask the Manager)."""
        record = self._owners.pop(i)
        del record[5][record[6]]
        self._free.append(i)
        self.slots_freed += 1
        words = self._slot_words
        if words is not None:
            base = i * SLOT_WORDS
            seq = words[base]
            words[base] = seq + 1
            words[base + 1] = 0
            words[base] = seq + 2

    def free_all(self, slotted: dict) -> None:
        """A clear of the namespace whose slots are ``slotted``."""
        for record in list(slotted.values()):
            self.free_slot(record[0])

    @property
    def slots_used(self) -> int:
        return len(self._owners)

    def _write(self, i: int, token: int, value, deadline: float) -> None:
        # The seqlock's writer: seq odd, the slot, seq even (see the module's
        # docstring). Between the two, nothing needs to be atomic: the header
        # words in one pack_into, then the payload.
        region, words, _, _ = self._slot_views
        base = i * SLOT_WORDS
        start = i * SLOT_SIZE
        seq = words[base]
        words[base] = seq + 1
        if type(value) is int:
            _SLOT_INT(region, start + 8, token, deadline, 2 << 32, value)
        else:
            n = len(value)
            SLOT_HEADER(region, start + 8, token, deadline, SLOT_BYTES | n)
            region[start + 32 : start + 32 + n] = value
        words[base] = seq + 2
        self.slot_writes += 1

    @property
    def issued(self) -> int:
        """Stamps written so far."""
        return next(copy.copy(self._count)) - 1

    def bump_all(self) -> None:
        """A clear: every bucket gets a new stamp (one for all: about 0.1 ms)."""
        words = self.words
        if words is not None:
            words[:STAMP_BUCKETS] = memoryview(array("Q", [self.next_stamp()]) * STAMP_BUCKETS)

    def close(self, *, dead: bool) -> None:
        """Unmap; ``dead``: first mark the file dead for the processes that map it
        (the Manager is going away; not in a forked child, whose parent still serves)."""
        words, self.words = self.words, None
        self._slot_words = None
        reads, self.reads = self.reads, None
        if reads is not None:
            reads.release()
        self.slot_region = None  # type: ignore[assignment]
        for record in self._owners.values():
            record[5].clear()  # (the engine's maps: no key keeps a slot of a closed file)
        self._owners.clear()
        if words is not None:
            if dead:
                self._map[:] = b"\xff" * SIZE  # type: ignore[index]
            words.release()
            for view in reversed(self._slot_views):
                view.release()
        if self._map is not None:
            self._map.close()
            self._map = None


def _fits(value) -> bool:
    """Whether ``value`` (a stored value: bytes or int) fits in a slot."""
    if type(value) is int:
        return _INT64[0] <= value < _INT64[1]
    return type(value) is bytes and len(value) <= SLOT_PAYLOAD
