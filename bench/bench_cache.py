"""Django cache backends: ClusterShmCache (and its near cache) against LocMem, Redis, Memcached, diskcache, files, SQLite.

Three phases with one small value: one process's latency per operation; the aggregate throughput of 1, 2 and 4
forked workers on a 90/10 get/set mix; a counter incremented by 4 processes, which shows whose ``incr`` is shared
and atomic. Targets: ClusterShmCache against RedisCache, the near cache against diskcache.DjangoCache. README.md
has the setup of every backend and how to read the numbers.
"""

from __future__ import annotations

import contextlib
import os
import random
import time
import traceback

import lab
from lab import clustershm

VALUE = {"user": 42, "name": "x" * 50}
VALUE_TEXT = '{"user": 42, "name": "x" * 50}'
MANY = 10
BLOCK = 500  # timed calls per operation per round of the interleaving
KEYSPACE = 1000
SET_SHARE = 0.10
PLAN = 4096  # length of each worker's precomputed (op, key) sequence; a power of two
PROCS = (1, 2, 4)
INCR_PROCS = 4
BOUNDED = {"MAX_ENTRIES": 100_000}
NEAR_LOCATION = "bench-near"
OPS = ("get hit", "get miss", "set", "incr", f"get_many({MANY})", f"set_many({MANY})")
BACKENDS = {"clustershm": "ClusterShmCache", "near": "ClusterShmCache+near", "redis": "RedisCache",
            "memcached": "PyMemcacheCache", "locmem": "LocMemCache", "diskcache": "diskcache.DjangoCache",
            "file": "FileBasedCache", "db": "DatabaseCache (SQLite)"}  # fmt: skip  # --only name -> label, in order
SLOW = {"file", "db"}  # timed --n-slow times in the latency phase
NOT_SHARED = {"locmem"}


def configure_django(selected: list[str], bench: lab.Lab) -> None:
    import django
    from django.conf import settings

    dj, shm = "django.core.cache.backends.", "django_clustershm.cache.ClusterShmCache"
    entries = {
        "clustershm": {"BACKEND": shm, "LOCATION": "bench", "OPTIONS": BOUNDED},
        "near": {"BACKEND": shm, "LOCATION": NEAR_LOCATION,
                 "OPTIONS": {**BOUNDED, "NEAR_CACHE": {"MAX_ENTRIES": 100_000, "MAX_BYTES": 64 * 2**20}}},
        "redis": {"BACKEND": dj + "redis.RedisCache", "LOCATION": f"unix://{bench.redis_path}"},
        "memcached": {"BACKEND": dj + "memcached.PyMemcacheCache", "LOCATION": f"127.0.0.1:{bench.memcached_port}"},
        "locmem": {"BACKEND": dj + "locmem.LocMemCache", "LOCATION": "bench", "OPTIONS": BOUNDED},
        "diskcache": {"BACKEND": "diskcache.DjangoCache", "LOCATION": bench.path("diskcache")},
        "file": {"BACKEND": dj + "filebased.FileBasedCache", "LOCATION": bench.path("files"), "OPTIONS": BOUNDED},
        "db": {"BACKEND": dj + "db.DatabaseCache", "LOCATION": "bench_cache_table", "OPTIONS": BOUNDED},
    }  # fmt: skip
    caches = {"default": {"BACKEND": dj + "locmem.LocMemCache", "LOCATION": "bench-default"}}
    caches.update({name: entries[name] for name in selected})
    sqlite = {"transaction_mode": "IMMEDIATE", "timeout": 20, "init_command": "PRAGMA journal_mode=WAL"}
    settings.configure(DEBUG=False, SECRET_KEY="bench-cache-not-a-secret", INSTALLED_APPS=[], USE_TZ=True,
                       DATABASES={"default": {"ENGINE": "django.db.backends.sqlite3",
                                              "NAME": bench.path("cache.sqlite3"), "OPTIONS": sqlite}},
                       CACHES=caches)  # fmt: skip
    django.setup()
    if "db" in selected:
        from django.core.management import call_command
        from django.test.utils import override_settings

        # createcachetable instantiates every configured cache: show it only the database one.
        with override_settings(CACHES={"default": caches["default"], "db": caches["db"]}):
            call_command("createcachetable", verbosity=0)
    _close_all()


