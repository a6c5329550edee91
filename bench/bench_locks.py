"""Locks compared: django_clustershm.Lock against redis-py, diskcache and multiprocessing.

Three phases (README.md has the details): uncontended acquire + release in one process; a locked
read-modify-write of a shared counter by 4 processes, which must lose no update; the hand-over to a
blocked waiter after the holder is SIGKILLed, which shows who frees a dead holder's lock, and how fast.
The read-modify-write runs twice for clustershm and diskcache: through each one's own store (the raw
API) and through each one's Django cache backend (``cache.get``/``cache.set`` under the lock: what a
Django view does), ClusterShmCache against diskcache's ``DjangoCache``.
Targets: at most 0.5x redis-py's acquire+release, at least 2x diskcache's ops/s (raw and through
Django), a 50 ms hand-over.
"""

from __future__ import annotations

import os
import signal
import statistics
import time
from functools import partial

import lab
from lab import clustershm

BLOCK = 500  # timed calls per lock per round of the interleaving (phase 1)
LEASE = 1.0  # seconds: redis-py's lock timeout and diskcache's expire in phase 3
STUCK = 10.0  # seconds after the kill before a waiter that never got the lock is given up on
COUNTER = "bench:locks:counter"
LABELS = {"clustershm": "django_clustershm.Lock", "redis": "redis-py Lock", "diskcache": "diskcache.Lock",
          "multiprocessing": "multiprocessing Manager().Lock()"}  # fmt: skip
#: Phase 2 only: the same locks around each one's Django cache backend (the cache aliases of configure_django).
DJANGO_RMW = {"clustershm": ("clustershm-django", "ClusterShmCache get/set + django_clustershm.Lock"),
              "diskcache": ("diskcache-django", "diskcache DjangoCache get/set + diskcache.Lock")}  # fmt: skip
RMW_LABELS = {**{name: f"{label} (raw store)" if name in DJANGO_RMW else label for name, label in LABELS.items()},
              **dict(DJANGO_RMW.values())}  # fmt: skip


# -- the four locks, behind one interface --------------------------------------------
# A backend is made in this process; a forked child calls child() for one with its own connections.
# lock(key) runs here before forking too (multiprocessing's locks are proxies made by the process that
# asks for them). read() and write(n): the counter in the lock's own store (read may return bytes,
# which int() takes); warm(): one round trip. Phase 3: the waiter's timeout ``wait``, the ``lease``
# the holder takes, the ``recovery`` that frees a dead holder's lock.


class Backend:
    lease, wait = None, 10.0

    def child(self):
        return self

    def acquire(self, lock, timeout: float | None = None) -> bool:
        return lock.acquire(timeout=timeout)

    def close(self) -> None:
        pass


class ClusterShm(Backend):
    name, recovery = "clustershm", "holder's connection closes (no lease)"  # the client reconnects after a fork
    warm, read, write = partial(clustershm.ping), partial(clustershm.get, COUNTER), partial(clustershm.set, COUNTER)

    def __init__(self, bench: lab.Lab) -> None:
        bench.start_manager()

    def lock(self, key: str, lease: float | None = None):
        return clustershm.Lock(key, lease=lease)


class Redis(Backend):
    name, lease, recovery = "redis", LEASE, f"lease (timeout={LEASE:g} s) expires; waiter polls every 0.1 s"

    def __init__(self, path: str) -> None:
        import redis

        r, self.child = redis.Redis(unix_socket_path=path), partial(Redis, path)  # a child's own connection
        self.lock_of, self.close = r.lock, r.close  # redis.lock.Lock; default sleep=0.1 between tries
        self.warm, self.read, self.write = r.ping, partial(r.get, COUNTER), partial(r.set, COUNTER)

    def lock(self, key: str, lease: float | None = None):
        return self.lock_of(key, timeout=lease)

    def acquire(self, lock, timeout: float | None = None) -> bool:
        return lock.acquire(blocking=True, blocking_timeout=timeout)


