"""Locks compared: django_clustershm.Lock against redis-py, diskcache and multiprocessing.

Run by hand from the repository root (it is not part of the test suite)::

    python bench/bench_locks.py                     # N = 5000, 3 rounds of 3 s per lock, 20 hand-overs
    python bench/bench_locks.py --n 20000 --seconds 5 --trials 50 --json bench/results/locks.json

Needs ``redis-server`` (on the PATH or in /usr/bin) and the Python packages
``redis`` and ``diskcache`` (``pip install -e '.[bench]'``). Everything the
script starts listens on a Unix socket in one private (0700) temporary
directory, nothing on TCP; it stops every server by pid at the end, reaps
every child it forked (checking how each one ended) and removes the
directory:

* ``django_clustershm.Lock``: a :class:`~django_clustershm.manager.Manager`
  serving in a forked child of this script (the Manager is created inside the
  child: it belongs to the process that created it); this process and every
  worker it forks are pointed at it with ``django_clustershm.configure()``;
* redis-py's ``redis.lock.Lock`` (``Redis(unix_socket_path=...).lock(name)``):
  ``redis-server --port 0 --unixsocket PATH --save '' --appendonly no``;
* ``diskcache.Lock`` on a ``diskcache.Cache`` in a directory of the temp dir
  (``eviction_policy="none"``, as diskcache's documentation asks for locks);
* ``multiprocessing.Manager().Lock()``: the ``SyncManager`` that
  ``multiprocessing.Manager()`` starts, bound to a socket in the temp dir.

What it measures
----------------
1. Uncontended latency, one process: ``acquire()`` then ``release()`` of one
   lock, timed together with ``time.perf_counter``, N times (``--n``) per lock
   after a warm-up, in interleaved blocks so that drift in the machine's load
   affects every lock alike, with the garbage collector paused. Median and
   99th percentile (nearest rank) in microseconds, and each median over
   redis-py's. No lock has a lease here (redis-py's and diskcache's without
   a ``timeout``/``expire``).
2. Locked read-modify-write throughput: 4 forked processes (``--procs``), after
   a common start signal, each loop for ``--seconds``: acquire the lock, read
   a shared counter, write counter + 1, release. The counter lives in each
   system's own store: ``django_clustershm.get/set``; redis ``GET``/``SET``;
   the same diskcache directory's ``get``/``set``; a ``manager.Value``'s
   ``.value``. The figure is the total of the increments the processes report,
   divided by the longest process's run time, and its ratio to diskcache's.
   The final counter must equal that total: any difference is an update lost
   because the lock let two processes in at once (printed; it must be 0).
   The table also gives the slowest and fastest process (fairness) and the
   longest single wait for the lock. The phase runs ``--rounds`` times (3),
   the locks taking turns in each round, and each lock's row is its median
   round (by ops/s), with the range over the rounds beside it: one 3-second
   run on this noisy 2-CPU machine swings by 15% either way.
3. Hand-over after the holder is SIGKILLed: a forked *holder* acquires the
   lock and reports over a pipe; a second forked *waiter* blocks in
   ``acquire()``. Once the waiter waits (for clustershm: the Manager's
   ``stats()["locks"]["held"]`` lists the waiter's pid as queued on the key;
   for the others: 0.2 s after the waiter says it is about to call
   ``acquire()``), this process records ``time.monotonic()`` and SIGKILLs the
   holder; the waiter writes its own ``time.monotonic()`` the moment
   ``acquire()`` returns. CLOCK_MONOTONIC is system-wide, so the difference is
   the hand-over delay. Each trial uses a fresh key; ``--trials`` trials per
   lock (default 20), median and max in milliseconds.

   * clustershm: no lease. The Manager frees a lock when its holder's
     connection closes, which the kernel does when the process dies.
   * redis-py: a lease (``timeout``) of 1 s, the only way redis recovers a
     lock whose holder died: the key expires. redis-py's blocking
     ``acquire()`` polls every 0.1 s (its default ``sleep``).
   * diskcache: ``expire=1``, for the same reason; its ``acquire()`` polls
     every 1 ms. It has no timeout, so a waiter that never gets the lock is
     SIGKILLed by this script after 10 s (reported as a failure).
   * multiprocessing: the lock is a ``threading.Lock`` inside the SyncManager
     process, with no notion of an owner process: it is never released when
     the holder dies. One trial, the waiter uses ``acquire(timeout=2)``,
     reported as "never (timed out after 2 s)"; this process then checks that
     a try-acquire still fails.

   For the leased locks the delay counted from the SIGKILL depends on how
   much of the lease was left at that moment (the kill comes a fraction of a
   second after the holder acquired), so the table also gives the delay from
   the holder's ``acquire()`` to the waiter's grant, which is lease + polling.

How to read it
--------------
Three Markdown tables on stdout (progress goes to stderr), then the design
targets as PASS/FAIL lines: clustershm's uncontended acquire+release median at
most 0.5x redis-py's; clustershm's locked read-modify-write throughput at least
2x diskcache's; clustershm's median hand-over after a SIGKILL under 50 ms.

Absolute numbers depend on the machine; compare locks within one run. On a
small VM the workers, the servers and this script share few CPUs (the header
says how many), which caps the contended figures, and the scheduler's
placement of client and server on the same or different CPUs moves the
latency medians from run to run (see bench_core.py). Spin locks (redis-py,
diskcache) can look fast in phase 2 while being unfair: the process that
just released tends to take the lock again before the sleeping ones wake up,
which the per-process minimum and the longest wait show.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import select
import signal
import statistics
import sys
import time

try:
    import django_clustershm  # noqa: F401
except ImportError:  # run as "python bench/bench_locks.py" without PYTHONPATH
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import django_clustershm  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # bench/, for _common
import _common  # noqa: E402
from _common import (  # noqa: E402
    REAP_TIMEOUT,
    BenchError,
    describe_status,
    exited_ok,
    fork,
    log,
    package_versions,
    reap,
    summarise_us,
    time_interleaved,
    write_json,
)

BLOCK = 500  # timed calls per lock per round of the interleaving (phase 1)
READY_TIMEOUT = 30.0  # seconds a forked child may take to connect and report
LEASE = 1.0  # seconds: redis-py's lock timeout and diskcache's expire in phase 3
MP_WAIT = 2.0  # seconds the multiprocessing waiter waits in phase 3
STUCK = 10.0  # seconds after the kill before a waiter that never got the lock is given up on
COUNTER = "bench:locks:counter"

LABELS = {
    "clustershm": "django_clustershm.Lock",
    "redis": "redis-py Lock",
    "diskcache": "diskcache.Lock",
    "multiprocessing": "multiprocessing Manager().Lock()",
}

TARGET_LATENCY = 0.5  # clustershm median / redis-py median, at most
TARGET_RMW = 2.0  # clustershm ops/s / diskcache ops/s, at least
TARGET_HANDOVER_MS = 50.0  # clustershm median hand-over after SIGKILL, below


# -- forked children ---------------------------------------------------------------


def _killed_by(status: int | None, sig: int) -> bool:
    return status is not None and os.WIFSIGNALED(status) and os.WTERMSIG(status) == sig


class _Lines:
    """Newline-terminated messages from a child over a pipe, read with a deadline."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.buf = b""

    def read(self, timeout: float, what: str) -> str:
        deadline = time.monotonic() + timeout
        while b"\n" not in self.buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no {what} within {timeout:.0f}s")
            readable, _, _ = select.select([self.fd], [], [], left)
            if readable:
                chunk = os.read(self.fd, 4096)
                if not chunk:
                    raise BenchError(f"the child exited before sending {what}")
                self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return line.decode()

    def close(self) -> None:
        os.close(self.fd)


