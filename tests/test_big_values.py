"""Big values (#19 part 4): a value of BIG bytes or more goes from the store to the socket, and from the
socket to the deserializer, as a buffer of its own (encode_parts, FrameReader.room, decode_reply); the
bytes on the wire are the same as ever. Speed is measured in bench/bench_big.py, never asserted here."""

from __future__ import annotations

import asyncio
import os
import pickle
import socket
import threading
import time

import msgpack
import pytest

from django_clustershm import Manager
from django_clustershm.client.serializer import Serializer
from django_clustershm.compressors import ZlibCompressor
from django_clustershm.exceptions import ProtocolError, ValueTooLarge
from django_clustershm.serializers import JSONSerializer
from django_clustershm.wire import frames as P

from .helpers import ManagerProcess, embedded_client, run_forked, socket_client, wait_until
from .test_manager import _handshaked_socket, _listening_socket

BIG = P.BIG
MIB = 1 << 20


@pytest.mark.parametrize(
    "obj",
    [
        b"x" * BIG,
        b"x" * (BIG - 1),
        os.urandom(3 * BIG),
        ["ns", "key", os.urandom(BIG + 7), None, [300, 3, 1 << 30]],
        ["ns", ["k1", os.urandom(BIG), "k2", b"small", "k3", 7, "k4", os.urandom(BIG + 2)], None],  # SET_MANY's
        ["ns", [["deeper", os.urandom(BIG)], []], [1, 2]],
        ("ns", os.urandom(BIG), os.urandom(BIG + 1), 5),
        [os.urandom(BIG)],
        [b"small", 1, "two", None],
        P.BigList([os.urandom(BIG), None, 3, 4, -1, 0]),  # a TRACK_GET's reply, marked by the engine
        P.BigMap({"k": os.urandom(BIG), "small": b"s", "n": 1}),  # GET_MANY's
        P.BigMap({"k1": [os.urandom(BIG), None, 3, 4, -1, 0], "k2": [b"s", 1.5, 3, 4, 7, 9]}),  # TRACK_GET_MANY's
        {"k": os.urandom(BIG)},  # a plain dict is encoded whole, its values not looked at
        {"k": b"small", "l": [1, 2]},
        None,
        12345,
    ],
    ids=lambda obj: type(obj).__name__,
)
def test_encode_parts_puts_the_same_bytes_on_the_wire_as_encode(obj):
    parts = P.encode_parts(P.OK, 77, obj)
    assert b"".join(bytes(p) for p in parts) == P.encode(P.OK, 77, obj)
    assert P.parts_size(parts) == len(P.encode(P.OK, 77, obj))

    def flat(x):
        if type(x) is P.BigMap:
            return [y for value in x.values() for y in flat(value)]
        return [x] if isinstance(x, bytes) else [y for item in x for y in flat(item)] if isinstance(x, list) else []

    for item in flat(obj if not isinstance(obj, tuple) else list(obj)):
        if len(item) >= BIG:
            assert any(p is item for p in parts), "a big value was copied into the frame"
    if type(obj) is dict:
        assert len(parts) == 1


@pytest.mark.parametrize(
    "parts",
    [
        (b"\x80\x05B" + (BIG).to_bytes(4, "little"), os.urandom(BIG), b"\x94."),
        (b"head", os.urandom(3 * BIG), os.urandom(BIG + 1), b"tail"),
        (b"only", b"small"),
    ],
    ids=["pickle", "two-big", "all-small"],
)
def test_a_spliced_value_is_one_bin_of_its_parts_and_its_big_parts_are_not_copied(parts):
    spliced = P.Spliced(parts)
    joined = b"".join(parts)
    for obj in (["ns", "key", spliced, None], [spliced], ["ns", ["k", spliced, "k2", b"v"], None]):
        frame = P.encode_parts(P.SET, 9, obj)

        def plain_of(x):
            return joined if x is spliced else [plain_of(y) for y in x] if isinstance(x, list) else x

        plain = plain_of(obj)
        wire = b"".join(bytes(p) for p in frame)
        assert P.decode_payload(wire[P.HEADER_SIZE :]) == plain and P.parts_size(frame) == len(wire)
        assert P.HEADER.unpack(wire[: P.HEADER_SIZE])[2:] == (P.SET, 9, len(wire) - P.HEADER_SIZE)
        if len(joined) >= 1 << 16:  # (a bin of that size is a bin 32 in msgpack too: the very same bytes)
            assert wire == P.encode(P.SET, 9, plain)
        assert len(spliced) == len(joined) == spliced.size
        for part in parts:
            if len(part) >= BIG:
                assert any(p is part for p in frame), "a big part was copied into the frame"
    assert bytes(spliced) == joined


