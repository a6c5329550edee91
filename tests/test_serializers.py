"""Serializers and compressors per cache alias (#17 part 3).

Each serializer and compressor round-trips what it supports and refuses what
it cannot; values under COMPRESS_MIN_LEN stay raw (the stored bytes are
checked through the client); aliases of one LOCATION with different
compressors read each other's values; incr/decr, async forms, a forked
writer and near caches, on every transport.
"""

from __future__ import annotations

import asyncio
import datetime
import decimal
import json
import os
import pickle
import uuid
import zlib

import msgpack
import pytest
from django.contrib.auth.models import User
from django.core.cache import caches
from django.core.exceptions import ImproperlyConfigured
from django.core.serializers.json import DjangoJSONEncoder
from django.test import override_settings

import django_clustershm as clustershm
from django_clustershm import SerializationError
from django_clustershm.client.serializer import Serializer
from django_clustershm.compressors import BaseCompressor, LzmaCompressor, ZlibCompressor, ZstdCompressor, registry
from django_clustershm.serializers import JSONSerializer, MSGPackSerializer, PickleSerializer
from django_clustershm.wire import frames as F

from .helpers import ManagerProcess, fork_call, reap

BACKEND = "django_clustershm.cache.ClusterShmCache"
SER = "django_clustershm.serializers."
COMP = "django_clustershm.compressors."
PAGE = "".join(f"<li><a href='/item/{i}'>item {i}</a></li>\n" for i in range(3000))  # ~100 KB


class Point:
    def __init__(self, x, y):
        self.x, self.y = x, y

    def __eq__(self, other):
        return type(other) is Point and (self.x, self.y) == (other.x, other.y)


COMMON = [
    "text",
    "",
    "é ✓",
    b"\x00\xc1bytes",
    7,
    -(2**63),
    2**70,
    1.5,
    None,
    True,
    False,
    [1, "a", None, [2.5]],
    {"a": [1, 2], "b": {"c": None}},
    PAGE,
]
WHEN = datetime.datetime(2024, 5, 6, 7, 8, 9, 123456, tzinfo=datetime.timezone.utc)
DJANGO_TYPES = [WHEN, WHEN.date(), datetime.time(1, 2, 3), decimal.Decimal("12.50"), uuid.UUID(int=42)]
COMPRESSORS = [None, ZlibCompressor(), LzmaCompressor()]


def codecs():
    for c in COMPRESSORS:
        cname = "raw" if c is None else type(c).__name__
        yield pytest.param(Serializer(None, c), id=f"pickle-{cname}")
        yield pytest.param(Serializer(PickleSerializer(), c), id=f"PickleSerializer-{cname}")
        yield pytest.param(Serializer(JSONSerializer(), c), id=f"json-{cname}")
        yield pytest.param(Serializer(MSGPackSerializer(), c), id=f"msgpack-{cname}")


def expected(codec, value):
    """What a value reads back as: tuples as lists for json/msgpack, Django's types as DjangoJSONEncoder writes them."""
    if isinstance(codec.serializer, JSONSerializer):
        return json.loads(json.dumps(value, cls=DjangoJSONEncoder))
    return value


# -- the codecs themselves ----------------------------------------------------------------------


@pytest.mark.parametrize("codec", list(codecs()))
def test_round_trip(codec):
    values = list(COMMON)
    if isinstance(codec.serializer, JSONSerializer):
        values.remove(b"\x00\xc1bytes")  # JSON has no bytes
    if isinstance(codec.serializer, MSGPackSerializer):
        values.remove(2**70)  # msgpack: 64-bit integers at most
    if isinstance(codec.serializer, (JSONSerializer, type(None), PickleSerializer)):
        values += DJANGO_TYPES
    if codec.serializer is None or isinstance(codec.serializer, PickleSerializer):
        values += [(1, 2), {1, 2}, Point(1, 2), User(pk=3, username="tom")]
    for value in values:
        stored = codec.dumps(value, 1 << 30)
        if type(value) is int and -(2**63) <= value < 2**63:
            assert stored == value  # native: incr works
        back = codec.loads(stored)
        assert back == expected(codec, value), value
        if isinstance(value, User):
            assert back.username == "tom"


