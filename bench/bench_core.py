"""Core latency benchmark: one client, one Manager, one operation at a time.

Run by hand from the repository root (it is not part of the test suite)::

    python bench/bench_core.py                # N = 20000 timed calls per operation
    python bench/bench_core.py --n 50000 --json bench/results/core.json

What it measures
----------------
The wall-clock latency of single, sequential client calls (``time.perf_counter``
around each call) against a real :class:`~django_clustershm.manager.Manager`
serving in its own forked process over a Unix socket, as a Django worker sees
them: argument checks, pickling the value, msgpack framing, the socket round
trip, the Manager's dispatch, and decoding the reply.

Operations: ``get`` hit (a small dict value), ``get`` miss, ``set`` (the same
small value), ``incr``, ``get_many`` of 10 keys, ``set_many`` of 10 keys.

They are compared with a *floor*: the cheapest round trip Python can make
between two processes. A second forked process echoes on one end of a
``socket.socketpair()``; the client sends a ``struct "!I"`` length prefix and a
pickled request, the floor ``pickle.loads`` it and replies with a length prefix
and a ``pickle.dumps`` of the same small dict. No protocol, no checks, no
store: whatever the Manager costs above that is its own overhead.

How to read it
--------------
One Markdown table: for each operation the median and the 99th percentile
(nearest rank) in microseconds, and the ratio of its median to the floor's
median. The last line checks the design target: a ``get`` hit should cost at
most twice the floor round trip.

Each process is single-threaded and the client waits for every reply, so a
call costs two context switches plus Python work on both sides. The timed
calls run in interleaved blocks (a block of every operation in turn, until
each has N) so that drift in the machine's load affects every row alike, and
the garbage collector is paused while timing.

The reference machine has 2 cores shared by three busy-ish processes (this
one, the Manager, the floor) and is noisy: p99 moves a lot from run to run,
and absolute numbers depend on the machine. Only the medians, and their ratios to
the floor measured in the same run, are meaningful; do not compare absolute
microseconds between runs or machines.

CPU placement dominates on a small VM. When the client and its server run on
different CPUs, each round trip pays for waking an idle CPU (tens of
microseconds on the 2-vCPU reference VM); on the same CPU it does not. The
scheduler chooses the placement on its own, so the same code can give very
different medians from one run to the next. ``--pin CPU`` pins every process
of the run (this one and both children) to one CPU, which makes the
comparison steadier: client and server work then add up on that CPU, with no
cross-CPU wake-ups for either the floor or the Manager. The header line says
which CPUs the run used. Memory layout can matter too (glibc's malloc decides
per process whether a large allocation is a fresh mmap), so if two runs
disagree by a wide margin, compare a few runs before drawing a conclusion.
"""

from __future__ import annotations

import argparse
import os
import pickle
import platform
import shutil
import signal
import socket
import struct
import sys
import tempfile
import time

try:
    import django_clustershm  # noqa: F401
except ImportError:  # run as "python bench/bench_core.py" without PYTHONPATH
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # bench/, for _common
from _common import (  # noqa: E402
    fork,
    fork_manager,
    reap,
    summarise_us,
    time_interleaved,
    wait_manager_ready,
    write_json,
)

from django_clustershm.client import SocketClient  # noqa: E402

#: The "small value" of every operation that stores or returns one.
VALUE = {"id": 42, "name": "alice", "active": True, "score": 3.5, "tags": ["a", "b"]}
MANY = 10
LENGTH = struct.Struct("!I")
BLOCK = 1000  # timed calls per operation per round of the interleaving


# -- the children ------------------------------------------------------------------


