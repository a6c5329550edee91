"""The wire protocol: round trips and every malformation, over real sockets."""

import os
import socket
import struct
import threading

import msgpack
import pytest

from django_clustershm.exceptions import AuthenticationFailed, ProtocolError
from django_clustershm.wire import frames as P
from django_clustershm.wire import handshake as H
from django_clustershm.wire.limits import Limits


def test_header_layout_is_twelve_bytes_big_endian():
    frame = P.encode(P.GET, 0x01020304, ["", "k"])
    assert frame[:2] == b"CS"
    assert frame[2] == P.VERSION
    assert frame[3] == P.GET
    assert frame[4:8] == b"\x01\x02\x03\x04"
    (length,) = struct.unpack("!I", frame[8:12])
    assert length == len(frame) - 12
    assert msgpack.unpackb(frame[12:]) == ["", "k"]


def test_round_trip_over_a_socketpair_in_small_pieces():
    a, b = socket.socketpair()
    with a, b:
        value = bytes(range(256)) * 1000
        frames = [P.encode(P.SET, i, ["", f"k{i}", value, None]) for i in range(1, 4)]

        def send():
            a.sendall(b"".join(frames))
            a.shutdown(socket.SHUT_WR)

        sender = threading.Thread(target=send)
        sender.start()
        reader = P.FrameReader(max_frame=1 << 20)
        got = []
        while chunk := b.recv(777):  # odd size: headers and payloads split anywhere
            got.extend(reader.feed(chunk))
        sender.join()
        assert reader.pending() == 0
        assert [(op, rid) for op, rid, _ in got] == [(P.SET, 1), (P.SET, 2), (P.SET, 3)]
        assert P.decode_payload(got[2][2]) == ["", "k3", value, None]


def test_byte_by_byte_feed():
    frame = P.encode(P.INCR, 7, ["", "n", 1, 0])
    reader = P.FrameReader(max_frame=1024)
    out = []
    for i in range(len(frame)):
        out.extend(reader.feed(frame[i : i + 1]))
    assert out == [(P.INCR, 7, frame[12:])]


def test_several_frames_in_one_chunk_then_a_partial_one():
    frames = P.encode(P.PING, 1, []) + P.encode(P.PING, 2, [])
    partial = P.encode(P.PING, 3, [])
    reader = P.FrameReader(max_frame=1024)
    got = reader.feed(frames + partial[:5])
    assert [rid for _, rid, _ in got] == [1, 2]
    assert reader.pending() == 5
    assert [rid for _, rid, _ in reader.feed(partial[5:])] == [3]


@pytest.mark.parametrize(
    "raw, message",
    [
        (b"XX" + bytes([P.VERSION, P.GET]) + struct.pack("!II", 1, 0), "bad magic"),
        (b"CS" + bytes([99, P.GET]) + struct.pack("!II", 1, 0), "unsupported protocol version 99"),
        (b"CS" + bytes([P.VERSION, P.GET]) + struct.pack("!II", 1, 10_000), "exceeds the maximum of 1024"),
    ],
)
def test_malformed_headers_are_rejected(raw, message):
    with pytest.raises(ProtocolError, match=message):
        P.FrameReader(max_frame=1024).feed(raw)


def test_oversized_frame_is_rejected_from_its_header_alone():
    # The reader must refuse before buffering the announced payload.
    reader = P.FrameReader(max_frame=100)
    with pytest.raises(ProtocolError, match="exceeds"):
        reader.feed(struct.pack("!2sBBII", b"CS", P.VERSION, P.SET, 1, 2**31))


def test_malformed_payload():
    with pytest.raises(ProtocolError, match="malformed payload"):
        P.decode_payload(b"\xc1")  # a msgpack byte that is never valid
    with pytest.raises(ProtocolError):
        P.decode_payload(b"\x92\x01")  # an array of 2 with 1 element: truncated
    with pytest.raises(ProtocolError):
        P.decode_payload(b"\xa3\xff\xfe\xfd")  # str with invalid UTF-8


def test_payload_never_unpickles():
    # A pickle inside a frame stays bytes: decoding a payload runs no code.
    import pickle

    evil = pickle.dumps(ValueError("x"))
    assert P.decode_payload(msgpack.packb(["", "k", evil, None], use_bin_type=True))[2] == evil


def test_handshake_proofs_differ_by_direction_and_secret():
    nonce = b"n" * 32
    assert H._proof(b"s", b"client", nonce) != H._proof(b"s", b"server", nonce)
    assert H._proof(b"s", b"client", nonce) != H._proof(b"t", b"client", nonce)
    assert len(H._proof(b"s", b"client", nonce)) == 32


def _frame(data: bytes):
    return P.FrameReader(P.HANDSHAKE_MAX_FRAME).feed(data)[0]


def test_both_halves_of_the_handshake_agree():
    server_nonce = os.urandom(H.NONCE_SIZE)
    op, _, payload = _frame(H.hello(server_nonce, 123))
    auth, client_nonce = H.answer_hello(op, payload, b"secret")
    op, _, payload = _frame(auth)
    assert H.check_auth(op, payload, b"secret", server_nonce) == (client_nonce, os.getpid())
    with pytest.raises(AuthenticationFailed):
        H.check_auth(op, payload, b"other secret", server_nonce)
    op, _, payload = _frame(H.welcome(b"secret", client_nonce, Limits(max_key=7), 5))
    limits, session_id = H.check_welcome(op, payload, b"secret", client_nonce)
    assert (limits.max_key, session_id) == (7, 5)
    with pytest.raises(AuthenticationFailed, match="does not hold the cluster secret"):
        H.check_welcome(op, payload, b"other secret", client_nonce)
    op, _, payload = _frame(H.refusal())
    with pytest.raises(AuthenticationFailed, match="refused"):
        H.check_welcome(op, payload, b"secret", client_nonce)