def test_json_writes_what_djangos_encoder_writes():
    codec = Serializer(JSONSerializer())
    value = {"when": WHEN, "day": WHEN.date(), "price": decimal.Decimal("12.50"), "id": uuid.UUID(int=42)}
    assert codec.dumps(value, 1 << 20) == json.dumps(value, cls=DjangoJSONEncoder, separators=(",", ":")).encode()
    assert codec.loads(codec.dumps(value, 1 << 20)) == {
        "when": "2024-05-06T07:08:09.123Z",
        "day": "2024-05-06",
        "price": "12.50",
        "id": str(uuid.UUID(int=42)),
    }


@pytest.mark.parametrize(
    "serializer,value,name",
    [
        (JSONSerializer(), {1, 2}, "set"),
        (JSONSerializer(), {"p": Point(1, 2)}, "Point"),
        (JSONSerializer(), b"bytes", "bytes"),
        (MSGPackSerializer(), {1, 2}, "set"),
        (MSGPackSerializer(), [Point(1, 2)], "Point"),
        (MSGPackSerializer(), WHEN, "datetime"),
        (MSGPackSerializer(), 2**70, "int"),
        (None, lambda: 1, "function"),
    ],
)
def test_refuses_what_it_cannot_encode(serializer, value, name):
    with pytest.raises(SerializationError, match=name):
        Serializer(serializer, ZlibCompressor()).dumps(value, 1 << 20)


def test_default_is_the_same_pickle_as_before():
    for value in [*COMMON[:3], PAGE, Point(1, 2)]:
        assert Serializer().dumps(value, 1 << 30) == pickle.dumps(value, pickle.HIGHEST_PROTOCOL)


def test_marker_and_min_length():
    small, big = "x" * 200, "x" * 400
    codec = Serializer(None, ZlibCompressor({"COMPRESS_MIN_LEN": 300}))
    assert codec.dumps(small, 1 << 20) == pickle.dumps(small, pickle.HIGHEST_PROTOCOL)
    stored = codec.dumps(big, 1 << 20)
    assert stored[:2] == b"\xc1z" and codec.loads(stored) == big
    assert Serializer(MSGPackSerializer(), LzmaCompressor()).dumps(PAGE, 1 << 20)[:2] == b"\xc1x"
    # A value that would not shrink stays raw.
    noise = os.urandom(1000)
    assert Serializer(None, ZlibCompressor()).dumps(noise, 1 << 20)[:1] == b"\x80"
    # Any reader decompresses any known compressor's values; an unknown id is a clear error.
    for reader in (Serializer(), Serializer(None, LzmaCompressor())):
        assert reader.loads(stored) == big
    with pytest.raises(SerializationError, match="unknown compressor"):
        Serializer().loads(b"\xc1?junk")


def test_a_custom_compressor_registers_its_id():
    class Reverse(BaseCompressor):
        id = b"r"

        def compress(self, data):
            return zlib.compress(data)[::-1]

        def decompress(self, data):
            return zlib.decompress(bytes(data)[::-1])

    try:
        assert registry[ord("r")] is Reverse
        stored = Serializer(None, Reverse()).dumps(PAGE, 1 << 20)
        assert stored[:2] == b"\xc1r" and Serializer().loads(stored) == PAGE
        with pytest.raises(TypeError):

            class Bad(BaseCompressor):
                id = b"ab"
    finally:
        registry.pop(ord("r"), None)


def test_zstd_without_a_module_is_a_clear_error():
    try:
        ZstdCompressor()
    except ImproperlyConfigured as exc:
        assert "zstd" in str(exc)
    else:  # a zstd module is installed here: it must round-trip
        codec = Serializer(None, ZstdCompressor())
        stored = codec.dumps(PAGE, 1 << 30)
        assert stored[:2] == b"\xc1s" and codec.loads(stored) == PAGE


# -- through the cache backend, on every transport --------------------------------------------


