"""Listener delivery delay: django_clustershm.listen() against Redis pub/sub, write to callback across processes.

Run by hand from the repository root (it is not part of the test suite)::

    python bench/bench_listeners.py                  # N = 5000 events per system
    python bench/bench_listeners.py --n 20000 --json bench/results/listeners.json

Needs ``redis-server`` (on the PATH or in /usr/bin) and the Python package
``redis`` (``pip install -e '.[bench]'``). Everything the script starts
listens on a Unix socket in one private (0700) temporary directory, nothing on
TCP; it stops every server by pid at the end, reaps every child it forked
(checking how each one ended) and removes the directory:

* ``django_clustershm``: a :class:`~django_clustershm.manager.Manager` serving
  in a forked child of this script (created inside the child: it belongs to
  the process that created it); this process calls
  ``django_clustershm.configure(address, secret)`` before forking anything
  else, so the listener process inherits it;
* Redis: ``redis-server --port 0 --unixsocket PATH --save '' --appendonly no``.

What it measures
----------------
The delay from a write in one process to the moment a callback in another
process has the written value, one event at a time:

* django_clustershm: a forked *listener* process calls
  ``django_clustershm.listen(KEY, callback)``; the callback runs in the
  listener's dispatcher thread. This process (the *writer*) calls
  ``django_clustershm.set(KEY, (seq, time.monotonic_ns()))``.
* Redis: a forked *subscriber* process subscribes with redis-py
  (``Redis(unix_socket_path=...).pubsub()``) and loops on a blocking
  ``get_message(timeout=1.0)`` in its main thread, then ``pickle.loads`` the
  payload (django_clustershm hands its callback an unpickled value too). The
  writer calls ``redis.publish(CHANNEL, pickle.dumps((seq, time.monotonic_ns())))``.

The stamp is taken right before the write call; the callback (the subscriber,
once it has the unpickled payload) takes ``time.monotonic_ns()`` first thing.
CLOCK_MONOTONIC is system-wide on Linux, so the difference is the delivery
delay. The listener then writes ``(seq, delay)`` into a pipe, and the writer
waits for that acknowledgement before it writes the next event: events are
strictly sequential, there is never more than one in flight. Each system
gets ``--warmup`` untimed events first; the timed events of the two systems
run in interleaved blocks of 500 so that drift in the machine's load affects
both alike (the idle listener sleeps in a blocking read meanwhile). The
garbage collector is off in the listener processes and paused in the writer.
The table also gives how long the write call took to return in the writer.

How to read it
--------------
One Markdown table on stdout (progress goes to stderr): median, 90th and 99th
percentiles (nearest rank) and maximum of the delay in microseconds, the
median of the write call, and the events that never arrived (there must be
none). Then the design target as a PASS/FAIL line: django_clustershm's median
delay below 200 µs.

Absolute numbers depend on the machine; compare the two systems within one
run. Each event wakes three processes (writer, server, listener); on a small
VM (the header says how many CPUs) they compete for few CPUs and the
scheduler's placement moves medians and especially the p99 from run to run.
"""

from __future__ import annotations

import argparse
import gc
import os
import pickle
import platform
import select
import signal
import statistics
import struct
import sys
import time

try:
    import django_clustershm  # noqa: F401
except ImportError:  # run as "python bench/bench_listeners.py" without PYTHONPATH
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import django_clustershm  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # bench/, for _common
import _common  # noqa: E402
from _common import (  # noqa: E402
    BenchError,
    describe_status,
    die_with_parent,
    exited_ok,
    fmt_us,
    fork,
    gc_paused,
    log,
    package_versions,
    rank,
    reap,
    write_json,
)

KEY = "bench:listeners:key"
CHANNEL = "bench:listeners:channel"
STOP = b"stop"  # the Redis subscriber's in-band end of the run
ACK = struct.Struct("!qq")  # (seq, delay in ns) from the listener to the writer; 16 bytes, one atomic pipe write
BLOCK = 500  # timed events per system per round of the interleaving
ACK_TIMEOUT = 5.0  # seconds the writer waits for an event's acknowledgement before calling it lost
READY_TIMEOUT = 30.0  # seconds a forked child may take to subscribe and report
TARGET_MEDIAN_US = 200.0  # django_clustershm median write -> callback delay, below

LABELS = {
    "clustershm": "django_clustershm.listen()",
    "redis": "Redis pub/sub (redis-py)",
}


# -- forked children ---------------------------------------------------------------


def _wait_message(fd: int, timeout: float, what: str) -> bytes:
    readable, _, _ = select.select([fd], [], [], timeout)
    if not readable:
        raise BenchError(f"no {what} within {timeout:.0f}s")
    msg = os.read(fd, 4096)
    if not msg:
        raise BenchError(f"the child exited before sending {what} (see stderr)")
    return msg