def test_a_spliced_value_given_to_plain_encode_fails_instead_of_packing_a_list():
    with pytest.raises(TypeError):
        P.encode(P.SET_MANY, 1, ["ns", ["k", P.Spliced((b"a", b"b"))], None])


def _stream(*frames: bytes) -> bytes:
    return b"".join(frames)


def test_a_big_frame_is_received_into_one_buffer_then_small_frames_as_before():
    value = os.urandom(5 * BIG + 3)
    big = P.encode(P.OK, 1, value)
    small = P.encode(P.OK, 2, ["after"])
    a, b = socket.socketpair()
    with a, b:
        sender = threading.Thread(target=a.sendall, args=(_stream(big, small),))
        sender.start()
        reader = P.FrameReader(max_frame=64 * MIB)
        got = reader.feed(b.recv(1000))  # the header and the start of the payload
        assert got == [] and reader.big is not None
        receives = 0
        while reader.big is not None:
            got += reader.filled(b.recv_into(reader.room()))
            receives += 1
        sender.join()
        ((op, rid, payload),) = got
        assert (op, rid) == (P.OK, 1) and type(payload) is memoryview
        assert reader.pending() == 0
        view = P.decode_reply(payload)
        assert type(view) is memoryview and view == value  # the value in place, not copied
        assert P.decode_payload(payload) == value
        rest = b""
        while len(rest) < len(small):
            rest += b.recv(65536)
        assert reader.feed(rest) == [(P.OK, 2, small[P.HEADER_SIZE :])]


def test_a_big_frame_fed_in_odd_pieces_and_a_bad_header_after_it():
    value = os.urandom(2 * BIG)
    stream = _stream(
        P.encode(P.SET, 1, ["", "a", value, None, None]),
        P.encode(P.PING, 2, []),
        P.encode(P.GET, 3, ["", "a"]),
        b"XX" + bytes(10),  # a bad magic: the stream ends there
    )
    reader = P.FrameReader(max_frame=64 * MIB)
    got = []
    for start in range(0, len(stream), 7777):
        got += reader.feed(stream[start : start + 7777])
    assert isinstance(reader.error, ProtocolError)  # the frames before it are returned first
    with pytest.raises(ProtocolError, match="bad magic"):
        reader.feed(b"more")
    assert [(op, rid) for op, rid, _ in got] == [(P.SET, 1), (P.PING, 2), (P.GET, 3)]
    assert P.decode_payload(got[0][2]) == ["", "a", value, None, None]
    assert P.decode_reply(got[2][2]) == ["", "a"]  # small: decoded as ever


def test_decode_reply_copies_nothing_only_for_a_bare_big_bin_or_a_track_gets_value():
    value = os.urandom(BIG)
    listed = memoryview(bytearray(msgpack.packb([value, 1])))
    assert P.decode_reply(listed) == [value, 1]
    bare = memoryview(bytearray(msgpack.packb(value)))
    assert type(P.decode_reply(bare)) is memoryview and P.decode_reply(bare) == value
    assert P.decode_reply(msgpack.packb(value)) == value  # bytes: a small frame's payload
    # A TRACK_GET's reply (a near cache's read): [value, ttl, bucket, stamp, slot, token].
    for fields in ([None, 7, 12, -1, 0], [2.5, 65535, 1 << 40, 4095, 123456789]):
        reply = [value, *fields]
        decoded = P.decode_reply(memoryview(bytearray(msgpack.packb(reply))))
        assert type(decoded[0]) is memoryview and decoded == reply
    for broken in ([value, 1, 2, 3, 4], [value, 1, 2, 3, 4, 5, 6]):  # not six fields: refused, as msgpack would
        payload = bytearray(msgpack.packb([value, 1, 2, 3, 4, 5]))
        payload[1 + 5 + BIG :] = msgpack.packb(broken[1:])[1:]  # the five fields' bytes replaced
        with pytest.raises(ProtocolError):
            P.decode_reply(memoryview(payload))


