"""How long one connection's close, and one stats(), keep the Manager's loop busy.

Drives an Engine directly (no sockets): the loop runs close_session, then
tick() every round; what is timed is each call, the longest being what the
loop's max_stall_ms would show. Sizes are issue #12's (Deliver 3).

    PYTHONPATH=. python bench/bench_close.py [--runs 5]

(PYTHONPATH: the tree to measure; this script drives the engine, not the
public API, so bench/compare.py does not run it.) Columns: the close itself,
then the longest tick() of the sweep that follows, how many ticks, and their
total. The SCAN rows: the first SCAN call of a scan over a million keys,
then the ticks that copy the rest of its snapshot (none where the first
call copies it all).
"""

from __future__ import annotations

import argparse
import statistics
import time

from django_clustershm.server import subscriptions as S
from django_clustershm.server.engine import Engine
from django_clustershm.wire import frames as F

LOCKS = 100_000
#: Keys a process reads into its near cache (TRACK_GET_MANY): the sizes of
#: #12, when the Manager kept a record per (key, process) pair; with stamps
#: (server/stamps.py) it keeps nothing, and these rows show that.
TRACKED = 65_536
PREFIXES = 10_000


def _engine() -> Engine:
    return Engine()


def _drain(engine: Engine) -> tuple[float, int, float]:
    """tick() until the deferred work is done: the longest call, how many, and all of them."""
    longest, calls, total = 0.0, 0, 0.0
    while True:
        t0 = time.perf_counter()
        engine.tick()
        took = time.perf_counter() - t0
        longest = max(longest, took)
        total += took
        calls += 1
        if not getattr(engine, "sweep_pending", 0):  # none before the sweep: one tick
            return longest, calls, total


def _time_close(engine: Engine, session) -> tuple[float, float, int]:
    t0 = time.perf_counter()
    engine.close_session(session)
    close = time.perf_counter() - t0
    longest, calls, total = _drain(engine)
    return close, longest, calls, total


def locks_close(waiters: int = 0) -> tuple:
    engine = _engine()
    s = engine.open_session()
    for i in range(LOCKS):
        engine.dispatch(s, F.LOCK_ACQUIRE, [f"lock:{i}", None, None])
    others = []
    for i in range(waiters):  # a waiter on some of them
        w = engine.open_session()
        w.deliver = lambda rid, result: None
        engine.dispatch(w, F.LOCK_ACQUIRE, [f"lock:{i * (LOCKS // max(waiters, 1))}", None, None], 1)
        others.append(w)
    return _time_close(engine, s)


def _read_near(engine: Engine, s, n: int) -> None:
    for start in range(0, n, 4096):
        engine.dispatch(s, F.TRACK_GET_MANY, ["", [f"k{i}" for i in range(start, min(start + 4096, n))]])


def tracking_close(trackers: int = 1) -> tuple:
    engine = _engine()
    sessions = []
    for _ in range(trackers):
        s = engine.open_session()
        engine.dispatch(s, F.TRACKER, [])
        sessions.append(s)
    for i in range(TRACKED):
        engine.store.set(f"k{i}", b"v", None, None)
    for s in sessions:
        _read_near(engine, s, TRACKED)
    results = []
    for s in sessions:
        results.append(_time_close(engine, s))
    return (
        max(r[0] for r in results),
        max(r[1] for r in results),
        sum(r[2] for r in results),
        sum(r[3] for r in results),
    )


def subscriptions_close(n: int) -> tuple:
    old = S.MAX_SUBSCRIPTIONS_PER_SESSION
    S.MAX_SUBSCRIPTIONS_PER_SESSION = max(old, n)
    try:
        engine = _engine()
        s = engine.open_session()
        s.push = lambda event: None
        for i in range(n):
            engine.dispatch(s, F.LISTEN, [i, "", f"p{i}:", True])
        return _time_close(engine, s)
    finally:
        S.MAX_SUBSCRIPTIONS_PER_SESSION = old


