"""Async: the asyncio client (await clustershm.aget, clustershm.amutex) against Django's RedisCache.aget and redis.asyncio.

One Manager and one redis-server, both on Unix sockets. Four phases (README.md has the details): the latency of
sequential awaits, next to the sync ``get``s; the throughput of 1,000 concurrent ``aget`` tasks in one event loop;
100 tasks of one loop doing a locked read-modify-write of a shared counter, ``amutex`` against redis.asyncio's Lock;
phases 2 and 3 again in 4 processes, each with its own loop. Targets (#14): aget median <= 1.5x the sync get's,
1,000 concurrent agets >= 5x the ops/s of RedisCache.aget, amutex >= 5x the locked ops/s of redis.asyncio's Lock.
"""

from __future__ import annotations

import asyncio
import pickle
import socket
import statistics
import struct
import time

import lab
from lab import clustershm

#: The "small value" (bench_core's): what every get returns.
VALUE = {"id": 42, "name": "alice", "active": True, "score": 3.5, "tags": ["a", "b"]}
BLOCK = 500  # timed awaits per operation per round of the interleaving (phase 1)
HIT = "bench:async:hit"
LOCK_KEY, COUNTER = "bench:async:lock", "bench:async:counter"
PEERS = {"clustershm": "django_clustershm", "django": "Django RedisCache", "redis": "redis.asyncio"}
GET_LABELS = {"clustershm": "clustershm.aget", "django": "RedisCache.aget (sync_to_async)",
              "redis": "redis.asyncio get"}  # fmt: skip
LOCK_LABELS = {"clustershm": "clustershm.amutex", "redis": "redis.asyncio Lock (sleep=0.1)"}
SYNC_GET, SYNC_DJANGO = "clustershm.get (sync)", "RedisCache.get (sync)"
SYNC_NOSPIN = "clustershm.get (sync, spin=0)"
FLOOR, AFLOOR = "floor: blocking round trip", "floor: asyncio round trip"
LENGTH = struct.Struct("!I")


def keys(count: int) -> list[str]:
    return [f"bench:async:{i}" for i in range(count)]


# -- the three systems, behind one interface -----------------------------------------------
# Made in the process that uses them (a forked worker makes its own); start() and close() run in the event loop
# that uses them. get(key) awaits one read; expected is what it returns for a seeded key. lock(key, timeout): a new
# lock object whose acquire() waits at most timeout s; read() and write(n): the counter, in the lock's own store.


class ClusterShm:
    name, expected = "clustershm", VALUE

    async def start(self) -> None:
        self.get = clustershm.aget  # the process-wide client's get_client().aio: this loop's connection
        await clustershm.aget(HIT)  # the loop's connection and handshake, before anything is timed

    def lock(self, key: str, timeout: float | None):
        return clustershm.amutex(key, timeout=timeout)  # an AsyncLock; a waiter is queued in the Manager (FIFO)

    async def read(self) -> int:
        return await clustershm.aget(COUNTER)

    async def write(self, n: int) -> None:
        await clustershm.aset(COUNTER, n)

    async def close(self) -> None:
        await clustershm.get_client().aio.aclose()  # this loop's connection (a closed loop's would go anyway)


class Django:
    """Django's RedisCache: its aget is BaseCache's, ``sync_to_async(self.get, thread_sensitive=True)``."""

    name, expected = "django", VALUE

    def __init__(self) -> None:
        from django.core.cache import caches

        self.cache = caches.create_connection("default")  # this process's own instance (and redis-py pool)
        self.get = self.cache.aget

    async def start(self) -> None:
        await self.cache.aget(HIT)

    async def close(self) -> None:
        self.cache.close()  # BaseCache's: nothing to close (redis-py's pool keeps its connection for the next loop)