def _clustershm_listener(ack_w: int, ready_w: int, ctl_r: int, parent_only: list[int]) -> None:
    """Body of the clustershm listener: subscribe, acknowledge every event, leave when ctl_r reaches EOF."""
    for fd in parent_only:
        os.close(fd)
    die_with_parent()
    gc.disable()
    clock, write, pack = time.monotonic_ns, os.write, ACK.pack

    def on_change(key, value, event):
        now = clock()
        if event != "set" or type(value) is not tuple:
            write(ack_w, pack(-1, 0))  # the writer reports it
            return
        seq, stamp = value
        write(ack_w, pack(seq, now - stamp))

    handle = django_clustershm.listen(KEY, on_change)  # returns once the Manager has the subscription
    os.write(ready_w, b"ready")
    os.close(ready_w)
    while os.read(ctl_r, 64):  # blocks (the callbacks run in the dispatcher thread) until the writer closes it
        pass
    handle.cancel()


def _redis_subscriber(path: str, ack_w: int, ready_w: int, parent_only: list[int]) -> None:
    """Body of the Redis subscriber: a blocking get_message loop in the main thread, until STOP."""
    for fd in parent_only:
        os.close(fd)
    die_with_parent()
    gc.disable()
    import redis

    client = redis.Redis(unix_socket_path=path)
    pubsub = client.pubsub()
    try:
        pubsub.subscribe(CHANNEL)
        deadline = time.monotonic() + READY_TIMEOUT
        while True:  # the subscribe confirmation
            msg = pubsub.get_message(timeout=1.0)
            if msg is not None and msg["type"] == "subscribe":
                break
            if time.monotonic() > deadline:
                raise RuntimeError("no subscribe confirmation from redis-server")
        os.write(ready_w, b"ready")
        os.close(ready_w)
        get_message, loads, clock, write, pack = pubsub.get_message, pickle.loads, time.monotonic_ns, os.write, ACK.pack
        while True:
            msg = get_message(timeout=1.0)
            if msg is None or msg["type"] != "message":
                continue
            data = msg["data"]
            if data == STOP:
                break
            seq, stamp = loads(data)
            now = clock()
            write(ack_w, pack(seq, now - stamp))
    finally:
        pubsub.close()
        client.close()


# -- the servers and the listeners ---------------------------------------------------


class Lab(_common.Lab):
    """The temp directory, the servers and the listener processes this script starts (and stops, by pid)."""

    def __init__(self) -> None:
        super().__init__("bench-listen-")
        self.listeners: dict[str, dict] = {}  # name -> {"pid", "ack_r", "ctl_w"}

    def start_listener(self, name: str) -> None:
        """Fork the listener of ``name`` and wait until it is subscribed."""
        ack_r, ack_w = os.pipe()
        ready_r, ready_w = os.pipe()
        ctl_r, ctl_w = os.pipe()
        # The child closes the parent's ends of its own pipes and of the other listeners' (so that closing
        # a ctl_w gives its listener EOF).
        parent_only = [ack_r, ready_r, ctl_w]
        for other in self.listeners.values():
            parent_only += [fd for fd in (other["ack_r"], other["ctl_w"]) if fd is not None]
        entry = {"pid": None, "ack_r": ack_r, "ctl_w": ctl_w}
        self.listeners[name] = entry
        try:
            if name == "clustershm":
                entry["pid"] = fork(_clustershm_listener, ack_w, ready_w, ctl_r, parent_only, child_signals=True)
            else:
                entry["pid"] = fork(_redis_subscriber, self.redis_path, ack_w, ready_w, parent_only, child_signals=True)
        finally:
            for fd in (ack_w, ready_w, ctl_r):
                os.close(fd)
        try:
            msg = _wait_message(ready_r, READY_TIMEOUT, f"subscription from the {LABELS[name]} listener")
            if msg != b"ready":
                raise BenchError(f"the {LABELS[name]} listener said {msg!r}")
        finally:
            os.close(ready_r)

    def stop_listeners(self) -> list[str]:
        """End every listener (EOF for clustershm's, STOP for Redis'), reap it by pid; return warnings."""
        warnings = []
        for name, entry in self.listeners.items():
            if entry["ctl_w"] is not None:
                os.close(entry["ctl_w"])  # the clustershm listener's main thread reads EOF and returns
                entry["ctl_w"] = None
            if entry["pid"] is None:
                continue
            server = self.servers.get("redis-server")
            if name == "redis" and server is not None and server.poll() is None:
                try:
                    import redis

                    with redis.Redis(unix_socket_path=self.redis_path) as client:
                        client.publish(CHANNEL, STOP)
                except Exception as exc:
                    warnings.append(f"could not publish the stop message: {exc!r}")
            status = reap(entry["pid"])
            if not exited_ok(status):
                label = f"the {LABELS[name]} listener (pid {entry['pid']})"
                warnings.append(f"{label} ended with {describe_status(status)}")
            entry["pid"] = None
            os.close(entry["ack_r"])
        self.listeners.clear()
        return warnings

    def close(self) -> list[str]:
        """Stop the listeners and every server by pid, reap them, remove the temp dir; return warnings."""
        return self.stop_listeners() + super().close()


