"""What an argument may be: one set of checks, run by the caller and again by the Manager.

The client checks every argument before anything is sent, so the embedded
and the socket transports refuse the same mistakes with the same error; the
Manager runs the same checks on what arrives (a rogue or older client), and
answers a refusal with an error reply: no connection, and so no lock, is
lost over a bad argument.

Each check raises a :class:`~..exceptions.ClusterShmError` whose message
names the argument: :class:`~..exceptions.ArgumentTypeError` (also a
``TypeError``) for a wrong type, :class:`~..exceptions.InvalidArgument`
(also a ``ValueError``) for a value out of range.
"""

from __future__ import annotations

import math
import time
from datetime import datetime, timedelta

from ..exceptions import ArgumentTypeError, InvalidArgument, InvalidKey, KeyTooLarge

INT64_MIN = -(2**63)
INT64_MAX = 2**63 - 1
TOKEN_SIZE = 16

_isfinite = math.isfinite


def timeout(value, name: str = "timeout"):
    """Seconds until expiry: an ``int`` or ``float`` (not ``bool``), finite; None: never.

    Zero or less is valid and means "not stored" (Django's meaning); NaN,
    infinity, strings and ``timedelta`` are refused.
    """
    if value is None:
        return None
    kind = type(value)
    if kind is float:
        if _isfinite(value):
            return value
        raise InvalidArgument(f"{name} must be a finite number of seconds or None, not {value!r}")
    if kind is int:
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):  # IntEnum, numpy-free subclasses
        return timeout(float(value), name)
    raise ArgumentTypeError(f"{name} must be a number of seconds (int or float) or None, not {kind.__name__}")


def positive_seconds(value, name: str):
    """A lease: a positive finite number of seconds, or None."""
    if value is None:
        return None
    value = timeout(value, name)
    if value is not None and value <= 0:
        raise InvalidArgument(f"{name} must be a positive number of seconds or None, not {value!r}")
    return value


def integer(value, name: str) -> int:
    """A signed 64-bit ``int`` (``bool`` refused: ``incr(key, True)`` is a mistake)."""
    if type(value) is not int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ArgumentTypeError(f"{name} must be an int, not {type(value).__name__}")
        value = int(value)
    if not INT64_MIN <= value <= INT64_MAX:
        raise InvalidArgument(f"{name} must fit in a signed 64-bit integer")
    return value


def key(value, max_key: int, name: str = "key") -> str:
    """A ``str`` of at most ``max_key`` bytes in UTF-8."""
    if type(value) is not str:
        if isinstance(value, str):
            value = str(value)
        else:
            raise InvalidKey(f"{name}s are str, not {type(value).__name__}")
    if value.isascii():
        if len(value) > max_key:
            raise KeyTooLarge(f"{name} is {len(value)} bytes; the maximum is {max_key} (MAX_KEY_SIZE)")
        return value
    try:
        size = len(value.encode("utf-8"))
    except UnicodeEncodeError as exc:
        raise InvalidKey(f"{name} cannot be encoded as UTF-8: {exc}") from exc
    if size > max_key:
        raise KeyTooLarge(f"{name} is {size} bytes in UTF-8; the maximum is {max_key} (MAX_KEY_SIZE)")
    return value


def prefix(value) -> str:
    if type(value) is not str:
        raise InvalidKey(f"a prefix is a str, not {type(value).__name__}")
    return value


def expire_timeout(value):
    """An expiry as redis-py's ``expire`` takes it: seconds, or a ``timedelta`` (which :func:`timeout` refuses)."""
    if isinstance(value, timedelta):
        value = value.total_seconds()
    return timeout(value)


def seconds_until(when) -> float:
    """Seconds from now until ``when``: a ``datetime`` (a naive one is local
    time, as redis-py reads it) or a Unix timestamp in seconds; negative if past."""
    if isinstance(when, datetime):
        return when.timestamp() - time.time()
    if isinstance(when, bool) or not isinstance(when, (int, float)):
        raise ArgumentTypeError(f"when must be a datetime or a Unix timestamp, not {type(when).__name__}")
    return timeout(when, "when") - time.time()


#: Keys one iter_keys/delete_pattern request fetches or removes at most by
#: default (django-redis's DJANGO_REDIS_SCAN_ITERSIZE is 10; a round trip here
#: is ~15 us, and 1,000 keys ~60 KB of the caller's memory).
DEFAULT_ITERSIZE = 1000


def pattern(value, max_key: int) -> str:
    """A glob pattern (KEYS_MATCH, SCAN): a ``str`` of at most ``max_key`` bytes in UTF-8."""
    return key(value, max_key, "pattern")


def itersize(value) -> int:
    """How many keys one SCAN reply may hold: an ``int`` of at least 1 (the Manager caps it)."""
    value = integer(value, "itersize")
    if value < 1:
        raise InvalidArgument(f"itersize must be at least 1, not {value}")
    return value


def token(value) -> bytes:
    """A lock's owner token, as :func:`get_lock` returned it."""
    if type(value) is not bytes or len(value) != TOKEN_SIZE:
        raise ArgumentTypeError(f"token must be the {TOKEN_SIZE}-byte token get_lock() returned, not {value!r:.40}")
    return value


def bounds(value):
    """A named cache's ``[max_entries, cull_frequency, max_bytes]`` (or None: defaults)."""
    if value is None:
        return None
    if type(value) is list and len(value) == 3:
        # The common case, checked in one expression: a cache write carries
        # its alias's bounds, and the Manager checks them on every write.
        max_entries, cull_frequency, max_bytes = value
        if (
            type(max_entries) is int
            and type(cull_frequency) is int
            and type(max_bytes) is int
            and INT64_MIN <= max_entries <= INT64_MAX
            and 0 <= cull_frequency <= INT64_MAX
            and 1 <= max_bytes <= INT64_MAX
        ):
            return value
    if type(value) not in (list, tuple) or len(value) != 3:
        raise ArgumentTypeError("bounds must be [max_entries, cull_frequency, max_bytes] or None")
    max_entries = integer(value[0], "MAX_ENTRIES")
    cull_frequency = integer(value[1], "CULL_FREQUENCY")
    max_bytes = integer(value[2], "MAX_BYTES")
    if cull_frequency < 0:
        raise InvalidArgument("CULL_FREQUENCY must be 0 or more")
    if max_bytes < 1:
        raise InvalidArgument("MAX_BYTES must be at least 1")
    return [max_entries, cull_frequency, max_bytes]
