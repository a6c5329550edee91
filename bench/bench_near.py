"""The near cache in traffic (#19 parts 2 and 3): read/write mixes x worker counts x NEAR_CACHE variants; fan-out.

Everything runs on the local engine: a Manager forked by lab.py, serving on a Unix socket in the script's private
temp dir, ``django_clustershm.configure(address, secret)`` called once before any worker is forked (cluster mode,
where the near cache works). Each contender is a Django cache alias used only through ``caches[...]``, so the script
measures whichever tree comes first on PYTHONPATH, whatever its near cache's internals and defaults are.

*Variants* (``--variant NAME=JSON``, repeatable; default ``off=false``, ``on={}``, ``default=default``): a
``ClusterShmCache`` alias with ``OPTIONS = {"MAX_ENTRIES": 100000, "NEAR_CACHE": JSON}`` on a LOCATION of its own;
the JSON ``default`` leaves the NEAR_CACHE option out (the package's default). Before the measurements a forked probe
writes and reads a key through each variant and looks in ``clustershm.near_stats()`` for its LOCATION: the report
says which variants have a near cache in this tree. Peers (``--peers``, default ``diskcache,redis``): diskcache's
``DjangoCache`` in the temp dir, and Django's ``RedisCache`` on a redis-server the script starts on a Unix socket
(skipped, with a note, if ``redis-server`` or redis-py is missing).

A. **Mixes x worker counts.** For each mix (``--mixes``, get/set percentages, default 90/10, 50/50, 10/90), each
worker count (``--workers``, default 1, 2, 4, 8, 16; the peers at ``--peer-workers``, default the same) and each
contender (in an order rotated every round), N forked workers, started together, each loop for ``--duration``
seconds: a busy gap of ``--gap-us`` µs (a spin on ``perf_counter``: no I/O, no sleep, like a view doing its own work;
with ``--gap-clock cpu`` a spin on the thread's CPU time, so a worker preempted mid-gap still spends the whole gap in
CPU, as a view's own work would: the fairer model when there are more workers than CPUs),
then one ``get`` or ``set`` (timeout None) of a key drawn from a Zipf-like distribution over ``--keys`` keys (rank r
has weight 1 / r ** ``--zipf``; 0: uniform), its value a dict of ~200 B pickled. Worker 0 clears the alias and fills
every key before the start. With ``--warmup S`` each worker first runs the same loop for S seconds untimed (its writes
published and its reads checked as below), and the run then times workers that have served S seconds, with their near
caches as that left them, instead of freshly forked ones. Only the call is timed. Per run: total ops/s (each worker's calls / its seconds, summed),
the median of every timed get and of every timed set (all workers' samples pooled), the share of gets answered from
the near cache (``near_stats()`` counters) and the correctness counters. Figures: the median over the rounds and
the spread ((max - min) / median); ratios are taken within a round (same machine state), then their median.

Correctness: a value carries its writer and that writer's sequence number for the key (1, 2, 3, ...). After a set
returns, its writer records in an anonymous shared mmap (per key and writer) when the write began and ended
(CLOCK_MONOTONIC, one clock for the host), then its number. Every read is checked against the highest number this
worker has seen of each writer of that key (its own writes and its reads): lower is a *non-monotonic* read. Every
4th get also copies the key's records before the call, and is *stale* if it returns a value older than a write that
had completed before the read began: a lower number than its writer's last completed one, or its writer's last one
while another completed write began after it had ended, or the fill value after any completed write. Any violation
makes the script exit 1. A read that returns None is counted and shown, not failed (an eviction may be legitimate).
Run against an unshared cache (LocMemCache), the check flags about half the checked reads.

B. **Fan-out cost.** K forked *trackers* (``--trackers``, default 0, 1, 2, 4, 8) each read a key and ten more
through a near-cache alias (``--fanout-variant``; default ``default`` if its near cache is active, else the first
variant whose is), so they hold them. A forked writer times ``set`` of the key, ``set_many`` of the ten keys, and, as
a control on the same load, ``set`` of another key through an alias with ``NEAR_CACHE: False``, in interleaved
blocks; with K > 0 the control waits, untimed, as long as the last re-read took, so that it finds the Manager as
idle as the near write does ("set x plain set": the holders' cost alone). After each timed near write (untimed) it tells every tracker to read all eleven keys again and waits until
each has answered with the values it read (they must be the ones just written: a check like A's), so that every
timed write finds K holders, and until each sleeps on its pipe again (``/proc/PID/stat``, 5 ms at most: without
this, back to back, a write timed while the trackers were still leaving the CPUs after their acks cost 1.5x at K=1,
where the Manager does nothing for the holder); then it spins ``--gap-us`` before the next write. The trackers wait on a pipe between
two reads: they are idle while a write is timed. Per K: the median set and set_many latency and their ratio to K = 0.

Targets (#19): 4 processes, 90/10, variant ``default`` >= 1.5x diskcache's ops/s; a set with 8 trackers <= 2x a set
with none. The machine may have fewer CPUs than workers (16 on 2 CPUs oversubscribe it): the report shows the CPUs.
"""

from __future__ import annotations

import argparse
import bisect
import json
import mmap
import os
import pickle
import random
import re
import time
import traceback

import lab
from lab import clustershm