def alias(location, serializer=None, compressor=None, near=False, **options):
    if serializer:
        options["SERIALIZER"] = SER + serializer
    if compressor:
        options["COMPRESSOR"] = COMP + compressor
    if near:
        options["NEAR_CACHE"] = {"MAX_ENTRIES": 1000, "MAX_BYTES": 64 << 20}
    return {"BACKEND": BACKEND, "LOCATION": location, "KEY_PREFIX": "p", "VERSION": 2, "OPTIONS": options}


def aliases(near):
    return {
        "default": alias("shared", near=near),
        "zlib": alias("shared", compressor="ZlibCompressor", near=near),
        "lzma": alias("shared", compressor="LzmaCompressor", near=near, COMPRESS_MIN_LEN=50),
        "json": alias("json", "JSONSerializer", "ZlibCompressor", near=near),
        "msgpack": alias("msgpack", "MSGPackSerializer", "LzmaCompressor", near=near),
        "pickle2": alias("p2", "PickleSerializer", near=near, PICKLE_VERSION=2),
    }


@pytest.fixture(params=["embedded", "socket", "socket+near"])
def setup(request):
    proc = None
    if request.param != "embedded":
        proc = ManagerProcess().start()
        clustershm.configure(proc.address, proc.secret)
    with override_settings(CACHES=aliases(request.param == "socket+near")):
        try:
            yield request.param
        finally:
            if proc is not None:
                clustershm.configure(None)
                proc.cleanup()


def stored(cache, key):
    """The bytes (or int) the Manager holds for ``key`` of ``cache``."""
    ks = cache.keyspace
    return ks._client.transport.call(F.GET, [ks.name, cache.make_key(key)])


def test_backend_round_trips_and_stores_raw_below_the_minimum(setup):
    for name in ("default", "zlib", "lzma", "json", "msgpack", "pickle2"):
        cache = caches[name]
        codec = cache.keyspace.serializer
        values = [v for v in COMMON if v != 2**70 and not isinstance(v, bytes)] + [b"bytes"] * (name != "json")
        for i, value in enumerate(values):
            cache.set(f"k{i}", value)
            assert cache.get(f"k{i}") == expected(codec, value), (name, value)
        assert cache.get_many([f"k{i}" for i in range(len(values))]) == {
            f"k{i}": expected(codec, v) for i, v in enumerate(values)
        }
    assert stored(caches["default"], "small") is None
    caches["zlib"].set("small", "hello")
    assert stored(caches["zlib"], "small") == pickle.dumps("hello", pickle.HIGHEST_PROTOCOL)  # raw, unchanged
    caches["json"].set("small", {"a": 1})
    assert stored(caches["json"], "small") == b'{"a":1}'
    caches["zlib"].set("page", PAGE)
    assert stored(caches["zlib"], "page")[:2] == b"\xc1z" and len(stored(caches["zlib"], "page")) < len(PAGE) / 5
    caches["default"].set("page2", PAGE)
    assert stored(caches["default"], "page2") == pickle.dumps(PAGE, pickle.HIGHEST_PROTOCOL)
    caches["pickle2"].set("v", [1])
    assert stored(caches["pickle2"], "v") == pickle.dumps([1], 2)


def test_backend_refuses_with_a_clear_error(setup):
    with pytest.raises(SerializationError, match="set"):
        caches["json"].set("k", {1, 2})
    with pytest.raises(SerializationError, match="Point"):
        caches["msgpack"].set("k", Point(1, 2))
    assert caches["json"].get("k") is None


def test_switching_compressor_keeps_reading_old_values(setup):
    default, zlib, lzma = caches["default"], caches["zlib"], caches["lzma"]  # one LOCATION
    default.set("before", PAGE)  # written before compression was turned on
    zlib.set("z", PAGE)
    lzma.set("x", PAGE)
    assert stored(zlib, "z")[:2] == b"\xc1z" and stored(lzma, "x")[:2] == b"\xc1x"
    for cache in (default, zlib, lzma):
        assert cache.get_many(["before", "z", "x"]) == {"before": PAGE, "z": PAGE, "x": PAGE}
        assert cache.get("z") == PAGE and cache.get("x") == PAGE and cache.get("before") == PAGE


