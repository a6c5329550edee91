"""Snapshot and restore times, and the Manager's longest loop round while a forked writer snapshots it (#13).

(a) In this process, on an Engine holding N keys (half in the store without expiry, half in a named cache with a
300 s timeout; each value the pickle of a short str, as in bench_memory.py): the time to write the snapshot file
(what a graceful stop adds), to read and check it, and to restore it into an empty Engine (what a start adds).
(b) A Manager in a fresh interpreter holding the same N keys, with a client hammering it (a get and a set of an
existing key, over and over, so that the parent's pages are copied on write while the child writes): a periodic
snapshot is triggered (SIGUSR1 -> Manager.request_snapshot()); the figures are the fork, the writer child's time,
the loop's longest round from the fork until the child's end (stats()["snapshot"]["last"]["max_stall_ms"]), the
loop's max_stall_ms ever before and after, and the client's slowest call during the snapshot. Target: the
longest round at most 50 ms.

The script drives the engine and the snapshot module (django_clustershm.server.snapshot), not only the public API.
"""

from __future__ import annotations

import json
import os
import pickle
import signal
import statistics
import sys
import time

import lab
from lab import clustershm

CACHE = "bench-sessions"
TIMEOUT = 300
BATCH = 1000
TARGET_STALL_MS = 50.0
LABELS = {"file": "(a) write, read and restore in this process", "fork": "(b) the forked writer in a Manager"}

#: The Manager process: a fresh interpreter (its RSS holds nothing of this script); snapshots to argv[3] on SIGUSR1
#: (no INTERVAL: only when asked); stops on SIGTERM (which writes the last snapshot, as a server's stop does).
MANAGER = """\
import signal, sys
from django_clustershm import Manager
from django_clustershm.server.engine import Engine
from django_clustershm.server.snapshot import SnapshotConfig
with open(sys.argv[2], "rb") as fh:
    secret = fh.read()
engine = Engine(max_store_bytes=2**36, max_cache_bytes=2**36, max_total_cache_bytes=2**36)
manager = Manager(sys.argv[1], secret, engine=engine, snapshot=SnapshotConfig(sys.argv[3]))
signal.signal(signal.SIGTERM, lambda signum, frame: manager.request_stop())
signal.signal(signal.SIGUSR1, lambda signum, frame: manager.request_snapshot())
try:
    manager.serve_forever()
finally:
    manager.close()
"""


def _items(kind: str, start: int, stop: int) -> dict:
    key = "user:{:07d}" if kind == "store" else ":1:user:{:07d}"
    return {key.format(i): f"value-{i}" for i in range(start, stop)}


def rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise lab.BenchError(f"no VmRSS for pid {pid}")


# -- (a) in this process ---------------------------------------------------------------------


