"""Memory per key against Redis, and the Manager's longest loop stall while it forgets a dead client.

(a) For N small keys in the shared store (no expiry) and in a named cache (Django's key and pickle, a 300 s
timeout): the Manager process's RSS growth per key next to redis-server's used_memory (and RSS) growth for the same
keys and the same value bytes, and the Manager's own accounting (stats() "bytes") per key. Target: RSS at most
1.5x Redis' used_memory. Also the Manager's longest loop round while it took the keys (stats()'s max_stall_ms, wall
time: a dict's resize was one such round, #12) and its longest full garbage collection. (b) A child holding 100k locks, 100k keys read through its near cache (which the Manager
keeps nothing for since stamps) and 10k prefix listeners is SIGKILLed: the Manager's longest loop round while it closes
the child's connections, once the setup's own rounds have left the Manager's stall window. Target: at most 50 ms.
"""

from __future__ import annotations

import json
import math
import os
import signal
import socket
import statistics
import sys
import time

import lab
from lab import clustershm

BATCH = 1000  # keys per set_many / get_many / Redis pipeline
CACHE = "bench-memory"  # the named cache of the cache case (a Django cache LOCATION)
NEAR = "bench-near"  # the named cache the stall child reads through its near cache
TIMEOUT = 300  # seconds: Django's default cache timeout, and EX in Redis
SETTLE_S = 1.0  # seconds after loading before RSS and used_memory are read
WARM = 1000  # keys written and deleted before the baseline (first-use buffers belong to the empty figure)
TARGET_RATIO = 1.5  # Manager RSS per key over Redis used_memory per key
TARGET_STALL_MS = 50.0
#: The Manager's recent_max_stall_ms is the longest round of the current and the previous window of 60 periodic
#: checks, about a second apart (manager.py, _stall_window): the setup's stalls leave it at the second window end
#: after the setup (seen 120 s after a Manager started, for a setup in its first minute). DRIFT: how late 60 checks
#: may run, at most.
WINDOW_S, DRIFT = 60.0, 1.03
PARTS = ("locks", "tracked", "listeners", "all")
LABELS = {"memory": "(a) memory per key", "stall": "(b) loop stall during a close"}

#: The Manager process: a fresh interpreter, so that its RSS holds nothing of this script (a forked child's pages,
#: and the free space in them its allocator would reuse, would hide part of the growth). Stops on SIGTERM. A process
#: that only serves a Manager, as runcluster's master is: it owns the process's garbage collector (own_gc, #12), on a
#: tree that has it.
MANAGER = """\
import inspect, signal, sys
from django_clustershm import Manager
with open(sys.argv[2], "rb") as fh:
    secret = fh.read()
own_gc = {"own_gc": True} if "own_gc" in inspect.signature(Manager).parameters else {}
manager = Manager(sys.argv[1], secret, **own_gc)
signal.signal(signal.SIGTERM, lambda signum, frame: manager.request_stop())
try:
    manager.serve_forever()
finally:
    manager.close()
"""


def rss(pid: int) -> int:
    """Resident set size of process ``pid`` in bytes (VmRSS of /proc/PID/status)."""
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise lab.BenchError(f"no VmRSS for pid {pid}")


def schedstat(pid: int) -> tuple[int, int]:
    """Nanoseconds process ``pid``'s main thread (the Manager's loop) has run on a CPU, and has waited for one
    while runnable (/proc/PID/schedstat): what a round's wall time is made of on a busy machine."""
    with open(f"/proc/{pid}/schedstat") as fh:
        ran, waited, _ = fh.read().split()
    return int(ran), int(waited)


def start_manager(bench: lab.Lab, name: str):
    """A Manager in a fresh process on a socket in the lab's temp dir, stopped by ``bench.close()``:
    its pid, a client of it, and when it answered (time.monotonic)."""
    address, secret = bench.path(f"{name}.sock"), os.urandom(32)
    secret_path = bench.path(f"{name}.secret")
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

    proc = bench.spawn(name, [sys.executable, "-c", MANAGER, address, secret_path], probe, env=env)
    ready = time.monotonic()
    client = clustershm.connect(address, secret)
    bench.cleanups.append(client.close)
    return proc.pid, client, ready, address, secret


# -- (a) memory per key ---------------------------------------------------------------------