def test_incr_and_decr_with_any_serializer(setup):
    for name in ("zlib", "json", "msgpack"):
        cache = caches[name]
        cache.set("n", 10)
        assert stored(cache, "n") == 10  # native
        assert cache.incr("n", 5) == 15 and cache.decr("n") == 14 and cache.get("n") == 14
        cache.set("flag", True)
        assert cache.get("flag") is True
        with pytest.raises(ValueError):
            cache.incr("missing")


def test_async_forms(setup):
    async def main():
        for name in ("zlib", "json", "msgpack", "lzma"):
            cache = caches[name]
            await cache.aset("page", PAGE)
            assert await cache.aget("page") == PAGE
            await cache.aset_many({"a": [1, 2], "b": "x" * 1000})
            assert await cache.aget_many(["a", "b"]) == {"a": [1, 2], "b": "x" * 1000}
            assert stored(cache, "page")[:1] == b"\xc1"
            await cache.aset("n", 1)
            assert await cache.aincr("n", 2) == 3 and await cache.adecr("n") == 2

    asyncio.run(main())


def test_get_or_set_with_a_compressor(setup):
    cache = caches["json"]
    assert cache.get_or_set("built", lambda: {"page": PAGE}) == {"page": PAGE}
    assert cache.get_or_set("built", lambda: 1 / 0) == {"page": PAGE}
    assert cache.get_or_set("fresh", lambda: [PAGE], stale=30) == [PAGE]


@pytest.mark.parametrize("near", [False, True], ids=["near-off", "near-on"])
def test_across_processes(near):
    proc = ManagerProcess().start()
    clustershm.configure(proc.address, proc.secret)
    try:
        with override_settings(CACHES=aliases(near)):
            json_cache, zlib = caches["json"], caches["zlib"]
            json_cache.set("doc", {"v": 0})
            json_cache.set("count", 0)
            zlib.set("page", "old")
            assert json_cache.get("doc") == {"v": 0} and zlib.get("page") == "old"  # near copies, if on

            def child(version):
                assert caches["json"].get("doc")["v"] == version - 1
                caches["json"].set("doc", {"v": version, "page": PAGE, "when": WHEN})
                caches["zlib"].set("page", PAGE * version)
                caches["msgpack"].set("m", {"page": PAGE})
                caches["json"].incr("count", 1)

            for version in (1, 2):
                assert reap(fork_call(child, version), 30) == 0
                got = json_cache.get("doc")
                assert got["v"] == version and got["page"] == PAGE
                assert got["when"] == json.loads(json.dumps(WHEN, cls=DjangoJSONEncoder))
                assert zlib.get("page") == PAGE * version and caches["default"].get("page") == PAGE * version
                assert caches["msgpack"].get("m") == {"page": PAGE}
                # a read of the freshly pushed compressed value is a near hit when near caches are on
                json_cache.get("doc")
            assert json_cache.get("count") == 2
            if near:
                stats = zlib.keyspace._client.near_stats()["shared"]
                assert stats["hits"] > 0
                # the near copy of a compressed value is kept decompressed
                near_cache = zlib.keyspace._near_cache
                assert all(e[0][:1] != b"\xc1" for e in near_cache._entries.values() if type(e[0]) is bytes)
    finally:
        clustershm.configure(None)
        proc.cleanup()


@override_settings(CACHES={"z": alias("z", compressor="ZstdCompressor")})
def test_zstd_alias_without_a_module():
    try:
        import zstandard  # noqa: F401
    except ImportError:
        with pytest.raises(ImproperlyConfigured, match="zstd"):
            caches["z"]
    else:  # pragma: no cover
        caches["z"].set("page", PAGE)
        assert caches["z"].get("page") == PAGE


class Upper(JSONSerializer):
    """A user's subclass: the dotted path of any BaseSerializer works."""

    def dumps(self, value):
        return super().dumps(value.upper() if isinstance(value, str) else value)


@override_settings(CACHES={"u": {"BACKEND": BACKEND, "LOCATION": "u", "OPTIONS": {"SERIALIZER": f"{__name__}.Upper"}}})
def test_a_subclassed_serializer():
    caches["u"].set("k", "shout")
    assert caches["u"].get("k") == "SHOUT"
    assert msgpack  # imported for the refusal cases above