# -- the writer ---------------------------------------------------------------------


def _writers(lab: Lab) -> dict:
    """name -> write(seq, stamp), the call the writer times."""
    import redis

    client = redis.Redis(unix_socket_path=lab.redis_path)
    publish, dumps, shm_set = client.publish, pickle.dumps, django_clustershm.set

    def write_clustershm(seq: int, stamp: int) -> None:
        shm_set(KEY, (seq, stamp))

    def write_redis(seq: int, stamp: int) -> None:
        if publish(CHANNEL, dumps((seq, stamp))) != 1:
            raise BenchError("a publish reached no subscriber")

    return {"clustershm": write_clustershm, "redis": write_redis, "_redis_client": client}


class _Acks:
    """The acknowledgements of one listener: 16-byte (seq, delay) records read from its pipe."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.buf = b""

    def wait(self, timeout: float) -> tuple[int, int] | None:
        deadline = time.monotonic() + timeout
        while len(self.buf) < ACK.size:
            left = deadline - time.monotonic()
            readable, _, _ = select.select([self.fd], [], [], max(0.0, left))
            if not readable:
                return None
            chunk = os.read(self.fd, 4096)
            if not chunk:
                raise BenchError("a listener exited during the run (see stderr)")
            self.buf += chunk
        record, self.buf = self.buf[: ACK.size], self.buf[ACK.size :]
        return ACK.unpack(record)


def _run_events(write, acks: _Acks, first_seq: int, count: int, delays: list, calls: list, problems: list) -> int:
    """Write ``count`` events one by one, each after the previous one's acknowledgement; the events lost."""
    clock = time.monotonic_ns
    lost = 0
    for seq in range(first_seq, first_seq + count):
        t0 = clock()
        write(seq, t0)
        t1 = clock()
        ack = acks.wait(ACK_TIMEOUT)
        if ack is None:
            lost += 1
            problems.append(f"event {seq} was not acknowledged within {ACK_TIMEOUT:g}s")
            continue
        got, delay = ack
        while got < seq:  # a late acknowledgement of an event already counted as lost
            ack = acks.wait(ACK_TIMEOUT)
            if ack is None:
                raise BenchError(f"event {seq} lost after a late acknowledgement")
            got, delay = ack
        if got != seq:
            raise BenchError(f"event {seq} acknowledged as {got} (a wrong value or event reached the listener)")
        delays.append(delay)
        calls.append(t1 - t0)
    return lost


def measure(lab: Lab, names: list[str], n: int, warmup: int, problems: list) -> dict:
    writers = _writers(lab)
    acks = {name: _Acks(lab.listeners[name]["ack_r"]) for name in names}
    seqs = dict.fromkeys(names, 0)
    delays: dict[str, list] = {name: [] for name in names}
    calls: dict[str, list] = {name: [] for name in names}
    lost = dict.fromkeys(names, 0)
    try:
        for name in names:
            scratch: list = []
            _run_events(writers[name], acks[name], 0, warmup, scratch, [], problems)
            seqs[name] = warmup
        with gc_paused():
            started = time.perf_counter()
            remaining = n
            while remaining > 0:
                count = min(BLOCK, remaining)
                for name in names:
                    lost[name] += _run_events(writers[name], acks[name], seqs[name], count, delays[name], calls[name],
                                              problems)  # fmt: skip
                    seqs[name] += count
                remaining -= count
        elapsed = time.perf_counter() - started
    finally:
        writers["_redis_client"].close()
    results = {}
    for name in names:
        values = sorted(delays[name])
        results[name] = {
            "events": n,
            "delivered": len(values),
            "lost": lost[name],
            "median_us": statistics.median(values) / 1e3 if values else None,
            "p90_us": rank(values, 0.90) / 1e3 if values else None,
            "p99_us": rank(values, 0.99) / 1e3 if values else None,
            "max_us": values[-1] / 1e3 if values else None,
            "min_us": values[0] / 1e3 if values else None,
            "write_call_median_us": statistics.median(calls[name]) / 1e3 if calls[name] else None,
        }
    results["_elapsed_s"] = elapsed
    return results