def _send(fd: int, msg: str) -> None:
    os.write(fd, msg.encode() + b"\n")  # one short write: atomic on a pipe


def _syncmanager_init() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C goes to the parent, which shuts it down


# -- the servers --------------------------------------------------------------------


class Lab(_common.Lab):
    """The temp directory and every server this script starts (and stops, by pid); adds the SyncManager."""

    def __init__(self) -> None:
        super().__init__("bench-locks-")
        self.diskcache_dir = self.path("diskcache")
        self.syncmanager = None

    def start_syncmanager(self) -> None:
        # multiprocessing.Manager() is SyncManager(ctx=...).start(); the address
        # is given so that its socket lives in our temp dir.
        from multiprocessing.managers import SyncManager

        self.syncmanager = SyncManager(address=self.path("mp.sock"))
        self.syncmanager.start(_syncmanager_init)

    def close(self) -> list[str]:
        """Stop every server by pid, reap it, remove the temp dir; return warnings."""
        warnings = []
        if self.syncmanager is not None:
            process = self.syncmanager._process  # the server process multiprocessing started
            pid = process.pid
            try:
                self.syncmanager.shutdown()  # asks it to exit, joins it, SIGTERMs its pid if it lingers
            except Exception as exc:
                warnings.append(f"SyncManager shutdown failed: {exc!r}")
            process.join(REAP_TIMEOUT)
            if process.is_alive():
                warnings.append(f"the SyncManager (pid {pid}) did not stop; killed")
                os.kill(pid, signal.SIGKILL)
                process.join()
            elif process.exitcode != 0:
                warnings.append(f"the SyncManager (pid {pid}) ended with exit code {process.exitcode}")
            self.syncmanager = None
        return warnings + super().close()


