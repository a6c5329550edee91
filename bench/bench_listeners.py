"""Listener delivery delay: clustershm.listen() against Redis pub/sub, a write in one process to the callback in another.

One event in flight at a time: the writer stamps ``time.monotonic_ns()`` (system-wide) into the value it writes or
publishes, the listener's callback takes the difference and acknowledges it over a pipe, and the writer waits for
that before the next event. None may be lost. Target: a clustershm median under 200 µs (README.md has the details).
"""

from __future__ import annotations

import gc
import pickle
import signal
import statistics
import time

import lab
from lab import clustershm

KEY = "bench:listeners:key"
CHANNEL = "bench:listeners:channel"
BLOCK = 500  # timed events per system per round of the interleaving
ACK_TIMEOUT = 5.0  # seconds the writer waits for an event's acknowledgement before calling it lost
TARGET_MEDIAN_US = 200.0
LABELS = {"clustershm": "django_clustershm.listen()", "redis": "Redis pub/sub (redis-py)"}


def _clustershm_listener(ack_w: int) -> None:
    """Body of the clustershm listener: acknowledge every event from the dispatcher thread until SIGTERM."""
    gc.disable()
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})  # the dispatcher inherits it: sigwait() gets it
    clock, send = time.monotonic_ns, lab.send

    def on_change(key, value, event):
        now = clock()
        ok = event == "set" and type(value) is tuple
        send(ack_w, f"{value[0]} {now - value[1]}" if ok else "-1 0")  # -1: the writer reports it

    handle = clustershm.listen(KEY, on_change)  # returns once the Manager has the subscription
    send(ack_w, "ready")
    signal.sigwait({signal.SIGTERM})
    handle.cancel()


def _redis_subscriber(path: str, ack_w: int) -> None:
    """Body of the Redis subscriber: a blocking get_message loop in the main thread, until SIGTERM."""
    gc.disable()
    lab.stop_on_sigterm()
    import redis

    client = redis.Redis(unix_socket_path=path)
    pubsub = client.pubsub()
    try:
        pubsub.subscribe(CHANNEL)
        get_message, loads, clock, send = pubsub.get_message, pickle.loads, time.monotonic_ns, lab.send
        while True:
            msg = get_message(timeout=1.0)
            if msg is not None and msg["type"] == "message":
                seq, stamp = loads(msg["data"])
                now = clock()
                send(ack_w, f"{seq} {now - stamp}")
            elif msg is not None and msg["type"] == "subscribe":  # confirmed: the parent waits for it
                send(ack_w, "ready")
    except lab.Stop:
        pass
    finally:
        pubsub.close()
        client.close()


def measure(writers: dict, acks: dict, n: int, warmup: int, problems: list) -> dict:
    """``warmup`` then ``n`` events per system, one at a time, interleaved blocks; the delays' summary."""
    delays: dict = {name: [] for name in writers}
    calls: dict = {name: [] for name in writers}
    lost, seqs = dict.fromkeys(writers, 0), dict.fromkeys(writers, 0)
    clock = time.monotonic_ns

    def events(name: str, count: int, keep: bool) -> None:
        write, lines = writers[name], acks[name]
        for seq in range(seqs[name], seqs[name] + count):
            t0 = clock()
            write(seq, t0)
            t1 = clock()
            try:
                got, delay = map(int, lines.read(ACK_TIMEOUT, f"acknowledgement of event {seq}").split())
                while got < seq:  # a late acknowledgement of an event already counted as lost
                    got, delay = map(int, lines.read(ACK_TIMEOUT, f"acknowledgement of event {seq}").split())
            except TimeoutError as exc:
                lost[name] += keep
                problems.append(f"{LABELS[name]}: {exc}")
                continue
            if got != seq:
                raise lab.BenchError(f"event {seq} acknowledged as {got} (a wrong value or event reached the listener)")
            if keep:
                delays[name].append(delay)
                calls[name].append(t1 - t0)
        seqs[name] += count

    for name in writers:
        events(name, warmup, False)
    with lab.gc_paused():
        for start in range(0, n, BLOCK):
            for name in writers:
                events(name, min(BLOCK, n - start), True)
    return {name: {"events": n, "delivered": len(delays[name]), "lost": lost[name], **lab.summary(delays[name], 1e-3),
                   "write_call_median_us": statistics.median(calls[name]) / 1e3 if calls[name] else None}
            for name in writers}  # fmt: skip