def _close_all() -> None:
    from django.core.cache import caches
    from django.db import connections

    caches.close_all()
    connections.close_all()


def _new_cache(alias: str):
    """A fresh backend instance of ``alias`` (in a forked worker: after closing what it inherited)."""
    from django.core.cache import caches

    caches.close_all()
    return caches.create_connection(alias)


@contextlib.contextmanager
def _parent_cache(alias: str):
    """A backend instance for this process, closed with the database connections before the next fork."""
    cache = _new_cache(alias)
    try:
        yield cache
    finally:
        cache.close()
        _close_all()


def _near_counts():
    """(hits, misses) of this process's near cache on NEAR_LOCATION, or None (public clustershm.near_stats())."""
    stats = getattr(clustershm, "near_stats", dict)().get(NEAR_LOCATION)
    return (stats["hits"], stats["misses"]) if stats else None


def smoke_test(alias: str) -> None:
    with _parent_cache(alias) as cache:
        cache.clear()
        cache.set("bench:smoke", VALUE)
        if (got := cache.get("bench:smoke")) != VALUE:
            raise AssertionError(f"set then get returned {got!r}, expected {VALUE!r}")
        cache.delete("bench:smoke")
        if alias == "near" and _near_counts() is None:
            raise AssertionError("the near cache is not enabled (it needs cluster mode: clustershm.configure)")


def run_latency(alias: str, args) -> dict:
    n = min(args.n, args.n_slow) if alias in SLOW else args.n
    lab.log(f"latency {alias}: N={n}")
    many_keys = [f"bench:many:{i}" for i in range(MANY)]
    many_items = {f"bench:setmany:{i}": VALUE for i in range(MANY)}
    with _parent_cache(alias) as cache:
        cache.clear()
        cache.set("bench:hit", VALUE)
        cache.set_many(dict.fromkeys(many_keys, VALUE))
        cache.set("bench:counter", 0)
        if cache.get("bench:hit") != VALUE or cache.get("bench:missing") is not None:
            raise AssertionError("get does not return what was set, or None for a missing key")
        if len(cache.get_many(many_keys)) != MANY or cache.incr("bench:counter") != 1:
            raise AssertionError("get_many does not return every key just set, or incr of 0 is not 1")
        get, set_, incr, get_many, set_many = cache.get, cache.set, cache.incr, cache.get_many, cache.set_many
        ops = dict(zip(OPS, (lambda: get("bench:hit"), lambda: get("bench:missing"), lambda: set_("bench:set", VALUE),
                             lambda: incr("bench:counter"), lambda: get_many(many_keys),
                             lambda: set_many(many_items)), strict=True))  # fmt: skip
        results = lab.time_interleaved(ops, n, min(args.warmup, n), BLOCK)
        cache.clear()
    return results


def _throughput_worker(index: int, ready, alias: str, seconds: float, seed: int) -> dict:
    cache = _new_cache(alias)
    rng = random.Random(seed * 1009 + index)
    keys = [f"tp:{i}" for i in range(KEYSPACE)]
    plan = [(rng.random() < SET_SHARE, rng.choice(keys)) for _ in range(PLAN)]
    cache.get(keys[0])  # connect before the start
    near_before = _near_counts()
    ready()
    get, set_, clock, value = cache.get, cache.set, time.perf_counter, VALUE
    gets = hits = sets = errors = i = 0
    first_error = None
    t0 = clock()
    deadline = t0 + seconds
    while True:
        is_set, key = plan[i]
        i = (i + 1) & (PLAN - 1)
        try:
            if is_set:
                set_(key, value)
                sets += 1
            else:
                hits += get(key) is not None
                gets += 1
        except Exception as exc:  # a failed call is counted and reported, the run goes on
            errors += 1
            first_error = first_error or repr(exc)[:300]
        if not (gets + sets + errors) & 15 and clock() >= deadline:
            break
    elapsed = clock() - t0
    near = _near_counts()  # the gets answered from the local copy during the run, and the others
    near = (near[0] - near_before[0], near[1] - near_before[1]) if near and near_before else None
    return {"index": index, "ok": gets + sets, "gets": gets, "hits": hits, "sets": sets, "errors": errors,
            "first_error": first_error, "seconds": elapsed, "near": near}  # fmt: skip


