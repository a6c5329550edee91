"""The handshake, both halves side by side (as in CPython's ``multiprocessing.connection``).

Request id 0, frames as in :mod:`.frames`::

    Manager -> client   HELLO  [VERSION, server_nonce, manager_pid]
    client  -> Manager  AUTH   [hmac(secret, b"client" + server_nonce), client_nonce, client_pid]
    Manager -> client   OK     [hmac(secret, b"server" + client_nonce), limits, session_id]
                     or ERR    [code, message], then the Manager closes

The secret never crosses the socket, and both sides prove they hold it
(``multiprocessing`` does the same challenge one way only). The Manager also
checks the peer's uid with ``SO_PEERCRED`` before it believes the proof, and
an unauthenticated peer may send at most :data:`~.frames.HANDSHAKE_MAX_FRAME`
bytes. Nothing here does I/O: the client drives it with blocking reads, the
Manager from its event loop.
"""

from __future__ import annotations

import hashlib
import hmac
import os

from ..exceptions import AuthenticationFailed, ProtocolError, error_from_code
from . import frames as F
from .limits import Limits

NONCE_SIZE = 32


def _proof(secret: bytes, side: bytes, nonce: bytes) -> bytes:
    return hmac.new(secret, side + nonce, hashlib.sha256).digest()


# -- the Manager's half -------------------------------------------------------------


def hello(server_nonce: bytes, manager_pid: int) -> bytes:
    """The first frame the Manager sends to a new peer."""
    return F.encode(F.HELLO, 0, [F.VERSION, server_nonce, manager_pid])


def check_auth(op: int, payload: bytes, secret: bytes, server_nonce: bytes) -> tuple[bytes, int]:
    """The peer's AUTH frame: ``(client_nonce, client_pid)`` if it proves the
    secret; ProtocolError if malformed, AuthenticationFailed if the proof is wrong."""
    if op != F.AUTH:
        raise ProtocolError("expected one AUTH frame")
    body = F.decode_payload(payload)
    if type(body) is not list or len(body) != 3:
        raise ProtocolError("malformed AUTH frame")
    proof, client_nonce, client_pid = body
    if type(proof) is not bytes or type(client_nonce) is not bytes or type(client_pid) is not int:
        raise ProtocolError("malformed AUTH frame")
    if not hmac.compare_digest(proof, _proof(secret, b"client", server_nonce)):
        raise AuthenticationFailed("wrong secret")
    return client_nonce, client_pid


def welcome(secret: bytes, client_nonce: bytes, limits: Limits, session_id: int) -> bytes:
    """The Manager's proof, and what the client must respect."""
    return F.encode(F.OK, 0, [_proof(secret, b"server", client_nonce), limits.as_dict(), session_id])


def refusal() -> bytes:
    return F.encode(F.ERR, 0, [AuthenticationFailed.code, "authentication failed"])


# -- the client's half ---------------------------------------------------------------


def answer_hello(op: int, payload: bytes, secret: bytes) -> tuple[bytes, bytes]:
    """The client's AUTH frame for the Manager's HELLO, and the nonce it must see proven."""
    if op == F.ERR:  # refused before the handshake (the Manager's connection cap)
        code, message = F.decode_payload(payload)
        raise error_from_code(code, message)
    if op != F.HELLO:
        raise ProtocolError(f"expected HELLO from the Manager, got opcode 0x{op:02x}")
    version, server_nonce, _manager_pid = F.decode_payload(payload)
    if version != F.VERSION:
        raise AuthenticationFailed(f"the Manager speaks protocol {version}, this client {F.VERSION}")
    client_nonce = os.urandom(NONCE_SIZE)
    return F.encode(F.AUTH, 0, [_proof(secret, b"client", server_nonce), client_nonce, os.getpid()]), client_nonce


def check_welcome(op: int, payload: bytes, secret: bytes, client_nonce: bytes) -> tuple[Limits, int]:
    """The Manager's answer to AUTH: ``(limits, session_id)``, or AuthenticationFailed."""
    reply = F.decode_payload(payload)
    if op == F.ERR:
        raise AuthenticationFailed(f"the Manager refused this client: {reply[1]}")
    proof, limits, session_id = reply
    if not hmac.compare_digest(proof, _proof(secret, b"server", client_nonce)):
        raise AuthenticationFailed("the process on the socket does not hold the cluster secret")
    return Limits(limits["max_key"], limits["max_value"], limits["max_frame"]), session_id