class RedisAsync:
    """redis.asyncio used directly, through a BlockingConnectionPool (tasks wait for one of its connections)."""

    name, expected = "redis", pickle.dumps(VALUE)  # the same bytes a pickling client would store, not unpickled

    def __init__(self, path: str, connections: int) -> None:
        self.path, self.connections = path, connections

    async def start(self) -> None:
        import redis.asyncio

        self.pool = redis.asyncio.BlockingConnectionPool.from_url(
            f"unix://{self.path}", max_connections=self.connections
        )
        self.r = redis.asyncio.Redis(connection_pool=self.pool)
        self.get = self.r.get
        await self.r.get(HIT)

    def lock(self, key: str, timeout: float | None):
        return self.r.lock(key, blocking_timeout=timeout)  # redis.asyncio.lock.Lock: SET NX, else sleep 0.1 s, retry

    async def read(self) -> int:
        return int(await self.r.get(COUNTER))

    async def write(self, n: int) -> None:
        await self.r.set(COUNTER, n)

    async def close(self) -> None:
        await self.r.aclose()
        await self.pool.disconnect()


# -- the floors: the cheapest round trips to another process, blocking and awaited ---------------


def _echo_child(sock: socket.socket) -> None:
    """Body of an echo process (bench_core's floor): each length-prefixed pickle answered with VALUE's, until EOF."""
    buf = b""
    while True:
        frame, buf = _frame(sock.recv, buf)
        if frame is None:
            return
        pickle.loads(frame)
        body = pickle.dumps(VALUE)
        sock.sendall(LENGTH.pack(len(body)) + body)


def _frame(recv, buf: bytes) -> tuple[bytes | None, bytes]:
    """One length-prefixed frame from ``recv`` (None at EOF), and what follows it."""
    while len(buf) < LENGTH.size or len(buf) < LENGTH.size + LENGTH.unpack_from(buf)[0]:
        chunk = recv(65536)
        if not chunk:
            return None, buf
        buf += chunk
    end = LENGTH.size + LENGTH.unpack_from(buf)[0]
    return buf[LENGTH.size : end], buf[end:]


def start_echo(bench: lab.Lab) -> socket.socket:
    """A forked echo process on a socketpair, stopped (EOF, then reaped) when the lab closes; this side's socket."""
    mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        pid = lab.fork(_echo_child, theirs, close=[mine.fileno()])
    finally:
        theirs.close()

    def stop() -> list[str]:
        mine.close()
        rc = lab.reap(pid, timeout=5.0)
        return [] if rc == 0 else [f"an echo process ended with {lab.describe(rc)}"]

    bench.cleanups.append(stop)
    return mine


def _request() -> bytes:
    body = pickle.dumps(("get", "", HIT))
    return LENGTH.pack(len(body)) + body


class Floor:
    """A blocking send and recv: the floor of bench_core (the sync clients poll before they sleep; this one sleeps)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    def call(self):
        self.sock.sendall(_request())
        frame, _ = _frame(self.sock.recv, b"")
        if frame is None:
            raise lab.BenchError("an echo process went away")
        return pickle.loads(frame)


class AsyncFloor:
    """The same round trip awaited: the loop's reader callback resolves a future (what every asyncio client pays)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    async def start(self) -> None:
        self.loop, self.buf, self.future = asyncio.get_running_loop(), b"", None
        self.sock.setblocking(False)
        self.loop.add_reader(self.sock.fileno(), self._readable)

    def _readable(self) -> None:
        data = self.sock.recv(65536)
        if not data:
            self.future.set_exception(lab.BenchError("an echo process went away"))
            return
        self.buf += data
        if len(self.buf) >= LENGTH.size and len(self.buf) >= LENGTH.size + LENGTH.unpack_from(self.buf)[0]:
            frame, self.buf = _frame(None, self.buf)
            self.future.set_result(frame)

    async def call(self):
        self.future = self.loop.create_future()
        self.sock.send(_request())
        return pickle.loads(await self.future)

    async def close(self) -> None:
        self.loop.remove_reader(self.sock.fileno())


def make(name: str, path: str | None, connections: int):
    """A system by its --only name; ``path``: the redis-server's socket."""
    return {"clustershm": ClusterShm, "django": Django, "redis": lambda: RedisAsync(path, connections)}[name]()


def in_loop(main, *args):
    """``asyncio.run(main(*args))`` inside a ThreadSensitiveContext, as Django's ASGIHandler runs each request:
    Django's a* methods (sync_to_async, thread_sensitive) run on this context's one executor thread."""
    from asgiref.sync import ThreadSensitiveContext

    async def body():
        async with ThreadSensitiveContext():
            return await main(*args)

    return asyncio.run(body())