def main(argv=None) -> int:
    args = lab.options(__doc__, argv, {"n": 500, "warmup": 50}, n=(lab.count, 5000, "timed events per system"),
                       warmup=(lab.count0, 200, "untimed events per system first"))  # fmt: skip
    lab.need(binaries=["redis-server"], modules=["redis"])
    import redis

    problems: list[str] = []
    with lab.Lab("listen") as bench:
        lab.log(f"temp dir {bench.tmpdir}: starting the Manager, redis-server and the two listeners")
        bench.start_manager()
        client = redis.Redis(unix_socket_path=bench.start_redis())
        bench.cleanups.append(client.close)
        acks = {}
        for name, body, *more in (("clustershm", _clustershm_listener), ("redis", _redis_subscriber, bench.redis_path)):
            _, acks[name] = bench.start_child(f"the {LABELS[name]} listener", body, *more)
            if (word := acks[name].read(lab.READY_TIMEOUT, f"subscription of the {LABELS[name]} listener")) != "ready":
                raise lab.BenchError(f"the {LABELS[name]} listener said {word!r}")
        publish, dumps, shm_set = client.publish, pickle.dumps, clustershm.set

        def write_redis(seq: int, stamp: int) -> None:
            if publish(CHANNEL, dumps((seq, stamp))) != 1:
                raise lab.BenchError("a publish reached no subscriber")

        writers = {"clustershm": lambda seq, stamp: shm_set(KEY, (seq, stamp)), "redis": write_redis}
        lab.log(f"{args.warmup} warm-up then {args.n} timed events per system, interleaved blocks of {BLOCK}")
        results = measure(writers, acks, args.n, args.warmup, problems)
    problems += bench.warnings

    base, shm = results["redis"]["median_us"], results["clustershm"]
    rows = [[LABELS[name], f"{r['delivered']} / {r['events']}", *(lab.fmt(r[k]) for k in
             ("median_us", "p90_us", "p99_us", "max_us", "write_call_median_us")), lab.fmt_x(r["median_us"], base)]
            for name, r in results.items()]  # fmt: skip
    target_text, target = lab.targets("Target", {"median": (
        f"django_clustershm median write -> callback delay {lab.fmt(shm['median_us'])} µs"
        + (f", {shm['lost']} events lost" if shm["lost"] else "")
        + f" (target <= {TARGET_MEDIAN_US:g} µs, none lost); Redis pub/sub in the same run: {lab.fmt(base)} µs",
        shm["median_us"], TARGET_MEDIAN_US, False, not shm["lost"])})  # fmt: skip
    more = f"; and {len(problems) - 20} more" if len(problems) > 20 else ""
    text = [
        lab.header(f"Listener delivery delay, write in one process -> callback in another: N={args.n} sequential "
                   f"events per system after {args.warmup} warm-up, interleaved blocks of {BLOCK}; {bench.elapsed:.1f}s",
                   bench.versions),
        lab.table(["system", "delivered / events", "median (µs)", "p90 (µs)", "p99 (µs)", "max (µs)",
                   "write call median (µs)", "median / Redis"], rows),
        target_text,
        *(["Problems: " + "; ".join(problems[:20]) + more] if problems else []),
    ]  # fmt: skip
    report = {"block": BLOCK, "results": results, "target": target["median"], "problems": problems}
    headlines = {"listener delay median (µs)": (shm["median_us"], "lower")}
    return lab.finish(args, bench, text, report, headlines, failed=problems)


if __name__ == "__main__":
    lab.run(main)