def run_throughput(alias: str, args) -> dict:
    keys = [f"tp:{i}" for i in range(KEYSPACE)]
    with _parent_cache(alias) as cache:
        cache.clear()
        for start in range(0, KEYSPACE, 100):
            cache.set_many(dict.fromkeys(keys[start : start + 100], VALUE))
        if len(cache.get_many(keys[:100])) != 100:
            raise AssertionError("the key space was not filled")
    out = {}
    for procs in PROCS:
        lab.log(f"  throughput {alias}: {procs} process(es), {args.seconds:g}s")
        workers = lab.run_workers(procs, _throughput_worker, (alias, args.seconds, args.seed), args.seconds + 120)
        gets, near = sum(w["gets"] for w in workers), [w["near"] for w in workers]
        near_total = sum(h + m for h, m in near) if None not in near else 0
        out[str(procs)] = {"ops_per_s": sum(w["ok"] / w["seconds"] for w in workers),
                           "ops": sum(w["ok"] for w in workers), "errors": sum(w["errors"] for w in workers),
                           "first_error": next((w["first_error"] for w in workers if w["first_error"]), None),
                           "get_hit_rate": sum(w["hits"] for w in workers) / gets if gets else None,
                           "near_local_share": sum(h for h, _ in near) / near_total if near_total else None,
                           "workers": workers}  # fmt: skip
    with _parent_cache(alias) as cache:
        cache.clear()
    return out


def _incr_worker(index: int, ready, alias: str, calls: int) -> dict:
    cache = _new_cache(alias)
    cache.get("counter")  # connect before the start
    ready()
    incr, clock = cache.incr, time.perf_counter
    errors, first_error, last = 0, None, None
    t0 = clock()
    for _ in range(calls):
        try:
            last = incr("counter")
        except Exception as exc:  # a failed call is counted and reported, the run goes on
            errors += 1
            first_error = first_error or repr(exc)[:300]
    return {"index": index, "errors": errors, "first_error": first_error, "last": last, "seconds": clock() - t0}


def run_incr(alias: str, args) -> dict:
    calls = args.incr
    lab.log(f"incr {alias}: {INCR_PROCS} x {calls}")
    with _parent_cache(alias) as cache:
        cache.delete("counter")
        cache.set("counter", 0)
    workers = lab.run_workers(INCR_PROCS, _incr_worker, (alias, calls))
    with _parent_cache(alias) as cache:
        final = cache.get("counter")
        cache.delete("counter")
    errors, shared = sum(w["errors"] for w in workers), alias not in NOT_SHARED
    # lost: calls that returned without an error but whose increment is not in the final value
    return {"shared": shared, "final": final, "expected": INCR_PROCS * calls, "failed_calls": errors,
            "lost_updates": INCR_PROCS * calls - errors - final if shared and isinstance(final, int) else None,
            "first_error": next((w["first_error"] for w in workers if w["first_error"]), None),
            "seconds": max(w["seconds"] for w in workers), "per_process_last": [w["last"] for w in workers]}  # fmt: skip


def _label(name: str) -> str:
    return BACKENDS[name] + (" (not shared)" if name in NOT_SHARED else "")


def _error_cell(r: dict, phase: str) -> str:
    err = r.get(f"{phase}_error") or r.get("smoke_error") or "not run"
    return "error: " + err.replace("|", "\\|").replace("\n", " ")[:200]


def _figure(results: dict, name: str, phase: str, *path):
    value = results.get(name, {}).get(phase)
    for key in path:
        value = value[key] if value is not None else None
    return value


