"""The wire protocol between the Manager and its clients.

Every message, in both directions, is one frame on a Unix stream socket::

     0       2       3       4               8              12
     +-------+-------+-------+---------------+---------------+====================+
     | magic |version|opcode |  request id   |    length     |  payload           |
     | "CS"  |  u8   |  u8   |  u32, BE      |  u32, BE      |  `length` bytes,   |
     |       |       |       |               |               |  one msgpack value |
     +-------+-------+-------+---------------+---------------+====================+

* ``magic`` is ``b"CS"`` and ``version`` is :data:`VERSION`; anything else is a
  :class:`~django_clustershm.exceptions.ProtocolError` and closes the connection.
* ``length`` counts the payload only and may not exceed the connection's
  maximum frame size (:data:`DEFAULT_MAX_FRAME`, set by the Manager and told to
  the client at the handshake). Before the handshake completes the maximum is
  :data:`HANDSHAKE_MAX_FRAME`, so an unauthenticated peer cannot make the
  Manager buffer more than a few hundred bytes.
* The payload is one msgpack value (for a request: the list of arguments).
  msgpack is a safe encoding: decoding it never runs code. User values travel
  inside it as opaque ``bin`` (the client's pickle) or as a native integer; the
  Manager never unpickles anything.

Opcodes 0x01-0x7F are requests, sent by a client with a request id of its
choosing (a client may pipeline several; replies carry the id of their
request). 0x80 and 0x81 are replies; a lock grant that comes later is a
reply too, carrying the id of its LOCK_ACQUIRE. 0xC0-0xFF are *pushes*:
messages the Manager sends on its own (listener events, near-cache updates
and invalidations, "your acquire is queued"), which a client must be ready
to receive between replies.

The handshake (request id 0) is drawn in :mod:`.handshake`, where both of
its halves live side by side.

Requests and their payloads (``ns`` is the namespace: ``""`` for the shared
store; the value ``v`` is ``bin`` or ``int``; ``ttl`` is seconds or nil)::

    PING         []                      -> "pong"
    GET          [ns, key]               -> v or nil
    SET          [ns, key, v, ttl, bounds]  -> nil
    ADD          [ns, key, v, ttl, bounds]  -> bool (stored)
    REMOVE       [ns, key]               -> bool (existed)
    HAS          [ns, key]               -> bool
    INCR         [ns, key, delta, init]  -> int (init nil: KeyNotFound if missing)
    TOUCH        [ns, key, ttl]          -> bool
    GET_MANY     [ns, [key...]]          -> {key: v} (hits only)
    SET_MANY     [ns, [key, v, key, v...], ttl, bounds] -> nil  (a flat list:
                 msgpack interns a map's str keys, which would cost the
                 Manager an intern-table slot per stored key)
    DELETE_MANY  [ns, [key...]]          -> int (how many existed)
    KEYS         [ns, prefix]            -> [key...]
    CLEAR        [ns]                    -> int (how many removed)
    STATS        []                      -> {...}

``bounds`` is nil for the shared store, and for a named cache either nil
(Django's defaults) or ``[max_entries, cull_frequency, max_bytes]``: the
writer's alias's bounds travel with each write, so aliases that share a
LOCATION keep their own MAX_ENTRIES and CULL_FREQUENCY, as LocMemCache's do.

Expiry and key-space scans (django-redis's extra API, #17), on the store
and on the caches alike::

    TTL          [ns, key]               -> [exists, seconds left, or nil: no expiry]
    PERSIST      [ns, key]               -> bool (true if an expiry was removed)
    REPLACE      [ns, key, v, ttl, bounds] -> bool (stored: only if the key exists, SET XX)
    KEYS_MATCH   [ns, pattern]           -> [key...] (every live key matching)
    SCAN         [ns, cursor, pattern, count] -> [cursor, [key...]]
    SCAN_DELETE  [ns, cursor, pattern, count] -> [cursor, int (how many removed)]

A ``pattern`` is a glob with Redis's rules: ``*`` any run of characters,
``?`` one, ``[abc]``, ``[a-z]`` and ``[^abc]`` one of (or none of) a set,
``\\`` makes the next character literal. A SCAN starts with cursor 0 and
goes on with the cursor each reply gives until it gives 0; each reply holds
at most ``count`` keys and looks at a bounded number of entries, so a reply
may hold none before the scan ends. Every key present for the whole scan is
returned exactly once; a key added or removed meanwhile may or may not be
(Redis's SCAN guarantee, plus no duplicates). SCAN_DELETE walks the same
way and removes what matches (each removal is told to listeners and near
caches as a REMOVE would be). A cursor is the Manager's: one it no longer
knows (finished, or dropped under its limits, see :mod:`..server.scans`) is
refused with an error. TOUCH does what EXPIRE and EXPIREAT do (the client
turns an absolute time into seconds from now).

    LOCK_ACQUIRE [key, lease, wait]      -> [token, fence], or nil (not acquired)
    LOCK_RELEASE [key, token]            -> handed over: true if a waiter got the
                                            lock, false if it is free (LockNotOwned
                                            if not held with ``token``)
    LOCK_EXTEND  [key, token, lease]     -> true (LockNotOwned otherwise)
    LOCK_STATUS  [key, token]            -> [locked, owned]
    LOCK_CANCEL  [key, rid]              -> true if this connection's acquire
                                            ``rid`` was still queued (now taken
                                            back, never answered); false if
                                            it was answered already

A LOCK_ACQUIRE that has to wait is answered at once with a PUSH_QUEUED
frame carrying its request id and no payload (nil), then later with its
reply: a client polling for a quick reply knows it can sleep instead.

LOCK_ACQUIRE with ``wait`` nil waits forever, 0 does not wait, and any
other number of seconds waits that long: the Manager replies when the lock
is granted or the wait runs out, so other requests of that connection must
not be sent meanwhile (a blocking client sends none; a pipelining client
matches replies by request id).

    LISTEN       [sub_id, ns, key, prefix] -> true  (prefix true: every key starting with ``key``)
    UNLISTEN     [sub_id]                -> bool

    PUSH_EVENT   [sub_id, ns, key, event, v]   (pushed; ``v`` nil unless event is set;
                                                key nil for clear)

    TRACKER        []                    -> [session_id, generation]  (this connection
                                             becomes the process's near-cache channel;
                                             generation: the stamps file's, 0 if none)
    TRACK_GET      [ns, key, first?]     -> [v, ttl, bucket, stamp, slot, token]
    TRACK_GET_MANY [ns, [key...], first?] -> {key: [v, ttl, bucket, stamp, slot, token]}
                                             (first true: a key with no value slot is
                                             answered [v, ttl, bucket, stamp, -1, 0], not
                                             tracked: its mark, see client/near.py)
    RECENT         [ns, hits, [key...]]  (on the tracker connection; no reply)

Near caches are kept consistent by *stamps*, not by pushes. The Manager
maps the file ``<socket path>`` + :data:`STAMPS_SUFFIX` read-write; every
process maps it read-only. It holds :data:`STAMP_BUCKETS` 8-byte stamps,
then one header word: the file's generation (a random number, given by
TRACKER), or :data:`STAMP_DEAD` once the file is dead (its Manager closed,
or a Manager that took over the address of a dead one marked it so; its
stamps then all read :data:`STAMP_DEAD` too). Every key hashes (in the
Manager, which alone computes it) to one bucket; every change of a key
(a write, delete, touch, eviction, expiry; every bucket for a clear) stores
a new, never used stamp in its bucket before the reply to the request that
made it. A TRACK_GET reads like GET and also answers the key's bucket and
the stamp there; a process answers from its copy only while that bucket
still holds that stamp. Nothing is recorded per process or per key, and a
write costs the same however many processes hold the key. A change of
another key of the same bucket also invalidates a copy (65,536 buckets: a
worker holding 2,000 copies loses one to 3% of the writes of keys it does
not hold).

After the stamps' words (at :data:`SLOTS_OFFSET`) the file holds
:data:`SLOTS` *value slots* of :data:`SLOT_SIZE` bytes: the Manager keeps in
one the current value of a key that near caches read (a TRACK_GET answers
its ``slot`` and ``token``; ``slot`` -1: none), rewritten in place at every
change of the key before the stamp moves, so that a process whose copy's
stamp moved reads the new value there instead of asking the Manager. A slot
is four 8-byte words, then its payload: ``seq`` (odd while the Manager
writes the slot, a seqlock), ``token`` (whose slot it is: 0 when free),
``deadline`` (a float64, CLOCK_MONOTONIC; inf: none) and ``kind << 32 |
length`` (kind 1: ``length`` bytes of value; 2: a signed 64-bit int in the
first payload word). After the slots (at :data:`SLOT_READS_OFFSET`), one 8-byte
*read count* a slot, the only part a process maps writable: it adds one
when it takes a value from the slot (races may lose counts: the Manager only
weighs them). Only on x86-64 (whose aligned 8-byte loads and stores are
atomic and kept in order), see ``server/stamps.py``.
A tracker reports its process's hits now and then with RECENT: the keys hit
(at most :data:`MAX_RECENT` of them) become the most recently used in their
cache, as if read there, and ``hits`` counts into the cache's hits, so that
neither a cache's LRU order nor its hit rate is blind to near copies.

Events of a key reach its listeners in the order of the writes, and are
written to the listeners' sockets before the writer's reply is.

A named cache (``ns`` not empty) is created by its first write, with that
write's ``max_bytes``; every other request on a cache that does not exist
yet sees an empty one. Every request works on the store and on the caches
alike: one implementation serves both (:mod:`..server.namespace`).

A malformed frame ends the stream there: the requests before it (even in the
same read) are applied and answered, nothing after it is read, and the
connection is closed with the reason logged.

A reply is ``OK`` with the result, or ``ERR`` with ``[code, message]``
(codes in :mod:`django_clustershm.exceptions`). A well-formed request whose
arguments the Manager refuses (a wrong type, an unknown opcode) is answered
with ``ERR`` and the connection stays open; only a malformed frame (bad
magic, version or length, a payload that is not msgpack) closes it.
"""