def _items(kind: str, start: int, stop: int) -> dict:
    """The keys and values of one batch: the store's ``user:0000123``, the cache's ``:1:user:0000123`` (what
    Django's make_key gives for version 1); the value a short str (its pickle, ~22-27 bytes, is what is stored)."""
    key = "user:{:07d}" if kind == "store" else ":1:user:{:07d}"
    return {key.format(i): f"value-{i}" for i in range(start, stop)}


def memory_case(kind: str, n: int, batch: int, versions: dict) -> dict:
    """One fresh Manager and one fresh redis-server: the growth of each when ``n`` keys are loaded."""
    import redis

    with lab.Lab("memory") as bench:
        pid, client, *_ = start_manager(bench, "manager")
        r = redis.Redis(unix_socket_path=bench.start_redis())
        bench.cleanups.append(r.close)
        redis_pid = bench.servers["redis-server"].pid
        versions.update(bench.versions)
        # A Django cache with MAX_ENTRIES and MAX_BYTES (default 128 MiB) above what the run stores: nothing culled.
        space = client if kind == "store" else client.cache(CACHE, max_entries=2 * n, max_bytes=2**34)
        ttl = None if kind == "store" else TIMEOUT
        dumps, max_value = client.serializer.dumps, client.limits.max_value  # the very bytes our client sends

        # Loaded over a socket of its own in Redis' protocol (redis-py's pipelines took 15-20 s per million keys).
        loader = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        loader.connect(bench.redis_path)
        bench.cleanups.append(loader.close)
        tail = b"\r\n" if ttl is None else b"\r\n$2\r\nEX\r\n$%d\r\n%d\r\n" % (len(str(ttl)), ttl)
        head = b"*3\r\n$3\r\nSET\r\n" if ttl is None else b"*5\r\n$3\r\nSET\r\n"

        def load_redis(items: dict) -> None:
            out = []
            for key, value in items.items():
                k, v = key.encode(), dumps(value, max_value)
                out += [head, b"$%d\r\n" % len(k), k, b"\r\n$%d\r\n" % len(v), v, tail]
            loader.sendall(b"".join(out))
            expect, got = b"+OK\r\n" * len(items), b""
            while len(got) < len(expect):
                chunk = loader.recv(65536)
                if not chunk:
                    raise lab.BenchError("redis-server closed the loading connection")
                got += chunk
            if got != expect:
                raise lab.BenchError(f"redis-server refused a SET: {got[:200]!r}")

        warm = {f"warm:{i}": "warm" for i in range(WARM)}
        space.set_many(warm, ttl)
        space.delete_many(list(warm))
        load_redis(warm)
        r.delete(*warm)

        def measure() -> dict:
            time.sleep(SETTLE_S)
            if not client.ping() or not r.ping():
                raise lab.BenchError("a server does not answer")
            stats, info = client.stats(), r.info("memory")
            ns = stats["store"] if kind == "store" else stats["caches"].get(CACHE, {"keys": 0, "bytes": 0})
            return {"rss": rss(pid), "accounted": ns["bytes"], "keys": ns["keys"], "redis_used": info["used_memory"],
                    "redis_rss": info["used_memory_rss"], "redis_rss_proc": rss(redis_pid), "redis_keys": r.dbsize(),
                    "max_stall_ms": stats["loop"]["max_stall_ms"], "full_gc_ms": _full_gc_ms(stats),
                    "full_gcs": _full_gcs(stats)}  # fmt: skip

        before = measure()
        value_bytes = 0
        t0 = time.perf_counter()
        for start in range(0, n, batch):
            space.set_many(_items(kind, start, min(n, start + batch)), ttl)
        t1 = time.perf_counter()
        for start in range(0, n, batch):
            items = _items(kind, start, min(n, start + batch))
            value_bytes += sum(len(dumps(v, max_value)) for v in items.values())
            load_redis(items)
        t2 = time.perf_counter()
        after = measure()
        if after["keys"] != n or after["redis_keys"] != n:
            found = f"{after['keys']} keys in the Manager, {after['redis_keys']} in Redis"
            raise lab.BenchError(f"{kind}: {found}, not {n}")
        probe = _items(kind, n - 1, n)
        (key, value), = probe.items()  # fmt: skip
        if space.get(key) != value or r.get(key) != dumps(value, max_value):
            raise lab.BenchError(f"{kind}: {key!r} does not read back the same from both")
        if ttl is not None and not 0 < r.ttl(key) <= TIMEOUT:
            raise lab.BenchError(f"{kind}: {key!r} has no expiry in Redis")
        per_key = {name: (after[name] - before[name]) / n for name in
                   ("rss", "accounted", "redis_used", "redis_rss", "redis_rss_proc")}  # fmt: skip
    if bench.warnings:
        raise lab.BenchError(f"{kind} {n}: " + "; ".join(bench.warnings))
    return {"kind": kind, "n": n, "value_bytes_mean": value_bytes / n, "load_s": t1 - t0, "redis_load_s": t2 - t1,
            "before": before, "after": after, "per_key": per_key, "load_max_stall_ms": after["max_stall_ms"],
            "load_full_gc_ms": after["full_gc_ms"],
            "ratio": per_key["rss"] / per_key["redis_used"] if per_key["redis_used"] > 0 else None}  # fmt: skip