def file_case(n: int, path: str) -> dict:
    from django_clustershm.server import snapshot as S

    def engine():
        return clustershm.Engine(max_store_bytes=2**36, max_cache_bytes=2**36, max_total_cache_bytes=2**36)

    source = engine()
    cache = source._space_for_write(CACHE, [2 * n, 3, 2**36])[0]
    for key, value in _items("store", 0, n // 2).items():
        source.store.set(key, pickle.dumps(value))
    for key, value in _items("cache", 0, n - n // 2).items():
        cache.set(key, pickle.dumps(value), TIMEOUT)
    with lab.gc_paused():
        t0 = time.perf_counter()
        entries, size = S.write(source, path)
        t1 = time.perf_counter()
        snap = S.read(path)
        t2 = time.perf_counter()
        target = engine()
        counts = target.restore(snap.spaces, snap.age)
        t3 = time.perf_counter()
    if entries != n or counts["restored"] != n or len(target.store) + len(target.caches[CACHE]) != n:
        raise lab.BenchError(f"{n} keys: wrote {entries}, restored {counts}")
    if target.store.bytes != source.store.bytes or target.caches[CACHE].bytes != cache.bytes:
        raise lab.BenchError(f"{n} keys: the restored accounting differs")
    os.unlink(path)
    return {"n": n, "bytes": size, "write_s": t1 - t0, "read_s": t2 - t1, "restore_s": t3 - t2, "start_s": t3 - t1}


# -- (b) the forked writer in a Manager process ---------------------------------------------------


def _load(address: str, secret: bytes, n: int, w: int) -> None:
    """The client that keeps the Manager busy: a get and a set of existing keys until SIGTERM; its slowest calls."""
    lab.stop_on_sigterm()
    client = clustershm.connect(address, secret)
    cache = client.cache(CACHE, max_entries=2 * n, max_bytes=2**36)
    keys = list(_items("store", 0, n // 2))
    worst = calls = 0
    lab.send(w, "ready")
    clock = time.perf_counter
    i = 0
    try:
        while True:
            key = keys[(i * 7919) % len(keys)]
            t0 = clock()
            client.get(key)
            client.set(key, f"new-{i}")
            cache.get(":1:" + key)
            took = clock() - t0
            worst = max(worst, took)
            calls += 1
            i += 1
    except lab.Stop:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # one is enough: report
    lab.send(w, json.dumps({"calls": calls, "worst_ms": worst * 1000}))


def fork_case(n: int, rounds: int, versions: dict) -> list[dict]:
    with lab.Lab("snapshot") as bench:
        address, secret = bench.path("manager.sock"), os.urandom(32)
        secret_path, snap_path = bench.path("secret"), bench.path("state.snap")
        with open(os.open(secret_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb") as fh:
            fh.write(secret)
        package_root = os.path.dirname(os.path.dirname(os.path.abspath(clustershm.__file__)))
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")]))}

        def probe() -> bool:
            client = clustershm.connect(address, secret, timeout=1.0)
            try:
                return client.ping()
            except clustershm.ClusterShmError:
                return False
            finally:
                client.close()

        proc = bench.spawn("manager", [sys.executable, "-c", MANAGER, address, secret_path, snap_path], probe, env=env)
        client = clustershm.connect(address, secret)
        bench.cleanups.append(client.close)
        cache = client.cache(CACHE, max_entries=2 * n, max_bytes=2**36)
        t0 = time.perf_counter()
        for start in range(0, n // 2, BATCH):
            client.set_many(_items("store", start, min(n // 2, start + BATCH)))
        for start in range(0, n - n // 2, BATCH):
            cache.set_many(_items("cache", start, min(n - n // 2, start + BATCH)), TIMEOUT)
        load_s = time.perf_counter() - t0
        stats = client.stats()
        if stats["store"]["keys"] + stats["caches"][CACHE]["keys"] != n:
            raise lab.BenchError(f"the Manager holds {stats['store']['keys']} + {stats['caches'][CACHE]['keys']} keys")
        results = []
        for rnd in range(rounds):
            loader, lines = lab.child(_load, address, secret, n)
            stopped = False
            try:
                lines.read(lab.READY_TIMEOUT, "word that the load started")
                time.sleep(0.5)
                before = client.stats()
                written = before["snapshot"]["written"]
                os.kill(proc.pid, signal.SIGUSR1)
                deadline = time.monotonic() + 600
                while (after := client.stats())["snapshot"]["written"] == written:
                    if after["snapshot"]["failed"] or time.monotonic() > deadline:
                        raise lab.BenchError(f"the snapshot failed: {after['snapshot']['last_error']}")
                    time.sleep(0.05)
                os.kill(loader, signal.SIGTERM)
                stopped = True
                load = json.loads(lines.read(30, "the load's figures"))
            finally:
                lines.close()
                rc = lab.reap(loader, term=not stopped)
            if rc != 0:
                raise lab.BenchError(f"the load client ended with {lab.describe(rc)}")
            last = after["snapshot"]["last"]
            results.append({"n": n, "round": rnd, "load_s": load_s, "rss": rss(proc.pid), "entries": last["entries"],
                            "bytes": last["bytes"], "fork_ms": last["fork_ms"], "child_s": last["seconds"],
                            "snapshot_max_stall_ms": last["max_stall_ms"],
                            "loop_max_stall_before_ms": before["loop"]["max_stall_ms"],
                            "loop_max_stall_after_ms": after["loop"]["max_stall_ms"],
                            "load_calls": load["calls"], "load_worst_ms": load["worst_ms"]})  # fmt: skip
            lab.log(f"  round {rnd + 1}: {json.dumps(results[-1])}")
            if last["entries"] != n:
                raise lab.BenchError(f"the snapshot has {last['entries']} entries, not {n}")
        warnings = bench.stop("manager")
        if warnings:
            raise lab.BenchError("; ".join(warnings))
        from django_clustershm.server import snapshot as S

        if S.read(snap_path).entries != n:
            raise lab.BenchError("the snapshot written at stop does not hold every key")
    return results


# -- the report ------------------------------------------------------------------------------


def _med(runs: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in runs)


def main(argv=None) -> int:
    args = lab.options(__doc__, argv, {"sizes": "100000", "rounds": 1}, LABELS,
                       sizes=(str, None, "comma-separated key counts (default 100000,1000000; --quick: 100000)"),
                       rounds=(lab.count, 3, "rounds of each measurement"))  # fmt: skip
    try:
        sizes = [int(s) for s in (args.sizes or "100000,1000000").split(",") if s.strip()]
    except ValueError:
        raise lab.BenchError(f"--sizes: not a list of integers: {args.sizes!r}") from None
    load_before = os.getloadavg()[0]
    files: list[dict] = []
    forks: list[dict] = []
    versions: dict = {}
    with lab.Lab("snapshot-file") as bench:
        for n in sizes:
            if "file" in args.selected:
                for rnd in range(args.rounds):
                    lab.log(f"(a) {n:,} keys, round {rnd + 1}/{args.rounds}")
                    files.append(file_case(n, bench.path("state.snap")))
                    lab.log(f"  {json.dumps(files[-1])}")
            if "fork" in args.selected:
                lab.log(f"(b) {n:,} keys, {args.rounds} snapshot(s) under load")
                forks += fork_case(n, args.rounds, versions)
    load = (load_before, os.getloadavg()[0])
    text = [lab.header(f"django-clustershm snapshots: {args.rounds} round(s), {bench.elapsed:.0f}s", versions)]
    report: dict = {"sizes": sizes, "loadavg_1min": load, "file": files, "fork": forks}
    checks, headlines = {}, {}
    if files:
        rows = []
        for n in sizes:
            runs = [r for r in files if r["n"] == n]
            rows.append([f"{n:,}", lab.fmt(_med(runs, "bytes") / 2**20), lab.fmt(_med(runs, "write_s"), 2),
                         lab.fmt(_med(runs, "read_s"), 2), lab.fmt(_med(runs, "restore_s"), 2),
                         lab.fmt(_med(runs, "start_s"), 2)])  # fmt: skip
            headlines[f"write {n:,} keys (s)"] = (_med(runs, "write_s"), "lower")
            headlines[f"read and restore {n:,} keys (s)"] = (_med(runs, "start_s"), "lower")
        text.append(lab.table(["keys", "file (MiB)", "write at stop (s)", "read and check (s)", "restore (s)",
                               "start: read + restore (s)"], rows,
                              title="(a) In this process, median over the rounds"))  # fmt: skip
    if forks:
        rows = []
        for n in sizes:
            runs = [r for r in forks if r["n"] == n]
            stalls = [r["snapshot_max_stall_ms"] for r in runs]
            rows.append([f"{n:,}", lab.fmt(_med(runs, "rss") / 2**20), lab.fmt(_med(runs, "fork_ms")),
                         lab.fmt(_med(runs, "child_s"), 2), lab.fmt(statistics.median(stalls)),
                         f"{lab.fmt(min(stalls))} - {lab.fmt(max(stalls))}",
                         lab.fmt(_med(runs, "loop_max_stall_before_ms")), lab.fmt(_med(runs, "loop_max_stall_after_ms")),
                         lab.fmt(_med(runs, "load_worst_ms"))])  # fmt: skip
            checks[f"stall {n}"] = (f"{n:,} keys: the loop's longest round during a forked snapshot, worst of "
                                    f"{len(runs)}: {lab.fmt(max(stalls))} ms (target <= {TARGET_STALL_MS:g} ms)",
                                    max(stalls), TARGET_STALL_MS)  # fmt: skip
            headlines[f"snapshot stall {n:,} keys (ms)"] = (max(stalls), "lower")
        text.append(lab.table(["keys", "Manager RSS (MiB)", "fork (ms)", "writer child (s)",
                               "longest round during the snapshot (ms)", "range", "loop max_stall_ms before",
                               "after", "load: slowest call (ms)"], rows,
                              title="(b) A periodic snapshot by a forked writer, under load, median over the rounds"))  # fmt: skip
        text.append(f"The 1-minute load average was {load[0]:.1f} before the run and {load[1]:.1f} after it, on "
                    f"{os.cpu_count()} CPUs.")  # fmt: skip
    if checks:
        targets_text, report["targets"] = lab.targets("Targets", checks)
        text.append(targets_text)
    failed = any(t["met"] is False for t in report.get("targets", {}).values())
    return lab.finish(args, bench, text, report, headlines, failed=failed)


if __name__ == "__main__":
    lab.run(main)