from __future__ import annotations

import struct

import msgpack

from ..exceptions import ProtocolError

MAGIC = b"CS"
# 2: SET/ADD/SET_MANY carry the cache bounds (no CACHE_* opcodes); 3: SET_MANY's flat list, LOCK_CANCEL;
# 4: pushes unnumbered (counted by both ends), epoch slots, RECENT; 5: stamps instead of pushes;
# 6: value slots after the stamps (TRACK_GET answers slot and token)
VERSION = 6

#: The one struct format of the header: magic, version, opcode, request id, length.
HEADER = struct.Struct("!2sBBII")
HEADER_SIZE = HEADER.size  # 12

#: Default maximum payload of one frame (64 MiB): large values are welcome,
#: unbounded ones are not (the seed capped values at what one IPC message held).
DEFAULT_MAX_FRAME = 64 * 1024 * 1024
#: Maximum payload before a peer has authenticated.
HANDSHAKE_MAX_FRAME = 512
#: Room kept in a frame for everything around a value (key, args, msgpack tags).
FRAME_OVERHEAD = 64 * 1024
#: What one item of a batch costs in a frame beyond its key and value (msgpack tags).
ITEM_OVERHEAD = 16
#: A value (``bytes``) this large travels as a buffer of its own (:func:`encode_parts`: never copied into
#: its frame), and a frame this large is received into one buffer of its size (:meth:`FrameReader.room`):
#: a big value is copied once by the kernel each way, not joined and sliced. 256 KiB: above it a copy of
#: the value costs more than a second buffer in ``sendmsg()`` or an ``mmap()``; below it nothing changes.
BIG = 256 * 1024