SHM = "django_clustershm.cache.ClusterShmCache"
BOUNDED = 100_000  # the Manager-side MAX_ENTRIES of every ClusterShmCache alias: nothing is culled
DEFAULT = "default"  # the JSON that leaves NEAR_CACHE out
VARIANTS = ("off=false", "on={}", "default=default")
PEERS = {"diskcache": "diskcache.DjangoCache", "redis": "Django RedisCache"}
PLAN = 8192  # each worker's precomputed (set?, key) sequence; a power of two
CHECK_EVERY = 4  # every 4th get is checked against the completed writes
MANY = 10
WBLOCK = 50  # part B: timed writes per operation per turn
WSETTLE = 5  # part B: untimed writes of an operation before each of its turns
ACK_TIMEOUT = 10.0
PROBE_KEY = "nb:probe"
PLAIN_ALIAS, PLAIN_LOCATION = "fo-plain", "nb-fanout-plain"
TARGET_TP = (4, "90/10", 1.5)  # workers, mix, at least x diskcache
TARGET_FO = (8, 2.0)  # trackers, at most x K=0


def _pad() -> str:
    """The filler that makes a value ~200 B pickled."""
    base = len(pickle.dumps({"w": 15, "n": 1000, "pad": ""}, pickle.HIGHEST_PROTOCOL))
    return "x" * (200 - base)


PAD = _pad()
VALUE_BYTES = len(pickle.dumps({"w": 15, "n": 1000, "pad": PAD}, pickle.HIGHEST_PROTOCOL))


# -- options -----------------------------------------------------------------------------------


def workers_type(text: str) -> tuple[int, ...]:
    values = lab.counts(text)
    if values[0] < 1:
        raise argparse.ArgumentTypeError("worker counts >= 1")
    return values


def mixes_type(text: str) -> tuple[str, ...]:
    mixes = []
    for item in (x.strip() for x in text.split(",") if x.strip()):
        m = re.fullmatch(r"(\d+)/(\d+)", item)
        if not m or int(m[1]) + int(m[2]) != 100:
            raise argparse.ArgumentTypeError(f"{item!r}: GET/SET percentages that add up to 100, e.g. 90/10")
        mixes.append(f"{int(m[1])}/{int(m[2])}")
    if not mixes:
        raise argparse.ArgumentTypeError("at least one mix")
    return tuple(dict.fromkeys(mixes))