def test_the_engine_marks_the_replies_that_hold_a_big_value():
    """The Manager gives encode_parts only big bytes and marked replies (BigList, BigMap), and
    encodes every other reply whole without looking at its items: a TRACK_GET's and a
    GET_MANY's of small values pay nothing for big ones."""
    from django_clustershm.server.engine import Engine

    engine = Engine()
    session = engine.open_session(pid=os.getpid(), peer_uid=os.getuid())
    big, small = os.urandom(BIG), b"small"
    for rid, (key, value) in enumerate({"big": big, "small": small}.items()):
        engine.dispatch(session, P.SET, ["", key, value, None], rid)

    def reply(op, args):
        return engine.dispatch(session, op, args, 99)

    for first in (False, True):
        assert type(reply(P.TRACK_GET, ["", "big", first])) is P.BigList
        assert type(reply(P.TRACK_GET, ["", "small", first])) is list
    for op in (P.GET_MANY, P.TRACK_GET_MANY):
        assert type(reply(op, ["", ["big", "small"]])) is P.BigMap
        assert type(reply(op, ["", ["small", "missing"]])) is dict
    got = reply(P.GET_MANY, ["", ["big", "small"]])
    assert got == {"big": big, "small": small}
    engine.close_session(session)


def test_a_near_cache_keeps_a_big_value_as_bytes_and_never_one_over_its_budget(big_manager):
    """A near cache's miss of a big value reads it in place from its reply's buffer (decode_reply):
    a copy it keeps must be bytes of its own (a view would hold the whole buffer, uncounted), and a
    value over its budget is read, not kept."""
    client = socket_client(big_manager.address, big_manager.secret, timeout=30)
    try:
        near = client.cache("n", near_cache=(100, 2 * MIB, None, "always"))
        small, large = os.urandom(BIG + 1), os.urandom(3 * MIB)
        near.set("small", small)
        near.set("large", large)
        for _ in range(3):
            assert near.get("small") == small and near.get("large") == large
            assert near.get_many(["small", "large"]) == {"small": small, "large": large}
        cache = client._near["n"]
        assert list(cache._entries) == ["small"]
        entry = next(iter(cache._entries.values()))
        assert type(entry[0]) is bytes and cache.bytes <= 2 * MIB and cache.hits >= 4
    finally:
        client.shutdown()  # (its near caches' channel)
        client.close()


def test_every_serializer_reads_a_value_from_a_buffer():
    value = {"blob": "x" * BIG, "n": [1, 2, 3]}
    for serializer in (Serializer(), Serializer(JSONSerializer()), Serializer(None, ZlibCompressor())):
        data = serializer.dumps(value, 64 * MIB)
        assert serializer.loads(memoryview(bytearray(data))) == value
    assert Serializer().loads(memoryview(pickle.dumps(b"raw" * BIG))) == b"raw" * BIG