# Requests.
PING = 0x01
GET = 0x02
SET = 0x03
ADD = 0x04
REMOVE = 0x05
HAS = 0x06
INCR = 0x07
TOUCH = 0x08
GET_MANY = 0x09
SET_MANY = 0x0A
DELETE_MANY = 0x0B
KEYS = 0x0C
CLEAR = 0x0D
STATS = 0x0E
# Locks (their own table: no cache or store operation touches them).
LOCK_ACQUIRE = 0x20
LOCK_RELEASE = 0x21
LOCK_EXTEND = 0x22
LOCK_STATUS = 0x23
LOCK_CANCEL = 0x24
# Listeners.
LISTEN = 0x30
UNLISTEN = 0x31
# Near caches (client-side caching with invalidation).
TRACKER = 0x38
TRACK_GET = 0x39
TRACK_GET_MANY = 0x3A
RECENT = 0x3C

#: The near-cache stamps file, beside the Manager's socket (see above).
STAMPS_SUFFIX = ".near"
#: Buckets of stamps in it (a power of two); the header word follows them.
STAMP_BUCKETS = 1 << 16
#: What a dead file's header and stamps read: never a live generation or stamp.
STAMP_DEAD = (1 << 64) - 1
#: Where the value slots start in the stamps file (after the stamps and the header word, page-aligned).
SLOTS_OFFSET = ((STAMP_BUCKETS + 1) * 8 + 4095) // 4096 * 4096
#: Value slots in the file, and the bytes of each (four header words, then the payload).
SLOTS = 4096
SLOT_SIZE = 1024
SLOT_PAYLOAD = SLOT_SIZE - 32
#: Where the slots' read counts start (an 8-byte count a slot, page-aligned: processes map them writable).
SLOT_READS_OFFSET = SLOTS_OFFSET + SLOTS * SLOT_SIZE

