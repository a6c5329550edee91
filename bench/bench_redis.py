"""The Redis engine (#15): django-clustershm on Redis against Django's RedisCache, django-redis and redis-py's Lock.

One redis-server (tests/redis_servers.py's RedisServer: 127.0.0.1 TCP, no persistence), started and stopped by this
script by its pid, the same server for every contender; every client reaches it over TCP. Our contender is the whole
API on ``CLUSTERSHM = {"ENGINE": "redis://127.0.0.1:PORT/0", "ENGINE_OPTIONS": {"KEY_PREFIX": "bench",
"LOCK_LEASE": 1.0}}`` (values signed with HMAC-SHA256, the default). Four phases per round; every figure is given per
round and as the median and spread ((max - min) / median) over the rounds:

1. Latency, one process: the median µs of ``get`` (a hit) and ``set`` of a small dict (~110 B pickled) through
   Django's cache API: ``ClusterShmCache`` (ENGINE = the Redis URL), Django's ``RedisCache``, django-redis's
   ``RedisCache``; interleaved in blocks, the GC paused. redis-py's bare GET / SET of the same pickled bytes is
   shown as the floor (not a contender).
2. Throughput: 4 processes forked after the setup, a 90/10 get/set mix on 1,000 keys, aggregate ops/s. Each worker
   closes the caches it inherited and makes a new backend object (``caches.create_connection``); Django's and
   django-redis's new objects open their own pools, while ours looks up the process-wide client, which is fork-safe
   (the registry's after-fork hook, and the transport's redis-py client is made again in a process with a new pid).
3. Locked read-modify-write: 4 processes x ``--rmw`` increments of one counter (a plain Redis key, read and written
   with redis-py, the same for every lock) under ``django_clustershm.Lock`` (no lease: the watchdog renews it; FIFO;
   also with ``lease=10``, no watchdog, to show what the watchdog costs) against redis-py's ``redis.lock.Lock``
   (``timeout=10``; default ``sleep=0.1`` and ``sleep=0.001``). RMW/s = all increments / the slowest process's time
   from the common start; the counter must end exact. How the lock moves: the share of grants that went to the
   process that held it just before, and the median µs from one grant to the next (CLOCK_MONOTONIC, one clock for
   the host), to the same process or to another.

   FIFO inversions by tickets (3b): right before each acquire, a process takes a ticket from ``INCR`` on a key of
   its own (the arrival order; with the server's ``TIME`` in the same MULTI); inside the lock it appends the ticket
   to a list (with the SET of the counter, in one pipeline), so the list g is the grant order. An *inversion* is a
   pair i < j with g[i] > g[j]: a later arrival granted before an earlier one (every ticket taken is granted, so
   the earlier one was waiting then). Reported: their count; normalized per grant (the mean number of earlier
   arrivals a grant overtook: 0 for FIFO, at most 3 with 4 processes; the textbook normalization by all n(n-1)/2
   pairs would call even a lock that always lets one process barge "nearly sorted"); the share of grants that
   overtook anyone; the largest overtake; the widest inverted pair (ms between the two tickets). Caveat: a ticket
   is taken one round trip before that process's acquire request reaches the server, so two arrivals within that
   window (or one whose process is descheduled between the two) may swap under a perfectly FIFO lock; the last
   column counts only the inversions between tickets taken more than ``RACE_MS`` apart.

   FIFO inversions by the server's arrival order (3c), the exact check: a shorter run (``--monitor-rmw``) under
   MONITOR, which lists every command in the order the server runs it. A lock request's arrival is the first
   acquire command carrying its token (ours: the LOCK_ACQUIRE script, 5 keys; redis-py: ``SET key token NX``), the
   grant order is the order of the releases (one holder at a time); inversions as above, between the two orders.
4. Hand-off after the holder's SIGKILL: a holder process takes the lock (ours: ``lease=None``, the watchdog lease =
   LOCK_LEASE = 1 s, renewed every third; redis-py: ``timeout=1.0``, not renewed), a waiter process waits for it,
   the holder is SIGKILLed at a random moment 0.2-0.5 s after its acquire; the time from the kill until the waiter
   holds the lock; ``--handoffs`` repetitions per round per lock, median and max over all of them.

Targets: ours get and set medians <= 1.0x Django's RedisCache; 4-process ops/s >= 1.0x RedisCache; locked RMW/s
(lease=None) >= 1.0x redis-py's Lock (both sleeps), counter exact, 0 inversions (by tickets; by the server's arrival
order); hand-off <= one lease (1 s), median and max. Ratios are taken within a round (the same machine state), then
their median over the rounds.
"""

from __future__ import annotations

import importlib.util
import itertools
import os
import pickle
import random
import re
import signal
import statistics
import sys
import time

import lab
from lab import clustershm

VALUE = {"id": 42, "name": "alice", "email": "alice@example.org", "active": True, "score": 3.5, "tags": ["a", "b"]}
PREFIX = "bench"
LEASE = 1.0  # seconds: ENGINE_OPTIONS LOCK_LEASE, and redis-py's timeout in phase 4
BLOCK = 100  # timed calls per operation per turn of the interleaving (phase 1): short turns share the noise
KEYSPACE = 1000
SET_SHARE = 0.10
PLAN = 4096  # a worker's precomputed (op, key) sequence; a power of two
PROCS = 4
RACE_MS = 2.0  # phase 3: tickets closer than this may swap between the INCR and the acquire
STUCK = 10.0  # phase 4: seconds after the kill before a waiter is given up on

