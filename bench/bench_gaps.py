"""Latency with gaps between calls (#19 part 1): get and set when the caller does other work between calls.

One process calls ``get`` (a hit) or ``set`` of a small value, and between two calls spins in a busy loop for a
*gap* of 0, 20, 100 or 500 µs (no I/O, no sleep: a view doing its own work). Only the call is timed. A server that
polls for its next request for a few tens of µs answers a back-to-back caller at once; with a gap it has gone to
sleep, and the call pays for waking it. The contenders, in one run:

* ``ClusterShmCache`` in cluster mode (a Manager in a forked process, ``configure()``) three ways: with the
  defaults (a near cache, adaptive: the timed key is read many times, so its gets are near hits), with
  ``NEAR_CACHE: False`` (every call a round trip), and with a near cache that keeps every key read;
* Django's ``RedisCache`` on a redis-server that the script starts (lab.py's, on a Unix socket only) and stops by
  pid;
* diskcache's ``DjangoCache`` (``diskcache.DjangoCache``: what a Django user configures, not the raw ``Cache``);
* ``LocMemCache`` (each process's private memory: the unshared ceiling);
* the *blocking framed-pickle floor* of bench_core.py: a length-prefixed pickle echo in a forked process on a
  socketpair, blocking ``send`` + ``recv``, the cheapest Python round trip between two processes (its get and its
  set columns are the same round trip: a small request out, bench_core's small dict back).

Each round runs every gap, and at each gap every contender in turn (rotated each round), ``--warmup`` untimed calls
(with the same gap: adaptive polling settles to it) then ``--n`` timed ones, the GC paused. The tables give the
median over the rounds of each round's median, the spread ((max - min) / median) of those, and ratios to RedisCache,
diskcache and LocMemCache. Targets (#19, with a 100 µs gap): ClusterShmCache get <= 0.1x RedisCache's and <= 1.0x
diskcache's; near-cache hit <= 1.25x LocMemCache's.
"""

from __future__ import annotations

import contextlib
import socket
import time

import lab
from bench_core import VALUE as FLOOR_VALUE
from bench_core import _floor_caller, _floor_child

VALUE = {"user": 42, "name": "x" * 50}
GAPS_US = (0, 20, 100, 500)
OPS = ("get", "set")
SYSTEMS = {"clustershm": "ClusterShmCache (defaults)", "nonear": "ClusterShmCache, NEAR_CACHE False",
           "near": "ClusterShmCache+near (always)", "redis": "RedisCache",
           "diskcache": "diskcache.DjangoCache", "locmem": "LocMemCache (not shared)",
           "floor": "blocking framed-pickle floor"}  # fmt: skip
NEAR_LOCATION = "bench-near"