#: Keys one RECENT may name.
MAX_RECENT = 1024
# Expiry and key-space scans (#17: django-redis's ttl, persist, set(xx=True), keys, iter_keys, delete_pattern).
TTL = 0x40
PERSIST = 0x41
REPLACE = 0x42
KEYS_MATCH = 0x43
SCAN = 0x44
SCAN_DELETE = 0x45
# Handshake.
HELLO = 0x70
AUTH = 0x71
# Replies.
OK = 0x80
ERR = 0x81
# Pushes (0xC0-0xFF): sent by the Manager unasked, request id 0 (PUSH_QUEUED
# carries the id of the LOCK_ACQUIRE it is about; a later grant is a reply).
PUSH_MIN = 0xC0
PUSH_EVENT = 0xC0
PUSH_QUEUED = 0xC2

# What happened to a key, in PUSH_EVENT.
EVENT_SET = 1
EVENT_REMOVE = 2
EVENT_EXPIRE = 3
EVENT_EVICT = 4
EVENT_CLEAR = 5
#: Internal: the expiry changed (invalidates near caches; not told to listeners).
EVENT_TOUCH = 6
EVENT_NAMES = {
    EVENT_SET: "set",
    EVENT_REMOVE: "remove",
    EVENT_EXPIRE: "expire",
    EVENT_EVICT: "evict",
    EVENT_CLEAR: "clear",
}

OPCODE_NAMES = {
    value: name
    for name, value in list(globals().items())
    if name.isupper()
    and isinstance(value, int)
    and name not in {"VERSION", "HEADER_SIZE", "PUSH_MIN"}
    and not name.startswith(("DEFAULT_", "HANDSHAKE_", "FRAME_", "EVENT_", "ITEM_"))
}

_packer = msgpack.Packer(use_bin_type=True)
_pack = _packer.pack
_pack_array_header = _packer.pack_array_header
_pack_map_header = _packer.pack_map_header
_header_pack = HEADER.pack
_bin32 = struct.Struct("!BI").pack  # msgpack's bin 32 header: 0xC6 and the length


class Spliced:
    """One msgpack ``bin`` value whose bytes are the concatenation of ``parts``,
    sent as those buffers (:func:`encode_parts`) and never joined in the
    sender: a big ``bytes`` (or ``str``) value's pickle, made of a 7-byte head,
    the value's own buffer (or its UTF-8) and a 2-byte tail
    (:mod:`..client.serializer`). The receiver
    sees a plain ``bin``. Only :func:`encode_parts` knows it: given to
    :func:`encode` (msgpack) it fails loudly instead of packing a list."""

    __slots__ = ("parts", "size")

    def __init__(self, parts: tuple) -> None:
        self.parts = parts
        self.size = sum(map(len, parts))

    def __len__(self) -> int:
        return self.size

    def __bytes__(self) -> bytes:
        return b"".join(self.parts)


