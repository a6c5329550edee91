"""Demo views: state shared by every worker process of the server."""

import asyncio
import gc
import os
import time

from django.core.cache import cache
from django.http import JsonResponse
from django.shortcuts import render
from django.views.decorators.cache import cache_page

import django_clustershm as clustershm


def worker_pids(stats: dict) -> list[int] | None:
    """The worker processes connected to the Manager: distinct pids, not connections.

    A worker holds one connection per thread plus its listener and near-cache
    channels, and the master (the Manager's own process) and tools such as
    ``manage.py shell`` connect too. None where the engine does not say (Redis)."""
    if "clients" not in stats:
        return None
    manager = stats.get("manager_pid")
    return sorted({c["pid"] for c in stats["clients"] if c["pid"] != manager})


def index(request):
    stats = clustershm.stats()
    workers = worker_pids(stats)
    return render(
        request,
        "demo/index.html",
        {
            "pid": os.getpid(),
            "stats": stats,
            "engine": stats["capabilities"]["engine"],
            "manager_pid": stats.get("manager_pid"),
            "workers": workers,
            "worker_count": "-" if workers is None else len(workers),
            "hits": clustershm.get("demo:hits", 0),
        },
    )


def hit(request):
    """A hit counter that stays exact whichever worker serves the request."""
    return JsonResponse({"hits": clustershm.incr("demo:hits"), "pid": os.getpid()})


@cache_page(30)
def cached(request):
    """Rendered once per 30 s by whichever worker comes first; every worker serves that copy."""
    return JsonResponse({"rendered_by": os.getpid(), "at": time.time()})


def near(request):
    """A read-mostly value behind a near cache: ``?key=k`` reads it, ``&set=v`` writes it.

    Reads are answered from this worker's copy; a write anywhere (this server's
    other workers, or another server on the same Redis) is never missed by a
    read that starts after it returned (the local engine; Redis with a strict
    near cache, the demo's default there)."""
    from django.core.cache import caches

    near_cache = caches["near"]
    key = request.GET.get("key", "price")
    if "set" in request.GET:
        near_cache.set(key, request.GET["set"], None)
    stats = clustershm.near_stats().get("near", {})
    return JsonResponse(
        {"key": key, "value": near_cache.get(key), "pid": os.getpid(), "near_hits": stats.get("hits", 0)}
    )


def fragment(request):
    return render(request, "demo/fragment.html", {"pid": os.getpid()})


def login(request):
    """A stand-in for a login: the user's name goes into the session (in the shared cache)."""
    request.session["user"] = request.GET.get("name", "tom")
    return JsonResponse({"user": request.session["user"], "pid": os.getpid()})


def me(request):
    return JsonResponse({"user": request.session.get("user"), "pid": os.getpid()})


def logout(request):
    request.session.flush()
    return JsonResponse({"user": None, "pid": os.getpid()})


def flags_view(request):
    """This worker's local copy of the feature flags (kept in sync by a listener)."""
    from testproject.demo import flags

    if "set" in request.GET:
        flags.set_flag(request.GET["set"], request.GET.get("value", "on"))
    return JsonResponse({"pid": os.getpid(), "flags": flags.current()})


def wants_html(request) -> bool:
    """A browser (its Accept names text/html) gets a page; ``?format=json``, curl
    (``*/*``) and scripts (no Accept) get JSON, as before (the tests read it)."""
    chosen = request.GET.get("format")
    if chosen in ("json", "html"):
        return chosen == "html"
    return "text/html" in request.headers.get("Accept", "")


def whoami(request):
    """Which worker served this request, next to the Manager's figures."""
    stats = clustershm.stats()
    info = {
        "pid": os.getpid(),
        "engine": stats["capabilities"]["engine"],
        "manager_pid": stats.get("manager_pid"),  # none on the Redis engine
        "keys": stats["store"]["keys"],
        "workers": worker_pids(stats),  # processes; None on the Redis engine
        "clients": [c["pid"] for c in stats.get("clients", [])],  # one per connection
        "caches": {name: c["keys"] for name, c in stats.get("caches", {}).items()},
        "near_caches": clustershm.near_stats(),  # this worker's
        # Whether the Manager's process runs its garbage-collector policy, and
        # this worker's own collector (given back to it after the fork).
        "gc": {"manager_owned": stats.get("gc", {}).get("owned"), "worker_thresholds": list(gc.get_threshold())},
    }
    if wants_html(request):
        return render(request, "demo/whoami.html", {"info": info})
    return JsonResponse(info)


def slow(request):
    """Sleeps ``?s=`` seconds: lets the tests show a hung worker being replaced."""
    seconds = float(request.GET.get("s", "1"))
    time.sleep(seconds)
    return JsonResponse({"slept": seconds, "pid": os.getpid()})


def lock(request):
    """A sync view that waits up to ``?timeout=`` seconds for the lock ``?key=``,
    and says whether it got it and how long it waited. Its worker blocks while
    it waits, past gunicorn's --timeout if need be: the lock's timeout decides."""
    key = request.GET.get("key", "demo")
    timeout = float(request.GET.get("timeout", "30"))
    held = clustershm.Lock(f"demo:lock:{key}")
    started = time.monotonic()
    acquired = held.acquire(timeout=timeout)
    waited = time.monotonic() - started
    fence = held.fence if acquired else None
    if acquired:
        held.release()
    return JsonResponse({"acquired": acquired, "waited": waited, "fence": fence, "pid": os.getpid()})