def configure_django(selected: list[str], bench: lab.Lab, redis_url: str | None) -> None:
    import django
    from django.conf import settings

    shm, bounded = "django_clustershm.cache.ClusterShmCache", {"MAX_ENTRIES": 100_000}
    entries = {
        "clustershm": {"BACKEND": shm, "LOCATION": "bench", "OPTIONS": bounded},
        "nonear": {"BACKEND": shm, "LOCATION": "bench-nonear", "OPTIONS": {**bounded, "NEAR_CACHE": False}},
        "near": {"BACKEND": shm, "LOCATION": NEAR_LOCATION,
                 "OPTIONS": {**bounded, "NEAR_CACHE": {"MAX_ENTRIES": 100_000, "MAX_BYTES": 64 * 2**20,
                                                       "POLICY": "always"}}},
        "redis": {"BACKEND": "django.core.cache.backends.redis.RedisCache", "LOCATION": redis_url},
        "diskcache": {"BACKEND": "diskcache.DjangoCache", "LOCATION": bench.path("diskcache")},
        "locmem": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache", "LOCATION": "bench",
                   "OPTIONS": bounded},
    }  # fmt: skip
    caches = {"default": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache", "LOCATION": "default"}}
    caches.update({name: entries[name] for name in selected if name in entries})
    settings.configure(DEBUG=False, SECRET_KEY="bench-gaps-not-a-secret", INSTALLED_APPS=[], USE_TZ=True,
                       CACHES=caches)  # fmt: skip
    django.setup()


def busy(gap: float):
    """A gap of ``gap`` seconds spent in a busy loop (no I/O, no sleep), or None for no gap."""
    if not gap:
        return None
    clock = time.perf_counter

    def spend() -> None:
        until = clock() + gap
        while clock() < until:
            pass

    return spend


def timed(fn, gap: float, n: int, warmup: int) -> list[float]:
    """``fn()`` ``warmup`` times, then ``n`` times timed, with the gap spent between every two calls."""
    spend, clock, samples = busy(gap), time.perf_counter, []
    append = samples.append
    for _ in range(warmup):
        fn()
        if spend:
            spend()
    with lab.gc_paused():
        for _ in range(n):
            t0 = clock()
            fn()
            append(clock() - t0)
            if spend:
                spend()
    return samples


def operations(name: str, floor) -> dict:
    """op -> zero-argument callable for contender ``name``; checked once."""
    if name == "floor":
        if floor() != FLOOR_VALUE:
            raise lab.BenchError("the floor process does not echo the value")
        return {"get": floor, "set": floor}
    from django.core.cache import caches

    cache = caches[name]
    cache.set("bench:hit", VALUE)
    if cache.get("bench:hit") != VALUE:
        raise lab.BenchError(f"{name}: get does not return what was set")
    get, set_ = cache.get, cache.set
    return {"get": lambda: get("bench:hit"), "set": lambda: set_("bench:set", VALUE)}


@contextlib.contextmanager
def floor_process(bench: lab.Lab):
    """bench_core's floor: a forked length-prefixed pickle echo on a socketpair; its caller."""
    sock, end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        pid = lab.fork(_floor_child, end, close=[sock.fileno()])
    finally:
        end.close()

    def stop() -> list[str]:
        sock.close()
        rc = lab.reap(pid, timeout=5.0)
        return [] if rc == 0 else [f"the floor process ended with {lab.describe(rc)}"]

    bench.cleanups.append(stop)
    yield _floor_caller(sock)


def main(argv=None) -> int:
    args = lab.options(__doc__, argv, {"n": 200, "warmup": 50, "rounds": 1}, SYSTEMS,
                       n=(lab.count, 2000, "timed calls per contender, operation and gap per round"),
                       warmup=(lab.count0, 300, "untimed calls before each timed run"),
                       rounds=(lab.count, 3, "rounds"))  # fmt: skip
    selected = args.selected
    if "redis" in selected:
        lab.need(binaries=["redis-server"], modules=["redis"])
    if "diskcache" in selected:
        lab.need(modules=["diskcache"])
    per_round: dict = {name: {op: {gap: [] for gap in GAPS_US} for op in OPS} for name in selected}
    with lab.Lab("gaps") as bench:
        if {"clustershm", "nonear", "near"} & set(selected):
            bench.start_manager(configure=True)
        redis_url = f"unix://{bench.start_redis()}" if "redis" in selected else None
        configure_django(selected, bench, redis_url)
        from django.core.cache import caches

        bench.cleanups.append(caches.close_all)
        with floor_process(bench) as floor:
            ops = {name: operations(name, floor) for name in selected}
            for r in range(args.rounds):
                order = selected[r % len(selected) :] + selected[: r % len(selected)]
                for gap in GAPS_US:
                    lab.log(f"round {r + 1}/{args.rounds}: gap {gap} µs")
                    for name in order:
                        for op in OPS:
                            samples = timed(ops[name][op], gap * 1e-6, args.n, args.warmup)
                            per_round[name][op][gap].append(lab.summary(samples))
        near_share = None
        if "near" in selected:
            stats = lab.package().near_stats().get(NEAR_LOCATION)
            if stats and stats["hits"] + stats["misses"]:
                near_share = stats["hits"] / (stats["hits"] + stats["misses"])

    results = {name: {op: {str(gap): {"median_us": lab.rounds([s["median_us"] for s in runs]),
                                      "p99_us": lab.rounds([s["p99_us"] for s in runs])}
                           for gap, runs in by_gap.items()} for op, by_gap in by_op.items()}
               for name, by_op in per_round.items()}  # fmt: skip

    def median(name: str, op: str, gap: int):
        return results[name][op][str(gap)]["median_us"]["median"] if name in results else None

    head = lab.header(f"{args.rounds} round(s) of {args.n} timed calls per contender, operation and gap (after "
                      f"{args.warmup} untimed); run took {bench.elapsed:.0f}s", bench.versions)  # fmt: skip
    text = ["## Latency with gaps between calls: get and set of a small value, one process", head]
    for op in OPS:
        rows = []
        for name in selected:
            cells = []
            for gap in GAPS_US:
                fig = results[name][op][str(gap)]["median_us"]
                cells.append(f"{lab.fmt(fig['median'])} ({fig['spread']:.0%})")
            rows.append([SYSTEMS[name], *cells])
        text.append(lab.table(["contender", *(f"gap {gap} µs" for gap in GAPS_US)], rows,
                              title=f"{op}: median µs (spread over the rounds)"))  # fmt: skip
        ratio_rows = []
        for name in ("clustershm", "nonear", "near"):
            if name not in selected:
                continue
            for peer in ("redis", "diskcache", "locmem", "floor"):
                if peer in selected:
                    ratio_rows.append([f"{SYSTEMS[name]} / {SYSTEMS[peer]}",
                                       *(lab.fmt_x(median(name, op, gap), median(peer, op, gap)) for gap in GAPS_US)])  # fmt: skip
        if ratio_rows:
            text.append(lab.table(["ratio of medians", *(f"gap {gap} µs" for gap in GAPS_US)], ratio_rows,
                                  title=f"{op}: ratios (same run)"))  # fmt: skip
    if near_share is not None:
        text.append(f"ClusterShmCache+near: {near_share:.1%} of its gets were answered from the local copy.")
    checks = {}
    if {"clustershm", "redis"} <= set(selected):
        r = lab.ratio(median("clustershm", "get", 100), median("redis", "get", 100))
        checks["get_100us_vs_redis"] = (f"ClusterShmCache get at a 100 µs gap = {lab.fmt_x(r, 1)} RedisCache's "
                                        "(target <= 0.1x)", r, 0.1)  # fmt: skip
    if {"clustershm", "diskcache"} <= set(selected):
        r = lab.ratio(median("clustershm", "get", 100), median("diskcache", "get", 100))
        checks["get_100us_vs_diskcache"] = (f"ClusterShmCache get at a 100 µs gap = {lab.fmt_x(r, 1)} "
                                            "diskcache's (target <= 1.0x)", r, 1.0)  # fmt: skip
    if {"clustershm", "locmem"} <= set(selected):
        r = lab.ratio(median("clustershm", "get", 100), median("locmem", "get", 100))
        checks["get_100us_vs_locmem"] = (f"stretch: ClusterShmCache get at a 100 µs gap = {lab.fmt_x(r, 1)} "
                                         "LocMemCache's, the unshared ceiling (target <= 1.25x)", r, 1.25)  # fmt: skip
    if {"near", "locmem"} <= set(selected):
        r = lab.ratio(median("near", "get", 100), median("locmem", "get", 100))
        checks["near_100us_vs_locmem"] = (f"ClusterShmCache+near get at a 100 µs gap = {lab.fmt_x(r, 1)} "
                                          "LocMemCache's (target <= 1.25x)", r, 1.25)  # fmt: skip
    target_text, target_results = lab.targets("Targets (#19)", checks)
    text.append(target_text)
    headlines = {f"gaps {SYSTEMS[name]} {op} at {gap} µs (µs)": (median(name, op, gap), "lower")
                 for name in ("clustershm", "nonear", "near") if name in selected for op in OPS for gap in (0, 100)}  # fmt: skip
    report = {"gaps_us": list(GAPS_US), "value": repr(VALUE), "diskcache_backend": "diskcache.DjangoCache",
              "near_local_share": near_share, "results": results, "targets": target_results}  # fmt: skip
    return lab.finish(args, bench, text, report, headlines)


if __name__ == "__main__":
    lab.run(main)