# -- (b) the longest loop stall while the Manager forgets a SIGKILLed client -------------------------------------


def _stall_child(address: str, secret: bytes, part: str, counts: dict, w: int) -> None:
    """Body of the client that is killed: take its share of ``part``, say so, then wait for the SIGKILL."""
    client = clustershm.connect(address, secret)
    done = {}
    if part in ("locks", "all"):
        for i in range(counts["locks"]):
            if client.lock_acquire(f"bench:lock:{i:07d}", None, 0) is None:
                raise lab.BenchError(f"lock {i} was not granted")
    if part in ("tracked", "all"):
        n = counts["tracked"]
        # "always": every key read keeps a copy (the adaptive default keeps one from a key's second read).
        space = client.cache(
            NEAR, max_entries=2 * n + 1, max_bytes=2**32, near_cache=(2 * n + 1, 2**32, None, "always")
        )
        for start in range(0, n, BATCH):
            space.get_many([f"near:{i:07d}" for i in range(start, min(n, start + BATCH))])
        done["near_entries"] = client.near_stats().get(NEAR, {}).get("entries", 0)
    if part in ("listeners", "all"):
        # The Manager caps the subscriptions of one connection (1,024 today): a process with more listeners has more
        # clients, each its own listener connection. A new one is opened when the last one is refused.
        listener, connections = client, 1
        for i in range(counts["listeners"]):
            try:
                listener.listen(prefix=f"bench:evt:{i:06d}:", callback=_ignore)
            except clustershm.LimitExceeded:
                listener, connections = clustershm.connect(address, secret), connections + 1
                listener.listen(prefix=f"bench:evt:{i:06d}:", callback=_ignore)
        done["listener_connections"] = connections
    lab.send(w, json.dumps(done))
    while True:
        time.sleep(3600)


def _ignore(key, value, event) -> None:
    pass


def _full_gc_ms(stats: dict) -> float | None:
    """The Manager's longest full garbage collection so far (ms of CPU; 0 if none ran), when it times them (#12's
    own_gc); None on a tree that does not."""
    figures = stats.get("gc") or {}
    longest = figures.get("longest_ms")
    return longest[2] if longest else None


def _full_gcs(stats: dict) -> int | None:
    """How many full garbage collections the Manager's process ran so far (gc.get_stats(), on a tree that says)."""
    figures = stats.get("gc") or {}
    return figures["collections"][2] if "collections" in figures else None