def encode(op: int, rid: int, obj) -> bytes:
    """One frame: the header and the msgpack payload of ``obj``, in one buffer."""
    payload = _pack(obj)
    return _header_pack(MAGIC, VERSION, op, rid, len(payload)) + payload


class BigList(list):
    """A reply array that holds a value of :data:`BIG` bytes or more (the engine's TRACK_GET reply for a
    big value): :func:`encode_parts` sends it as a buffer of its own. The Manager gives encode_parts only
    these, BigMaps and big bytes; any other reply is encoded whole, without looking at its items."""

    __slots__ = ()


class BigMap(dict):
    """A reply map that holds a value of :data:`BIG` bytes or more (the Manager's engine marks its
    GET_MANY and TRACK_GET_MANY replies so): :func:`encode_parts` sends its big values as buffers of
    their own. A plain dict is encoded whole, without looking at its values (a get_many of small
    values pays nothing for the big ones)."""

    __slots__ = ()


def _holds_big(items) -> bool:
    """Whether list ``items`` holds a big value, or a list that holds one (SET_MANY's items)."""
    for item in items:
        kind = type(item)
        if kind is bytes:
            if len(item) >= BIG:
                return True
        elif kind is Spliced or kind is BigMap or kind is BigList or (kind is list and _holds_big(item)):
            return True
    return False


def _add_part(item, small: list, parts: list) -> list:
    """Append ``item``, packed, to the frame being made: small bytes to ``small``
    (joined later), each big buffer to ``parts`` on its own. Returns the new ``small``."""
    kind = type(item)
    if kind is Spliced or (kind is bytes and len(item) >= BIG):
        pieces, size = (item.parts, item.size) if kind is Spliced else ((item,), len(item))
        small.append(_bin32(0xC6, size))
        for piece in pieces:
            if len(piece) >= BIG:
                parts.append(b"".join(small))
                parts.append(piece)
                small = []
            else:
                small.append(piece)
        return small
    if kind is BigList or (kind is list and _holds_big(item)):
        small.append(_pack_array_header(len(item)))
        for sub in item:
            small = _add_part(sub, small, parts)
        return small
    if kind is BigMap:
        small.append(_pack_map_header(len(item)))
        for key, value in item.items():
            small.append(_pack(key))
            small = _add_part(value, small, parts)
        return small
    small.append(_pack(item))
    return small


def encode_parts(op: int, rid: int, obj) -> list:
    """:func:`encode` as a list of buffers to send in turn (``sendmsg()``), the same bytes on the wire, and
    each ``bytes`` of :data:`BIG` bytes or more a buffer of its own: ``obj`` itself, or an item of it at
    any depth through lists, BigLists and BigMaps (SET_MANY's items, TRACK_GET's and GET_MANY's replies).
    A big value goes from the store (or the serializer) to the socket without a copy. A :class:`Spliced`
    is one ``bin`` of its parts, each big part a buffer of its own. Anything else, including every small
    frame, is ``[encode(op, rid, obj)]``."""
    kind = type(obj)
    if kind is bytes:
        if len(obj) < BIG:
            return [encode(op, rid, obj)]
        return [_header_pack(MAGIC, VERSION, op, rid, 5 + len(obj)) + _bin32(0xC6, len(obj)), obj]
    if kind is not BigMap and kind is not BigList:
        if (kind is not list and kind is not tuple) or not _holds_big(obj):
            return [encode(op, rid, obj)]
        obj = BigList(obj)  # known to hold one: not looked through a second time
    # msgpack is concatenative: an array's (or a map's) header, then each item packed alone, is it packed.
    parts: list = []
    small = _add_part(obj, [], parts)
    if small:
        parts.append(b"".join(small))
    parts[0] = _header_pack(MAGIC, VERSION, op, rid, sum(map(len, parts))) + parts[0]
    return parts


def parts_size(parts: list) -> int:
    """Bytes of a frame made by :func:`encode_parts`."""
    return len(parts[0]) if len(parts) == 1 else sum(map(len, parts))