def rotate(items: list, r: int) -> list:
    """``items`` starting at index r (mod len): the order of the systems changes every round."""
    return items[r % len(items) :] + items[: r % len(items)] if items else items


def configure_django(path: str) -> None:
    import django
    from django.conf import settings

    settings.configure(DEBUG=False, SECRET_KEY="bench-async-not-a-secret", INSTALLED_APPS=[], USE_TZ=True,
                       CACHES={"default": {"BACKEND": "django.core.cache.backends.redis.RedisCache",
                                           "LOCATION": f"unix://{path}"}})  # fmt: skip
    django.setup()


def seed(selected: list[str], path: str | None, concurrency: int) -> None:
    """The hit key and the ``concurrency`` keys of phase 2, in each selected system; each read back once."""
    items = dict.fromkeys([HIT, *keys(concurrency)], VALUE)
    if "clustershm" in selected:
        clustershm.set_many(items)
        if clustershm.get(HIT) != VALUE:
            raise lab.BenchError("clustershm.get of the seeded key does not return what was stored")
    if "django" in selected:
        from django.core.cache import caches

        cache = caches.create_connection("default")
        cache.set_many(items)
        ok = cache.get(HIT) == VALUE
        cache.close()
        if not ok:
            raise lab.BenchError("RedisCache.get of the seeded key does not return what was stored")
    if "redis" in selected:
        import redis

        r = redis.Redis(unix_socket_path=path)
        r.mset({key: pickle.dumps(VALUE) for key in items})  # Django's keys are ":1:..." : no clash
        ok = r.get(HIT) == pickle.dumps(VALUE)
        r.close()
        if not ok:
            raise lab.BenchError("redis GET of the seeded key does not return what was stored")


# -- phase 1: sequential latency ----------------------------------------------------------------


async def _latency_round(systems: list, floor: Floor, afloor: AsyncFloor, nospin, n: int, warmup: int) -> dict:
    """One round: every operation timed ``n`` times in interleaved blocks, GC paused; the summary of each."""
    await afloor.start()
    ops: dict = {FLOOR: (floor.call, False), AFLOOR: (afloor.call, True)}  # name -> (callable, is it awaited)
    for s in systems:
        await s.start()
        if s.name == "clustershm":
            ops[SYNC_GET] = (lambda: clustershm.get(HIT), False)
            ops[SYNC_NOSPIN] = (lambda: nospin.get(HIT), False)
        if s.name == "django":
            ops[SYNC_DJANGO] = (lambda get=s.cache.get: get(HIT), False)
        ops[GET_LABELS[s.name]] = (lambda get=s.get: get(HIT), True)
    for name, (fn, awaited) in ops.items():
        got = await fn() if awaited else fn()
        if got != (pickle.dumps(VALUE) if name == GET_LABELS["redis"] else VALUE):
            raise lab.BenchError(f"{name} returned {got!r}")
        for _ in range(warmup):
            await fn() if awaited else fn()
    samples: dict[str, list] = {name: [] for name in ops}
    clock = time.perf_counter
    with lab.gc_paused():
        for start in range(0, n, BLOCK):
            for name, (fn, awaited) in ops.items():
                append, count = samples[name].append, min(BLOCK, n - start)
                if awaited:
                    for _ in range(min(lab.SETTLE, warmup)):  # as lab.time_interleaved: untimed calls first
                        await fn()
                    for _ in range(count):
                        t0 = clock()
                        await fn()
                        append(clock() - t0)
                else:
                    for _ in range(min(lab.SETTLE, warmup)):
                        fn()
                    for _ in range(count):
                        t0 = clock()
                        fn()
                        append(clock() - t0)
    for s in systems:
        await s.close()
    await afloor.close()
    return {name: lab.summary(values) for name, values in samples.items()}