# -- the four locks, behind one interface --------------------------------------------
#
# A backend object is made in this process; a forked child calls .child() to
# get one it may use (its own connections). prepare(key) runs in this process
# before forking: only multiprocessing needs it, its locks live in the
# SyncManager and are reached through proxies made by the process that asked
# for them.


class ClusterShm:
    name = "clustershm"

    def child(self):
        return self  # django_clustershm reconnects in a forked child by itself (register_at_fork)

    def prepare(self, key: str) -> None:
        pass

    def lock(self, key: str, lease: float | None = None):
        return django_clustershm.Lock(key, lease=lease)

    def acquire(self, lock, timeout: float | None = None) -> bool:
        return lock.acquire(timeout=timeout)

    def warm(self) -> None:
        django_clustershm.ping()

    def read(self) -> int:
        return django_clustershm.get(COUNTER)

    def write(self, value: int) -> None:
        django_clustershm.set(COUNTER, value)


class Redis:
    name = "redis"

    def __init__(self, path: str) -> None:
        import redis

        self.path = path
        self.r = redis.Redis(unix_socket_path=path)

    def child(self):
        return Redis(self.path)

    def prepare(self, key: str) -> None:
        pass

    def lock(self, key: str, lease: float | None = None):
        return self.r.lock(key, timeout=lease)  # redis.lock.Lock; default sleep=0.1 between tries

    def acquire(self, lock, timeout: float | None = None) -> bool:
        return lock.acquire(blocking=True, blocking_timeout=timeout)

    def warm(self) -> None:
        self.r.ping()

    def read(self) -> int:
        return int(self.r.get(COUNTER))

    def write(self, value: int) -> None:
        self.r.set(COUNTER, value)


class DiskCache:
    name = "diskcache"

    def __init__(self, directory: str, create: bool = False) -> None:
        import diskcache

        self.directory = directory
        self.cache = diskcache.Cache(directory, eviction_policy="none") if create else diskcache.Cache(directory)

    def child(self):
        return DiskCache(self.directory)  # the same cache directory, this process's own connection

    def prepare(self, key: str) -> None:
        pass

    def lock(self, key: str, lease: float | None = None):
        import diskcache

        return diskcache.Lock(self.cache, key, expire=lease)  # spins with 1 ms sleeps

    def acquire(self, lock, timeout: float | None = None) -> bool:
        lock.acquire()  # no timeout in diskcache.Lock: the parent gives up on a stuck waiter
        return True

    def warm(self) -> None:
        self.cache.get("bench:locks:warm")

    def read(self) -> int:
        return self.cache.get(COUNTER)

    def write(self, value: int) -> None:
        self.cache.set(COUNTER, value)

    def close(self) -> None:
        self.cache.close()