def booted(request):
    """What ON_START stored once, before the master forked the workers."""
    return JsonResponse({"booted_by": clustershm.get("demo:booted_by"), "pid": os.getpid()})


def code(request):
    """The text of the project's code as this worker loaded it (the reload tests change it).

    ``demo_code_probe`` is a module the tests write (on PYTHONPATH); the
    demo app imports it in ready(), as project code a master would pin if it
    imported the project."""
    from testproject.demo.apps import probe

    return JsonResponse({"text": None if probe is None else probe.TEXT, "pid": os.getpid()})


def work(request) -> None:
    """``?work=N``: spend N µs (at most 100 ms) in a busy loop, no I/O: the work a view does around its cache
    calls (bench/bench_http.py --work). Nothing without it."""
    try:
        seconds = min(max(int(request.GET.get("work", 0)), 0), 100_000) * 1e-6
    except ValueError:
        return
    if seconds:
        until = time.perf_counter() + seconds
        while time.perf_counter() < until:
            pass


def bench(request):
    """One cache get and one incr: what bench/bench_http.py serves under load (``?work=N``: N µs of work
    before each)."""
    from django.core.cache import cache

    work(request)
    value = cache.get("bench:key")
    work(request)
    try:
        count = cache.incr("bench:counter")
    except ValueError:  # the first request: create the counter (add: only one process wins)
        cache.add("bench:counter", 0, None)
        count = cache.incr("bench:counter")
    return JsonResponse({"value": value, "count": count})


# -- async views (runcluster --asgi) ------------------------------------------


async def ahit(request):
    """The hit counter of an async view: Django's async cache API, atomic in the Manager."""
    try:
        hits = await cache.aincr("demo:ahits")
    except ValueError:  # the first request: create the counter (add: only one process wins)
        await cache.aadd("demo:ahits", 0, None)
        hits = await cache.aincr("demo:ahits")
    return JsonResponse({"hits": hits, "pid": os.getpid()})


async def abench(request):
    """/bench/'s async twin, what bench/bench_http.py --asgi serves: one awaited cache get and one incr
    (``?work=N``: N µs of work before each, blocking the loop as CPU-bound work does).

    Django's RedisCache has no async methods of its own: its ``aincr`` is BaseCache's, an ``aget`` then an
    ``aset``, so under concurrent requests it loses updates where ClusterShmCache's, one Manager call, does not."""
    work(request)
    value = await cache.aget("bench:key")
    work(request)
    try:
        count = await cache.aincr("bench:counter")
    except ValueError:  # the first request: create the counter (add: only one process wins)
        await cache.aadd("bench:counter", 0, None)
        count = await cache.aincr("bench:counter")
    return JsonResponse({"value": value, "count": count})


def counter(request):
    """A read-modify-write that is only exact because it runs under a cluster-wide lock (sync)."""
    with clustershm.mutex("demo:counter", timeout=30):
        count = (clustershm.get("demo:counter") or 0) + 1
        clustershm.set("demo:counter", count)
    return JsonResponse({"count": count, "pid": os.getpid()})


def cache_incr(request):
    """An atomic counter in the default cache (Django's incr: no lock needed)."""
    cache.add("demo:cache-incr", 0, None)
    return JsonResponse({"count": cache.incr("demo:cache-incr"), "pid": os.getpid()})


async def acounter(request):
    """A read-modify-write that is only exact because it runs under a cluster-wide lock."""
    async with clustershm.amutex("demo:acounter", timeout=30):
        count = await cache.aget("demo:acounter", 0) + 1
        await asyncio.sleep(0)  # let other requests of this worker run in between, as real work would
        await cache.aset("demo:acounter", count, None)
    return JsonResponse({"count": count, "pid": os.getpid()})


async def alock(request):
    """Holds the lock ``?key=`` for ``?s=`` seconds; ``?id=`` names the request, whose
    state ("waiting", then "holding" with the lock's fence) ``?peek=id,id...`` reads.
    The tests kill a worker that holds it and watch a waiter in another worker get it."""
    if "peek" in request.GET:
        ids = request.GET["peek"].split(",")
        found = await cache.aget_many([f"demo:alock-state:{i}" for i in ids])
        return JsonResponse({i: found.get(f"demo:alock-state:{i}") for i in ids})
    key, name = request.GET.get("key", "demo"), request.GET.get("id", "")
    seconds, timeout = float(request.GET.get("s", "0")), float(request.GET.get("timeout", "30"))
    await cache.aset(f"demo:alock-state:{name}", {"state": "waiting", "pid": os.getpid()}, 300)
    async with clustershm.amutex(f"demo:alock:{key}", timeout=timeout) as held:
        state = {"state": "holding", "pid": os.getpid(), "fence": held.fence}
        await cache.aset(f"demo:alock-state:{name}", state, 300)
        await asyncio.sleep(seconds)
    return JsonResponse(state)