def decode_payload(payload: bytes):
    """Decode a payload; any malformation becomes :class:`ProtocolError`."""
    try:
        return msgpack.unpackb(payload, raw=False, use_list=True, strict_map_key=True)
    except Exception as exc:  # msgpack raises several unrelated types
        raise ProtocolError(f"malformed payload: {exc}") from exc


_u32 = struct.Struct("!I").unpack_from


def decode_reply(payload):
    """:func:`decode_payload` for a reply, except that in a big frame (a memoryview of its own buffer,
    :meth:`FrameReader.room`) a GET's value, a payload that is one ``bin``, is returned as a memoryview of
    that buffer, not copied into a new ``bytes``: the client's deserializer reads it from there. So is a
    TRACK_GET's (a near cache's read: an array of 6 whose first item is the value's ``bin``), the other
    five fields decoded as usual: decoding the array whole copied the value (9 ms at 16 MiB), and a near
    cache keeps a copy only of a value that fits its budget."""
    if type(payload) is memoryview:
        first = payload[0]
        if first == 0xC6 and len(payload) == 5 + _u32(payload, 1)[0]:
            return payload[5:]
        if first == 0x96 and payload[1] == 0xC6:
            end = 6 + _u32(payload, 2)[0]
            if end < len(payload):
                return [payload[6:end], *decode_payload(b"\x95" + bytes(payload[end:]))]
    return decode_payload(payload)


class BigBudget:
    """Bytes that big frames' buffers (:meth:`FrameReader.room`) may hold before their bytes arrive,
    shared by the readers given it: the Manager's connections. A big frame past it is received in
    chunks, as before #19, so peers that send a big frame's header and stop cannot make the Manager
    commit memory they did not send (a ``bytearray`` is zeroed, every page of it, when made)."""

    __slots__ = ("limit", "used")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0