# -- report -------------------------------------------------------------------------


def _table(results: dict, names: list[str]) -> str:
    lines = [
        "| system | delivered / events | median (µs) | p90 (µs) | p99 (µs) | max (µs) | write call median (µs) "
        "| median / Redis |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    base = results.get("redis", {}).get("median_us")
    for name in names:
        row = results[name]
        ratio = f"{row['median_us'] / base:.2f}x" if base and row["median_us"] is not None else "n/a"
        lines.append(
            f"| {LABELS[name]} | {row['delivered']} / {row['events']} | {fmt_us(row['median_us'])} | "
            f"{fmt_us(row['p90_us'])} | {fmt_us(row['p99_us'])} | {fmt_us(row['max_us'])} | "
            f"{fmt_us(row['write_call_median_us'])} | {ratio} |"
        )
    return "\n".join(lines)


def _target(results: dict) -> dict:
    row = results["clustershm"]
    median = row["median_us"]
    met = median is not None and row["lost"] == 0 and median < TARGET_MEDIAN_US
    return {"median_us": median, "lost": row["lost"], "max_us": TARGET_MEDIAN_US, "met": met}


def _versions(lab: Lab) -> str:
    parts = package_versions(("redis", "hiredis"))
    parts.append(f"redis-server {lab.versions.get('redis-server', '?')}")
    return ", ".join(parts)


# -- main --------------------------------------------------------------------------


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=5000, help="timed events per system (default 5000)")
    parser.add_argument("--warmup", type=int, default=200, help="untimed events per system first (default 200)")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON to PATH")
    args = parser.parse_args(argv)
    if args.n < 1 or args.warmup < 0:
        parser.error("--n must be >= 1 and --warmup >= 0")
    try:
        import redis  # noqa: F401
    except ImportError:
        print("bench_listeners: cannot run: the Python package 'redis' is missing: pip install -e '.[bench]'",
              file=sys.stderr)  # fmt: skip
        return 2

    # SIGTERM ends the run through the finally clause below, like Ctrl-C.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))

    names = ["clustershm", "redis"]
    started = time.perf_counter()
    lab = Lab()
    problems: list[str] = []
    try:
        log(f"temp dir {lab.tmpdir}: starting the Manager and redis-server")
        lab.start_manager()
        lab.start_redis()
        for name in names:
            log(f"starting the {LABELS[name]} listener")
            lab.start_listener(name)
        log(f"{args.warmup} warm-up then {args.n} timed events per system, sequential, interleaved blocks of {BLOCK}")
        results = measure(lab, names, args.n, args.warmup, problems)
        versions = _versions(lab)
    except BenchError as exc:
        log(f"error: {exc}")
        return 2
    finally:
        warnings = lab.close()
        for w in warnings:
            log(f"warning: {w}")
        problems.extend(warnings)
    elapsed = time.perf_counter() - started
    timed = results.pop("_elapsed_s")

    target = _target(results)
    cpus = sorted(os.sched_getaffinity(0))
    print(
        f"Listener delivery delay, write in one process -> callback in another: N={args.n} sequential events per "
        f"system after {args.warmup} warm-up, interleaved blocks of {BLOCK}. Python {platform.python_version()}, "
        f"{os.cpu_count()} CPUs (allowed: {cpus}), {versions}; timed part {timed:.1f}s, run {elapsed:.1f}s"
    )
    print()
    print(_table(results, names))
    print()
    print("### Target")
    print()
    shm, red = results["clustershm"], results["redis"]
    lost = f", {shm['lost']} events lost" if shm["lost"] else ""
    print(
        f"- {'PASS' if target['met'] else 'FAIL'}: django_clustershm median write -> callback delay "
        f"{fmt_us(shm['median_us'])} µs{lost} (target < {TARGET_MEDIAN_US:g} µs); Redis pub/sub in the same run: "
        f"{fmt_us(red['median_us'])} µs"
    )
    if problems:
        print()
        more = f"; and {len(problems) - 20} more" if len(problems) > 20 else ""
        print("Problems: " + "; ".join(problems[:20]) + more)

    if args.json:
        report = {
            "benchmark": "bench_listeners",
            "n": args.n,
            "warmup": args.warmup,
            "block": BLOCK,
            "python": platform.python_version(),
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "allowed_cpus": cpus,
            "versions": versions,
            "elapsed_s": elapsed,
            "timed_s": timed,
            "results": results,
            "target": target,
            "problems": problems,
        }
        write_json(args.json, report)
    return 1 if problems else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:  # the finally clause has stopped every child and server by now
        print("bench_listeners: interrupted", file=sys.stderr)
        sys.exit(130)