class StallRun:
    """One Manager and its doomed client: set up now, closed (``close()``) later."""

    def __init__(self, bench: lab.Lab, part: str, rnd: int, counts: dict, wait: bool) -> None:
        self.bench, self.part, self.round, self.name = bench, part, rnd, f"manager-{part}-{rnd}"
        self.pid, self.client, self.ready, address, secret = start_manager(bench, self.name)
        if part in ("tracked", "all"):  # the keys the child reads, written here
            n = counts["tracked"]
            space = self.client.cache(NEAR, max_entries=2 * n + 1, max_bytes=2**32)
            for start in range(0, n, BATCH):
                space.set_many({f"near:{i:07d}": f"value-{i}" for i in range(start, min(n, start + BATCH))})
        self.child, lines = lab.child(_stall_child, address, secret, part, counts)
        self.reaped = False
        bench.cleanups.append(self._reap)
        try:
            self.child_report = json.loads(lines.read(600.0, f"setup of the {part} client"))
        finally:
            lines.close()
        stats = self.client.stats()
        self.setup_end = time.monotonic()
        self.setup = {"held_locks": stats["locks"]["held_count"], "tracked_pairs": stats["near"]["fills"],
                      "listeners": stats["listeners"]["subscriptions"], "setup_s": self.setup_end - self.ready,
                      "setup_max_stall_ms": stats["loop"]["max_stall_ms"],
                      "setup_full_gc_ms": _full_gc_ms(stats), **self.child_report}  # fmt: skip
        # The first window end after the setup (the Manager's loop started before `ready`), then the next one.
        first = math.floor((self.setup_end - self.ready + 0.5) / WINDOW_S) + 1
        self.due = self.ready + (first + 1) * WINDOW_S * DRIFT + 0.5 if wait else self.setup_end

    def _reap(self) -> list[str]:
        if not self.reaped:
            self.reaped = True
            lab.reap(self.child, timeout=2.0, term=True)
        return []

    def close(self, timeout: float = 60.0) -> dict:
        """SIGKILL the child at ``due``, wait until the Manager has forgotten it, read its loop figures."""
        if (left := self.due - time.monotonic()) > 0:
            lab.log(f"  waiting {left:.0f}s for the stall window of {self.name} to drop its setup")
            time.sleep(left)
        ran0, waited0 = schedstat(self.pid)
        os.kill(self.child, signal.SIGKILL)
        killed = time.monotonic()
        rc = lab.reap(self.child, timeout=10.0)
        self.reaped = True
        if rc != -signal.SIGKILL:
            raise lab.BenchError(f"the {self.part} client ended with {lab.describe(rc)}, not by the SIGKILL")
        # Its sockets are closed once it is reaped; a stats() call before the Manager has seen that would list
        # every held lock inside the window (stats() walks the lock table).
        time.sleep(0.05)
        polls = 0
        while True:
            polls += 1
            stats = self.client.stats()
            gone = (not any(c["pid"] == self.child for c in stats["clients"]) and stats["locks"]["held_count"] == 0
                    and stats["listeners"]["subscriptions"] == 0)  # fmt: skip
            if gone:
                break
            if time.monotonic() - killed > timeout:
                raise lab.BenchError(f"the Manager of the {self.part} run still holds the killed client's state")
            time.sleep(0.02)
        forgotten = time.monotonic() - killed
        ran1, waited1 = schedstat(self.pid)
        loop = stats["loop"]
        # What the Manager's CPU time over the close owes to the stats() polls: 10 more, measured.
        for _ in range(10):
            self.client.stats()
        per_poll = (schedstat(self.pid)[0] - ran1) / 10
        warnings = self.bench.stop(self.name)  # its memory back before the next run
        if warnings:
            raise lab.BenchError("; ".join(warnings))
        return {"part": self.part, "round": self.round, **self.setup, "forgotten_after_ms": forgotten * 1000,
                "close_stall_ms": loop["recent_max_stall_ms"], "max_stall_ms": loop["max_stall_ms"],
                "full_gc_ms": _full_gc_ms(stats), "full_gcs": _full_gcs(stats),
                "close_cpu_ms": max(0.0, ran1 - ran0 - polls * per_poll) / 1e6, "cpu_wait_ms": (waited1 - waited0) / 1e6,
                "polls": polls,
                "waited_s": killed - self.setup_end}  # fmt: skip


# -- the report ----------------------------------------------------------------------------


def _median_range(values: list, digits: int = 1) -> tuple[str, str]:
    if not values:
        return "-", "-"
    low, high = lab.fmt(min(values), digits), lab.fmt(max(values), digits)
    return lab.fmt(statistics.median(values), digits), f"{low} - {high}"


