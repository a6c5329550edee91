"""Cache stampedes and compression (#17 part 5): ClusterShmCache.get_or_set against Redis and diskcache recipes.

Stampede: N forked processes call get_or_set on one key for a few seconds, a 50 ms builder, a 1 s timeout, one call
per process every millisecond or so; each build appends a line to a file (a counter outside every measured system).
Builds per expiry (builds grouped into expiries: a gap of more than half the timeout starts a new one), the most
builds in one expiry, and the calls' p50/p99. Compression: a ~100 KiB HTML page, bytes stored and get latency per
compressor (none, zlib, lzma) for ClusterShmCache aliases and django-redis. Target: exactly 1 build per expiry for
ClusterShmCache, with and without stale=.
"""

from __future__ import annotations

import os
import statistics
import time

import lab

KEY = "stampede:page"
BUILD_S = 0.050
PACE_S = 0.001  # pause between one process's calls: requests, not a tight loop
STALE_S = 5
PEERS = {
    "clustershm": "ClusterShmCache.get_or_set",
    "stale": "ClusterShmCache.get_or_set(stale=5)",
    "redis": "Django RedisCache.get_or_set",
    "djredis": "django-redis DefaultClient.get_or_set",
    "herd": "django-redis HerdClient (get, build, set)",
    "dc-barrier": "diskcache barrier(Lock) + memoize(expire)",
    "dc-stampede": "diskcache memoize_stampede(expire)",
}
COMPRESSORS = {"none": None, "zlib": "ZlibCompressor", "lzma": "LzmaCompressor"}
DJR_COMPRESSORS = {"none": None, "zlib": "zlib.ZlibCompressor", "lzma": "lzma.LzmaCompressor"}


def html_page(size: int = 100 * 1024) -> str:
    """A realistic, repetitive HTML page of about ``size`` characters: a product listing."""
    head = ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>Shop - catalogue</title>"
            "<link rel=\"stylesheet\" href=\"/static/css/site.3f9a1c.css\"></head>\n<body><header class=\"top\">"
            "<nav><a href=\"/\">Home</a> <a href=\"/cart/\">Cart</a></nav></header>\n<main><ul class=\"products\">\n")  # fmt: skip
    rows, i = [], 0
    while len(head) + sum(map(len, rows)) < size - 200:
        rows.append(f'<li class="product" data-id="{1000 + i}"><a href="/p/{1000 + i}/item-{i * 7919 % 10007}/">'
                    f'<img src="/media/p/{i * 31 % 997}.jpg" alt="Item {i}" width="240" height="180" loading="lazy">'
                    f'<span class="name">Item {i} - {["red", "blue", "green", "black"][i % 4]} cotton shirt</span>'
                    f'<span class="price">{(i * 37) % 90 + 9}.{i % 100:02d} EUR</span></a>'
                    f'<button class="add" data-sku="SKU-{i:06d}">Add to cart</button></li>\n')  # fmt: skip
        i += 1
    return head + "".join(rows) + "</ul></main><footer>&copy; Shop</footer></body></html>\n"


def configure_django(bench: lab.Lab) -> None:
    import django
    from django.conf import settings

    shm, sock = "django_clustershm.cache.ClusterShmCache", f"unix://{bench.redis_path}"
    caches = {
        "default": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache"},
        "clustershm": {"BACKEND": shm, "LOCATION": "stampede"},
        "redis": {"BACKEND": "django.core.cache.backends.redis.RedisCache", "LOCATION": sock},
        "djredis": {"BACKEND": "django_redis.cache.RedisCache", "LOCATION": sock, "KEY_PREFIX": "djr"},
        "herd": {"BACKEND": "django_redis.cache.RedisCache", "LOCATION": sock, "KEY_PREFIX": "herd",
                 "OPTIONS": {"CLIENT_CLASS": "django_redis.client.HerdClient"}},
    }  # fmt: skip
    for name, cls in COMPRESSORS.items():
        opts = {"COMPRESSOR": f"django_clustershm.compressors.{cls}"} if cls else {}
        caches[f"shm-{name}"] = {"BACKEND": shm, "LOCATION": f"zip-{name}", "OPTIONS": opts}
    for name, cls in DJR_COMPRESSORS.items():
        opts = {"COMPRESSOR": f"django_redis.compressors.{cls}"} if cls else {}
        caches[f"djr-{name}"] = {"BACKEND": "django_redis.cache.RedisCache", "LOCATION": sock,
                                 "KEY_PREFIX": f"zip-{name}", "OPTIONS": opts}  # fmt: skip
    # CACHE_HERD_TIMEOUT: HerdClient keeps a value this long past its timeout (default 60 s).
    settings.configure(SECRET_KEY="bench-stampede", INSTALLED_APPS=[], CACHES=caches, CACHE_HERD_TIMEOUT=60)
    django.setup()