def tables(selected: list[str], results: dict, args) -> list[str]:
    slow = f", FileBased and DB: {min(args.n, args.n_slow)}" if SLOW & set(selected) else ""
    p = str(PROCS[-1])
    redis_hit = _figure(results, "redis", "latency", "get hit", "median_us")
    redis_ops = _figure(results, "redis", "throughput", p, "ops_per_s")
    latency, throughput, incr = [], [], []
    for name in selected:
        r, label = results[name], _label(name)
        if lat := r.get("latency"):
            latency.append([label, lat["get hit"]["n"], *(f"{lab.fmt(lat[op]['median_us'])} / {lab.fmt(lat[op]['p99_us'])}"
                            for op in OPS), lab.fmt_x(lat["get hit"]["median_us"], redis_hit)])  # fmt: skip
        else:
            latency.append([label, "", _error_cell(r, "latency")])
        if tp := r.get("throughput"):
            hit = tp[p]["get_hit_rate"]
            throughput.append([label, *(f"{tp[str(n)]['ops_per_s']:,.0f}" for n in PROCS),
                               lab.fmt_x(tp[p]["ops_per_s"], redis_ops), "n/a" if hit is None else f"{hit:.1%}",
                               sum(tp[str(n)]["errors"] for n in PROCS)])  # fmt: skip
        else:
            throughput.append([label, _error_cell(r, "throughput")])
        if not (c := r.get("incr")):
            incr.append([label, _error_cell(r, "incr"), "", "", ""])
            continue
        final, lost = str(c["final"]), "n/a" if c["lost_updates"] is None else str(c["lost_updates"])
        if not c["shared"]:
            per = "/".join(map(str, sorted({v for v in c["per_process_last"] if v is not None})))
            final = f"n/a (not shared; parent sees {c['final']}, each process counted to {per})"
        error = f" ({c['first_error'][:80]})" if c["failed_calls"] and c["first_error"] else ""
        incr.append([label, final, lost, f"{c['failed_calls']}{error}", f"{c['seconds']:.2f}"])
    near = results.get("near", {}).get("throughput")
    shares = [near[str(n)]["near_local_share"] for n in PROCS] if near else [None]
    return [
        lab.table(["backend", "N", *OPS, "get hit median x RedisCache"], latency,
                  title=f"1. Latency, one process (median / p99, µs; N = {args.n}{slow})"),
        lab.table(["backend", *(f"{n} process{'es' if n > 1 else ''}" for n in PROCS), f"{p} processes x RedisCache",
                   f"get hit rate ({p} procs)", "errors"], throughput,
                  title=f"2. Aggregate throughput, ops/s (90% get / 10% set, {KEYSPACE} keys, {args.seconds:g} s per run, "
                        f"forked workers, {os.cpu_count()} CPUs)"),
        *([f"ClusterShmCache+near: share of gets answered from the process's near cache with "
           f"{'/'.join(map(str, PROCS))} processes: {' / '.join(f'{s:.1%}' for s in shares)} (the rest went to the "
           "Manager: first reads, and reads of a key invalidated or evicted since)."] if None not in shares else []),
        lab.table(["backend", "final value", "lost updates", "failed calls", "seconds"], incr,
                  title=f"3. Shared counter: {INCR_PROCS} processes x {args.incr} incr (expected {INCR_PROCS * args.incr})"),
    ]  # fmt: skip


def targets(results: dict) -> tuple[str, dict]:
    p, checks = str(PROCS[-1]), {}
    for key, a, b, phase, path, text, limit in (
        ("get_hit_median_ratio", "clustershm", "redis", "latency", ("get hit", "median_us"),
         "get-hit median <= 0.35x RedisCache's", 0.35),
        ("throughput_ratio", "clustershm", "redis", "throughput", (p, "ops_per_s"),
         f"{p}-process ops/s >= 2x RedisCache's", 2.0),
        ("near_get_hit_median_vs_diskcache", "near", "diskcache", "latency", ("get hit", "median_us"),
         "near-cache get-hit median <= diskcache's", 1.0),
        ("near_throughput_vs_diskcache", "near", "diskcache", "throughput", (p, "ops_per_s"),
         f"near-cache {p}-process ops/s >= diskcache's", 1.0),
    ):  # fmt: skip
        x, y = _figure(results, a, phase, *path), _figure(results, b, phase, *path)
        if x is not None and y is not None:
            text += f": {lab.fmt(x)} vs {lab.fmt(y)} {'µs' if phase == 'latency' else 'ops/s'} = {x / y:.2f}x"
        else:
            text += f" ({BACKENDS[a]} or {BACKENDS[b]} not measured)"
        checks[key] = (text, lab.ratio(x, y), limit, phase == "throughput")
    title = "Targets (ClusterShmCache against RedisCache, ClusterShmCache+near against diskcache, same run)"
    return lab.targets(title, checks)


