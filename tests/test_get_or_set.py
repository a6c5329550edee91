"""get_or_set builds once across the cluster (#17 part 2), with real forked processes.

Each builder counts its runs in the shared store (an atomic incr), so "built
once" is what the Manager counted, not what one process saw.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time

import pytest
from django.core.cache import caches

import django_clustershm as clustershm
from django_clustershm.cache import FRESH_SUFFIX

from .helpers import fork_call, reap, run_forked, wait_until


@pytest.fixture
def cache(cluster):
    backend = caches["default"]
    backend.clear()
    yield backend
    backend.clear()


def _slow_build(seconds: float, value="built"):
    def build():
        clustershm.incr("builds")
        time.sleep(seconds)
        return value

    return build


def test_eight_processes_missing_at_once_build_once(cache):
    """Django's get_or_set (on add) stores once but builds once per process."""
    r, w = os.pipe()

    def worker(i):
        os.read(r, 1)  # all start together
        assert cache.get_or_set("report", _slow_build(0.3, {"rows": 42}), 60) == {"rows": 42}

    pids = [fork_call(worker, i) for i in range(8)]
    os.write(w, b"x" * 8)
    assert [reap(pid, 30) for pid in pids] == [0] * 8
    os.close(r)
    os.close(w)
    assert clustershm.get("builds") == 1
    assert cache.get("report") == {"rows": 42}


def test_a_builder_that_raises_lets_the_next_build(cache):
    def failing():
        clustershm.incr("builds")
        time.sleep(0.2)
        raise RuntimeError("database down")

    def first(_i):
        with pytest.raises(RuntimeError, match="database down"):
            cache.get_or_set("flaky", failing, 60)

    pid = fork_call(first, 0)
    wait_until(lambda: clustershm.get("builds") == 1, message="the first builder started")
    started = time.monotonic()
    assert cache.get_or_set("flaky", _slow_build(0.0, "second"), 60) == "second"
    assert time.monotonic() - started < 5  # released at once, not at BUILD_TIMEOUT
    assert reap(pid, 10) == 0
    assert clustershm.get("builds") == 2


def test_a_builder_killed_with_sigkill_lets_another_build(cache):
    def doomed(_i):
        cache.get_or_set("orphan", _slow_build(60), 60)

    pid = fork_call(doomed, 0)
    wait_until(lambda: clustershm.get("builds") == 1, message="the doomed builder started")

    def waiter(_i):
        assert cache.get_or_set("orphan", _slow_build(0.0, "rescued"), 60) == "rescued"

    waiters = [fork_call(waiter, i) for i in range(3)]
    wait_until(lambda: clustershm.stats()["locks"]["waiting"] == 3, message="they wait behind its lock")
    os.kill(pid, signal.SIGKILL)
    reap(pid, 10)
    assert [reap(p, 30) for p in waiters] == [0] * 3
    assert clustershm.get("builds") == 2  # the doomed one, and exactly one of the waiters
    assert cache.get("orphan") == "rescued"


def test_a_waiter_past_build_timeout_builds_itself(cluster, settings):
    settings.CACHES = {
        **settings.CACHES,
        "impatient": {
            "BACKEND": "django_clustershm.cache.ClusterShmCache",
            "LOCATION": "impatient",
            "OPTIONS": {"BUILD_TIMEOUT": 0.2},
        },
    }
    cache = caches["impatient"]

    def slow(_i):
        cache.get_or_set("k", _slow_build(2.0, "slow"), 60)

    pid = fork_call(slow, 0)
    wait_until(lambda: clustershm.get("builds") == 1, message="the slow builder started")
    started = time.monotonic()
    assert cache.get_or_set("k", _slow_build(0.0, "mine"), 60) == "mine"
    assert time.monotonic() - started < 1.5
    assert reap(pid, 10) == 0


def test_stale_while_revalidate_serves_the_old_value_while_one_process_rebuilds(cache):
    assert cache.get_or_set("page", _slow_build(0.0, "v1"), timeout=0.3, stale=30) == "v1"
    fresh = cache.make_key("page") + FRESH_SUFFIX
    wait_until(lambda: not cache.keyspace.has(fresh), message="no longer fresh")
    assert cache.get("page") == "v1"  # still stored
    clustershm.set("builds", 0)

    def reader(i):
        value = cache.get_or_set("page", _slow_build(0.5, "v2"), timeout=0.3, stale=30)
        clustershm.incr(f"got:{value}")

    assert run_forked(6, reader) == [0] * 6
    assert clustershm.get("builds") == 1  # exactly one rebuilt
    assert clustershm.get("got:v2") == 1 and clustershm.get("got:v1") == 5  # the others were served at once
    assert cache.get_or_set("page", _slow_build(0.0, "v3"), timeout=0.3, stale=30) == "v2"


def test_the_cached_decorator_builds_once_sync_and_async(cache):
    @clustershm.cached(timeout=60)
    def square(n):
        clustershm.incr("builds")
        time.sleep(0.2)
        return n * n

    assert run_forked(4, lambda i: None if square(7) == 49 else os._exit(3)) == [0] * 4
    assert clustershm.get("builds") == 1
    assert square(8) == 64 and clustershm.get("builds") == 2

    @clustershm.cached(timeout=60, key=lambda n: f"acube:{n}")
    async def cube(n):
        clustershm.incr("abuilds")
        await asyncio.sleep(0.1)
        return n**3

    async def main():
        return await asyncio.gather(*(cube(3) for _ in range(20)))

    assert asyncio.run(main()) == [27] * 20
    assert clustershm.get("abuilds") == 1
    assert cache.get("acube:3") == 27


def test_aget_or_set_builds_once_among_tasks_and_processes(cache):
    async def build():
        clustershm.incr("builds")
        await asyncio.sleep(0.2)
        return "async-built"

    def worker(_i):
        async def main():
            return await asyncio.gather(*(cache.aget_or_set("ak", build, 60) for _ in range(10)))

        assert asyncio.run(main()) == ["async-built"] * 10

    assert run_forked(3, worker) == [0] * 3
    assert clustershm.get("builds") == 1


def test_a_plain_default_is_stored_as_django_stores_it(cache):
    assert cache.get_or_set("plain", 42) == 42
    assert cache.get_or_set("plain", 43) == 42
    assert cache.get_or_set("none", None) is None
    assert cache.get("none", "missing") is None