class DiskCache(Backend):
    name, lease, wait = "diskcache", LEASE, None  # no timeout in diskcache.Lock: the parent gives up on a stuck waiter
    recovery = f"key expires (expire={LEASE:g} s); waiter polls every 1 ms"

    def __init__(self, directory: str, create: bool = False) -> None:
        import diskcache

        c = self.cache = diskcache.Cache(directory, **({"eviction_policy": "none"} if create else {}))
        self.child = partial(DiskCache, directory)  # the same directory, a child's own connection
        self.warm, self.close = partial(c.get, "bench:locks:warm"), c.close
        self.read, self.write = partial(c.get, COUNTER), partial(c.set, COUNTER)

    def lock(self, key: str, lease: float | None = None):
        import diskcache

        return diskcache.Lock(self.cache, key, expire=lease)  # spins with 1 ms sleeps

    def acquire(self, lock, timeout: float | None = None) -> bool:
        lock.acquire()
        return True


class DjangoBackend(Backend):
    """A cache alias of configure_django, named as the lock it goes with: its get/set under that lock."""

    def __init__(self, alias: str) -> None:
        from django.core.cache import caches

        self.alias, self.name = alias, DJANGO_RMW[alias][0]
        self.cache = caches.create_connection(alias)  # a backend instance of its own, in each process
        self.read, self.write = partial(self.cache.get, COUNTER), partial(self.cache.set, COUNTER)
        self.warm = partial(self.cache.get, "bench:locks:warm")

    def child(self):
        return type(self)(self.alias)

    def close(self) -> None:
        self.cache.close()


class ClusterShmDjango(DjangoBackend):
    def lock(self, key: str, lease: float | None = None):
        return clustershm.Lock(key, lease=lease)


class DiskCacheDjango(DjangoBackend):
    def lock(self, key: str, lease: float | None = None):
        import diskcache

        # DjangoCache.add() takes no expire=: diskcache.Lock wants a Cache, which the alias gives by name.
        return diskcache.Lock(self.cache.cache("locks"), key, expire=lease)

    def acquire(self, lock, timeout: float | None = None) -> bool:
        lock.acquire()
        return True


def configure_django(bench: lab.Lab) -> None:
    """The two Django cache aliases of phase 2: ClusterShmCache, and diskcache's DjangoCache as configured by a
    Django user (its defaults), in the lab's temp dir."""
    import django
    from django.conf import settings

    settings.configure(DEBUG=False, SECRET_KEY="bench-locks-not-a-secret", INSTALLED_APPS=[], USE_TZ=True,
                       CACHES={"default": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache"},
                               "clustershm": {"BACKEND": "django_clustershm.cache.ClusterShmCache",
                                              "LOCATION": "bench-locks"},
                               "diskcache": {"BACKEND": "diskcache.DjangoCache",
                                             "LOCATION": bench.path("djangocache")}})  # fmt: skip
    django.setup()


def _syncmanager_init() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C goes to the script, which shuts it down
    lab.die_with_parent()


def start_syncmanager(bench: lab.Lab):
    """multiprocessing.Manager() with its socket in the temp dir; the lab shuts it down by pid on close."""
    from multiprocessing.managers import SyncManager

    manager = SyncManager(address=bench.path("mp.sock"))
    manager.start(_syncmanager_init)
    process = manager._process  # the server process multiprocessing started

    def stop() -> list[str]:
        try:
            manager.shutdown()  # asks it to exit, joins it, SIGTERMs its pid if it lingers
        except Exception as exc:  # reported; the pid is killed below if still alive
            lab.log(f"SyncManager shutdown failed: {exc!r}")
        process.join(lab.REAP_TIMEOUT)
        if process.is_alive():
            os.kill(process.pid, signal.SIGKILL)
            process.join()
            return [f"the SyncManager (pid {process.pid}) did not stop; killed"]
        return [] if process.exitcode == 0 else [f"the SyncManager ended with exit code {process.exitcode}"]

    bench.cleanups.append(stop)
    return manager