def test_a_big_bytes_or_str_value_is_pickled_without_a_copy_into_the_same_bytes_as_pickle():
    from django.utils.safestring import mark_safe

    from django_clustershm.client import serializer as S

    assert S.splices()  # this Python's pickle writes the layout the splice makes
    codec = Serializer()
    texts = [
        "a" * BIG,  # ASCII: one byte a character
        "é" * (BIG // 2),  # two bytes
        "€\udc80" * (BIG // 6 + 1),  # three, and a lone surrogate (pickle passes it through)
        "🙂x" * (BIG // 5 + 1),  # four
    ]
    for value in [os.urandom(BIG), os.urandom(BIG + 1), os.urandom(5 * BIG + 3), *texts]:
        data = codec.dumps(value, 64 * MIB, splice=True)
        assert type(data) is P.Spliced and len(data.parts) == 3
        if type(value) is bytes:
            assert data.parts[1] is value  # the value's own buffer
        assert bytes(data) == pickle.dumps(value, codec.protocol) and codec.loads(bytes(data)) == value
        assert codec.dumps(value, 64 * MIB) == bytes(data)  # without splice: the same bytes, as bytes
    # Only a big exact bytes or str, pickled and not compressed (a str subclass, such as
    # Django's SafeString, pickles as its class: not spliced):
    small = ["é" * (BIG // 2 - 1), "x" * (BIG - 1), b"x" * (BIG - 1)]
    for value in [*small, bytearray(BIG), mark_safe("x" * BIG), [b"x" * BIG]]:
        data = codec.dumps(value, 64 * MIB, splice=True)
        assert type(data) is bytes and codec.loads(data) == value
    for other in (Serializer(None, ZlibCompressor()), Serializer(JSONSerializer())):
        assert type(other.dumps(b"x" * BIG if other.serializer is None else "x" * BIG, 64 * MIB, splice=True)) is bytes
    # The limit counts the pickle's 9 bytes around the value, as pickle.dumps' length does:
    for value in (os.urandom(BIG), "é" * (BIG // 2)):
        with pytest.raises(ValueTooLarge):
            codec.dumps(value, BIG + 8, splice=True)
        assert len(codec.dumps(value, BIG + 9, splice=True)) == BIG + 9


@pytest.fixture
def big_manager():
    proc = ManagerProcess().start()
    yield proc
    proc.cleanup()


@pytest.mark.parametrize("size", [BIG, 16 * MIB])
def test_big_values_round_trip_through_the_socket_and_asyncio_clients(big_manager, size):
    client = socket_client(big_manager.address, big_manager.secret, timeout=30)
    try:
        value = os.urandom(size)
        client.set("big", value)
        assert client.get("big") == value
        client.set_many({"m1": value, "m2": b"small"})
        assert client.get_many(["m1", "m2"]) == {"m1": value, "m2": b"small"}
        cache = client.cache("c", serializer=Serializer(JSONSerializer()))
        cache.set("text", "é" * (size // 4))
        assert cache.get("text") == "é" * (size // 4)
        assert client.incr("n") == 1  # the stream is in step after the big frames

        async def main():
            aio = client.aio
            other = os.urandom(size)
            await aio.aset("abig", other)
            got = await asyncio.gather(aio.aget("abig"), aio.aget("big"), aio.aincr("n"))
            assert got == [other, value, 2]
            await aio.aclose()

        asyncio.run(main())
    finally:
        client.close()


def test_big_bytes_written_without_a_copy_are_stored_as_their_pickle_and_read_by_other_processes(
    big_manager, monkeypatch
):
    """set, add and replace of a big bytes value, from the socket and asyncio
    clients (which send it spliced, not copied: see Serializer.dumps): the
    Manager stores the bytes pickle.dumps makes, and forked processes read it."""
    from django_clustershm.client import socket as socket_module

    spliced = []

    def encode_parts(op, rid, obj):
        for item in obj:  # (SET_MANY's values are in a list in it)
            spliced.extend(x for x in (item if type(item) is list else [item]) if type(x) is P.Spliced)
        return P.encode_parts(op, rid, obj)

    monkeypatch.setattr(socket_module, "_encode_parts", encode_parts)
    addr, secret = big_manager.address, big_manager.secret
    client = socket_client(addr, secret, timeout=30)
    values: dict = {
        name: os.urandom(3 * MIB + i) for i, name in enumerate(("set", "add", "replace", "aset", "aadd", "areplace"))
    }
    values["set"] = "é🙂" * MIB  # a str: its UTF-8 goes spliced
    try:
        assert client.transport.splices and client.aio.transport.splices
        client.set("set", values["set"])
        assert client.add("add", values["add"]) and not client.add("add", b"other" * BIG)
        client.set("replace", b"old")
        assert client.replace("replace", values["replace"])
        cache = client.cache("c")  # a cache's writes carry its bounds after the value
        cache.set("set", values["set"])
        many = {"m1": os.urandom(MIB), "m2": "ü" * MIB, "m3": b"small", "m4": 5}
        client.set_many(many)

        async def main():
            aio = client.aio
            await aio.aset("aset", values["aset"])
            assert await aio.aadd("aadd", values["aadd"])
            await aio.aset("areplace", b"old")
            assert await aio.areplace("areplace", values["areplace"])
            await aio.aset_many({"am1": values["aset"], "am2": b"small"})
            await aio.aclose()

        asyncio.run(main())
        for key, value in values.items():
            assert bytes(client.transport.call(P.GET, ["", key])) == pickle.dumps(value, Serializer.protocol), key
        assert cache.get("set") == values["set"] and client.incr("n") == 1  # the stream is in step
        for key, value in [*many.items(), ("am1", values["aset"])]:
            stored = client.transport.call(P.GET, ["", key])
            assert (
                (stored == value) if type(value) is int else bytes(stored) == pickle.dumps(value, Serializer.protocol)
            )
        assert client.get_many([*many, "am1", "am2"]) == {**many, "am1": values["aset"], "am2": b"small"}
        # Every big value went spliced: 5 writes from the socket client (the refused add sent its value too)
        # and 2 of set_many's values; 3 writes from asyncio and 1 of aset_many's values.
        assert len(spliced) == 11
        assert {id(s.parts[1]) for s in spliced} >= {id(v) for v in values.values() if type(v) is bytes}

        def reader(i):
            other = socket_client(addr, secret, timeout=30)
            try:
                assert other.get_many(list(values)) == values
            finally:
                other.close()

        assert run_forked(2, reader) == [0, 0]
    finally:
        client.close()


def test_transports_that_cannot_send_buffers_get_the_pickle_as_bytes():
    from django_clustershm.client.aio import AsyncEmbeddedTransport
    from django_clustershm.client.embedded import EmbeddedTransport
    from django_clustershm.redisengine.transport import AsyncRedisTransport, RedisTransport

    for transport in (EmbeddedTransport, AsyncEmbeddedTransport, RedisTransport, AsyncRedisTransport):
        assert not getattr(transport, "splices", False), transport
    client = embedded_client()
    value = os.urandom(BIG)
    client.set("k", value)  # the engine takes bytes or an int only: a Spliced would be refused
    assert client.add("k2", value) and client.replace("k2", value)
    assert client.get("k") == value == client.get("k2")
    assert bytes(client.transport.call(P.GET, ["", "k"])) == pickle.dumps(value, Serializer.protocol)
    client.close()


def test_a_client_that_reads_a_big_reply_slowly_holds_up_nobody(big_manager):
    client = socket_client(big_manager.address, big_manager.secret, timeout=10)
    slow = _handshaked_socket(big_manager.address, big_manager.secret)
    try:
        value = os.urandom(16 * MIB)
        client.set("big", value)
        slow.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        slow.sendall(P.encode(P.GET, 1, ["", "big"]))
        for i in range(200):  # served throughout, while the slow reader has read nothing
            assert client.incr("n") == i + 1
        reader = P.FrameReader(max_frame=64 * MIB)
        got: list = []
        reads = 0
        while not got:  # 64 KiB at a time, the other client served in between
            if reader.big is not None:
                got = reader.filled(slow.recv_into(reader.room()[: 64 * 1024]))
            else:
                got = reader.feed(slow.recv(4096))
            reads += 1
            if reads % 16 == 0:
                assert client.incr("n") == 200 + reads // 16
        ((op, rid, payload),) = got
        assert (op, rid) == (P.OK, 1) and pickle.loads(P.decode_reply(payload)) == value
        assert client.get("big") == value
    finally:
        slow.close()
        client.close()


def test_a_big_request_sent_slowly_or_cut_short_holds_up_nobody(big_manager):
    client = socket_client(big_manager.address, big_manager.secret, timeout=10)
    writer = _handshaked_socket(big_manager.address, big_manager.secret)
    quitter = _handshaked_socket(big_manager.address, big_manager.secret)
    try:
        value = os.urandom(4 * MIB)
        stored = pickle.dumps(value)  # what the client would send
        frame = P.encode(P.SET, 1, ["", "big", stored, None, None])
        quitter.sendall(P.encode(P.SET, 1, ["", "gone", stored, None, None])[: 2 * MIB])
        quitter.close()  # inside its frame: closed, logged, nothing stored
        wait_until(lambda: "ended inside a frame" in big_manager.log(), message="the cut-short frame is seen")
        for start in range(0, len(frame), MIB):
            writer.sendall(frame[start : start + MIB])
            time.sleep(0.01)
            assert client.incr("n") == start // MIB + 1  # served between the pieces
        reader = P.FrameReader()
        ((op, rid, _),) = reader.feed(writer.recv(512))
        assert (op, rid) == (P.OK, 1)
        assert client.get("big") == value and client.get("gone") is None
    finally:
        writer.close()
        client.close()


def test_a_listener_hears_a_big_value(big_manager):
    client = socket_client(big_manager.address, big_manager.secret, timeout=10)
    listener = _listening_socket(big_manager.address, big_manager.secret, "big:")
    try:
        value = os.urandom(2 * MIB)
        client.set("big:1", value)
        reader = P.FrameReader(max_frame=64 * MIB)
        got = []
        while not got:
            if reader.big is not None:
                got = reader.filled(listener.recv_into(reader.room()))
            else:
                got = reader.feed(listener.recv(65536))
        ((op, _rid, payload),) = got
        assert op == P.PUSH_EVENT
        sub_id, ns, key, event, sent = P.decode_payload(payload)
        assert (sub_id, ns, key, event) == (1, "", "big:1", P.EVENT_SET)
        assert pickle.loads(sent) == value
    finally:
        listener.close()
        client.close()


def test_big_requests_buffers_are_bounded_for_all_connections_together():
    """A big request is received into a buffer of its size once its header is in; what such buffers
    hold before their bytes come is bounded for all connections together (BigBudget): past it a big
    frame is received in chunks, as before, so peers that send headers and stop commit nothing they
    did not send. A connection closed mid-frame gives its share back."""
    manager = Manager(max_total_output=4 * MIB).start()
    client = socket_client(manager.address, manager.secret, timeout=10)
    socks = []
    try:
        value = pickle.dumps(os.urandom(3 * MIB))
        frame = P.encode(P.SET, 1, ["", "k", value, None, None])
        first = _handshaked_socket(manager.address, manager.secret)
        socks.append(first)
        first.sendall(frame[:1000])  # a header and a little: a 3 MiB buffer, counted
        wait_until(lambda: manager._inbound.used == len(frame) - P.HEADER_SIZE, message="the first buffer")
        second = _handshaked_socket(manager.address, manager.secret)
        socks.append(second)
        second.sendall(frame[:1000])  # over the budget: chunks, nothing more counted
        assert client.incr("n") == 1  # the Manager serves the others meanwhile
        assert manager._inbound.used == len(frame) - P.HEADER_SIZE
        first.close()  # mid-frame: its share comes back
        wait_until(lambda: manager._inbound.used == 0, message="the closed connection's share")
        second.sendall(frame[1000:])
        ((op, rid, _),) = P.FrameReader().feed(second.recv(512))
        assert (op, rid) == (P.OK, 1) and client.get("k") == pickle.loads(value)
        third = _handshaked_socket(manager.address, manager.secret)
        socks.append(third)
        third.sendall(frame)  # room again: received into one buffer, given back once complete
        ((op, rid, _),) = P.FrameReader().feed(third.recv(512))
        assert (op, rid) == (P.OK, 1) and manager._inbound.used == 0
    finally:
        for sock in socks:
            sock.close()
        client.close()
        manager.close()