def everything_close() -> tuple:
    old = S.MAX_SUBSCRIPTIONS_PER_SESSION
    S.MAX_SUBSCRIPTIONS_PER_SESSION = PREFIXES
    try:
        engine = _engine()
        s = engine.open_session()
        s.push = lambda event: None
        engine.dispatch(s, F.TRACKER, [])
        for i in range(LOCKS):
            engine.dispatch(s, F.LOCK_ACQUIRE, [f"lock:{i}", None, None])
        for i in range(TRACKED):
            engine.store.set(f"k{i}", b"v", None, None)
        _read_near(engine, s, TRACKED)
        for i in range(PREFIXES):
            engine.dispatch(s, F.LISTEN, [i, "", f"p{i}:", True])
        return _time_close(engine, s)
    finally:
        S.MAX_SUBSCRIPTIONS_PER_SESSION = old


def stats_big() -> tuple:
    """stats() with 200k locks, 16 processes that read 62.5k keys each into near caches, 50k subscriptions."""
    engine = _engine()
    holder = engine.open_session()
    for i in range(200_000):
        engine.dispatch(holder, F.LOCK_ACQUIRE, [f"lock:{i}", None, None])
    per = 1_000_000 // 16
    for i in range(per):
        engine.store.set(f"k{i}", b"v", None, None)
    for _ in range(16):
        s = engine.open_session()
        engine.dispatch(s, F.TRACKER, [])
        _read_near(engine, s, per)
    for j in range(50):  # 50 sessions x 1000 prefix subscriptions
        s = engine.open_session()
        for i in range(1000):
            engine.dispatch(s, F.LISTEN, [i, "", f"s{j}:{i}:", True])
    assert engine.near_fills == 1_000_000 and engine.subscriptions.count == 50_000
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        engine.dispatch(holder, F.STATS, [])
        times.append(time.perf_counter() - t0)
    return (statistics.median(times),)


def scan_start(keys: int, ns: str = "") -> tuple:
    """The first SCAN call on a namespace of ``keys`` keys, then the ticks
    that copy the rest of its snapshot (#12: it was one copy in the call)."""
    engine = _engine()
    s = engine.open_session()
    batch = 10_000
    bounds = None if ns == "" else [2 * keys, 3, 2**34]
    for start in range(0, keys, batch):
        items = [x for i in range(start, min(keys, start + batch)) for x in (f"user:{i:07d}", b"v" * 25)]
        engine.dispatch(s, F.SET_MANY, [ns, items, None if ns == "" else 300, bounds])
    t0 = time.perf_counter()
    engine.dispatch(s, F.SCAN, [ns, 0, "*", 100])
    first = time.perf_counter() - t0
    longest, calls, total = 0.0, 0, 0.0
    while getattr(engine.scans, "copying", None):  # a tree of before #12's copy in steps has none
        t0 = time.perf_counter()
        engine.tick()
        took = time.perf_counter() - t0
        longest, calls, total = max(longest, took), calls + 1, total + took
    return first, longest, calls, total


CASES = {
    f"close: {LOCKS} locks": lambda: locks_close(),
    f"close: {LOCKS} locks, 1000 of them with a waiter": lambda: locks_close(1000),
    f"close: {TRACKED} keys read into a near cache": lambda: tracking_close(1),
    f"close: 40 trackers x {TRACKED} keys (one close each)": lambda: _forty(),
    "close: 1024 prefix listeners (the per-connection cap)": lambda: subscriptions_close(1024),
    f"close: {PREFIXES} prefix listeners (cap lifted)": lambda: subscriptions_close(PREFIXES),
    "close: all of the above on one connection": everything_close,
    "stats(): 200k locks, 1M near-cache reads, 50k subscriptions": stats_big,
    "SCAN start: 1M keys in the store (first call; ticks)": lambda: scan_start(1_000_000),
    "SCAN start: 1M keys in a cache (first call; ticks)": lambda: scan_start(1_000_000, "c"),
}


def _forty() -> tuple:
    return tracking_close(40)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--only", default="")
    opts = parser.parse_args()
    print(f"{'case':58} {'close ms':>9} {'tick max ms':>12} {'ticks':>6} {'ticks ms':>9}")
    for name, case in CASES.items():
        if opts.only and opts.only not in name:
            continue
        runs = [case() for _ in range(opts.runs)]
        cols = [statistics.median(r[i] for r in runs) for i in range(len(runs[0]))]
        line = f"{name:58} {cols[0] * 1000:9.2f}"
        if len(cols) > 1:
            line += f" {cols[1] * 1000:12.2f} {cols[2]:6.0f} {cols[3] * 1000:9.2f}"
        print(line, flush=True)


if __name__ == "__main__":
    main()
