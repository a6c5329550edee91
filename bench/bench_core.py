"""Core latency: one client of a Manager, one operation at a time, against the cheapest Python IPC round trip.

Sequential calls of ``clustershm.connect()``'s client to a Manager in a forked process (the whole path: pickling,
framing, the Unix socket, the dispatch, the reply), each median over the *floor*, a length-prefixed pickle echo on
a socketpair: what the Manager costs above it is its own. Target: a get hit at most 2x the floor (README.md).

Then the Django path over the raw client (#19 part 5): ``ClusterShmCache.get``/``set``/``incr`` against the raw
client's calls, back to back on one client: over the Unix socket to the Manager without near caches (every call a
round trip), the same with the near caches the cluster has by default (a get is a near hit), and on the embedded
transport (an in-process engine, where the round trip is small and the backend's own cost shows). The raw calls: the
store's (``client.get(key)``, ``client.set(key, value, 300)``, ``client.incr(key)``, on a key with the same timeout)
and the same request on the cache's own keyspace (``client.cache(LOCATION, ...)`` with the made key, and the same
near cache: what the backend calls). ``--rounds`` rounds, each its own interleaved timing; medians over the rounds,
spreads ((max - min) / median), and the ratios of each round, then their median. Target: a cache call at most 1.2x
the raw client's.
"""

from __future__ import annotations

import os
import pickle
import signal
import socket
import struct

import lab
from lab import clustershm

#: The "small value" of every operation that stores or returns one.
VALUE = {"id": 42, "name": "alice", "active": True, "score": 3.5, "tags": ["a", "b"]}
MANY = 10
LENGTH = struct.Struct("!I")
BLOCK = 1000  # timed calls per operation per round of the interleaving
FLOOR = "floor round trip"
#: The Django path (#19 part 5): the cache alias, its keys, and what a cache call is compared with.
THIN_LOCATION = "bench-thin"
THIN_OPTIONS = {"MAX_ENTRIES": 100_000}
THIN_ALIASES = {"socket": "default", "near": "near", "embedded": "default"}  # configure_django's
THIN_TIMEOUT = 300  # the alias's TIMEOUT (Django's default); the raw calls store with the same
THIN_OPS = ("get", "set", "incr")
THIN_SIDES = {"cache": "ClusterShmCache", "store": "raw client, store", "keyspace": "raw client, the cache's keyspace"}
THIN_TRANSPORTS = {"socket": "Unix socket, no near cache", "near": "Unix socket, near caches (the default)",
                   "embedded": "embedded (in-process engine)"}  # fmt: skip
THIN_TARGET = 1.2


def _recv_frame(recv, buf: bytes) -> tuple[bytes | None, bytes]:
    """One length-prefixed frame from ``recv`` (None at EOF), and what follows it."""
    size = LENGTH.size
    while len(buf) < size or len(buf) < size + LENGTH.unpack_from(buf)[0]:
        chunk = recv(65536)
        if not chunk:
            return None, buf
        buf += chunk
    end = size + LENGTH.unpack_from(buf)[0]
    return buf[size:end], buf[end:]


def _floor_child(sock: socket.socket) -> None:
    """Body of the floor process: a length-prefixed pickle echo on a socketpair, until EOF."""
    recv, sendall, loads, dumps, pack = sock.recv, sock.sendall, pickle.loads, pickle.dumps, LENGTH.pack
    buf = b""
    while True:
        frame, buf = _recv_frame(recv, buf)
        if frame is None:
            return
        loads(frame)
        body = dumps(VALUE)
        sendall(pack(len(body)) + body)


def _floor_caller(sock: socket.socket):
    recv, sendall, loads, dumps, pack = sock.recv, sock.sendall, pickle.loads, pickle.dumps, LENGTH.pack
    request = ("get", "", "bench:hit")

    def floor():
        body = dumps(request)
        sendall(pack(len(body)) + body)
        frame, _ = _recv_frame(recv, b"")
        if frame is None:
            raise ConnectionError("the floor process went away")
        return loads(frame)

    return floor