class MultiProcessing:
    name = "multiprocessing"

    def __init__(self, manager) -> None:
        self.manager = manager
        self.locks: dict = {}
        self.value = manager.Value("i", 0)

    def child(self):
        # A proxy keeps one connection per thread, reset after a fork only for
        # children that multiprocessing starts itself; for an os.fork() child
        # run the same after-fork hooks, so that this child opens its own
        # connections instead of using this process's.
        import multiprocessing.util

        multiprocessing.util._run_after_forkers()
        return self

    def prepare(self, key: str) -> None:
        self.locks[key] = self.manager.Lock()

    def lock(self, key: str, lease: float | None = None):
        if key not in self.locks:
            self.prepare(key)
        return self.locks[key]

    def acquire(self, lock, timeout: float | None = None) -> bool:
        return lock.acquire(True, timeout)

    def warm(self) -> None:
        self.value.value  # noqa: B018 - one round trip opens this thread's connection

    def read(self) -> int:
        return self.value.value

    def write(self, value: int) -> None:
        self.value.value = value


# -- phase 1: uncontended latency -----------------------------------------------------


def _latency_op(backend, key: str):
    lock = backend.lock(key)
    acquire, release = lock.acquire, lock.release

    def op():
        acquire()
        release()

    return op


def phase_latency(backends: dict, n: int, warmup: int) -> dict:
    ops = {name: _latency_op(b, "bench:locks:latency") for name, b in backends.items()}
    results = summarise_us(time_interleaved(ops, n, warmup, BLOCK))
    base = results["redis"]["median_us"]
    for row in results.values():
        row["ratio_to_redis"] = row["median_us"] / base
    return results


# -- phase 2: locked read-modify-write ------------------------------------------------


def _rmw_worker(backend, key: str, seconds: float, out_w: int, go_r: int, go_w: int) -> None:
    os.close(go_w)  # so that the parent closing its end is an EOF here
    b = backend.child()
    lock = b.lock(key)
    acquire, release, read, write = b.acquire, lock.release, b.read, b.write
    b.warm()
    _send(out_w, "ready")
    os.read(go_r, 1)  # EOF: the start signal
    clock = time.monotonic
    n = 0
    max_wait = 0.0
    start = clock()
    deadline = start + seconds
    while True:
        t0 = clock()
        if t0 >= deadline:
            break
        acquire(lock)
        waited = clock() - t0
        if waited > max_wait:
            max_wait = waited
        write(read() + 1)
        release()
        n += 1
    elapsed = clock() - start
    _send(out_w, json.dumps({"increments": n, "elapsed": elapsed, "max_wait": max_wait}))


def phase_rmw(backend, procs: int, seconds: float, problems: list) -> dict:
    key = "bench:locks:rmw"
    backend.prepare(key)
    backend.write(0)
    go_r, go_w = os.pipe()
    workers: list[tuple[int, _Lines]] = []
    try:
        for _ in range(procs):
            out_r, out_w = os.pipe()
            pid = fork(_rmw_worker, backend, key, seconds, out_w, go_r, go_w, child_signals=True)
            os.close(out_w)
            workers.append((pid, _Lines(out_r)))
        for pid, lines in workers:
            if lines.read(READY_TIMEOUT, "ready") != "ready":
                raise BenchError(f"worker {pid} did not get ready")
        os.close(go_w)
        go_w = -1
        reports = []
        for pid, lines in workers:
            reports.append(json.loads(lines.read(seconds + 60.0, "its result")))
    finally:
        if go_w >= 0:
            os.close(go_w)
        os.close(go_r)
        for pid, lines in workers:
            lines.close()
            status = reap(pid)
            if not exited_ok(status):
                problems.append(f"{backend.name} read-modify-write worker {pid} ended with {describe_status(status)}")
    total = sum(r["increments"] for r in reports)
    final = backend.read()
    longest = max(r["elapsed"] for r in reports)
    per_proc = [r["increments"] / r["elapsed"] for r in reports]
    return {
        "procs": procs,
        "seconds": longest,
        "increments": total,
        "final_counter": final,
        "lost_updates": total - final,
        "ops_per_s": total / longest,
        "per_process_ops_per_s": per_proc,
        "max_wait_ms": max(r["max_wait"] for r in reports) * 1e3,
    }


