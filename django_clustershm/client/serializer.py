"""What the Manager stores for a value: a native 64-bit ``int``, or the value's pickle.

Integers travel natively so that ``incr``/``decr`` happen in the Manager;
everything else is pickled in the caller (as Django's own backends do) and
the Manager stores the opaque bytes: it never unpickles anything a client
sent. Each read unpickles a fresh object, so mutating it changes nothing shared.
"""

from __future__ import annotations

import pickle
from typing import Any

from ..exceptions import SerializationError, ValueTooLarge
from ..wire.args import INT64_MAX, INT64_MIN

_dumps = pickle.dumps
_loads = pickle.loads


class Serializer:
    """The default serializer (subclass it, as diskcache's ``Disk``, to store another way)."""

    protocol = pickle.HIGHEST_PROTOCOL

    def dumps(self, value: Any, max_value: int) -> bytes | int:
        """The stored form of ``value``; SerializationError or ValueTooLarge, raised before anything is sent."""
        if type(value) is int and INT64_MIN <= value <= INT64_MAX:
            return value
        try:
            data = _dumps(value, self.protocol)
        except Exception as exc:  # PicklingError, TypeError, AttributeError...
            raise SerializationError(f"cannot pickle a value of type {type(value).__name__}: {exc}") from exc
        if len(data) > max_value:
            raise ValueTooLarge(f"value pickles to {len(data)} bytes; the maximum is {max_value} (MAX_VALUE_SIZE)")
        return data

    def loads(self, data: bytes | int) -> Any:
        if isinstance(data, int):
            return data
        return _loads(data)