class FrameReader:
    """Incremental frame parser: feed it bytes, take out whole frames.

    Used by the Manager for each connection and by the client, so both sides
    reject the same malformations with the same words. A large frame arrives
    in many reads; its chunks are kept in a list and joined once, when the
    header says they are all there (concatenating on every read would copy a
    32 MiB value a hundred times).

    A frame of :data:`BIG` bytes or more whose header has come is received
    into a buffer of its own size: :meth:`room` is the part still to come, for
    the caller's ``recv_into()``, and :meth:`filled` says how much came. Its
    payload is then a memoryview of that buffer, never joined nor sliced (a
    ``bytes`` one otherwise). (A ``bytearray``, not an anonymous ``mmap``
    that would be committed only as bytes arrive: fresh pages cost a fault
    each, 0.5 ms a MiB on the reference VM, and malloc reuses its heap.)
    """

    __slots__ = ("_big_filled", "_big_frame", "_chunks", "_have", "_need", "big", "budget", "error", "max_frame")

    def __init__(self, max_frame: int = HANDSHAKE_MAX_FRAME, budget: BigBudget | None = None) -> None:
        #: Shared by the readers of one server: what their big frames' buffers may hold unfilled.
        self.budget = budget
        self._chunks: list[bytes] = []
        self._have = 0
        self._need = HEADER_SIZE
        #: The payload buffer of the big frame being received, or None (the
        #: callers' cheap test before a receive: then :meth:`room`).
        self.big: memoryview | None = None
        # The bytes in it, and its (opcode, rid).
        self._big_filled = 0
        self._big_frame = (0, 0)
        self.max_frame = max_frame
        #: The malformation met after the frames last returned: the stream
        #: ends there (the next feed raises it).
        self.error: ProtocolError | None = None

    def pending(self) -> int:
        """Bytes received but not yet part of a returned frame."""
        return self._have

    def room(self) -> memoryview:
        """The rest of the big frame being received (only while :attr:`big` is
        not None; otherwise read and :meth:`feed`), to ``recv_into()``, then
        call :meth:`filled`. Receiving into it never reads past the frame."""
        big = self.big
        if big is None:
            raise ValueError("no big frame is being received")
        return big[self._big_filled :]

    def filled(self, count: int) -> list[tuple[int, int, bytes | memoryview]]:
        """``count`` bytes were received into :meth:`room`; the big frame if it is complete now."""
        big = self.big
        if big is None:
            raise ValueError("no big frame is being received")
        self._big_filled += count
        self._have += count
        if self._big_filled < len(big):
            return []
        op, rid = self._big_frame
        if self.budget is not None:
            self.budget.used -= len(big)
        self.big = None
        self._big_filled = self._have = 0
        self._need = HEADER_SIZE
        frames: list[tuple[int, int, bytes | memoryview]] = [(op, rid, big)]
        return frames

    def discard(self) -> None:
        """The stream is over (its connection closed): give back what a big frame under way held."""
        if self.big is not None and self.budget is not None:
            self.budget.used -= len(self.big)
        self.big = None
        self._chunks = []
        self._have = 0

    def _start_big(self, op: int, rid: int, length: int, head) -> bool:
        """Receive the rest of a big frame into a buffer of its size, ``head`` its first bytes; False
        (receive it in chunks) if the budget shared with other readers cannot hold it now."""
        budget = self.budget
        if budget is not None:
            if budget.used + length > budget.limit:
                return False
            budget.used += length
        buf = memoryview(bytearray(length))
        buf[: len(head)] = head
        self.big = buf
        self._big_filled = self._have = len(head)
        self._big_frame = (op, rid)
        return True

    def feed(self, data) -> list[tuple[int, int, bytes | memoryview]]:
        """Add ``data``; return the complete frames as ``(opcode, rid, payload)``.

        A malformed header raises ProtocolError; if whole frames came before
        it, they are returned first and the error is kept in :attr:`error`
        (the stream is over: the next feed raises it). So a peer's requests
        sent before its bad frame are applied and answered, none after it.
        """
        if self.error is not None:
            raise self.error
        big = self.big
        if big is not None:
            # A big frame under way, fed rather than received into room(): copy it in.
            take = min(len(data), len(big) - self._big_filled)
            big[self._big_filled : self._big_filled + take] = data[:take]
            done = self.filled(take)
            if not done or take == len(data):
                return done
            try:
                return done + self.feed(data[take:])
            except ProtocolError as exc:
                self.error = exc
                return done
        if self._chunks:
            self._chunks.append(data)
            self._have += len(data)
            if self._have < self._need:
                return []
            buf = b"".join(self._chunks)
            self._chunks = []
        else:
            buf = data
            end = len(buf)
            if end >= HEADER_SIZE:
                # The common case, one whole frame (a request, a reply): no loop.
                magic, version, op, rid, length = HEADER.unpack_from(buf)
                if end == HEADER_SIZE + length and magic == MAGIC and version == VERSION and length <= self.max_frame:
                    return [(op, rid, buf[HEADER_SIZE:])]
        frames: list[tuple[int, int, bytes | memoryview]] = []
        pos = 0
        end = len(buf)
        need = HEADER_SIZE
        while end - pos >= HEADER_SIZE:
            magic, version, op, rid, length = HEADER.unpack_from(buf, pos)
            error = None
            if magic != MAGIC:
                error = ProtocolError(f"bad magic {magic!r}")
            elif version != VERSION:
                error = ProtocolError(f"unsupported protocol version {version} (this side speaks {VERSION})")
            elif length > self.max_frame:
                error = ProtocolError(f"frame of {length} bytes exceeds the maximum of {self.max_frame}")
            if error is not None:
                if not frames:
                    raise error
                self.error = error
                self._chunks, self._have, self._need = [], 0, HEADER_SIZE
                return frames
            stop = pos + HEADER_SIZE + length
            if stop > end:
                if length >= BIG and self._start_big(op, rid, length, memoryview(buf)[pos + HEADER_SIZE :]):
                    return frames
                need = HEADER_SIZE + length
                break
            frames.append((op, rid, buf[pos + HEADER_SIZE : stop]))
            pos = stop
        if pos < end:
            rest = buf[pos:]
            self._chunks = [rest]
            self._have = len(rest)
            self._need = need
        else:
            self._have = 0
            self._need = HEADER_SIZE
        return frames
