"""Compressors for a cache alias's ``OPTIONS["COMPRESSOR"]`` (django-redis's option, #17).

::

    "OPTIONS": {
        "COMPRESSOR": "django_clustershm.compressors.ZlibCompressor",
        "COMPRESS_MIN_LEN": 300,      # serialized values shorter than this stay raw (default 300)
        "COMPRESS_LEVEL": 6,          # optional: the compressor's level / preset
    }

Values are compressed in the caller, after serialization; the Manager (and
a near cache) hold the compressed bytes.

**The stored form.** A compressed value is ``0xC1``, one byte naming the
compressor (``z`` zlib, ``x`` lzma, ``s`` zstd), then the compressed
serialization. Anything else is a raw serialization: a value shorter than
``COMPRESS_MIN_LEN``, one that did not shrink, or one written before a
compressor was set. ``0xC1`` cannot begin a raw value: a pickle begins with
``0x80`` (protocol 2 and later; ASCII before), JSON text with an ASCII
character, and ``0xC1`` is the one byte msgpack never uses and is never
valid in UTF-8. So reads need no configuration: every alias reads raw values
and values compressed by any known compressor, whatever its own
``COMPRESSOR`` is now (switching or removing it keeps old values readable).
Integers are never compressed (they stay native for ``incr``).

django-redis compresses anything over 15 bytes (zlib, zstd) or 100 bytes
(lzma); here the default minimum is 300 bytes: below a few hundred bytes the
saving is a few bytes at most and every read pays for the decompression.

A compressor is a small class: subclass :class:`BaseCompressor` with a
one-byte ``id`` of your own (not ``z``, ``x`` or ``s``), ``compress`` and
``decompress``; defining the class registers its id for reading.
"""

from __future__ import annotations

import lzma
import zlib
from collections.abc import Mapping
from typing import Any, ClassVar

__all__ = ["MARKER", "BaseCompressor", "LzmaCompressor", "ZlibCompressor", "ZstdCompressor", "expand"]

#: The first byte of a compressed value (never the first byte of a pickle, JSON text or msgpack).
MARKER = 0xC1
#: Serialized values shorter than this stay raw (OPTIONS COMPRESS_MIN_LEN).
DEFAULT_MIN_LEN = 300

#: Compressor classes by id byte: what reads a value compressed by any of them.
registry: dict[int, type[BaseCompressor]] = {}
_readers: dict[int, BaseCompressor] = {}


def expand(data: bytes) -> bytes:
    """A stored value's serialization: ``data`` itself if raw, else decompressed by the compressor its header names."""
    if data[:1] != b"\xc1":
        return data
    ident = data[1]
    reader = _readers.get(ident)
    if reader is None:
        cls = registry.get(ident)
        if cls is None:
            from .exceptions import SerializationError

            raise SerializationError(f"a value compressed by an unknown compressor (id {bytes([ident])!r})")
        reader = _readers[ident] = cls()
    return reader.decompress(data[2:])


class BaseCompressor:
    """``id``: one byte naming the compressor in stored values; ``compress`` and ``decompress`` bytes."""

    id: ClassVar[bytes] = b""
    level: int | None = None

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "id" in cls.__dict__:
            if len(cls.id) != 1:
                raise TypeError(f"{cls.__qualname__}.id must be one byte, not {cls.id!r}")
            registry[cls.id[0]] = cls

    def __init__(self, options: Mapping[str, Any] | None = None) -> None:
        options = dict(options or {})
        self.min_length = int(options.get("COMPRESS_MIN_LEN", DEFAULT_MIN_LEN))
        if options.get("COMPRESS_LEVEL") is not None:
            self.level = int(options["COMPRESS_LEVEL"])

    def compress(self, data: bytes) -> bytes:
        raise NotImplementedError

    def decompress(self, data: bytes) -> bytes:
        raise NotImplementedError


class ZlibCompressor(BaseCompressor):
    """zlib (the standard library), level 6 by default."""

    id = b"z"
    level = 6

    def compress(self, data: bytes) -> bytes:
        return zlib.compress(data, self.level)

    def decompress(self, data: bytes) -> bytes:
        return zlib.decompress(data)


class LzmaCompressor(BaseCompressor):
    """lzma (the standard library), preset 4 by default (django-redis's): smaller, slower."""

    id = b"x"
    level = 4

    def compress(self, data: bytes) -> bytes:
        return lzma.compress(data, preset=self.level)

    def decompress(self, data: bytes) -> bytes:
        return lzma.decompress(data)


def _zstd_module():
    """Python 3.14's ``compression.zstd``, else the ``zstandard`` or ``pyzstd`` package."""
    for name in ("compression.zstd", "zstandard", "pyzstd"):
        try:
            return __import__(name, fromlist=["compress"])
        except ImportError:
            continue
    from django.core.exceptions import ImproperlyConfigured

    raise ImproperlyConfigured(
        "ZstdCompressor needs zstd: Python 3.14's compression.zstd, or `pip install zstandard` (or pyzstd)"
    )


class ZstdCompressor(BaseCompressor):
    """zstd, where a module provides it (else ImproperlyConfigured when the cache is set up), level 3."""

    id = b"s"
    level = 3

    def __init__(self, options: Mapping[str, Any] | None = None) -> None:
        super().__init__(options)
        module = _zstd_module()
        if module.__name__ == "zstandard":
            self._compress = module.ZstdCompressor(level=self.level).compress
            self._decompress = module.ZstdDecompressor().decompress
        else:
            level = self.level
            self._compress = lambda data: module.compress(data, level)
            self._decompress = module.decompress

    def compress(self, data: bytes) -> bytes:
        return self._compress(data)

    def decompress(self, data: bytes) -> bytes:
        return self._decompress(data)