def _floor_child(sock: socket.socket, parent_end: socket.socket) -> None:
    """Body of the floor process: a length-prefixed pickle echo on a socketpair."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    parent_end.close()  # so that the parent closing its end gives us EOF
    recv, sendall, loads, dumps = sock.recv, sock.sendall, pickle.loads, pickle.dumps
    pack, unpack_from, size = LENGTH.pack, LENGTH.unpack_from, LENGTH.size
    buf = b""
    while True:
        while len(buf) < size:
            chunk = recv(65536)
            if not chunk:
                return
            buf += chunk
        end = size + unpack_from(buf)[0]
        while len(buf) < end:
            chunk = recv(65536)
            if not chunk:
                return
            buf += chunk
        loads(buf[size:end])
        buf = buf[end:]
        body = dumps(VALUE)
        sendall(pack(len(body)) + body)


# -- the client side ---------------------------------------------------------------


def _floor_caller(sock: socket.socket):
    recv, sendall, loads, dumps = sock.recv, sock.sendall, pickle.loads, pickle.dumps
    pack, unpack_from, size = LENGTH.pack, LENGTH.unpack_from, LENGTH.size
    request = ("get", "", "bench:hit")

    def floor():
        body = dumps(request)
        sendall(pack(len(body)) + body)
        data = recv(65536)
        while len(data) < size or len(data) < size + unpack_from(data)[0]:
            chunk = recv(65536)
            if not chunk:
                raise ConnectionError("the floor process went away")
            data += chunk
        return loads(data[size:])

    return floor


def _operations(client: SocketClient, floor) -> dict:
    """name -> zero-argument callable; also seeds the keys the reads need."""
    many_keys = [f"bench:many:{i}" for i in range(MANY)]
    many_items = {f"bench:setmany:{i}": VALUE for i in range(MANY)}
    client.set("bench:hit", VALUE)
    client.remove("bench:missing")
    client.set_many({k: VALUE for k in many_keys})
    assert client.get("bench:hit") == VALUE and floor() == VALUE
    assert client.get("bench:missing") is None
    assert len(client.get_many(many_keys)) == MANY
    get, set_, incr, get_many, set_many = client.get, client.set, client.incr, client.get_many, client.set_many
    return {
        "floor round trip": floor,
        "get hit": lambda: get("bench:hit"),
        "get miss": lambda: get("bench:missing"),
        "set": lambda: set_("bench:set", VALUE),
        "incr": lambda: incr("bench:counter"),
        f"get_many({MANY} keys)": lambda: get_many(many_keys),
        f"set_many({MANY} keys)": lambda: set_many(many_items),
    }


def _summarise(samples: dict) -> dict:
    results = summarise_us(samples)
    floor_median = results["floor round trip"]["median_us"]
    for row in results.values():
        row["ratio_to_floor"] = row["median_us"] / floor_median
    return results


def _table(results: dict) -> str:
    lines = [
        "| operation | median (µs) | p99 (µs) | median / floor |",
        "|---|---:|---:|---:|",
    ]
    for name, row in results.items():
        lines.append(f"| {name} | {row['median_us']:.1f} | {row['p99_us']:.1f} | {row['ratio_to_floor']:.2f}x |")
    return "\n".join(lines)


# -- main --------------------------------------------------------------------------


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=20000, help="timed calls per operation (default 20000)")
    parser.add_argument("--warmup", type=int, default=1000, help="untimed calls per operation first (default 1000)")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON to PATH")
    parser.add_argument(
        "--pin", type=int, metavar="CPU", help="run every process on this one CPU (default: let the scheduler place them)"
    )
    args = parser.parse_args(argv)
    if args.n < 1 or args.warmup < 0:
        parser.error("--n must be >= 1 and --warmup >= 0")
    if args.pin is not None:
        try:
            os.sched_setaffinity(0, {args.pin})  # inherited by the children forked below
        except (OSError, ValueError) as exc:
            parser.error(f"cannot pin to CPU {args.pin}: {exc}")
    cpus = sorted(os.sched_getaffinity(0))

    tmpdir = tempfile.mkdtemp(prefix="clustershm-bench-")
    address = os.path.join(tmpdir, "manager.sock")
    secret = os.urandom(32)
    children: list[int] = []
    client = None
    floor_sock = None
    try:
        pid, ready_r = fork_manager(address, secret)
        children.append(pid)
        wait_manager_ready(ready_r)

        floor_sock, floor_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            children.append(fork(_floor_child, floor_end, floor_sock))
        finally:
            floor_end.close()

        client = SocketClient(address, secret)
        ops = _operations(client, _floor_caller(floor_sock))
        started = time.perf_counter()
        # Only the server under measurement is allowed to run: the other is
        # stopped, so both see the same machine.
        pause = {name: children[0] if name == "floor round trip" else children[1] for name in ops}
        results = _summarise(time_interleaved(ops, args.n, args.warmup, BLOCK, pause))
        elapsed = time.perf_counter() - started
    finally:
        if client is not None:
            client.close()
        if floor_sock is not None:
            floor_sock.close()
        for i, pid in enumerate(children):
            status = reap(pid, timeout=5.0, term=True)
            if i == 0:  # the Manager: it should exit 0, having removed its socket
                if status is None or not os.WIFEXITED(status) or os.WEXITSTATUS(status) != 0:
                    print(f"warning: the Manager process exited with wait status {status}", file=sys.stderr)
                elif os.path.exists(address):
                    print("warning: the Manager left its socket behind", file=sys.stderr)
        shutil.rmtree(tmpdir, ignore_errors=True)

    ratio = results["get hit"]["ratio_to_floor"]
    print(
        f"django-clustershm core latency: N={args.n} timed calls per operation after {args.warmup} warm-up, "
        f"Python {platform.python_version()}, {os.cpu_count()} CPUs, "
        f"{'pinned to CPU %d' % args.pin if args.pin is not None else 'unpinned (CPUs %s)' % cpus}, {elapsed:.1f}s"
    )
    print()
    print(_table(results))
    print()
    print(f"get-hit median / floor median = {ratio:.2f}x (target <= 2x)")

    if args.json:
        report = {
            "benchmark": "bench_core",
            "n": args.n,
            "warmup": args.warmup,
            "python": platform.python_version(),
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "pinned_cpu": args.pin,
            "allowed_cpus": cpus,
            "seconds": elapsed,
            "value": repr(VALUE),
            "results": results,
            "target": {"get_hit_over_floor": ratio, "max": 2.0, "met": ratio <= 2.0},
        }
        write_json(args.json, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