# -- the stampede -------------------------------------------------------------------------


def _caller(peer: str, bench_dir: str, timeout: float, build_log: str):
    """The function one call of ``peer`` makes (built in the worker, after the fork)."""
    from django.core.cache import caches

    caches.close_all()
    fd = os.open(build_log, os.O_WRONLY | os.O_APPEND)

    def build():
        os.write(fd, f"{time.time():.6f}\n".encode())
        time.sleep(BUILD_S)
        return "<html>built</html>" * 50

    if peer.startswith("dc-"):
        import diskcache
        from diskcache.recipes import barrier, memoize_stampede

        dc = diskcache.Cache(os.path.join(bench_dir, "diskcache"))
        if peer == "dc-barrier":
            page = barrier(dc, diskcache.Lock)(dc.memoize(expire=timeout)(build))
        else:
            page = memoize_stampede(dc, expire=timeout)(build)
        return page
    cache = caches[peer if peer != "stale" else "clustershm"]
    if peer == "herd":  # django-redis's documented use; its get_or_set's add() never replaces a herded value

        def herd():
            value = cache.get(KEY)
            if value is None:
                value = build()
                cache.set(KEY, value, timeout)
            return value

        return herd
    if peer == "stale":
        return lambda: cache.get_or_set(KEY, build, timeout, stale=STALE_S)
    return lambda: cache.get_or_set(KEY, build, timeout)


def _stampede_worker(index: int, ready, peer: str, bench_dir: str, timeout: float, seconds: float, log_path: str):
    call = _caller(peer, bench_dir, timeout, log_path)
    ready()
    clock, samples = time.perf_counter, []
    end = clock() + seconds
    while (t0 := clock()) < end:
        value = call()
        samples.append(clock() - t0)
        if not value:
            raise AssertionError(f"{peer}: get_or_set returned {value!r}")
        time.sleep(PACE_S)
    return samples


def expiries(times: list[float], timeout: float) -> list[int]:
    """Builds per expiry: build start times grouped where a gap exceeds half the timeout."""
    groups: list[int] = []
    last = None
    for t in sorted(times):
        if last is None or t - last > timeout / 2:
            groups.append(0)
        groups[-1] += 1
        last = t
    return groups


def clear_peer(peer: str, bench: lab.Lab) -> None:
    from django.core.cache import caches

    if peer.startswith("dc-"):
        import diskcache

        with diskcache.Cache(bench.path("diskcache")) as dc:
            dc.clear()
    else:
        caches[peer if peer != "stale" else "clustershm"].clear()
    caches.close_all()


def run_stampede(peer: str, bench: lab.Lab, args) -> dict:
    clear_peer(peer, bench)
    log_path = bench.path(f"builds-{peer}.log")
    open(log_path, "w").close()
    results = lab.run_workers(args.procs, _stampede_worker,
                              (peer, bench.tmpdir, args.timeout, args.seconds, log_path))  # fmt: skip
    with open(log_path) as fh:
        times = [float(line) for line in fh if line.strip()]
    groups = expiries(times, args.timeout)
    samples = sorted(s for r in results for s in r)
    return {"builds": len(times), "expiries": len(groups), "per_expiry": len(times) / max(1, len(groups)),
            "max_per_expiry": max(groups, default=0), "calls": len(samples),
            "p50_ms": lab.rank(samples, 0.5) * 1e3, "p99_ms": lab.rank(samples, 0.99) * 1e3}  # fmt: skip


# -- compression --------------------------------------------------------------------------


def stored_bytes(alias: str, made: str) -> int:
    from django.core.cache import caches

    cache = caches[alias]
    if alias.startswith("djr-"):
        return cache.client.get_client().strlen(made)
    caches_stats = lab.clustershm.stats()["caches"]
    return caches_stats[cache._location if hasattr(cache, "_location") else "zip-" + alias[4:]]["bytes"]


