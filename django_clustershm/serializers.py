"""Serializers for a cache alias's ``OPTIONS["SERIALIZER"]`` (django-redis's option, #17).

::

    "OPTIONS": {"SERIALIZER": "django_clustershm.serializers.JSONSerializer"}

A serializer turns a value into bytes (``dumps``) and back (``loads``); it
is a small class taking the alias's OPTIONS, so a project can subclass one.
Three are provided:

``PickleSerializer`` (the default)
    Any picklable value; the same bytes as before serializers were options.
    ``OPTIONS["PICKLE_VERSION"]``: the protocol (default: the highest).
``JSONSerializer``
    ``json`` with Django's ``DjangoJSONEncoder``: datetimes, dates, times,
    timedeltas, ``Decimal``, ``UUID`` and lazy strings are written as that
    encoder writes them (ISO 8601 and plain strings) and so read back as
    strings, as with django-redis; tuples read back as lists. Anything else
    (a set, a model instance...) is refused with :class:`SerializationError`
    naming its type.
``MSGPackSerializer``
    msgpack: str, bytes, int, float, bool, None, lists and dicts (tuples read
    back as lists); anything else is refused as above.

Integers (signed 64-bit, not bools) never reach the serializer: the Manager
stores them natively so ``incr``/``decr`` work whatever the serializer is.

A serializer's output must not begin with the byte ``0xC1`` (the marker of a
compressed value, see :mod:`.compressors`): no pickle, JSON text or msgpack
object can.
"""

from __future__ import annotations

import json
import pickle
from collections.abc import Mapping
from typing import Any

import msgpack

from .exceptions import SerializationError

__all__ = ["BaseSerializer", "JSONSerializer", "MSGPackSerializer", "PickleSerializer"]


class BaseSerializer:
    """Subclass and define ``dumps(value) -> bytes`` and ``loads(data) -> value``."""

    def __init__(self, options: Mapping[str, Any] | None = None) -> None:
        self.options = dict(options or {})

    def dumps(self, value: Any) -> bytes:
        raise NotImplementedError

    def loads(self, data: bytes) -> Any:
        raise NotImplementedError


class PickleSerializer(BaseSerializer):
    """pickle, at ``OPTIONS["PICKLE_VERSION"]`` (default: the highest protocol)."""

    protocol = pickle.HIGHEST_PROTOCOL

    def __init__(self, options: Mapping[str, Any] | None = None) -> None:
        super().__init__(options)
        version = self.options.get("PICKLE_VERSION", -1)
        if type(version) is not int or version > pickle.HIGHEST_PROTOCOL:
            raise ValueError(f"PICKLE_VERSION must be an int up to {pickle.HIGHEST_PROTOCOL}, not {version!r}")
        self.protocol = pickle.HIGHEST_PROTOCOL if version < 0 else version

    def dumps(self, value: Any) -> bytes:
        try:
            return pickle.dumps(value, self.protocol)
        except Exception as exc:  # PicklingError, TypeError, AttributeError...
            raise SerializationError(f"cannot pickle a value of type {type(value).__name__}: {exc}") from exc

    def loads(self, data: bytes) -> Any:
        return pickle.loads(data)


def _json_encoder():
    from django.core.serializers.json import DjangoJSONEncoder

    class Encoder(DjangoJSONEncoder):
        def default(self, o):
            try:
                return super().default(o)
            except TypeError:
                raise SerializationError(
                    f"JSONSerializer cannot encode a value of type {type(o).__module__}.{type(o).__qualname__}"
                ) from None

    return Encoder


class JSONSerializer(BaseSerializer):
    """JSON with Django's ``DjangoJSONEncoder`` (compact, UTF-8)."""

    def __init__(self, options: Mapping[str, Any] | None = None) -> None:
        super().__init__(options)
        self.encoder = _json_encoder()

    def dumps(self, value: Any) -> bytes:
        try:
            return json.dumps(value, cls=self.encoder, separators=(",", ":"), ensure_ascii=False).encode()
        except SerializationError:
            raise
        except (TypeError, ValueError) as exc:  # a dict key of an unsupported type, a circular reference
            raise SerializationError(
                f"JSONSerializer cannot encode a value of type {type(value).__name__}: {exc}"
            ) from exc

    def loads(self, data: bytes) -> Any:
        return json.loads(data)


def _msgpack_refuse(o):
    raise SerializationError(
        f"MSGPackSerializer cannot encode a value of type {type(o).__module__}.{type(o).__qualname__}"
    )


class MSGPackSerializer(BaseSerializer):
    """msgpack (``use_bin_type``: str and bytes stay apart)."""

    def dumps(self, value: Any) -> bytes:
        try:
            return msgpack.packb(value, use_bin_type=True, default=_msgpack_refuse)
        except SerializationError:
            raise
        except (TypeError, ValueError, OverflowError) as exc:  # an int past 64 bits, a non-str/bytes dict key
            raise SerializationError(
                f"MSGPackSerializer cannot encode a value of type {type(value).__name__}: {exc}"
            ) from exc

    def loads(self, data: bytes) -> Any:
        return msgpack.unpackb(data, raw=False, strict_map_key=False)