def phase_latency(make_system, selected: list[str], floors: tuple, nospin, args) -> dict:
    runs: dict[str, list] = {}
    for r in range(args.rounds):
        lab.log(f"phase 1, round {r + 1}/{args.rounds}: {args.n} sequential awaits per operation")
        systems = [make_system(name) for name in rotate(selected, r)]
        done = in_loop(_latency_round, systems, *floors, nospin, args.n, args.warmup)
        for name, row in done.items():
            runs.setdefault(name, []).append(row)
    order = [FLOOR, AFLOOR, SYNC_GET, SYNC_NOSPIN, GET_LABELS["clustershm"], SYNC_DJANGO, GET_LABELS["django"],
             GET_LABELS["redis"]]  # fmt: skip
    out = {}
    for name in [o for o in order if o in runs]:
        rows = runs[name]
        out[name] = {"median_us": lab.rounds([r["median_us"] for r in rows]),
                     "p99_us": lab.rounds([r["p99_us"] for r in rows]), "per_round": rows}  # fmt: skip
    return out


# -- phase 2: concurrent agets; phase 3: locked read-modify-write --------------------------------


async def _throughput(s, concurrency: int, seconds: float, ready=None) -> dict:
    """Batches of ``concurrency`` concurrent gets (asyncio.gather) for ``seconds``: ops, elapsed, client CPU."""
    await s.start()
    get, names = s.get, keys(concurrency)
    wrong = sum(got != s.expected for got in await asyncio.gather(*(get(k) for k in names)))  # warm-up, checked
    if ready:
        ready()
    ops, clock = 0, time.perf_counter
    cpu, start = time.process_time(), clock()
    deadline = start + seconds
    while clock() < deadline:
        await asyncio.gather(*(get(k) for k in names))
        ops += concurrency
    elapsed, cpu = clock() - start, time.process_time() - cpu
    await s.close()
    return {"ops": ops, "elapsed": elapsed, "ops_per_s": ops / elapsed, "cpu_us_per_op": cpu / ops * 1e6,
            "wrong": wrong}  # fmt: skip


async def _rmw(s, tasks: int, seconds: float, ready=None, reset: bool = True) -> dict:
    """``tasks`` tasks looping for ``seconds``: acquire, read the counter, write it + 1, release. An acquire waits at
    most until the end (the lock's own timeout), so every task stops then: no drain of queued waiters after it."""
    await s.start()
    if reset:
        await s.write(0)
    make_lock, read, write, clock = s.lock, s.read, s.write, time.perf_counter
    counts, waits = [0] * tasks, [0.0] * tasks
    if ready:
        ready()
    start = clock()
    deadline = start + seconds

    async def task(i: int) -> None:
        while (t0 := clock()) < deadline:
            lock = make_lock(LOCK_KEY, deadline - t0)
            if not await lock.acquire():
                waits[i] = max(waits[i], clock() - t0)
                return  # the end came while it waited
            try:
                waits[i] = max(waits[i], clock() - t0)
                await write(await read() + 1)
            finally:
                await lock.release()
            counts[i] += 1

    await asyncio.gather(*(task(i) for i in range(tasks)))
    elapsed = clock() - start
    final = await read() if reset else None
    await s.close()
    return {"tasks": tasks, "increments": sum(counts), "elapsed": elapsed, "ops_per_s": sum(counts) / elapsed,
            "final_counter": final, "lost_updates": None if final is None else sum(counts) - final,
            "slowest_task": min(counts), "fastest_task": max(counts), "served": sum(c > 0 for c in counts),
            "max_wait_ms": max(waits) * 1e3}  # fmt: skip


async def _waves(s, tasks: int, seconds: float) -> dict:
    """Waves of ``tasks`` tasks that each do one locked read-modify-write (as many requests arriving at once), one
    wave after another until ``seconds`` have passed (at least one): every task must get its turn."""
    await s.start()
    await s.write(0)
    make_lock, read, write, clock = s.lock, s.read, s.write, time.perf_counter
    done: list[float] = []  # per task: from its wave's start to its write

    async def one(t0: float) -> None:
        lock = make_lock(LOCK_KEY, None)
        if not await lock.acquire():
            raise lab.BenchError("an acquire with no timeout returned False")
        try:
            await write(await read() + 1)
        finally:
            await lock.release()
        done.append(clock() - t0)

    waves: list[float] = []
    start = clock()
    while not waves or clock() - start < seconds:
        t0 = clock()
        await asyncio.gather(*(one(t0) for _ in range(tasks)))
        waves.append(clock() - t0)
    elapsed, total = clock() - start, tasks * len(waves)
    final = await read()
    await s.close()
    return {"tasks": tasks, "waves": len(waves), "increments": total, "elapsed": elapsed, "ops_per_s": total / elapsed,
            "final_counter": final, "lost_updates": total - final, "median_wave_ms": statistics.median(waves) * 1e3,
            "max_done_ms": max(done) * 1e3}  # fmt: skip