def _attempt(results: dict, name: str, phase: str, fn, *args) -> bool:
    """results[name][phase] = fn(*args) unless None; a failure goes to results[name][phase + "_error"], the run goes on."""
    try:
        if (value := fn(*args)) is not None:
            results[name][phase] = value
        return True
    except Exception as exc:  # one backend's failure is reported in its row
        results[name][f"{phase}_error"] = f"{type(exc).__name__}: {exc}"
        lab.log(f"{BACKENDS[name]}: {phase} failed:\n{traceback.format_exc()}")
        return False


def main(argv=None) -> int:
    args = lab.options(__doc__, argv, {"n": 500, "n_slow": 100, "warmup": 50, "seconds": 0.5, "incr": 200}, BACKENDS,
                       n=(lab.count, 5000, "timed calls per operation, latency"),
                       n_slow=(lab.count, 1000, "the same for FileBased and DB"),
                       warmup=(lab.count0, 200, "untimed calls per operation first"),
                       seconds=(lab.seconds, 3.0, "duration of each throughput run"),
                       incr=(lab.count, 2000, "incr calls per process, counter"),
                       seed=(int, 1, "seed of the workers' key sequences"))  # fmt: skip
    selected = args.selected
    lab.need(binaries=[b for n, b in (("redis", "redis-server"), ("memcached", "memcached")) if n in selected],
             modules=["django"] + [m for n, m in (("redis", "redis"), ("memcached", "pymemcache"),
                                                  ("diskcache", "diskcache")) if n in selected])  # fmt: skip

    results: dict[str, dict] = {name: {"label": BACKENDS[name]} for name in selected}
    with lab.Lab("cache") as bench:
        if {"clustershm", "near"} & set(selected):
            bench.start_manager(configure=False)  # configure() once Django is set up, before any fork
        if "redis" in selected:
            bench.start_redis()
        if "memcached" in selected:
            bench.start_memcached()
        configure_django(selected, bench)
        if bench.manager_pid is not None:
            bench.configure()  # every worker inherits the address and the secret
        active = [name for name in selected if _attempt(results, name, "smoke", smoke_test, name)]
        for phase, fn in (("latency", run_latency), ("throughput", run_throughput), ("incr", run_incr)):
            for name in active:
                _attempt(results, name, phase, fn, name, args)

    failures = [f"- {BACKENDS[name]}: {msg}" for name, r in results.items() for key, msg in r.items()
                if key.endswith("_error")]  # fmt: skip
    target_text, target_results = targets(results)
    text = [
        "## Django cache backends: latency, throughput, shared incr",
        lab.header(f"Value {VALUE_TEXT}; run took {bench.elapsed:.0f}s", bench.versions),
        *(["**Errors:**", "\n".join(failures)] if failures else []),
        *tables(selected, results, args),
        target_text,
    ]
    headlines = {
        f"cache{'+near' if name == 'near' else ''} {what}": (_figure(results, name, *path), better)
        for name in ("clustershm", "near")
        for what, path, better in (("get hit median (µs)", ("latency", "get hit", "median_us"), "lower"),
                                   ("4-process 90/10 ops/s", ("throughput", "4", "ops_per_s"), "higher"))
    }  # fmt: skip
    report = {"n_slow": min(args.n, args.n_slow), "procs": list(PROCS), "keyspace": KEYSPACE, "set_share": SET_SHARE,
              "incr_procs": INCR_PROCS, "value": VALUE_TEXT, "backends": results, "targets": target_results}  # fmt: skip
    return lab.finish(args, bench, text, report, headlines, failed=failures)


if __name__ == "__main__":
    lab.run(main)