# -- phase 3: hand-over after SIGKILL -------------------------------------------------


def _holder(backend, key: str, lease: float | None, out_w: int) -> None:
    b = backend.child()
    lock = b.lock(key, lease)
    if not b.acquire(lock, 10.0):
        raise BenchError("the holder could not acquire a fresh lock")
    _send(out_w, f"held {time.monotonic()!r}")
    time.sleep(120.0)  # until SIGKILLed
    os._exit(3)  # not killed: the parent reports this exit code


def _waiter(backend, key: str, lease: float | None, wait: float | None, out_w: int) -> None:
    b = backend.child()
    lock = b.lock(key, lease)
    b.warm()  # connected: "waiting" means the acquire request goes out next
    _send(out_w, "waiting")
    granted = b.acquire(lock, wait)
    t = time.monotonic()
    _send(out_w, f"{'granted' if granted else 'timeout'} {t!r}")
    if granted:
        lock.release()


def _queued_in_manager(key: str, pid: int, timeout: float = 5.0) -> None:
    """Wait until the Manager lists ``pid`` as the one waiter for ``key``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for held in django_clustershm.stats()["locks"]["held"]:
            if held["key"] == key and held["waiters"] == [pid]:
                return
        time.sleep(0.001)
    raise BenchError(f"the waiter {pid} never showed up as queued for {key!r} in the Manager's stats")


def _handover_trial(backend, key: str, lease: float | None, wait: float | None, problems: list) -> dict:
    backend.prepare(key)
    holder = waiter = None
    holder_lines = waiter_lines = None
    result: dict = {}
    try:
        out_r, out_w = os.pipe()
        holder = fork(_holder, backend, key, lease, out_w, child_signals=True)
        os.close(out_w)
        holder_lines = _Lines(out_r)
        word, t_acquired = holder_lines.read(READY_TIMEOUT, "the holder's report").split()
        if word != "held":
            raise BenchError(f"the holder said {word!r}")
        out_r, out_w = os.pipe()
        waiter = fork(_waiter, backend, key, lease, wait, out_w, child_signals=True)
        os.close(out_w)
        waiter_lines = _Lines(out_r)
        if waiter_lines.read(READY_TIMEOUT, "the waiter's report") != "waiting":
            raise BenchError("the waiter did not report waiting")
        if backend.name == "clustershm":
            _queued_in_manager(key, waiter)
        else:
            time.sleep(0.2)
        t_kill = time.monotonic()
        os.kill(holder, signal.SIGKILL)
        try:
            word, t_done = waiter_lines.read((wait or 0.0) + STUCK, "the waiter's result").split()
        except TimeoutError:
            result = {"granted": False, "stuck": True}
        else:
            t_done = float(t_done)
            result = {
                "granted": word == "granted",
                "delay_ms": (t_done - t_kill) * 1e3,
                "from_acquire_ms": (t_done - float(t_acquired)) * 1e3,
                "kill_after_acquire_ms": (t_kill - float(t_acquired)) * 1e3,
            }
    finally:
        for lines in (holder_lines, waiter_lines):
            if lines is not None:
                lines.close()
        if holder is not None:
            status = reap(holder)
            if not _killed_by(status, signal.SIGKILL):
                problems.append(f"{backend.name} holder {holder} ended with {describe_status(status)}, not SIGKILL")
        if waiter is not None:
            status = reap(waiter, timeout=1.0 if result.get("stuck") else REAP_TIMEOUT)
            if not result.get("stuck") and not exited_ok(status):
                problems.append(f"{backend.name} waiter {waiter} ended with {describe_status(status)}")
    return result


def phase_handover(backend, trials: int, problems: list) -> dict:
    if backend.name == "clustershm":
        lease, wait, mechanism = None, 10.0, "holder's connection closes (no lease)"
    elif backend.name == "redis":
        lease, wait, mechanism = LEASE, 10.0, f"lease (timeout={LEASE:g} s) expires; waiter polls every 0.1 s"
    elif backend.name == "diskcache":
        lease, wait, mechanism = LEASE, None, f"key expires (expire={LEASE:g} s); waiter polls every 1 ms"
    else:
        lease, wait, mechanism = None, MP_WAIT, "none: the lock has no owner process"
        trials = 1
    runs = []
    for i in range(trials):
        runs.append(_handover_trial(backend, f"bench:locks:handover:{backend.name}:{i}", lease, wait, problems))
    out: dict = {"mechanism": mechanism, "lease_s": lease, "trials": trials, "runs": runs}
    granted = [r for r in runs if r.get("granted")]
    out["granted"] = len(granted)
    if granted:
        delays = sorted(r["delay_ms"] for r in granted)
        out["median_ms"] = statistics.median(delays)
        out["max_ms"] = delays[-1]
        out["median_from_acquire_ms"] = statistics.median(r["from_acquire_ms"] for r in granted)
    if backend.name == "multiprocessing":
        out["waiter_timeout_s"] = wait
        # The lock is still held by a process that no longer exists.
        lock = backend.lock(f"bench:locks:handover:{backend.name}:0")
        out["still_locked_after"] = not lock.acquire(False)
        if not out["still_locked_after"]:
            lock.release()
    return out


# -- the report ---------------------------------------------------------------------


def _table_latency(results: dict) -> str:
    lines = ["| lock | median (µs) | p99 (µs) | median / redis-py |", "|---|---:|---:|---:|"]
    for name, row in results.items():
        lines.append(
            f"| {LABELS[name]} | {row['median_us']:.1f} | {row['p99_us']:.1f} | {row['ratio_to_redis']:.2f}x |"
        )
    return "\n".join(lines)


def _median_round(runs: list[dict]) -> dict:
    """The median run by ops/s (the lower middle one for an even count), with
    every round's ops/s, and the lost updates of all rounds, kept beside it."""
    ordered = sorted(runs, key=lambda r: r["ops_per_s"])
    row = dict(ordered[(len(ordered) - 1) // 2])
    row["rounds_ops_per_s"] = [r["ops_per_s"] for r in runs]
    row["lost_updates_all_rounds"] = sum(r["lost_updates"] for r in runs)
    return row


def _table_rmw(results: dict) -> str:
    base = results["diskcache"]["ops_per_s"]
    lines = [
        "| lock | ops/s (median round) | ops/s / diskcache | range over the rounds | increments | final counter "
        "| lost updates (all rounds) | slowest / fastest process (ops/s) | longest lock wait (ms) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, row in results.items():
        ratio = f"{row['ops_per_s'] / base:.2f}x" if base else "n/a"
        per = row["per_process_ops_per_s"]
        spread = row["rounds_ops_per_s"]
        lines.append(
            f"| {LABELS[name]} | {row['ops_per_s']:,.0f} | {ratio} | {min(spread):,.0f} - {max(spread):,.0f} "
            f"| {row['increments']:,} | {row['final_counter']:,} | {row['lost_updates_all_rounds']} "
            f"| {min(per):,.0f} / {max(per):,.0f} | {row['max_wait_ms']:.1f} |"
        )
    return "\n".join(lines)


def _table_handover(results: dict) -> str:
    lines = [
        "| lock | recovery | granted / trials | median after SIGKILL (ms) | max (ms) "
        "| median from holder's acquire (ms) |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for name, row in results.items():
        if row["granted"]:
            median, worst = f"{row['median_ms']:.1f}", f"{row['max_ms']:.1f}"
            whole = f"{row['median_from_acquire_ms']:.1f}"
        elif name == "multiprocessing":
            median, worst, whole = f"never (timed out after {row['waiter_timeout_s']:g} s)", "-", "-"
        else:
            median, worst, whole = "never", "-", "-"
        lines.append(
            f"| {LABELS[name]} | {row['mechanism']} | {row['granted']} / {row['trials']} "
            f"| {median} | {worst} | {whole} |"
        )
    return "\n".join(lines)


def _targets(latency: dict, rmw: dict, handover: dict) -> dict:
    lat = latency["clustershm"]["median_us"] / latency["redis"]["median_us"]
    thr = rmw["clustershm"]["ops_per_s"] / rmw["diskcache"]["ops_per_s"]
    shm = handover["clustershm"]
    hand = shm.get("median_ms") if shm["granted"] == shm["trials"] else None
    return {
        "acquire_release_median_vs_redis": {"ratio": lat, "max": TARGET_LATENCY, "met": lat <= TARGET_LATENCY},
        "rmw_ops_vs_diskcache": {"ratio": thr, "min": TARGET_RMW, "met": thr >= TARGET_RMW},
        "handover_after_sigkill_median_ms": {
            "median_ms": hand,
            "max_ms": TARGET_HANDOVER_MS,
            "met": hand is not None and hand < TARGET_HANDOVER_MS,
        },
    }


def _target_lines(targets: dict, latency: dict, rmw: dict) -> list[str]:
    def verdict(t):
        return "PASS" if t["met"] else "FAIL"

    t1 = targets["acquire_release_median_vs_redis"]
    t2 = targets["rmw_ops_vs_diskcache"]
    t3 = targets["handover_after_sigkill_median_ms"]
    hand = "not every trial was granted" if t3["median_ms"] is None else f"{t3['median_ms']:.1f} ms"
    return [
        f"- {verdict(t1)}: clustershm acquire+release median {latency['clustershm']['median_us']:.1f} µs = "
        f"{t1['ratio']:.3f}x redis-py's {latency['redis']['median_us']:.1f} µs (target <= {TARGET_LATENCY}x)",
        f"- {verdict(t2)}: clustershm locked read-modify-write {rmw['clustershm']['ops_per_s']:,.0f} ops/s = "
        f"{t2['ratio']:.3f}x diskcache's {rmw['diskcache']['ops_per_s']:,.0f} ops/s (target >= {TARGET_RMW:g}x)",
        f"- {verdict(t3)}: clustershm median hand-over after SIGKILL {hand} (target < {TARGET_HANDOVER_MS:g} ms)",
    ]


def _versions(lab: Lab) -> str:
    parts = package_versions(("redis", "hiredis", "diskcache"), missing=None)
    parts.append(f"redis-server {lab.versions.get('redis-server', '?')}")
    return ", ".join(parts)


# -- main --------------------------------------------------------------------------


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=5000, help="timed acquire+release pairs per lock (default 5000)")
    parser.add_argument("--warmup", type=int, default=500, help="untimed pairs per lock first (default 500)")
    parser.add_argument("--seconds", type=float, default=3.0, help="duration of each read-modify-write run (default 3)")
    parser.add_argument("--procs", type=int, default=4, help="processes in the read-modify-write runs (default 4)")
    parser.add_argument("--rounds", type=int, default=3, help="read-modify-write rounds per lock; the median counts (default 3)")
    parser.add_argument("--trials", type=int, default=20, help="hand-overs after SIGKILL per lock (default 20)")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON to PATH")
    args = parser.parse_args(argv)
    if args.n < 1 or args.warmup < 0 or args.seconds <= 0 or args.procs < 1 or args.trials < 1 or args.rounds < 1:
        parser.error("--n, --procs, --trials and --rounds must be >= 1, --warmup >= 0, --seconds > 0")

    started = time.perf_counter()
    lab = Lab()
    problems: list[str] = []
    backends: dict = {}
    try:
        log(f"temp dir {lab.tmpdir}: starting the Manager, redis-server, the SyncManager")
        lab.start_manager()
        lab.start_redis()
        lab.start_syncmanager()
        backends = {
            "clustershm": ClusterShm(),
            "redis": Redis(lab.redis_path),
            "diskcache": DiskCache(lab.diskcache_dir, create=True),
            "multiprocessing": MultiProcessing(lab.syncmanager),
        }

        log(f"phase 1: uncontended acquire+release, N={args.n} per lock")
        latency = phase_latency(backends, args.n, args.warmup)

        rounds: dict = {name: [] for name in backends}
        for r in range(args.rounds):
            for name, backend in backends.items():
                log(
                    f"phase 2, round {r + 1}/{args.rounds}: locked read-modify-write, "
                    f"{args.procs} processes x {args.seconds:g} s: {LABELS[name]}"
                )
                rounds[name].append(phase_rmw(backend, args.procs, args.seconds, problems))
        rmw = {name: _median_round(runs) for name, runs in rounds.items()}

        handover = {}
        for name, backend in backends.items():
            log(f"phase 3: hand-over after SIGKILL: {LABELS[name]}")
            handover[name] = phase_handover(backend, args.trials, problems)
        versions = _versions(lab)
    except (BenchError, TimeoutError) as exc:
        log(f"error: {exc}")
        return 2
    finally:
        if "diskcache" in backends:
            backends["diskcache"].close()
        warnings = lab.close()
        for w in warnings:
            log(f"warning: {w}")
        problems.extend(warnings)
        for p in problems:
            if p not in warnings:
                log(f"problem: {p}")
    elapsed = time.perf_counter() - started

    targets = _targets(latency, rmw, handover)
    cpus = sorted(os.sched_getaffinity(0))
    print(
        f"Locks: N={args.n} uncontended pairs per lock after {args.warmup} warm-up; {args.procs} processes x "
        f"{args.seconds:g} s of locked read-modify-write; {args.trials} hand-overs after SIGKILL. "
        f"Python {platform.python_version()}, {os.cpu_count()} CPUs (allowed: {cpus}), {versions}; {elapsed:.1f}s"
    )
    print()
    print("### 1. Uncontended acquire + release, one process")
    print()
    print(_table_latency(latency))
    print()
    print(
        f"### 2. Locked read-modify-write of a shared counter, {args.procs} processes, {args.seconds:g} s, "
        f"median of {args.rounds} rounds"
    )
    print()
    print(_table_rmw(rmw))
    print()
    print("### 3. Hand-over to a blocked waiter after the holder is SIGKILLed")
    print()
    print(_table_handover(handover))
    mp = handover.get("multiprocessing", {})
    if "still_locked_after" in mp:
        print()
        print(
            "multiprocessing: after the waiter gave up, a try-acquire "
            + ("still fails: the lock stays held by the dead process." if mp["still_locked_after"] else "succeeded.")
        )
    print()
    print("### Targets")
    print()
    for line in _target_lines(targets, latency, rmw):
        print(line)
    if problems:
        print()
        print("Problems: " + "; ".join(problems))

    if args.json:
        report = {
            "benchmark": "bench_locks",
            "n": args.n,
            "warmup": args.warmup,
            "seconds": args.seconds,
            "procs": args.procs,
            "rounds": args.rounds,
            "trials": args.trials,
            "python": platform.python_version(),
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "allowed_cpus": cpus,
            "versions": versions,
            "elapsed_s": elapsed,
            "latency": latency,
            "rmw": rmw,
            "handover": handover,
            "targets": targets,
            "problems": problems,
        }
        write_json(args.json, report)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