async def _each(body, systems: list, *args) -> dict:
    return {s.name: await body(s, *args) for s in systems}


def phase_loop(what: str, body, make_system, names: list[str], args, *params) -> dict:
    """``body`` for each system in turn, one event loop per round; name -> every round's result."""
    runs: dict[str, list] = {name: [] for name in names}
    for r in range(args.rounds):
        order = rotate(names, r)
        lab.log(f"{what}, round {r + 1}/{args.rounds}: {', '.join(order)}")
        for name, row in in_loop(_each, body, [make_system(n) for n in order], *params).items():
            runs[name].append(row)
    return runs


# -- phase 4: the same in several processes --------------------------------------------------------


def _proc_worker(index: int, ready, kind: str, name: str, path, args_tuple) -> dict:
    concurrency, tasks, seconds, connections = args_tuple
    s = make(name, path, connections)
    if kind == "throughput":
        return in_loop(_throughput, s, concurrency, seconds, ready)
    return in_loop(_rmw, s, tasks, seconds, ready, False)


def phase_procs(make_system, selected: list[str], locks: list[str], path, args) -> dict:
    """Phases 2 and 3 with ``args.procs`` forked processes, each running its own loop, all started together."""
    tasks = max(1, args.tasks // args.procs)
    params = (args.concurrency, tasks, args.seconds, args.connections)
    runs: dict = {"throughput": {n: [] for n in selected}, "rmw": {n: [] for n in locks}}
    for r in range(args.rounds):
        for kind, names in (("throughput", selected), ("rmw", locks)):
            for name in rotate(names, r):
                lab.log(f"phase 4, round {r + 1}/{args.rounds}: {kind}, {args.procs} processes: {name}")
                if kind == "rmw":
                    reset_counter(name, path)
                reports = lab.run_workers(args.procs, _proc_worker, (kind, name, path, params),
                                          timeout=args.seconds + 120.0)  # fmt: skip
                longest = max(rep["elapsed"] for rep in reports)
                total = sum(rep["ops" if kind == "throughput" else "increments"] for rep in reports)
                row = {"procs": args.procs, "seconds": longest, "total": total, "ops_per_s": total / longest,
                       "per_process_ops_per_s": [rep["ops_per_s"] for rep in reports]}  # fmt: skip
                if kind == "throughput":
                    row["wrong"] = sum(rep["wrong"] for rep in reports)
                else:
                    row["tasks_per_process"] = tasks
                    row["final_counter"] = read_counter(name, path)
                    row["lost_updates"] = total - row["final_counter"]
                    row["max_wait_ms"] = max(rep["max_wait_ms"] for rep in reports)
                runs[kind][name].append(row)
    return runs


def reset_counter(name: str, path) -> None:
    if name == "clustershm":
        clustershm.set(COUNTER, 0)
    else:
        import redis

        with redis.Redis(unix_socket_path=path) as r:
            r.set(COUNTER, 0)


def read_counter(name: str, path) -> int:
    if name == "clustershm":
        return clustershm.get(COUNTER)
    import redis

    with redis.Redis(unix_socket_path=path) as r:
        return int(r.get(COUNTER))


# -- the report ---------------------------------------------------------------------------------------


def median_round(runs: list[dict], extra: dict | None = None) -> dict:
    """The median run by ops/s (the lower middle one for an even count), with the rounds' figures."""
    row = dict(sorted(runs, key=lambda r: r["ops_per_s"])[(len(runs) - 1) // 2])
    row["rounds"] = lab.rounds([r["ops_per_s"] for r in runs])
    for key in ("lost_updates", "wrong"):
        if any(r.get(key) is not None for r in runs):
            row[key + "_all_rounds"] = sum(r.get(key) or 0 for r in runs)
    return row


def spread(r: dict) -> str:
    return f"{r['min']:,.0f} - {r['max']:,.0f} ({r['spread']:.0%})" if r["spread"] is not None else "-"


def tables(latency: dict, thr: dict, rmw: dict, waves: dict, procs: dict, args) -> list[str]:
    sync = latency.get(SYNC_GET, {}).get("median_us", {}).get("median")
    afloor = latency[AFLOOR]["median_us"]["median"]
    rows1 = [[name, lab.fmt(r["median_us"]["median"]), lab.fmt(r["p99_us"]["median"]),
              f"{lab.fmt(r['median_us']['min'])} - {lab.fmt(r['median_us']['max'])}",
              lab.fmt_x(r["median_us"]["median"], sync), lab.fmt_x(r["median_us"]["median"], afloor)]
             for name, r in latency.items()]  # fmt: skip
    dj = thr.get("django", {}).get("ops_per_s")
    rows2 = [[GET_LABELS[name], f"{r['rounds']['median']:,.0f}", spread(r["rounds"]), f"{r['cpu_us_per_op']:.1f}",
              lab.fmt_x(r["rounds"]["median"], dj and thr["django"]["rounds"]["median"])]
             for name, r in thr.items()]  # fmt: skip
    red = rmw.get("redis", {}).get("rounds", {}).get("median")
    rows3 = [[LOCK_LABELS[name], f"{r['rounds']['median']:,.0f}", spread(r["rounds"]),
              lab.fmt_x(r["rounds"]["median"], red), f"{r['increments']:,}", f"{r['final_counter']:,}",
              r["lost_updates_all_rounds"], f"{r['slowest_task']:,} / {r['fastest_task']:,}",
              f"{r['served']} / {r['tasks']}", f"{r['max_wait_ms']:.1f}"] for name, r in rmw.items()]  # fmt: skip
    red = waves.get("redis", {}).get("rounds", {}).get("median")
    rows3b = [[LOCK_LABELS[name], f"{r['rounds']['median']:,.0f}", spread(r["rounds"]),
               lab.fmt_x(r["rounds"]["median"], red), r["waves"], f"{r['median_wave_ms']:,.1f}",
               f"{r['max_done_ms']:,.1f}", f"{r['final_counter']:,}", r["lost_updates_all_rounds"]]
              for name, r in waves.items()]  # fmt: skip
    text = [
        lab.table(["operation", "median (µs)", "p99 (µs)", "range of the medians", "median / clustershm.get",
                   "median / asyncio floor"],
                  rows1, title=f"1. Latency of sequential calls, one task, hit, small value (median of {args.rounds} "
                               f"rounds of {args.n})"),
        lab.table(["system", "ops/s (median round)", "range over the rounds (spread)", "client CPU (µs/op)",
                   "ops/s / RedisCache.aget"], rows2,
                  title=f"2. {args.concurrency:,} concurrent gets in one event loop (asyncio.gather), {args.seconds:g} "
                        f"s, median of {args.rounds} rounds"),
        lab.table(["lock", "locked RMW/s (median round)", "range over the rounds (spread)",
                   "RMW/s / redis.asyncio Lock", "increments", "final counter", "lost updates (all rounds)",
                   "slowest / fastest task (RMWs)", "tasks served", "longest lock wait (ms)"], rows3,
                  title=f"3a. Locked read-modify-write of a shared counter, {args.tasks} tasks on one key looping in "
                        f"one event loop, {args.seconds:g} s, median of {args.rounds} rounds"),
        lab.table(["lock", "locked RMW/s (median round)", "range over the rounds (spread)",
                   "RMW/s / redis.asyncio Lock", "waves", "median wave (ms)", "slowest task (ms)", "final counter",
                   "lost updates (all rounds)"], rows3b,
                  title=f"3b. The same, {args.tasks} tasks each doing one locked read-modify-write at once (a wave), "
                        f"waves for {args.seconds:g} s (at least one), median of {args.rounds} rounds"),
    ]  # fmt: skip
    if procs:
        rows4 = []
        for kind, runs in procs.items():
            base = runs.get("django" if kind == "throughput" else "redis", {}).get("rounds", {}).get("median")
            for name, r in runs.items():
                label = GET_LABELS[name] if kind == "throughput" else LOCK_LABELS[name]
                check = "-" if kind == "throughput" else f"{r['final_counter']:,} / {r['lost_updates_all_rounds']}"
                slow, fast = min(r["per_process_ops_per_s"]), max(r["per_process_ops_per_s"])
                rows4.append([label, f"{r['rounds']['median']:,.0f}", spread(r["rounds"]),
                              lab.fmt_x(r["rounds"]["median"], base), f"{slow:,.0f} / {fast:,.0f}", check])  # fmt: skip
        tasks = max(1, args.tasks // args.procs)
        text.append(lab.table(["system", "ops/s (median round)", "range over the rounds (spread)",
                               "over RedisCache.aget / redis.asyncio Lock", "slowest / fastest process (ops/s)",
                               "final counter / lost updates (all rounds)"], rows4,
                              title=f"4. {args.procs} processes, each with its own event loop, {args.seconds:g} s: "
                                    f"{args.concurrency:,} concurrent gets per process; {tasks} locking tasks per "
                                    f"process on one key"))  # fmt: skip
    return text


def targets(latency: dict, thr: dict, rmw: dict, waves: dict) -> tuple[str, dict]:
    def med(table, name, key="rounds"):
        row = table.get(name)
        return None if row is None else row[key]["median"]

    a, s = med(latency, GET_LABELS["clustershm"], "median_us"), med(latency, SYNC_GET, "median_us")
    c, d = med(thr, "clustershm"), med(thr, "django")
    e, f = med(rmw, "clustershm"), med(rmw, "redis")
    g, h = med(waves, "clustershm"), med(waves, "redis")
    return lab.targets("Targets (#14, same run)", {
        "aget_median_vs_sync_get": (
            f"clustershm.aget median {lab.fmt(a)} µs = {lab.fmt_x(a, s)} clustershm.get's {lab.fmt(s)} µs "
            "(target <= 1.5x)", lab.ratio(a, s), 1.5),
        "concurrent_aget_vs_django": (
            f"1,000 concurrent clustershm.aget {lab.fmt(c)} ops/s = {lab.fmt_x(c, d)} RedisCache.aget's {lab.fmt(d)} "
            "ops/s (target >= 5x)", lab.ratio(c, d), 5.0, True),
        "amutex_rmw_vs_redis_lock": (
            f"amutex locked RMW, tasks looping (3a): {lab.fmt(e)}/s = {lab.fmt_x(e, f)} redis.asyncio Lock's "
            f"{lab.fmt(f)}/s (target >= 5x)", lab.ratio(e, f), 5.0, True),
        "amutex_waves_vs_redis_lock": (
            f"amutex locked RMW, one per task (3b): {lab.fmt(g)}/s = {lab.fmt_x(g, h)} redis.asyncio Lock's "
            f"{lab.fmt(h)}/s (target >= 5x)", lab.ratio(g, h), 5.0, True),
    })  # fmt: skip


def main(argv=None) -> int:
    args = lab.options(__doc__, argv, {"n": 500, "warmup": 50, "seconds": 0.3, "rounds": 1}, PEERS,
                       n=(lab.count, 5000, "timed awaits per operation per round (phase 1)"),
                       warmup=(lab.count0, 500, "untimed calls per operation first"),
                       seconds=(lab.seconds, 2.0, "each throughput and lock run"),
                       rounds=(lab.count, 3, "rounds of every phase, the systems taking turns; medians count"),
                       concurrency=(lab.count, 1000, "concurrent gets per batch (phase 2)"),
                       tasks=(lab.count, 100, "locking tasks on one key (phase 3; split among the processes in 4)"),
                       procs=(lab.count0, 4, "processes in phase 4 (0: skip it)"),
                       connections=(lab.count, 64, "max_connections of redis.asyncio's BlockingConnectionPool"))  # fmt: skip
    selected = args.selected
    if "clustershm" in selected and not all(hasattr(clustershm, n) for n in ("aget", "aset", "amutex", "AsyncClient")):
        raise lab.BenchError(f"the django_clustershm of {lab.environment()['package']} has no asyncio client (#14); "
                             "put a tree that has one first on PYTHONPATH, or run --only django,redis")  # fmt: skip
    uses_redis = "django" in selected or "redis" in selected
    lab.need(["redis-server"] if uses_redis else [], ["redis"] if uses_redis else [])
    locks = [n for n in selected if n in LOCK_LABELS]
    problems: list[str] = []
    with lab.Lab("async") as bench:
        lab.log(f"temp dir {bench.tmpdir}: starting the servers")
        path = bench.start_redis() if uses_redis else None
        if "clustershm" in selected:
            bench.start_manager()  # and configure(): clustershm.aget and amutex use the process-wide client
        if "django" in selected:
            configure_django(path)
        seed(selected, path, args.concurrency)

        def make_system(name: str):
            return make(name, path, args.connections)

        floors = Floor(start_echo(bench)), AsyncFloor(start_echo(bench))
        nospin = None
        if "clustershm" in selected:  # a client that sleeps in recv() at once, as the event loop sleeps in epoll
            nospin = clustershm.Client(clustershm.SocketTransport(bench.address, bench.secret, spin=0))
            bench.cleanups.append(nospin.close)
        latency = phase_latency(make_system, selected, floors, nospin, args)
        thr_runs = phase_loop("phase 2", _throughput, make_system, selected, args, args.concurrency, args.seconds)
        rmw_runs = phase_loop("phase 3a", _rmw, make_system, locks, args, args.tasks, args.seconds)
        wave_runs = phase_loop("phase 3b", _waves, make_system, locks, args, args.tasks, args.seconds)
        proc_runs = phase_procs(make_system, selected, locks, path, args) if args.procs else {}
    thr = {name: median_round(runs) for name, runs in thr_runs.items()}
    rmw = {name: median_round(runs) for name, runs in rmw_runs.items()}
    waves = {name: median_round(runs) for name, runs in wave_runs.items()}
    procs = {kind: {name: median_round(runs) for name, runs in per.items()} for kind, per in proc_runs.items()}
    problems += bench.warnings
    for what, table in (("phase 3a", rmw), ("phase 3b", waves), ("phase 4", procs.get("rmw", {}))):
        problems += [f"{what}: {LOCK_LABELS[n]}: {r['lost_updates_all_rounds']} lost updates"
                     for n, r in table.items() if r["lost_updates_all_rounds"]]  # fmt: skip
    for what, table in (("phase 2", thr), ("phase 4", procs.get("throughput", {}))):
        problems += [f"{what}: {GET_LABELS[n]}: {r['wrong_all_rounds']} wrong values"
                     for n, r in table.items() if r["wrong_all_rounds"]]  # fmt: skip
    target_text, target_results = targets(latency, thr, rmw, waves)
    text = [
        lab.header(f"Async: N={args.n} sequential awaits per operation, {args.concurrency:,} concurrent gets and "
                   f"{args.tasks} locking tasks for {args.seconds:g} s, {args.rounds} rounds; redis.asyncio "
                   f"BlockingConnectionPool(max_connections={args.connections}); default asyncio event loop; "
                   f"{bench.elapsed:.1f}s", bench.versions),
        *tables(latency, thr, rmw, waves, procs, args),
        target_text,
        *(["Problems: " + "; ".join(problems)] if problems else []),
    ]  # fmt: skip

    def figure(table, name, key="rounds"):
        row = table.get(name)
        return None if row is None else row[key]["median"]

    p = args.procs
    headlines = {
        "aget median (µs)": (figure(latency, GET_LABELS["clustershm"], "median_us"), "lower"),
        "aget median / sync get median": (target_results["aget_median_vs_sync_get"]["value"], "lower"),
        f"{args.concurrency:,} concurrent aget ops/s (one loop)": (figure(thr, "clustershm"), "higher"),
        f"amutex locked RMW/s ({args.tasks} tasks looping, one loop)": (figure(rmw, "clustershm"), "higher"),
        f"amutex locked RMW/s (waves of {args.tasks} one-shot tasks)": (figure(waves, "clustershm"), "higher"),
    }
    if procs:
        headlines[f"concurrent aget ops/s ({p} processes)"] = (figure(procs["throughput"], "clustershm"), "higher")
        headlines[f"amutex locked RMW/s ({p} processes)"] = (figure(procs["rmw"], "clustershm"), "higher")
    report = {"value": repr(VALUE), "latency": latency, "throughput": thr, "rmw": rmw, "waves": waves, "procs": procs,
              "targets": target_results, "problems": problems}  # fmt: skip
    return lab.finish(args, bench, text, report, headlines, failed=problems)


if __name__ == "__main__":
    lab.run(main)