CACHES = {"ours": "ClusterShmCache (redis engine)", "redis": "Django RedisCache", "djredis": "django-redis RedisCache"}
FLOOR = "redis-py GET/SET (floor)"
LOCKS = {"ours": "django_clustershm.Lock (FIFO)", "ours-lease": "django_clustershm.Lock(lease=10) (FIFO, no watchdog)",
         "redis": "redis-py Lock (sleep=0.1)", "redis-fast": "redis-py Lock (sleep=0.001)"}  # fmt: skip
HANDOFF_LOCKS = ("ours", "redis", "redis-fast")  # ours-lease: its 10 s lease would say nothing new
SLEEPS = {"redis": 0.1, "redis-fast": 0.001}


def redis_servers():
    """tests/redis_servers.py of this checkout (by path: compare.py may put an older tree first on PYTHONPATH)."""
    path = os.path.join(lab.ROOT, "tests", "redis_servers.py")
    spec = importlib.util.spec_from_file_location("clustershm_bench_redis_servers", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def start_server(bench: lab.Lab) -> str:
    """A redis-server on 127.0.0.1 (RedisServer), stopped by pid when the lab closes; its redis:// URL."""
    servers = redis_servers()
    binary = servers.find_binary("redis-server")
    if binary is None:
        raise lab.BenchError("'redis-server' is not on the PATH (apt-get install -y redis-server)")
    server = servers.RedisServer(binary)

    def stop() -> list[str]:
        server.stop()
        left = [pid for pid in server.pids if not servers.gone(pid)]
        return [f"redis-server left running: {left}"] if left else []

    bench.cleanups.append(stop)
    bench.versions["redis-server"] = lab.version_of([binary, "--version"], r"v=(\S+)")
    return server.url


def configure_django(url: str) -> None:
    import django
    from django.conf import settings

    caches = {
        "default": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache"},
        # MAX_ENTRIES: ours culls as Django's DatabaseCache does (default 300 keys); the two others ignore it.
        "ours": {"BACKEND": "django_clustershm.cache.ClusterShmCache", "LOCATION": "bench",
                 "OPTIONS": {"MAX_ENTRIES": 100_000}},
        "redis": {"BACKEND": "django.core.cache.backends.redis.RedisCache", "LOCATION": url, "KEY_PREFIX": "dj"},
        "djredis": {"BACKEND": "django_redis.cache.RedisCache", "LOCATION": url, "KEY_PREFIX": "djr"},
    }  # fmt: skip
    settings.configure(DEBUG=False, SECRET_KEY="bench-redis-not-a-secret", INSTALLED_APPS=[], USE_TZ=True,
                       CACHES=caches,
                       CLUSTERSHM={"ENGINE": url, "ENGINE_OPTIONS": {"KEY_PREFIX": PREFIX, "LOCK_LEASE": LEASE}})  # fmt: skip
    django.setup()
    mode = clustershm.get_client().capabilities()["engine"]
    if not mode.startswith("redis"):
        raise lab.BenchError(f"the module API is not on the Redis engine: {mode}")


def new_cache(alias: str):
    """A fresh backend object of ``alias`` (in a forked worker: after closing what it inherited)."""
    from django.core.cache import caches

    caches.close_all()
    return caches.create_connection(alias)


def raw(url: str):
    import redis

    return redis.Redis.from_url(url)


# -- phase 1: latency -------------------------------------------------------------------------


def phase_latency(url: str, args) -> dict:
    ops = {}
    for alias in CACHES:
        cache = new_cache(alias)
        cache.clear()
        cache.set("lat:hit", VALUE, None)
        if cache.get("lat:hit") != VALUE or cache.get("lat:missing") is not None:
            raise AssertionError(f"{alias}: get does not return what was set")
        ops[f"{alias} get"] = lambda c=cache: c.get("lat:hit")
        ops[f"{alias} set"] = lambda c=cache: c.set("lat:set", VALUE, None)
    r, data = raw(url), pickle.dumps(VALUE, pickle.HIGHEST_PROTOCOL)
    r.set("floor:hit", data)
    ops["floor get"] = lambda: r.get("floor:hit")
    ops["floor set"] = lambda: r.set("floor:set", data)
    results = lab.time_interleaved(ops, args.n, args.warmup, BLOCK)
    r.close()
    return results


# -- phase 2: 4-process throughput --------------------------------------------------------------


def _throughput_worker(index: int, ready, alias: str, seconds: float, seed: int) -> dict:
    cache = new_cache(alias)
    rng = random.Random(seed * 1009 + index)
    keys = [f"tp:{i}" for i in range(KEYSPACE)]
    plan = [(rng.random() < SET_SHARE, rng.choice(keys)) for _ in range(PLAN)]
    cache.get(keys[0])  # connected before the start
    ready()
    get, set_, clock, value = cache.get, cache.set, time.perf_counter, VALUE
    gets = hits = sets = i = 0
    t0 = clock()
    deadline = t0 + seconds
    while True:
        is_set, key = plan[i]
        i = (i + 1) & (PLAN - 1)
        if is_set:
            set_(key, value, None)
            sets += 1
        else:
            hits += get(key) is not None
            gets += 1
        if not (gets + sets) & 15 and clock() >= deadline:
            break
    return {"ops": gets + sets, "gets": gets, "hits": hits, "seconds": clock() - t0}


def phase_throughput(alias: str, args, seed: int) -> dict:
    cache = new_cache(alias)
    cache.clear()
    keys = [f"tp:{i}" for i in range(KEYSPACE)]
    for start in range(0, KEYSPACE, 100):
        cache.set_many(dict.fromkeys(keys[start : start + 100], VALUE), None)
    if len(cache.get_many(keys[:100])) != 100:
        raise AssertionError(f"{alias}: the key space was not filled")
    new_cache("default")  # closes what the workers would inherit
    workers = lab.run_workers(PROCS, _throughput_worker, (alias, args.seconds, seed), args.seconds + 60.0)
    gets = sum(w["gets"] for w in workers)
    return {"ops_per_s": sum(w["ops"] / w["seconds"] for w in workers), "ops": sum(w["ops"] for w in workers),
            "hit_rate": sum(w["hits"] for w in workers) / gets if gets else None}  # fmt: skip


# -- phase 3: locked read-modify-write, FIFO inversions -----------------------------------------


def _rmw_worker(index: int, ready, kind: str, url: str, n: int, keys: dict) -> dict:
    r = raw(url)
    if kind in ("ours", "ours-lease"):
        # lease=None: the watchdog's lease, renewed while this process lives; FIFO
        lock = clustershm.Lock(keys["lock"], lease=10.0 if kind == "ours-lease" else None)
        acquire, release = lock.acquire, lock.release
        clustershm.get_client().ping()  # this process's connection, before the start
    else:
        lk = r.lock(keys["lock"], timeout=10.0, sleep=SLEEPS[kind], blocking_timeout=120.0)
        acquire, release = lk.acquire, lk.release
    r.ping()
    ready()
    counter, grants = keys["counter"], keys["grants"]
    get, clock, mono = r.get, time.perf_counter, time.monotonic
    take = r.pipeline(transaction=True)  # INCR and TIME in one MULTI: the ticket and when it was taken
    put = r.pipeline(transaction=False)
    longest = 0.0
    t0 = clock()
    for _ in range(n):
        take.incr(keys["tickets"])
        take.time()
        ticket, (sec, usec) = take.execute()
        t1 = clock()
        if not acquire():
            raise AssertionError("acquire failed")
        granted = mono()  # CLOCK_MONOTONIC: one clock for every process of the host
        longest = max(longest, clock() - t1)
        value = int(get(counter))
        put.set(counter, value + 1)
        put.rpush(grants, f"{ticket}:{sec * 1000 + usec / 1000:.3f}:{index}:{granted:.6f}")
        put.execute()
        release()
    elapsed = clock() - t0
    r.close()
    return {"seconds": elapsed, "longest_wait_ms": longest * 1e3}


def inversions(ranks: list[int]) -> int:
    """Pairs i < j with ranks[i] > ranks[j] (merge sort, O(n log n))."""

    def sort(seq: list[int]) -> tuple[list[int], int]:
        if len(seq) <= 1:
            return seq, 0
        mid = len(seq) // 2
        left, a = sort(seq[:mid])
        right, b = sort(seq[mid:])
        merged, count, i, j = [], a + b, 0, 0
        while i < len(left) and j < len(right):
            if left[i] <= right[j]:
                merged.append(left[i])
                i += 1
            else:
                merged.append(right[j])
                count += len(left) - i
                j += 1
        return merged + left[i:] + right[j:], count

    return sort(ranks)[1]


def fifo_figures(grants: list[tuple[int, float, int, float]]) -> dict:
    """FIFO order of the grants (ticket, ticket's server ms, process, granted at), see the docstring: the
    inversions, per grant, the share of grants that overtook an earlier ticket, the largest overtake (earlier
    tickets one grant passed), the widest inverted pair (ms between the two tickets), the inversions between tickets
    taken more than RACE_MS apart; and how the lock moves: the share of grants that went to the process that held
    it just before, and the median time from one grant to the next, to the same process or to another."""
    tickets = [g[0] for g in grants]
    taken = {g[0]: g[1] for g in grants}
    position = {t: i for i, t in enumerate(tickets)}
    overtakers = overtake = beyond = 0
    widest = 0.0
    for i, t in enumerate(tickets):
        passed = [u for u in range(1, t) if position.get(u, -1) > i]  # earlier tickets granted after t
        if passed:
            overtakers += 1
            overtake = max(overtake, len(passed))
            gaps = [taken[t] - taken[u] for u in passed]
            widest = max(widest, *gaps)
            beyond += sum(1 for gap in gaps if gap > RACE_MS)
    same, other = [], []
    for a, b in itertools.pairwise(grants):
        (same if a[2] == b[2] else other).append((b[3] - a[3]) * 1e6)
    n = len(tickets)
    count = inversions(tickets)
    return {"grants": n, "inversions": count, "per_grant": count / n if n else 0.0,
            "overtaking_share": overtakers / n if n else 0.0, "max_overtake": overtake, "widest_gap_ms": widest,
            "inversions_beyond_race": beyond, "same_process_share": len(same) / max(1, n - 1),
            "gap_same_us": statistics.median(same) if same else None,
            "gap_other_us": statistics.median(other) if other else None}  # fmt: skip


def rmw_run(kind: str, url: str, n: int, r, tag: str = "") -> tuple[dict, list]:
    """One run of 4 workers x ``n`` locked increments: the figures, and the grants (ticket, ms, process, at)."""
    keys = {name: f"rmw{tag}:{name}:{kind}" for name in ("lock", "counter", "tickets", "grants")}
    r.delete(keys["counter"], keys["tickets"], keys["grants"])
    r.set(keys["counter"], 0)
    workers = lab.run_workers(PROCS, _rmw_worker, (kind, url, n, keys), 300.0)
    total = PROCS * n
    final = int(r.get(keys["counter"]))
    grants = []
    for item in r.lrange(keys["grants"], 0, -1):
        ticket, taken, index, at = item.decode().split(":")
        grants.append((int(ticket), float(taken), int(index), float(at)))
    r.delete(keys["counter"], keys["tickets"], keys["grants"])
    longest = max(w["seconds"] for w in workers)
    return {"rmw_per_s": total / longest, "increments": total, "final_counter": final, "exact": final == total,
            "seconds": longest, "per_process_s": [w["seconds"] for w in workers],
            "longest_wait_ms": max(w["longest_wait_ms"] for w in workers)}, grants  # fmt: skip


def phase_rmw(kind: str, url: str, args, r) -> dict:
    figures, grants = rmw_run(kind, url, args.rmw, r)
    return {**figures, **fifo_figures(grants)}


# MONITOR: every command the server runs, in the order it runs them, one line each:
#   1700000000.123456 [0 127.0.0.1:51234] "EVALSHA" "3f2a..." "5" "{bench:lock:K}:h" ... "<token>" ...
# (commands a Lua script runs come as [0 lua] lines, which we skip.)
MONITOR_END = "bench-redis-monitor-end"
_ARG = re.compile(rb'"((?:[^"\\]|\\.)*)"')


def _monitor(url: str, path: str, out_w: int) -> None:
    """Write what MONITOR streams to ``path`` until the server runs ``ECHO MONITOR_END``."""
    import redis

    r = redis.Redis.from_url(url)
    conn = r.connection_pool.get_connection()
    conn.send_command("MONITOR")
    if conn.read_response() not in (b"OK", "OK"):
        raise lab.BenchError("MONITOR refused")
    lab.send(out_w, "monitoring")
    marker = MONITOR_END.encode()
    with open(path, "wb") as fh:
        while True:
            line = conn.read_response()
            fh.write(line + b"\n")
            if marker in line and b" lua]" not in line:
                return


def arrival_order(path: str, kind: str, lock_key: str) -> tuple[list[bytes], list[bytes]]:
    """(tokens in the order their first acquire request reached the server, tokens in the order they released).
    Ours: top-level EVALSHA on the lock's keys with 5 arguments (acquire) or 3 (release; cancel); redis-py: SET key token
    NX (acquire), EVALSHA sha 1 key token (its release script)."""
    arrivals: dict[bytes, None] = {}
    releases: dict[bytes, None] = {}
    ours_h = ("{" + PREFIX + ":lock:" + lock_key + "}:h").encode()
    with open(path, "rb") as fh:
        for line in fh:
            if b" lua]" in line:
                continue
            args = _ARG.findall(line)
            if len(args) < 4:
                continue
            name = args[0].upper()
            if kind.startswith("ours"):
                if name == b"EVALSHA" and args[3] == ours_h:
                    nkeys = int(args[2])
                    token = args[3 + nkeys]
                    # acquire's argv: token lease wait heartbeat base (5); release's and cancel's: token base heartbeat (3)
                    (arrivals if len(args) - 3 - nkeys == 5 else releases).setdefault(token, None)
            elif name == b"SET" and args[1] == lock_key.encode() and b"NX" in (a.upper() for a in args[3:]):
                arrivals.setdefault(args[2], None)
            elif name == b"EVALSHA" and args[2] == b"1" and args[3] == lock_key.encode():
                releases.setdefault(args[4], None)
    return list(arrivals), list(releases)


def phase_monitor(kind: str, url: str, args, r, bench: lab.Lab, round_no: int) -> dict:
    """The exact FIFO check: a short run under MONITOR; inversions between the order in which the acquire requests
    reached the server and the grant order (= the release order: one holder at a time)."""
    path = bench.path(f"monitor-{kind}-{round_no}.log")
    pid, lines = lab.child(_monitor, url, path)
    try:
        if lines.read(lab.READY_TIMEOUT, "word that MONITOR runs") != "monitoring":
            raise lab.BenchError("the MONITOR child did not start")
        tag = f":mon{round_no}"
        figures, _grants = rmw_run(kind, url, args.monitor_rmw, r, tag)
        r.echo(MONITOR_END)
        rc = lab.reap(pid, timeout=30.0)
        if rc != 0:
            raise lab.BenchError(f"the MONITOR child ended with {lab.describe(rc)}")
    finally:
        lines.close()
        lab.reap(pid, timeout=1.0, term=True)
    arrivals, releases = arrival_order(path, kind, f"rmw{tag}:lock:{kind}")
    os.unlink(path)
    rank = {t: i for i, t in enumerate(arrivals)}
    order = [rank[t] for t in releases if t in rank]
    count = inversions(order)
    return {"grants": len(order), "acquires_seen": len(arrivals), "inversions": count,
            "per_grant": count / len(order) if order else None, "exact": figures["exact"],
            "complete": len(order) == len(arrivals) == figures["increments"]}  # fmt: skip


# -- phase 4: hand-off after the holder's SIGKILL ---------------------------------------------------


def _lock_of(kind: str, url: str, key: str):
    """(acquire(timeout) -> bool, release()) of a new lock object on ``key`` in this process."""
    if kind == "ours":
        clustershm.get_client().ping()  # this process's connection
        lock = clustershm.Lock(key)  # lease=None: LOCK_LEASE, renewed by the watchdog while the holder lives
        return lambda timeout: lock.acquire(timeout=timeout), lock.release
    r = raw(url)
    r.ping()
    lock = r.lock(key, timeout=LEASE, sleep=SLEEPS[kind])
    return lambda timeout: lock.acquire(blocking_timeout=timeout), lock.release


def _holder(kind: str, url: str, key: str, out_w: int) -> None:
    acquire, _release = _lock_of(kind, url, key)
    if not acquire(10.0):
        raise lab.BenchError("the holder could not acquire a fresh lock")
    lab.send(out_w, f"held {time.monotonic()!r}")
    time.sleep(120.0)  # until SIGKILLed
    os._exit(3)


def _waiter(kind: str, url: str, key: str, out_w: int) -> None:
    acquire, release = _lock_of(kind, url, key)
    lab.send(out_w, "waiting")
    granted = acquire(LEASE + STUCK)
    lab.send(out_w, f"{'granted' if granted else 'timeout'} {time.monotonic()!r}")
    if granted:
        release()


def _queued(r, key: str, timeout: float = 5.0) -> bool:
    """Whether a waiter shows up in our lock's queue on the server ({P:lock:K}:q) within ``timeout``."""
    queue = "{" + PREFIX + ":lock:" + key + "}:q"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if r.llen(queue):
            return True
        time.sleep(0.002)
    return False


def handoff_trial(kind: str, url: str, key: str, r, held_s: float, problems: list) -> dict:
    children: dict[str, tuple[int, lab.Lines]] = {}
    result: dict = {}
    try:
        children["holder"] = lab.child(_holder, kind, url, key)
        word, t_acquired = children["holder"][1].read(lab.READY_TIMEOUT, "the holder's report").split()
        if word != "held":
            raise lab.BenchError(f"the holder said {word!r}")
        t_acquired = float(t_acquired)
        children["waiter"] = lab.child(_waiter, kind, url, key)
        waiter = children["waiter"][1]
        if waiter.read(lab.READY_TIMEOUT, "the waiter's report") != "waiting":
            raise lab.BenchError("the waiter did not report waiting")
        if kind == "ours":
            if not _queued(r, key):
                raise lab.BenchError(f"the waiter never showed up in the queue of {key!r}")
        else:
            time.sleep(0.02)  # its first SET NX went out at once; it polls from there
        kill_at = t_acquired + held_s
        time.sleep(max(0.0, kill_at - time.monotonic()))
        t_kill = time.monotonic()
        os.kill(children["holder"][0], signal.SIGKILL)
        try:
            word, t_done = waiter.read(LEASE + STUCK, "the waiter's result").split()
        except TimeoutError:
            result = {"granted": False, "stuck": True}
        else:
            t_done = float(t_done)
            result = {"granted": word == "granted", "delay_ms": (t_done - t_kill) * 1e3,
                      "held_before_kill_ms": (t_kill - t_acquired) * 1e3}  # fmt: skip
    finally:
        for role, (pid, lines) in children.items():
            lines.close()
            stuck = role == "waiter" and result.get("stuck")
            rc = lab.reap(pid, timeout=1.0 if stuck else lab.REAP_TIMEOUT)
            if not (rc == -signal.SIGKILL if role == "holder" else stuck or rc == 0):
                problems.append(f"{kind} {role} {pid} ended with {lab.describe(rc)}")
    return result


def phase_handoff(kind: str, url: str, args, r, round_no: int, problems: list) -> dict:
    """``--handoffs`` trials; trial i of a round kills the holder at the same moment after its acquire for every
    lock (redis-py's lease is not renewed: what is left of it depends on that moment)."""
    runs = []
    for i in range(args.handoffs):
        held_s = random.Random(f"{args.seed}:{round_no}:{i}").uniform(0.2, 0.5)
        runs.append(handoff_trial(kind, url, f"handoff:{kind}:{round_no}:{i}", r, held_s, problems))
    delays = [x["delay_ms"] for x in runs if x.get("granted")]
    return {"runs": runs, "granted": len(delays), "trials": len(runs),
            "median_ms": statistics.median(delays) if delays else None, "max_ms": max(delays) if delays else None}  # fmt: skip


# -- the report -----------------------------------------------------------------------------------


def over_rounds(values: list) -> dict | None:
    values = [v for v in values if v is not None]
    return lab.rounds(values) if values else None


def cell(s: dict | None, digits: int = 1) -> str:
    return "-" if s is None else f"{lab.fmt(s['median'], digits)}"


def spread(s: dict | None) -> str:
    return "-" if s is None or s["spread"] is None else f"{s['spread']:.0%}"


def per_round(values: list, digits: int = 1) -> str:
    return " / ".join(lab.fmt(v, digits) for v in values)


def main(argv=None) -> int:
    args = lab.options(__doc__, argv, {"rounds": 1, "n": 500, "warmup": 100, "seconds": 0.5, "rmw": 100,
                                       "monitor_rmw": 30, "handoffs": 1},
                       rounds=(lab.count, 3, "rounds; figures are medians over them"),
                       n=(lab.count, 3000, "timed calls per operation per round (phase 1)"),
                       warmup=(lab.count0, 100, "untimed calls per operation first, and before each turn (phase 1)"),
                       seconds=(lab.seconds, 2.0, "seconds per throughput run (phase 2)"),
                       rmw=(lab.count, 400, "locked increments per process (phase 3)"),
                       monitor_rmw=(lab.count, 100, "locked increments per process in the MONITOR check (phase 3)"),
                       handoffs=(lab.count, 3, "hand-offs after SIGKILL per lock per round (phase 4)"),
                       seed=(lab.count0, 1, "seed of the workers' key plans and the kill moments"))  # fmt: skip
    lab.need(binaries=["redis-server"], modules=["redis", "django", "django_redis"])
    problems: list[str] = []
    lat: list[dict] = []
    tput: dict[str, list] = {a: [] for a in CACHES}
    rmw: dict[str, list] = {k: [] for k in LOCKS}
    mon: dict[str, list] = {k: [] for k in LOCKS}
    hand: dict[str, list] = {k: [] for k in HANDOFF_LOCKS}
    with lab.Lab("redis") as bench:
        url = start_server(bench)
        lab.log(f"redis-server at {url}")
        configure_django(url)
        r = raw(url)
        bench.cleanups.append(lambda: r.close())
        for rd in range(1, args.rounds + 1):
            lab.log(f"round {rd}/{args.rounds}: latency, N={args.n} per operation")
            lat.append(phase_latency(url, args))
            for alias in CACHES:
                lab.log(f"round {rd}/{args.rounds}: throughput {alias}, {PROCS} x {args.seconds:g} s")
                tput[alias].append(phase_throughput(alias, args, args.seed + rd))
            for kind in LOCKS:
                lab.log(f"round {rd}/{args.rounds}: locked read-modify-write {kind}, {PROCS} x {args.rmw}")
                rmw[kind].append(phase_rmw(kind, url, args, r))
            for kind in LOCKS:
                lab.log(f"round {rd}/{args.rounds}: FIFO check under MONITOR {kind}, {PROCS} x {args.monitor_rmw}")
                mon[kind].append(phase_monitor(kind, url, args, r, bench, rd))
            for kind in HANDOFF_LOCKS:
                lab.log(f"round {rd}/{args.rounds}: hand-off after SIGKILL {kind}, {args.handoffs} trial(s)")
                hand[kind].append(phase_handoff(kind, url, args, r, rd, problems))
        new_cache("default")
    problems += bench.warnings

    # -- figures over the rounds
    lat_s = {f"{a} {op}": over_rounds([x[f"{a} {op}"]["median_us"] for x in lat])
             for a in [*CACHES, "floor"] for op in ("get", "set")}  # fmt: skip
    tput_s = {a: over_rounds([x["ops_per_s"] for x in runs]) for a, runs in tput.items()}
    rmw_s = {k: over_rounds([x["rmw_per_s"] for x in runs]) for k, runs in rmw.items()}
    all_delays = {
        k: sorted(t["delay_ms"] for x in runs for t in x["runs"] if t.get("granted")) for k, runs in hand.items()
    }
    hand_s = {k: over_rounds([x["median_ms"] for x in runs]) for k, runs in hand.items()}

    def med(s):
        return None if s is None else s["median"]

    def ratio_rounds(a: list, b: list) -> dict | None:
        """The per-round ratio a/b (same round, same machine state), over the rounds."""
        return over_rounds([lab.ratio(x, y) for x, y in zip(a, b, strict=True)])

    text = [lab.header(f"bench_redis: {args.rounds} round(s); one redis-server over TCP for every contender; "
                       f"value {len(pickle.dumps(VALUE, pickle.HIGHEST_PROTOCOL))} B pickled", bench.versions)]  # fmt: skip

    # 1. latency
    rows = []
    ratios = {}
    for op in ("get", "set"):
        ours_rounds = [x[f"ours {op}"]["median_us"] for x in lat]
        for a, label in [*CACHES.items(), ("floor", FLOOR)]:
            vals = [x[f"{a} {op}"]["median_us"] for x in lat]
            p99 = statistics.median(x[f"{a} {op}"]["p99_us"] for x in lat)
            rr = ratio_rounds(ours_rounds, vals) if a not in ("ours", "floor") else None
            if a == "floor":
                rr = ratio_rounds(ours_rounds, vals)
            ratios[f"{op} ours/{a}"] = rr
            rows.append([f"{op}", label, cell(lat_s[f"{a} {op}"]), spread(lat_s[f"{a} {op}"]), per_round(vals),
                         lab.fmt(p99), "-" if a == "ours" else f"{rr['median']:.2f}x ({spread(rr)})"])  # fmt: skip
    text.append(lab.table(["op", "backend", "median µs", "spread", "per round", "p99 µs (median)",
                           "ours / this (spread)"], rows, align="llrrrrr",
                          title=f"1. Latency, one process, {args.n} timed calls per op per round"))  # fmt: skip

    # 2. throughput
    rows = []
    for a, label in CACHES.items():
        vals = [x["ops_per_s"] for x in tput[a]]
        rr = ratio_rounds([x["ops_per_s"] for x in tput["ours"]], vals)
        ratios[f"tput ours/{a}"] = rr
        hit = statistics.median(x["hit_rate"] for x in tput[a])
        rows.append([label, cell(tput_s[a], 0), spread(tput_s[a]), per_round(vals, 0), f"{hit:.1%}",
                     "-" if a == "ours" else f"{rr['median']:.2f}x ({spread(rr)})"])  # fmt: skip
    text.append(lab.table(["backend", "ops/s (median)", "spread", "per round", "get hit rate", "ours / this (spread)"],
                          rows, title=f"2. Throughput, {PROCS} processes, 90/10 get/set on {KEYSPACE} keys, "
                                      f"{args.seconds:g} s per run"))  # fmt: skip

    # 3. locked RMW
    rows, fair, exact_rows = [], [], []

    def each(runs, fmt) -> str:
        return " / ".join("-" if x is None else fmt(x) for x in runs)

    for k, label in LOCKS.items():
        runs = rmw[k]
        vals = [x["rmw_per_s"] for x in runs]
        rr = ratio_rounds([x["rmw_per_s"] for x in rmw["ours"]], vals)
        ratios[f"rmw ours/{k}"] = rr
        exact = all(x["exact"] for x in runs)
        rows.append([label, cell(rmw_s[k], 0), spread(rmw_s[k]), per_round(vals, 0),
                     "yes" if exact else "NO: " + ", ".join(f"{x['final_counter']}/{x['increments']}" for x in runs),
                     lab.fmt(statistics.median(x["longest_wait_ms"] for x in runs)),
                     each([x["same_process_share"] for x in runs], lambda v: f"{v:.0%}"),
                     each([x["gap_same_us"] for x in runs], lambda v: f"{v:.0f}"),
                     each([x["gap_other_us"] for x in runs], lambda v: f"{v:.0f}"),
                     "-" if k == "ours" else f"{rr['median']:.2f}x ({spread(rr)})"])  # fmt: skip
        fair.append([label, each([x["inversions"] for x in runs], str),
                     each([x["per_grant"] for x in runs], lambda v: f"{v:.3f}"),
                     each([x["overtaking_share"] for x in runs], lambda v: f"{v:.1%}"),
                     each([x["max_overtake"] for x in runs], str),
                     each([x["widest_gap_ms"] for x in runs], lambda v: f"{v:.1f}"),
                     each([x["inversions_beyond_race"] for x in runs], str)])  # fmt: skip
        m = mon[k]
        exact_rows.append([label, each([x["grants"] for x in m], str), each([x["inversions"] for x in m], str),
                           each([x["per_grant"] for x in m], lambda v: f"{v:.3f}"),
                           "yes" if all(x["complete"] and x["exact"] for x in m) else "NO"])  # fmt: skip
    text.append(lab.table(["lock", "RMW/s (median)", "spread", "per round", "counter exact", "longest wait ms",
                           "next grant to the same process", "µs grant to grant: same process",
                           "µs grant to grant: another process", "ours / this (spread)"], rows,
                          title=f"3a. Locked read-modify-write, {PROCS} processes x {args.rmw} increments"))  # fmt: skip
    text.append(lab.table(["lock", "inversions", "per grant", "grants that overtook", "max overtake",
                           "widest inverted pair (ms)", f"inversions of tickets > {RACE_MS:g} ms apart"], fair,
                          title="3b. FIFO order by tickets (per round: a / b / c; definitions in the docstring)"))  # fmt: skip
    text.append(lab.table(["lock", "grants", "inversions", "per grant", "every acquire and release seen, counter exact"],
                          exact_rows,
                          title=f"3c. FIFO order by the server's arrival order (MONITOR; {PROCS} processes x "
                                f"{args.monitor_rmw} increments per round)"))  # fmt: skip

    # 4. hand-off
    rows = []
    for k in HANDOFF_LOCKS:
        label, d = LOCKS[k], all_delays[k]
        granted = sum(x["granted"] for x in hand[k])
        trials = sum(x["trials"] for x in hand[k])
        since = [t["delay_ms"] + t["held_before_kill_ms"] for x in hand[k] for t in x["runs"] if t.get("granted")]
        rows.append([label, f"{granted} / {trials}", lab.fmt(statistics.median(d) if d else None),
                     lab.fmt(d[-1] if d else None), spread(hand_s[k]),
                     per_round([x["median_ms"] for x in hand[k]]),
                     lab.fmt(statistics.median(since) if since else None)])  # fmt: skip
    text.append(lab.table(["lock", "granted / trials", "median ms after the kill (all trials)", "max ms",
                           "spread of round medians", "round medians", "median ms from the holder's acquire"], rows,
                          title=f"4. Hand-off after the holder's SIGKILL (lease {LEASE:g} s; kill 0.2-0.5 s after "
                                f"the holder's acquire)"))  # fmt: skip

    # targets (medians over rounds of per-round ratios)
    ours_hand = all_delays["ours"]
    hand_ok = bool(ours_hand) and len(ours_hand) == sum(x["trials"] for x in hand["ours"])
    rmw_ours = rmw["ours"]
    checks = {
        "get_vs_redis": (f"ours get median = {med(ratios['get ours/redis']):.2f}x Django RedisCache (<= 1.0x)",
                         med(ratios["get ours/redis"]), 1.0),
        "set_vs_redis": (f"ours set median = {med(ratios['set ours/redis']):.2f}x Django RedisCache (<= 1.0x)",
                         med(ratios["set ours/redis"]), 1.0),
        "throughput_vs_redis": (f"ours {PROCS}-process ops/s = {med(ratios['tput ours/redis']):.2f}x Django "
                                "RedisCache (>= 1.0x)", med(ratios["tput ours/redis"]), 1.0, True),
        "rmw_vs_redis": (f"ours locked RMW/s = {med(ratios['rmw ours/redis']):.2f}x redis-py Lock sleep=0.1 (>= 1.0x)",
                         med(ratios["rmw ours/redis"]), 1.0, True),
        "rmw_vs_redis_fast": (f"ours locked RMW/s = {med(ratios['rmw ours/redis-fast']):.2f}x redis-py Lock "
                              "sleep=0.001 (>= 1.0x)", med(ratios["rmw ours/redis-fast"]), 1.0, True),
        "rmw_exact": ("ours: counter exact in every round", 0 if all(x["exact"] for x in rmw_ours) else 1, 0),
        "fifo_inversions": ("ours: 0 FIFO inversions by tickets (every round: "
                            f"{', '.join(str(x['inversions']) for x in rmw_ours)})",
                            max(x["inversions"] for x in rmw_ours), 0),
        "fifo_inversions_server_order": ("ours: 0 FIFO inversions by the server's arrival order (MONITOR; every "
                                         f"round: {', '.join(str(x['inversions']) for x in mon['ours'])})",
                                         max(x["inversions"] for x in mon["ours"]), 0, False,
                                         all(x["complete"] for x in mon["ours"])),
        "handoff_median": (f"ours hand-off median {lab.fmt(statistics.median(ours_hand) if ours_hand else None)} ms "
                           f"<= one lease ({LEASE * 1e3:g} ms), every trial granted",
                           statistics.median(ours_hand) if hand_ok else None, LEASE * 1e3),
        "handoff_max": (f"ours hand-off max {lab.fmt(ours_hand[-1] if ours_hand else None)} ms <= one lease "
                        f"({LEASE * 1e3:g} ms)", ours_hand[-1] if hand_ok else None, LEASE * 1e3),
    }  # fmt: skip
    section, met = lab.targets("Targets (ratios: median over rounds of the same round's ratio)", checks)
    text.append(section)
    problems += [f"{LOCKS[k]}: counter not exact in some round" for k, runs in rmw.items()
                 if not all(x["exact"] for x in runs)]  # fmt: skip
    if problems:
        text.append("Problems: " + "; ".join(problems))
    headlines = {
        "redis engine get median (µs)": (med(lat_s["ours get"]), "lower"),
        "redis engine set median (µs)": (med(lat_s["ours set"]), "lower"),
        f"redis engine {PROCS}-process ops/s": (med(tput_s["ours"]), "higher"),
        "redis engine locked RMW/s": (med(rmw_s["ours"]), "higher"),
        "redis engine hand-off after SIGKILL median (ms)": (statistics.median(ours_hand) if ours_hand else None,
                                                             "lower"),
    }  # fmt: skip
    report = {"latency": lat, "throughput": tput, "rmw": rmw, "monitor": mon, "handoff": hand,
              "summary": {"latency": lat_s, "throughput": tput_s, "rmw": rmw_s, "handoff_round_medians": hand_s,
                          "handoff_all_ms": all_delays, "ratios": ratios},
              "targets": met, "problems": problems}  # fmt: skip
    return lab.finish(args, bench, text, report, headlines, failed=problems)


if __name__ == "__main__":
    lab.run(main)