class MultiProcessing(Backend):
    name, wait, recovery = "multiprocessing", 2.0, "none: the lock has no owner process"

    def __init__(self, bench: lab.Lab) -> None:
        self.manager = start_syncmanager(bench)
        self.locks, value = {}, self.manager.Value("i", 0)
        self.warm = self.read = value.get
        self.write = value.set

    def child(self):
        # A proxy keeps one connection per thread, reset after a fork only in the children
        # multiprocessing starts itself: run the same hooks in an os.fork() child.
        import multiprocessing.util

        multiprocessing.util._run_after_forkers()
        return self

    def lock(self, key: str, lease: float | None = None):
        if key not in self.locks:
            self.locks[key] = self.manager.Lock()
        return self.locks[key]

    def acquire(self, lock, timeout: float | None = None) -> bool:
        return lock.acquire(True, timeout)


# -- phase 1: uncontended latency; phase 2: locked read-modify-write ------------------------


def phase_latency(backends: dict, n: int, warmup: int) -> dict:
    def pair(lock):
        acquire, release = lock.acquire, lock.release

        def op():
            acquire()
            release()

        return op

    ops = {name: pair(backend.lock("bench:locks:latency")) for name, backend in backends.items()}
    results = lab.time_interleaved(ops, n, warmup, BLOCK)
    for row in results.values():
        row["ratio_to_redis"] = lab.ratio(row["median_us"], results.get("redis", {}).get("median_us"))
    return results


def _rmw_worker(index: int, ready, backend, key: str, seconds: float) -> dict:
    b = backend.child()
    lock = b.lock(key)
    acquire, release, read, write, clock = b.acquire, lock.release, b.read, b.write, time.monotonic
    b.warm()
    ready()
    n, max_wait = 0, 0.0
    start = clock()
    deadline = start + seconds
    while (t0 := clock()) < deadline:
        acquire(lock)
        max_wait = max(max_wait, clock() - t0)
        write(int(read()) + 1)
        release()
        n += 1
    return {"increments": n, "elapsed": clock() - start, "max_wait": max_wait}


def phase_rmw(backend, procs: int, seconds: float) -> dict:
    key = "bench:locks:rmw"
    backend.lock(key)  # made before the fork
    backend.write(0)
    reports = lab.run_workers(procs, _rmw_worker, (backend, key, seconds), timeout=seconds + 60.0)
    total, final = sum(r["increments"] for r in reports), int(backend.read())
    longest = max(r["elapsed"] for r in reports)
    return {"procs": procs, "seconds": longest, "increments": total, "final_counter": final,
            "lost_updates": total - final, "ops_per_s": total / longest,
            "per_process_ops_per_s": [r["increments"] / r["elapsed"] for r in reports],
            "max_wait_ms": max(r["max_wait"] for r in reports) * 1e3}  # fmt: skip