def variant_type(text: str) -> tuple[str, object]:
    name, sep, value = text.partition("=")
    name = name.strip()
    if not sep or not re.fullmatch(r"[A-Za-z0-9_.-]+", name) or name in PEERS:
        raise argparse.ArgumentTypeError(f"{text!r}: NAME=JSON, NAME letters, digits, _.- and not a peer's name")
    if value.strip() == DEFAULT:
        return name, DEFAULT
    try:
        return name, json.loads(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{text!r}: the JSON does not parse: {exc}") from None


def peers_type(text: str) -> tuple[str, ...]:
    if text.strip().lower() in ("", "none"):
        return ()
    names = tuple(dict.fromkeys(x.strip().lower() for x in text.split(",") if x.strip()))
    if unknown := [n for n in names if n not in PEERS]:
        raise argparse.ArgumentTypeError(f"unknown peer(s) {', '.join(unknown)}: {', '.join(PEERS)} or none")
    return names


def options(argv) -> argparse.Namespace:
    p = lab.parser(__doc__)
    add = p.add_argument
    add("--rounds", type=lab.count, default=3, help="rounds; figures are medians over them (default 3)")
    add("--duration", type=lab.seconds, default=1.2, help="seconds of each part-A run (default 1.2)")
    add("--warmup", type=float, default=0.0,
        help="seconds each part-A worker first runs its loop untimed, so that the run times workers that have "
             "served that long rather than freshly forked ones (default 0)")  # fmt: skip
    add("--workers", type=workers_type, default="1,2,4,8,16", help="worker counts (default 1,2,4,8,16)")
    add("--peer-workers", type=workers_type, help="the peers' worker counts (default: --workers)")
    add("--mixes", type=mixes_type, default="90/10,50/50,10/90", help="GET/SET mixes (default 90/10,50/50,10/90)")
    add("--gap-us", type=float, default=100.0, help="µs of busy-wait before each call (default 100)")
    add("--gap-clock", choices=("wall", "cpu"), default="wall",
        help="what part A's gap spins on: wall time (perf_counter, the default) or the thread's CPU time")  # fmt: skip
    add("--keys", type=lab.count, default=1000, help="the key space (default 1000)")
    add("--zipf", type=float, default=1.0, help="Zipf exponent of the key distribution, 0: uniform (default 1)")
    add("--variant", action="append", type=variant_type, metavar="NAME=JSON",
        help=f"a ClusterShmCache alias with OPTIONS['NEAR_CACHE'] = JSON ('default': no such option); repeatable "
             f"(default {' '.join(VARIANTS)})")  # fmt: skip
    add("--peers", type=peers_type, default="diskcache,redis", help="peers: diskcache,redis (default) or none")
    add("--trackers", type=lab.counts, default="0,1,2,4,8", help="part B tracker counts (default 0,1,2,4,8)")
    add("--writes", type=lab.count, default=400, help="part B timed writes per operation, K and round (default 400)")
    add("--fanout-variant", metavar="NAME", help="part B's near-cache variant (default: see above)")
    add("--seed", type=int, default=1, help="seed of the workers' key sequences (default 1)")
    args = p.parse_args(argv)
    if args.quick:
        p.set_defaults(rounds=1, duration=0.25, workers="1,4", writes=60, trackers="0,1,8")
        args = p.parse_args(argv)
    if args.gap_us < 0:
        p.error("--gap-us: must be >= 0")
    if args.warmup < 0:
        p.error("--warmup: must be >= 0")
    if args.zipf < 0:
        p.error("--zipf: must be >= 0")
    args.variants = dict(args.variant or [variant_type(v) for v in VARIANTS])
    if len(args.variants) != len(args.variant or VARIANTS):
        p.error("--variant: two variants have the same name")
    args.peer_workers = args.peer_workers or args.workers
    if args.fanout_variant is not None and args.fanout_variant not in args.variants:
        p.error(f"--fanout-variant: no variant named {args.fanout_variant!r}")
    return args


# -- Django and the contenders -------------------------------------------------------------------


def variant_alias(name: str) -> str:
    return f"v-{name}"


def variant_location(name: str) -> str:
    return f"nb-{name}"


def configure_django(args, bench: lab.Lab, peers: list[str]) -> None:
    import django
    from django.conf import settings

    caches = {"default": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache", "LOCATION": "nb-default"}}
    for name, near in args.variants.items():
        opts = {"MAX_ENTRIES": BOUNDED} if near == DEFAULT else {"MAX_ENTRIES": BOUNDED, "NEAR_CACHE": near}
        caches[variant_alias(name)] = {"BACKEND": SHM, "LOCATION": variant_location(name), "OPTIONS": opts}
    caches[PLAIN_ALIAS] = {"BACKEND": SHM, "LOCATION": PLAIN_LOCATION,
                           "OPTIONS": {"MAX_ENTRIES": BOUNDED, "NEAR_CACHE": False}}  # fmt: skip
    if "diskcache" in peers:
        caches["p-diskcache"] = {"BACKEND": "diskcache.DjangoCache", "LOCATION": bench.path("diskcache")}
    if "redis" in peers:
        caches["p-redis"] = {"BACKEND": "django.core.cache.backends.redis.RedisCache",
                             "LOCATION": f"unix://{bench.redis_path}"}  # fmt: skip
    settings.configure(DEBUG=False, SECRET_KEY="bench-near-not-a-secret", INSTALLED_APPS=[], USE_TZ=True,
                       CACHES=caches)  # fmt: skip
    django.setup()


def new_cache(alias: str):
    """A fresh backend object of ``alias`` (in a forked child: after closing what it inherited)."""
    from django.core.cache import caches

    caches.close_all()
    return caches.create_connection(alias)


def near_counts(location: str | None) -> tuple[int, int] | None:
    """(hits, misses) of this process's near cache on ``location`` (public ``near_stats()``), or None if it has none."""
    if location is None:
        return None
    stats = getattr(clustershm, "near_stats", dict)().get(location)
    return (stats["hits"], stats["misses"]) if stats else None


def _probe(index: int, ready, alias: str, location: str) -> dict:
    try:
        cache = new_cache(alias)
    except Exception as exc:  # a NEAR_CACHE this tree refuses: the reason goes into the report
        ready()
        return {"error": f"{type(exc).__name__}: {exc}"}
    cache.set(PROBE_KEY, {"w": -1, "n": 0, "pad": PAD}, None)
    for _ in range(3):
        if (got := cache.get(PROBE_KEY)) != {"w": -1, "n": 0, "pad": PAD}:
            raise AssertionError(f"{alias}: get returned {got!r} after set")
    cache.delete(PROBE_KEY)
    ready()
    return {"near": near_counts(location) is not None}


# -- A. mixes x worker counts ----------------------------------------------------------------------


def zipf_cumulative(keys: int, s: float) -> list[float]:
    total, cum = 0.0, []
    for rank in range(1, keys + 1):
        total += rank**-s
        cum.append(total)
    return cum


def _mix_worker(index: int, ready, alias: str, location: str | None, nworkers: int, set_share: float, args,
                seed: str, buf: mmap.mmap) -> dict:  # fmt: skip
    cache = new_cache(alias)
    slots = memoryview(buf).cast("q")
    nkeys = args.keys
    keys = [f"nb:{i}" for i in range(nkeys)]
    rng = random.Random(f"{seed}:{index}")
    cum = zipf_cumulative(nkeys, args.zipf)
    total = cum[-1]
    plan = [(rng.random() < set_share, min(bisect.bisect(cum, rng.random() * total), nkeys - 1)) for _ in range(PLAN)]
    cache.get(PROBE_KEY)  # connected before the start
    if index == 0:
        cache.clear()
        filler = {"w": -1, "n": 0, "pad": PAD}
        for start in range(0, nkeys, 100):
            cache.set_many(dict.fromkeys(keys[start : start + 100], filler), None)
    near0 = near_counts(location)
    W = nworkers
    seqs = [0] * nkeys  # this worker's last number per key
    seen = [0] * (nkeys * W)  # the highest number seen of each writer of each key
    seen_any = [False] * nkeys  # whether this worker has seen a written (not the fill) value of the key
    get_s: list[float] = []
    set_s: list[float] = []
    gets = sets = misses = errors = checked = stale = backwards = 0
    first_error = first_violation = None
    get, set_, clock, mono, gap = cache.get, cache.set, time.perf_counter, time.monotonic_ns, args.gap_us / 1e6
    spin_clock = time.thread_time if args.gap_clock == "cpu" else clock
    ready()
    with lab.gc_paused():
        # --warmup: the same loop untimed first (its writes published, its reads checked), then the timed run
        # from the state it left: workers that have served a while, not freshly forked ones.
        i = 0
        for seconds, timed in ((args.warmup, False), (args.duration, True)):
            if not seconds:
                continue
            if timed and args.warmup:
                get_s.clear()
                set_s.clear()
                gets = sets = misses = checked = 0
                near0 = near_counts(location)
            t_start = clock()
            deadline = t_start + seconds
            while True:
                is_set, k = plan[i]
                i = (i + 1) & (PLAN - 1)
                until = spin_clock() + gap
                while spin_clock() < until:
                    pass
                key = keys[k]
                if is_set:
                    n = seqs[k] + 1
                    value = {"w": index, "n": n, "pad": PAD}
                    began = mono()
                    t0 = clock()
                    try:
                        set_(key, value, None)
                    except Exception as exc:  # counted and reported; the run goes on
                        errors += 1
                        first_error = first_error or repr(exc)[:300]
                        if clock() >= deadline:
                            break
                        continue
                    t1 = clock()
                    ended = mono()
                    set_s.append(t1 - t0)
                    seqs[k] = n
                    # Completed: no read that begins from here may return an older value. The number last, so that a
                    # reader that sees it sees this write's times (or a later write's).
                    at = (k * W + index) * 3
                    slots[at + 1] = began
                    slots[at + 2] = ended
                    slots[at] = n
                    seen[k * W + index] = n
                    seen_any[k] = True
                    sets += 1
                else:
                    check = not (gets + 1) % CHECK_EVERY
                    before = slots[k * W * 3 : (k + 1) * W * 3].tolist() if check else None
                    t0 = clock()
                    try:
                        v = get(key)
                    except Exception as exc:  # counted and reported; the run goes on
                        errors += 1
                        first_error = first_error or repr(exc)[:300]
                        if clock() >= deadline:
                            break
                        continue
                    t1 = clock()
                    get_s.append(t1 - t0)
                    gets += 1
                    checked += check
                    if v is None:
                        misses += 1
                    elif (w := v["w"]) < 0:  # the fill: older than any write
                        if seen_any[k]:
                            backwards += 1
                            first_violation = first_violation or f"{key}: the fill value after a written one"
                        if check and max(before[::3]) > 0:
                            stale += 1
                            first_violation = first_violation or f"{key}: the fill value after a completed write"
                    else:
                        m, j = v["n"], k * W + w
                        if m < seen[j]:
                            backwards += 1
                            first_violation = first_violation or f"{key}: writer {w}'s {m} after its {seen[j]}"
                        else:
                            seen[j] = m
                        seen_any[k] = True
                        if check and (last := before[w * 3]) and m <= last:
                            if m < last:
                                stale += 1
                                first_violation = first_violation or f"{key}: writer {w}'s {m} after its {last} completed"
                            elif (newer := max(before[1::3])) > before[w * 3 + 2]:  # ended before another write began
                                stale += 1
                                first_violation = first_violation or (
                                    f"{key}: writer {w}'s {m}, though a write begun {(newer - before[w * 3 + 2]) / 1e3:.0f} "
                                    "µs after it completed had completed too"
                                )
                if t1 >= deadline:
                    break
            elapsed = clock() - t_start
    slots.release()
    near1 = near_counts(location)
    near = [near1[0] - near0[0], near1[1] - near0[1]] if near0 and near1 else None
    return {"gets": gets, "sets": sets, "seconds": elapsed, "misses": misses, "errors": errors,
            "first_error": first_error, "checked": checked, "stale": stale, "backwards": backwards,
            "first_violation": first_violation, "near": near,
            "get_us": [round(x * 1e6, 2) for x in get_s], "set_us": [round(x * 1e6, 2) for x in set_s]}  # fmt: skip


def run_mix(alias: str, location: str | None, nworkers: int, mix: str, args, seed: str) -> dict:
    set_share = int(mix.split("/")[1]) / 100
    buf = mmap.mmap(-1, args.keys * nworkers * 3 * 8)  # shared with the forked workers; zeroed
    try:
        workers = lab.run_workers(nworkers, _mix_worker, (alias, location, nworkers, set_share, args, seed, buf),
                                  timeout=args.warmup + args.duration + 120)  # fmt: skip
    finally:
        buf.close()
    get_us = [x for w in workers for x in w.pop("get_us")]
    set_us = [x for w in workers for x in w.pop("set_us")]
    near = [w["near"] for w in workers]
    hits = sum(n[0] for n in near) if None not in near else None
    lookups = sum(n[0] + n[1] for n in near) if None not in near else None
    total = {
        f: sum(w[f] for w in workers) for f in ("gets", "sets", "misses", "errors", "checked", "stale", "backwards")
    }
    return {**total, "ops_per_s": sum((w["gets"] + w["sets"]) / w["seconds"] for w in workers),
            "get": lab.summary(get_us, 1), "set": lab.summary(set_us, 1),
            "near_local_share": hits / lookups if lookups else None,
            "first_error": next((w["first_error"] for w in workers if w["first_error"]), None),
            "first_violation": next((w["first_violation"] for w in workers if w["first_violation"]), None)}  # fmt: skip


# -- B. fan-out ------------------------------------------------------------------------------------


def _tracker(keys: list[str], alias: str, location: str | None, cmd_r: int, out_w: int) -> None:
    """Hold ``keys`` in the near cache: read them all, then again at each byte on ``cmd_r``, sending their numbers."""
    cache = new_cache(alias)
    get = cache.get

    def read_all() -> str:
        values = [get(k)["n"] for k in keys]
        return f"{values[0]} {min(values[1:])}"

    read_all()
    near0 = near_counts(location)
    lab.send(out_w, "ready")
    reads = 0
    while os.read(cmd_r, 1):
        lab.send(out_w, read_all())
        reads += len(keys)
    near1 = near_counts(location)
    near = [near1[0] - near0[0], near1[1] - near0[1]] if near0 and near1 else None
    lab.send(out_w, "stats " + json.dumps({"reads": reads, "near": near}))


def _fanout_writer(index: int, ready, k: int, alias: str, location: str | None, args, tag: str) -> dict:
    near, plain = new_cache(alias), new_cache(PLAIN_ALIAS)
    one, many = f"fo:{tag}:one", [f"fo:{tag}:m{i}" for i in range(MANY)]
    near.set(one, {"w": 0, "n": 0, "pad": PAD}, None)
    near.set_many({key: {"w": 0, "n": 0, "pad": PAD} for key in many}, None)
    plain.set("fo:plain", {"w": 0, "n": 0, "pad": PAD}, None)
    trackers: list[tuple[int, lab.Lines, int]] = []
    inherited: list[int] = []  # every tracker's command pipe's write end, closed in the trackers forked later
    problems: list[str] = []
    stats: list[dict] = []
    out: dict = {}
    try:
        for _ in range(k):
            cmd_r, cmd_w = os.pipe()
            inherited.append(cmd_w)
            try:
                pid, lines = lab.child(_tracker, [one, *many], alias, location, cmd_r, close=inherited)
            finally:
                os.close(cmd_r)
            trackers.append((pid, lines, cmd_w))
        for pid, lines, _ in trackers:
            if lines.read(lab.READY_TIMEOUT, f"word from tracker {pid}") != "ready":
                raise lab.BenchError(f"tracker {pid} did not get ready")
        seq = {"set": 0, "set_many": 0}
        violations = [0]
        reread: list[float] = []
        clock, gap = time.perf_counter, args.gap_us / 1e6

        pause = [0.0]  # how long the last re-read (and settle) kept the writer from writing

        def reread_all() -> None:
            t0 = clock()
            for _, _, cmd_w in trackers:
                os.write(cmd_w, b"r")
            for pid, lines, _ in trackers:
                a, b = map(int, lines.read(ACK_TIMEOUT, f"tracker {pid}'s reads").split())
                if a != seq["set"] or b != seq["set_many"]:
                    violations[0] += 1
                    problems.append(f"tracker {pid} read {a}/{b} after {seq['set']}/{seq['set_many']} completed")
            reread.append(clock() - t0)
            settle()
            pause[0] = clock() - t0

        def settle() -> None:
            """Untimed: wait (5 ms at most) until every tracker sleeps on its pipe again, so that the next write
            is timed with K processes holding the keys, not with K processes still on the CPUs after their acks."""
            until = clock() + 0.005
            for pid, _, _ in trackers:
                while clock() < until:
                    try:
                        with open(f"/proc/{pid}/stat", "rb") as fh:
                            if fh.read().rsplit(b")", 1)[1].split()[0] == b"S":
                                break
                    except OSError:
                        break  # no /proc: the gap alone settles it

        def one_write(op: str) -> float:
            if op == "plain set":
                value = {"w": 0, "n": 0, "pad": PAD}
                t0 = clock()
                plain.set("fo:plain", value, None)
                dt = clock() - t0
            elif op == "set":
                seq["set"] += 1
                value = {"w": 0, "n": seq["set"], "pad": PAD}
                t0 = clock()
                near.set(one, value, None)
                dt = clock() - t0
            else:
                seq["set_many"] += 1
                items = {key: {"w": 0, "n": seq["set_many"], "pad": PAD} for key in many}
                t0 = clock()
                near.set_many(items, None)
                dt = clock() - t0
            if trackers and op != "plain set":
                reread_all()
            elif trackers:
                # The control waits as long as the last re-read did: both writes find a Manager equally idle
                # (its loop sleeps after 50 µs without a request, and waking it is most of a write's cost).
                until = clock() + pause[0]
                while clock() < until:
                    pass
            until = clock() + gap
            while clock() < until:
                pass
            return dt

        ops = ("set", f"set_many({MANY})", "plain set")
        samples: dict[str, list] = {op: [] for op in ops}
        ready()
        with lab.gc_paused():
            for start in range(0, args.writes, WBLOCK):
                for op in ops:
                    for _ in range(WSETTLE):
                        one_write(op)
                    append = samples[op].append
                    for _ in range(min(WBLOCK, args.writes - start)):
                        append(one_write(op))
        out = {op: lab.summary(v) for op, v in samples.items()}
        out["reread"] = lab.summary(reread) if reread else None
        out["violations"] = violations[0]
    finally:
        for fd in inherited:
            os.close(fd)  # EOF: the trackers report and exit
        for pid, lines, _ in trackers:
            try:
                while not (line := lines.read(ACK_TIMEOUT, f"tracker {pid}'s figures")).startswith("stats"):
                    pass
                stats.append(json.loads(line.split(" ", 1)[1]))
            except (TimeoutError, lab.BenchError) as exc:
                problems.append(f"tracker {pid}: {exc}")
            lines.close()
            if (rc := lab.reap(pid)) != 0:
                problems.append(f"tracker {pid} ended with {lab.describe(rc)}")
    near_stats = [s["near"] for s in stats]
    if stats and None not in near_stats:
        out["tracker_near_hits"] = sum(n[0] for n in near_stats)
        out["tracker_near_misses"] = sum(n[1] for n in near_stats)
    out["tracker_reads"] = sum(s["reads"] for s in stats)
    out["problems"] = problems
    return out


def run_fanout(k: int, alias: str, location: str | None, args, tag: str) -> dict:
    return lab.run_workers(1, _fanout_writer, (k, alias, location, args, tag), timeout=600)[0]


# -- the report ------------------------------------------------------------------------------------


def over_rounds(values: list) -> dict | None:
    values = [v for v in values if v is not None]
    return lab.rounds(values) if values else None


def med(s: dict | None):
    return None if s is None else s["median"]


def spread(s: dict | None) -> str:
    return "-" if s is None or s["spread"] is None else f"{s['spread']:.0%}"


def ratio_rounds(a: list, b: list) -> dict | None:
    """The per-round ratio a / b (same round, same machine state), over the rounds."""
    return over_rounds([lab.ratio(x, y) for x, y in zip(a, b, strict=True)])


def xcell(s: dict | None) -> str:
    return "-" if s is None else f"{s['median']:.2f}x ({spread(s)})"


def main(argv=None) -> int:
    args = options(argv)
    lab.need(modules=["django"] + (["diskcache"] if "diskcache" in args.peers else []))
    notes: list[str] = []
    peers = list(args.peers)
    if "redis" in peers:
        try:
            lab.need(binaries=["redis-server"], modules=["redis"])
        except lab.BenchError as exc:
            peers.remove("redis")
            notes.append(f"Django RedisCache skipped: {exc}.")
    variants = list(args.variants)
    labels = {**{v: f"{v} (NEAR_CACHE {'left out' if args.variants[v] == DEFAULT else json.dumps(args.variants[v])})"
                 for v in variants}, **PEERS}  # fmt: skip
    errors: list[str] = []
    # results[(contender, mix, workers)] = [per-round dict]
    runs: dict[tuple, list] = {}
    fanout: dict[int, list] = {k: [] for k in args.trackers}
    probes: dict[str, dict] = {}
    fo_variant = None
    with lab.Lab("near") as bench:
        bench.start_manager(configure=False)  # configure() once Django is set up, before any fork
        if "redis" in peers:
            bench.start_redis()
        configure_django(args, bench, peers)
        bench.configure()  # every worker inherits the address and the secret
        for v in list(variants):
            try:
                probes[v] = lab.run_workers(1, _probe, (variant_alias(v), variant_location(v)), 60)[0]
                if "error" in probes[v]:
                    raise lab.BenchError(probes[v]["error"])
            except Exception as exc:  # a variant this tree refuses: reported, the others run
                errors.append(f"variant {v}: {exc}")
                lab.log(f"variant {v} failed its probe:\n{traceback.format_exc()}")
                variants.remove(v)
        for v in variants:
            lab.log(f"variant {v}: NEAR_CACHE {args.variants[v]!r}, near cache active: {probes[v]['near']}")
        active = [v for v in variants if probes[v]["near"]]
        fo_variant = args.fanout_variant or (DEFAULT if DEFAULT in active else (active or [None])[0])
        if fo_variant is None:
            notes.append("Part B not run: no variant has a near cache in this tree (--variant NAME=JSON adds one).")
        elif fo_variant not in active:
            notes.append(f"Part B: variant {fo_variant} has no near cache in this tree; its trackers hold nothing.")
        contenders = variants + peers
        for r in range(args.rounds):
            for mix in args.mixes:
                for n in args.workers:
                    here = [c for c in contenders if c in variants or n in args.peer_workers]
                    here = here[r % len(here) :] + here[: r % len(here)]
                    for c in here:
                        lab.log(f"round {r + 1}/{args.rounds}: A. {mix}, {n} worker(s), {c}")
                        alias = variant_alias(c) if c in variants else f"p-{c}"
                        location = variant_location(c) if c in variants else None
                        try:
                            result = run_mix(alias, location, n, mix, args, f"{args.seed}:{r}:{mix}:{n}")
                        except Exception as exc:  # one contender's failure is reported; the run goes on
                            errors.append(f"{c}, {mix}, {n} workers, round {r + 1}: {exc}")
                            lab.log(traceback.format_exc())
                            result = None
                        runs.setdefault((c, mix, n), []).append(result)
            if fo_variant is None:
                continue
            for k in args.trackers:
                lab.log(f"round {r + 1}/{args.rounds}: B. fan-out, {k} tracker(s), {args.writes} writes per op")
                try:
                    result = run_fanout(k, variant_alias(fo_variant), variant_location(fo_variant), args, f"{r}:{k}")
                    errors += [f"fan-out, {k} trackers, round {r + 1}: {p}" for p in result.pop("problems")]
                except Exception as exc:  # reported; the run goes on
                    errors.append(f"fan-out, {k} trackers, round {r + 1}: {exc}")
                    lab.log(traceback.format_exc())
                    result = None
                fanout[k].append(result)
        from django.core.cache import caches

        bench.cleanups.append(caches.close_all)  # no backend left open when the Manager stops

    text, report, headlines, failed = build_report(args, bench, variants, peers, labels, probes, runs, fanout,
                                                   fo_variant, notes, errors)  # fmt: skip
    return lab.finish(args, bench, text, report, headlines, failed=failed)


def build_report(args, bench, variants, peers, labels, probes, runs, fanout, fo_variant, notes, errors):
    contenders = variants + peers

    def per_round(c: str, mix: str, n: int, *path) -> list:
        out = []
        for x in runs.get((c, mix, n), []):
            for key in path:
                x = None if x is None else x[key]
            out.append(x)
        return out

    def stat(c: str, mix: str, n: int, *path) -> dict | None:
        return over_rounds(per_round(c, mix, n, *path))

    def counts_for(c: str) -> list[int]:
        return list(args.workers) if c in variants else [n for n in args.workers if n in args.peer_workers]

    text = [
        "## The near cache in traffic: mixes x worker counts x variants, and the fan-out cost",
        lab.header(f"bench_near: {args.rounds} round(s); local engine (a forked Manager, Unix socket); part A "
                   f"{args.duration:g} s per run"
                   f"{f' after {args.warmup:g} s untimed (workers that have served)' if args.warmup else ''}, "
                   f"a {args.gap_us:g} µs busy gap ({args.gap_clock} time) before each call, "
                   f"{args.keys:,} keys "
                   f"(Zipf s = {args.zipf:g}), values {VALUE_BYTES} B pickled; run took {bench.elapsed:.0f} s",
                   bench.versions),
    ]  # fmt: skip
    rows = [[v, "left out" if args.variants[v] == DEFAULT else f"`{json.dumps(args.variants[v])}`",
             "yes" if probes[v]["near"] else "**no**"] for v in variants]  # fmt: skip
    text.append(lab.table(["variant", "OPTIONS NEAR_CACHE", "near cache in this tree (near_stats())"], rows, "lll",
                          title="Variants (ClusterShmCache, OPTIONS MAX_ENTRIES 100000, a LOCATION each)"))  # fmt: skip
    inactive = [v for v in variants if not probes[v]["near"] and args.variants[v] not in (False, DEFAULT)]
    for v in inactive:
        notes.append(f"Variant {v} asks for a near cache (NEAR_CACHE {json.dumps(args.variants[v])}) but this tree "
                     "gives it none: its figures are those of the round trip.")  # fmt: skip
    # Each call follows gap µs of the worker's own CPU: no contender can exceed CPUs / gap calls a second in total.
    cpus = len(os.sched_getaffinity(0))
    ceiling = cpus / (args.gap_us / 1e6) if args.gap_us else None
    ceiling_text = f"; ceiling {cpus} CPUs / {args.gap_us:g} µs busy gap = {lab.fmt(ceiling)}" if ceiling else ""
    summary: dict = {}
    for mix in args.mixes:
        tp_rows, lat_rows, x_rows = [], [], []
        for c in contenders:
            cells, lcells = [], []
            for n in args.workers:
                s = stat(c, mix, n, "ops_per_s") if n in counts_for(c) else None
                g = stat(c, mix, n, "get", "median_us") if n in counts_for(c) else None
                st = stat(c, mix, n, "set", "median_us") if n in counts_for(c) else None
                summary[f"{c} {mix} {n}"] = {"ops_per_s": s, "get_median_us": g, "set_median_us": st}
                cells.append("-" if s is None else f"{lab.fmt(s['median'])} ({spread(s)})")
                lcells.append("-" if g is None and st is None else f"{lab.fmt(med(g))} / {lab.fmt(med(st))}")
            tp_rows.append([labels[c], *cells])
            lat_rows.append([labels[c], *lcells])
        for v in variants:
            for base in ("off", "diskcache"):
                if base == v or base not in contenders:
                    continue
                cells = []
                for n in args.workers:
                    if n not in counts_for(base):
                        cells.append("-")
                        continue
                    r = ratio_rounds(per_round(v, mix, n, "ops_per_s"), per_round(base, mix, n, "ops_per_s"))
                    summary[f"{v}/{base} {mix} {n}"] = r
                    cells.append(xcell(r))
                x_rows.append([f"{v} / {base}", *cells])
        heads = [f"{n} worker{'s' if n > 1 else ''}" for n in args.workers]
        text.append(lab.table(["contender", *heads], tp_rows,
                              title=f"A. {mix} get/set: total ops/s, median over the rounds (spread){ceiling_text}"))  # fmt: skip
        text.append(lab.table(["contender", *heads], lat_rows,
                              title=f"A. {mix}: per-call median, get / set µs (median over the rounds)"))  # fmt: skip
        if x_rows:
            text.append(lab.table(["ops/s ratio", *heads], x_rows,
                                  title=f"A. {mix}: ops/s ratios, per round then their median (spread)"))  # fmt: skip
    share_rows = []
    for v in variants:
        if not probes[v]["near"]:
            continue
        for mix in args.mixes:
            cells = []
            for n in args.workers:
                s = stat(v, mix, n, "near_local_share")
                cells.append("-" if s is None else f"{s['median']:.0%}")
            share_rows.append([v, mix, *cells])
    if share_rows:
        text.append(lab.table(["variant", "mix", *(f"{n} w" for n in args.workers)], share_rows,
                              title="A. Share of gets answered from the near cache (near_stats() counters)"))  # fmt: skip

    win_rows, winners = [], {}
    for mix in args.mixes:
        for among, names in (("variants", variants), ("all", contenders)):
            if among == "all" and not peers:
                continue
            cells = []
            for n in args.workers:
                ranked = sorted(((s, c) for c in names if n in counts_for(c)
                                 and (s := stat(c, mix, n, "ops_per_s")) is not None),
                                key=lambda sc: -sc[0]["median"])  # fmt: skip
                if not ranked:
                    cells.append("-")
                    continue
                (best, top), second = ranked[0], ranked[1] if len(ranked) > 1 else None
                winners[f"{among} {mix} {n}"] = top
                if second is None:
                    cells.append(top)
                    continue
                tie = args.rounds > 1 and best["min"] <= second[0]["max"]
                cells.append(f"{top} {best['median'] / second[0]['median']:.2f}x {second[1]}" + (" (ranges overlap)"
                                                                                                   if tie else ""))  # fmt: skip
            win_rows.append([mix, among, *cells])
    text.append(lab.table(["mix", "among", *(f"{n} worker{'s' if n > 1 else ''}" for n in args.workers)], win_rows,
                          "ll" + "l" * len(args.workers),
                          title="A. Who wins (highest median ops/s), by how much over the runner-up"))  # fmt: skip

    c_rows, violations = [], 0
    for c in contenders:
        got = [x for (cc, _, _), xs in runs.items() if cc == c for x in xs if x is not None]
        tot = {f: sum(x[f] for x in got) for f in ("gets", "sets", "checked", "stale", "backwards", "misses", "errors")}
        violations += tot["stale"] + tot["backwards"]
        first = next((x["first_violation"] for x in got if x["first_violation"]), None)
        err = next((x["first_error"] for x in got if x["first_error"]), None)
        c_rows.append([labels[c], f"{tot['gets']:,}", f"{tot['sets']:,}", f"{tot['checked']:,}", tot["stale"],
                       tot["backwards"], tot["misses"], tot["errors"]])  # fmt: skip
        if first:
            errors.append(f"{c}: first violation: {first}")
        if err:
            errors.append(f"{c}: {tot['errors']} failed calls, the first: {err}")
    text.append(lab.table(["contender", "gets", "sets", "gets checked against completed writes", "stale",
                           "non-monotonic", "None returned", "errors"], c_rows,
                          title="A. Correctness, all runs"))  # fmt: skip

    fo_summary: dict = {}
    if fo_variant is not None:
        ops = ("set", f"set_many({MANY})", "plain set")
        base = {op: [x[op]["median_us"] if x else None for x in fanout.get(0, [])] for op in ops}
        rows = []
        for k in args.trackers:
            xs = fanout[k]
            cells = [k]
            plain = [x["plain set"]["median_us"] if x else None for x in xs]
            for op in ops:
                vals = [x[op]["median_us"] if x else None for x in xs]
                s, r = over_rounds(vals), ratio_rounds(vals, base[op]) if 0 in args.trackers else None
                fo_summary[f"{k} {op}"] = {"median_us": s, "x_k0": r}
                cells.append("-" if s is None else f"{lab.fmt(s['median'])} ({spread(s)})")
                if op != "plain set":
                    cells.append(xcell(r))
            same = ratio_rounds([x["set"]["median_us"] if x else None for x in xs], plain)
            fo_summary[f"{k} set"]["x_plain"] = same
            cells.append(xcell(same))
            rr = over_rounds([x["reread"]["median_us"] if x and x.get("reread") else None for x in xs])
            hits = sum(x.get("tracker_near_hits", 0) for x in xs if x)
            looks = hits + sum(x.get("tracker_near_misses", 0) for x in xs if x)
            violations += sum(x["violations"] for x in xs if x)
            cells += [lab.fmt(med(rr)), f"{hits / looks:.0%}" if looks else "-"]
            rows.append(cells)
        text.append(lab.table(["trackers K", "set median µs (spread)", "x K=0", f"set_many({MANY}) median µs",
                               "x K=0", "plain set (no near, control)", "set x plain set", "trackers' re-read µs",
                               "trackers' near hit share"], rows,
                              title=f"B. Fan-out: a write to keys that K processes hold, through variant "
                                    f"{fo_variant}; {args.writes} timed writes per op, K and round, a "
                                    f"{args.gap_us:g} µs busy gap after the trackers' re-read"))  # fmt: skip

    n, mix, limit = TARGET_TP
    checks = {"default_4proc_90_10_vs_diskcache": (f"{n} processes {mix} with the defaults >= {limit:g}x "
                                                   f"diskcache's ops/s (needs variant {DEFAULT}, the diskcache peer, "
                                                   f"mix {mix} and {n} workers)", None, limit, True)}  # fmt: skip
    if DEFAULT in variants and "diskcache" in contenders and mix in args.mixes and n in args.workers:
        r = summary.get(f"{DEFAULT}/diskcache {mix} {n}")
        disk = med(summary.get(f"diskcache {mix} {n}", {}).get("ops_per_s"))
        out_of_reach = ""
        if ceiling and disk and disk * limit > ceiling:
            out_of_reach = (f"; out of reach on this machine: {limit:g}x diskcache's {lab.fmt(disk)} ops/s is "
                            f"{lab.fmt(disk * limit)}, over the CPU ceiling of {lab.fmt(ceiling)}")  # fmt: skip
        checks["default_4proc_90_10_vs_diskcache"] = (
            f"{n} processes {mix} with the defaults (variant {DEFAULT}): {xcell(r)} diskcache's ops/s "
            f"(target >= {limit:g}x){out_of_reach}", med(r), limit, True)  # fmt: skip
    k, limit = TARGET_FO
    checks["fanout_8_vs_0"] = (f"a set with {k} trackers <= {limit:g}x a set with none (needs a variant with a "
                               f"near cache and trackers 0 and {k})", None, limit)  # fmt: skip
    if fo_variant is not None and {0, k} <= set(args.trackers):
        r, same = fo_summary[f"{k} set"]["x_k0"], fo_summary[f"{k} set"]["x_plain"]
        checks["fanout_8_vs_0"] = (f"a set with {k} trackers (variant {fo_variant}) = {xcell(r)} a set with none "
                                   f"(K=0), {xcell(same)} the control set held by none after the same pause "
                                   f"(target <= {limit:g}x)", med(r), limit)  # fmt: skip
    target_text, target_results = lab.targets("Targets (#19)", checks)
    text.append(target_text)
    if violations:
        errors.insert(0, f"{violations} consistency violation(s): see the correctness tables")
    if notes:
        text.append("Notes: " + " ".join(notes))
    if errors:
        more = f"; and {len(errors) - 30} more" if len(errors) > 30 else ""
        text.append("**Problems:** " + "; ".join(errors[:30]) + more)
    headlines = {
        f"near default {n}-process {mix} ops/s": (med(summary.get(f"{DEFAULT} {mix} {n}", {}).get("ops_per_s")),
                                                   "higher"),
        f"near default / diskcache {n}-process {mix}": (med(summary.get(f"{DEFAULT}/diskcache {mix} {n}")), "higher"),
        "fan-out set, K=0 (µs)": (med(fo_summary.get("0 set", {}).get("median_us")), "lower"),
        f"fan-out set, K={k} / K=0": (med(fo_summary.get(f"{k} set", {}).get("x_k0")), "lower"),
    }  # fmt: skip
    report = {"variants": {v: args.variants[v] for v in variants}, "probes": probes, "peers": peers,
              "value_bytes": VALUE_BYTES, "fanout_variant": fo_variant,
              "runs": {f"{c}|{m}|{n}": xs for (c, m, n), xs in runs.items()},
              "fanout": {str(k): xs for k, xs in fanout.items()}, "summary": summary, "winners": winners,
              "fanout_summary": fo_summary, "cpu_ceiling_ops_per_s": ceiling, "violations": violations, "targets": target_results,
              "notes": notes, "problems": errors}  # fmt: skip
    return text, report, headlines, bool(errors)


if __name__ == "__main__":
    lab.run(main)
