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

import functools
import pickle
import struct
from typing import TYPE_CHECKING, Any

from ..exceptions import SerializationError, ValueTooLarge
from ..wire.args import INT64_MAX, INT64_MIN
from ..wire.frames import BIG, Spliced

if TYPE_CHECKING:
    from ..compressors import BaseCompressor
    from ..serializers import BaseSerializer

_dumps = pickle.dumps
_loads = pickle.loads
_MARKER = 0xC1

# A big ``bytes`` or ``str`` value's pickle, made without pickle's copies (#19 part 4).
# pickle.dumps writes the value into a buffer it grows as it goes, and that
# copying (fresh allocations, their pages faulted in) was most of a big set: 9.9
# of 17.2 ms at 16 MiB. Protocol 5 writes a bytes object of 64 KiB or more as
# PROTO 5, BINBYTES and its 4-byte length, the bytes, MEMOIZE, STOP, with no frame
# around it; a str the same way with BINUNICODE and its UTF-8 bytes (lone
# surrogates passed through). A socket transport sends those as the buffers of a
# Spliced (..wire.frames): a bytes value's own buffer goes to the socket (a str
# costs one encode, 1.2 ms at 16 MiB against pickle's 8), and the Manager stores
# the very bytes pickle.dumps would have made. Checked once here against pickle
# itself: where it differs (another Python), values are pickled as before.
_SPLICE_TAIL = b"\x94."
_BINBYTES, _BINUNICODE = b"\x80\x05B", b"\x80\x05X"
_length = struct.Struct("<I").pack


@functools.cache
def splices() -> bool:
    """Whether this Python's pickle writes big bytes and str values as the
    splice does (checked at the first big value: 1.4 ms, not at import)."""
    raw = bytes(range(256)) * (BIG // 256)
    text = "é\udc80x🙂" * (BIG // 10 + 1)  # every UTF-8 width, and a lone surrogate: 10 bytes a round
    encoded = text.encode("utf-8", "surrogatepass")
    try:
        return (
            pickle.HIGHEST_PROTOCOL >= 5
            and _dumps(raw, 5) == _BINBYTES + _length(len(raw)) + raw + _SPLICE_TAIL
            and _dumps(text, 5) == _BINUNICODE + _length(len(encoded)) + encoded + _SPLICE_TAIL
        )
    except Exception:
        return False


def _check_size(size: int, max_value: int) -> None:
    if size > max_value:
        raise ValueTooLarge(f"value serializes to {size} bytes; the maximum is {max_value} (MAX_VALUE_SIZE)")


class Serializer:
    """A keyspace's codec: ``serializer`` (a :class:`~django_clustershm.serializers.BaseSerializer`;
    None: pickle) then, for values of ``compressor.min_length`` bytes or more, ``compressor``."""

    protocol = pickle.HIGHEST_PROTOCOL

    def __init__(self, serializer: BaseSerializer | None = None, compressor: BaseCompressor | None = None) -> None:
        self.serializer = serializer
        self.compressor = compressor
        if compressor is not None:
            self._header = bytes([_MARKER]) + compressor.id

    def dumps(self, value: Any, max_value: int, splice: bool = False) -> bytes | int | Spliced:
        """The stored form of ``value``; SerializationError or ValueTooLarge, raised before anything is sent.

        ``splice`` (a socket transport's SET, ADD, REPLACE or SET_MANY): a ``bytes`` value
        of :data:`~..wire.frames.BIG` bytes or more, or a ``str`` whose UTF-8
        is, pickled and not compressed, comes back as a
        :class:`~..wire.frames.Spliced` of its pickle's head, the value (or
        its UTF-8) and its tail: the same bytes as pickle's, without its copies."""
        kind = type(value)
        if kind is int and INT64_MIN <= value <= INT64_MAX:
            return value
        serializer = self.serializer
        if (
            splice
            and (kind is bytes or kind is str)
            # (A str's UTF-8 takes 1-4 bytes a character: one of BIG // 4 characters or more
            # may be big enough, known once encoded; if not, it is pickled all the same.)
            and len(value) >= (BIG if kind is bytes or value.isascii() else BIG // 4)
            and serializer is None
            and self.compressor is None
            and self.protocol == 5
            and splices()
        ):
            if kind is bytes:
                head, data = _BINBYTES, value
            else:
                head, data = _BINUNICODE, value.encode("utf-8", "surrogatepass")
            n = len(data)
            if BIG <= n < 2**32:
                _check_size(n + 9, max_value)
                return Spliced((head + _length(n), data, _SPLICE_TAIL))
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
        _check_size(len(data), max_value)
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