def median_round(runs: list[dict]) -> dict:
    """The median run by ops/s (the lower middle one for an even count), with the rounds' spread and lost updates."""
    row = dict(sorted(runs, key=lambda r: r["ops_per_s"])[(len(runs) - 1) // 2])
    row["rounds"] = lab.rounds([r["ops_per_s"] for r in runs])
    row["lost_updates_all_rounds"] = sum(r["lost_updates"] for r in runs)
    return row


# -- phase 3: hand-over after SIGKILL -------------------------------------------------


def _holder(backend, key: str, out_w: int) -> None:
    b = backend.child()
    lock = b.lock(key, b.lease)
    if not b.acquire(lock, 10.0):
        raise lab.BenchError("the holder could not acquire a fresh lock")
    lab.send(out_w, f"held {time.monotonic()!r}")
    time.sleep(120.0)  # until SIGKILLed
    os._exit(3)  # not killed: the parent reports this exit code


def _waiter(backend, key: str, out_w: int) -> None:
    b = backend.child()
    lock = b.lock(key, b.lease)
    b.warm()  # connected: "waiting" means the acquire request goes out next
    lab.send(out_w, "waiting")
    granted = b.acquire(lock, b.wait)
    lab.send(out_w, f"{'granted' if granted else 'timeout'} {time.monotonic()!r}")
    if granted:
        lock.release()


def _queued_in_manager(key: str, pid: int, timeout: float = 5.0) -> None:
    """Wait until the Manager's public stats list ``pid`` as the one waiter for ``key``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        held = clustershm.stats().get("locks", {}).get("held")
        if held is None:  # stats that do not list the waiters: wait as for the other locks
            time.sleep(0.2)
            return
        if any(h.get("key") == key and h.get("waiters") == [pid] for h in held):
            return
        time.sleep(0.001)
    raise lab.BenchError(f"the waiter {pid} never showed up as queued for {key!r} in the Manager's stats")


def _handover_trial(backend, key: str, problems: list) -> dict:
    backend.lock(key)  # made before the fork
    children: dict[str, tuple[int, lab.Lines]] = {}
    result: dict = {}
    try:
        children["holder"] = lab.child(_holder, backend, key)
        word, t_acquired = children["holder"][1].read(lab.READY_TIMEOUT, "the holder's report").split()
        if word != "held":
            raise lab.BenchError(f"the holder said {word!r}")
        waiter_pid, waiter = children["waiter"] = lab.child(_waiter, backend, key)
        if waiter.read(lab.READY_TIMEOUT, "the waiter's report") != "waiting":
            raise lab.BenchError("the waiter did not report waiting")
        if backend.name == "clustershm":
            _queued_in_manager(key, waiter_pid)
        else:
            time.sleep(0.2)
        t_kill = time.monotonic()
        os.kill(children["holder"][0], signal.SIGKILL)
        try:
            word, t_done = waiter.read((backend.wait or 0.0) + STUCK, "the waiter's result").split()
        except TimeoutError:
            result = {"granted": False, "stuck": True}
        else:
            t_done, t_acquired = float(t_done), float(t_acquired)
            result = {"granted": word == "granted", "delay_ms": (t_done - t_kill) * 1e3,
                      "from_acquire_ms": (t_done - t_acquired) * 1e3,
                      "kill_after_acquire_ms": (t_kill - t_acquired) * 1e3}  # fmt: skip
    finally:
        for role, (pid, lines) in children.items():
            lines.close()
            stuck = role == "waiter" and result.get("stuck")
            rc = lab.reap(pid, timeout=1.0 if stuck else lab.REAP_TIMEOUT)
            if not (rc == -signal.SIGKILL if role == "holder" else stuck or rc == 0):
                problems.append(f"{backend.name} {role} {pid} ended with {lab.describe(rc)}")
    return result


def phase_handover(backend, trials: int, problems: list) -> dict:
    trials = 1 if backend.name == "multiprocessing" else trials
    runs = [_handover_trial(backend, f"bench:locks:handover:{backend.name}:{i}", problems) for i in range(trials)]
    granted = [r for r in runs if r.get("granted")]
    out: dict = {"mechanism": backend.recovery, "lease_s": backend.lease, "trials": trials, "runs": runs,
                 "granted": len(granted)}  # fmt: skip
    if granted:
        delays = sorted(r["delay_ms"] for r in granted)
        out.update(median_ms=statistics.median(delays), max_ms=delays[-1],
                   median_from_acquire_ms=statistics.median(r["from_acquire_ms"] for r in granted))  # fmt: skip
    if backend.name == "multiprocessing":
        out["waiter_timeout_s"] = backend.wait
        lock = backend.lock(f"bench:locks:handover:{backend.name}:0")  # still held by a process that is gone?
        out["still_locked_after"] = not lock.acquire(False)
        if not out["still_locked_after"]:
            lock.release()
    return out


def tables(latency: dict, rmw: dict, handover: dict, args) -> list[str]:
    base = rmw.get("diskcache", {}).get("ops_per_s")
    django_base = rmw.get("diskcache-django", {}).get("ops_per_s")
    rows1 = [[LABELS[name], lab.fmt(r["median_us"]), lab.fmt(r["p99_us"]), lab.fmt_x(r["ratio_to_redis"], 1)]
             for name, r in latency.items()]  # fmt: skip
    rows2 = [[RMW_LABELS[name], f"{r['ops_per_s']:,.0f}", lab.fmt_x(r["ops_per_s"], base),
              lab.fmt_x(r["ops_per_s"], django_base),
              f"{r['rounds']['min']:,.0f} - {r['rounds']['max']:,.0f}", f"{r['increments']:,}", f"{r['final_counter']:,}",
              r["lost_updates_all_rounds"], f"{min(r['per_process_ops_per_s']):,.0f} / "
              f"{max(r['per_process_ops_per_s']):,.0f}", f"{r['max_wait_ms']:.1f}"] for name, r in rmw.items()]  # fmt: skip
    rows3 = []
    for name, r in handover.items():
        cells = ["never", "-", "-"]
        if r["granted"]:
            cells = [f"{r['median_ms']:.1f}", f"{r['max_ms']:.1f}", f"{r['median_from_acquire_ms']:.1f}"]
        elif name == "multiprocessing":
            cells[0] = f"never (timed out after {r['waiter_timeout_s']:g} s)"
        rows3.append([LABELS[name], r["mechanism"], f"{r['granted']} / {r['trials']}", *cells])
    still = handover.get("multiprocessing", {}).get("still_locked_after")
    return [
        lab.table(["lock", "median (µs)", "p99 (µs)", "median / redis-py"], rows1,
                  title="1. Uncontended acquire + release, one process"),
        lab.table(["lock, around what", "ops/s (median round)", "ops/s / diskcache (raw)",
                   "ops/s / diskcache DjangoCache", "range over the rounds", "increments",
                   "final counter", "lost updates (all rounds)", "slowest / fastest process (ops/s)",
                   "longest lock wait (ms)"], rows2,
                  title=f"2. Locked read-modify-write of a shared counter, {args.procs} processes, {args.seconds:g} s, "
                        f"median of {args.rounds} rounds"),
        lab.table(["lock", "recovery", "granted / trials", "median after SIGKILL (ms)", "max (ms)",
                   "median from holder's acquire (ms)"], rows3, align="llrrrr",
                  title="3. Hand-over to a blocked waiter after the holder is SIGKILLed"),
        *([] if still is None else ["multiprocessing: after the waiter gave up, a try-acquire " + (
            "still fails: the lock stays held by the dead process." if still else "succeeded.")]),
    ]  # fmt: skip


def targets(latency: dict, rmw: dict, handover: dict) -> tuple[str, dict]:
    a, b = latency.get("clustershm", {}).get("median_us"), latency.get("redis", {}).get("median_us")
    c, d = rmw.get("clustershm", {}).get("ops_per_s"), rmw.get("diskcache", {}).get("ops_per_s")
    e, f = rmw.get("clustershm-django", {}).get("ops_per_s"), rmw.get("diskcache-django", {}).get("ops_per_s")
    shm = handover.get("clustershm", {})
    hand = shm.get("median_ms") if shm and shm["granted"] == shm["trials"] else None
    return lab.targets("Targets", {
        "acquire_release_median_vs_redis": (
            f"clustershm acquire+release median {lab.fmt(a)} µs = {lab.fmt_x(a, b)} redis-py's {lab.fmt(b)} µs "
            "(target <= 0.5x)", lab.ratio(a, b), 0.5),
        "rmw_ops_vs_diskcache": (
            f"clustershm locked read-modify-write {lab.fmt(c)} ops/s = {lab.fmt_x(c, d)} diskcache's {lab.fmt(d)} "
            "ops/s, each on its raw store (target >= 2x)", lab.ratio(c, d), 2.0, True),
        "django_rmw_ops_vs_djangocache": (
            f"ClusterShmCache get/set under django_clustershm.Lock {lab.fmt(e)} ops/s = {lab.fmt_x(e, f)} diskcache "
            f"DjangoCache's under diskcache.Lock {lab.fmt(f)} ops/s (target >= 2x)", lab.ratio(e, f), 2.0, True),
        "handover_after_sigkill_median_ms": (
            f"clustershm median hand-over after SIGKILL {lab.fmt(hand)} ms (target <= 50 ms, every trial granted)",
            hand, 50.0),
    })  # fmt: skip


def main(argv=None) -> int:
    args = lab.options(__doc__, argv, {"n": 500, "warmup": 50, "seconds": 0.5, "rounds": 1, "trials": 2}, LABELS,
                       n=(lab.count, 5000, "timed acquire+release pairs per lock"),
                       warmup=(lab.count0, 500, "untimed pairs per lock first"),
                       seconds=(lab.seconds, 3.0, "each read-modify-write run"),
                       procs=(lab.count, 4, "processes in the read-modify-write runs"),
                       rounds=(lab.count, 3, "read-modify-write rounds; the median counts"),
                       trials=(lab.count, 20, "hand-overs after SIGKILL per lock"))  # fmt: skip
    selected = args.selected
    lab.need(["redis-server"] if "redis" in selected else [], [m for m in ("redis", "diskcache") if m in selected])
    problems: list[str] = []
    backends: dict = {}
    with lab.Lab("locks") as bench:
        lab.log(f"temp dir {bench.tmpdir}: starting the servers")
        make = {"clustershm": ClusterShm, "redis": lambda bench: Redis(bench.start_redis()),
                "diskcache": lambda bench: DiskCache(bench.path("diskcache"), create=True),
                "multiprocessing": MultiProcessing}  # fmt: skip  # each starts its server in the lab
        for name in selected:
            backends[name] = make[name](bench)
            bench.cleanups.append(backends[name].close)
        configure_django(bench)
        rmw_backends = dict(backends)
        for name, kind in (("clustershm", ClusterShmDjango), ("diskcache", DiskCacheDjango)):
            if name in backends:
                django_backend = rmw_backends[DJANGO_RMW[name][0]] = kind(name)
                bench.cleanups.append(django_backend.close)
        lab.log(f"phase 1: uncontended acquire+release, N={args.n} per lock")
        latency = phase_latency(backends, args.n, args.warmup)
        runs: dict = {name: [] for name in rmw_backends}
        for r in range(args.rounds):
            for name, backend in rmw_backends.items():
                lab.log(f"phase 2, round {r + 1}/{args.rounds}: {args.procs} x {args.seconds:g} s: {RMW_LABELS[name]}")
                runs[name].append(phase_rmw(backend, args.procs, args.seconds))
        rmw = {name: median_round(rs) for name, rs in runs.items()}
        handover = {}
        for name, backend in backends.items():
            lab.log(f"phase 3: hand-over after SIGKILL: {LABELS[name]}")
            handover[name] = phase_handover(backend, args.trials, problems)
    problems += bench.warnings
    problems += [f"{RMW_LABELS[name]}: {r['lost_updates_all_rounds']} lost updates" for name, r in rmw.items()
                 if r["lost_updates_all_rounds"]]  # fmt: skip
    target_text, target_results = targets(latency, rmw, handover)
    text = [
        lab.header(f"Locks: N={args.n} uncontended pairs per lock after {args.warmup} warm-up; {args.procs} processes "
                   f"x {args.seconds:g} s of locked read-modify-write; {args.trials} hand-overs after SIGKILL; "
                   f"{bench.elapsed:.1f}s", bench.versions),
        *tables(latency, rmw, handover, args),
        target_text,
        *(["Problems: " + "; ".join(problems)] if problems else []),
    ]  # fmt: skip
    shm = [phase.get("clustershm", {}) for phase in (latency, rmw, handover)]
    headlines = {"lock acquire+release median (µs)": (shm[0].get("median_us"), "lower"),
                 f"locked read-modify-write ops/s ({args.procs} processes)": (shm[1].get("ops_per_s"), "higher"),
                 f"locked read-modify-write through ClusterShmCache ops/s ({args.procs} processes)": (
                     rmw.get("clustershm-django", {}).get("ops_per_s"), "higher"),
                 "lock hand-over after SIGKILL median (ms)": (shm[2].get("median_ms"), "lower")}  # fmt: skip
    report = {"latency": latency, "rmw": rmw, "handover": handover, "targets": target_results, "problems": problems}
    return lab.finish(args, bench, text, report, headlines, failed=problems)


if __name__ == "__main__":
    lab.run(main)
