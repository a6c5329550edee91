"""How values are stored on Redis, and why a worker never unpickles what a stranger wrote.

Anyone who can write to a shared Redis could otherwise make every worker
unpickle (run) their data. So every value that is not an integer is stored
with an HMAC-SHA256 over the Redis key and the bytes, under a key only the
site knows (``ENGINE_OPTIONS["SIGNING_KEY"]``, by default derived from
Django's ``SECRET_KEY``). A value whose signature does not match, an
unsigned one, or one signed for another key (copied over) is refused with
:class:`~django_clustershm.exceptions.BadSignature` and never handed to the
serializer.

Layout of a stored value::

    b"123", b"-7"           an integer, decimal ASCII (so INCRBY works on it)
    b"S" + mac[32] + data   signed bytes (the serializer's output)
    b"B" + data             bytes, with SIGN_VALUES off (a trusted, private Redis)

A decimal string never starts with ``S`` or ``B``, so reading is unambiguous.
HMAC-SHA256 of a 229-byte pickle costs about 2 us: far below one round trip.
"""

from __future__ import annotations

import hashlib
import hmac

from ..exceptions import BadSignature

SIGNED = 0x53  # "S"
PLAIN = 0x42  # "B"
MAC_SIZE = 32
_DIGITS = frozenset(b"-0123456789")


def derive_key(secret: str | bytes) -> bytes:
    """The signing key for values, from a site secret (Django's SECRET_KEY by default)."""
    if isinstance(secret, str):
        secret = secret.encode("utf-8")
    return hashlib.sha256(b"django-clustershm:redis-values:" + secret).digest()


class Codec:
    """Turns the client's values (bytes or int) into what Redis stores, and back."""

    __slots__ = ("_base", "signed")

    def __init__(self, key: bytes | None) -> None:
        self.signed = key is not None
        self._base = hmac.new(key, digestmod=hashlib.sha256) if key is not None else None

    def _mac(self, rkey: bytes, data) -> bytes:
        assert self._base is not None
        h = self._base.copy()
        h.update(rkey)
        h.update(b"\x00")
        h.update(data)
        return h.digest()

    def encode(self, rkey: bytes, value) -> bytes:
        if type(value) is int:
            return b"%d" % value
        if self._base is None:
            return b"B" + value
        return b"S" + self._mac(rkey, value) + value

    def decode(self, rkey: bytes, raw: bytes | None):
        if raw is None:
            return None
        if not raw:
            raise BadSignature(f"an empty value under {rkey!r}: not written by django-clustershm")
        tag = raw[0]
        if tag == SIGNED:
            if self._base is None:
                return raw[1 + MAC_SIZE :]  # signed by a site that signs; this one trusts its Redis
            data = memoryview(raw)[1 + MAC_SIZE :]
            if not hmac.compare_digest(raw[1 : 1 + MAC_SIZE], self._mac(rkey, data)):
                raise BadSignature(
                    f"the value under {rkey!r} has a bad signature (written without this site's SIGNING_KEY, "
                    "or copied from another key): refused, not unpickled"
                )
            return bytes(data)
        if tag in _DIGITS:
            try:
                return int(raw)
            except ValueError:
                pass
        elif tag == PLAIN and self._base is None:
            return raw[1:]
        raise BadSignature(
            f"the value under {rkey!r} is not signed (SIGN_VALUES is on): refused, not unpickled"
            if tag == PLAIN
            else f"the value under {rkey!r} was not written by django-clustershm: refused, not unpickled"
        )