def _operations(client, floor) -> dict:
    """name -> zero-argument callable; also seeds the keys the reads need."""
    many_keys = [f"bench:many:{i}" for i in range(MANY)]
    many_items = {f"bench:setmany:{i}": VALUE for i in range(MANY)}
    client.set("bench:hit", VALUE)
    client.remove("bench:missing")
    client.set_many(dict.fromkeys(many_keys, VALUE))
    if client.get("bench:hit") != VALUE or floor() != VALUE or client.get("bench:missing") is not None:
        raise lab.BenchError("a get of the seeded keys does not return what was stored")
    get, set_, incr, get_many, set_many = client.get, client.set, client.incr, client.get_many, client.set_many
    return {FLOOR: floor, "get hit": lambda: get("bench:hit"), "get miss": lambda: get("bench:missing"),
            "set": lambda: set_("bench:set", VALUE), "incr": lambda: incr("bench:counter"),
            f"get_many({MANY} keys)": lambda: get_many(many_keys),
            f"set_many({MANY} keys)": lambda: set_many(many_items)}  # fmt: skip


def configure_django() -> None:
    """Two ClusterShmCache aliases, as bench_cache's (a bounded LOCATION of their own, Django's default timeout):
    "default" without a near cache, "near" with the default one; and no near cache on the store, for now."""
    import django
    from django.conf import settings

    shm = {"BACKEND": "django_clustershm.cache.ClusterShmCache", "TIMEOUT": THIN_TIMEOUT}
    settings.configure(DEBUG=False, SECRET_KEY="bench-core-not-a-secret", INSTALLED_APPS=[], USE_TZ=True,
                       CLUSTERSHM={"NEAR_CACHE": False},
                       CACHES={"default": {**shm, "LOCATION": THIN_LOCATION,
                                           "OPTIONS": {**THIN_OPTIONS, "NEAR_CACHE": False}},
                               "near": {**shm, "LOCATION": THIN_LOCATION + "-near", "OPTIONS": THIN_OPTIONS}})  # fmt: skip
    django.setup()


def thin_operations(shared, alias: str) -> dict:
    """Name ("op side") -> zero-argument callable: the cache alias's call, the raw client's on the store, the same
    request on the cache's keyspace (with the alias's near cache, if it has one). ``shared`` is the process-wide
    client, which the alias uses too: one connection for all three."""
    from django.conf import settings
    from django.core.cache import caches

    from django_clustershm import conf

    cache, entry = caches[alias], settings.CACHES[alias]
    near = conf.near_options(entry["OPTIONS"].get("NEAR_CACHE"))  # what the alias asks for, read as it reads it
    space = shared.cache(entry["LOCATION"], max_entries=THIN_OPTIONS["MAX_ENTRIES"], cull_frequency=3, near_cache=near)
    hit, dest, counter = "bench:thin:hit", "bench:thin:set", "bench:thin:counter"
    made = {key: cache.make_key(key) for key in (hit, dest, counter)}
    cache.set(hit, VALUE)
    cache.set(counter, 0)
    shared.set(hit, VALUE, THIN_TIMEOUT)
    shared.set(counter, 0, THIN_TIMEOUT)
    if not cache.get(hit) == shared.get(hit) == space.get(made[hit]) == VALUE:
        raise lab.BenchError("the cache, the store and the keyspace do not return what was stored")
    ks_get, ks_set, ks_incr = space.get, space.set, space.incr
    return {"get cache": lambda: cache.get(hit), "get store": lambda: shared.get(hit),
            "get keyspace": lambda: ks_get(made[hit]),
            "set cache": lambda: cache.set(dest, VALUE), "set store": lambda: shared.set(dest, VALUE, THIN_TIMEOUT),
            "set keyspace": lambda: ks_set(made[dest], VALUE, THIN_TIMEOUT),
            "incr cache": lambda: cache.incr(counter), "incr store": lambda: shared.incr(counter),
            "incr keyspace": lambda: ks_incr(made[counter], 1, default=None)}  # fmt: skip