def _median_or_none(values: list):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def memory_report(cases: list[dict]) -> tuple[list[str], dict, dict]:
    groups: dict[tuple, list] = {}
    for case in cases:
        groups.setdefault((case["kind"], case["n"]), []).append(case)
    rows, summary, checks = [], {}, {}
    for (kind, n), runs in groups.items():
        med = {k: statistics.median(r["per_key"][k] for r in runs) for k in runs[0]["per_key"]}
        ratios = [r["ratio"] for r in runs if r["ratio"] is not None]
        ratio = statistics.median(ratios) if ratios else None
        name = f"{kind} {n:,}"
        summary[name] = {"per_key_median": med, "ratio_median": ratio, "runs": runs}
        rows.append([name, f"{statistics.median(r['value_bytes_mean'] for r in runs):.1f}", lab.fmt(med["rss"]),
                     _median_range([r["per_key"]["rss"] for r in runs])[1], lab.fmt(med["accounted"]),
                     lab.fmt_x(med["accounted"], med["rss"]), lab.fmt(med["redis_used"]), lab.fmt(med["redis_rss"]),
                     lab.fmt_x(ratio, 1), _median_range(ratios, 2)[1],
                     lab.fmt(statistics.median(r["load_max_stall_ms"] for r in runs)),
                     lab.fmt(_median_or_none([r["load_full_gc_ms"] for r in runs]))])  # fmt: skip
        checks[name] = (f"{name} keys: Manager RSS {lab.fmt(med['rss'])} B/key = {lab.fmt_x(ratio, 1)} Redis "
                        f"used_memory's {lab.fmt(med['redis_used'])} B/key (target <= {TARGET_RATIO:g}x)",
                        ratio, TARGET_RATIO)  # fmt: skip
    table = lab.table(["keys", "value (B)", "Manager RSS / key (B)", "range", "accounted / key (B)",
                       "accounted / RSS", "Redis used_memory / key (B)", "Redis RSS / key (B)",
                       "RSS / Redis used_memory", "range", "longest loop round while loading (ms)",
                       "longest full GC (ms of CPU)"], rows,
                      title="(a) Memory per key: growth after loading, median over the rounds")  # fmt: skip
    return [table], summary, checks


def stall_report(runs: list[dict], waited: bool) -> tuple[list[str], dict, dict]:
    rows, summary, checks = [], {}, {}
    for part in PARTS:
        mine = [r for r in runs if r["part"] == part]
        if not mine:
            continue
        close = [r["close_stall_ms"] for r in mine]
        med, spread = _median_range(close)
        first = mine[0]
        summary[part] = {"close_stall_ms": lab.rounds(close), "runs": mine}
        rows.append([part, f"{first['held_locks']:,}", f"{first['tracked_pairs']:,}", f"{first['listeners']:,}",
                     _median_range([r["setup_s"] for r in mine])[0], _median_range([r["setup_max_stall_ms"] for r in mine])[0],
                     med, spread, _median_range([r["close_cpu_ms"] for r in mine])[0],
                     _median_range([r["cpu_wait_ms"] for r in mine])[0],
                     _median_range([r["forgotten_after_ms"] for r in mine], 0)[0],
                     _median_range([r["max_stall_ms"] for r in mine])[0],
                     _median_range([r["full_gc_ms"] for r in mine if r.get("full_gc_ms") is not None])[0],
                     _median_range([r["full_gcs"] for r in mine if r.get("full_gcs") is not None], 0)[0]])  # fmt: skip
        what = "" if waited else " (setup's stalls included: run without the window wait)"
        cpu = lab.fmt(statistics.median(r["close_cpu_ms"] for r in mine))
        checks[part] = (f"{part}: longest loop round during the close, median {med} ms{what} (target <= "
                        f"{TARGET_STALL_MS:g} ms); the Manager's CPU time for the close {cpu} ms",
                        statistics.median(close), TARGET_STALL_MS)  # fmt: skip
        ever = statistics.median(r["max_stall_ms"] for r in mine)
        checks[f"{part} ever"] = (f"{part}: longest loop round of the whole run (setup and close), median "
                                  f"{lab.fmt(ever)} ms (target <= {TARGET_STALL_MS:g} ms)", ever, TARGET_STALL_MS)  # fmt: skip
    title = "(b) Longest loop round while the Manager closes a SIGKILLed client"
    title += ", median over the rounds" if waited else " (NOT waited for the window: setup stalls included)"
    table = lab.table(["held by the client", "locks held", "keys read into its near cache", "prefix listeners", "setup (s)",
                       "setup's longest round (ms)", "close: longest round (ms)", "range", "close: Manager CPU (ms)",
                       "close: Manager waiting for a CPU (ms)", "forgotten after (ms)",
                       "longest round of the run (ms)", "longest full GC (ms of CPU)", "full GCs in the process"],
                      rows, title=title)  # fmt: skip
    return [table], summary, checks


