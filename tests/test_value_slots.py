"""Value slots: the Manager keeps the values that near caches read in shared memory (#19).

A near copy whose stamp moved refills itself from its key's slot, with no
round trip. These tests read the slots as a worker does (the client's
:meth:`Tracker.read_slot`, on the Manager's real file) from this process and
from forked ones, against a Manager in its own process; the idle rule is
tested on an engine with a clock of its own.
"""

import math
import mmap
import os
import struct
import time
from types import SimpleNamespace

import pytest

from django_clustershm.client.near import Tracker
from django_clustershm.server import stamps as S
from django_clustershm.server.engine import Engine
from django_clustershm.wire import frames as P

from .helpers import fork_call, reap, skip_or_fail, wait_until
from .test_near_cache import _raw_client


@pytest.fixture(autouse=True)
def _x86_64():
    if not S.SLOTS_OK:
        skip_or_fail("value slots are x86-64 only: the Manager gives none on this CPU")


def _reader(address: str, generation: int) -> Tracker:
    """The client's tracker, mapping the Manager's file as a worker does (no channel)."""
    tracker = Tracker(SimpleNamespace(stamps_file=address + P.STAMPS_SUFFIX))  # type: ignore[arg-type]
    tracker._map_stamps(generation)
    assert tracker.stamps is not None and tracker._slots is not None
    return tracker


@pytest.fixture
def raw(cluster):
    """``(call, reader, generation)``: a raw connection made its process's
    tracker channel, and the Manager's file mapped as a worker maps it."""
    worker, call = _raw_client(cluster)
    _sid, generation = call(P.TRACKER, [])
    reader = _reader(cluster.address, generation)
    yield call, reader, generation
    reader.drop()
    worker.close()


def test_a_keys_slot_holds_its_value_before_the_writers_reply(raw):
    call, reader, _generation = raw
    call(P.SET, ["", "k", b"v1", None])
    value, _ttl, _bucket, _stamp, slot, token = call(P.TRACK_GET, ["", "k"])
    assert value == b"v1" and 0 <= slot < P.SLOTS and token > 0
    assert reader.read_slot(slot, token) == (b"v1", math.inf)
    assert reader.read_slot(slot, token + 1) is None  # another fill's token: not ours
    # Every change is in the slot when the writer's reply arrives.
    call(P.SET, ["", "k", b"v2", None])
    assert reader.read_slot(slot, token) == (b"v2", math.inf)
    call(P.SET_MANY, ["", ["k", b"v3"], None])
    assert reader.read_slot(slot, token) == (b"v3", math.inf)
    before = time.monotonic()
    call(P.TOUCH, ["", "k", 30])
    data, deadline = reader.read_slot(slot, token)
    assert data == b"v3" and before + 30 <= deadline <= time.monotonic() + 30  # the Manager's own deadline
    call(P.SET, ["", "n", 1, None])
    _v, _t, _b, _s, nslot, ntoken = call(P.TRACK_GET, ["", "n"])
    assert nslot != slot and reader.read_slot(nslot, ntoken) == (1, math.inf)
    call(P.INCR, ["", "n", -(2**40), None, None])
    assert reader.read_slot(nslot, ntoken) == (1 - 2**40, math.inf)  # ints stay ints
    # A value too large for a slot: it is freed, and such a value gets none.
    call(P.SET, ["", "k", b"x" * (P.SLOT_PAYLOAD + 1), None])
    assert reader.read_slot(slot, token) is None
    assert call(P.TRACK_GET, ["", "k"])[4:] == [-1, 0]
    call(P.SET, ["", "k", b"x" * P.SLOT_PAYLOAD, None])  # the largest that fits
    _v, _t, _b, _s, slot, token = call(P.TRACK_GET, ["", "k"])
    assert slot >= 0 and reader.read_slot(slot, token) == (b"x" * P.SLOT_PAYLOAD, math.inf)
    # A delete frees the slot; a fill after it gets a new token.
    call(P.REMOVE, ["", "k"])
    assert reader.read_slot(slot, token) is None
    call(P.SET, ["", "k", b"v4", None])
    _v, _t, _b, _s, slot2, token2 = call(P.TRACK_GET, ["", "k"])
    assert token2 != token and reader.read_slot(slot2, token2) == (b"v4", math.inf)
    # A clear frees every slot of its namespace.
    call(P.SET_MANY, ["", ["a", b"A", "b", b"B"], None])
    many = call(P.TRACK_GET_MANY, ["", ["a", "b", "absent"]])
    assert set(many) == {"a", "b"}
    assert [reader.read_slot(s, t)[0] for _v, _t, _b, _s, s, t in many.values()] == [b"A", b"B"]
    near = call(P.STATS, [])["near"]
    assert near["slots"] == 4 and near["slot_writes"] >= 8  # k, n, a, b
    call(P.CLEAR, [""])
    assert all(reader.read_slot(s, t) is None for _v, _t, _b, _s, s, t in many.values())
    assert reader.read_slot(slot2, token2) is None
    assert call(P.STATS, [])["near"]["slots"] == 0


