"""What the Manager stores for a value: a native 64-bit ``int``, or the value's bytes.

Integers travel natively so that ``incr``/``decr`` happen in the Manager;
everything else is serialized (pickled by default) and, with a compressor,
compressed in the caller (as Django's own backends do) and the Manager
stores the opaque bytes: it never unpickles anything a client sent. Each
read deserializes a fresh object, so mutating it changes nothing shared.

A cache alias's ``SERIALIZER`` and ``COMPRESSOR`` options
(:mod:`django_clustershm.serializers`, :mod:`django_clustershm.compressors`)
give its keyspace a :class:`Serializer` of its own; the shared store and
aliases without them use the default one: pickle, no compression, the same
bytes as ever. The stored form of a compressed value (``0xC1``, the
compressor's id byte, the data) is described in :mod:`..compressors`.
"""

from __future__ import annotations

import pickle
from typing import TYPE_CHECKING, Any

from ..exceptions import SerializationError, ValueTooLarge
from ..wire.args import INT64_MAX, INT64_MIN

if TYPE_CHECKING:
    from ..compressors import BaseCompressor
    from ..serializers import BaseSerializer

_dumps = pickle.dumps
_loads = pickle.loads
_MARKER = 0xC1


class Serializer:
    """A keyspace's codec: ``serializer`` (a :class:`~django_clustershm.serializers.BaseSerializer`;
    None: pickle) then, for values of ``compressor.min_length`` bytes or more, ``compressor``."""

    protocol = pickle.HIGHEST_PROTOCOL

    def __init__(self, serializer: BaseSerializer | None = None, compressor: BaseCompressor | None = None) -> None:
        self.serializer = serializer
        self.compressor = compressor
        if compressor is not None:
            self._header = bytes([_MARKER]) + compressor.id

    def dumps(self, value: Any, max_value: int) -> bytes | int:
        """The stored form of ``value``; SerializationError or ValueTooLarge, raised before anything is sent."""
        if type(value) is int and INT64_MIN <= value <= INT64_MAX:
            return value
        serializer = self.serializer
        if serializer is None:
            try:
                data = _dumps(value, self.protocol)
            except Exception as exc:  # PicklingError, TypeError, AttributeError...
                raise SerializationError(f"cannot pickle a value of type {type(value).__name__}: {exc}") from exc
        else:
            try:
                data = serializer.dumps(value)
            except SerializationError:
                raise
            except Exception as exc:
                raise SerializationError(
                    f"{type(serializer).__name__} cannot serialize a value of type {type(value).__name__}: {exc}"
                ) from exc
            if data[:1] == b"\xc1":
                raise SerializationError(f"{type(serializer).__name__} wrote a value starting with 0xC1 (reserved)")
        compressor = self.compressor
        if compressor is not None and len(data) >= compressor.min_length:
            packed = self._header + compressor.compress(data)
            if len(packed) < len(data):
                data = packed
        if len(data) > max_value:
            raise ValueTooLarge(f"value serializes to {len(data)} bytes; the maximum is {max_value} (MAX_VALUE_SIZE)")
        return data

    def loads(self, data: bytes | memoryview | int) -> Any:
        if isinstance(data, int):
            return data
        if type(data) is memoryview:
            # A big value, read from the buffer its reply was received into
            # (..wire.frames.decode_reply): pickle reads it there; anything
            # else gets the bytes it expects.
            if self.serializer is None and data[:1] != b"\xc1":
                return _loads(data)
            data = bytes(data)
        if data[:1] == b"\xc1":  # compressed (by any compressor: see ..compressors)
            from ..compressors import expand

            data = expand(data)
        serializer = self.serializer
        return _loads(data) if serializer is None else serializer.loads(data)
