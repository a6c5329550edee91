"""Django cache backends compared: ClusterShmCache (and +near) vs LocMem, Redis, Memcached, diskcache, files, SQLite.

Run by hand from the repository root (it is not part of the test suite)::

    python bench/bench_cache.py                          # every backend, N = 5000, 3 s per throughput run
    python bench/bench_cache.py --only redis,memcached   # a subset
    python bench/bench_cache.py --only near,diskcache    # the near cache against diskcache
    python bench/bench_cache.py --n 20000 --seconds 5 --json bench/results/cache.json

Needs ``redis-server`` and ``memcached`` on the PATH (when those backends are
selected) and the Python packages ``redis``, ``pymemcache`` and ``diskcache``
(``pip install -e '.[bench]'``). The script starts every server itself and
stops it by pid at the end, and removes every file it made:

* ``django_clustershm.cache.ClusterShmCache``: a Manager serving in a forked
  child of this script on a Unix socket in a private temporary directory;
* ``ClusterShmCache+near`` (``--only near``): the same backend and the same
  Manager, on its own LOCATION (``bench-near``) with
  ``NEAR_CACHE = {"MAX_ENTRIES": 100000, "MAX_BYTES": 64 MiB}``: each process
  keeps a consistent local copy of the keys it read, updated (small values)
  or invalidated by the Manager on every change (cluster mode only, which
  ``django_clustershm.configure()`` sets up here);
* ``RedisCache``: ``redis-server --port 0`` on a Unix socket, no persistence;
* ``PyMemcacheCache``: ``memcached`` on 127.0.0.1, a free TCP port, no UDP;
* ``LocMemCache``: in-process memory, not shared between processes (the ceiling);
* ``diskcache.DjangoCache``, ``FileBasedCache``: directories under the temp dir;
* ``DatabaseCache``: a SQLite file in the temp dir, in WAL mode with
  ``transaction_mode = IMMEDIATE`` and a 20 s busy timeout (Django 5.1+
  options; without them concurrent writers fail with "database is locked").

Django is configured by this script (``settings.configure``), no project
settings are used. LocMem, FileBased, DB and both ClusterShm backends get
``MAX_ENTRIES = 100000`` so that nothing is culled during the run (Django's
default of 300 would evict most of the 1000-key working set below).

What it measures (the value is a small dict, ``{"user": 42, "name": "x" * 50}``)
--------------------------------------------------------------------------------
1. Latency, one process, one call at a time: median and 99th percentile
   (nearest rank) in microseconds of ``get`` hit, ``get`` miss, ``set``,
   ``incr``, ``get_many`` of 10 keys and ``set_many`` of 10 keys, with
   ``time.perf_counter`` around each call. Operations are timed in
   interleaved blocks so that drift affects all of them alike, with the
   garbage collector paused. FileBased and DB are timed ``--n-slow`` times
   (default 1000) instead of ``--n``: their ``set`` costs milliseconds.
2. Aggregate throughput: 1, 2 and 4 forked worker processes, each running a
   90/10 ``get``/``set`` mix over 1000 pre-filled keys for ``--seconds``
   seconds after a common start signal; the figure is the sum of each
   worker's successful calls per second. LocMem's figure with several
   processes is each process's private memory (not shared).
3. A counter: 4 forked processes each call ``cache.incr("counter")`` 2000
   times after ``cache.set("counter", 0)``. A shared backend with an atomic
   ``incr`` ends at 8000; Django's generic ``incr`` (a ``get`` then a
   ``set``, used by FileBased and DB) loses updates under concurrency.

Every worker is forked with Django configured; the parent closes its own
cache and database connections before forking and each worker builds its own
backend instances (``caches.create_connection``), so no connection is ever
used by two processes. Every child is reaped and its exit status checked.

How to read it
--------------
Absolute numbers depend on the machine; compare backends within one run.
On a small VM the workers, the server and this script compete for the same
CPUs (the header says how many there are), which caps the multi-process
figures. The last section checks ClusterShm's targets against RedisCache,
and the near cache's against diskcache.DjangoCache, measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import select
import shutil
import signal
import socket
import sys
import time
import traceback

try:
    import django_clustershm  # noqa: F401
except ImportError:  # run as "python bench/bench_cache.py" without PYTHONPATH
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # bench/, for _common
import _common  # noqa: E402
from _common import (  # noqa: E402
    BenchError,
    describe_status,
    fmt_us,
    fork,
    free_port,
    log,
    package_versions,
    program_version,
    reap,
    summarise_us,
    time_interleaved,
    write_json,
)

#: The small value every write stores and every hit returns.
VALUE = {"user": 42, "name": "x" * 50}
VALUE_TEXT = '{"user": 42, "name": "x" * 50}'
MANY = 10
BLOCK = 500  # timed calls per operation per round of the interleaving
KEYSPACE = 1000
SET_SHARE = 0.10
PLAN = 4096  # length of each worker's precomputed (op, key) sequence; a power of two
PROCS = (1, 2, 4)
INCR_PROCS = 4
INCR_CALLS = 2000
MAX_ENTRIES = 100_000

#: --only name -> label in the tables, in table order.
BACKENDS = {
    "clustershm": "ClusterShmCache",
    "near": "ClusterShmCache+near",
    "redis": "RedisCache",
    "memcached": "PyMemcacheCache",
    "locmem": "LocMemCache",
    "diskcache": "diskcache.DjangoCache",
    "file": "FileBasedCache",
    "db": "DatabaseCache (SQLite)",
}
CLUSTERSHM = {"clustershm", "near"}  # need the Manager
NEAR_LOCATION = "bench-near"
NEAR_OPTIONS = {"MAX_ENTRIES": 100_000, "MAX_BYTES": 64 * 2**20}
SLOW = {"file", "db"}  # timed --n-slow times in the latency phase
NOT_SHARED = {"locmem"}
OPS = ("get hit", "get miss", "set", "incr", f"get_many({MANY})", f"set_many({MANY})")

READY_TIMEOUT = 60.0  # seconds a worker may take to connect before the start signal


class SetupError(BenchError):
    """The environment cannot run the benchmark (a missing server, a server that does not start)."""


# -- the servers --------------------------------------------------------------------


class Lab(_common.Lab):
    """The temp directory and every server process this script starts (and stops, by pid)."""

    def __init__(self) -> None:
        super().__init__("bench-cache-")
        self.memcached_port: int | None = None

    def start_manager(self) -> None:
        # configure() comes later, once Django is set up and before any fork (see main).
        super().start_manager(configure=False)

    def start_memcached(self, binary: str) -> None:
        port = free_port()
        argv = [binary, "-l", "127.0.0.1", "-p", str(port), "-U", "0", "-m", "64"]
        if os.geteuid() == 0:  # memcached refuses to run as root without -u
            import pwd

            argv += ["-u", pwd.getpwuid(0).pw_name]
        proc = self._spawn("memcached", argv)

        def probe():
            with socket.create_connection(("127.0.0.1", port), timeout=1.0) as s:
                s.sendall(b"version\r\n")
                if not s.recv(64).startswith(b"VERSION"):
                    raise OSError("no VERSION")

        self._wait_server("memcached", proc, probe)
        self.memcached_port = port
        self.versions["memcached"] = program_version([binary, "-V"]).split()[-1]  # "memcached 1.6.18"


# -- Django -------------------------------------------------------------------------


def configure_django(selected: list[str], lab: Lab) -> None:
    import django
    from django.conf import settings

    entries = {
        "clustershm": {
            "BACKEND": "django_clustershm.cache.ClusterShmCache",
            "LOCATION": "bench",
            "OPTIONS": {"MAX_ENTRIES": MAX_ENTRIES},
        },
        "near": {
            "BACKEND": "django_clustershm.cache.ClusterShmCache",
            "LOCATION": NEAR_LOCATION,
            "OPTIONS": {"MAX_ENTRIES": MAX_ENTRIES, "NEAR_CACHE": NEAR_OPTIONS},
        },
        "locmem": {
            "BACKEND": "django.core.cache.backends.locmem.LocMemCache",
            "LOCATION": "bench",
            "OPTIONS": {"MAX_ENTRIES": MAX_ENTRIES},
        },
        "redis": {"BACKEND": "django.core.cache.backends.redis.RedisCache", "LOCATION": f"unix://{lab.redis_path}"},
        "memcached": {
            "BACKEND": "django.core.cache.backends.memcached.PyMemcacheCache",
            "LOCATION": f"127.0.0.1:{lab.memcached_port}",
        },
        "diskcache": {"BACKEND": "diskcache.DjangoCache", "LOCATION": lab.path("diskcache")},
        "file": {
            "BACKEND": "django.core.cache.backends.filebased.FileBasedCache",
            "LOCATION": lab.path("filecache"),
            "OPTIONS": {"MAX_ENTRIES": MAX_ENTRIES},
        },
        "db": {
            "BACKEND": "django.core.cache.backends.db.DatabaseCache",
            "LOCATION": "bench_cache_table",
            "OPTIONS": {"MAX_ENTRIES": MAX_ENTRIES},
        },
    }
    caches = {"default": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache", "LOCATION": "bench-default"}}
    caches.update({name: entries[name] for name in selected})
    settings.configure(
        DEBUG=False,
        SECRET_KEY="bench-cache-not-a-secret",
        INSTALLED_APPS=[],
        USE_TZ=True,
        DATABASES={
            "default": {
                "ENGINE": "django.db.backends.sqlite3",
                "NAME": lab.path("cache.sqlite3"),
                "OPTIONS": {"transaction_mode": "IMMEDIATE", "timeout": 20, "init_command": "PRAGMA journal_mode=WAL"},
            }
        },
        CACHES=caches,
    )
    django.setup()
    if "db" in selected:
        from django.core.management import call_command
        from django.test.utils import override_settings

        # createcachetable instantiates every configured cache: show it only
        # the database one, so that a broken backend cannot stop the others.
        with override_settings(CACHES={"default": caches["default"], "db": caches["db"]}):
            call_command("createcachetable", verbosity=0)
    _close_parent_connections()


def _close_parent_connections() -> None:
    """Close whatever the parent holds (the handler's caches, the database) so that no fork inherits it open."""
    from django.core.cache import caches
    from django.db import connections

    caches.close_all()
    connections.close_all()


def _new_cache(alias: str):
    """A fresh backend instance of ``alias``, not the one kept by ``django.core.cache.caches``."""
    from django.core.cache import caches

    return caches.create_connection(alias)


def _child_cache(alias: str):
    """In a forked worker: close what it inherited (the parent closed it all already), build its own backend."""
    from django.core.cache import caches

    caches.close_all()
    return caches.create_connection(alias)


def _release(cache) -> None:
    """Close a parent-side backend instance and the database connections before the next fork."""
    from django.db import connections

    try:
        cache.close()
    finally:
        connections.close_all()


def smoke_test(alias: str) -> None:
    cache = _new_cache(alias)
    try:
        cache.clear()
        cache.set("bench:smoke", VALUE)
        got = cache.get("bench:smoke")
        if got != VALUE:
            raise AssertionError(f"set then get returned {got!r}, expected {VALUE!r}")
        cache.delete("bench:smoke")
        if alias == "near" and _near_cache(cache) is None:
            raise AssertionError("the near cache is not enabled (it needs cluster mode: django_clustershm.configure)")
    finally:
        _release(cache)


def _near_cache(cache):
    """The process's NearCache object behind a ClusterShmCache with NEAR_CACHE, or None (private attributes)."""
    from django_clustershm import conf

    if getattr(cache, "_near", None) is None:
        return None
    cache._client  # enables the near cache of this LOCATION on the process's client
    return getattr(conf.get_client(), "_near", {}).get(cache._location)


# -- 1. latency -----------------------------------------------------------------------


def _latency_ops(cache) -> dict:
    many_keys = [f"bench:many:{i}" for i in range(MANY)]
    many_items = {f"bench:setmany:{i}": VALUE for i in range(MANY)}
    cache.clear()
    cache.set("bench:hit", VALUE)
    cache.delete("bench:missing")
    cache.set_many({k: VALUE for k in many_keys})
    cache.set("bench:counter", 0)
    if cache.get("bench:hit") != VALUE:
        raise AssertionError("get of a key just set does not return its value")
    if cache.get("bench:missing") is not None:
        raise AssertionError("get of a missing key does not return None")
    if len(cache.get_many(many_keys)) != MANY:
        raise AssertionError("get_many does not return every key just set")
    if cache.incr("bench:counter") != 1:
        raise AssertionError("incr of 0 does not return 1")
    get, set_, incr, get_many, set_many = cache.get, cache.set, cache.incr, cache.get_many, cache.set_many
    return {
        "get hit": lambda: get("bench:hit"),
        "get miss": lambda: get("bench:missing"),
        "set": lambda: set_("bench:set", VALUE),
        "incr": lambda: incr("bench:counter"),
        f"get_many({MANY})": lambda: get_many(many_keys),
        f"set_many({MANY})": lambda: set_many(many_items),
    }


def run_latency(alias: str, n: int, warmup: int) -> dict:
    cache = _new_cache(alias)
    try:
        samples = time_interleaved(_latency_ops(cache), n, warmup, BLOCK)
        cache.clear()
    finally:
        _release(cache)
    return summarise_us(samples)


# -- workers for 2. and 3. ---------------------------------------------------------------


def _worker_main(body, index: int, args: tuple, ready_w: int, go_r: int, out_w: int, parent_only: list[int]) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C goes to the parent, which stops us by pid
    for fd in parent_only:  # so that the parent's death gives us EOF on go_r
        os.close(fd)

    def ready() -> None:
        """Tell the parent this worker is connected, then wait for the common start signal."""
        os.write(ready_w, b"r")
        os.close(ready_w)
        if os.read(go_r, 1) != b"g":
            raise RuntimeError("the parent went away before the start signal")
        os.close(go_r)

    result = body(index, ready, *args)
    line = (json.dumps(result) + "\n").encode()
    if len(line) > select.PIPE_BUF:  # one write of at most PIPE_BUF bytes is atomic
        raise RuntimeError(f"worker result too long ({len(line)} bytes)")
    os.write(out_w, line)
    os.close(out_w)


def run_workers(count: int, body, args: tuple, run_timeout: float) -> list[dict]:
    """Fork ``count`` workers running ``body(index, ready, *args)``; start them together; their results.

    Raises RuntimeError if a worker fails (its traceback is on stderr), does not
    report, or does not finish within ``run_timeout`` seconds of the start.
    """
    ready_r, ready_w = os.pipe()
    go_r, go_w = os.pipe()
    out_r, out_w = os.pipe()
    open_fds = {ready_r, ready_w, go_r, go_w, out_r, out_w}

    def close(fd: int) -> None:
        if fd in open_fds:
            open_fds.discard(fd)
            os.close(fd)

    pids: list[int] = []
    statuses: dict[int, int | None] = {}
    try:
        for index in range(count):
            pids.append(fork(_worker_main, body, index, args, ready_w, go_r, out_w, [ready_r, go_w, out_r]))
        close(ready_w)
        close(go_r)
        close(out_w)

        # Every worker connected?
        got = 0
        deadline = time.monotonic() + READY_TIMEOUT
        while got < count:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{count - got} of {count} workers not ready within {READY_TIMEOUT:.0f}s")
            readable, _, _ = select.select([ready_r], [], [], 0.05)
            if readable:
                data = os.read(ready_r, count)
                if not data:
                    break  # every worker closed its end: the ones that did not report have died
                got += len(data)
            else:
                for pid in pids:
                    if pid not in statuses:
                        done, status = os.waitpid(pid, os.WNOHANG)
                        if done:
                            statuses[pid] = status
                dead = [pid for pid in statuses]
                if dead:
                    status = describe_status(statuses[dead[0]])
                    raise RuntimeError(f"worker {dead[0]} ended before the start ({status})")
        if got < count:
            time.sleep(0.1)
            for pid in pids:
                if pid not in statuses:
                    done, status = os.waitpid(pid, os.WNOHANG)
                    if done:
                        statuses[pid] = status
            dead = ", ".join(f"worker {pid}: {describe_status(st)}" for pid, st in statuses.items())
            raise RuntimeError(f"only {got} of {count} workers became ready ({dead or 'none has exited'}; see stderr)")

        os.write(go_w, b"g" * count)
        close(go_w)

        buf = b""
        deadline = time.monotonic() + run_timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise RuntimeError(f"workers still running {run_timeout:.0f}s after the start")
            readable, _, _ = select.select([out_r], [], [], min(left, 0.5))
            if readable:
                chunk = os.read(out_r, 65536)
                if not chunk:
                    break  # EOF: every worker has closed its end (finished or died)
                buf += chunk
        for pid in pids:
            if pid not in statuses:
                statuses[pid] = reap(pid)
        bad = [(pid, statuses[pid]) for pid in pids if statuses[pid] is None or statuses[pid] != 0]
        if bad:
            pid, status = bad[0]
            raise RuntimeError(f"{len(bad)} of {count} workers failed; worker {pid}: {describe_status(status)}")
        results = [json.loads(line) for line in buf.decode().splitlines() if line.strip()]
        if len(results) != count:
            raise RuntimeError(f"{len(results)} results from {count} workers")
        return sorted(results, key=lambda r: r["index"])
    finally:
        for pid in pids:  # only on error paths are any left: stop them by pid
            if pid not in statuses:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                statuses[pid] = reap(pid)
        for fd in list(open_fds):
            close(fd)


# -- 2. throughput ---------------------------------------------------------------------


def _keys() -> list[str]:
    return [f"tp:{i}" for i in range(KEYSPACE)]


def _throughput_worker(index: int, ready, alias: str, seconds: float, seed: int) -> dict:
    cache = _child_cache(alias)
    rng = random.Random(seed * 1009 + index)
    keys = _keys()
    plan = [(rng.random() < SET_SHARE, rng.choice(keys)) for _ in range(PLAN)]
    cache.get(keys[0])  # connect before the start
    ready()
    get, set_, clock, value = cache.get, cache.set, time.perf_counter, VALUE
    ops = gets = hits = sets = errors = 0
    first_error = None
    i = 0
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
                if get(key) is not None:
                    hits += 1
                gets += 1
        except Exception as exc:
            errors += 1
            if first_error is None:
                first_error = repr(exc)[:300]
        ops += 1
        if not ops & 15 and clock() >= deadline:
            break
    elapsed = clock() - t0
    near = _near_cache(cache)
    near_hits = near_misses = None
    if near is not None:
        # The near cache's own counters: gets answered from the local copy, gets that went to the Manager.
        near_hits, near_misses = near.hits, near.misses
    return {"index": index, "ok": gets + sets, "gets": gets, "hits": hits, "sets": sets, "errors": errors,
            "first_error": first_error, "seconds": elapsed, "near_hits": near_hits,
            "near_misses": near_misses}  # fmt: skip


def _near_share(workers: list[dict]) -> float | None:
    """The share of the near cache's gets answered from the process's local copy, over every worker."""
    if any(w.get("near_hits") is None for w in workers):
        return None
    hits = sum(w["near_hits"] for w in workers)
    total = hits + sum(w["near_misses"] for w in workers)
    return hits / total if total else None


def run_throughput(alias: str, seconds: float, seed: int) -> dict:
    cache = _new_cache(alias)
    try:
        cache.clear()
        keys = _keys()
        for start in range(0, KEYSPACE, 100):
            cache.set_many({k: VALUE for k in keys[start : start + 100]})
        if len(cache.get_many(keys[:100])) != 100:
            raise AssertionError("the key space was not filled")
    finally:
        _release(cache)
    out = {}
    for procs in PROCS:
        log(f"  throughput {alias}: {procs} process(es), {seconds:g}s")
        workers = run_workers(procs, _throughput_worker, (alias, seconds, seed), run_timeout=seconds + 120)
        ok = sum(w["ok"] for w in workers)
        gets = sum(w["gets"] for w in workers)
        out[str(procs)] = {
            "ops_per_s": sum(w["ok"] / w["seconds"] for w in workers),
            "ops": ok,
            "errors": sum(w["errors"] for w in workers),
            "first_error": next((w["first_error"] for w in workers if w["first_error"]), None),
            "get_hit_rate": sum(w["hits"] for w in workers) / gets if gets else None,
            "near_local_share": _near_share(workers),
            "workers": workers,
        }
    cache = _new_cache(alias)
    try:
        cache.clear()
    finally:
        _release(cache)
    return out


# -- 3. incr counter ---------------------------------------------------------------------


def _incr_worker(index: int, ready, alias: str, calls: int) -> dict:
    cache = _child_cache(alias)
    cache.get("counter")  # connect before the start
    ready()
    incr, clock = cache.incr, time.perf_counter
    errors = 0
    first_error = None
    last = None
    t0 = clock()
    for _ in range(calls):
        try:
            last = incr("counter")
        except Exception as exc:
            errors += 1
            if first_error is None:
                first_error = repr(exc)[:300]
    return {"index": index, "calls": calls, "errors": errors, "first_error": first_error, "last": last,
            "seconds": clock() - t0}  # fmt: skip


def run_incr(alias: str) -> dict:
    cache = _new_cache(alias)
    try:
        cache.delete("counter")
        cache.set("counter", 0)
    finally:
        _release(cache)
    workers = run_workers(INCR_PROCS, _incr_worker, (alias, INCR_CALLS), run_timeout=600)
    cache = _new_cache(alias)
    try:
        final = cache.get("counter")
        cache.delete("counter")
    finally:
        _release(cache)
    expected = INCR_PROCS * INCR_CALLS
    errors = sum(w["errors"] for w in workers)
    succeeded = expected - errors
    return {
        "shared": alias not in NOT_SHARED,
        "final": final,
        "expected": expected,
        "failed_calls": errors,
        # calls that returned without an error but whose increment is not in the final value
        "lost_updates": (succeeded - final) if alias not in NOT_SHARED and isinstance(final, int) else None,
        "first_error": next((w["first_error"] for w in workers if w["first_error"]), None),
        "seconds": max(w["seconds"] for w in workers),
        "per_process_last": [w["last"] for w in workers],
    }


# -- report ---------------------------------------------------------------------------


def _label(name: str) -> str:
    return BACKENDS[name] + (" (not shared)" if name in NOT_SHARED else "")


def _error_cell(err: str) -> str:
    return "error: " + err.replace("|", "\\|").replace("\n", " ")[:200]


def latency_table(selected: list[str], results: dict, args) -> str:
    redis = results.get("redis", {}).get("latency")
    head = "| backend | N | " + " | ".join(OPS) + " | get hit median x RedisCache |"
    lines = [
        f"### 1. Latency, one process (median / p99, µs; N = {args.n}"
        + (f", FileBased and DB: {min(args.n, args.n_slow)}" if SLOW & set(selected) else "")
        + ")",
        "",
        head,
        "|---|---:|" + "---:|" * len(OPS) + "---:|",
    ]
    for name in selected:
        r = results[name]
        lat = r.get("latency")
        if lat is None:
            err = r.get("latency_error") or r.get("error") or "not run"
            lines.append(f"| {_label(name)} | | {_error_cell(err)} |")
            continue
        cells = [f"{fmt_us(lat[op]['median_us'])} / {fmt_us(lat[op]['p99_us'])}" for op in OPS]
        ratio = f"{lat['get hit']['median_us'] / redis['get hit']['median_us']:.2f}x" if redis else "n/a"
        lines.append(f"| {_label(name)} | {lat['get hit']['n']} | " + " | ".join(cells) + f" | {ratio} |")
    return "\n".join(lines)


def throughput_table(selected: list[str], results: dict, args) -> str:
    redis = results.get("redis", {}).get("throughput")
    redis4 = redis[str(PROCS[-1])]["ops_per_s"] if redis else None
    lines = [
        f"### 2. Aggregate throughput, ops/s (90% get / 10% set, {KEYSPACE} keys, {args.seconds:g} s per run, "
        f"forked workers, {os.cpu_count()} CPUs)",
        "",
        "| backend | " + " | ".join(f"{p} process{'es' if p > 1 else ''}" for p in PROCS)
        + f" | {PROCS[-1]} processes x RedisCache | get hit rate ({PROCS[-1]} procs) | errors |",
        "|---|" + "---:|" * len(PROCS) + "---:|---:|---:|",
    ]  # fmt: skip
    for name in selected:
        r = results[name]
        tp = r.get("throughput")
        if tp is None:
            err = r.get("throughput_error") or r.get("error") or "not run"
            lines.append(f"| {_label(name)} | {_error_cell(err)} |")
            continue
        cells = [f"{tp[str(p)]['ops_per_s']:,.0f}" for p in PROCS]
        last = tp[str(PROCS[-1])]
        ratio = f"{last['ops_per_s'] / redis4:.2f}x" if redis4 else "n/a"
        hit = f"{last['get_hit_rate'] * 100:.1f}%" if last["get_hit_rate"] is not None else "n/a"
        errors = sum(tp[str(p)]["errors"] for p in PROCS)
        lines.append(f"| {_label(name)} | " + " | ".join(cells) + f" | {ratio} | {hit} | {errors} |")
    near = results.get("near", {}).get("throughput")
    if near and all(near[str(p)].get("near_local_share") is not None for p in PROCS):
        shares = " / ".join(f"{near[str(p)]['near_local_share'] * 100:.1f}%" for p in PROCS)
        procs = "/".join(map(str, PROCS))
        lines += ["", f"ClusterShmCache+near: share of gets answered from the process's near cache with {procs} "
                  f"processes: {shares} (the rest went to the Manager: first reads, and reads of a key "
                  "invalidated or evicted since)."]  # fmt: skip
    return "\n".join(lines)


def incr_table(selected: list[str], results: dict) -> str:
    expected = INCR_PROCS * INCR_CALLS
    lines = [
        f"### 3. Shared counter: {INCR_PROCS} processes x {INCR_CALLS} incr (expected {expected})",
        "",
        "| backend | final value | lost updates | failed calls | seconds |",
        "|---|---:|---:|---:|---:|",
    ]
    for name in selected:
        r = results[name]
        c = r.get("incr")
        if c is None:
            err = r.get("incr_error") or r.get("error") or "not run"
            lines.append(f"| {_label(name)} | {_error_cell(err)} | | | |")
            continue
        if not c["shared"]:
            per = sorted(set(v for v in c["per_process_last"] if v is not None))
            final = f"n/a (not shared; parent sees {c['final']}, each process counted to {'/'.join(map(str, per))})"
            lost = "n/a"
        else:
            final = str(c["final"])
            lost = str(c["lost_updates"]) if c["lost_updates"] is not None else "n/a"
        failed = str(c["failed_calls"])
        if c["failed_calls"] and c["first_error"]:
            failed += f" ({c['first_error'][:80]})"
        lines.append(f"| {_label(name)} | {final} | {lost} | {failed} | {c['seconds']:.2f} |")
    return "\n".join(lines)


def targets(results: dict) -> tuple[str, dict]:
    lines = ["### Targets (ClusterShmCache against RedisCache, ClusterShmCache+near against diskcache, same run)", ""]
    out: dict = {}
    shm, redis = results.get("clustershm", {}), results.get("redis", {})
    missing = "ClusterShmCache or RedisCache not measured"

    if shm.get("latency") and redis.get("latency"):
        a, b = shm["latency"]["get hit"]["median_us"], redis["latency"]["get hit"]["median_us"]
        ratio = a / b
        ok = ratio <= 0.35
        out["get_hit_median_ratio"] = {"clustershm_us": a, "redis_us": b, "ratio": ratio, "max": 0.35, "met": ok}
        lines.append(
            f"- get-hit median <= 0.35x RedisCache's: {fmt_us(a)} µs vs {fmt_us(b)} µs = {ratio:.2f}x -> "
            f"**{'PASS' if ok else 'FAIL'}**"
        )
    else:
        lines.append(f"- get-hit median <= 0.35x RedisCache's: not evaluated ({missing})")

    p = str(PROCS[-1])
    if shm.get("throughput") and redis.get("throughput"):
        a, b = shm["throughput"][p]["ops_per_s"], redis["throughput"][p]["ops_per_s"]
        ratio = a / b
        ok = ratio >= 2.0
        out["throughput_ratio"] = {"clustershm_ops_s": a, "redis_ops_s": b, "ratio": ratio, "min": 2.0, "met": ok}
        lines.append(
            f"- {p}-process ops/s >= 2x RedisCache's: {a:,.0f} vs {b:,.0f} ops/s = {ratio:.2f}x -> "
            f"**{'PASS' if ok else 'FAIL'}**"
        )
    else:
        lines.append(f"- {p}-process ops/s >= 2x RedisCache's: not evaluated ({missing})")

    near, disk = results.get("near", {}), results.get("diskcache", {})
    missing = "ClusterShmCache+near or diskcache.DjangoCache not measured"
    if near.get("latency") and disk.get("latency"):
        a, b = near["latency"]["get hit"]["median_us"], disk["latency"]["get hit"]["median_us"]
        ok = a <= b
        out["near_get_hit_median_vs_diskcache"] = {"near_us": a, "diskcache_us": b, "ratio": a / b, "max": 1.0,
                                                   "met": ok}  # fmt: skip
        lines.append(
            f"- near-cache get-hit median <= diskcache's: {fmt_us(a)} µs vs {fmt_us(b)} µs = {a / b:.2f}x -> "
            f"**{'PASS' if ok else 'FAIL'}**"
        )
    else:
        lines.append(f"- near-cache get-hit median <= diskcache's: not evaluated ({missing})")
    if near.get("throughput") and disk.get("throughput"):
        a, b = near["throughput"][p]["ops_per_s"], disk["throughput"][p]["ops_per_s"]
        ok = a >= b
        out["near_throughput_vs_diskcache"] = {"near_ops_s": a, "diskcache_ops_s": b, "ratio": a / b, "min": 1.0,
                                               "met": ok}  # fmt: skip
        lines.append(
            f"- near-cache {p}-process ops/s >= diskcache's: {a:,.0f} vs {b:,.0f} ops/s = {a / b:.2f}x -> "
            f"**{'PASS' if ok else 'FAIL'}**"
        )
    else:
        lines.append(f"- near-cache {p}-process ops/s >= diskcache's: not evaluated ({missing})")
    return "\n".join(lines), out


# -- main ---------------------------------------------------------------------------


def _parse_only(value: str | None, parser) -> list[str]:
    if not value:
        return list(BACKENDS)
    names = [n.strip().lower() for n in value.split(",") if n.strip()]
    unknown = [n for n in names if n not in BACKENDS]
    if unknown or not names:
        bad = ", ".join(unknown) or "(none given)"
        parser.error(f"--only: unknown backend(s) {bad}; choose from {', '.join(BACKENDS)}")
    return [n for n in BACKENDS if n in names]  # table order, no duplicates


def _preflight(selected: list[str]) -> dict[str, str]:
    """The server binaries the selection needs; raise SetupError for anything missing."""
    problems = []
    binaries = {}
    for name, binary, package in (("redis", "redis-server", "redis-server"), ("memcached", "memcached", "memcached")):
        if name in selected:
            path = shutil.which(binary)
            if path is None:
                problems.append(
                    f"'{binary}' is not on the PATH; the {name} backend needs it. Install it "
                    f"(apt-get install {package}) or leave {name} out with --only."
                )
            binaries[name] = path
    for name, module in (("redis", "redis"), ("memcached", "pymemcache"), ("diskcache", "diskcache")):
        if name in selected:
            try:
                __import__(module)
            except ImportError:
                problems.append(
                    f"the Python package '{module}' is missing (needed for {name}): pip install -e '.[bench]'"
                )
    try:
        import django  # noqa: F401
    except ImportError:
        problems.append("Django is not installed")
    if problems:
        raise SetupError("\n".join(problems))
    return binaries


def _client_versions() -> str:
    """Versions of the client libraries (the Python side dominates the latency of a local server)."""
    return ", ".join(package_versions(("redis", "hiredis", "pymemcache", "diskcache")))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=5000, help="timed calls per operation, latency phase (default 5000)")
    parser.add_argument("--n-slow", type=int, default=1000, help="the same for FileBased and DB, <= --n (default 1000)")
    parser.add_argument("--warmup", type=int, default=200, help="untimed calls per operation first (default 200)")
    parser.add_argument("--seconds", type=float, default=3.0, help="duration of each throughput run (default 3)")
    parser.add_argument("--only", metavar="NAME[,NAME]", help=f"run a subset of: {','.join(BACKENDS)}")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON to PATH")
    parser.add_argument("--seed", type=int, default=1, help="seed of the workers' key sequences (default 1)")
    args = parser.parse_args(argv)
    if args.n < 1 or args.n_slow < 1 or args.warmup < 0 or args.seconds <= 0:
        parser.error("--n and --n-slow must be >= 1, --warmup >= 0, --seconds > 0")
    selected = _parse_only(args.only, parser)

    try:
        binaries = _preflight(selected)
    except SetupError as exc:
        print(f"bench_cache: cannot run:\n{exc}", file=sys.stderr)
        return 2

    # SIGTERM ends the run through the finally clauses below, like Ctrl-C.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))

    results: dict[str, dict] = {name: {"label": BACKENDS[name]} for name in selected}
    lab = Lab()
    started = time.perf_counter()
    try:
        try:
            if CLUSTERSHM & set(selected):
                try:
                    lab.start_manager()
                except Exception as exc:
                    for name in CLUSTERSHM & set(selected):
                        results[name]["error"] = f"Manager: {exc}"
                    log(f"ClusterShm: {exc}")
            if "redis" in selected:
                lab.start_redis(binaries["redis"])
            if "memcached" in selected:
                lab.start_memcached(binaries["memcached"])
        except BenchError as exc:  # SetupError included
            print(f"bench_cache: cannot run:\n{exc}", file=sys.stderr)
            return 2

        configure_django(selected, lab)
        if lab.manager_address is not None:
            import django_clustershm

            # Once, before any fork: every worker inherits the address and the secret.
            django_clustershm.configure(lab.manager_address, lab.manager_secret)

        active = []
        for name in selected:
            if "error" in results[name]:
                continue
            try:
                smoke_test(name)
                active.append(name)
            except Exception as exc:
                results[name]["error"] = f"{type(exc).__name__}: {exc}"
                log(f"{BACKENDS[name]}: smoke test failed:\n{traceback.format_exc()}")

        for name in active:
            n = min(args.n, args.n_slow) if name in SLOW else args.n
            log(f"latency {name}: N={n}")
            try:
                results[name]["latency"] = run_latency(name, n, min(args.warmup, n))
            except Exception as exc:
                results[name]["latency_error"] = f"{type(exc).__name__}: {exc}"
                log(f"{BACKENDS[name]}: latency failed:\n{traceback.format_exc()}")
        for name in active:
            try:
                results[name]["throughput"] = run_throughput(name, args.seconds, args.seed)
            except Exception as exc:
                results[name]["throughput_error"] = f"{type(exc).__name__}: {exc}"
                log(f"{BACKENDS[name]}: throughput failed:\n{traceback.format_exc()}")
        for name in active:
            log(f"incr {name}: {INCR_PROCS} x {INCR_CALLS}")
            try:
                results[name]["incr"] = run_incr(name)
            except Exception as exc:
                results[name]["incr_error"] = f"{type(exc).__name__}: {exc}"
                log(f"{BACKENDS[name]}: incr failed:\n{traceback.format_exc()}")
    finally:
        if lab.manager_address is not None:
            try:
                import django_clustershm

                django_clustershm.configure(None)  # close this process's connection before the Manager goes
            except Exception:
                pass
        try:
            from django.db import connections

            connections.close_all()
        except Exception:
            pass
        versions = dict(lab.versions)
        for warning in lab.close():
            log(f"warning: {warning}")
    elapsed = time.perf_counter() - started

    import django

    print("## Django cache backends: latency, throughput, shared incr")
    print()
    print(
        f"Python {platform.python_version()}, Django {django.get_version()}, {platform.system()} "
        f"{platform.release()}, {os.cpu_count()} CPUs; "
        + "".join(f"{name} {v}; " for name, v in versions.items())
        + f"clients: {_client_versions()}"
        + f"; value {VALUE_TEXT}; run took {elapsed:.0f}s."
    )
    print()
    failures = [
        f"- {BACKENDS[name]}: {results[name][key]}"
        for name in selected
        for key in ("error", "latency_error", "throughput_error", "incr_error")
        if key in results[name]
    ]
    if failures:
        print("**Errors:**")
        print()
        print("\n".join(failures))
        print()
    print(latency_table(selected, results, args))
    print()
    print(throughput_table(selected, results, args))
    print()
    print(incr_table(selected, results))
    print()
    text, target_results = targets(results)
    print(text)

    if args.json:
        report = {
            "benchmark": "bench_cache",
            "python": platform.python_version(),
            "django": django.get_version(),
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "servers": versions,
            "clients": _client_versions(),
            "n": args.n,
            "n_slow": min(args.n, args.n_slow),
            "warmup": args.warmup,
            "seconds_per_run": args.seconds,
            "procs": list(PROCS),
            "keyspace": KEYSPACE,
            "set_share": SET_SHARE,
            "incr": {"procs": INCR_PROCS, "calls_each": INCR_CALLS},
            "value": VALUE_TEXT,
            "elapsed_s": elapsed,
            "backends": results,
            "targets": target_results,
        }
        write_json(args.json, report)
    return 1 if failures else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:  # the finally clauses have stopped every child and server by now
        print("bench_cache: interrupted", file=sys.stderr)
        sys.exit(130)