def test_expiry_and_eviction_free_the_slot(raw):
    call, reader, _generation = raw
    bounds = [2, 3, 1 << 20]  # a cache of at most two entries (MAX_ENTRIES, CULL_FREQUENCY, MAX_BYTES)
    call(P.SET, ["c", "a", b"A", None, bounds])
    _v, _t, _b, _s, aslot, atoken = call(P.TRACK_GET, ["c", "a"])
    call(P.SET, ["c", "t", b"T", 0.2, bounds])
    _v, ttl, _b, _s, tslot, ttoken = call(P.TRACK_GET, ["c", "t"])
    assert 0 < ttl <= 0.2 and reader.read_slot(tslot, ttoken)[0] == b"T"
    # The Manager's reaper expires "t": its slot goes.
    wait_until(lambda: reader.read_slot(tslot, ttoken) is None, timeout=5, message="the expiry freed the slot")
    assert reader.read_slot(aslot, atoken) == (b"A", math.inf)
    for key in ("x", "y", "z"):
        call(P.SET, ["c", key, b"X", None, bounds])  # culls "a" in the Manager
    assert call(P.GET, ["c", "a"]) is None
    assert reader.read_slot(aslot, atoken) is None


def test_slots_go_to_the_most_recently_filled_keys(raw):
    call, reader, _generation = raw
    keys = [f"k{i}" for i in range(P.SLOTS + 1)]
    call(P.SET_MANY, ["", [x for key in keys for x in (key, key.encode())], None])
    held = {}
    for start in range(0, P.SLOTS, 512):
        reply = call(P.TRACK_GET_MANY, ["", keys[start : start + 512]])
        held.update({key: tuple(entry[4:]) for key, entry in reply.items()})
    assert len({slot for slot, _ in held.values()}) == P.SLOTS  # every slot, once
    call(P.TRACK_GET, ["", "k0"])  # filled again: now the most recent
    _v, _t, _b, _s, slot, token = call(P.TRACK_GET, ["", keys[-1]])
    assert (slot, token) != (-1, 0) and slot == held["k1"][0]  # k1 was the least recently filled
    assert reader.read_slot(*held["k1"]) is None and reader.read_slot(*held["k0"]) == (b"k0", math.inf)
    assert reader.read_slot(slot, token) == (keys[-1].encode(), math.inf)
    assert call(P.STATS, [])["near"]["slots"] == P.SLOTS
    call(P.SET, ["", "k1", b"new", None])  # no slot any more: nothing to write, nothing breaks
    assert call(P.TRACK_GET, ["", "k1"])[0] == b"new"


@pytest.fixture
def timed(tmp_path):
    """``(engine, session, now)``: an engine with a stamps file and a clock of
    its own (``now[0]``), and a session made its process's tracker channel."""
    now = [100.0]
    engine = Engine(clock=lambda: now[0])
    engine.stamps = S.Stamps(str(tmp_path / "m.sock") + P.STAMPS_SUFFIX, clock=engine.clock)
    session = engine.open_session()
    engine.dispatch(session, P.TRACKER, [])
    yield engine, session, now
    engine.stamps.close(dead=True)


def test_a_slot_unread_for_a_while_is_freed_at_its_keys_next_change(timed):
    engine, session, now = timed
    engine.dispatch(session, P.SET, ["", "k", b"v1", None])
    engine.dispatch(session, P.SET, ["", "r", b"r1", None])
    slot = engine.dispatch(session, P.TRACK_GET, ["", "k"])[4]
    rslot = engine.dispatch(session, P.TRACK_GET, ["", "r"])[4]
    assert engine.stamps.slots_used == 2
    now[0] += S.SLOT_IDLE * 0.9
    engine.dispatch(session, P.RECENT, ["", 1, ["r"]])  # "r" is still read from near copies
    engine.dispatch(session, P.SET, ["", "k", b"v2", None])  # within SLOT_IDLE of the fill: rewritten
    assert {key: record[0] for key, record in engine._slotted[""].items()} == {"k": slot, "r": rslot}
    now[0] += S.SLOT_IDLE * 0.2  # past SLOT_IDLE since "k"'s fill; not since "r"'s report
    engine.dispatch(session, P.SET, ["", "r", b"r2", None])
    engine.dispatch(session, P.SET, ["", "k", b"v3", None])
    assert list(engine._slotted[""]) == ["r"] and engine.stamps.slots_freed == 1
    assert engine.dispatch(session, P.STATS, [])["near"]["slots"] == 1
    assert engine.dispatch(session, P.TRACK_GET, ["", "k"])[4] >= 0  # a fill gives it one again