def run_compression(page: str, args) -> dict:
    from django.core.cache import caches

    out = {}
    for alias in [f"shm-{n}" for n in COMPRESSORS] + [f"djr-{n}" for n in DJR_COMPRESSORS]:
        cache = caches[alias]
        cache.clear()
        t0 = time.perf_counter()
        cache.set("page", page, None)
        set_us = (time.perf_counter() - t0) * 1e6
        if cache.get("page") != page:
            raise AssertionError(f"{alias}: the page did not round-trip")
        made = cache.make_key("page")
        size = stored_bytes(alias, made)
        timed = lab.time_interleaved({"get": lambda c=cache: c.get("page")}, args.n, warmup=20, block=args.n)
        out[alias] = {"bytes": size, "set_us": set_us, "get_us": timed["get"]["median_us"],
                      "get_p99_us": timed["get"]["p99_us"]}  # fmt: skip
    return out


def main(argv=None) -> int:
    args = lab.options(__doc__, argv, {"rounds": 1, "seconds": 2.0, "n": 100}, peers=PEERS,
                       procs=(lab.count, 8, "processes in the stampede"),
                       seconds=(lab.seconds, 5.0, "seconds per stampede run"),
                       timeout=(lab.seconds, 1.0, "the cache timeout of the stampeded key"),
                       rounds=(lab.count, 3, "rounds; figures are medians over them"),
                       n=(lab.count, 500, "timed gets per compressor per round"))  # fmt: skip
    lab.need(binaries=["redis-server"], modules=["redis", "django_redis", "diskcache"])
    page = html_page()
    with lab.Lab("stampede") as bench:
        bench.start_manager()
        bench.start_redis()
        configure_django(bench)
        runs: dict[str, list] = {p: [] for p in args.selected}
        zips: list[dict] = []
        for r in range(args.rounds):
            for peer in args.selected:
                lab.log(f"round {r + 1}/{args.rounds}: stampede {peer}")
                runs[peer].append(run_stampede(peer, bench, args))
            lab.log(f"round {r + 1}/{args.rounds}: compression")
            zips.append(run_compression(page, args))
        from django.core.cache import caches

        caches.close_all()
    med = {p: {k: statistics.median(run[k] for run in rs) for k in rs[0]} for p, rs in runs.items()}
    spread = {p: {k: lab.rounds([run[k] for run in rs])["spread"] for k in ("per_expiry", "p99_ms")}
              for p, rs in runs.items()}  # fmt: skip
    rows = [[PEERS[p], lab.fmt(m["builds"], 0), lab.fmt(m["expiries"], 0), f"{m['per_expiry']:.2f}",
             lab.fmt(m["max_per_expiry"], 0), lab.fmt(m["p50_ms"], 2), lab.fmt(m["p99_ms"], 1),
             f"{100 * (spread[p]['p99_ms'] or 0):.0f}%"] for p, m in med.items()]  # fmt: skip
    text = [lab.header(f"bench_stampede ({args.procs} processes, {args.seconds:g} s, timeout {args.timeout:g} s, "
                       f"{BUILD_S * 1e3:.0f} ms builder, median of {args.rounds} rounds)", bench.versions),
            lab.table(["peer", "builds", "expiries", "builds/expiry", "max in one expiry", "p50 ms", "p99 ms",
                       "p99 spread"], rows, title="Stampede")]  # fmt: skip
    zrows = []
    for alias in zips[0]:
        m = {k: statistics.median(z[alias][k] for z in zips) for k in zips[0][alias]}
        who = "ClusterShmCache" if alias.startswith("shm-") else "django-redis"
        zrows.append([who, alias.split("-", 1)[1], lab.fmt(m["bytes"], 0), f"{len(page.encode()) / m['bytes']:.1f}x",
                      lab.fmt(m["get_us"]), lab.fmt(m["get_p99_us"]), lab.fmt(m["set_us"])])  # fmt: skip
    text.append(lab.table(["backend", "compressor", "bytes stored", "ratio", "get median µs", "get p99 µs",
                           "set µs (one)"], zrows,
                          title=f"Compression: a {len(page) / 1024:.0f} KiB HTML page"))  # fmt: skip
    checks = {
        f"{p}_builds_per_expiry": (
            f"{PEERS[p]}: exactly 1 build per expiry (max in one expiry)",
            med[p]["max_per_expiry"],
            1,
        )
        for p in ("clustershm", "stale")
        if p in med
    }
    section, met = lab.targets("Targets", checks)
    text.append(section)
    report = {"stampede": runs, "compression": zips, "targets": met, "page_bytes": len(page.encode())}
    headlines = {f"{p}_p99_ms": (m["p99_ms"], "lower") for p, m in med.items()}
    return lab.finish(args, bench, text, report, headlines, failed=any(t["met"] is False for t in met.values()))


if __name__ == "__main__":
    lab.run(main)