def thin_operations_names() -> list[str]:
    return [f"{op} {side}" for op in THIN_OPS for side in THIN_SIDES]


def time_thin(shared, alias: str, args, pause: dict) -> dict:
    """``args.rounds`` rounds of the thin operations, interleaved; per op and side: µs rounds, ratio rounds."""
    ops = thin_operations(shared, alias)
    per_round = [lab.time_interleaved(ops, args.thin_n, args.warmup, BLOCK, pause) for _ in range(args.rounds)]
    out: dict = {}
    for op in THIN_OPS:
        medians = {side: [r[f"{op} {side}"]["median_us"] for r in per_round] for side in THIN_SIDES}
        out[op] = {"median_us": {side: lab.rounds(values) for side, values in medians.items()},
                   "p99_us": {side: lab.rounds([r[f"{op} {side}"]["p99_us"] for r in per_round]) for side in THIN_SIDES},
                   "cache_over_store": lab.rounds([c / s for c, s in zip(medians["cache"], medians["store"], strict=True)]),
                   "cache_over_keyspace": lab.rounds([c / k for c, k in zip(medians["cache"], medians["keyspace"],
                                                                            strict=True)])}  # fmt: skip
    return out


def thin_report(thin: dict) -> tuple[list[str], dict, dict]:
    """The table, the target lines, their JSON and the headline figures of the Django path."""

    def cell(fig: dict) -> str:
        return f"{lab.fmt(fig['median'], 2)} ({fig['spread']:.0%})"

    def ratio(fig: dict) -> str:
        return f"{fig['median']:.3f}x ({' / '.join(f'{v:.2f}' for v in fig['values'])})"

    rows, checks, headlines = [], {}, {}
    for transport, by_op in thin.items():
        for op, r in by_op.items():
            rows.append([THIN_TRANSPORTS[transport], op, *(cell(r["median_us"][side]) for side in THIN_SIDES),
                         ratio(r["cache_over_store"]), ratio(r["cache_over_keyspace"])])  # fmt: skip
            for against, key in (("store", "cache_over_store"), ("keyspace", "cache_over_keyspace")):
                value = r[key]["median"]
                checks[f"{transport}_{op}_over_{against}"] = (
                    f"{transport}: ClusterShmCache.{op} / {THIN_SIDES[against]} = {value:.3f}x "
                    f"({lab.fmt(r['median_us']['cache']['median'], 2)} vs "
                    f"{lab.fmt(r['median_us'][against]['median'], 2)} µs; target <= {THIN_TARGET}x)",
                    value,
                    THIN_TARGET,
                )
                headlines[f"thin {transport} {op}: cache / {against} (x)"] = (value, "lower")
            headlines[f"thin {transport} {op}: cache (µs)"] = (r["median_us"]["cache"]["median"], "lower")
    rounds = len(next(iter(next(iter(thin.values())).values()))["cache_over_store"]["values"])
    table = lab.table(["transport", "op", *(f"{label} µs (spread)" for label in THIN_SIDES.values()),
                       "cache / store (per round)", "cache / keyspace (per round)"], rows, align="llrrrrr",
                      title=f"The Django path over the raw client: medians over {rounds} round(s)")  # fmt: skip
    text, results = lab.targets(f"Targets (#19 part 5: a cache call at most {THIN_TARGET}x the raw client's)", checks)
    return [table, text], results, headlines