def main(argv=None) -> int:
    args = lab.options(__doc__, argv, {"sizes": "100000", "rounds": 1, "wait": 0}, LABELS,
                       sizes=(str, None, "comma-separated key counts of (a) (default 100000,1000000; --quick: 100000)"),
                       rounds=(lab.count, 3, "rounds of each measurement"),
                       batch=(lab.count, BATCH, "keys per set_many and per Redis pipeline"),
                       locks=(lab.count0, 100_000, "(b) locks the killed client holds"),
                       tracked=(lab.count0, 100_000, "(b) distinct cache keys it reads through its near cache"),
                       listeners=(lab.count0, 10_000, "(b) prefix listeners it registers"),
                       wait=(lab.count0, 1, "(b) 1: kill once the Manager's stall window holds nothing of the "
                             "setup (about 2 minutes); 0: at once (--quick)"))  # fmt: skip
    try:
        sizes = [int(s) for s in (args.sizes or "100000,1000000").split(",") if s.strip()]
    except ValueError:
        raise lab.BenchError(f"--sizes: not a list of integers: {args.sizes!r}") from None
    if "memory" in args.selected:
        lab.need(binaries=["redis-server"], modules=["redis"])
    counts = {"locks": args.locks, "tracked": args.tracked, "listeners": args.listeners}
    load_before = os.getloadavg()[0]
    versions: dict = {}
    cases: list[dict] = []
    closes: list[dict] = []
    with lab.Lab("stall") as bench:
        # (b) first: its runs are set up now and closed last, once each Manager's stall window has dropped the setup;
        # (a) runs meanwhile (the idle Managers wake once a second).
        pending: list[StallRun] = []
        if "stall" in args.selected:
            for rnd in range(args.rounds):
                for part in PARTS[rnd % len(PARTS) :] + PARTS[: rnd % len(PARTS)]:  # each part first once
                    lab.log(f"(b) round {rnd + 1}/{args.rounds}: setting up '{part}'")
                    run = StallRun(bench, part, rnd, counts, bool(args.wait))
                    lab.log(f"  {run.setup}")
                    pending.append(run)
        if "memory" in args.selected:
            for rnd in range(args.rounds):
                for n in sizes:
                    for kind in ("store", "cache"):
                        lab.log(f"(a) round {rnd + 1}/{args.rounds}: {kind}, {n:,} keys")
                        case = memory_case(kind, n, args.batch, versions)
                        lab.log(f"  per key: {json.dumps({k: round(v, 1) for k, v in case['per_key'].items()})}, "
                                f"load {case['load_s']:.1f}s (Redis {case['redis_load_s']:.1f}s)")  # fmt: skip
                        cases.append(case)
        for run in sorted(pending, key=lambda r: r.due):
            lab.log(f"(b) closing '{run.part}' of round {run.round + 1}")
            closes.append(run.close())
            c = closes[-1]
            lab.log(f"  {c['close_stall_ms']} ms (setup's longest {c['setup_max_stall_ms']} ms); Manager CPU "
                    f"{c['close_cpu_ms']:.1f} ms, waiting for a CPU {c['cpu_wait_ms']:.1f} ms")  # fmt: skip
    bench.versions.update(versions)

    text = [lab.header(f"django-clustershm memory per key and close stall: {args.rounds} round(s), {bench.elapsed:.0f}s",
                       bench.versions)]  # fmt: skip
    load = (load_before, os.getloadavg()[0])
    report: dict = {"sizes": sizes, "counts": counts, "waited_for_window": bool(args.wait), "loadavg_1min": load}
    checks, headlines = {}, {}
    if cases:
        part, report["memory"], more = memory_report(cases)
        text += part
        checks.update({f"memory {k}": v for k, v in more.items()})
        for name, s in report["memory"].items():
            headlines[f"{name} Manager RSS per key (B)"] = (s["per_key_median"]["rss"], "lower")
    if closes:
        part, report["stall"], more = stall_report(closes, bool(args.wait))
        text += part
        text.append(f"A round's wall time is its CPU time plus the time the Manager waited for a CPU: the 1-minute "
                    f"load average was {load[0]:.1f} before the run and {load[1]:.1f} after it, on "
                    f"{os.cpu_count()} CPUs.")  # fmt: skip
        checks.update({f"stall {k}": v for k, v in more.items()})
        for name, s in report["stall"].items():
            headlines[f"close stall {name} (ms)"] = (s["close_stall_ms"]["median"], "lower")
    targets_text, report["targets"] = lab.targets("Targets", checks)
    text.append(targets_text)
    return lab.finish(args, bench, text, report, headlines)


if __name__ == "__main__":
    lab.run(main)