def test_a_slot_written_much_more_than_read_is_freed_and_held_back(timed):
    engine, session, now = timed
    reads = engine.stamps.reads
    engine.dispatch(session, P.SET, ["", "hot", b"h", None])
    engine.dispatch(session, P.SET, ["", "busy", b"b", None])
    hot = engine.dispatch(session, P.TRACK_GET, ["", "hot"])[4]
    assert engine.dispatch(session, P.TRACK_GET, ["", "busy"])[4] >= 0
    for n in range(S.SLOT_CHECK * 3):
        if n % 2:
            reads[hot] += 1  # "hot" is read once every two writes: its slot pays
        engine.dispatch(session, P.SET, ["", "hot", b"h%d" % n, None])
        engine.dispatch(session, P.SET, ["", "busy", b"b%d" % n, None])  # never read
    assert list(engine._slotted[""]) == ["hot"] and engine.stamps.slots_banned == 1
    assert engine.dispatch(session, P.STATS, [])["near"]["slots_banned"] == 1
    # A few reads per SLOT_CHECK rewrites are not enough either (fewer than 1 per SLOT_WRITES_PER_READ).
    reads[hot] += S.SLOT_CHECK // S.SLOT_WRITES_PER_READ - 1
    for n in range(S.SLOT_CHECK):
        engine.dispatch(session, P.SET, ["", "hot", b"x%d" % n, None])
    assert engine._slotted[""] == {} and engine.stamps.slots_banned == 2
    # Held back for SLOT_BAN seconds, then a fill gives a slot again.
    assert engine.dispatch(session, P.TRACK_GET, ["", "busy"])[4:] == [-1, 0]
    now[0] += S.SLOT_BAN
    assert engine.dispatch(session, P.TRACK_GET, ["", "busy"])[4] >= 0


def test_readers_in_other_processes_never_see_a_torn_slot(cluster):
    """Forked readers read a slot while the Manager rewrites it as fast as a
    writer can send: every read the seqlock lets through is one whole value
    (each value is one 8-byte number repeated, of a length that changes),
    and a reader never sees the numbers go back."""
    worker, call = _raw_client(cluster)
    _sid, generation = call(P.TRACKER, [])
    call(P.SET, ["", "k", struct.pack("<Q", 0), None])
    _v, _t, _b, _s, slot, token = call(P.TRACK_GET, ["", "k"])
    assert slot >= 0
    stop_r, stop_w = os.pipe()
    results = mmap.mmap(-1, 4096)  # each reader's [whole reads, refused reads, bad reads]

    def reader(i):
        tracker = _reader(cluster.address, generation)
        last = whole = refused = bad = 0
        while True:
            for _ in range(200):
                read = tracker.read_slot(slot, token)
                if read is None:
                    refused += 1
                    continue
                data = read[0]
                numbers = struct.unpack(f"<{len(data) // 8}Q", data)
                if len(data) % 8 or len(set(numbers)) != 1 or numbers[0] < last:
                    bad += 1
                else:
                    last = numbers[0]
                    whole += 1
            struct.pack_into("<3Q", results, i * 24, whole, refused, bad)
            if _readable(stop_r):
                break
        tracker.drop()

    pids = [fork_call(reader, i) for i in range(2)]
    check = _reader(cluster.address, generation)
    try:
        for n in range(1, 20_001):
            check.count_read(slot)  # read as often as written: the slot is kept (see Stamps.weigh)
            if not n % 1000:  # and named now and then, as a near cache's RECENT does (SLOT_IDLE)
                assert call(P.TRACK_GET, ["", "k"])[4:] == [slot, token]
            call(P.SET, ["", "k", struct.pack("<Q", n) * (1 + n % (P.SLOT_PAYLOAD // 8)), None])
        # The last write is whole in the slot, length and all.
        assert check.read_slot(slot, token) == (
            struct.pack("<Q", 20_000) * (1 + 20_000 % (P.SLOT_PAYLOAD // 8)),
            math.inf,
        )
    finally:
        check.drop()
        os.write(stop_w, b"xx")
        codes = [reap(pid, 30) for pid in pids]
        os.close(stop_r)
        os.close(stop_w)
        worker.close()
    assert codes == [0, 0]
    figures = [struct.unpack_from("<3Q", results, i * 24) for i in range(2)]
    results.close()
    assert all(whole > 0 for whole, _, _ in figures), figures
    assert all(bad == 0 for _, _, bad in figures), figures


def _readable(fd: int) -> bool:
    import select

    return bool(select.select([fd], [], [], 0)[0])