def main(argv=None) -> int:
    args = lab.options(__doc__, argv, {"n": 2000, "warmup": 200, "thin_n": 1000, "rounds": 1},
                       n=(lab.count, 20000, "timed calls per operation"),
                       warmup=(lab.count0, 1000, "untimed calls per operation first"),
                       thin_n=(lab.count, 10000, "timed calls per operation and round, the Django path"),
                       rounds=(lab.count, 3, "rounds of the Django path"),
                       pin=(int, None, "run every process on this one CPU (default: unpinned)"))  # fmt: skip
    if args.pin is not None:
        try:
            os.sched_setaffinity(0, {args.pin})  # inherited by the children forked below
        except (OSError, ValueError) as exc:
            raise lab.BenchError(f"cannot pin to CPU {args.pin}: {exc}") from exc
    configure_django()

    with lab.Lab("core") as bench:
        bench.start_manager(configure=False)
        floor_sock, floor_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            floor_pid = lab.fork(_floor_child, floor_end, close=[floor_sock.fileno()])
        finally:
            floor_end.close()

        def stop_floor() -> list[str]:
            floor_sock.close()  # EOF: the floor process returns
            rc = lab.reap(floor_pid, timeout=5.0)
            return [] if rc == 0 else [f"the floor process ended with {lab.describe(rc)}"]

        bench.cleanups.append(stop_floor)
        client = clustershm.connect(bench.address, bench.secret)
        bench.cleanups.append(client.close)
        ops = _operations(client, _floor_caller(floor_sock))
        # Only the server under measurement runs: the other is stopped, so both see the same machine.
        pause = {name: bench.manager_pid if name == FLOOR else floor_pid for name in ops}
        results = lab.time_interleaved(ops, args.n, args.warmup, BLOCK, pause)

        thin = {}
        lab.log(f"the Django path, embedded: {args.rounds} round(s) of {args.thin_n} calls per operation")
        for pid in (bench.manager_pid, floor_pid):  # neither serves the embedded engine: stopped meanwhile
            os.kill(pid, signal.SIGSTOP)
        try:  # no cluster configured yet: the process-wide client is embedded
            thin["embedded"] = time_thin(clustershm.get_client(), THIN_ALIASES["embedded"], args, {})
        finally:
            for pid in (bench.manager_pid, floor_pid):
                os.kill(pid, signal.SIGCONT)
        pause = dict.fromkeys(thin_operations_names(), floor_pid)
        lab.log(f"the Django path, socket: {args.rounds} round(s) of {args.thin_n} calls per operation")
        bench.configure()  # the process-wide client, which the cache aliases use, is now the Manager's...
        thin["socket"] = time_thin(clustershm.get_client(), THIN_ALIASES["socket"], args, pause)
        lab.log(f"the Django path, socket with near caches: {args.rounds} round(s) of {args.thin_n} calls per op")
        from django.conf import settings

        settings.CLUSTERSHM = {}  # ...and now one with the store's default near cache
        clustershm.configure(bench.address, bench.secret)
        thin["near"] = time_thin(clustershm.get_client(), THIN_ALIASES["near"], args, pause)

    floor = results[FLOOR]["median_us"]
    for row in results.values():
        row["ratio_to_floor"] = row["median_us"] / floor
    hit = results["get hit"]["ratio_to_floor"]
    line, target = lab.target(f"get-hit median / floor median = {hit:.2f}x (target <= 2x)", hit, 2.0)
    rows = [[name, lab.fmt(r["median_us"]), lab.fmt(r["p99_us"]), f"{r['ratio_to_floor']:.2f}x"]
            for name, r in results.items()]  # fmt: skip
    thin_text, thin_targets, thin_headlines = thin_report({name: thin[name] for name in THIN_TRANSPORTS})
    placement = f"pinned to CPU {args.pin}" if args.pin is not None else "unpinned"
    text = [
        lab.header(f"django-clustershm core latency: N={args.n} timed calls per operation after {args.warmup} "
                   f"warm-up, {placement}; the Django path: {args.rounds} round(s) of {args.thin_n}; "
                   f"{bench.elapsed:.1f}s"),
        lab.table(["operation", "median (µs)", "p99 (µs)", "median / floor"], rows),
        line,
        *thin_text,
    ]  # fmt: skip
    headlines = {"core get hit median (µs)": (results["get hit"]["median_us"], "lower"), **thin_headlines}
    report = {"value": repr(VALUE), "results": results, "target": target, "thin": thin, "thin_targets": thin_targets}
    return lab.finish(args, bench, text, report, headlines)


if __name__ == "__main__":
    lab.run(main)
